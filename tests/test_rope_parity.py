"""Parity of vitpe's 2D RoPE strategies with timm's reference (naver-ai/rope-vit, Heo et al. 2024).

References: ``vit_small_patch16_rope_224`` (axial, ``RotaryEmbeddingCat``, temperature 100,
``grid_indexing='xy'``) and ``vit_small_patch16_rope_mixed_224`` (``RotaryEmbeddingMixed``,
temperature 10) from ``timm/models/eva.py`` and ``timm/layers/pos_embed_sincos.py``.

What is the same: frequencies, positions (integer patch indices from 0, no grid normalisation,
recomputed for any grid), axis order (first D/4 angles follow the column x, the next D/4 the row y),
rotation direction, prefix tokens left unrotated, rope_mixed's parameter shape, initialisation and
x/y combination.

What differs by design and is tested as an equivalence: the channel pairing. timm rotates the
interleaved pairs ``(2i, 2i+1)``; vitpe the half-split pairs ``(i, i + D/2)``, both by angle ``i``.
Relabelling each head's channels with ``V2T`` (vitpe channel ``c`` <- timm channel ``V2T[c]``) maps
one onto the other exactly, and ``q . k`` is unchanged when q and k are relabelled alike.

What differs structurally between the models: timm's rope ViTs are Eva models with layer scale
(``gamma_1``, ``gamma_2``, init 1e-5); vitpe's ViT has none. Layer scale folds exactly into
``attn.proj`` and ``mlp.fc2``. ``rope.freqs`` is ``pos.freqs`` in vitpe. With those and the channel
relabelling of q and k rows of ``qkv``, the models agree to float32 rounding; vitpe's
``checkpoint_filter_fn`` does all three, so timm's RoPE checkpoints load through timm's own path.
The relabelling is needed: without it the rotations and the features differ.
"""
from __future__ import annotations

import pytest
import torch
import timm
from timm.layers import apply_rot_embed_cat
from timm.layers.pos_embed_sincos import init_random_2d_freqs

import vitpe  # noqa: F401  (registers the models)
from vitpe.pos.functional import apply_rope

EMBED, HEADS, D = 384, 6, 64  # ViT-S: head width 64
DEPTH = 3  # fewer blocks than ViT-S keep the tests fast; nothing here depends on depth
REFS = {"rope_axial": "vit_small_patch16_rope_224", "rope_mixed": "vit_small_patch16_rope_mixed_224"}
# vitpe channel c of a head holds timm channel V2T[c]: pair (i, i + D/2) <- pair (2i, 2i + 1)
V2T = torch.tensor([2 * (c % (D // 2)) + c // (D // 2) for c in range(D)])


def timm_ref(pos: str, img_size=64, **kw):
    return timm.create_model(REFS[pos], img_size=img_size, depth=DEPTH, **kw).eval()


def vitpe_model(pos: str, img_size=64, **kw):
    return timm.create_model("vitpe_vit_small_patch16_224", pos=pos, img_size=img_size, depth=DEPTH, **kw).eval()


def timm_tables(t_model, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's (sin, cos) for ``grid`` (patch tokens only), in timm's interleaved layout."""
    emb = t_model.rope.get_embed(shape=list(grid))
    sin, cos = emb.chunk(2, -1)
    return sin, cos


def timm_rotate(x: torch.Tensor, emb: torch.Tensor, npt: int = 1) -> torch.Tensor:
    """As timm's ``AttentionRope``: prefix tokens kept, the rest rotated."""
    return torch.cat([x[:, :, :npt], apply_rot_embed_cat(x[:, :, npt:], emb, half=False)], dim=2)


# -- the rotation itself ------------------------------------------------------------------------
def test_axial_frequencies_match():
    t, v = timm_ref("rope_axial"), vitpe_model("rope_axial")
    assert t.rope.temperature == 100.0 and t.rope.grid_indexing == "xy" and t.rope.ref_feat_shape is None
    assert t.rope.grid_type == "index" and t.rope.grid_offset == 0.0
    # 100 ** (-j / 16), j < 16; vitpe takes theta ** -x, timm 1 / theta ** x: equal to 1 ulp
    torch.testing.assert_close(v.pos.freqs, t.rope.bands, rtol=2.5e-7, atol=0)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (5, 2), (14, 14)])
@pytest.mark.parametrize("pos", ["rope_axial", "rope_mixed"])
def test_tables_match_up_to_channel_relabelling(pos, grid):
    """Same angles at the same tokens (row-major, x = column first, integer positions from 0),
    on square and non-square grids and at grids other than the one built for."""
    t = timm_ref(pos, dynamic_img_size=True)
    v = vitpe_model(pos)
    if pos == "rope_mixed":
        with torch.no_grad():
            v.pos.freqs.copy_(t.rope.freqs)
    sin_t, cos_t = timm_tables(t, grid)
    cos_v, sin_v = v.pos.tables(grid, num_prefix=1)
    # prefix row: identity rotation
    assert torch.equal(cos_v[..., :1, :], torch.ones_like(cos_v[..., :1, :]))
    assert torch.equal(sin_v[..., :1, :], torch.zeros_like(sin_v[..., :1, :]))
    cos_v, sin_v = cos_v[..., 1:, :], sin_v[..., 1:, :]
    # timm's interleaved layout is vitpe's half layout with channels relabelled
    inv = torch.argsort(V2T)  # timm channel j <- vitpe channel inv[j]
    torch.testing.assert_close(cos_v[..., inv].expand_as(cos_t) if pos == "rope_mixed" else cos_v[0, 0][..., inv],
                               cos_t, rtol=0, atol=2e-6)
    torch.testing.assert_close(sin_v[..., inv].expand_as(sin_t) if pos == "rope_mixed" else sin_v[0, 0][..., inv],
                               sin_t, rtol=0, atol=2e-6)


def test_axial_axis_order_explicit():
    """The angle of pair 0 follows the column (x) and that of pair D/4 the row (y), in both."""
    t, v = timm_ref("rope_axial", dynamic_img_size=True), vitpe_model("rope_axial")
    grid = (3, 5)
    rows, cols = torch.meshgrid(torch.arange(3.), torch.arange(5.), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    sin_t, _ = timm_tables(t, grid)
    cos_v, sin_v = v.pos.tables(grid, num_prefix=0)
    f1 = t.rope.bands[1]
    torch.testing.assert_close(sin_t[:, 2], torch.sin(cols * f1))            # timm pair 1: column
    torch.testing.assert_close(sin_t[:, 2 * (D // 4 + 1)], torch.sin(rows * f1))  # timm pair D/4+1: row
    torch.testing.assert_close(sin_v[0, 0, :, 1], torch.sin(cols * f1))      # vitpe pair 1: column
    torch.testing.assert_close(sin_v[0, 0, :, D // 4 + 1], torch.sin(rows * f1))


@pytest.mark.parametrize("pos", ["rope_axial", "rope_mixed"])
def test_rotation_equivalent_under_relabelling(pos):
    """For the same q, k and grid: vitpe(q relabelled) == timm(q) relabelled, class token unrotated,
    and the attention logits q . k are identical."""
    grid = (3, 5)
    t = timm_ref(pos, dynamic_img_size=True)
    v = vitpe_model(pos)
    if pos == "rope_mixed":
        with torch.no_grad():
            v.pos.freqs.copy_(t.rope.freqs)
    T = 1 + grid[0] * grid[1]
    q, k = torch.randn(2, 2, HEADS, T, D).unbind(0)
    emb = t.rope.get_embed(shape=list(grid))
    cos, sin = v.pos.tables(grid, num_prefix=1)
    blocks = range(DEPTH) if pos == "rope_mixed" else [0]
    for i in blocks:
        e = emb[i] if pos == "rope_mixed" else emb
        c, s = (cos[i], sin[i]) if pos == "rope_mixed" else (cos[0], sin[0])
        qt, kt = timm_rotate(q, e), timm_rotate(k, e)
        qv, kv = apply_rope(q[..., V2T], c, s), apply_rope(k[..., V2T], c, s)
        torch.testing.assert_close(qv, qt[..., V2T], rtol=0, atol=1e-5)
        torch.testing.assert_close(kv, kt[..., V2T], rtol=0, atol=1e-5)
        assert torch.equal(qv[:, :, 0], q[:, :, 0, V2T])  # class token untouched
        torch.testing.assert_close(qv @ kv.transpose(-1, -2), qt @ kt.transpose(-1, -2), rtol=1e-5, atol=1e-4)


def test_rotation_differs_without_relabelling():
    """The channel pairing is a real difference: vitpe rotates (i, i+D/2), timm (2i, 2i+1), so the
    same q rotates differently unless relabelled (about 80 % of the elements, by up to ~7)."""
    t, v = timm_ref("rope_axial", dynamic_img_size=True), vitpe_model("rope_axial")
    q = torch.randn(1, HEADS, 1 + 16, D)
    cos, sin = v.pos.tables((4, 4), num_prefix=1)
    diff = (apply_rope(q, cos[0], sin[0]) - timm_rotate(q, t.rope.get_embed(shape=[4, 4]))).abs()
    assert diff.max() > 1.0 and (diff > 1e-4).float().mean() > 0.5


def test_relative_property_same_in_both():
    """q_m . k_n depends only on the patch offset, in both (axial)."""
    t, v = timm_ref("rope_axial", dynamic_img_size=True), vitpe_model("rope_axial")
    grid = (4, 4)
    qv, kv = torch.randn(2, D)
    q = qv.expand(1, 1, 17, D)
    k = kv.expand(1, 1, 17, D)
    cos, sin = v.pos.tables(grid, num_prefix=1)
    st = timm_rotate(q, t.rope.get_embed(shape=[4, 4]))[0, 0] @ timm_rotate(k, t.rope.get_embed(shape=[4, 4]))[0, 0].T
    sv = apply_rope(q[..., V2T], cos[0], sin[0])[0, 0] @ apply_rope(k[..., V2T], cos[0], sin[0])[0, 0].T
    # tokens 1 + (r*4 + c): offset (+1, +1) from (0,0)->(1,1) and (2,2)->(3,3)
    for s in (st, sv):
        torch.testing.assert_close(s[1 + 0, 1 + 5], s[1 + 10, 1 + 15], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sv, st, rtol=1e-5, atol=1e-4)


# -- rope_mixed's learnable frequencies ------------------------------------------------------
def test_mixed_freqs_shape_and_init_match():
    t, v = timm_ref("rope_mixed"), vitpe_model("rope_mixed")
    assert tuple(v.pos.freqs.shape) == tuple(t.rope.freqs.shape) == (2, DEPTH, HEADS, D // 2)
    assert t.rope.temperature == 10.0 and t.rope.grid_indexing == "xy"
    torch.manual_seed(123)
    ref = init_random_2d_freqs(D, DEPTH, HEADS, temperature=10.0, rotate=True)
    torch.manual_seed(123)
    mine = v.pos.init_freqs(10.0)
    # same magnitudes (to 1 ulp: theta ** -x vs 1 / theta ** x), same random angle per (block, head)
    torch.testing.assert_close(mine, ref, rtol=2.5e-7, atol=1e-9)
    # and the module's own init has that structure: |(fx, fy)| of pair j is 10 ** (-4 (j mod D/4) / D)
    mag = v.pos.freqs.norm(dim=0)  # (depth, heads, D/2)
    expect = 10.0 ** (-torch.arange(0, D, 4).float() / D)
    torch.testing.assert_close(mag, torch.cat([expect, expect]).expand_as(mag), rtol=1e-5, atol=1e-6)


# -- whole model ---------------------------------------------------------------------------------
def _sensitise_(t_model) -> None:
    """Random init of timm's Eva leaves blocks near identity (layer scale 1e-5, head x 0.001):
    make layer scale O(1), attention peaky, and the head O(1), so positions change the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in t_model.blocks:
            blk.gamma_1.copy_(torch.rand(EMBED, generator=g) + 0.5)
            blk.gamma_2.copy_(torch.rand(EMBED, generator=g) + 0.5)
            blk.attn.qkv.weight.mul_(6.0)
            blk.attn.qkv.bias.normal_(0, 0.5, generator=g)
        t_model.head.weight.normal_(0, 0.05, generator=g)
        t_model.head.bias.zero_()
        if hasattr(t_model.rope, "freqs"):
            t_model.rope.freqs.mul_(3.0)  # larger angles than the init, so a mix-up of axes shows


def convert(sd: dict[str, torch.Tensor], relabel: bool = True) -> dict[str, torch.Tensor]:
    """timm rope-ViT state dict -> vitpe: layer scale folded into attn.proj / mlp.fc2, rope.freqs ->
    pos.freqs, and (``relabel``) each head's q and k rows of qkv relabelled with V2T."""
    out = {}
    for k, val in sd.items():
        if ".gamma_" in k:
            continue
        if k.startswith("rope."):
            if k == "rope.freqs":
                out["pos.freqs"] = val.clone()
            continue
        out[k] = val.clone()
    for k, val in sd.items():
        if k.endswith(".gamma_1") or k.endswith(".gamma_2"):
            blk = k.rsplit(".", 1)[0]
            lin = f"{blk}.attn.proj" if k.endswith("gamma_1") else f"{blk}.mlp.fc2"
            out[f"{lin}.weight"] = out[f"{lin}.weight"] * val[:, None]
            out[f"{lin}.bias"] = out[f"{lin}.bias"] * val
    if relabel:
        for k in [k for k in out if k.endswith("attn.qkv.weight") or k.endswith("attn.qkv.bias")]:
            w = out[k].reshape(3, HEADS, D, -1)
            w = torch.cat([w[:2, :, V2T], w[2:]], dim=0)  # q, k relabelled; v untouched
            out[k] = w.reshape(out[k].shape)
    return out


def _pair(pos: str, img_size):
    t = timm_ref(pos, img_size=img_size, dynamic_img_size=True)
    _sensitise_(t)
    v = vitpe_model(pos, img_size=img_size)
    return t, v


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("pos", ["rope_axial", "rope_mixed"])
def test_structure_differs_only_in_layer_scale_and_freqs_key(pos):
    t, v = timm_ref(pos), vitpe_model(pos)
    ts, vs = t.state_dict(), v.state_dict()
    only_t = {k for k in ts if k not in vs}
    only_v = {k for k in vs if k not in ts}
    expect_t = {f"blocks.{i}.gamma_{j}" for i in range(DEPTH) for j in (1, 2)}
    if pos == "rope_mixed":
        expect_t.add("rope.freqs")
    assert only_t == expect_t
    assert only_v == ({"pos.freqs"} if pos == "rope_mixed" else set())
    assert all(ts[k].shape == vs[k].shape for k in ts if k in vs)
    # the rest of the architecture as in vitpe: fused qkv with bias, no pos_embed, final norm, token pool
    assert t.pos_embed is None and t.global_pool == "token" and isinstance(t.fc_norm, torch.nn.Identity)
    assert t.blocks[0].attn.qkv.bias is not None and t.norm.eps == v.norm.eps == 1e-6
    assert t.num_prefix_tokens == v.num_prefix_tokens == 1


@pytest.mark.parametrize("size", [64, (48, 80)])
@pytest.mark.parametrize("pos", ["rope_axial", "rope_mixed"])
def test_logits_match_after_conversion(pos, size):
    """timm's weights (random init, sensitised), converted, give vitpe the same features and logits;
    at the built size and, for a model built at 64, at a non-square 48x80 input."""
    t, v = _pair(pos, 64)
    v.load_state_dict(convert(t.state_dict()), strict=True)
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        ft, fv = t.forward_features(x), v.forward_features(x)
        lt, lv = t.forward_head(ft), v.forward_head(fv)
    torch.testing.assert_close(fv, ft, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lv, lt, rtol=1e-4, atol=1e-4)
    assert lt.abs().max() > 0.1  # logits are not trivially small


@pytest.mark.parametrize("pos", ["rope_axial", "rope_mixed"])
def test_features_differ_without_relabelling(pos):
    """Without relabelling q and k rows of qkv, timm's interleaved-pair weights in vitpe's half-split
    rotation give other features (max|diff|/max|timm| about 1.0 axial, 1.3 mixed): the step matters."""
    t, v = _pair(pos, 64)
    v.load_state_dict(convert(t.state_dict(), relabel=False), strict=True)
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        ft, fv = t.forward_features(x), v.forward_features(x)
    assert _rel_err(fv, ft) > 0.1, f"max |diff| / max |timm| = {_rel_err(fv, ft):.3g}"


@pytest.mark.parametrize("pos", ["rope_axial", "rope_mixed"])
def test_timm_checkpoint_loads_through_pretrained_cfg(pos, tmp_path):
    """timm's own RoPE checkpoint through timm's loading path (vitpe's checkpoint_filter_fn folds layer
    scale, moves rope.freqs and relabels q and k): the same logits."""
    t = timm_ref(pos)
    _sensitise_(t)
    path = tmp_path / "timm_rope.pth"
    torch.save(t.state_dict(), path)
    v = timm.create_model("vitpe_vit_small_patch16_224", pos=pos, img_size=64, depth=DEPTH, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(v(x), t(x), rtol=1e-4, atol=1e-5)


# -- EVA's rotary layout (timm's vit_*_patch16_rope_reg*_gap_256) --------------------------------
EVA_ROPE = {"rope_axial": {"theta": 10000, "ref_grid": [16, 16]}}


def eva_checkpoint(tmp_path, name="vit_medium_patch16_rope_reg1_gap_256"):
    """A small EVA-style RoPE ViT (register tokens, no class token, average pooling, q and v biases
    apart, rows first, temperature 10000, positions rescaled to its 16 x 16 training grid), moved
    off its init so that every weight matters."""
    torch.manual_seed(0)
    ref = timm.create_model(name, depth=2, embed_dim=128, num_heads=2, dynamic_img_size=True).eval()
    assert ref.rope.grid_indexing == "ij" and ref.rope.temperature == 10000 and tuple(ref.rope.ref_feat_shape) == (16, 16)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "eva.pth"
    torch.save(ref.state_dict(), path)
    return ref, str(path)


def eva_vitpe(path, ref, pos_kwargs=EVA_ROPE):
    return timm.create_model("vitpe_vit_small_patch16_224", pos="rope_axial", depth=2, embed_dim=128, num_heads=2,
                             img_size=256, class_token=False, reg_tokens=ref.num_prefix_tokens, global_pool="avg",
                             pos_kwargs=pos_kwargs, pretrained=True,
                             pretrained_cfg_overlay=dict(file=path)).eval()


@pytest.mark.parametrize("name", ["vit_medium_patch16_rope_reg1_gap_256", "vit_betwixt_patch16_rope_reg4_gap_256"])
def test_an_eva_rope_checkpoint_gives_timms_logits_at_every_size(tmp_path, name):
    """The q and v biases become qkv's bias, the rows-first angles are relabelled to vitpe's
    columns-first ones, and ``ref_grid`` rescales positions as ``ref_feat_shape`` does, so the
    logits agree at the training size and at others, square or not."""
    ref, path = eva_checkpoint(tmp_path, name)
    model = eva_vitpe(path, ref)
    for size in [(256, 256), (224, 224), (192, 320)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), atol=2e-5, rtol=1e-5, msg=str(size))


def test_an_eva_rope_checkpoint_needs_evas_temperature_and_says_what_else_differs(tmp_path, caplog):
    import logging

    ref, path = eva_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"rope_axial has theta=100: build it with pos_kwargs="):
        eva_vitpe(path, ref, pos_kwargs=None)
    # into rope_mixed: the frequencies it would learn are not in the file (strict loading names them)
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="pos.freqs"):
        timm.create_model("vitpe_vit_small_patch16_224", pos="rope_mixed", depth=2, embed_dim=128, num_heads=2,
                          img_size=256, class_token=False, reg_tokens=1, global_pool="avg", pretrained=True,
                          pretrained_cfg_overlay=dict(file=path))
    assert "pos='rope_axial' with theta=10000 loads it as trained" in caplog.text
    caplog.clear()
    # without ref_grid: the same at the training grid, and a warning that other sizes differ
    with caplog.at_level(logging.WARNING):
        model = eva_vitpe(path, ref, pos_kwargs={"rope_axial": {"theta": 10000}})
    assert "rescales positions to its training grid" in caplog.text
    with torch.no_grad():
        x = torch.randn(1, 3, 256, 256)
        native = (model(x) - ref(x)).abs().max()
        x = torch.randn(1, 3, 224, 224)
        other = (model(x) - ref(x)).abs().max()
    assert native < 2e-5 and other > 20 * native  # float rounding at 16 x 16; positions apart at 14 x 14


def test_ref_grid_rescales_positions_to_the_reference_grid():
    """With ``ref_grid`` every grid spans the reference one: at the reference grid the tables are
    the plain ones, and on a grid twice as fine token (2i, 2j) turns as token (i, j) of the reference."""
    plain = vitpe_model("rope_axial").pos
    ref = vitpe_model("rope_axial", pos_kwargs={"rope_axial": {"ref_grid": [3, 4]}}).pos
    for a, b in zip(ref.tables((3, 4), 1), plain.tables((3, 4), 1)):
        torch.testing.assert_close(a, b)
    coarse, fine = ref.tables((3, 4), 0), ref.tables((6, 8), 0)
    even = torch.arange(6 * 8).reshape(6, 8)[::2, ::2].reshape(-1)  # tokens (2i, 2j) of the fine grid
    for c, f in zip(coarse, fine):
        torch.testing.assert_close(f[..., even, :], c)
    for bad in ([3], [3, 0], [2.5, 3]):
        with pytest.raises(ValueError, match="ref_grid must be two positive whole numbers"):
            vitpe_model("rope_axial", pos_kwargs={"rope_axial": {"ref_grid": bad}})
