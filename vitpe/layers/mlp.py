"""The transformer FFN, with an optional token mixer between fc1 and the activation (Mix-FFN)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import bias_gelu as bias_gelu_kernel
from ..pos.base import BlockPos


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, mixer: nn.Module | None = None, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.mixer = mixer  # called with the grid; None keeps the plain FFN (and its state-dict keys)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor, pos: BlockPos) -> Tensor:
        if self.mixer is None and self.act.approximate == "none" and bias_gelu_kernel.available(x, self.fc1.bias):
            # fc1's product without its bias, then bias and GELU in one pass (and one pass back,
            # the bias gradient included)
            x = bias_gelu_kernel.bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias)
        else:
            x = self.fc1(x)
            if self.mixer is not None:
                x = self.mixer(x, pos.grid, pos.num_prefix)
            x = self.act(x)
        return self.drop2(self.fc2(self.drop1(x)))
