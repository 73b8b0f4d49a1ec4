"""DETR: optimal matching, losses against hand values, positional strategies under padding."""
from __future__ import annotations

import itertools

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from vitpe.models.detr import DETR, postprocess
from vitpe.models.detr_backbone import ResNetBackbone
from vitpe.models.detr_criterion import SetCriterion
from vitpe.models.detr_matcher import HungarianMatcher
from vitpe.models.detr_transformer import DetrTransformer, SpatialPrior
from vitpe.pos.detr import DETR_STRATEGIES, build_detr_pos, point_embed, qk_embed, valid_sizes

STRATEGIES = ["sine", "learned", "none", "rope_axial", "rope_mixed", "peg", "sine+peg"]


def random_outputs(B: int, Q: int, K: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(B, Q, K + 1, generator=g),
            "pred_boxes": torch.rand(B, Q, 4, generator=g) * 0.5 + 0.25}


def random_targets(sizes: list[int], K: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, K, (m,), generator=g), "boxes": torch.rand(m, 4, generator=g) * 0.5 + 0.25}
            for m in sizes]


# -- matcher ---------------------------------------------------------------------------------
@pytest.mark.parametrize("Q,M,seed", [(4, 1, 0), (4, 3, 1), (5, 5, 2), (6, 4, 3)])
def test_matcher_is_optimal(Q: int, M: int, seed: int) -> None:
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
    out, tgt = random_outputs(1, Q, 3, seed), random_targets([M], 3, seed + 10)
    cost = matcher.cost_matrix(out["pred_logits"][0], out["pred_boxes"][0], tgt[0]["labels"], tgt[0]["boxes"])
    brute = min(sum(cost[p, j] for j, p in enumerate(perm)) for perm in itertools.permutations(range(Q), M))
    src, dst = matcher(out, tgt)[0]
    assert len(src) == M and sorted(dst.tolist()) == list(range(M))  # every target matched once
    assert float(cost[src, dst].sum()) == pytest.approx(float(brute), abs=1e-5)


def test_matcher_batched_equals_one_by_one() -> None:
    matcher = HungarianMatcher()
    sizes = [3, 0, 5, 1]
    out, tgt = random_outputs(len(sizes), 8, 4), random_targets(sizes, 4)
    batched = matcher(out, tgt)
    for i in range(len(sizes)):
        single = matcher({k: v[i:i + 1] for k, v in out.items()}, [tgt[i]])[0]
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])
        assert len(batched[i][0]) == sizes[i]


def test_empty_targets_match_nothing_and_train_towards_no_object() -> None:
    K = 3
    matcher = HungarianMatcher()
    out, tgt = random_outputs(2, 6, K), random_targets([0, 0], K)
    assert all(len(s) == 0 and len(t) == 0 for s, t in matcher(out, tgt))
    losses = SetCriterion(K, matcher, eos_coef=0.1)(out, tgt)
    expected = torch.nn.functional.cross_entropy(out["pred_logits"].flatten(0, 1),
                                                 torch.full((12,), K))  # weights cancel: all "no object"
    assert float(losses["loss_ce"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(losses["loss_bbox"]) == 0.0 and float(losses["loss_giou"]) == 0.0


# -- losses ----------------------------------------------------------------------------------
def xyxy_to_cxcywh(b: list[float], scale: float = 4.0) -> list[float]:
    x0, y0, x1, y1 = (v / scale for v in b)
    return [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]


def test_giou_and_l1_losses_against_hand_values() -> None:
    # overlap: [0,0,2,2] vs [1,1,3,3]: IoU 1/7, hull 9, union 7 -> GIoU 1/7 - 2/9 = -5/63
    # disjoint: [0,0,1,1] vs [2,0,3,1]: IoU 0, hull 3, union 2 -> GIoU -1/3
    preds = [[0, 0, 2, 2], [0, 0, 1, 1]]
    trues = [[1, 1, 3, 3], [2, 0, 3, 1]]
    out = {"pred_logits": torch.zeros(2, 1, 2), "pred_boxes": torch.tensor([[xyxy_to_cxcywh(p)] for p in preds])}
    tgt = [{"labels": torch.tensor([0]), "boxes": torch.tensor([xyxy_to_cxcywh(t)])} for t in trues]
    losses = SetCriterion(1, HungarianMatcher())(out, tgt)
    assert float(losses["loss_giou"]) == pytest.approx(((1 + 5 / 63) + (1 + 1 / 3)) / 2, rel=1e-5)
    # L1 in cxcywh over the 4-pixel canvas: (0.25 * 2) for the first pair, (0.5) for the second
    assert float(losses["loss_bbox"]) == pytest.approx((0.5 + 0.5) / 2, rel=1e-5)
    assert float(losses["cardinality_error"]) == 0.0  # zero logits: argmax is class 0 (an object), one box each


def test_aux_losses_are_weighted_like_the_last_layer() -> None:
    model = DETR(num_classes=2, backbone="resnet18", frozen_bn=False, dim=32, num_heads=4, enc_layers=1,
                 dec_layers=3, ffn_dim=64, num_queries=5).eval()
    out = model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    crit = SetCriterion(2, HungarianMatcher())
    losses = crit(out, random_targets([2], 2))
    assert {k for k in losses if k.startswith("loss_")} == {f"loss_{n}{s}" for n in ("ce", "bbox", "giou")
                                                             for s in ("", "_0", "_1")}
    by_hand = sum(losses[f"loss_ce{s}"] + 5 * losses[f"loss_bbox{s}"] + 2 * losses[f"loss_giou{s}"]
                  for s in ("", "_0", "_1"))
    assert float(crit.total(losses).detach()) == pytest.approx(float(by_hand.detach()), rel=1e-6)


# -- positional strategies under padding -----------------------------------------------------
def padded_mask(h: int, w: int, H: int, W: int) -> torch.Tensor:
    mask = torch.ones(1, H, W, dtype=torch.bool)
    mask[:, :h, :w] = False
    return mask


@pytest.mark.parametrize("name", ["sine", "learned"])
def test_additive_encoding_ignores_padding(name: str) -> None:
    pos = build_detr_pos(name, dim=32, num_heads=4, depth=1, grid=(8, 8))
    h, w = 5, 7
    ref = qk_embed(pos, padded_mask(h, w, h, w)).reshape(h, w, -1)
    for H, W in [(5, 9), (8, 7), (11, 13)]:
        emb = qk_embed(pos, padded_mask(h, w, H, W)).reshape(H, W, -1)
        torch.testing.assert_close(emb[:h, :w], ref, rtol=0, atol=1e-6)


def test_sine_matches_detr_reference_positions() -> None:
    """Normalised positions: the last unpadded row and column reach ``scale`` (2 pi)."""
    pos = build_detr_pos("sine", dim=8, num_heads=2, depth=1, grid=(4, 4))
    emb = qk_embed(pos, padded_mask(3, 4, 6, 6)).reshape(6, 6, 8)
    # channel 0 is sin(row position * 1), channel 4 is sin(column position * 1) (DETR's layout: sin, cos
    # interleaved per axis, so channel 1 is cos(row position * 1) and channel 2 sin(row position / 100))
    rows = torch.tensor([1, 2, 3]) / 3 * 2 * torch.pi
    cols = torch.tensor([1, 2, 3, 4]) / 4 * 2 * torch.pi
    torch.testing.assert_close(emb[:3, 0, 0], rows.sin(), atol=1e-4, rtol=0)
    torch.testing.assert_close(emb[0, :4, 4], cols.sin(), atol=1e-4, rtol=0)
    torch.testing.assert_close(emb[:3, 0, 1], rows.cos(), atol=1e-4, rtol=0)
    torch.testing.assert_close(emb[:3, 0, 2], (rows / 100).sin(), atol=1e-4, rtol=0)


def test_learned_tables_are_exact_at_native_size_and_follow_any_grid() -> None:
    pos = build_detr_pos("learned", dim=16, num_heads=2, depth=1, grid=(6, 6))
    emb = qk_embed(pos, padded_mask(6, 6, 6, 6)).reshape(6, 6, 16)
    torch.testing.assert_close(emb[:, 0, :8], pos.row_embed.detach())
    torch.testing.assert_close(emb[0, :, 8:], pos.col_embed.detach())
    big = qk_embed(pos, padded_mask(70, 90, 72, 96)).reshape(72, 96, 16)  # beyond any fixed cap
    assert torch.isfinite(big).all() and big[70:].abs().sum() == 0 and big[:, 90:].abs().sum() == 0


@pytest.mark.parametrize("name", ["sine", "learned", "sine+learned"])
def test_point_embed_is_the_cell_encoding_at_that_place(name: str) -> None:
    """A query's reference point gets the encoding the feature cell there has in the keys: sine
    positions are the cells' normalised ones (``(i + 1) / h``), the learned tables are read at cell
    centres (``(i + 0.5) / L``) of the native grid."""
    pos = build_detr_pos(name, dim=16, num_heads=2, depth=1, grid=(6, 8))
    h, w = 6, 8
    cells = qk_embed(pos, padded_mask(h, w, h + 2, w + 3)).reshape(h + 2, w + 3, 16)[:h, :w]
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    parts = [p.name for p in pos.parts()]
    if parts == ["sine"]:
        points = torch.stack([(j + 1) / w, (i + 1) / h], -1)
    elif parts == ["learned"]:
        points = torch.stack([(j + 0.5) / w, (i + 0.5) / h], -1)
    else:  # two encodings that place cells differently cannot both be exact; check the sum's shape
        assert point_embed(pos, torch.rand(5, 2)).shape == (5, 16)
        return
    torch.testing.assert_close(point_embed(pos, points), cells, atol=1e-5, rtol=0)
    assert point_embed(build_detr_pos("none", dim=16, num_heads=2, depth=1, grid=(6, 8)), points) is None


def test_reference_points_steer_cross_attention_only_with_an_additive_encoding() -> None:
    """Moving the reference points changes the decoder's output when the keys carry an additive
    encoding (sine), and cannot when they carry none."""
    for name, moves in [("sine", True), ("none", False)]:
        torch.manual_seed(0)
        tr = DetrTransformer(dim=32, num_heads=4, enc_layers=1, dec_layers=2, ffn_dim=64, pos=name).eval()
        src, mask, queries = torch.randn(1, 32, 5, 6), torch.zeros(1, 5, 6, dtype=torch.bool), torch.randn(3, 32)
        a = tr(src, mask, queries, torch.full((3, 2), 0.2))
        b = tr(src, mask, queries, torch.full((3, 2), 0.8))
        assert (not torch.allclose(a, b, atol=1e-4)) == moves, name


def test_spatial_prior_peaks_at_the_reference_point_and_ignores_padding() -> None:
    prior = SpatialPrior(num_queries=2, num_heads=3)
    points = torch.tensor([[0.5 / 6, 2.5 / 4], [5.5 / 6, 0.5 / 4]])  # centres of cells (2, 0) and (0, 5)
    bias = prior(points, padded_mask(4, 6, 4, 6)).reshape(1, 3, 2, 4, 6)
    assert bias.shape == (1, 3, 2, 4, 6)
    for q, (row, col) in enumerate([(2, 0), (0, 5)]):
        flat = bias[0, :, q].flatten(1)
        assert (flat.argmax(1) == row * 6 + col).all() and torch.allclose(flat.max(1).values, torch.zeros(3))
    widths = prior.log_width.exp()[0, :, 0]
    assert (bias[0, 0, 0] <= bias[0, -1, 0]).all() and widths[0] < widths[-1]  # narrow heads fall off faster
    padded = prior(points, padded_mask(4, 6, 7, 9)).reshape(1, 3, 2, 7, 9)
    torch.testing.assert_close(padded[..., :4, :6], bias)  # positions count over the unpadded image


def test_spatial_prior_keeps_detections_independent_of_padding() -> None:
    torch.manual_seed(0)
    tr = DetrTransformer(dim=32, num_heads=4, enc_layers=1, dec_layers=2, ffn_dim=64, pos="sine").eval()
    prior, refs, queries = SpatialPrior(5, 4), torch.rand(5, 2), torch.randn(5, 32)
    src = torch.randn(1, 32, 5, 6)
    big = torch.randn(1, 32, 8, 9) * 10
    big[..., :5, :6] = src
    ref = tr(src, padded_mask(5, 6, 5, 6), queries, refs, prior)
    torch.testing.assert_close(tr(big, padded_mask(5, 6, 8, 9), queries, refs, prior), ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(tr(src, padded_mask(5, 6, 5, 6), queries, refs), ref, atol=1e-4)  # the prior acts


def test_valid_sizes_reads_the_mask() -> None:
    m = torch.cat([padded_mask(3, 4, 6, 7), padded_mask(6, 7, 6, 7)])
    assert valid_sizes(m).tolist() == [[3, 4], [6, 7]]


@pytest.mark.parametrize("name", STRATEGIES)
def test_transformer_output_is_the_same_whatever_the_padding(name: str) -> None:
    """Key padding, mask-aware encodings, top-left rotary positions and zeroed cells before PEG
    together make a padded image's detections those of the image alone."""
    torch.manual_seed(0)
    tr = DetrTransformer(dim=32, num_heads=4, enc_layers=2, dec_layers=2, ffn_dim=64, pos=name,
                         pos_grid=(6, 6)).eval()
    queries = torch.randn(5, 32)
    h, w = 5, 6
    src = torch.randn(1, 32, h, w)
    ref = tr(src, padded_mask(h, w, h, w), queries)
    big = torch.randn(1, 32, 8, 9) * 10  # garbage in the padding
    big[..., :h, :w] = src
    mem_ref, _ = tr.encode(src, padded_mask(h, w, h, w))
    mem, _ = tr.encode(big, padded_mask(h, w, 8, 9))
    torch.testing.assert_close(mem.reshape(1, 8, 9, 32)[:, :h, :w], mem_ref.reshape(1, h, w, 32),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tr(big, padded_mask(h, w, 8, 9), queries), ref, atol=1e-5, rtol=1e-4)


def test_registry_names_and_unknown_name() -> None:
    assert {"sine", "learned", "none", "rope_axial", "rope_mixed", "peg"} <= set(DETR_STRATEGIES.names())
    with pytest.raises(KeyError, match="did you mean"):
        build_detr_pos("sin", dim=32, num_heads=4, depth=1, grid=(4, 4))


def test_additive_encoding_reaches_queries_and_keys_not_values() -> None:
    """With a constant input every token's value is the same, so attention (whatever its weights)
    returns that value: an encoding added to q and k cannot change the output, one added to the
    values would."""
    tr = DetrTransformer(dim=16, num_heads=2, enc_layers=1, dec_layers=1, ffn_dim=32, pos="sine").eval()
    layer, block = tr.encoder[0], tr.pos.context((3, 4), 0).block(0)
    x, pad = torch.ones(1, 12, 16), torch.zeros(1, 12, dtype=torch.bool)
    pos = qk_embed(tr.pos, torch.zeros(1, 3, 4, dtype=torch.bool))
    torch.testing.assert_close(layer(x, pos, block, pad), layer(x, None, block, pad), atol=1e-5, rtol=1e-5)
    into_values = layer.attn(x + pos, x + pos, x + pos)
    assert not torch.allclose(into_values, layer.attn(x + pos, x + pos, x), atol=1e-3)


# -- model and backbone ----------------------------------------------------------------------
def test_postprocess_scales_boxes_to_the_original_size() -> None:
    out = {"pred_logits": torch.tensor([[[4.0, 0.0, 0.0]]]), "pred_boxes": torch.tensor([[[0.5, 0.5, 0.5, 0.25]]])}
    res = postprocess(out, torch.tensor([[480, 640]]))[0]
    assert res["labels"].tolist() == [0]
    torch.testing.assert_close(res["boxes"], torch.tensor([[160.0, 180.0, 480.0, 300.0]]))


def test_resnet_weights_come_from_a_local_file(tmp_path) -> None:
    src = ResNetBackbone("resnet18", frozen_bn=False)
    path = tmp_path / "r18.pt"
    torch.save({"model": {f"{k}": v for k, v in _torchvision_keys(src).items()}}, path)
    net = ResNetBackbone("resnet18", weights=str(path), frozen_bn=True, freeze_stem=True)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in net.modules())
    torch.testing.assert_close(net.body[0].weight, src.body[0].weight)
    assert not net.body[0].weight.requires_grad and net.body[7][0].conv1.weight.requires_grad
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="do not fit resnet18"):
        ResNetBackbone("resnet18", weights=str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ResNetBackbone("resnet18", weights=str(tmp_path / "missing.pt"))


def test_resnet_cut_after_layer3_has_stride_16() -> None:
    net = ResNetBackbone("resnet18", frozen_bn=False, stages=3)
    assert (net.stride, net.num_channels) == (16, 256)
    assert net(torch.randn(1, 3, 64, 96)).shape == (1, 256, 4, 6)


def _torchvision_keys(backbone: ResNetBackbone) -> dict[str, torch.Tensor]:
    """The backbone's state dict under torchvision's names (``conv1.weight``, ``layer1.0...``)."""
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    return {f"{names[int(k.split('.')[0])]}.{k.split('.', 1)[1]}": v for k, v in backbone.body.state_dict().items()}


@pytest.mark.parametrize("backbone, stride", [("vitpe_vit_tiny_patch16_224", 16), ("vitpe_mit_b0", 32)])
def test_vitpe_backbones_through_timm(backbone: str, stride: int) -> None:
    """vitpe's ViT and MiT serve as DETR backbones through timm's ``features_only``, with a
    positional strategy of their own."""
    model = DETR(num_classes=2, backbone=backbone, backbone_pos="rope_mixed", dim=32,
                 num_heads=4, enc_layers=1, dec_layers=1, ffn_dim=64, num_queries=4, pos="learned")
    assert model.size_divisibility == stride
    out = model(torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool))
    assert out["pred_boxes"].shape == (2, 4, 4) and ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()


def test_box_refs_start_every_query_on_its_own_centre() -> None:
    model = DETR(num_classes=2, backbone="resnet18", frozen_bn=False, dim=32, num_heads=4, enc_layers=1,
                 dec_layers=2, ffn_dim=64, num_queries=7, box_refs=True).eval()
    out = model(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool))
    centres = model.box_refs.detach().sigmoid()
    for boxes in [out["pred_boxes"], *(a["pred_boxes"] for a in out["aux_outputs"])]:
        torch.testing.assert_close(boxes[..., :2], centres.expand(2, -1, -1))
        torch.testing.assert_close(boxes[..., 2:], torch.full((2, 7, 2), torch.tensor(-2.0).sigmoid().item()))
    assert len(set(centres[:, 0].tolist())) == 7  # spread: no two queries share a centre


def test_heads_run_in_float32_under_autocast() -> None:
    """Boxes in bfloat16 would be off by pixels at COCO's sizes; the heads leave autocast."""
    model = DETR(num_classes=2, backbone="resnet18", frozen_bn=False, dim=32, num_heads=4, enc_layers=1,
                 dec_layers=2, ffn_dim=64, num_queries=7).eval()
    hs = torch.randn(2, 1, 7, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
        logits, boxes = model.heads(hs)
    assert out["pred_boxes"].dtype == out["pred_logits"].dtype == torch.float32
    assert out["aux_outputs"][0]["pred_boxes"].dtype == torch.float32
    with torch.no_grad():
        ref_logits, ref_boxes = model.class_embed(hs), model.bbox_embed(hs)
    assert torch.equal(boxes, ref_boxes) and torch.equal(logits, ref_logits)


def test_dropout_is_applied_where_detr_applies_it_once_each() -> None:
    """DETR drops out each residual branch once and the FFN's hidden layer once: 3 times per
    encoder layer, 4 per decoder layer (attention probabilities apart, inside the kernel)."""
    tr = DetrTransformer(dim=32, num_heads=4, enc_layers=1, dec_layers=1, ffn_dim=64, dropout=0.1).train()
    calls = {"encoder": 0, "decoder": 0}
    for part in calls:
        for m in getattr(tr, part).modules():
            if isinstance(m, torch.nn.Dropout):
                m.register_forward_hook(lambda *_, part=part: calls.__setitem__(part, calls[part] + 1))
    tr(torch.randn(2, 32, 3, 4), torch.zeros(2, 3, 4, dtype=torch.bool), torch.randn(5, 32))
    assert calls == {"encoder": 3, "decoder": 4}


def test_a_pretrained_backbone_keeps_its_stem_fixed_as_detr():
    from vitpe.engine.detection import DetModelConfig, stem_fixed

    assert not stem_fixed(DetModelConfig())  # from scratch: the stem must learn
    assert stem_fixed(DetModelConfig(backbone_weights="resnet50.pth"))
    assert stem_fixed(DetModelConfig(weights="detr-r50.pth"))
    assert not stem_fixed(DetModelConfig(backbone_weights="resnet50.pth", freeze_stem=False))


def test_a_vit_backbones_position_tables_and_class_token_are_not_decayed() -> None:
    """A vitpe ViT under DETR is decayed as the same ViT alone (``param_groups`` reads its
    ``no_weight_decay()`` through the feature wrapper): its tables and class token are not."""
    import timm

    from vitpe.engine import detection
    from vitpe.engine.optim import param_groups

    cfg = detection.DetModelConfig(backbone="vitpe_vit_tiny_patch4_32", backbone_pos="learned+rpb", frozen_bn=False,
                                   dim=16, num_heads=2, enc_layers=1, dec_layers=1, ffn_dim=16, num_queries=4)
    model = detection.build_model(cfg, 2)
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)].removeprefix("backbone.body.model.") for g in
                 detection.build_optimizer(model, detection.DetOptimConfig()).param_groups
                 if g["weight_decay"] == 0 for p in g["params"] if names[id(p)].startswith("backbone.")}
    vit = timm.create_model("vitpe_vit_tiny_patch4_32", pos="learned+rpb")
    vit_names = {id(p): n for n, p in vit.named_parameters()}
    alone = {vit_names[id(p)] for p in param_groups(vit, 0.05)[1]["params"]}
    assert {"cls_token", "pos.learned.pos_embed", "pos.rpb.tables"} <= undecayed
    assert undecayed == {n for n in alone if f"backbone.body.model.{n}" in names.values()}
