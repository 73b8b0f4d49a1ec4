"""DETR under torch.compile, as train_det.py compiles it: one graph for batches of any size and
padding (no recompilation per batch), and the losses and gradients of eager mode."""
from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

from vitpe.engine.detection import DetModelConfig, LossConfig, build_criterion, build_model, compile_model


def tiny_detr(pos: str = "sine") -> torch.nn.Module:
    cfg = DetModelConfig(backbone="resnet18", frozen_bn=True, dim=32, num_heads=4, enc_layers=1, dec_layers=2,
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
    ("sine", "eager"),  # dynamo's graph of the forward, about 15 s on CPU
    pytest.param("sine", "aot_eager", marks=pytest.mark.slow),  # forward and backward graphs, as inductor gets them
    pytest.param("rope_mixed", "aot_eager", marks=pytest.mark.slow),
])
def test_one_graph_for_every_batch_shape_and_the_losses_of_eager(pos: str, backend: str) -> None:
    model = tiny_detr(pos)
    criterion = build_criterion(LossConfig(), 3)
    dynamo.reset()
    counters.clear()
    compiled = compile_model(model, backend=backend)  # as train_det.py compiles it, without code generation
    for shape, seed in [((2, 64, 96), 0), ((3, 96, 64), 1), ((2, 128, 128), 2)]:
        images, mask, targets = batch(*shape, seed)
        results = []
        for net in (model, compiled):
            model.zero_grad(set_to_none=True)
            losses = criterion(net(images, mask), targets)
            criterion.total(losses).backward()
            results.append((losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        (eager, eager_grads), (comp, comp_grads) = results
        for k in eager:
            torch.testing.assert_close(comp[k], eager[k], rtol=1e-4, atol=1e-5, msg=f"{shape} {k}")
        assert eager_grads.keys() == comp_grads.keys()
        for n, g in eager_grads.items():
            torch.testing.assert_close(comp_grads[n], g, rtol=1e-3, atol=1e-5, msg=f"{shape} {n}")
    # the first shape already compiles with symbolic sizes: later batches reuse its graph
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
