"""SegFormer checkpoints (NVlabs, mmseg and Hugging Face key layouts) -> vitpe's MiT keys.

vitpe's layout: ``stages.{s}.patch_embed.{proj,norm}``, ``stages.{s}.blocks.{i}.{norm1,norm2}``,
``stages.{s}.blocks.{i}.attn.{q,kv,sr,norm,proj}``, ``stages.{s}.blocks.{i}.mlp.{fc1,mixer.proj,fc2}``
(``mixer`` is Mix-FFN's depthwise convolution), ``stages.{s}.norm``, ``head``; a segmentation model
adds the prefix ``backbone.`` and ``decode_head.{linear_c.{i}.proj,fuse,norm,classifier}``.

- NVlabs ImageNet (``mit_b0.pth``): ``patch_embed1.proj``, ``block1.0.attn.q``, ``block1.0.mlp.dwconv.dwconv``,
  ``norm1``, ``head``; mmseg segmentation checkpoints put it under ``backbone.`` beside
  ``decode_head.linear_c1.proj``, ``decode_head.linear_fuse.{conv,bn}``, ``decode_head.linear_pred``.
- mmseg since v0.17 (its ``mit2mmseg`` layout: the ``mit_b*_20220624`` pretrains and the model
  zoo's SegFormers): ``layers.{s}.0.{projection,norm}``, ``layers.{s}.1.{i}.{norm1,norm2}``,
  ``layers.{s}.1.{i}.attn.attn.{in_proj_weight,in_proj_bias,out_proj}`` (q, k and v stacked),
  ``layers.{s}.1.{i}.attn.{sr,norm}``, ``layers.{s}.1.{i}.ffn.layers.{0,1,4}`` (fc1, the depthwise
  convolution and fc2, the linear layers as 1x1 convolutions), ``layers.{s}.2``. Its decode head
  (``SegformerHead``: a 1x1 convolution, batch norm and ReLU per stage) is another head than
  SegFormer's All-MLP one that vitpe builds: only the backbone of such a checkpoint loads.
- Hugging Face (``segformer.``-prefixed or bare ``encoder.``): ``encoder.patch_embeddings.0.proj``,
  ``encoder.block.0.0.attention.self.{query,key,value,sr,layer_norm}``, ``attention.output.dense``,
  ``mlp.{dense1,dwconv.dwconv,dense2}``, ``encoder.layer_norm.0``, ``classifier`` (ImageNet) or
  ``decode_head.{linear_c.0.proj,linear_fuse,batch_norm,classifier}``, as its files hold them; and the
  names of transformers 5's modules, which its ``state_dict()`` gives in memory:
  ``stages.0.patch_embeddings``, ``stages.0.blocks.0.{layernorm_before,layernorm_after}``,
  ``attention.{q_proj,k_proj,v_proj,o_proj,sequence_reduction}``, ``mlp.{fc1,dwconv.dwconv,fc2}``,
  ``stages.0.layer_norm``, ``decode_head.linear_projections.0.proj``. Separate key and value
  projections are stacked into ``kv`` (keys first, as NVlabs stores them).
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from .vit_convert import _unwrap

_NVLABS = [
    (r"patch_embed(\d)\.(proj|norm)\.(.+)", lambda m: f"stages.{int(m[1]) - 1}.patch_embed.{m[2]}.{m[3]}"),
    (r"block(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.(.+)", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.mlp.mixer.proj.{m[3]}"),
    (r"block(\d)\.(\d+)\.(.+)", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.{m[3]}"),
    (r"norm(\d)\.(.+)", lambda m: f"stages.{int(m[1]) - 1}.norm.{m[2]}"),
    (r"head\.(.+)", lambda m: f"head.{m[1]}"),
]
def _stage_rules(patch: str, proj: str, norm: str, block: str, renames: dict[str, str], final: str) -> list:
    """The rules of a layout that names, for stage ``s`` (each pattern's first group), a patch
    embedding ``patch`` with its ``proj`` and ``norm`` layers, blocks ``block.{i}`` whose modules
    ``renames`` maps to vitpe's, and a final norm ``final``."""
    return [
        (rf"{patch}\.({proj}|{norm})\.(.+)",
         lambda m: f"stages.{m[1]}.patch_embed.{'proj' if m[2] == proj else 'norm'}.{m[3]}"),
        (rf"{block}\.(\d+)\.(.+)[._](weight|bias)",  # mmseg's in_proj_weight: an underscore
         lambda m: f"stages.{m[1]}.blocks.{m[2]}.{renames[m[3]]}.{m[4]}" if m[3] in renames else None),
        (rf"{final}\.(.+)", lambda m: f"stages.{m[1]}.norm.{m[2]}"),
    ]


_HF = _stage_rules(r"encoder\.patch_embeddings\.(\d)", "proj", "layer_norm", r"encoder\.block\.(\d)", {
    "layer_norm_1": "norm1", "layer_norm_2": "norm2", "attention.self.query": "attn.q",
    "attention.self.sr": "attn.sr", "attention.self.layer_norm": "attn.norm", "attention.output.dense": "attn.proj",
    "mlp.dense1": "mlp.fc1", "mlp.dwconv.dwconv": "mlp.mixer.proj", "mlp.dense2": "mlp.fc2",
    "attention.self.key": "attn.k", "attention.self.value": "attn.v"}, r"encoder\.layer_norm\.(\d)") + [
    (r"classifier\.(.+)", lambda m: f"head.{m[1]}")]
_MMSEG = _stage_rules(r"layers\.(\d)\.0", "projection", "norm", r"layers\.(\d)\.1", {
    "norm1": "norm1", "norm2": "norm2", "attn.attn.in_proj": "attn.in_proj", "attn.attn.out_proj": "attn.proj",
    "attn.sr": "attn.sr", "attn.norm": "attn.norm", "ffn.layers.0": "mlp.fc1", "ffn.layers.1": "mlp.mixer.proj",
    "ffn.layers.4": "mlp.fc2"}, r"layers\.(\d)\.2")
# transformers 5's module names; a key they do not name is vitpe's own (``stages.`` too)
_HF5 = _stage_rules(r"stages\.(\d)\.patch_embeddings", "proj", "layer_norm", r"stages\.(\d)\.blocks", {
    "layernorm_before": "norm1", "layernorm_after": "norm2", "attention.q_proj": "attn.q",
    "attention.k_proj": "attn.k", "attention.v_proj": "attn.v", "attention.o_proj": "attn.proj",
    "attention.sequence_reduction.sequence_reduction": "attn.sr",
    "attention.sequence_reduction.layer_norm": "attn.norm", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "mlp.dwconv.dwconv": "mlp.mixer.proj"}, r"stages\.(\d)\.layer_norm")
_MMSEG_HEAD = r"(convs\.\d+|fusion_conv)\..+"  # mmseg's SegformerHead
_HEAD = [
    (r"linear_c(\d)\.proj\.(.+)", lambda m: f"linear_c.{int(m[1]) - 1}.proj.{m[2]}"),  # NVlabs
    (r"linear_c\.(\d)\.proj\.(.+)", lambda m: f"linear_c.{m[1]}.proj.{m[2]}"),  # Hugging Face
    (r"linear_projections\.(\d)\.proj\.(.+)", lambda m: f"linear_c.{m[1]}.proj.{m[2]}"),  # transformers 5
    (r"linear_fuse\.conv\.(.+)|linear_fuse\.(weight)", lambda m: f"fuse.{m[1] or m[2]}"),
    (r"linear_fuse\.bn\.(.+)|batch_norm\.(.+)", lambda m: f"norm.{m[1] or m[2]}"),
    (r"linear_pred\.(.+)|classifier\.(.+)", lambda m: f"classifier.{m[1] or m[2]}"),
    (r"conv_seg\.(.+)", lambda m: ""),  # mmseg's unused BaseDecodeHead classifier: dropped
    (r"(fuse|norm)\.(.+)", lambda m: f"{m[1]}.{m[2]}"),  # vitpe's own
]


def _rename(key: str, rules: list) -> str | None:
    for pattern, repl in rules:
        m = re.fullmatch(pattern, key)
        if m is not None:
            return repl(m)
    return None


def _fuse_projections(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Projections to vitpe's ``attn.q`` and ``attn.kv`` (keys first, as NVlabs stores them):
    Hugging Face's separate ``attn.k`` / ``attn.v`` stacked, mmseg's ``attn.in_proj`` (q, then k
    and v) split; mmseg's FFN, 1x1 convolutions, as linear weights."""
    out = {}
    for key, value in sd.items():
        if ".attn.v." in key:
            continue
        if ".attn.k." in key:
            partner = key.replace(".attn.k.", ".attn.v.")
            if partner not in sd:
                raise KeyError(f"checkpoint has {key!r} but no {partner!r}")
            out[key.replace(".attn.k.", ".attn.kv.")] = torch.cat([value, sd[partner]], dim=0)
        elif ".attn.in_proj." in key:
            c = value.shape[0] // 3
            out[key.replace(".in_proj.", ".q.")] = value[:c]
            out[key.replace(".in_proj.", ".kv.")] = value[c:]
        elif re.search(r"\.mlp\.fc[12]\.weight$", key) and value.dim() == 4 and value.shape[2:] == (1, 1):
            out[key] = value.flatten(1)
        else:
            out[key] = value
    return out


def convert_segformer_state_dict(state_dict: dict[str, Any], head: bool = True) -> dict[str, Tensor]:
    """Rename a SegFormer state dict (any layout above, or vitpe's own) to vitpe's keys.

    Backbone keys come out bare for a backbone checkpoint and under ``backbone.`` for a
    segmentation one (one with ``decode_head.`` entries); a key no rule knows raises ``KeyError``.
    ``head=False`` leaves the decode head's entries out (a backbone is wanted), mmseg's
    ``SegformerHead`` too; with ``head=True`` that head is a ``KeyError`` saying so.
    """
    sd = _unwrap(state_dict)
    segmentation = any(k.startswith("decode_head.") for k in sd)
    mmseg_head = sorted(k for k in sd if re.fullmatch(r"decode_head\." + _MMSEG_HEAD, k))
    if head and mmseg_head:
        raise KeyError(f"the checkpoint's decode head is mmseg's SegformerHead ({mmseg_head[0]}, ...: a 1x1 "
                       f"convolution, batch norm and ReLU per stage), not SegFormer's All-MLP head that vitpe "
                       f"builds; load its backbone alone (model.backbone_weights in train_seg.py)")
    out, unknown = {}, []
    for key, value in sd.items():
        if key.startswith("decode_head."):
            if not head:
                continue
            new = _rename(key[len("decode_head."):], _HEAD)
            new = new if new is None or new == "" else "decode_head." + new
        else:
            bare = re.sub(r"^(backbone\.|segformer\.)", "", key)
            if bare.startswith("stages."):  # transformers 5's module names, or already vitpe's
                new = _rename(bare, _HF5) or bare
            elif bare.startswith("layers."):
                new = _rename(bare, _MMSEG)
            else:
                new = _rename(bare, _HF if bare.startswith(("encoder.", "classifier.")) else _NVLABS)
            new = None if new is None else ("backbone." + new if segmentation and head else new)
        if new is None:
            unknown.append(key)
        elif new:
            out[new] = value
    if unknown:
        raise KeyError(f"{len(unknown)} checkpoint keys are neither SegFormer (NVlabs, mmseg, Hugging Face) nor "
                       f"vitpe MiT keys, e.g. {unknown[:3]}")
    return _fuse_projections(out)
