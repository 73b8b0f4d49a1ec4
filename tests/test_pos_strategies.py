"""Every positional strategy, single and combined, inside the ViT: sizes, gradients, state dicts,
and the properties that make each one what it claims to be."""
import pytest
import torch

import vitpe
from vitpe.models import VisionTransformer

SINGLE = vitpe.pos.names()
COMBOS = ["peg+rope_mixed", "learned+rope_axial", "sincos2d+rpb", "mixffn+rope_axial", "peg+rpb"]
ALL = SINGLE + COMBOS
SIZES = [(224, 224), (160, 160), (288, 288), (224, 320)]


def tiny_vit(pos: str, **kw) -> VisionTransformer:
    args = dict(img_size=224, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5, pos=pos)
    args.update(kw)
    return VisionTransformer(**args)


def test_names_lists_every_strategy():
    assert set(SINGLE) == {"none", "sincos2d", "learned", "peg", "mixffn", "rope_axial", "rope_mixed", "rpb"}


@pytest.mark.parametrize("pos", ALL)
def test_forward_backward_at_every_size(pos):
    model = tiny_vit(pos)
    for h, w in SIZES:
        model.zero_grad()
        out = model(torch.randn(2, 3, h, w))
        assert out.shape == (2, 5) and torch.isfinite(out).all(), (pos, h, w)
        out.square().mean().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{pos} at {h}x{w}: no gradient for {name}"
            if name.startswith("pos."):
                assert p.grad.abs().sum() > 0, f"{pos} at {h}x{w}: zero gradient for {name}"


@pytest.mark.parametrize("pos", ALL)
def test_state_dict_round_trip(pos):
    a, b = tiny_vit(pos).eval(), tiny_vit(pos).eval()
    x = torch.randn(2, 3, 160, 224)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def permute_patches(img: torch.Tensor, perm: torch.Tensor, patch: int) -> torch.Tensor:
    """Shuffle the patch x patch tiles of ``img`` (B, C, H, W) in row-major order by ``perm``."""
    B, C, H, W = img.shape
    h, w = H // patch, W // patch
    tiles = img.reshape(B, C, h, patch, w, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C, patch, patch)
    tiles = tiles[:, perm]
    return tiles.reshape(B, h, w, C, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def permuted_outputs(pos: str) -> tuple[torch.Tensor, torch.Tensor]:
    model = tiny_vit(pos, img_size=64).eval()
    with torch.no_grad():  # sharpen attention so that what position does to it shows clearly
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(10)
    x = torch.randn(1, 3, 64, 64)
    perm = torch.randperm(16)
    with torch.no_grad():
        out = model.forward_features(x)[:, 1:]
        out_perm = model.forward_features(permute_patches(x, perm, 16))[:, 1:]
    return out[:, perm], out_perm


def test_none_is_permutation_equivariant():
    expected, got = permuted_outputs("none")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pos", [p for p in ALL if p != "none"])
def test_every_other_strategy_breaks_equivariance(pos):
    expected, got = permuted_outputs(pos)
    assert (got - expected).abs().max() > 1e-3, f"{pos} left patch tokens permutation-equivariant"


def test_unknown_name_lists_valid_ones():
    with pytest.raises(KeyError, match="rope_mixed") as info:
        tiny_vit("rope_mixd")
    assert "did you mean" in str(info.value)


@pytest.mark.parametrize("spec", ["rope_axial+rope_mixed", "none+peg", "peg+peg", "mixffn+mixffn"])
def test_invalid_combinations_are_refused(spec):
    with pytest.raises((KeyError, ValueError)):
        tiny_vit(spec)


def test_size_not_multiple_of_patch_names_both():
    with pytest.raises(ValueError, match=r"225x224.*patch size 16"):
        tiny_vit("learned")(torch.randn(1, 3, 225, 224))


def test_pos_kwargs_reach_the_strategy():
    model = tiny_vit("peg+rope_mixed", depth=3, pos_kwargs={"peg": {"after": [0, 2], "kernel_size": 5}})
    peg = model.pos.find("peg")
    assert peg.after == [0, 2] and peg.convs["2"].proj.kernel_size == (5, 5)
    with pytest.raises(ValueError, match="outside"):
        tiny_vit("peg", pos_kwargs={"peg": {"after": [7]}})
    with pytest.raises(KeyError, match="not part of"):
        tiny_vit("peg", pos_kwargs={"rpb": {}})


@pytest.mark.parametrize("pos", ["rope_axial", "rpb", "sincos2d", "learned"])
def test_tables_cached_under_inference_mode_do_not_break_training(pos):
    model = tiny_vit(pos).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model(x)
    model.train()
    model(x).sum().backward()  # would fail if an inference tensor were reused from the cache
