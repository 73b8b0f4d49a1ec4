"""The patch embedding is its Conv2d computed as one matrix product: the same tokens and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitpe.layers import PatchEmbed


@pytest.mark.parametrize("p, chans, hw", [(16, 3, (48, 80)), (14, 3, (28, 42)), (8, 1, (16, 8)), (4, 5, (12, 12))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_tokens_and_gradients_equal_the_convolution(p, chans, hw, channels_last):
    torch.manual_seed(0)
    embed = PatchEmbed(p, chans, 24).double()
    x = torch.randn(2, chans, *hw, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    tokens, grid = embed(x)
    ref = F.conv2d(x, embed.proj.weight, embed.proj.bias, stride=p)  # (B, dim, gh, gw)
    assert grid == (hw[0] // p, hw[1] // p) and tokens.shape == (2, grid[0] * grid[1], 24)
    torch.testing.assert_close(tokens, ref.flatten(2).transpose(1, 2), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(tokens)
    got = torch.autograd.grad(tokens, (x, embed.proj.weight, embed.proj.bias), g)
    want = torch.autograd.grad(ref.flatten(2).transpose(1, 2), (x, embed.proj.weight, embed.proj.bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_wrong_channels_and_sizes_are_named():
    embed = PatchEmbed(16, 3, 8)
    with pytest.raises(ValueError, match=r"expected 3 input channels, got shape \(1, 4, 32, 32\)"):
        embed(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="input size 32x40 is not a multiple of the patch size 16"):
        embed(torch.zeros(1, 3, 32, 40))


def test_a_projection_of_another_kind_runs_as_it_is():
    torch.manual_seed(0)
    embed = PatchEmbed(8, 3, 16)
    embed.proj = torch.nn.Conv2d(3, 16, kernel_size=8, stride=4, padding=2)  # overlapping patches
    x = torch.randn(1, 3, 32, 32)
    tokens, _ = embed(x)
    torch.testing.assert_close(tokens, embed.proj(x).flatten(2).transpose(1, 2))
