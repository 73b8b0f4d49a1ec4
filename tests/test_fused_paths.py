"""The paths a compiled model takes instead of the eager kernels give the eager results: Mix-FFN and
PEG's depthwise convolution as shifted products, and (on a GPU) a batch-shared attention bias
through FlexAttention."""
import pytest
import timm
import torch
import torch._dynamo as dynamo

import vitpe  # noqa: F401
from vitpe.layers import attention
from vitpe.pos.functional import GridConv, depthwise_conv_tokens

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_shifted_products_equal_the_depthwise_convolution(kernel_size):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 6, kernel_size, padding=kernel_size // 2, groups=6)
    x = torch.randn(2, 4, 7, 6)  # (B, H, W, C): a 4x7 grid, odd sizes catch a swapped axis
    expected = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(depthwise_conv_tokens(x, conv.weight, conv.bias), expected)


@pytest.mark.parametrize("num_prefix,residual", [(0, False), (1, True), (2, False)])
def test_grid_conv_token_path_matches_its_convolution_with_gradients(num_prefix, residual):
    torch.manual_seed(0)
    conv = GridConv(8, residual=residual)
    x = torch.randn(2, num_prefix + 3 * 5, 8, requires_grad=True)
    params = [x, conv.proj.weight, conv.proj.bias]
    a, b = conv(x, (3, 5), num_prefix), conv.forward_tokens(x, (3, 5), num_prefix)
    torch.testing.assert_close(b, a)
    w = torch.randn_like(a)  # a generic upstream gradient
    for ga, gb in zip(torch.autograd.grad((a * w).sum(), params), torch.autograd.grad((b * w).sum(), params)):
        torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4)


def _loss_and_grads(model, x):
    loss = model(x).square().mean()
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return loss, grads


def _compiled_matches_eager(pos, device, backend, atol):
    torch.manual_seed(0)
    model = timm.create_model("vitpe_vit_tiny_patch16_224", pos=pos, depth=2, num_classes=5).to(device)
    x = torch.randn(2, 3, 64, 96, device=device)
    dynamo.reset()
    loss_c, grads_c = _loss_and_grads(torch.compile(model, backend=backend), x)
    loss_e, grads_e = _loss_and_grads(model, x)
    torch.testing.assert_close(loss_c, loss_e, atol=atol, rtol=1e-4)
    for name, gc, ge in zip([n for n, p in model.named_parameters() if p.requires_grad], grads_c, grads_e):
        torch.testing.assert_close(gc, ge, atol=atol, rtol=1e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("pos", ["mixffn", "peg", "rpb"])
def test_compiled_model_matches_eager_on_cpu(pos):
    _compiled_matches_eager(pos, "cpu", "aot_eager", 1e-5)


@cuda
@pytest.mark.parametrize("pos", ["rpb", "mixffn", "rpb+rope_mixed"])
def test_compiled_model_matches_eager_on_gpu(pos):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _compiled_matches_eager(pos, "cuda", "inductor", 1e-4)


@cuda
@pytest.mark.parametrize("keys", [197, 49])
def test_flex_bias_matches_sdpa_with_the_bias_gradient(keys):
    torch.manual_seed(0)
    q = torch.randn(4, 3, 197, 64, device="cuda", requires_grad=True)
    k, v = (torch.randn(4, 3, keys, 64, device="cuda", requires_grad=True) for _ in range(2))
    bias = torch.randn(3, 197, keys, device="cuda", requires_grad=True)
    inputs = [q, k, v, bias]
    dynamo.reset()
    out_f = torch.compile(attention.flex_with_bias)(q, k, v, bias)
    out_s = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out_f, out_s, atol=2e-4, rtol=1e-3)
    w = torch.randn_like(out_s)
    for gf, gs in zip(torch.autograd.grad((out_f * w).sum(), inputs), torch.autograd.grad((out_s * w).sum(), inputs)):
        torch.testing.assert_close(gf, gs, atol=1e-3, rtol=1e-3)
