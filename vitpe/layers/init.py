"""Weight initialisation shared by the backbones."""
from __future__ import annotations

import math

from timm.layers import trunc_normal_
from torch import nn


def init_weights_(root: nn.Module, conv_fan_out: bool = False) -> None:
    """Truncated normal (std 0.02) for linear layers, ones and zeros for LayerNorm (ViT/DeiT);
    with ``conv_fan_out`` also He normal over the fan-out for convolutions (SegFormer)."""
    for m in root.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif conv_fan_out and isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
