"""DETR's encoder-decoder (post-norm, as in the paper), with the encoder's positional strategy
taken from ``vitpe.pos.detr``.

Per encoder layer: additive encodings (``sine``, ``learned``) are added to the queries and keys,
never to the values; rotary tables (``rope_*``) rotate q and k; after-block hooks (``peg``) run on
the token grid with padded cells zeroed, so a convolution sees the image edge as it would without
padding. The padding mask reaches every attention as a key-padding mask.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from ..layers import Mlp
from ..layers.attention import attend
from ..pos.base import BlockPos, PosStrategy
from ..pos.detr import build_detr_pos, point_embed, qk_embed, valid_sizes

_NO_POS = BlockPos(grid=(0, 0), num_prefix=0)  # no position: cross-attention, the decoder's FFNs


class MultiheadAttention(nn.Module):
    """Attention with separate query, key and value inputs (position goes into q and k only)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.dropout = num_heads, dropout
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None,
                pos: BlockPos | None = None) -> Tensor:
        """``q`` ``(B, T, C)``, ``k``/``v`` ``(B, S, C)``; ``bias`` an additive float bias on the
        logits, ``(B, 1, 1, S)`` (-inf on padded keys, ``key_padding_bias``) or ``(B, heads, T, S)``,
        made once per forward by the caller; ``pos`` may carry rotary tables (self-attention) and
        the strategy's own bias."""
        q, k, v = (rearrange(proj(t), "b t (h d) -> b h t d", h=self.num_heads)
                   for proj, t in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v)))
        pos = pos or _NO_POS
        if bias is not None:
            bias = bias.to(q.dtype)
            if pos.bias is not None:  # the strategy's (heads, T, S) shared by the batch, or (B, heads, T, S)
                bias = bias + (pos.bias if pos.bias.dim() == 4 else pos.bias[None]).to(q.dtype)
            pos = replace(pos, bias=bias)
        out = attend(q, k, v, pos, self.dropout if self.training else 0.0)
        return self.out_proj(rearrange(out, "b h t d -> b t (h d)"))


def key_padding_bias(pad: Tensor) -> Tensor:
    """``pad`` ``(B, S)`` True on padded keys -> ``(B, 1, 1, S)`` float32, -inf there, else 0."""
    return torch.zeros(pad.shape, device=pad.device).masked_fill(pad, float("-inf"))[:, None, None, :]


def _with(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, mixer: nn.Module | None) -> None:
        super().__init__()
        self.attn = MultiheadAttention(dim, num_heads, dropout)
        self.mlp = Mlp(dim, ffn_dim, mixer, dropout, act=nn.ReLU)  # DETR's FFN: ReLU
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor | None, block: BlockPos, key_bias: Tensor) -> Tensor:
        """``x`` ``(B, N, C)``; ``pos`` the additive q/k encoding ``(B, N, C)`` or None; ``key_bias``
        ``(B, 1, 1, N)`` (``key_padding_bias``)."""
        qk = _with(x, pos)
        x = self.norm1(x + self.drop(self.attn(qk, qk, x, key_bias, block)))
        return self.norm2(x + self.mlp(x, block))  # the Mlp's last dropout is the residual's (DETR: one)


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(dim, num_heads, dropout)
        self.cross_attn = MultiheadAttention(dim, num_heads, dropout)
        self.mlp = Mlp(dim, ffn_dim, None, dropout, act=nn.ReLU)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, memory_k: Tensor, query_pos: Tensor, cross_bias: Tensor,
                point_pos: Tensor | None = None) -> Tensor:
        """``tgt`` ``(B, Q, C)``, ``memory`` ``(B, N, C)`` (the values) and ``memory_k`` (the keys:
        the memory plus its encoding, if any); ``point_pos`` ``(Q, C)``, the encoding at each
        query's reference point, joins the cross-attention's queries, so that they meet the keys'
        encoding near that point; ``cross_bias`` ``(B, 1 or heads, 1 or Q, N)`` on the
        cross-attention's logits: padded keys, and the ``SpatialPrior`` if any."""
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.drop(self.self_attn(q, q, tgt)))
        tgt = self.norm2(tgt + self.drop(self.cross_attn(_with(tgt + query_pos, point_pos), memory_k, memory,
                                                         cross_bias)))
        return self.norm3(tgt + self.mlp(tgt, _NO_POS))  # the Mlp's last dropout is the residual's


class SpatialPrior(nn.Module):
    """A Gaussian around each query's reference point, added (as a log-weight) to the logits of
    the decoder's cross-attention (SMCA, Gao et al. 2021, with learned per-query, per-head widths
    instead of predicted ones). Each query then pools the features near its place from the first
    step, which is what lets DETR learn from few images and steps. Widths start spread over heads
    (from ``min_width`` to ``max_width`` of the image) so some heads look near and some wide."""

    def __init__(self, num_queries: int, num_heads: int, min_width: float = 0.05, max_width: float = 0.5) -> None:
        super().__init__()
        widths = torch.logspace(math.log10(min_width), math.log10(max_width), num_heads)
        self.log_width = nn.Parameter(widths.log()[None, :, None].repeat(num_queries, 1, 2))  # (Q, heads, 2)

    def forward(self, points: Tensor, mask: Tensor) -> Tensor:
        """``points`` ``(Q, 2)`` (x, y in ``[0, 1]`` of the unpadded image), ``mask`` ``(B, H, W)``
        True on padding -> ``(B, heads, Q, H*W)`` float32, 0 at the point, falling off with distance."""
        B, H, W = mask.shape
        size = valid_sizes(mask).clamp(min=1).float()  # (B, 2) unpadded rows, cols
        ys = (torch.arange(H, device=mask.device) + 0.5)[None] / size[:, :1]  # (B, H) cell centres
        xs = (torch.arange(W, device=mask.device) + 0.5)[None] / size[:, 1:]  # (B, W)
        inv = (-2 * self.log_width.float()).exp()  # (Q, heads, 2): 1 / width^2
        dx = (xs[:, None, :] - points[None, :, :1].float()) ** 2  # (B, Q, W)
        dy = (ys[:, None, :] - points[None, :, 1:].float()) ** 2  # (B, Q, H)
        logit = (dy[:, :, None, :, None] * inv[None, :, :, 1, None, None]
                 + dx[:, :, None, None, :] * inv[None, :, :, 0, None, None])  # (B, Q, heads, H, W)
        return rearrange(-0.5 * logit, "b q h y x -> b h q (y x)")


class DetrTransformer(nn.Module):
    """Encoder over the feature map, decoder over learned object queries.

    ``pos`` names the encoder's strategy (``vitpe.pos.detr``); ``pos_grid`` is its native grid
    (the length of the ``learned`` tables). Rotary encodings act in the encoder's self-attention
    only: object queries have no place on the grid.
    """

    def __init__(self, *, dim: int = 256, num_heads: int = 8, enc_layers: int = 6, dec_layers: int = 6,
                 ffn_dim: int = 2048, dropout: float = 0.1, pos: str = "sine",
                 pos_kwargs: dict[str, dict[str, Any]] | None = None, pos_grid: tuple[int, int] = (32, 32)) -> None:
        super().__init__()
        self.pos = build_detr_pos(pos, dim=dim, num_heads=num_heads, depth=enc_layers, grid=pos_grid,
                                  pos_kwargs=pos_kwargs)
        self.encoder = nn.ModuleList([EncoderLayer(dim, num_heads, ffn_dim, dropout, self.pos.ffn_mixer(ffn_dim))
                                      for _ in range(enc_layers)])
        self.decoder = nn.ModuleList([DecoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(dec_layers)])
        self.dec_norm = nn.LayerNorm(dim)
        # padded tokens are zeroed between encoder layers only for hooks that read neighbouring tokens
        # (a convolution after a block or in the FFN); attention never reads them (masked keys)
        self.zero_padding = any(layer.mlp.mixer is not None for layer in self.encoder) or any(
            type(p).after_block is not PosStrategy.after_block for p in self.pos.parts())
        for layer in [*self.encoder, *self.decoder]:  # DETR's init; the strategy keeps its own
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def encode(self, src: Tensor, mask: Tensor, key_bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``src`` ``(B, C, H, W)``, ``mask`` ``(B, H, W)`` True on padding, ``key_bias`` its
        ``key_padding_bias`` (made here if not given) -> memory ``(B, H*W, C)`` and the additive
        encoding ``(B, H*W, C)`` (or None) for the decoder's keys."""
        grid = (src.shape[-2], src.shape[-1])
        x = rearrange(src, "b c h w -> b (h w) c")
        pad = mask.flatten(1)  # (B, N)
        key_bias = key_padding_bias(pad) if key_bias is None else key_bias
        pos = qk_embed(self.pos, mask)
        pos = None if pos is None else pos.to(x.dtype)
        x = self.pos.embed(x, grid, 0)
        ctx = self.pos.context(grid, 0)
        for i, layer in enumerate(self.encoder):
            x = layer(x, pos, ctx.block(i), key_bias)
            x = self.pos.after_block(x.masked_fill(pad[..., None], 0.0) if self.zero_padding else x, i, grid, 0)
        return x, pos

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, ref_points: Tensor | None = None,
                prior: SpatialPrior | None = None) -> Tensor:
        """-> decoder outputs after every layer, normalised: ``(L, B, Q, C)``. ``ref_points``
        ``(Q, 2)`` (x, y in ``[0, 1]``): each query's place, read in the encoder's own additive
        encoding for the cross-attention (Conditional DETR's spatial query, without its scaling)."""
        key_bias = key_padding_bias(mask.flatten(1))  # (B, 1, 1, N), shared by every attention over the grid
        memory, pos = self.encode(src, mask, key_bias)
        query_pos = query_embed[None].expand(src.shape[0], -1, -1).to(memory.dtype)
        point_pos = None
        if ref_points is not None and pos is not None:  # a strategy with no additive part has no point encoding
            point_pos = point_embed(self.pos, ref_points).to(memory.dtype)
        cross_bias = key_bias if prior is None or ref_points is None else prior(ref_points, mask) + key_bias
        memory_k = _with(memory, pos)  # the same keys for every decoder layer
        tgt = torch.zeros_like(query_pos)
        outs = []
        for layer in self.decoder:
            tgt = layer(tgt, memory, memory_k, query_pos, cross_bias, point_pos)
            outs.append(self.dec_norm(tgt))
        return torch.stack(outs)


__all__ = ["DecoderLayer", "DetrTransformer", "EncoderLayer", "MultiheadAttention", "SpatialPrior",
           "key_padding_bias"]
