"""vitpe's rotary kernel gives what ``apply_rope`` gives on the projection's q and k: the rotated
q, k and v, the projection's gradient and the tables' gradient (learned frequencies of
``rope_mixed``), for per-head and shared tables, prefix tokens, head widths whose half is not a
power of two and batches the backward's programs share unevenly. On CPU the kernels run in
Triton's interpreter (a subprocess, since the interpreter is chosen when the kernels are defined)."""
import pytest
import torch
from triton_interpreter import opcheck_utils, run_compare_in_interpreter

triton = pytest.importorskip("triton")


def compare(device: str, dtype: torch.dtype = torch.float32) -> None:
    from vitpe.kernels import rope
    from vitpe.pos import build
    from vitpe.pos.functional import apply_rope

    torch.manual_seed(0)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    # (strategy, B, grid, prefix, heads, D); 13 images leave the backward's last share of the batch short
    for name, B, grid, prefix, H, D in [("rope_mixed", 13, (5, 7), 1, 3, 16), ("rope_axial", 2, (4, 4), 0, 2, 24),
                                        ("rope_mixed", 3, (6, 5), 4, 2, 24)]:
        strategy = build(name, dim=H * D, num_heads=H, depth=2, grid=grid, num_prefix=prefix).to(device)
        cos, sin = strategy.context(grid, prefix).block(1).rope
        T = prefix + grid[0] * grid[1]
        # strided as the attention layer makes it: a view of a (B, T, 3 * heads * D) projection
        proj = torch.randn(B, T, 3 * H * D, device=device, dtype=dtype, requires_grad=True)
        qkv = proj.reshape(B, T, 3, H, D)
        got = rope.rope_qkv(qkv, cos, sin)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        want = (apply_rope(q.float(), cos, sin), apply_rope(k.float(), cos, sin), v.float())
        with torch.no_grad():  # q and k alone from the kernel, v a view of the projection
            inferred = rope.rope_qkv(qkv, cos, sin)
        assert inferred[2].untyped_storage().data_ptr() == proj.untyped_storage().data_ptr()
        for what, a, b in zip("qkvqkv", got + inferred, want + want):
            assert a.shape == b.shape and a.dtype == dtype
            torch.testing.assert_close(a.float(), b, **tol, msg=lambda m: f"{name} {what}: {m}")
        grads = [torch.randn_like(t) for t in want]
        params = [proj] + [p for p in strategy.parameters()]
        got_g = torch.autograd.grad(sum((a.float() * g).sum() for a, g in zip(got, grads)), params,
                                    retain_graph=True)  # the tables are shared by both sides
        want_g = torch.autograd.grad(sum((b * g).sum() for b, g in zip(want, grads)), params)
        assert len(params) == (2 if name == "rope_mixed" else 1)  # the mixed frequencies learn
        for a, b in zip(got_g, want_g):
            scale = b.abs().max().item()  # summed over the batch: compare relative
            torch.testing.assert_close(a.float() / scale, b.float() / scale, **tol, msg=lambda m: f"{name}: {m}")
    qkv = torch.randn(2, 5, 3, 2, 8, device=device, dtype=dtype, requires_grad=True)
    cos, sin = torch.randn(2, 2, 5, 8, device=device, requires_grad=True).unbind(0)
    torch.library.opcheck(torch.ops.vitpe.rope_qkv, (qkv, cos, sin),
                          test_utils=opcheck_utils(device))
    torch.library.opcheck(torch.ops.vitpe.rope_qk, (qkv.detach(), cos.detach(), sin.detach()),
                          test_utils=opcheck_utils(device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels themselves are tested")
def test_rope_kernel_matches_apply_rope_in_the_interpreter():
    run_compare_in_interpreter("test_rope_kernel")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_matches_apply_rope_on_the_gpu(dtype):
    compare("cuda", dtype)


def test_attention_keeps_torch_rotation_where_the_kernel_does_not_apply():
    from vitpe.kernels import rope

    qkv = torch.randn(1, 4, 3, 2, 8)
    cos = torch.ones(1, 4, 8)
    assert not rope.available(qkv, cos)  # a CPU tensor outside the interpreter
    assert not rope.available(qkv.cuda() if torch.cuda.is_available() else qkv, torch.ones(1, 5, 8))  # wrong length


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_rope_vit_uses_the_kernel_and_matches_eager():
    import timm
    import torch._dynamo as dynamo

    from vitpe.kernels import rope

    torch.manual_seed(0)
    model = timm.create_model("vitpe_vit_tiny_patch16_224", pos="rope_mixed", depth=2, num_classes=3).cuda()
    x = torch.randn(2, 3, 64, 96, device="cuda")
    explained = dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert "vitpe.rope_qkv" in str(explained.graphs[0].code)
    dynamo.reset()
    freqs = model.pos.freqs
    compiled = torch.compile(model)
    compiled(x).square().sum().backward()
    got = freqs.grad.clone()
    freqs.grad = None
    rope.ENABLED = False  # torch's rotation, eager
    try:
        model(x).square().sum().backward()
    finally:
        rope.ENABLED = True
    scale = freqs.grad.abs().max()
    assert scale > 0
    # the kernel's own error is tested above; compiled and eager models differ in float32 by more
    # (fused layer norms, attention), summed over the batch
    torch.testing.assert_close(got / scale, freqs.grad / scale, atol=2e-3, rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_rope_vit_inference_rotates_q_and_k_alone():
    import timm
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    model = timm.create_model("vitpe_vit_tiny_patch16_224", pos="rope_axial", depth=2, num_classes=3).cuda().eval()
    x = torch.randn(2, 3, 64, 96, device="cuda")
    with torch.no_grad():
        explained = dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        code = str(explained.graphs[0].code)
        assert "vitpe.rope_qk" in code and "vitpe.rope_qkv" not in code
        dynamo.reset()
        got = torch.compile(model)(x)
        want = model(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
