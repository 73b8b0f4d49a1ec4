"""Training under CUDA graphs (``run.compile_mode=reduce-overhead``) takes the same steps as eager
training: the graphs' outputs (logits, gradients) are overwritten on every replay, and the loop
must have consumed them by then."""
import pytest
import torch

from vitpe.engine import segmentation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def losses(mode: str | None, steps: int = 4) -> list[float]:
    cfg = segmentation.SegConfig()
    cfg.model.name, cfg.model.head_dim = "vitpe_mit_b0", 64
    torch.manual_seed(0)
    model = segmentation.build_model(cfg.model, 5, 64).cuda().train()
    model.decode_head.dropout.p = 0.0  # no randomness (no drop path by default): both see the same computation
    optimizer = segmentation.build_optimizer(model, cfg.optim)
    net = model if mode is None else segmentation.compile_model(model, mode=mode)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 64, 64, generator=g).cuda(), torch.randint(0, 5, (2, 64, 64), generator=g).cuda()
    out = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = segmentation.pixel_loss(net(x), y, 255)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def test_mit_training_under_cuda_graphs_matches_eager():
    eager, graphs = losses(None), losses("reduce-overhead")
    assert eager[-1] < eager[0]  # the steps do train
    assert graphs == pytest.approx(eager, rel=2e-2)
