"""Convolutional position: ``peg`` (CPVT's conditional encoding) and ``mixffn`` (SegFormer's Mix-FFN).

Neither adds a table: position leaks in through the zero padding of a depthwise convolution, so
both follow the grid of any input with nothing to resample.

Initialisation: in the MiT the convolutions get SegFormer's He normal over the fan-out (std
``sqrt(2/9)`` for 3x3 depthwise, zero bias); in the ViT they keep torch's default (std about 0.19,
bias uniform in +-1/3), as the ViT initialises its linear layers only. Twins' ``PosConv`` uses the
fan-out normal for its PEG.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from .base import Grid, PosStrategy
from .functional import GridConv


class PEG(PosStrategy):
    """A depthwise ``k x k`` convolution with a residual over the token grid after chosen blocks
    (CPVT: after block 0). Prefix tokens pass through unchanged."""

    name = "peg"

    def __init__(self, *, after: Sequence[int] = (0,), kernel_size: int = 3, **kw: Any) -> None:
        super().__init__(**kw)
        if isinstance(after, int) and not isinstance(after, bool):
            after = [after]  # one block
        if isinstance(after, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in after):
            raise ValueError(f"peg: after must be block indices (e.g. [0, 1]), got {after!r}")
        if self.depth < 1:
            raise ValueError(f"peg: the model has no blocks (depth {self.depth}) to put a convolution after")
        bad = [i for i in after if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"peg: block indices {bad} are outside 0..{self.depth - 1}")
        self.after = sorted(set(int(i) for i in after))
        self.convs = nn.ModuleDict({str(i): GridConv(self.dim, kernel_size, residual=True) for i in self.after})

    def after_block(self, x: Tensor, i: int, grid: Grid, num_prefix: int) -> Tensor:
        key = str(i)
        if key in self.convs:
            x = self.convs[key](x, grid, num_prefix)
        return x


class MixFFN(PosStrategy):
    """No explicit encoding: every FFN gets a ``3 x 3`` depthwise convolution between fc1 and the
    activation, as in SegFormer's Mix-FFN. The convolutions live in the FFNs (built through
    ``ffn_mixer``), so this strategy itself holds no parameters."""

    name = "mixffn"

    def __init__(self, *, kernel_size: int = 3, **kw: Any) -> None:
        super().__init__(**kw)
        self.kernel_size = kernel_size

    def ffn_mixer(self, hidden_dim: int) -> nn.Module:
        return GridConv(hidden_dim, self.kernel_size, residual=False)
