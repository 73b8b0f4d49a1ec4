"""DETR backbones: torchvision ResNets (optionally with frozen batch norm) or any timm model with
``features_only`` (vitpe's ViTs included, with their own positional strategy).

Weights come only from a local file (``weights=PATH``); nothing is downloaded.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from ..pos.base import GridCache

_logger = logging.getLogger(__name__)
RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}  # name -> layer4 channels


def load_state_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``path`` (bare or nested under 'model' / 'state_dict'), loaded with
    ``weights_only=True`` so a file carrying code is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors name nothing the user can act on
        raise ValueError(f"cannot load backbone weights {path} as plain tensors: {e}") from None
    for key in ("model", "state_dict"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    return sd


def _load_resnet(net: nn.Module, name: str, weights: str) -> None:
    """Load torchvision-named weights (the classifier ``fc`` is ignored) or say why they do not fit."""
    sd = {k: v for k, v in load_state_file(weights).items() if not k.startswith("fc.")}
    net.fc = nn.Identity()  # so that a checkpoint without fc leaves nothing missing
    try:
        missing, unexpected = net.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"backbone weights {weights} do not fit {name}: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ValueError(f"backbone weights {weights} do not fit {name}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


class FusedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """``FrozenBatchNorm2d`` (same buffers and state-dict keys) as one affine pass ``x * scale + shift``
    in ``x``'s dtype: torchvision's multiplies and adds in two passes over the map and, under bf16
    autocast, promotes the map to float32, so every following convolution first reads a float32 copy.

    ``scale`` and ``shift`` come from fixed buffers: they are made once per dtype and kept until a
    buffer changes (loading, moving), instead of in six tiny kernels per layer and step (a third of
    a ResNet-50's launches)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps)
        self._affine = GridCache(capacity=2)

    def _scale_shift(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """-> ``scale``, ``shift``, each ``(C, 1, 1)`` in ``dtype``."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return scale.to(dtype)[:, None, None], shift.to(dtype)[:, None, None]

    def forward(self, x: Tensor) -> Tensor:
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        scale, shift = self._affine.get(x.dtype, lambda: self._scale_shift(x.dtype), buffers)
        return torch.addcmul(shift, x, scale)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet up to ``layer4``: ``(B, 3, H, W)`` -> ``(B, C, H/32, W/32)``; with
    ``stages=3`` up to ``layer3``: ``(B, C/2, H/16, W/16)``, a finer grid for small objects.

    ``frozen_bn`` replaces batch norm by ``FrozenBatchNorm2d`` (DETR's choice with pretrained
    weights and small per-GPU batches); ``freeze_stem`` keeps the stem and ``layer1`` fixed, as DETR
    does with its pretrained backbone (training only ``layer2``-``layer4``). Weights and maps are channels-last, the layout in which cuDNN's
    convolutions are fastest (bf16 above all); the output map keeps it, so flattening it into
    tokens ``(B, H*W, C)`` is a view.
    """

    def __init__(self, name: str = "resnet50", *, weights: str | None = None, frozen_bn: bool = True,
                 freeze_stem: bool = False, stages: int = 4) -> None:
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown ResNet {name!r}; valid: {', '.join(RESNETS)}")
        if stages not in (3, 4):
            raise ValueError(f"{name}: stages must be 3 (stride 16) or 4 (stride 32), got {stages}")
        if frozen_bn and not weights:
            _logger.warning("%s: frozen batch norm without a weights file leaves the network unnormalised; "
                            "set frozen_bn=false to train from scratch", name)
        norm = FusedFrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        net = getattr(torchvision.models, name)(weights=None, norm_layer=norm)
        if weights:
            _load_resnet(net, name, weights)
        self.body = nn.Sequential(*list(net.children())[:4 + stages])  # stem, then layer1..layer<stages>
        self.body.to(memory_format=torch.channels_last)
        self.num_channels = RESNETS[name] // (2 ** (4 - stages))
        self.stride = 2 ** (1 + stages)
        if freeze_stem:
            for m in list(self.body.children())[:5]:  # conv1, bn1, relu, maxpool, layer1
                m.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.contiguous(memory_format=torch.channels_last))


class TimmBackbone(nn.Module):
    """The last feature map of a timm model built with ``features_only``: ``(B, C, H/s, W/s)``.

    For vitpe's ViTs ``pos`` chooses the backbone's own strategy. A ViT attends over the padded
    image too (it takes no mask); the DETR encoder above it does not.
    """

    def __init__(self, name: str, *, weights: str | None = None, pos: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        if pos is not None and name.startswith("vitpe_"):
            kwargs["pos"] = pos
        if weights:
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
        try:
            self.body = timm.create_model(name, features_only=True, out_indices=(-1,), **kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(f"unknown backbone {name!r}: neither a ResNet ({', '.join(RESNETS)}) nor a "
                                 f"timm model") from None
            raise
        self.num_channels = self.body.feature_info.channels()[-1]
        self.stride = self.body.feature_info.reduction()[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)[-1]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The model's own ``no_weight_decay()`` (a ViT's position tables and class token), named
        from here: timm's feature wrapper for vitpe's models (and timm's ViTs) keeps it as ``model``."""
        inner = getattr(self.body, "model", None)
        names = inner.no_weight_decay() if hasattr(inner, "no_weight_decay") else set()
        return {f"body.model.{n}" for n in names}


def build_backbone(name: str, *, weights: str | None = None, frozen_bn: bool = True, freeze_stem: bool = False,
                   pos: str | None = None, stages: int = 4) -> nn.Module:
    """A ResNet by torchvision name (``stages`` 3 or 4), else a timm model (``pos`` for vitpe's ViTs)."""
    if name in RESNETS:
        return ResNetBackbone(name, weights=weights, frozen_bn=frozen_bn, freeze_stem=freeze_stem, stages=stages)
    return TimmBackbone(name, weights=weights, pos=pos)


__all__ = ["RESNETS", "FusedFrozenBatchNorm2d", "ResNetBackbone", "TimmBackbone", "build_backbone", "load_state_file"]
