"""The Mix Transformer: every size and strategy, stage shapes, timm features, and the key-grid extension
of the positional context (rotary keys and relative bias on a reduced grid)."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import vitpe  # noqa: F401  (registers the models)
from vitpe import pos as pos_lib
from vitpe.models.mit import _SIZES, MixTransformer
from vitpe.pos import STRATEGIES, PosContext, PosStrategy
from vitpe.pos.functional import apply_rope, reduced_grid
from vitpe.pos.relative import relative_index, relative_offsets

STRATEGY_SPECS = pos_lib.names() + ["peg+rope_mixed", "learned+rpb", "sincos2d+rope_axial"]
SMALL = dict(embed_dims=(8, 16, 40, 64))  # head width 8 in every stage (heads 1, 2, 5, 8)


def stage_grids(h: int, w: int) -> list[tuple[int, int]]:
    """SegFormer's stage grids: ceil(H/4), then halved (rounded up) three times."""
    grids = [(math.ceil(h / 4), math.ceil(w / 4))]
    for _ in range(3):
        grids.append((math.ceil(grids[-1][0] / 2), math.ceil(grids[-1][1] / 2)))
    return grids


# every strategy on B0 (the sizes differ only in widths and depths); every size with every
# strategy with -m slow
@pytest.mark.parametrize("size", [s if s == "b0" else pytest.param(s, marks=pytest.mark.slow) for s in _SIZES])
def test_every_size_and_strategy_runs_forward_backward(size):
    run_forward_backward(size, STRATEGY_SPECS)


@pytest.mark.parametrize("size", list(_SIZES))
def test_every_size_runs_forward_backward_with_its_default_strategy(size):
    run_forward_backward(size, ["mixffn"])


def run_forward_backward(size: str, specs: list[str]) -> None:
    torch.manual_seed(0)
    for spec in specs:
        m = timm.create_model(f"vitpe_mit_{size}", pos=spec, num_classes=3, img_size=32, **SMALL)
        assert m.stages[0].pos.name == spec and len(m.stages[2].blocks) == _SIZES[size]["depths"][2]
        for hw in [(32, 32), (72, 56)]:  # the native size and one that is no multiple of 32
            m.zero_grad()
            feats = m.forward_intermediates(torch.randn(1, 3, *hw), intermediates_only=True)
            assert [tuple(f.shape[-2:]) for f in feats] == stage_grids(*hw), spec
            loss = m.forward_head(feats[-1]).square().sum()
            loss.backward()
            for name, p in m.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), f"{spec} {hw}: {name}"
                if ".pos." in name and hw != (32, 32):  # at 32x32 stage 4 is one token: nothing to rotate
                    assert p.grad.abs().sum() > 0, f"{spec} {hw}: {name} gets no gradient"


def test_published_widths_and_default_strategy():
    m = timm.create_model("vitpe_mit_b0")
    assert m.embed_dims == [32, 64, 160, 256] and [len(s.blocks) for s in m.stages] == [2, 2, 2, 2]
    assert [s.blocks[0].attn.num_heads for s in m.stages] == [1, 2, 5, 8]
    assert [s.sr_ratio for s in m.stages] == [8, 4, 2, 1]
    assert all(s.pos.name == "mixffn" and s.blocks[0].mlp.mixer is not None for s in m.stages)
    assert m.stages[3].blocks[0].attn.sr is None  # stage 4: no reduction, no sr keys
    b2 = timm.create_model("vitpe_mit_b2", num_classes=0)
    n = sum(p.numel() for p in b2.parameters())
    assert 24.0e6 < n < 25.0e6  # SegFormer's MiT-B2 encoder: 24.2M parameters


def test_features_only_gives_four_stage_maps_at_480x360():
    m = timm.create_model("vitpe_mit_b0", features_only=True, pos="peg")
    assert m.feature_info.channels() == [32, 64, 160, 256]
    assert m.feature_info.reduction() == [4, 8, 16, 32]
    feats = m(torch.randn(1, 3, 360, 480))
    assert [tuple(f.shape[1:]) for f in feats] == [(c, *g) for c, g in zip([32, 64, 160, 256], stage_grids(360, 480))]
    two = timm.create_model("vitpe_mit_b0", features_only=True, out_indices=(1, 3))
    assert [f.shape[1] for f in two(torch.randn(1, 3, 64, 64))] == [64, 256]


def test_forward_intermediates_matches_forward_features():
    m = timm.create_model("vitpe_mit_b0", pos="sincos2d", **SMALL).eval()
    x = torch.randn(1, 3, 70, 50)
    final, feats = m.forward_intermediates(x)
    assert torch.equal(final, m.forward_features(x)) and torch.equal(feats[-1], final)
    nhwc = m.forward_intermediates(x, indices=[0], output_fmt="NHWC", intermediates_only=True)
    assert torch.equal(nhwc[0], feats[0].permute(0, 2, 3, 1))


def test_tiny_inputs_keep_one_key_cell():
    m = timm.create_model("vitpe_mit_b0", pos="rope_mixed", **SMALL)
    feats = m.forward_intermediates(torch.randn(1, 3, 20, 9), intermediates_only=True)  # stage 1: 5x3 < 8
    assert [tuple(f.shape[-2:]) for f in feats] == stage_grids(20, 9)


def test_learned_tables_are_per_stage_native_grid():
    m = MixTransformer(img_size=(64, 96), pos="learned", **SMALL)
    assert [s.pos.native_grid for s in m.stages] == stage_grids(64, 96)
    assert m.stages[1].pos.pos_embed.shape == (1, 8 * 12, 16)
    assert "stages.0.pos.pos_embed" in m.no_weight_decay()


def test_strategy_without_key_grid_support_raises_naming_it(monkeypatch):
    class QueryGridOnly(PosStrategy):
        name = "query_grid_only"

        def context(self, grid, num_prefix):  # an attention-side strategy that ignores reduced keys
            return PosContext(grid, num_prefix)

    monkeypatch.setitem(STRATEGIES._items, "query_grid_only", QueryGridOnly)
    with pytest.raises(ValueError, match="'query_grid_only' cannot be used in the Mix Transformer"):
        MixTransformer(pos="query_grid_only", **SMALL)
    with pytest.raises(ValueError, match="'query_grid_only'"):
        MixTransformer(pos="peg+query_grid_only", **SMALL)


# -- the key-grid extension of the positional context -----------------------------------------
@pytest.mark.parametrize("name", ["rope_axial", "rope_mixed"])
def test_reduced_key_rope_depends_only_on_offset(name):
    """With keys at reduced-cell centres, q.k is unchanged when a query moves by one stride and its
    key by one reduced cell (the same offset in query-grid units)."""
    s, grid = 2, (8, 6)
    strat = pos_lib.build(name, dim=16, num_heads=2, depth=1, grid=grid)
    bp = strat.context(grid, 0, kv_stride=s).block(0)
    kv = reduced_grid(grid, s)
    assert bp.rope_k[0].shape[-2] == kv[0] * kv[1]
    q, k = torch.randn(2, 8), torch.randn(2, 8)
    qs = apply_rope(q[:, None].expand(2, 48, 8), *bp.rope)  # the same q at every query position
    ks = apply_rope(k[:, None].expand(2, 12, 8), *bp.rope_k)
    score = torch.einsum("hqd,hkd->hqk", qs, ks)
    qi = lambda r, c: r * grid[1] + c  # noqa: E731
    ki = lambda r, c: r * kv[1] + c  # noqa: E731
    assert torch.allclose(score[:, qi(1, 2), ki(0, 1)], score[:, qi(1 + s, 2 + s), ki(1, 2)], atol=1e-5)
    assert torch.allclose(score[:, qi(3, 0), ki(2, 0)], score[:, qi(5, 2), ki(3, 1)], atol=1e-5)
    assert not torch.allclose(score[:, qi(1, 2), ki(0, 1)], score[:, qi(1, 2), ki(1, 1)], atol=1e-3)


def test_rope_without_kv_stride_gives_a_clear_error_in_attention():
    from vitpe.layers.sr_attention import SRAttention
    strat = pos_lib.build("rope_axial", dim=16, num_heads=2, depth=1, grid=(8, 8))
    attn = SRAttention(16, 2, sr_ratio=2)
    with pytest.raises(ValueError, match="kv_stride"):
        attn(torch.randn(1, 64, 16), strat.context((8, 8), 0).block(0))


def test_relative_bias_sampled_at_unit_stride_equals_the_table_lookup():
    grid = (5, 7)
    table = torch.randn(3, 2 * grid[0] - 1, 2 * grid[1] - 1)
    looked_up = table.flatten(1)[:, relative_index(grid)]
    sampled = F.grid_sample(table[None], relative_offsets(grid, 1), align_corners=True)[0]
    assert torch.allclose(looked_up, sampled, atol=1e-5)


def test_relative_bias_on_reduced_keys_reads_the_offset_of_cell_centres():
    s, grid = 3, (9, 7)  # odd stride: centres j*3+1 are whole cells, so entries are read exactly
    strat = pos_lib.build("rpb", dim=8, num_heads=2, depth=1, grid=grid)
    bias = strat.context(grid, 0, kv_stride=s).block(0).bias
    kv = reduced_grid(grid, s)
    assert bias.shape == (2, grid[0] * grid[1], kv[0] * kv[1])
    table = strat.tables[0]  # (heads, 2H-1, 2W-1), offset 0 at (H-1, W-1)
    for (qr, qc), (kr, kc) in [((0, 0), (0, 0)), ((8, 6), (1, 0)), ((4, 2), (2, 1))]:
        dr, dc = qr - (kr * s + 1), qc - (kc * s + 1)
        expected = table[:, dr + grid[0] - 1, dc + grid[1] - 1]
        assert torch.allclose(bias[:, qr * grid[1] + qc, kr * kv[1] + kc], expected, atol=1e-6)
