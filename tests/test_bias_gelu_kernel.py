"""vitpe's fused bias add and GELU gives what ``F.gelu(h + bias)`` gives: the output and the
gradients of ``h`` and of the bias, for a float32 bias with ``h`` in another dtype, widths and row
counts that leave tiles partly empty, strided ``h`` and rows that the backward's programs share
unevenly; the plain MLP takes it unless told not to (``IN_MLP = 0``). On CPU the kernels run in Triton's
interpreter (a subprocess, since the interpreter is chosen when the kernels are defined)."""
import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import GeluPoints, opcheck_utils, run_compare_in_interpreter

from vitpe.layers import Mlp
from vitpe.pos.base import BlockPos

triton = pytest.importorskip("triton")


def _close(got: torch.Tensor, want: torch.Tensor, tol: dict, what: str) -> None:
    """Compared relative to the largest element of ``want`` (the bias gradient is a sum over rows)."""
    scale = want.abs().max().item()
    assert scale > 0, what
    torch.testing.assert_close(got.float() / scale, want.float() / scale, **tol, msg=lambda m: f"{what}: {m}")


def compare(device: str, dtype: torch.dtype = torch.float32) -> None:
    from vitpe.kernels import bias_gelu

    torch.manual_seed(0)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    # 4 x 181 rows: more row tiles than the backward's programs (4 multiprocessors in the
    # interpreter), the last program's share short; 2 x 5 x 130: a partly empty column block
    for shape in [(3, 7, 40), (2, 5, 130), (1, 1, 17), (4, 181, 24), (6, 300)]:
        N = shape[-1]
        h = (2 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
        bias = torch.randn(N, device=device, requires_grad=True)  # float32, as the layer's parameter
        assert bias_gelu.available(h, bias)
        got = bias_gelu.bias_gelu(h, bias)
        want = F.gelu(h.float() + bias)
        assert got.shape == h.shape and got.dtype == dtype
        torch.testing.assert_close(got.float(), want, **tol, msg=lambda m: f"{shape} forward: {m}")
        dg = torch.randn_like(want)
        got_g = torch.autograd.grad((got.float() * dg).sum(), (h, bias))
        want_g = torch.autograd.grad((want * dg).sum(), (h, bias))
        assert got_g[0].dtype == dtype and got_g[1].dtype == torch.float32
        for name, a, b in zip(("dh", "dbias"), got_g, want_g):
            _close(a, b, tol, f"{shape} {name}")
    _compare_gelu(device)
    # strided h: a slice of the columns of a wider tensor (rows apart), or every other column; a bias in h's dtype
    wide = torch.randn(2, 9, 66, device=device, dtype=dtype)
    for h in (wide[..., 5:38], wide[..., ::2]):
        h = h.detach().requires_grad_()
        bias = torch.randn(33, device=device, dtype=dtype, requires_grad=True)
        got = bias_gelu.bias_gelu(h, bias)
        want = F.gelu(h.float() + bias.float())
        torch.testing.assert_close(got.float(), want, **tol)
        for a, b in zip(torch.autograd.grad(got.float().square().sum(), (h, bias)),
                        torch.autograd.grad(want.square().sum(), (h, bias))):
            assert a.dtype == dtype
            _close(a, b, tol, f"strided {tuple(h.stride())}")
    # the plain MLP takes the kernels when asked, and computes fc2(gelu(fc1(x))) as before
    mlp = Mlp(6, 40).to(device)
    x = torch.randn(2, 9, 6, device=device, requires_grad=True)
    calls = []
    kernel, saved = bias_gelu.bias_gelu, bias_gelu.IN_MLP
    bias_gelu.bias_gelu = lambda *a: calls.append(1) or kernel(*a)
    bias_gelu.IN_MLP = 1
    try:
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            ours = mlp(x, BlockPos((3, 3), 0))
    finally:
        bias_gelu.bias_gelu, bias_gelu.IN_MLP = kernel, saved
    assert calls == [1]
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        ref = mlp(x, BlockPos((3, 3), 0))  # torch's fc1 and GELU
    torch.testing.assert_close(ours.float(), ref.float(), **tol)
    params = [x, mlp.fc1.weight, mlp.fc1.bias]
    for name, a, b in zip(("x", "fc1.weight", "fc1.bias"), torch.autograd.grad(ours.float().sum(), params),
                          torch.autograd.grad(ref.float().sum(), params)):
        _close(a, b, tol, f"Mlp {name}")
    # the schema, the autograd registration and (on a GPU) the shape-only version agree with the kernels
    h = torch.randn(2, 5, 40, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(40, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.vitpe.bias_gelu, (h, bias), test_utils=opcheck_utils(device))


def _compare_gelu(device: str) -> None:
    """The kernels' GELU and its derivative over [-12, 12] against float64's (``GeluPoints``), with
    the polynomial's normal CDF (the default) and with libdevice's ``erf`` (``ERF_POLY = 0``)."""
    from vitpe.kernels import bias_gelu

    M, N = 64, 96
    points = GeluPoints((M, N), device)
    saved = bias_gelu.ERF_POLY
    try:
        for poly in (1, 0):
            bias_gelu.ERF_POLY = poly
            points.check(bias_gelu.bias_gelu(points.x, torch.zeros(N, device=device)), f", ERF_POLY={poly}")
    finally:
        bias_gelu.ERF_POLY = saved


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels themselves are tested")
def test_bias_gelu_kernel_matches_gelu_in_the_interpreter():
    run_compare_in_interpreter("test_bias_gelu_kernel")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_gelu_kernel_matches_gelu_on_gpu(dtype):
    compare("cuda", dtype)


def test_the_mlp_keeps_torch_unless_asked_and_on_cpu_tensors():
    from vitpe.kernels import bias_gelu

    h, bias = torch.randn(2, 3, 8), torch.zeros(8)
    assert not bias_gelu.available(h, bias)  # a CPU tensor outside the interpreter
    assert not bias_gelu.available(h, None)
    assert bias_gelu.IN_MLP == 1  # on by default: measured faster on the GPU
    if torch.cuda.is_available():
        assert bias_gelu.available(h.cuda(), bias.cuda())
        assert not bias_gelu.available(h.cuda(), bias)  # the bias on another device
        assert not bias_gelu.available(h.cuda(), torch.zeros(2, 4, device="cuda"))  # not 1-D


def test_bias_gelu_names_a_bias_of_the_wrong_width():
    from vitpe.kernels import bias_gelu

    with pytest.raises(ValueError, match=r"shape \(9,\) for inputs \(2, 3, 8\)"):
        bias_gelu.bias_gelu(torch.randn(2, 3, 8), torch.zeros(9))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_vit_uses_the_kernel_without_graph_breaks(monkeypatch):
    import timm
    import torch._dynamo as dynamo

    from vitpe.kernels import bias_gelu

    monkeypatch.setattr(bias_gelu, "IN_MLP", 1)
    torch.manual_seed(0)
    model = timm.create_model("vitpe_vit_tiny_patch16_224", pos="learned", depth=2, num_classes=3).cuda()
    x = torch.randn(2, 3, 64, 96, device="cuda")
    explained = dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert "vitpe.bias_gelu" in str(explained.graphs[0].code)
    dynamo.reset()
    bias = model.blocks[0].mlp.fc1.bias
    torch.compile(model)(x).square().sum().backward()
    got = bias.grad.clone()
    bias.grad = None
    monkeypatch.setattr(bias_gelu, "IN_MLP", 0)  # torch's addmm and GELU, eager
    model(x).square().sum().backward()
    dynamo.reset()
    _close(got, bias.grad, dict(atol=1e-4, rtol=1e-3), "compiled fc1 bias gradient")
