"""torch.compile sees whole graphs: no graph breaks, and no recompilation when resolutions alternate."""
import pytest
import timm
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import vitpe  # noqa: F401


# every strategy, in three models
@pytest.mark.parametrize("pos", ["learned+rope_mixed", "sincos2d+rpb+peg", "mixffn+rope_axial"])
def test_no_graph_breaks_and_no_recompiles_across_two_resolutions(pos):
    model = timm.create_model("vitpe_vit_tiny_patch16_224", pos=pos, depth=1, num_classes=3)
    dynamo.reset()
    explained = dynamo.explain(model)(torch.randn(1, 3, 64, 64))
    assert explained.graph_break_count == 0, explained.break_reasons
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    graphs = []
    for size in (64, 96, 64, 96, 64, 96):
        compiled(torch.randn(1, 3, size, size))
        graphs.append(counters["stats"]["unique_graphs"])
    # one graph for the first size, one (dynamic) for the second, none after
    assert graphs[1:] == [graphs[1]] * 5 and graphs[1] <= 2, graphs


@pytest.mark.parametrize("pos", ["learned", "rpb"])
def test_resampled_tables_train_with_symbolic_sizes(pos):
    """Away from the native grid the tables are resampled; compiled with the backward (AOT
    autograd, symbolic sizes after the second resolution) the resampling's gradient still traces,
    and the compiled gradients are the eager ones. (torch's antialiased bicubic backward fails
    there with an internal assert, so ``resample_map`` does not use it.)"""
    torch.manual_seed(0)
    model = timm.create_model("vitpe_vit_tiny_patch16_224", pos=pos, depth=1, num_classes=3)
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    graphs = []
    for size in (64, 96, 64, 96):
        x = torch.randn(2, 3, size, size)
        compiled(x).square().mean().backward()
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(x).square().mean().backward()
        for a, b in zip(got, (p.grad for p in model.parameters())):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        model.zero_grad()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1:] == [graphs[1]] * 3 and graphs[1] <= 2, graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need CUDA")
@pytest.mark.parametrize("pos", ["rope_mixed", "rpb", "mixffn"])
def test_kernels_compile_once_per_size_on_the_gpu(pos):
    """With inductor and the Triton kernels in the graph (rotary, biased attention, depthwise
    convolution), alternating resolutions in training still compiles one graph per size, and the
    dynamic one trains: a finite loss and gradients at every step."""
    model = timm.create_model("vitpe_vit_tiny_patch16_224", pos=pos, depth=1, num_classes=3).cuda()
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(model)
    graphs = []
    for size in (64, 96, 64, 96, 64, 96):
        with torch.autocast("cuda", dtype=torch.bfloat16):  # half precision: every kernel's case
            loss = compiled(torch.randn(2, 3, size, size, device="cuda")).float().square().mean()
        loss.backward()
        assert torch.isfinite(loss)
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        model.zero_grad()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1:] == [graphs[1]] * 5 and graphs[1] <= 2, graphs
