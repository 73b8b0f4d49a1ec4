"""Parity of the strategies with their papers' reference implementations on non-square grids,
grids other than the built one, prefix tokens and checkpoints made at another resolution.

References: timm's ``resample_abs_pos_embed`` (the learned table: bicubic with antialiasing, prefix
rows apart), timm's ``gen_relative_position_index`` (Swin and BEiT's offset indexing) and
``resize_rel_pos_bias_table`` (BEiT's geometric resizing of the offset table), timm's Twins
``PosConv`` (CPVT's PEG), and DETR's ``PositionEmbeddingSine(normalize=True)``, whose formula is
written out below. The rotary strategies are compared with timm's RoPE ViTs in ``test_rope_parity``.
"""
from __future__ import annotations

import math

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from timm.layers.pos_embed_rel import gen_relative_position_index, resize_rel_pos_bias_table
from timm.models.twins import PosConv

import vitpe
from vitpe.pos.detr import build_detr_pos, qk_embed
from vitpe.pos.functional import resize_offset_table
from vitpe.pos.relative import relative_index


def build(spec, grid, num_prefix=1, dim=32, heads=4, depth=2, **kw):
    return vitpe.pos.build(spec, dim=dim, num_heads=heads, depth=depth, grid=grid, num_prefix=num_prefix, **kw)


@pytest.mark.parametrize("num_prefix", [0, 1, 5])
@pytest.mark.parametrize("old, new", [((14, 14), (10, 10)), ((14, 14), (18, 18)), ((14, 14), (20, 12)),
                                      ((7, 11), (11, 7)), ((14, 14), (1, 9)), ((1, 1), (3, 3))])
def test_learned_table_follows_timms_resampling_at_run_time_and_on_load(num_prefix, old, new):
    learned = build("learned", old, num_prefix)
    with torch.no_grad():
        learned.pos_embed.normal_()
    ref = resample_abs_pos_embed(learned.pos_embed.detach(), new_size=list(new), old_size=list(old),
                                 num_prefix_tokens=num_prefix)  # (1, P + H*W, C)
    x = torch.zeros(1, num_prefix + new[0] * new[1], 32)
    torch.testing.assert_close(learned.embed(x, new, num_prefix), ref, atol=1e-5, rtol=0)
    loaded = build("learned", new, num_prefix)
    loaded.load_state_dict(learned.state_dict())  # recorded grid -> resampled on load
    torch.testing.assert_close(loaded.pos_embed.detach(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grid", [(7, 11), (11, 7), (1, 9), (1, 1)])
def test_rpb_reads_the_offset_table_as_swin_and_beit_index_it(grid):
    assert torch.equal(relative_index(grid), gen_relative_position_index(grid))
    rpb = build("rpb", grid, num_prefix=2)
    with torch.no_grad():
        rpb.tables.normal_()
    ctx = rpb.context(grid, 2)
    n = grid[0] * grid[1]
    for i in range(2):
        bias = ctx.block(i).bias  # (heads, 2 + N, 2 + N)
        ref = rpb.tables[i].flatten(1)[:, gen_relative_position_index(grid).view(-1)].view(4, n, n)
        torch.testing.assert_close(bias[:, 2:, 2:], ref.detach())
        assert bias[:, :2].abs().max() == 0 and bias[:, :, :2].abs().max() == 0  # prefix tokens: no bias


@pytest.mark.parametrize("grid, num_prefix", [((3, 4), 1), ((5, 2), 1), ((4, 4), 3)])
def test_rpb_prefix_bias_is_beits_class_token_layout(grid, num_prefix):
    """``prefix_bias=True``: the bias of every block is the one BEiT reads from its table with the
    three class-token entries (timm's ``gen_relative_position_index(class_token=True)``), for
    several prefix tokens alike; the entries learn; by default prefix tokens get zero bias."""
    rpb = build("rpb", grid, num_prefix, pos_kwargs={"rpb": {"prefix_bias": True}})
    n = grid[0] * grid[1]
    index = gen_relative_position_index(grid, class_token=True)  # (1 + n, 1 + n)
    index = torch.cat([index[:1].expand(num_prefix, -1), index[1:]])  # every prefix token as the class token
    index = torch.cat([index[:, :1].expand(-1, num_prefix), index[:, 1:]], dim=1)
    ctx = rpb.context(grid, num_prefix)
    for block in range(2):
        table = torch.cat([rpb.tables[block].flatten(1).t(), rpb.prefix_tables[block].t()])  # BEiT's layout
        ref = table[index.reshape(-1)].reshape(num_prefix + n, num_prefix + n, -1).permute(2, 0, 1)
        torch.testing.assert_close(ctx.block(block).bias, ref, atol=0, rtol=0)
    ctx.block(1).bias.sum().backward()
    assert rpb.prefix_tables.grad[1].abs().sum() > 0 and rpb.prefix_tables.grad[0].abs().sum() == 0
    plain = build("rpb", grid, num_prefix).context(grid, num_prefix).block(0).bias
    assert plain[:, :num_prefix].abs().sum() == 0 and plain[:, :, :num_prefix].abs().sum() == 0


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's interpolator's own, about its indexing
@pytest.mark.parametrize("old, new", [((14, 14), (18, 18)), ((14, 14), (10, 10)), ((7, 11), (9, 5)),
                                      ((4, 4), (4, 6)), ((2, 3), (1, 1))])
def test_rpb_geometric_resize_is_beits_at_run_time_and_on_load(old, new):
    """``resize='geometric'`` resizes each block's and head's offset table as timm's
    ``resize_rel_pos_bias_table`` (BEiT's), enlarging or shrinking, square or not; the bias of a
    patch with itself (offset 0) keeps its value. A checkpoint made at another grid is resized the
    same way on load."""
    rpb = build("rpb", old, pos_kwargs={"rpb": {"resize": "geometric"}})
    size = (2 * new[0] - 1, 2 * new[1] - 1)
    ref = torch.stack([resize_rel_pos_bias_table(t, new, (4, *size)) for t in rpb.tables.detach()])
    got = rpb.tables_for(new).reshape(ref.shape)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    centre = rpb.tables[..., old[0] - 1, old[1] - 1]
    torch.testing.assert_close(got[..., new[0] - 1, new[1] - 1], centre.detach(), atol=1e-6, rtol=0)
    loaded = build("rpb", new, pos_kwargs={"rpb": {"resize": "geometric"}})
    loaded.load_state_dict(rpb.state_dict())
    torch.testing.assert_close(loaded.tables.detach(), ref, atol=1e-6, rtol=0)
    # the default scales offsets with the grid instead: on a larger grid it is another table
    if new[0] > old[0]:
        plain = build("rpb", old)
        with torch.no_grad():
            plain.tables.copy_(rpb.tables)
        assert not torch.allclose(plain.tables_for(new), rpb.tables_for(new), atol=1e-3)
    with pytest.raises(ValueError, match="resize must be one of"):
        build("rpb", old, pos_kwargs={"rpb": {"resize": "nearest"}})
    with pytest.raises(ValueError, match="resized 'bicubic' or 'geometric'"):
        resize_offset_table(rpb.tables, size, "nearest")


@pytest.mark.parametrize("num_prefix", [0, 1, 5])
@pytest.mark.parametrize("grid", [(7, 11), (1, 9), (9, 1), (1, 1)])
def test_peg_is_cpvts_positional_convolution(num_prefix, grid):
    peg = build("peg", (14, 14), num_prefix)
    ref = PosConv(32, 32)
    ref.proj[0].load_state_dict(peg.convs["0"].proj.state_dict())
    x = torch.randn(2, num_prefix + grid[0] * grid[1], 32)
    with torch.no_grad():
        out = peg.after_block(x, 0, grid, num_prefix)
        torch.testing.assert_close(out[:, num_prefix:], ref(x[:, num_prefix:], grid))
    assert torch.equal(out[:, :num_prefix], x[:, :num_prefix])
    assert torch.equal(peg.after_block(x, 1, grid, num_prefix), x)  # only after block 0 (CPVT)


def detr_sine(mask: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0,
              scale: float = 2 * math.pi) -> torch.Tensor:
    """DETR's normalised sine encoding, ``mask`` ``(B, H, W)`` True on padding -> ``(B, H*W, 2F)``:
    1-based positions counted over the unpadded cells, divided by the last one (plus 1e-6) and
    scaled; channel ``2j`` is the sine and ``2j + 1`` the cosine of position / T^(2j / F); the row
    encoding comes first."""
    inside = (~mask).to(torch.float32)
    y, x = inside.cumsum(1), inside.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * scale
    x = x / (x[:, :, -1:] + 1e-6) * scale
    j = torch.arange(num_pos_feats, dtype=torch.float32)
    div = temperature ** (2 * torch.div(j, 2, rounding_mode="floor") / num_pos_feats)

    def encode(p: torch.Tensor) -> torch.Tensor:
        a = p[..., None] / div
        return torch.where(j.long() % 2 == 0, a.sin(), a.cos())

    return torch.cat([encode(y), encode(x)], dim=-1).flatten(1, 2)


@pytest.mark.parametrize("dim", [256, 64])
@pytest.mark.parametrize("padded, sizes", [((20, 25), [(20, 25), (13, 25), (20, 9), (1, 1), (7, 3)]),
                                           ((1, 9), [(1, 9), (1, 4)]), ((9, 1), [(9, 1), (3, 1)])])
def test_detr_sine_matches_detr_on_a_batch_of_differently_padded_images(dim, padded, sizes):
    mask = torch.ones(len(sizes), *padded, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        mask[i, :h, :w] = False
    ref = detr_sine(mask, dim // 2)
    for spec in ("sine", "sine+peg"):
        pos = build_detr_pos(spec, dim=dim, num_heads=8, depth=2, grid=(16, 16))
        torch.testing.assert_close(qk_embed(pos, mask), ref, atol=1e-6, rtol=0)  # padded cells too
