"""DETR-R50 checkpoints in Hugging Face's and facebookresearch/detr's layouts load into vitpe's DETR
(built as ``train_det.py`` builds it), and the loaded model is checked against Hugging Face's
``DetrForObjectDetection`` (randomly initialised, with randomised norms and batch-norm statistics so
that a norm in the wrong place or a swapped parameter shows), not only the keys: the sine encoding
(DETR's interleaved channels), ReLU FFNs, logits and boxes of an unpadded and a padded image, the
auxiliary layers' outputs and the training losses agree to float32 rounding.
"""
import re
import types

import pytest
import torch
from torch import nn

from vitpe.engine.detection import DetModelConfig, LossConfig, build_criterion, build_model
from vitpe.models.detr_convert import convert_detr_state_dict, detect_layout, load_detr_checkpoint
from vitpe.pos.detr import qk_embed

transformers = pytest.importorskip("transformers")

NUM_CLASSES = 91  # COCO's DETR head: 92 logits


@pytest.fixture(scope="module")
def hf_model():
    from transformers import DetrConfig, DetrForObjectDetection

    torch.manual_seed(0)
    # auxiliary_loss=False (Hugging Face's default, as in facebook/detr-resnet-50): with True, Hugging
    # Face's decoder feeds each layer the layer-normed output of the previous one and norms the last
    # twice, which the original DETR does not (see test_hf_auxiliary_loss_changes_its_outputs)
    cfg = DetrConfig(use_pretrained_backbone=False, backbone="resnet50", num_labels=NUM_CLASSES,
                     auxiliary_loss=False, dropout=0.0)
    model = DetrForObjectDetection(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.dim() == 1 and name.endswith("weight"):  # layer and batch norms' scales
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def hf_state(hf_model):
    return {k: v.clone() for k, v in hf_model.state_dict().items()}


def vitpe_model(state, **overrides) -> nn.Module:
    model = build_model(DetModelConfig(**overrides), NUM_CLASSES).eval()
    load_detr_checkpoint(model, state)
    return model


@pytest.fixture(scope="module")
def batch():
    """Two 128x160 images, the second valid only in its top-left 96x96 (its padding zeroed)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 128, 160, generator=g)
    pad = torch.zeros(2, 128, 160, dtype=torch.bool)
    pad[1, 96:] = True
    pad[1, :, 96:] = True
    x[1][:, pad[1]] = 0.0
    return x, pad


@pytest.fixture(scope="module")
def hf_out(hf_model, batch):
    x, pad = batch
    with torch.no_grad():
        return hf_model(pixel_values=x, pixel_mask=(~pad).long(), output_hidden_states=True)


# -- keys ---------------------------------------------------------------------------------------
def hf_to_original(sd: dict) -> dict:
    """Hugging Face (5.x names) -> facebookresearch/detr's names, written independently of the converter:
    q, k, v packed into ``in_proj`` as ``nn.MultiheadAttention`` holds them."""
    out = {}
    enc = {"self_attn.o_proj": "self_attn.out_proj", "self_attn_layer_norm": "norm1", "final_layer_norm": "norm2",
           "mlp.fc1": "linear1", "mlp.fc2": "linear2"}
    dec = {"self_attn.o_proj": "self_attn.out_proj", "encoder_attn.o_proj": "multihead_attn.out_proj",
           "self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3",
           "mlp.fc1": "linear1", "mlp.fc2": "linear2"}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("model.backbone.model."):
            out["backbone.0.body." + key[len("model.backbone.model."):]] = value
            continue
        m = re.fullmatch(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m:
            part, i, mod, wb = m.groups()
            attn = re.fullmatch(r"(self_attn|encoder_attn)\.([qkv])_proj", mod)
            if attn:
                if attn[2] == "q":
                    name = "self_attn" if attn[1] == "self_attn" else "multihead_attn"
                    p = f"model.{part}.layers.{i}.{attn[1]}."
                    out[f"transformer.{part}.layers.{i}.{name}.in_proj_{wb}"] = torch.cat(
                        [sd[f"{p}{q}_proj.{wb}"] for q in "qkv"])
                continue
            out[f"transformer.{part}.layers.{i}.{(enc if part == 'encoder' else dec)[mod]}.{wb}"] = value
            continue
        for pattern, repl in [(r"model\.decoder\.layernorm\.(.+)", "transformer.decoder.norm.{}"),
                              (r"model\.input_projection\.(.+)", "input_proj.{}"),
                              (r"model\.query_position_embeddings\.(.+)", "query_embed.{}"),
                              (r"class_labels_classifier\.(.+)", "class_embed.{}"),
                              (r"bbox_predictor\.(.+)", "bbox_embed.{}")]:
            m = re.fullmatch(pattern, key)
            if m:
                out[repl.format(m[1])] = value
                break
        else:
            raise AssertionError(f"test mapping misses {key}")
    return out


def hf_to_v4(sd: dict) -> dict:
    """Hugging Face 5.x names -> 4.x names (the hub's facebook/detr-resnet-50 files)."""
    out = {}
    for key, value in sd.items():
        key = key.replace("model.backbone.model.", "model.backbone.conv_encoder.model.").replace(".o_proj.", ".out_proj.")
        out[re.sub(r"layers\.(\d+)\.mlp\.fc", r"layers.\1.fc", key)] = value
    return out


def test_hf_keys_map_onto_the_model_as_train_det_builds_it(hf_state):
    sd = convert_detr_state_dict(hf_state, num_classes=NUM_CLASSES, num_queries=100)
    model = build_model(DetModelConfig(), NUM_CLASSES)
    assert detect_layout(list(hf_state)) == "hugging_face"
    assert set(sd) == set(model.state_dict())
    assert all(sd[k].shape == v.shape for k, v in model.state_dict().items())
    torch.testing.assert_close(sd["transformer.encoder.3.attn.k_proj.weight"],
                               hf_state["model.encoder.layers.3.self_attn.k_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(sd["backbone.body.6.5.bn2.running_var"],
                               hf_state["model.backbone.model.layer3.5.bn2.running_var"], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["original", "original_checkpoint", "hf_v4", "vitpe"])
def test_every_layout_gives_the_same_weights(hf_state, layout):
    ref = convert_detr_state_dict(hf_state)
    sd = {"original": lambda: hf_to_original(hf_state),
          "original_checkpoint": lambda: {"model": hf_to_original(hf_state), "epoch": 299},  # detr-r50-e632da11.pth
          "hf_v4": lambda: hf_to_v4(hf_state),
          "vitpe": lambda: ref}[layout]()
    if layout.startswith("original"):
        assert detect_layout(list(sd.get("model", sd))) == "original"
    out = convert_detr_state_dict(sd)
    assert set(out) == set(ref)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0, msg=key)


# -- outputs ------------------------------------------------------------------------------------
def test_sine_encoding_channels_are_detrs(hf_model, batch):
    """Normalisation over the unpadded cells, eps, 2 pi, temperature, the mask convention and DETR's
    channel order (sine and cosine of each frequency side by side, rows first)."""
    _, pad = batch
    model = build_model(DetModelConfig(), NUM_CLASSES)
    fmask = torch.nn.functional.interpolate(pad[:, None].float(), size=(4, 5)).bool()[:, 0]
    ref = hf_model.model.position_embedding(shape=(2, 256, 4, 5), device="cpu", dtype=torch.float32,
                                            mask=~fmask).flatten(2).transpose(1, 2)
    torch.testing.assert_close(qk_embed(model.transformer.pos, fmask), ref, rtol=0, atol=1e-5)


def test_ffn_activation_is_detrs():
    model = build_model(DetModelConfig(enc_layers=1, dec_layers=1, backbone="resnet18", frozen_bn=False),
                        NUM_CLASSES)
    assert all(isinstance(layer.mlp.act, nn.ReLU) for layer in [*model.transformer.encoder, *model.transformer.decoder])


def test_outputs_match_hugging_face(hf_state, hf_model, hf_out, batch):
    x, pad = batch
    model = vitpe_model(hf_state)
    with torch.no_grad():
        out = model(x, pad)
    for i in range(2):  # unpadded, padded
        torch.testing.assert_close(out["pred_logits"][i], hf_out.logits[i], rtol=0, atol=1e-4)
        torch.testing.assert_close(out["pred_boxes"][i], hf_out.pred_boxes[i], rtol=0, atol=1e-5)
    # auxiliary outputs: the reference's decoder outputs, each through the final norm and the heads
    with torch.no_grad():
        for layer, aux in enumerate(out["aux_outputs"]):
            h = hf_model.model.decoder.layernorm(hf_out.decoder_hidden_states[layer + 1])
            torch.testing.assert_close(aux["pred_logits"], hf_model.class_labels_classifier(h), rtol=0, atol=1e-4)
            torch.testing.assert_close(aux["pred_boxes"], hf_model.bbox_predictor(h).sigmoid(), rtol=0, atol=1e-5)


def test_hf_auxiliary_loss_changes_its_outputs(hf_state, hf_out, batch):
    """Hugging Face's ``auxiliary_loss=True`` is not DETR's: its decoder then feeds every layer the
    layer-normed output of the one before (and norms the last twice), so its final logits move;
    vitpe (like the original, where the norm only reads the intermediate outputs) does not."""
    from transformers import DetrConfig, DetrForObjectDetection

    x, pad = batch
    aux = DetrForObjectDetection(DetrConfig(use_pretrained_backbone=False, backbone="resnet50",
                                            num_labels=NUM_CLASSES, auxiliary_loss=True)).eval()
    aux.load_state_dict(hf_state)
    with torch.no_grad():
        logits = aux(pixel_values=x, pixel_mask=(~pad).long()).logits
    assert (logits - hf_out.logits).abs().max() > 1e-2


# -- losses -------------------------------------------------------------------------------------
TARGET = {"labels": torch.tensor([3, 17]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.4, 0.5]])}


def test_losses_match_hugging_face(hf_state, hf_model, batch):
    """One image (the padded one) with 2 boxes. Without auxiliary losses Hugging Face's own forward
    and loss; with them its loss on vitpe's predictions (its auxiliary decoder is not DETR's)."""
    from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss

    x, pad = (t[1:] for t in batch)
    model = vitpe_model(hf_state)
    criterion = build_criterion(LossConfig(), NUM_CLASSES)  # DETR's costs and weights, as train_det.py
    hf_labels = [{"class_labels": TARGET["labels"], "boxes": TARGET["boxes"]}]
    with torch.no_grad():
        out = model(x, pad)
        ref = hf_model(pixel_values=x, pixel_mask=(~pad).long(), labels=hf_labels)
    last = {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}
    losses = criterion(last, [TARGET])
    for key in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(losses[key], ref.loss_dict[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(criterion.total(losses), ref.loss, rtol=1e-5, atol=1e-6)

    cfg = types.SimpleNamespace(**{**hf_model.config.to_dict(), "auxiliary_loss": True})
    cfg.num_labels = NUM_CLASSES
    layers = [*out["aux_outputs"], last]
    total, loss_dict, _ = ForObjectDetectionLoss(
        out["pred_logits"], hf_labels, "cpu", out["pred_boxes"], cfg,
        torch.stack([o["pred_logits"] for o in layers]), torch.stack([o["pred_boxes"] for o in layers]))
    losses = criterion(out, [TARGET])
    for key, value in loss_dict.items():
        if key.startswith("loss_"):
            torch.testing.assert_close(losses[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert {k for k in losses if k.startswith("loss_")} == {k for k in loss_dict if k.startswith("loss_")}
    torch.testing.assert_close(criterion.total(losses), total, rtol=1e-5, atol=1e-6)


# -- errors -------------------------------------------------------------------------------------
def test_unknown_key_is_named(hf_state):
    sd = hf_to_original(hf_state)
    sd["transformer.encoder.layers.0.self_attn.bogus.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"transformer\.encoder\.layers\.0\.self_attn\.bogus\.weight"):
        convert_detr_state_dict(sd)
    hf = dict(hf_state, **{"model.backbone.position_embedding.row_embeddings.weight": torch.zeros(50, 128)})
    with pytest.raises(KeyError, match=r"row_embeddings\.weight.*learned"):
        convert_detr_state_dict(hf)
    sd = dict(hf_to_original(hf_state), **{"transformer.encoder.norm.weight": torch.ones(256)})
    with pytest.raises(KeyError, match=r"transformer\.encoder\.norm\.weight.*pre-norm"):
        convert_detr_state_dict(sd)


def test_missing_key_is_named(hf_state):
    sd = hf_to_original(hf_state)
    del sd["transformer.decoder.norm.weight"]
    with pytest.raises(KeyError, match=r"missing.*transformer\.dec_norm\.weight"):
        convert_detr_state_dict(sd)
    hf = {k: v for k, v in hf_state.items() if not k.startswith("model.backbone.model.layer2.1.bn2.")}
    with pytest.raises(KeyError, match=r"missing.*backbone\.body\.5\.1\.bn2\.weight"):
        convert_detr_state_dict(hf)


def test_class_and_query_count_mismatch_is_named(hf_state):
    with pytest.raises(ValueError, match=r"class_embed\.weight: the checkpoint has 91 classes.*model 5.*num_classes=91"):
        convert_detr_state_dict(hf_state, num_classes=5)
    model = build_model(DetModelConfig(), 5)
    with pytest.raises(ValueError, match=r"class_embed\.weight: the checkpoint has 91 classes"):
        load_detr_checkpoint(model, hf_state)
    model = build_model(DetModelConfig(num_queries=50), NUM_CLASSES)
    with pytest.raises(ValueError, match=r"query_embed\.weight: the checkpoint has 100 object queries"):
        load_detr_checkpoint(model, hf_state)


def test_mixed_or_foreign_layouts_are_refused(hf_state):
    mixed = dict(hf_state, **{"transformer.decoder.norm.weight": torch.ones(256)})
    with pytest.raises(KeyError, match="cannot tell the DETR checkpoint layout"):
        convert_detr_state_dict(mixed)
    model = build_model(DetModelConfig(pos="learned"), NUM_CLASSES)
    with pytest.raises(ValueError, match="sine"):
        load_detr_checkpoint(model, hf_state)


# -- model.weights ------------------------------------------------------------------------------
def test_model_weights_loads_detrs_files_and_leaves_another_classifier_new(tmp_path, hf_state):
    """``model.weights``: facebookresearch/detr's ``.pth`` (with its ``args`` namespace) and Hugging
    Face's ``model.safetensors``; a dataset with other classes keeps every weight but the classifier."""
    import argparse

    from vitpe.errors import UserError

    ref = convert_detr_state_dict(hf_state)
    pth = tmp_path / "detr-r50.pth"
    torch.save({"model": hf_to_original(hf_state), "args": argparse.Namespace(lr=1e-4), "epoch": 299}, pth)
    model = build_model(DetModelConfig(weights=str(pth)), 3)  # BCCD's 3 classes against COCO's 91
    state = model.state_dict()
    for key, value in ref.items():
        if not key.startswith("class_embed."):
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    assert state["class_embed.weight"].shape == (4, 256)
    safetensors = pytest.importorskip("safetensors.torch")
    st = tmp_path / "model.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in hf_state.items()}, str(st))
    same = build_model(DetModelConfig(weights=str(st)), NUM_CLASSES).state_dict()
    torch.testing.assert_close(same["class_embed.weight"], ref["class_embed.weight"], rtol=0, atol=0)
    with pytest.raises(UserError, match="model.weights .*missing.pth.*does not exist"):
        build_model(DetModelConfig(weights=str(tmp_path / "missing.pth")), 3)
    # data whose categories are COCO's (by name, any order or case, a subset): their rows and the
    # "no object" row; one name that is not COCO's leaves the classifier new
    coco = build_model(DetModelConfig(weights=str(pth)), 3, ["dog", "Person", "toothbrush"]).state_dict()
    for key in ("class_embed.weight", "class_embed.bias"):
        torch.testing.assert_close(coco[key], ref[key][[18, 1, 90, 91]], rtol=0, atol=0)
    other = build_model(DetModelConfig(weights=str(pth)), 3, ["dog", "person", "RBC"]).state_dict()
    assert not any(torch.equal(other["class_embed.weight"][0], row) for row in ref["class_embed.weight"])


def test_coco_category_names_are_cocos_ids():
    """The 80 names of COCO 2017's instances json at their ids (10 of 1..90 unused)."""
    from vitpe.models.detr_convert import COCO_CATEGORIES, coco_classifier_rows

    assert len(COCO_CATEGORIES) == 80 and max(COCO_CATEGORIES) == 90
    assert sorted(set(range(1, 91)) - set(COCO_CATEGORIES)) == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert [COCO_CATEGORIES[i] for i in (1, 13, 44, 46, 67, 72, 84, 90)] == \
        ["person", "stop sign", "bottle", "wine glass", "dining table", "tv", "book", "toothbrush"]
    assert coco_classifier_rows(["person", "person"], 92) is None  # a name twice: no one row for each
    assert coco_classifier_rows(["person"], 81) is None  # not a 91-id classifier
