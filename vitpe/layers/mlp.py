"""The transformer FFN, with an optional token mixer between fc1 and the activation (Mix-FFN); a
mixer that can apply the activation itself is asked to."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import bias_gelu
from ..pos.base import BlockPos


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, mixer: nn.Module | None = None, drop: float = 0.0,
                 act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.mixer = mixer  # called with the grid; None keeps the plain FFN (and its state-dict keys)
        self.act = act()  # the exact GELU (ViT, MiT); DETR's transformer: ReLU
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor, pos: BlockPos) -> Tensor:
        if self.mixer is None and self._exact_gelu() and bias_gelu.IN_MLP and bias_gelu.available(x, self.fc1.bias):
            # fc1 as a product without its bias, then the bias and the GELU in one pass (and one
            # pass back, the bias gradient included)
            x = bias_gelu.bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias)
            return self.drop2(self.fc2(self.drop1(x)))
        mixer_kw = {}
        if self.mixer is not None and self.fc1.bias is not None and \
                getattr(self.mixer, "sums_input_bias_grad", lambda t: False)(x):
            # the mixer's backward sums fc1's bias gradient as it computes its input gradient:
            # the bias is added here without a gradient and handed over for its gradient
            x = F.linear(x, self.fc1.weight, self.fc1.bias.detach())
            mixer_kw["input_bias"] = self.fc1.bias
        else:
            x = self.fc1(x)
        if self._mixer_applies_act():
            x = self.mixer(x, pos.grid, pos.num_prefix, gelu=True, **mixer_kw)
        else:
            if self.mixer is not None:
                x = self.mixer(x, pos.grid, pos.num_prefix, **mixer_kw)
            x = self.act(x)
        return self.drop2(self.fc2(self.drop1(x)))

    def _mixer_applies_act(self) -> bool:
        """Whether the mixer applies the activation itself: one that says so (``fuses_gelu``, as
        ``GridConv`` without residual in inference, whose kernel then saves the GELU's passes over
        the hidden layer), with the activation the exact GELU."""
        return getattr(self.mixer, "fuses_gelu", False) and self._exact_gelu()

    def _exact_gelu(self) -> bool:
        return isinstance(self.act, nn.GELU) and self.act.approximate == "none"
