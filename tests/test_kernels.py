"""The Triton depthwise convolution on tokens gives cuDNN's results: forward, input, weight and bias
gradients, with and without prefix tokens and residual, and with the GELU applied by the kernel.
On CPU the kernels run in Triton's interpreter (a subprocess, since the interpreter is chosen when
the kernels are defined)."""

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import GeluPoints, opcheck_utils, run_compare_in_interpreter

from vitpe.layers import Mlp
from vitpe.pos.base import BlockPos
from vitpe.pos.functional import GridConv

triton = pytest.importorskip("triton")


class _RoundGrad(torch.autograd.Function):
    """Identity forward; the backward rounds the gradient to ``dtype``."""

    @staticmethod
    def forward(t, dtype):
        return t.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.dtype = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype).to(grad.dtype), None


class _GeluKeptDerivative(torch.autograd.Function):
    """GELU whose backward multiplies by its derivative rounded to ``dtype``, as the kernels do
    when the forward keeps the derivative (``SAVE_GELU_GRAD``) in the tokens' dtype."""

    @staticmethod
    def forward(t, dtype):
        return F.gelu(t)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.dtype = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        with torch.enable_grad():
            t = t.detach().requires_grad_()
            derivative = torch.autograd.grad(F.gelu(t).sum(), t)[0]
        return grad * derivative.to(ctx.dtype).to(grad.dtype), None


def compare(device: str, dtype: torch.dtype = torch.float32, stages: int | None = None,
            merged: int | None = None, saved: int | None = None, fit: int | None = None,
            poly: int | None = None, first: int | None = None) -> None:
    """Kernel path against the convolution path of the same ``GridConv``, over several cases;
    bfloat16 tokens meet float32 weights under autocast, as in mixed-precision training. ``stages``:
    the convolution's ``CONV_STAGES`` (0: the kernel that carries the next row in registers, which
    the GELU cases take anyway; default: the module's own); ``merged``: ``BWD_MERGED`` (1: the
    backward in one kernel); ``saved``: ``SAVE_GELU_GRAD`` (1: the GELU cases keep the derivative
    from the forward); ``fit``: ``STRIP_FIT`` (1: strips as narrow as 2 columns, channel blocks as
    wide as 1024); ``poly``: ``ERF_POLY`` (1: the GELU's normal CDF from a polynomial, 0: from
    libdevice's ``erf``); ``first``: ``BIAS_FIRST`` (1: the forward's sums start from the bias)."""
    from vitpe.kernels import depthwise

    settings = dict(CONV_STAGES=stages, BWD_MERGED=merged, SAVE_GELU_GRAD=saved, STRIP_FIT=fit, ERF_POLY=poly,
                    BIAS_FIRST=first)
    before = {k: getattr(depthwise, k) for k in settings}
    for k, v in settings.items():
        if v is not None:
            setattr(depthwise, k, v)
    try:
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            _compare(device, dtype)
    finally:
        for k, v in before.items():
            setattr(depthwise, k, v)


def _compare(device: str, dtype: torch.dtype) -> None:
    from vitpe import kernels

    torch.manual_seed(0)
    cases = [(2, 5, 7, 8, 0, False, 3), (3, 4, 4, 70, 1, True, 3), (1, 6, 3, 5, 2, False, 3), (2, 1, 9, 3, 1, True, 3),
             (2, 3, 5, 128, 1, False, 3),  # whole channel blocks: no channel mask
             (1, 20, 40, 8, 1, True, 3),  # an image's rows split between programs (the last chunk short),
             # more columns than one strip
             (5, 18, 3, 4, 0, False, 3),  # rows split, with images side by side
             (17, 3, 3, 4, 0, False, 3),  # weight gradient: several images per program, some programs' last none
             # widths between powers of two: with STRIP_FIT, strips of 2 (6 wide) and 4 columns (12 wide)
             # that read their neighbours' columns, and wide channel blocks
             (2, 4, 6, 256, 1, False, 3), (1, 3, 12, 256, 0, True, 3)]
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for B, H, W, C, P, with_residual, k in cases:
        # every case also without residual and with the GELU: the kernel's against torch's after the convolution
        for residual, gelu in ((with_residual, False), (False, True)):
            conv = GridConv(C, k, residual=residual).to(device)
            x = torch.randn(B, P + H * W, C, device=device, dtype=dtype, requires_grad=True)
            params = [x, conv.proj.weight, conv.proj.bias]
            # a bias the caller added to x: it gets x's gradient summed over all rows
            in_bias = torch.randn(C, device=device, requires_grad=True)
            ours = kernels.depthwise_conv_tokens(x, conv.proj.weight, conv.proj.bias, (H, W), P, residual, gelu,
                                                 in_bias)
            kernels.depthwise.ENABLED, saved = False, kernels.depthwise.ENABLED
            try:
                # the cuDNN / CPU convolution in float32 (no TF32) of the same inputs, as the kernels
                # compute (a bfloat16 convolution's backward would round its sums)
                with torch.autocast(device, enabled=False), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                    ref = conv(x.float(), (H, W), P)
            finally:
                kernels.depthwise.ENABLED = saved
            if gelu:
                # the kernels hand the pre-activation's gradient from the GELU's backward to the
                # convolution's in the tokens' dtype, as torch's GELU after the convolution does;
                # a derivative kept from the forward is kept in that dtype too, and the merged
                # backward multiplies it in as it loads the gradient, rounding nothing
                kept = kernels.depthwise.SAVE_GELU_GRAD and dtype != torch.float32
                if not (kept and kernels.depthwise.BWD_MERGED):
                    ref = _RoundGrad.apply(ref, dtype)
                ref = _GeluKeptDerivative.apply(ref, dtype) if kept else F.gelu(ref)
            case = (B, H, W, C, P, residual, k, gelu)
            assert ours.dtype == x.dtype, case
            torch.testing.assert_close(ours.float(), ref, **tol, msg=lambda m: f"{case} output: {m}")
            # output gradients that bfloat16 holds exactly, so that both sides get the same
            w = torch.randn_like(ref).to(dtype).float()
            got = torch.autograd.grad((ours.float() * w).sum(), params + [in_bias])
            want = torch.autograd.grad((ref.float() * w).sum(), params)
            want = (*want, want[0].float().sum((0, 1)))
            for name, a, b in zip(("x", "weight", "bias", "input bias"), got, want):
                torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{case} {name}: {m}")
    if dtype == torch.float32:
        _compare_gelu(device)
    # without a bias, the GELU's pre-activation is recomputed without one
    conv = GridConv(8).to(device)
    x = torch.randn(2, 1 + 12, 8, device=device, dtype=dtype, requires_grad=True)
    ours = kernels.depthwise_conv_tokens(x, conv.proj.weight, None, (3, 4), 1, gelu=True)
    ref = F.gelu(torch.cat([x[:, :1], F.conv2d(x[:, 1:].transpose(1, 2).reshape(2, 8, 3, 4), conv.proj.weight,
                                               padding=1, groups=8).flatten(2).transpose(1, 2)], dim=1))
    w = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((ours.float() * w).sum(), [x, conv.proj.weight]),
                    torch.autograd.grad((ref.float() * w).sum(), [x, conv.proj.weight])):
        torch.testing.assert_close(a, b, **tol)
    # a Mix-FFN Mlp hands its GELU to the kernel (or not), and with the merged backward fc1's bias
    # to the mixer for its gradient: fc1 -> convolution -> GELU -> fc2 as before, gradients included
    pos = BlockPos((3, 4), 1)
    for gelu_with_grad in (True, False):
        mlp = Mlp(6, 16, GridConv(16)).to(device)
        mlp.mixer.gelu_with_grad = gelu_with_grad
        assert mlp.mixer.sums_input_bias_grad(x) == bool(kernels.depthwise.BWD_MERGED)
        inp = x[..., :6].detach().requires_grad_()
        ours = mlp(inp, pos)
        w = torch.randn_like(ours)
        got = torch.autograd.grad((ours.float() * w).sum(), [inp, *mlp.parameters()])
        kernels.depthwise.ENABLED, saved = False, kernels.depthwise.ENABLED
        try:
            with torch.autocast(device, enabled=False):
                ref = mlp.fc2(F.gelu(mlp.mixer(mlp.fc1(inp.float()), pos.grid, pos.num_prefix)))
        finally:
            kernels.depthwise.ENABLED = saved
        torch.testing.assert_close(ours.float(), ref, **tol)
        want = torch.autograd.grad((ref * w).sum(), [inp, *mlp.parameters()])
        names = ["input"] + [n for n, _ in mlp.named_parameters()]
        for name, a, b in zip(names, got, want):
            torch.testing.assert_close(a.float(), b.float(), atol=tol["atol"] * 5, rtol=tol["rtol"] * 5,
                                       msg=lambda m: f"Mlp {name}: {m}")
    # the schema, the autograd registration and (on a GPU) the shape-only version agree with the
    # kernels, as torch.compile relies on
    for residual, gelu, save in ((True, False, False), (False, True, False), (False, True, True)):
        for in_bias in (None, torch.randn(8, device=device, requires_grad=True)):
            torch.library.opcheck(torch.ops.vitpe.depthwise_conv_tokens,
                                  (x, conv.proj.weight, conv.proj.bias, 3, 4, 1, residual, gelu, in_bias, save),
                                  test_utils=opcheck_utils(device))


def _compare_gelu(device: str) -> None:
    """The kernels' GELU and its derivative over [-12, 12] against float64's: a kernel with only
    its centre tap, 1, passes the tokens through the convolution unchanged, so the output is the
    GELU of the input (the prefix row's too, written by the same kernel) and the input's gradient of
    its sum the GELU's derivative (the prefix row's from the backward's prefix kernel), from the
    forward's kept derivative or the recomputing backward."""
    from vitpe import kernels

    B, P, H, W, C = 2, 1, 8, 8, 32
    points = GeluPoints((B, P + H * W, C), device)
    weight = torch.zeros(C, 1, 3, 3, device=device)
    weight[:, 0, 1, 1] = 1
    for bias in (torch.zeros(C, device=device), None):  # the derivative kept, and recomputed (no bias)
        points.check(kernels.depthwise_conv_tokens(points.x, weight, bias, (H, W), P, gelu=True),
                     "" if bias is None else ", derivative kept")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels themselves are tested")
# the pipelined kernels without the GELU, the register-carrying one with it; with -m slow also the
# register-carrying kernels throughout. The backward as two kernels, and merged with the GELU's
# derivative kept, with the strips that fit the grid's width (STRIP_FIT, the default) and without;
# the GELU's normal CDF from the polynomial (ERF_POLY, the default) and from libdevice's erf; the
# forward's sums started from the bias (BIAS_FIRST, the default) and the bias added after the taps.
@pytest.mark.parametrize("stages,merged,saved,fit,poly,first", [
    pytest.param(0, 0, 0, 0, 1, 1, marks=pytest.mark.slow), (4, 0, 0, 0, 1, 1),
    pytest.param(4, 0, 1, 0, 1, 1, marks=pytest.mark.slow), (4, 1, 1, 0, 1, 1), (4, 1, 1, 1, 1, 1),
    (4, 1, 1, 1, 0, 1), (4, 1, 1, 1, 1, 0)])
def test_kernels_match_the_convolution_in_the_interpreter(stages, merged, saved, fit, poly, first):
    run_compare_in_interpreter('test_kernels', stages=stages, merged=merged, saved=saved, fit=fit, poly=poly,
                               first=first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stages,merged,saved,fit,poly,first", [
    (0, 0, 0, 0, 1, 1), (4, 0, 0, 0, 1, 1), (4, 0, 1, 0, 1, 1), (4, 1, 0, 0, 1, 1), (4, 1, 1, 0, 1, 1),
    (0, 0, 0, 1, 1, 1), (4, 1, 1, 1, 1, 1), (4, 1, 1, 1, 0, 1), (4, 1, 1, 1, 1, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_the_convolution_on_gpu(dtype, stages, merged, saved, fit, poly, first):
    torch.backends.cudnn.allow_tf32 = False
    compare("cuda", dtype, stages, merged, saved, fit, poly, first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("merged,saved", [(0, 0), (1, 1)])
def test_compiled_mixffn_vit_uses_the_kernel_without_graph_breaks(merged, saved, monkeypatch):
    import timm
    import torch._dynamo as dynamo

    from vitpe.kernels import depthwise

    monkeypatch.setattr(depthwise, "BWD_MERGED", merged)
    monkeypatch.setattr(depthwise, "SAVE_GELU_GRAD", saved)
    model = timm.create_model("vitpe_vit_tiny_patch16_224", pos="mixffn+peg", depth=2, num_classes=3).cuda()
    x = torch.randn(2, 3, 64, 96, device="cuda")
    explained = dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    dynamo.reset()
    loss_c = torch.compile(model)(x).square().mean()
    grads_c = torch.autograd.grad(loss_c, list(model.parameters()))
    loss_e = model(x).square().mean()
    grads_e = torch.autograd.grad(loss_e, list(model.parameters()))
    torch.testing.assert_close(loss_c, loss_e, atol=1e-4, rtol=1e-4)
    for (name, _), a, b in zip(model.named_parameters(), grads_c, grads_e):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_mixffn_mlp_with_the_gelu_in_the_mixer_computes_fc1_conv_gelu_fc2(monkeypatch):
    from vitpe.kernels import depthwise

    torch.manual_seed(0)
    mlp = Mlp(6, 16, GridConv(16), drop=0.0)
    x, pos = torch.randn(2, 1 + 12, 6), BlockPos((3, 4), 1)
    calls = []

    def hook(module, args, out) -> None:
        calls.append(type(module).__name__)

    mlp.act.register_forward_hook(hook)
    mlp.mixer.register_forward_hook(hook)
    hidden = mlp.mixer(mlp.fc1(x), pos.grid, pos.num_prefix)
    calls.clear()
    with torch.no_grad():  # inference: the mixer applies the GELU, the Mlp's own is not called
        out = mlp(x, pos)
    assert calls == ["GridConv"]
    assert torch.equal(out, mlp.fc2(F.gelu(hidden)))
    calls.clear()
    out = mlp(x, pos)  # with gradients too, by default: the kernels keep the GELU's derivative
    assert calls == ["GridConv"] and torch.equal(out, mlp.fc2(F.gelu(hidden)))
    monkeypatch.setattr(depthwise, "SAVE_GELU_GRAD", 0)
    calls.clear()
    out = mlp(x, pos)  # without that, the GELU stays the Mlp's, unless the mixer is told otherwise
    assert calls == ["GridConv", "GELU"] and torch.equal(out, mlp.fc2(F.gelu(hidden)))
    mlp.mixer.gelu_with_grad = True
    calls.clear()
    assert torch.equal(mlp(x, pos), mlp.fc2(F.gelu(hidden))) and calls == ["GridConv"]
    assert list(mlp.state_dict()) == ["fc1.weight", "fc1.bias", "mixer.proj.weight", "mixer.proj.bias", "fc2.weight",
                                      "fc2.bias"]
    mlp.act = torch.nn.GELU(approximate="tanh")  # another activation stays the Mlp's
    mlp.act.register_forward_hook(hook)
    calls.clear()
    assert torch.equal(mlp(x, pos), mlp.fc2(F.gelu(hidden, approximate="tanh")))
    assert calls == ["GridConv", "GELU"]


def test_the_gelu_is_refused_with_the_residual():
    from vitpe import kernels

    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        assert not GridConv(8, residual=True).fuses_gelu and GridConv(8).fuses_gelu
    with pytest.raises(ValueError, match="GELU only without the residual"):
        GridConv(8, residual=True)(x, (2, 2), 0, gelu=True)
    with pytest.raises(ValueError, match="GELU only without the residual"):
        kernels.depthwise_conv_tokens(x, torch.randn(8, 1, 3, 3), None, (2, 2), residual=True, gelu=True)


def test_other_kernel_sizes_keep_the_convolution():
    from vitpe import kernels

    x = torch.randn(1, 4, 8)
    assert not kernels.available(x, 5)
    with pytest.raises(ValueError, match=r"3x3; got a \(5, 5\) weight"):
        kernels.depthwise_conv_tokens(x, torch.randn(8, 1, 5, 5), None, (2, 2))


def test_a_bias_handed_to_the_mixer_gets_the_sum_of_the_inputs_gradient_without_the_kernels():
    """The convolution path (CPU) gives ``input_bias`` the same gradient as the kernels: that of a
    bias added to the input, and leaves the output unchanged."""
    torch.manual_seed(0)
    conv = GridConv(8)
    x = torch.randn(2, 1 + 12, 8, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    out = conv(x, (3, 4), 1, input_bias=bias)
    assert torch.equal(out, conv(x, (3, 4), 1))
    w = torch.randn_like(out)
    grad_x, grad_bias = torch.autograd.grad((out * w).sum(), [x, bias])
    torch.testing.assert_close(grad_bias, grad_x.sum((0, 1)))
    assert not conv.sums_input_bias_grad(x)  # no kernels here: the Mlp keeps fc1 whole
