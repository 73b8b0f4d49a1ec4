"""DETR under torch.compile, as train_det.py compiles it (the transformer): two graphs for batches
of any size and padding (the first size fixed, then one with symbolic sizes; no recompilation per
batch), and the losses and gradients of eager mode."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

from vitpe.engine.detection import DetModelConfig, LossConfig, build_criterion, build_model, compile_model


def tiny_detr(pos: str = "sine", dec_layers: int = 2) -> torch.nn.Module:
    cfg = DetModelConfig(backbone="resnet18", frozen_bn=True, dim=32, num_heads=4, enc_layers=1, dec_layers=dec_layers,
                         ffn_dim=64, num_queries=6, dropout=0.0, pos=pos, box_refs=True, spatial_prior=True)
    logging.getLogger("vitpe.models.detr_backbone").setLevel(logging.ERROR)  # random frozen batch norm is fine here
    torch.manual_seed(0)
    return build_model(cfg, 3).train()


def batch(B: int, H: int, W: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Images padded to ``H x W``, each image's valid region a different size, 0 to 3 boxes each."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, H, W, dtype=torch.bool)
    for b in range(B):
        mask[b, :H - 8 * b, :W - 16 * (b % 2)] = False
    targets = [{"labels": torch.randint(0, 3, (b % 4,), generator=g),
                "boxes": torch.rand(b % 4, 4, generator=g) * 0.4 + 0.3} for b in range(B)]
    return torch.randn(B, 3, H, W, generator=g), mask, targets


@pytest.mark.parametrize("pos, backend", [
    ("sine", "eager"),  # dynamo's graph of the forward (one decoder layer: the tracing is most of the time)
    pytest.param("sine", "aot_eager", marks=pytest.mark.slow),  # forward and backward graphs, as inductor gets them
    pytest.param("rope_mixed", "aot_eager", marks=pytest.mark.slow),
])
def test_no_recompilation_per_batch_and_the_losses_of_eager(pos: str, backend: str) -> None:
    eager = tiny_detr(pos, dec_layers=1 if backend == "eager" else 2)
    criterion = build_criterion(LossConfig(), 3)
    dynamo.reset()
    counters.clear()
    model = copy.deepcopy(eager)
    compiled = compile_model(model, backend=backend)  # as train_det.py compiles it, without code generation
    assert compiled is model and model.state_dict().keys() == eager.state_dict().keys()  # in place
    graphs = []
    # height and width change from batch to batch (feature grids 3x4, 5x6, 4x5), the batch size,
    # fixed by the training loader, only at the end (an evaluation's last batch)
    for shape, seed in [((2, 96, 128), 0), ((2, 160, 192), 1), ((2, 128, 160), 2), ((3, 192, 224), 3)]:
        images, mask, targets = batch(*shape, seed)
        results = []
        for net in (eager, compiled):
            net.zero_grad(set_to_none=True)
            losses = criterion(net(images, mask), targets)
            criterion.total(losses).backward()
            results.append((losses, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
        (ref, ref_grads), (comp, comp_grads) = results
        for k in ref:
            torch.testing.assert_close(comp[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"{shape} {k}")
        assert ref_grads.keys() == comp_grads.keys()
        for n, g in ref_grads.items():
            torch.testing.assert_close(comp_grads[n], g, rtol=1e-3, atol=1e-5, msg=f"{shape} {n}")
        graphs.append(counters["stats"]["unique_graphs"])
    # the first size, then symbolic height and width for every later size, then the batch size too
    assert graphs == [1, 2, 2, 3], graphs


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor's GPU code: a CUDA device")
def test_inductor_on_cuda_keeps_few_graphs_and_the_losses_of_eager() -> None:
    """train_det.py's compilation on the GPU (Inductor), about a minute of compiling: float32 losses
    as eager's; under bf16 autocast (a guard of its own) one more graph, symbolic from the start."""
    eager = tiny_detr().cuda()
    criterion = build_criterion(LossConfig(), 3).cuda()
    dynamo.reset()
    counters.clear()
    model = compile_model(copy.deepcopy(eager))
    graphs = []
    for shape, seed, bf16 in [((2, 96, 128), 0, False), ((2, 160, 192), 1, False), ((2, 128, 160), 2, False),
                              ((2, 224, 256), 3, True), ((2, 192, 128), 4, True)]:
        images, mask, targets = batch(*shape, seed)
        images, mask = images.cuda(), mask.cuda()
        targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
        losses = []
        for net in (eager, model):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                out = net(images, mask)
            losses.append(criterion.total(criterion(out, targets)))
            losses[-1].backward()
        if bf16:  # rounding may change the matching: only finite
            assert torch.isfinite(losses[1]), shape
        else:
            torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-4, msg=str(shape))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 2, 2, 3, 3], graphs
