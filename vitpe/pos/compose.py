"""Combinations written with ``+`` (``peg+rope_mixed``): one strategy that chains its parts' hooks."""
from __future__ import annotations

from torch import Tensor, nn

from .base import Grid, PosContext, PosStrategy


class Compose(PosStrategy):
    """Runs each part's hooks in the order written. Parameters are keyed by part name
    (``pos.peg.convs.0...``, ``pos.rope_mixed.freqs``). At most one part may rotate q and k and at
    most one may give the FFN a mixer; additive biases are summed."""

    def __init__(self, parts: list[PosStrategy]) -> None:
        first = parts[0]
        super().__init__(dim=first.dim, num_heads=first.num_heads, depth=first.depth,
                         grid=first.native_grid, num_prefix=first.num_prefix)
        names = [p.name for p in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"a strategy appears twice in {'+'.join(names)}")
        if sum(type(p).ffn_mixer is not PosStrategy.ffn_mixer for p in parts) > 1:
            raise ValueError(f"{'+'.join(names)}: only one part may put a mixer in the FFN")
        if sum(n.startswith("rope") for n in names) > 1:
            raise ValueError(f"{'+'.join(names)}: q and k can be rotated by one rotary strategy only")
        self.name = "+".join(names)
        self._part_names = names
        for p in parts:
            self.add_module(p.name, p)

    def parts(self) -> list[PosStrategy]:
        return [getattr(self, n) for n in self._part_names]

    def embed(self, x: Tensor, grid: Grid, num_prefix: int) -> Tensor:
        for p in self.parts():
            x = p.embed(x, grid, num_prefix)
        return x

    def context(self, grid: Grid, num_prefix: int, kv_stride: int = 1) -> PosContext:
        ctx = PosContext(grid, num_prefix, kv_stride=kv_stride)
        for p in self.parts():
            part = p.context(grid, num_prefix, kv_stride=kv_stride) if kv_stride != 1 else p.context(grid, num_prefix)
            ctx = ctx.merge(part)
        return ctx

    def after_block(self, x: Tensor, i: int, grid: Grid, num_prefix: int) -> Tensor:
        for p in self.parts():
            x = p.after_block(x, i, grid, num_prefix)
        return x

    def ffn_mixer(self, hidden_dim: int) -> nn.Module | None:
        for p in self.parts():
            mixer = p.ffn_mixer(hidden_dim)
            if mixer is not None:
                return mixer
        return None
