"""vitpe's fused attention with a batch-shared bias (``rpb``) gives the results of plain softmax
attention: output and the gradients of queries, keys, values and bias, for strided inputs (as the
attention layer makes them), key counts other than the query count and sizes that leave blocks
partly empty. On CPU the kernels run in Triton's interpreter (a subprocess, since the interpreter
is chosen when the kernels are defined)."""
import math

import pytest
import torch
from triton_interpreter import opcheck_utils, run_compare_in_interpreter

triton = pytest.importorskip("triton")


def reference(q, k, v, bias):
    logits = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias.float()
    return logits.softmax(-1) @ v.float()


class _NanFilledEmpty:
    """``torch`` for the kernel module, with ``empty`` and ``empty_like`` filled with NaN: a kernel
    that reads an element of its buffers (log-sum-exp, delta, dS and their padding) that no kernel
    wrote makes the results NaN instead of passing by luck on zeroed memory."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    @staticmethod
    def empty_like(*args, **kwargs):
        return torch.empty_like(*args, **kwargs).fill_(float("nan"))


def compare(device: str, dtype: torch.dtype = torch.float32) -> None:
    """float32 on CPU (the interpreter); half precision on the GPU, where float32 stays with torch."""
    from unittest import mock

    from vitpe.kernels import attention

    with mock.patch.object(attention, "torch", _NanFilledEmpty()):
        compare_cases(device, dtype)


def compare_cases(device: str, dtype: torch.dtype) -> None:
    from vitpe.kernels import attention

    torch.manual_seed(0)
    tol = dict(atol=2e-5, rtol=1e-4) if device == "cpu" else dict(atol=3e-2, rtol=3e-2)
    # (9, 2, ...): programs sum several images of the bias gradient, the last fewer; (2, 1, 32, 48):
    # the bias's rows and columns need no padding (multiples of 16); the last case has more keys
    # than the query gradient's one-tile kernel takes
    for B, H, T, S, D in [(2, 3, 37, 37, 16), (1, 2, 70, 20, 32), (2, 1, 5, 9, 16), (1, 2, 130, 130, 64),
                          (9, 2, 20, 20, 16), (2, 1, 32, 48, 16), (3, 2, 17, 300, 16), (1, 1, 9, 530, 16)]:
        qkv = torch.randn(B, T, 3, H, D, device=device, dtype=dtype).permute(2, 0, 3, 1, 4)  # strided, as Attention
        q = qkv[0].detach().requires_grad_()
        k = torch.randn(B, S, H, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
        v = torch.randn(B, H, S, D, device=device, dtype=dtype, requires_grad=True)
        bias = torch.randn(H, T, S, device=device, requires_grad=True)  # float32, as the strategy's tables
        out = attention.attention_with_bias(q, k, v, bias)
        ref = reference(q, k, v, bias)
        torch.testing.assert_close(out.float(), ref, **tol)
        g = torch.randn_like(ref)
        got = torch.autograd.grad((out.float() * g).sum(), (q, k, v, bias))
        want = torch.autograd.grad((ref * g).sum(), (q, k, v, bias))
        for name, a, b in zip("qkvb", got, want):
            scale = b.abs().max().item()  # gradients summed over the batch grow with it: compare relative
            torch.testing.assert_close(a.float() / scale, b.float() / scale, **tol,
                                       msg=lambda m: f"{(B, H, T, S, D)} d{name}: {m}")
    q = torch.randn(1, 20, 2, 16, device=device, dtype=dtype).transpose(1, 2).requires_grad_()  # strided
    kv = torch.randn(1, 2, 20, 16, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(2, 20, 20, device=device, requires_grad=True)
    # the schema, the autograd registration and (on a GPU) the shape-only version agree with the kernels
    torch.library.opcheck(torch.ops.vitpe.attention_bias, (q, kv, kv, bias),
                          test_utils=opcheck_utils(device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels themselves are tested")
def test_bias_attention_matches_softmax_attention_in_the_interpreter():
    run_compare_in_interpreter('test_attention_kernel')


def test_attend_keeps_torch_attention_where_the_kernel_does_not_apply():
    from vitpe.kernels import attention

    q = torch.randn(1, 2, 4, 16)
    bias = torch.zeros(2, 4, 4)
    assert not attention.available(q, bias)  # a CPU tensor outside the interpreter
    if torch.cuda.is_available():
        qc, bc = q.cuda(), bias.cuda()
        assert not attention.available(qc, bc)  # float32: torch's exact kernels
        qc = qc.bfloat16()
        assert attention.available(qc, bc)
        assert not attention.available(qc, bc, dropout_p=0.1)  # no dropout in the kernel
        assert not attention.available(qc, bc[None])  # a per-image bias
        assert not attention.available(torch.randn(1, 2, 4, 24, device="cuda").bfloat16(), bc)  # head width 24


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_attention_matches_softmax_attention_on_gpu(dtype):
    compare("cuda", dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_rpb_vit_uses_the_kernel_without_graph_breaks():
    import timm
    import torch._dynamo as dynamo

    model = timm.create_model("vitpe_vit_tiny_patch16_224", pos="rpb", depth=2, num_classes=3).cuda()
    x = torch.randn(2, 3, 64, 96, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):  # half precision: the kernel's case
        explained = dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert "vitpe.attention_bias" in str(explained.graphs[0].code)
    dynamo.reset()
    compiled = torch.compile(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        compiled(x).float().sum().backward()
    assert model.pos.tables.grad is not None and model.pos.tables.grad.abs().sum() > 0
