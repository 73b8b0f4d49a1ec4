"""Queries cut into pieces (for the GPU's backward when keys are few) give SDPA's result."""
import pytest
import torch
import torch.nn.functional as F

from vitpe.layers.attention import chunked_sdpa, query_chunks


@pytest.mark.parametrize("with_mask", [False, True])
def test_chunked_attention_equals_attention_with_gradients(with_mask):
    torch.manual_seed(0)
    q = torch.randn(2, 3, 64, 8, requires_grad=True)
    k, v = (torch.randn(2, 3, 5, 8, requires_grad=True) for _ in range(2))
    mask = torch.randn(3, 64, 5, requires_grad=True) if with_mask else None
    inputs = [q, k, v] + ([mask] if with_mask else [])
    ours, ref = chunked_sdpa(q, k, v, mask, 0.0, 4), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, ref)
    w = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((ours * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("queries,keys,expected", [
    (16384, 256, 16),  # MiT stage 1 at 512 px (reduction 8): capped at 16
    (4096, 256, 4),    # stage 2: pieces of 1024 queries, 4x the keys
    (1024, 256, 1),    # stage 3: too few queries to cut
    (197, 197, 1),     # plain self-attention
    (100, 5, 4),       # 100 is not divisible by 8
])
def test_query_pieces_stay_four_times_the_keys(queries, keys, expected):
    assert query_chunks(queries, keys) == expected
