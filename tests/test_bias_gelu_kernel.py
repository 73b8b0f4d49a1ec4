"""vitpe's fused bias add and GELU gives what ``F.gelu(h + bias)`` gives: the output and the
gradients of ``h`` and of the bias, for a float32 bias with ``h`` in another dtype, widths and row
counts that leave tiles partly empty, strided ``h`` and batches the backward's programs share
unevenly. On CPU the kernels run in Triton's interpreter (a subprocess, since the interpreter is
chosen when the kernels are defined)."""
import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import opcheck_utils, run_compare_in_interpreter

triton = pytest.importorskip("triton")


def compare(device: str, dtype: torch.dtype = torch.float32) -> None:
    from vitpe.kernels import bias_gelu

    torch.manual_seed(0)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    # 4 x 181 rows: more row tiles than the backward's programs, the last program's share short
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
            scale = b.abs().max().item()  # the bias gradient is summed over the rows: compare relative
            torch.testing.assert_close(a.float() / scale, b.float() / scale, **tol,
                                       msg=lambda m: f"{shape} {name}: {m}")
    # strided h: a slice of the columns of a wider tensor (rows apart), or every other column; a bias in h's dtype
    wide = torch.randn(2, 9, 66, device=device, dtype=dtype)
    for h in (wide[..., 5:38], wide[..., ::2]):
        h = h.detach().requires_grad_()
        bias = torch.randn(33, device=device, dtype=dtype, requires_grad=True)
        got = bias_gelu.bias_gelu(h, bias)
        want = F.gelu(h.float() + bias.float())
        torch.testing.assert_close(got.float(), want, **tol)
        got_g = torch.autograd.grad(got.float().square().sum(), (h, bias))
        want_g = torch.autograd.grad(want.square().sum(), (h, bias))
        for a, b in zip(got_g, want_g):
            assert a.dtype == dtype
            scale = b.abs().max().item()
            torch.testing.assert_close(a.float() / scale, b.float() / scale, **tol)
    # the schema, the autograd registration and (on a GPU) the shape-only version agree with the kernels
    h = torch.randn(2, 5, 40, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(40, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.vitpe.bias_gelu, (h, bias),
                          test_utils=opcheck_utils(device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels themselves are tested")
def test_bias_gelu_kernel_matches_gelu_in_the_interpreter():
    run_compare_in_interpreter("test_bias_gelu_kernel")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_gelu_kernel_matches_gelu_on_the_gpu(dtype):
    compare("cuda", dtype)


def test_bias_gelu_kernel_does_not_apply_to_cpu_tensors():
    from vitpe.kernels import bias_gelu

    h = torch.randn(2, 3, 8)
    bias = torch.zeros(8)
    assert not bias_gelu.available(h, bias)  # a CPU tensor outside the interpreter
    if torch.cuda.is_available():
        hc = h.cuda()
        assert bias_gelu.available(hc, bias.cuda())
        assert not bias_gelu.available(hc, bias)  # the bias on another device
        assert not bias_gelu.available(hc, None)


def test_bias_gelu_names_a_bias_of_the_wrong_width():
    from vitpe.kernels import bias_gelu

    with pytest.raises(ValueError, match=r"shape \(9,\) for inputs \(2, 3, 8\)"):
        bias_gelu.bias_gelu(torch.randn(2, 3, 8), torch.zeros(9))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_vit_uses_the_kernel_and_matches_torch():
    import timm
    import torch._dynamo as dynamo

    from vitpe.kernels import bias_gelu

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
    bias_gelu.ENABLED = False  # torch's addmm and GELU, eager
    try:
        model(x).square().sum().backward()
    finally:
        bias_gelu.ENABLED = True
    scale = bias.grad.abs().max()
    assert scale > 0
    # the kernel's own error is tested above; compiled and eager models differ in float32 by more
    # (fused layer norms, attention), summed over the batch
    torch.testing.assert_close(got / scale, bias.grad / scale, atol=2e-3, rtol=1e-2)
