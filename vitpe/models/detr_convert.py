"""DETR-R50/R101 checkpoints (facebookresearch/detr and Hugging Face key layouts) -> vitpe's DETR keys
(``DETR(backbone="resnet50", pos="sine")``, as ``train_det.py`` builds it).

vitpe's layout: ``backbone.body.{0,1}`` (stem convolution and its batch norm), ``backbone.body.{4..7}.{i}``
(ResNet ``layer1..layer4``), ``input_proj``, ``transformer.encoder.{i}.{attn.{q,k,v,out}_proj,mlp.{fc1,fc2},
norm1,norm2}``, ``transformer.decoder.{i}.{self_attn,cross_attn}.{q,k,v,out}_proj``,
``transformer.decoder.{i}.{mlp.{fc1,fc2},norm1,norm2,norm3}``, ``transformer.dec_norm``, ``query_embed``,
``class_embed``, ``bbox_embed.layers.{0,1,2}``.

- facebookresearch/detr (``detr-r50-e632da11.pth``, the state dict under ``"model"``):
  ``backbone.0.body.{conv1,bn1,layer1..4}``, ``transformer.encoder.layers.{i}.self_attn.in_proj_{weight,bias}``
  (q, k and v packed, split here), ``self_attn.out_proj``, ``linear1``, ``linear2``, ``norm1``, ``norm2``;
  the decoder's ``multihead_attn`` is vitpe's ``cross_attn``; ``transformer.decoder.norm`` is ``dec_norm``.
- Hugging Face ``DetrForObjectDetection`` (timm ResNet backbone, transformers 4.x and 5.x names):
  ``model.backbone.conv_encoder.model.*`` (4.x) or ``model.backbone.model.*`` (5.x),
  ``model.encoder.layers.{i}.self_attn.{q,k,v}_proj``, ``self_attn.out_proj`` (4.x) or ``o_proj`` (5.x),
  ``self_attn_layer_norm``, ``fc1``/``fc2`` (4.x) or ``mlp.fc1``/``mlp.fc2`` (5.x), ``final_layer_norm``;
  the decoder's ``encoder_attn`` and ``encoder_attn_layer_norm``, ``model.decoder.layernorm``,
  ``model.query_position_embeddings``, ``model.input_projection``, ``class_labels_classifier``,
  ``bbox_predictor``.

vitpe's DETR computes what both references compute (post-norm layers, ReLU FFNs, DETR's
interleaved sine encoding): ``tests/test_detr_convert.py`` checks its outputs and losses against
Hugging Face's. Only the keys are renamed here: batch-norm ``num_batches_tracked`` counters are dropped, learned
position tables, pre-norm encoders (``transformer.encoder.norm``), mask heads and Hugging Face's
own ResNet backbone are refused with the key at fault named.
"""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .vit_convert import _unwrap

_logger = logging.getLogger(__name__)

# ResNet blocks per stage, by the number of blocks in layer3
_RESNET_DEPTHS = {6: ("resnet50", (3, 4, 6, 3)), 23: ("resnet101", (3, 4, 23, 3))}
_BN = r"(weight|bias|running_mean|running_var)"


def _resnet(rest: str) -> str | None:
    """A torchvision/timm ResNet key (``conv1.weight``, ``layer2.0.downsample.1.bias``) -> vitpe's
    ``backbone.body.*``; None if it is not one."""
    if rest == "conv1.weight":
        return "backbone.body.0.weight"
    m = re.fullmatch(rf"bn1\.{_BN}", rest)
    if m:
        return f"backbone.body.1.{m[1]}"
    m = re.fullmatch(rf"layer([1-4])\.(\d+)\.(conv[123]\.weight|bn[123]\.{_BN}|downsample\.0\.weight|"
                     rf"downsample\.1\.{_BN})", rest)
    if m:
        return f"backbone.body.{int(m[1]) + 3}.{m[2]}.{m[3]}"
    return None


_ORIG_ENC = {"self_attn.out_proj": "attn.out_proj", "linear1": "mlp.fc1", "linear2": "mlp.fc2",
             "norm1": "norm1", "norm2": "norm2"}
_ORIG_DEC = {"self_attn.out_proj": "self_attn.out_proj", "multihead_attn.out_proj": "cross_attn.out_proj",
             "linear1": "mlp.fc1", "linear2": "mlp.fc2", "norm1": "norm1", "norm2": "norm2", "norm3": "norm3"}
_ORIG_PACKED = {"self_attn": "self_attn", "multihead_attn": "cross_attn"}  # decoder; the encoder's is attn


def _layer(key: str, prefix: str, encoder: dict[str, str], decoder: dict[str, str]) -> str | None:
    """``<prefix>.{encoder,decoder}.layers.<i>.<module>.{weight,bias}`` -> vitpe's key, the module
    renamed by the part's table; None for any other key or a module the table does not know."""
    m = re.fullmatch(rf"{prefix}\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    table = None if m is None else encoder if m[1] == "encoder" else decoder
    return f"transformer.{m[1]}.{m[2]}.{table[m[3]]}.{m[4]}" if m and m[3] in table else None


def _original(key: str) -> str | list[str] | None:
    """facebookresearch/detr -> vitpe; a packed ``in_proj`` becomes the list of its q, k, v keys."""
    m = re.fullmatch(r"backbone\.0\.body\.(.+)", key)
    if m:
        return _resnet(m[1])
    m = re.fullmatch(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|multihead_attn)\.in_proj_(weight|bias)",
                     key)
    if m:  # nn.MultiheadAttention's packed projections
        name = _ORIG_PACKED[m[3]] if m[1] == "decoder" else "attn" if m[3] == "self_attn" else None
        return None if name is None else [f"transformer.{m[1]}.{m[2]}.{name}.{p}_proj.{m[4]}" for p in "qkv"]
    new = _layer(key, "transformer", _ORIG_ENC, _ORIG_DEC)
    if new:
        return new
    m = re.fullmatch(r"transformer\.decoder\.norm\.(weight|bias)", key)
    if m:
        return f"transformer.dec_norm.{m[1]}"
    m = re.fullmatch(r"(class_embed\.(?:weight|bias)|bbox_embed\.layers\.[0-2]\.(?:weight|bias)|query_embed\.weight|"
                     r"input_proj\.(?:weight|bias))", key)
    return m[1] if m else None


_HF_ENC = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
           "self_attn.out_proj": "attn.out_proj", "self_attn.o_proj": "attn.out_proj",
           "self_attn_layer_norm": "norm1", "final_layer_norm": "norm2",
           "fc1": "mlp.fc1", "fc2": "mlp.fc2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_HF_DEC = {**{f"{a}.{p}": f"{b}.{q}" for a, b in (("self_attn", "self_attn"), ("encoder_attn", "cross_attn"))
              for p, q in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                           ("out_proj", "out_proj"), ("o_proj", "out_proj"))},
           "self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3",
           "fc1": "mlp.fc1", "fc2": "mlp.fc2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _hugging_face(key: str) -> str | None:
    m = re.fullmatch(r"model\.backbone\.(?:conv_encoder\.)?model\.(.+)", key)
    if m:
        return _resnet(m[1])
    new = _layer(key, "model", _HF_ENC, _HF_DEC)
    if new:
        return new
    for pattern, repl in [(r"model\.decoder\.layernorm\.(weight|bias)", "transformer.dec_norm.{}"),
                          (r"model\.input_projection\.(weight|bias)", "input_proj.{}"),
                          (r"model\.query_position_embeddings\.(weight)", "query_embed.{}"),
                          (r"class_labels_classifier\.(weight|bias)", "class_embed.{}"),
                          (r"bbox_predictor\.layers\.([0-2]\.(?:weight|bias))", "bbox_embed.layers.{}")]:
        m = re.fullmatch(pattern, key)
        if m:
            return repl.format(m[1])
    return None


def _why_refused(key: str) -> str:
    """What an unknown key most likely means, for the error message."""
    if re.search(r"(row_embed|col_embed|column_embeddings|row_embeddings)", key):
        return "a learned position table: this checkpoint used DETR's learned encoding, vitpe's converter maps sine ones"
    if key.startswith("transformer.encoder.norm."):
        return "the encoder's final norm of a pre-norm DETR (--pre_norm); vitpe's DETR is post-norm"
    if "embedder.embedder" in key or ".encoder.stages." in key:
        return "Hugging Face's own ResNet backbone (use_timm_backbone=False); only the timm/torchvision layout is mapped"
    if re.search(r"(bbox_attention|mask_head)", key):
        return "a segmentation (panoptic) head, which vitpe's DETR does not have"
    return "no DETR-R50 rule knows it"


def detect_layout(keys: list[str]) -> str:
    """``'original'`` (facebookresearch/detr), ``'hugging_face'`` or ``'vitpe'``, from the keys. The
    heads' names (``class_embed``, ``query_embed``, ...) are shared by the original and vitpe and
    decide nothing."""
    found = set()
    for k in keys:
        if re.match(r"(backbone\.\d+\.|transformer\.(encoder|decoder)\.(layers|norm)\.)", k):
            found.add("original")
        elif re.match(r"(model\.|class_labels_classifier\.|bbox_predictor\.)", k):
            found.add("hugging_face")
        elif re.match(r"(backbone\.body\.|transformer\.(encoder|decoder)\.\d+\.|transformer\.dec_norm\.)", k):
            found.add("vitpe")
    if len(found) != 1:
        raise KeyError(f"cannot tell the DETR checkpoint layout from its keys: found "
                       f"{'keys of ' + ' and '.join(sorted(found)) if found else 'none'} of facebookresearch/detr "
                       f"('original'), Hugging Face, vitpe, e.g. {sorted(keys)[:3]}")
    return found.pop()


def expected_keys(num_encoder_layers: int, num_decoder_layers: int, depths: tuple[int, ...] = (3, 4, 6, 3)) -> list[str]:
    """vitpe's DETR state-dict keys (ResNet with frozen batch norm, ``pos="sine"``, no ``box_refs``)."""
    bn = ["weight", "bias", "running_mean", "running_var"]
    keys = ["backbone.body.0.weight", *(f"backbone.body.1.{b}" for b in bn)]
    for stage, depth in enumerate(depths):
        for i in range(depth):
            p = f"backbone.body.{stage + 4}.{i}."
            for j in (1, 2, 3):
                keys += [f"{p}conv{j}.weight", *(f"{p}bn{j}.{b}" for b in bn)]
            if i == 0:
                keys += [f"{p}downsample.0.weight", *(f"{p}downsample.1.{b}" for b in bn)]
    keys += ["input_proj.weight", "input_proj.bias"]
    wb = ("weight", "bias")
    for i in range(num_encoder_layers):
        p = f"transformer.encoder.{i}."
        keys += [f"{p}{m}.{w}" for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc1",
                                         "mlp.fc2", "norm1", "norm2") for w in wb]
    for i in range(num_decoder_layers):
        p = f"transformer.decoder.{i}."
        keys += [f"{p}{a}.{q}_proj.{w}" for a in ("self_attn", "cross_attn") for q in ("q", "k", "v", "out") for w in wb]
        keys += [f"{p}{m}.{w}" for m in ("mlp.fc1", "mlp.fc2", "norm1", "norm2", "norm3") for w in wb]
    keys += ["transformer.dec_norm.weight", "transformer.dec_norm.bias", "query_embed.weight",
             "class_embed.weight", "class_embed.bias", *(f"bbox_embed.layers.{i}.{w}" for i in range(3) for w in wb)]
    return keys


def _layer_count(keys: list[str], part: str) -> int:
    idx = {int(m[1]) for k in keys if (m := re.match(rf"transformer\.{part}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _check_shapes(sd: dict[str, Tensor], num_classes: int | None, num_queries: int | None) -> None:
    dim = sd["query_embed.weight"].shape[1]
    for key, shape in [("class_embed.weight", (None, dim)), ("bbox_embed.layers.2.weight", (4, dim)),
                       ("input_proj.weight", (dim, None, 1, 1)), ("transformer.dec_norm.weight", (dim,))]:
        got = tuple(sd[key].shape)
        if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
            raise ValueError(f"{key} has shape {got}, expected {tuple('*' if s is None else s for s in shape)} "
                             f"for width {dim} (from query_embed.weight)")
    classes = sd["class_embed.weight"].shape[0] - 1
    if sd["class_embed.bias"].shape != (classes + 1,):
        raise ValueError(f"class_embed.bias has shape {tuple(sd['class_embed.bias'].shape)}, class_embed.weight "
                         f"{tuple(sd['class_embed.weight'].shape)}")
    if num_classes is not None and classes != num_classes:
        raise ValueError(f"class_embed.weight: the checkpoint has {classes} classes (+1 'no object' row), the model "
                         f"{num_classes}; build the model with num_classes={classes} (COCO DETR checkpoints: 91) "
                         f"or drop class_embed.* to learn a new classifier")
    queries = sd["query_embed.weight"].shape[0]
    if num_queries is not None and queries != num_queries:
        raise ValueError(f"query_embed.weight: the checkpoint has {queries} object queries, the model {num_queries}; "
                         f"set model.num_queries={queries}")


def convert_detr_state_dict(state_dict: dict[str, Any], *, num_classes: int | None = None,
                            num_queries: int | None = None) -> dict[str, Tensor]:
    """Rename a DETR-R50 (or R101) state dict, in either layout above or vitpe's own, to vitpe's keys.

    The layout is told from the keys; every key must be known (``KeyError`` naming the first
    ones that are not) and every key vitpe's model needs must be there (``KeyError`` naming the
    missing ones). Given ``num_classes`` (without "no object") or ``num_queries``, the heads
    must have that many rows (``ValueError`` saying which and how to fix it).
    """
    sd = _unwrap(state_dict)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # DistributedDataParallel's
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # frozen batch norm keeps none
    if not sd:
        raise KeyError("the DETR checkpoint holds no tensors")
    layout = detect_layout(list(sd))
    rename: Callable[[str], str | list[str] | None] = {
        "original": _original, "hugging_face": _hugging_face, "vitpe": lambda k: k}[layout]
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        new = rename(key)
        if new is None:
            unknown.append(key)
        elif isinstance(new, list):  # nn.MultiheadAttention's packed in_proj: q, k, v stacked on dim 0
            if value.shape[0] % 3:
                raise ValueError(f"{key} has shape {tuple(value.shape)}: not 3 stacked projections (q, k, v)")
            for name, part in zip(new, value.chunk(3, dim=0)):
                out[name] = part.clone()
        else:
            out[new] = value
    if unknown:
        raise KeyError(f"{len(unknown)} keys of this {layout} DETR checkpoint have no place in vitpe's DETR-R50: "
                       f"{unknown[0]!r} ({_why_refused(unknown[0])})"
                       + (f", and {unknown[1:4]}" if len(unknown) > 1 else ""))
    blocks = {int(m[1]) for k in out if (m := re.match(r"backbone\.body\.6\.(\d+)\.", k))}
    depths = _RESNET_DEPTHS.get(max(blocks) + 1 if blocks else 0, ("resnet50", (3, 4, 6, 3)))[1]
    if layout == "vitpe":
        return out
    expected = expected_keys(_layer_count(list(out), "encoder"), _layer_count(list(out), "decoder"), depths)
    missing = [k for k in expected if k not in out]
    if missing:
        raise KeyError(f"{len(missing)} keys of vitpe's DETR are missing from this {layout} checkpoint: "
                       f"{missing[:4]}")
    extra = sorted(set(out) - set(expected))
    if extra:  # a block past the ResNet's depth, an odd stem
        raise KeyError(f"keys of this {layout} checkpoint fit no ResNet-50/101 DETR: {extra[:4]}")
    _check_shapes(out, num_classes, num_queries)
    return out


def load_detr_file(path: str | Path) -> dict[str, Any]:
    """A DETR checkpoint file: facebookresearch/detr's ``.pth`` (its ``args`` namespace allowed, nothing
    else that is not a tensor), a vitpe or other ``torch.save`` file, or Hugging Face's
    ``model.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DETR weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"{path}: reading .safetensors needs the safetensors package") from None
        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors name nothing the user can act on
        raise ValueError(f"cannot load DETR weights {path} as plain tensors: {str(e).splitlines()[0]}") from None


# COCO's category names by id (1..90, ten ids unused): the rows of a COCO-trained DETR classifier,
# which has one row per id up to 90 and the "no object" row last (91 + 1 rows)
COCO_CATEGORIES = {i: n for i, n in enumerate((
    "", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "", "backpack", "umbrella", "", "", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana",
    "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "", "dining table", "", "", "toilet", "", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush")) if n}


def coco_classifier_rows(class_names: Sequence[str], rows: int) -> list[int] | None:
    """The rows of a COCO-trained classifier with ``rows`` rows (92: COCO's ids, then "no object")
    that score ``class_names``, found by COCO's category names (any case), then the "no object" row;
    None unless the checkpoint has that many rows and every name is a distinct COCO category."""
    by_name = {n: i for i, n in COCO_CATEGORIES.items()}
    ids = [by_name.get(str(n).strip().lower()) for n in class_names]
    if rows != max(COCO_CATEGORIES) + 2 or not ids or None in ids or len(set(ids)) != len(ids):
        return None
    return ids + [rows - 1]


def load_detr_checkpoint(model: nn.Module, state_dict: dict[str, Any], new_classifier: bool = False,
                         class_names: Sequence[str] | None = None) -> list[str]:
    """Convert ``state_dict`` (any layout above) and load it into vitpe's ``DETR`` ``model``, after
    checking that the model is one it fits (sine encoder, no reference points, same heads, same
    shapes), with a message naming the first key or option at fault. With ``new_classifier`` a
    classifier of another class count (COCO's 91 against a dataset's own) is left as the model
    initialised it, the rest loaded: fine-tuning DETR on a new dataset. Returns the keys left so.
    When the model's classes (``class_names``, in its class order) are all COCO categories, as in
    COCO's own json (80 of the 91 ids used) or a subset of it, their rows of a COCO classifier are
    loaded instead (``coco_classifier_rows``), so that COCO weights score COCO data as trained."""
    from ..pos.detr import SineMasked

    parts = list(model.transformer.pos.parts())
    if not (len(parts) == 1 and isinstance(parts[0], SineMasked)):
        raise ValueError(f"DETR checkpoints were trained with the sine encoding; the model's encoder uses "
                         f"{[type(p).__name__ for p in parts]} (set model.pos=sine)")
    sd = convert_detr_state_dict(state_dict, num_classes=None if new_classifier else model.num_classes,
                                 num_queries=model.num_queries)
    target = model.state_dict()
    kept = []
    if new_classifier and sd["class_embed.weight"].shape != target["class_embed.weight"].shape:
        rows = coco_classifier_rows(class_names or [], sd["class_embed.weight"].shape[0])
        if rows is not None and len(rows) == target["class_embed.weight"].shape[0]:
            _logger.info("class_embed: the rows of COCO's categories %s (found by name) and 'no object' are "
                         "the model's %d classes", rows[:-1][:8] + (["..."] if len(rows) > 9 else []), len(rows) - 1)
            for key in ("class_embed.weight", "class_embed.bias"):
                sd[key] = sd[key][rows]
        else:
            kept = ["class_embed.weight", "class_embed.bias"]
            for key in kept:
                sd[key] = target[key]
    for key, value in target.items():  # trainable batch norm (frozen_bn=false) counts its steps
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros_like(value)
    missing = [k for k in target if k not in sd]
    if missing:
        raise KeyError(f"the model has {len(missing)} entries a DETR checkpoint does not, e.g. {missing[:3]} "
                       f"(box_refs, spatial_prior and the layer counts must be DETR's)")
    unexpected = [k for k in sd if k not in target]
    if unexpected:
        raise KeyError(f"the DETR checkpoint has {len(unexpected)} entries the model does not, e.g. "
                       f"{unexpected[:3]} (encoder/decoder layer counts or backbone depth differ)")
    for key, value in sd.items():
        if value.shape != target[key].shape:
            raise ValueError(f"{key}: the checkpoint's shape {tuple(value.shape)} does not fit the model's "
                             f"{tuple(target[key].shape)}")
    model.load_state_dict(sd, strict=True)
    return kept


__all__ = ["COCO_CATEGORIES", "coco_classifier_rows", "convert_detr_state_dict", "detect_layout", "expected_keys",
           "load_detr_checkpoint", "load_detr_file"]
