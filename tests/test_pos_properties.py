"""Closed forms and invariances of the individual strategies, checked on the strategy objects."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vitpe
from vitpe.pos.functional import apply_rope, resample_table, sincos_2d, to_map


def build(spec, grid=(4, 4), dim=32, heads=2, depth=2, num_prefix=1, **kw):
    return vitpe.pos.build(spec, dim=dim, num_heads=heads, depth=depth, grid=grid, num_prefix=num_prefix, **kw)


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), dim=st.sampled_from([8, 16, 64]), data=st.data())
def test_sincos2d_matches_closed_form(h, w, dim, data):
    table = sincos_2d((h, w), dim)
    r, c = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    k = data.draw(st.integers(0, dim // 4 - 1))
    omega = 10000.0 ** (-k / (dim // 4))
    row = table[r * w + c]
    q = dim // 4
    assert math.isclose(row[k], math.sin(c * omega), abs_tol=1e-5)       # columns: first half (MAE)
    assert math.isclose(row[q + k], math.cos(c * omega), abs_tol=1e-5)
    assert math.isclose(row[2 * q + k], math.sin(r * omega), abs_tol=1e-5)  # rows: second half
    assert math.isclose(row[3 * q + k], math.cos(r * omega), abs_tol=1e-5)


def test_sincos2d_embed_leaves_prefix_alone_and_follows_grid():
    s = build("sincos2d")
    x = torch.zeros(1, 1 + 3 * 5, 32)
    out = s.embed(x, (3, 5), 1)
    assert out[0, 0].abs().max() == 0
    torch.testing.assert_close(out[0, 1:], sincos_2d((3, 5), 32))


def test_sincos2d_native_table_is_a_buffer_not_saved_and_not_recomputed_in_the_compiled_graph():
    """At the native grid the graph reads the table (inductor would otherwise fuse its sines into
    the addition, once per image); at another grid the table still follows the grid."""
    import torch._dynamo as dynamo

    s = build("sincos2d", grid=(3, 5))
    assert "native_table" not in s.state_dict()
    x = torch.zeros(2, 1 + 3 * 5, 32)
    dynamo.reset()
    explained = dynamo.explain(lambda t: s.embed(t, (3, 5), 1))(x)
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]
    assert not [op for op in ops if "sin" in op or "cos" in op], ops
    torch.testing.assert_close(torch.compile(lambda t: s.embed(t, (3, 5), 1), backend="eager")(x)[0, 1:],
                               sincos_2d((3, 5), 32))
    torch.testing.assert_close(s.embed(torch.zeros(1, 1 + 4 * 2, 32), (4, 2), 1)[0, 1:], sincos_2d((4, 2), 32))
    dynamo.reset()


def rope_scores(spec, grid, num_prefix=1):
    """q.k for the same q and k vectors placed at every pair of positions: (heads, T, T) per block."""
    s = build(spec, grid=grid, num_prefix=num_prefix)
    ctx = s.context(grid, num_prefix)
    T = num_prefix + grid[0] * grid[1]
    q = torch.randn(1, 2, 1, 16).expand(1, 2, T, 16)
    k = torch.randn(1, 2, 1, 16).expand(1, 2, T, 16)
    out = []
    for i in range(2):
        cos, sin = ctx.block(i).rope
        out.append((apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2))[0])
    return out, q[0, :, 0], k[0, :, 0]


def test_rope_scores_depend_only_on_offset():
    grid = (5, 6)
    for spec in ("rope_axial", "rope_mixed"):
        scores, q, k = rope_scores(spec, grid)
        for s in scores:
            patch = s[:, 1:, 1:]  # (heads, N, N)
            rows = torch.arange(30) // 6
            cols = torch.arange(30) % 6
            by_offset = {}
            for m in range(30):
                for n in range(30):
                    key = (int(rows[m] - rows[n]), int(cols[m] - cols[n]))
                    by_offset.setdefault(key, []).append(patch[:, m, n])
            for key, vals in by_offset.items():
                vals = torch.stack(vals)
                torch.testing.assert_close(vals, vals[:1].expand_as(vals), atol=1e-4, rtol=1e-4,
                                           msg=f"{spec}: scores differ at offset {key}")
            assert len({round(float(v[0, 0].detach()), 4) for v in map(torch.stack, by_offset.values())}) > 10, spec
            # the prefix token is not rotated: its score is the plain dot product
            torch.testing.assert_close(s[:, 0, 0], (q * k).sum(-1), atol=1e-5, rtol=1e-5)


def test_rope_mixed_frequencies_differ_per_block_and_head():
    s = build("rope_mixed")
    fx = s.freqs[0]
    assert fx.shape == (2, 2, 8)
    assert not torch.allclose(fx[0], fx[1]) and not torch.allclose(fx[0, 0], fx[0, 1])


@settings(max_examples=10, deadline=None)
@given(h=st.integers(5, 9), w=st.integers(5, 9),
       shift=st.sampled_from([(0, 1), (1, 0), (1, 1), (-1, 0), (0, -1), (-1, 1)]))
def test_peg_is_translation_equivariant_away_from_borders(h, w, shift):
    dy, dx = shift
    s = build("peg", grid=(h, w), num_prefix=1)
    x = torch.randn(1, 1 + h * w, 32)
    _, m = to_map(x, (h, w), 1)
    shifted = torch.roll(m, shifts=(dy, dx), dims=(2, 3))
    x_shift = torch.cat([x[:, :1], shifted.flatten(2).transpose(1, 2)], dim=1)
    with torch.no_grad():
        out = s.after_block(x, 0, (h, w), 1)
        out_shift = s.after_block(x_shift, 0, (h, w), 1)
    _, om = to_map(out, (h, w), 1)
    _, oms = to_map(out_shift, (h, w), 1)
    expected = torch.roll(om, shifts=(dy, dx), dims=(2, 3))
    # away from the borders (2 cells: 1 for the kernel radius, 1 for the roll's wrap-around)
    torch.testing.assert_close(oms[..., 2:-2, 2:-2], expected[..., 2:-2, 2:-2])
    torch.testing.assert_close(out_shift[:, 0], x[:, 0])  # the class token passes through
    assert not torch.allclose(oms, expected)  # at the borders it is not: zero padding marks them


def test_learned_resampling_to_same_grid_is_identity():
    s = build("learned", grid=(3, 7))
    table = s.pos_embed[:, 1:].detach().clone()
    assert torch.equal(resample_table(table, (3, 7), (3, 7)), table)
    # and the interpolation itself, at scale 1, reproduces the table (the shortcut is not hiding a shift)
    from vitpe.pos.functional import resample_map
    maps = table.reshape(1, 3, 7, 32).permute(0, 3, 1, 2)
    import torch.nn.functional as F
    same = F.interpolate(maps, size=(3, 7), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(same, maps, atol=1e-6, rtol=0)
    assert resample_map(maps, (3, 7)) is maps
    torch.testing.assert_close(s.resampled((3, 7)), s.pos_embed)
    other = build("learned", grid=(3, 7))
    other.load_state_dict(s.state_dict())
    assert torch.equal(other.pos_embed, s.pos_embed)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("src,dst", [((5, 4), (3, 1)), ((6, 1), (9, 1)), ((32, 1), (13, 1)), ((1, 1), (4, 1))])
def test_resampling_to_one_column_matches_resampling_one_axis_at_a_time(mode, src, dst):
    """Antialiased resampling is separable: rows first, then columns, gives the same map. (torch's
    own kernels return every row equal to the first when the output is one column wide.)"""
    import torch.nn.functional as F

    from vitpe.pos.functional import resample_map

    torch.manual_seed(0)
    maps = torch.randn(2, 3, *src)
    wide = maps.expand(2, 3, src[0], max(src[1], 2))  # one column repeated: still the same map, row by row
    rows_first = F.interpolate(wide, size=(dst[0], wide.shape[-1]), mode=mode, align_corners=False, antialias=True)
    want = F.interpolate(rows_first.transpose(-1, -2), size=(dst[1], dst[0]), mode=mode, align_corners=False,
                         antialias=True).transpose(-1, -2)  # then the columns, as an output one row high
    got = resample_map(maps, dst, mode)
    assert got.shape == (2, 3, *dst) and got.is_contiguous()
    torch.testing.assert_close(got, want)
    if dst[0] > 1 and src[0] > 1:
        assert got[..., 0].std(-1).min() > 0  # the rows differ


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("src,dst", [((27, 27), (7, 11)), ((14, 14), (24, 24)), ((5, 4), (13, 2)), ((1, 5), (3, 3)),
                                     ((13, 29), (29, 13))])
def test_resampling_gives_torchs_antialiased_interpolation(mode, src, dst):
    """``resample_map``'s per-axis weights reproduce ``F.interpolate(..., antialias=True)``,
    shrinking and growing, and the gradient is that of the same linear map."""
    import torch.nn.functional as F

    from vitpe.pos.functional import resample_map

    torch.manual_seed(0)
    maps = torch.randn(2, 3, *src, requires_grad=True)
    got = resample_map(maps, dst, mode)
    want = F.interpolate(maps, size=dst, mode=mode, align_corners=False, antialias=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, maps, g)[0], torch.autograd.grad(want, maps, g)[0],
                               atol=1e-5, rtol=1e-5)


def test_detr_learned_encoding_follows_rows_and_columns_at_any_size():
    """DETR's ``learned`` tables resampled to an image's own rows: a table rising with the row
    index still rises after resampling (it came out constant before the one-column fix)."""
    from vitpe.pos.detr import _resample

    table = torch.arange(8.0)[:, None].expand(8, 4)
    out = _resample(table, torch.tensor([5, 8, 13]), 15)[..., 0]  # (3, 15)
    for row, length in zip(out, (5, 8, 13)):
        assert torch.all(row[1:length] > row[: length - 1]) and torch.all(row[length:] == 0)
    torch.testing.assert_close(out[1, :8], table[:, 0])  # the native length is the table itself


def test_detr_learned_encoding_resamples_each_image_as_resample_map_does():
    """Per image, the table resampled (``resample_map``) to its unpadded rows and columns, zeros on
    padding; computed for the whole batch on the device, with no host sync and no graph break."""
    import torch._dynamo as dynamo

    from vitpe.pos.detr import build_detr_pos
    from vitpe.pos.functional import resample_map

    s = build_detr_pos("learned", dim=16, num_heads=2, depth=1, grid=(6, 6))
    s.row_embed.data.normal_(), s.col_embed.data.normal_()
    H, W = 14, 11
    sizes = [(14, 11), (3, 9), (6, 6), (1, 2), (10, 1)]
    mask = torch.ones(len(sizes), H, W, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        mask[i, :h, :w] = False
    got = s.qk_embed(mask).reshape(len(sizes), H, W, 16)
    for i, (h, w) in enumerate(sizes):
        rows = resample_map(s.row_embed.detach().t()[None, :, :, None], (h, 1))[0, :, :, 0].t()  # (h, 8)
        cols = resample_map(s.col_embed.detach().t()[None, :, :, None], (w, 1))[0, :, :, 0].t()  # (w, 8)
        want = torch.zeros(H, W, 16)
        want[:h, :w, :8], want[:h, :w, 8:] = rows[:, None], cols[None, :]
        torch.testing.assert_close(got[i], want, atol=2e-5, rtol=1e-4)
    explained = dynamo.explain(s.qk_embed)(mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    dynamo.reset()


def test_learned_resampling_keeps_prefix_and_is_smooth():
    s = build("learned", grid=(4, 4))
    with torch.no_grad():  # a table that is linear in the row index resamples to one linear in the row
        rows = torch.arange(4.0).repeat_interleave(4)
        s.pos_embed[0, 1:] = rows[:, None].expand(16, 32)
    big = s.resampled((8, 8))
    assert big.shape == (1, 65, 32)
    torch.testing.assert_close(big[:, :1], s.pos_embed[:, :1])
    col = big[0, 1:, 0].reshape(8, 8)[:, 3]
    assert torch.all(col[1:] >= col[:-1] - 1e-6)  # monotone in the row
    assert torch.allclose(big[0, 1:, 0].reshape(8, 8), big[0, 1:, 0].reshape(8, 8)[:, :1].expand(8, 8), atol=1e-5)


def test_learned_checkpoint_with_same_token_count_other_shape_is_resampled():
    """2x8 -> 4x4: same number of tokens, so only the stored grid can tell them apart."""
    src = build("learned", grid=(2, 8))
    dst = build("learned", grid=(4, 4))
    dst.load_state_dict(src.state_dict())
    expected = resample_table(src.pos_embed[:, 1:], (2, 8), (4, 4))
    torch.testing.assert_close(dst.pos_embed[:, 1:], expected)
    torch.testing.assert_close(dst.pos_embed[:, :1], src.pos_embed[:, :1])
    assert not torch.allclose(dst.pos_embed[:, 1:], src.pos_embed[:, 1:])
    assert tuple(dst.grid.tolist()) == (4, 4)


def test_rpb_bias_is_a_function_of_offset_and_resizes():
    s = build("rpb", grid=(3, 4), num_prefix=1)
    bias = s.context((3, 4), 1).block(1).bias  # (heads, T, T)
    assert bias.shape == (2, 13, 13)
    assert bias[:, 0].abs().max() == 0 and bias[:, :, 0].abs().max() == 0
    # patches (0,0)->(1,1) and (1,2)->(2,3) share the offset
    torch.testing.assert_close(bias[:, 1 + 0, 1 + 5], bias[:, 1 + 6, 1 + 11])
    assert torch.equal(bias[:, 1 + 0, 1 + 5], s.tables[1, :, 2 - 1, 3 - 1])
    big = s.context((6, 8), 1).block(0).bias
    assert big.shape == (2, 49, 49) and torch.isfinite(big).all()
    other = build("rpb", grid=(6, 8), num_prefix=1)
    other.load_state_dict(s.state_dict())
    torch.testing.assert_close(other.context((6, 8), 1).block(0).bias, big)


def test_context_cache_returns_same_tables_when_grid_unchanged():
    s = build("rope_axial").eval()
    a = s.context((5, 5), 1).rope[0]
    b = s.context((5, 5), 1).rope[0]
    assert a is b
    assert s.context((6, 5), 1).rope[0].shape[-2] == 31


@pytest.mark.parametrize("pos", ["learned", "rope_mixed", "rpb"])
def test_cached_tables_follow_the_parameters_and_a_data_edit_is_cleared_by_hand(pos):
    """Forwards without gradients reuse the tables: an update autograd sees (as timm's EMA makes
    through the state dict) refreshes them; one through ``.data`` does not until the cache is cleared."""
    import timm

    model = timm.create_model("vitpe_vit_tiny_patch4_32", pos=pos, depth=2, num_classes=3).eval()
    x = torch.randn(1, 3, 48, 40)  # another grid than the native 8x8: learned and rpb resample

    def out():
        with torch.no_grad():
            return model(x)

    def fresh():
        other = timm.create_model("vitpe_vit_tiny_patch4_32", pos=pos, depth=2, num_classes=3).eval()
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            return other(x)

    before = out()
    with torch.no_grad():
        for v in model.pos.state_dict().values():  # as ModelEmaV3 updates the EMA copy
            if v.is_floating_point():
                v.mul_(1.5)
    torch.testing.assert_close(out(), fresh())
    assert not torch.allclose(out(), before)
    table = next(t for t in model.pos.parameters())
    table.data.mul_(2.0)  # invisible to version counters
    model.clear_pos_cache()
    torch.testing.assert_close(out(), fresh())


def test_rpb_checkpoint_without_grid_entry_infers_it_from_the_table():
    src = build("rpb", grid=(3, 5))
    sd = {k: v for k, v in src.state_dict().items() if k != "grid"}
    dst = build("rpb", grid=(6, 6))
    dst.load_state_dict(sd)
    from vitpe.pos.functional import resample_map

    torch.testing.assert_close(dst.tables, resample_map(src.tables, (11, 11)))


@pytest.mark.parametrize("spec", ["rope_axial", "sincos2d"])
def test_fixed_tables_stay_float32_exact_when_the_model_is_cast(spec):
    """A model cast to bf16 and back (or cast after a forward filled the cache) computes the same
    fixed tables as a fresh one: a cast must not round the fixed frequencies or the native table."""
    def tables(s, grids=((14, 14), (10, 17), (32, 32))):
        if spec == "rope_axial":
            return [s.context(g, 1).rope[0] for g in grids]
        return [s.table(g, 1, torch.device("cpu")) for g in grids]

    fresh = tables(build(spec, grid=(14, 14), dim=256, heads=4).eval())
    s = build(spec, grid=(14, 14), dim=256, heads=4).eval()
    tables(s, [(10, 17)])  # cached before the cast
    s.bfloat16()
    assert all(t.dtype == torch.float32 for t in tables(s))
    s.float()
    for a, b in zip(tables(s), fresh):
        assert torch.equal(a, b)
