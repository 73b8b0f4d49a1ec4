"""DETR's fast paths give the results of the plain ones: the fused frozen batch norm against
torchvision's, the channels-last ResNet against torchvision's network, and the criterion that
matches and scores every decoder layer in one batch against a layer-by-layer computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops import FrozenBatchNorm2d, box_convert, generalized_box_iou_loss

from vitpe.models.detr_backbone import FusedFrozenBatchNorm2d, ResNetBackbone
from vitpe.models.detr_criterion import SetCriterion
from vitpe.models.detr_matcher import HungarianMatcher


def random_frozen_bn(cls: type, C: int, seed: int = 0) -> FrozenBatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = cls(C)
    bn.weight.copy_(torch.randn(C, generator=g))
    bn.bias.copy_(torch.randn(C, generator=g))
    bn.running_mean.copy_(torch.randn(C, generator=g))
    bn.running_var.copy_(torch.rand(C, generator=g) + 0.1)
    return bn


def test_fused_frozen_bn_equals_torchvision_and_keeps_the_input_dtype() -> None:
    ref, fused = random_frozen_bn(FrozenBatchNorm2d, 8), FusedFrozenBatchNorm2d(8)
    fused.load_state_dict(ref.state_dict())  # same keys, same buffers
    x = torch.randn(2, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-6, atol=1e-6)
    xb = x.bfloat16()
    out = fused(xb)
    assert out.dtype == torch.bfloat16  # torchvision's promotes to float32
    torch.testing.assert_close(out.float(), ref(xb), rtol=2e-2, atol=2e-2)  # bf16 rounding only


def test_channels_last_resnet_equals_torchvision_network() -> None:
    torch.manual_seed(0)
    net = ResNetBackbone("resnet18", frozen_bn=True, stages=3)
    for m in net.modules():  # non-trivial statistics, so a misplaced affine would show
        if isinstance(m, FusedFrozenBatchNorm2d):
            m.load_state_dict(random_frozen_bn(FrozenBatchNorm2d, m.weight.numel(), seed=m.weight.numel()).state_dict())
    ref = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    ref = torch.nn.Sequential(*list(ref.children())[:7])
    ref.load_state_dict(net.body.state_dict())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out, expected = net(x), ref(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # summation order differs between the layouts' kernels: compare at the scale of the map
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def layer_outputs(L: int, B: int, Q: int, K: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    layers = [{"pred_logits": torch.randn(B, Q, K + 1, generator=g).requires_grad_(),
               "pred_boxes": (torch.rand(B, Q, 4, generator=g) * 0.5 + 0.25).requires_grad_()} for _ in range(L)]
    return {**layers[-1], "aux_outputs": layers[:-1]}


def targets(sizes: list[int], K: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, K, (m,), generator=g), "boxes": torch.rand(m, 4, generator=g) * 0.4 + 0.3}
            for m in sizes]


def layer_by_layer(crit: SetCriterion, out: dict, tgt: list[dict]) -> dict[str, torch.Tensor]:
    """DETR's criterion written plainly: match, then score, one decoder layer at a time."""
    n = max(float(sum(len(t["labels"]) for t in tgt)), 1.0)
    losses = {}
    for suffix, o in [("", out), *((f"_{i}", a) for i, a in enumerate(out["aux_outputs"]))]:
        idx = crit.matcher(o, tgt)
        classes = torch.full(o["pred_logits"].shape[:2], crit.num_classes)
        pred, true = [], []
        for b, (src, dst) in enumerate(idx):
            classes[b, src] = tgt[b]["labels"][dst]
            pred.append(o["pred_boxes"][b, src])
            true.append(tgt[b]["boxes"][dst])
        pred, true = torch.cat(pred), torch.cat(true)
        losses[f"loss_ce{suffix}"] = F.cross_entropy(o["pred_logits"].transpose(1, 2), classes, crit.empty_weight)
        losses[f"loss_bbox{suffix}"] = F.l1_loss(pred, true, reduction="sum") / n
        losses[f"loss_giou{suffix}"] = generalized_box_iou_loss(
            box_convert(pred, "cxcywh", "xyxy"), box_convert(true, "cxcywh", "xyxy"), reduction="sum") / n
    return losses


@pytest.mark.parametrize("sizes", [[3, 0, 5], [0, 0], [7]])
def test_batched_criterion_equals_layer_by_layer_with_gradients(sizes: list[int]) -> None:
    K = 4
    crit = SetCriterion(K, HungarianMatcher(), eos_coef=0.1)
    out, tgt = layer_outputs(3, len(sizes), 8, K), targets(sizes, K)
    losses = crit(out, tgt)
    ref = layer_by_layer(crit, out, tgt)
    assert [k for k in losses if k.startswith("loss_")] == list(ref)  # same keys, same order
    for k, v in ref.items():
        torch.testing.assert_close(losses[k], v, rtol=1e-6, atol=1e-7)
    leaves = [t for o in [out, *out["aux_outputs"]] for t in (o["pred_logits"], o["pred_boxes"])]
    ours = torch.autograd.grad(crit.total(losses), leaves)
    theirs = torch.autograd.grad(crit.total(ref), leaves)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_matching_all_layers_at_once_equals_one_layer_at_a_time() -> None:
    matcher = HungarianMatcher()
    out, tgt = layer_outputs(4, 3, 6, 3, seed=5), targets([2, 4, 1], 3, seed=6)
    layers = [*out["aux_outputs"], out]
    together = matcher.match_layers(torch.stack([o["pred_logits"] for o in layers]),
                                    torch.stack([o["pred_boxes"] for o in layers]), tgt)
    for o, pairs in zip(layers, together):
        for (a_src, a_dst), (b_src, b_dst) in zip(pairs, matcher(o, tgt)):
            assert torch.equal(a_src, b_src) and torch.equal(a_dst, b_dst)


class OpCounter(TorchDispatchMode):
    """The aten operators run inside the context (each a kernel launch on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_frozen_bn_affine_is_made_once_and_follows_its_buffers() -> None:
    ref, bn = random_frozen_bn(FrozenBatchNorm2d, 6), FusedFrozenBatchNorm2d(6)
    bn.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 4, 5)
    bn(x)
    with OpCounter() as count:
        out = bn(x)
    assert count.ops == ["addcmul"]  # scale and shift come from the cache
    torch.testing.assert_close(out, ref(x), rtol=1e-6, atol=1e-6)
    ref.running_mean.add_(1.0)  # a loaded or edited buffer replaces the cached affine
    bn.load_state_dict(ref.state_dict())
    torch.testing.assert_close(bn(x), ref(x), rtol=1e-6, atol=1e-6)
    with torch.inference_mode():  # made under inference mode, kept apart from what training saves
        bn(x)
    w = torch.randn(2, 6, 4, 5, requires_grad=True)
    bn(w).sum().backward()
    torch.testing.assert_close(w.grad, ref(torch.ones_like(w)) - ref(torch.zeros_like(w)))


def test_a_diverged_model_is_still_matched_one_to_one() -> None:
    """NaN predictions (weights gone bad between two reads of the loss) still give an assignment,
    so the step ends in a NaN loss that the training loop reports, not in scipy's error."""
    out, tgt = layer_outputs(2, 2, 5, 3), targets([2, 3], 3)
    logits = torch.stack([o["pred_logits"].detach() for o in [*out["aux_outputs"], out]])
    logits[0, 0, 1] = float("nan")
    logits[1] = float("inf")
    boxes = torch.stack([o["pred_boxes"].detach() for o in [*out["aux_outputs"], out]])
    for layer in HungarianMatcher().match_layers(logits, boxes, tgt):
        for (src, dst), t in zip(layer, tgt):
            assert len(src) == len(t["labels"]) and len(set(src.tolist())) == len(src)
            assert sorted(dst.tolist()) == list(range(len(t["labels"])))


VIEWS = {"select", "view", "unsqueeze", "expand", "detach", "_unsafe_view", "alias", "slice", "transpose", "t",
         "permute", "squeeze", "unbind", "as_strided", "split", "lift_fresh"}  # no kernel of their own


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_criterion_kernels_do_not_grow_with_the_decoder_depth(phase: str) -> None:
    """Every decoder layer is matched and scored in one batch, its terms come from one tensor and
    the total is one weighted product: 2 and 6 decoder layers launch the same kernels (the
    layer-by-layer sum of weighted terms added a few per layer, forward and backward)."""
    K, counts = 4, []
    crit = SetCriterion(K, HungarianMatcher(), eos_coef=0.1)
    for L in (2, 6):
        out, tgt = layer_outputs(L, 2, 8, K), targets([3, 2], K)
        with OpCounter() as count:
            total = crit.total(crit(out, tgt))
        if phase == "backward":
            with OpCounter() as count:
                total.backward()
        counts.append([op for op in count.ops if op not in VIEWS])
    assert counts[0] == counts[1], (len(counts[0]), len(counts[1]))
