"""The Triton depthwise convolution on tokens gives cuDNN's results: forward, input, weight and bias
gradients, with and without prefix tokens and residual. On CPU the kernels run in Triton's
interpreter (a subprocess, since the interpreter is chosen when the kernels are defined)."""

import pytest
import torch
from triton_interpreter import opcheck_utils, run_compare_in_interpreter

from vitpe.pos.functional import GridConv

triton = pytest.importorskip("triton")


def compare(device: str, dtype: torch.dtype = torch.float32) -> None:
    """Kernel path against the convolution path of the same ``GridConv``, over several cases;
    bfloat16 tokens meet float32 weights under autocast, as in mixed-precision training."""
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        _compare(device, dtype)


def _compare(device: str, dtype: torch.dtype) -> None:
    from vitpe import kernels

    torch.manual_seed(0)
    cases = [(2, 5, 7, 8, 0, False, 3), (3, 4, 4, 70, 1, True, 3), (1, 6, 3, 5, 2, False, 3), (2, 1, 9, 3, 1, True, 3),
             (2, 3, 5, 128, 1, False, 3),  # whole channel blocks: no channel mask
             (1, 20, 40, 8, 1, True, 3),  # more rows than one program walks, more columns than one tile
             (5, 18, 3, 4, 0, False, 3)]  # weight gradient: several (image, rows) items per program, some empty
    for B, H, W, C, P, residual, k in cases:
        conv = GridConv(C, k, residual=residual).to(device)
        x = torch.randn(B, P + H * W, C, device=device, dtype=dtype, requires_grad=True)
        params = [x, conv.proj.weight, conv.proj.bias]
        ours = kernels.depthwise_conv_tokens(x, conv.proj.weight, conv.proj.bias, (H, W), P, residual)
        kernels.depthwise.ENABLED, saved = False, kernels.depthwise.ENABLED
        try:
            ref = conv(x, (H, W), P)  # the cuDNN / CPU convolution
        finally:
            kernels.depthwise.ENABLED = saved
        tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(ours, ref, **tol)
        w = torch.randn_like(ref)
        got = torch.autograd.grad((ours.float() * w).sum(), params)
        want = torch.autograd.grad((ref.float() * w).sum(), params)
        for name, a, b in zip(("x", "weight", "bias"), got, want):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{(B, H, W, C, P, residual, k)} {name}: {m}")
    # the schema, the autograd registration and (on a GPU) the shape-only version agree with the
    # kernels, as torch.compile relies on
    x = torch.randn(2, 1 + 12, 8, device=device, dtype=dtype, requires_grad=True)
    conv = GridConv(8).to(device)
    torch.library.opcheck(torch.ops.vitpe.depthwise_conv_tokens, (x, conv.proj.weight, conv.proj.bias, 3, 4, 1, True),
                          test_utils=opcheck_utils(device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels themselves are tested")
def test_kernels_match_the_convolution_in_the_interpreter():
    run_compare_in_interpreter('test_kernels')


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_the_convolution_on_gpu(dtype):
    torch.backends.cudnn.allow_tf32 = False
    compare("cuda", dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_mixffn_vit_uses_the_kernel_without_graph_breaks():
    import timm
    import torch._dynamo as dynamo

    model = timm.create_model("vitpe_vit_tiny_patch16_224", pos="mixffn+peg", depth=2, num_classes=3).cuda()
    x = torch.randn(2, 3, 64, 96, device="cuda")
    explained = dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    dynamo.reset()
    loss_c = torch.compile(model)(x).square().mean()
    loss_e = model(x).square().mean()
    torch.testing.assert_close(loss_c, loss_e, atol=1e-4, rtol=1e-4)


def test_other_kernel_sizes_keep_the_convolution():
    from vitpe import kernels

    x = torch.randn(1, 4, 8)
    assert not kernels.available(x, 5)
    with pytest.raises(ValueError, match=r"3x3; got a \(5, 5\) weight"):
        kernels.depthwise_conv_tokens(x, torch.randn(8, 1, 5, 5), None, (2, 2))
