"""Segmentation models: a backbone's feature maps, a decode head, logits at the input size.

- ``AllMLPHead``: SegFormer's decoder for the MiT (each stage's map projected to one width,
  upsampled to 1/4, concatenated, fused by a 1x1 convolution, classified);
- ``SimpleHead``: for the plain ViT, the last block's tokens as a map, normalised and classified
  per patch, then upsampled (Segmenter's linear decoder).

Keys of ``Segmentor`` are ``backbone.*`` and ``decode_head.*``, the layout that
``convert_segformer_state_dict`` gives for SegFormer's segmentation checkpoints.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence

import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..pos.functional import resize_bilinear
from .mit import MixTransformer
from .vit import VisionTransformer


class _Proj(nn.Module):
    """A linear layer over the channels of a map: ``(B, C, H, W)`` -> ``(B, dim, H, W)``."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_chans, dim)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(rearrange(x, "b c h w -> b h w c")), "b h w c -> b c h w")


def _upsample(x: Tensor, size: Sequence[int], channels_last: bool = False) -> Tensor:
    """Bilinear resize of ``(B, C, h, w)`` (or ``(B, h, w, C)``) to ``size``. Compiled, as two
    matrix products (``resize_bilinear``): inductor made ``F.interpolate`` over the head's wide maps
    into gathers, and its backward into a scatter-add, 45 % of MiT-B2's compiled step, and the
    products took the step from 193 to 305 img/s (H100, docs/performance.md). Eager, torch's own
    kernel, as fast as it was. The same values either way; a map already at ``size`` is returned
    as it is (the head's first map)."""
    if tuple(x.shape[1:3] if channels_last else x.shape[-2:]) == tuple(int(v) for v in size):
        return x
    if torch.compiler.is_compiling():
        return resize_bilinear(x, size, channels_last)
    if channels_last:
        x = rearrange(x, "b h w c -> b c h w")
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return rearrange(x, "b c h w -> b h w c") if channels_last else x


class AllMLPHead(nn.Module):
    """SegFormer's All-MLP decoder: stage maps ``[(B, C_i, H_i, W_i)]`` -> logits ``(B, K, H_1, W_1)``.

    SegFormer projects every map to ``embed_dim``, upsamples it to the first map's size,
    concatenates the four and fuses them with a 1x1 convolution. Projection, upsampling and fusion
    are all linear, and bilinear upsampling commutes with a map over channels (its weights sum to
    one, so it keeps constants too). So the same function is computed here with each stage's
    projection and its slice of ``fuse`` composed into one ``C_i -> embed_dim`` map applied at the
    stage's own resolution, and the upsampled results summed: no ``4 * embed_dim``-wide map at a
    quarter of the input is made, multiplied or kept for the backward. The parameters (and keys)
    are SegFormer's, so checkpoints load and train as before.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.linear_c = nn.ModuleList([_Proj(c, embed_dim) for c in in_channels])
        self.fuse = nn.Conv2d(embed_dim * len(in_channels), embed_dim, 1, bias=False)
        self.norm = nn.BatchNorm2d(embed_dim)
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def composed(self) -> tuple[list[Tensor], Tensor]:
        """Per stage ``fuse_i @ proj_i`` ``(embed_dim, C_i)``, and the one bias ``sum_i fuse_i @ b_i``
        ``(embed_dim,)``. In float32 even under autocast: a few small products, made once per step."""
        fuse = self.fuse.weight.flatten(1)  # (D, n * D), deepest stage first as in SegFormer's checkpoints
        slices = fuse.chunk(len(self.linear_c), dim=1)[::-1]  # slices[i] belongs to stage i
        device = fuse.device.type
        # (not torch.amp.is_autocast_available: dynamo cannot trace it, and the graph would break here)
        with torch.autocast(device, enabled=False) if device in ("cuda", "cpu") else nullcontext():
            weights = [w @ lin.proj.weight for w, lin in zip(slices, self.linear_c)]
            bias = sum(w @ lin.proj.bias for w, lin in zip(slices, self.linear_c))
        return weights, bias

    def forward(self, feats: list[Tensor]) -> Tensor:
        size = feats[0].shape[-2:]
        weights, bias = self.composed()
        x = None
        for i, (f, w) in enumerate(zip(feats, weights)):
            # channels-last (B, h, w, D): the stage maps are channels-last views, so nothing is copied
            y = _upsample(F.linear(rearrange(f, "b c h w -> b h w c"), w, bias if i == 0 else None), size, True)
            x = y if x is None else x + y  # not in place: on a view, that costs a copy per map in the backward
        return self.classifier(self.dropout(self.act(self.norm(rearrange(x, "b h w c -> b c h w")))))


class SimpleHead(nn.Module):
    """The last feature map ``(B, C, h, w)`` -> BatchNorm -> 1x1 classifier -> ``(B, K, h, w)``."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, dropout: float = 0.1, **_: Any) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels[-1])
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(in_channels[-1], num_classes, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.norm(feats[-1])))


class Segmentor(nn.Module):
    """``backbone.forward_intermediates`` -> ``decode_head`` -> logits upsampled to the input.

    Inputs of any size: they are zero-padded (bottom, right) to a multiple of ``size_divisor``
    (the ViT's patch size) and the logits cropped back, so ``(B, 3, H, W)`` -> ``(B, K, H, W)``.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, indices: int | list[int],
                 size_divisor: int = 1, norm: bool = False) -> None:
        super().__init__()
        self.backbone, self.decode_head = backbone, decode_head
        self.indices, self.size_divisor, self.norm = indices, size_divisor, norm

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        d = self.size_divisor
        pad_h, pad_w = (-H) % d, (-W) % d
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = self.backbone.forward_intermediates(x, indices=self.indices, norm=self.norm, intermediates_only=True)
        # the head's maps are channels-last; the loss's softmax over classes copies a channels-last
        # input to NCHW, so copy the small map here rather than the upsampled one there
        logits = _upsample(self.decode_head(feats).contiguous(), x.shape[-2:])
        return logits[..., :H, :W]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{n}" for n in inner}


def build_segmentor(name: str, num_classes: int, pos: str | None = None, pos_kwargs: dict | None = None,
                    img_size: int | None = None, head_dim: int = 256, dropout: float = 0.1,
                    **kwargs: Any) -> Segmentor:
    """A vitpe MiT with the All-MLP head, or a vitpe ViT with the simple head, from a timm name."""
    import vitpe  # noqa: F401  (registers the backbones)

    args = dict(kwargs, num_classes=0)
    if pos is not None:
        args.update(pos=pos, pos_kwargs=pos_kwargs or None)
    if img_size is not None:
        args["img_size"] = img_size
    backbone = timm.create_model(name, **args)
    if isinstance(backbone, MixTransformer):
        head = AllMLPHead(backbone.embed_dims, num_classes, head_dim, dropout)
        return Segmentor(backbone, head, list(range(len(backbone.stages))))
    if isinstance(backbone, VisionTransformer):
        head = SimpleHead([backbone.embed_dim], num_classes, dropout)
        return Segmentor(backbone, head, 1, backbone.patch_embed.patch_size[0], norm=True)
    raise ValueError(f"no segmentation head for {name!r}: use a vitpe_mit_* or vitpe_vit_* model")


__all__ = ["AllMLPHead", "Segmentor", "SimpleHead", "build_segmentor"]
