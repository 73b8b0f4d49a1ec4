"""Mix Transformer (MiT), SegFormer's hierarchical backbone, with a swappable positional strategy.

Four stages, built in one loop. Each stage: an overlapping patch embedding (7x7 stride 4, then 3x3
stride 2), blocks of spatial-reduction attention and FFN, and a LayerNorm; its output map feeds the
next stage. Each stage owns its own strategy instance, built for the stage's width, heads, depth
and native grid, and runs the ViT's hook loop (embed, context, blocks, after_block) on its own
grid. ``mixffn`` (SegFormer's Mix-FFN) is the default. Attention reads its keys from a grid reduced
by the stage's ratio, so the context is built with ``kv_stride`` (rotary keys at the reduced
cells' centres, biases for query x key positions). Any input size works (480x360 included).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from einops import rearrange
from timm.layers import to_2tuple
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from .. import pos as pos_lib
from ..layers import Block
from ..layers.init import init_weights_
from ..layers.overlap_patch_embed import OverlapPatchEmbed, overlap_grid
from ..layers.sr_attention import SRAttention
from ..pos.base import Grid
from ._timm import BlockModel
from .mit_convert import convert_segformer_state_dict



class MiTStage(nn.Module):
    """One stage: ``(B, C_in, H, W)`` -> ``(B, dim, h, w)``, ``h = ceil(H / stride)``."""

    def __init__(self, in_chans: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, sr_ratio: int,
                 patch: tuple[int, int], native_grid: Grid, pos: str, pos_kwargs: dict | None,
                 qkv_bias: bool, drop: float, attn_drop: float, drop_path: Sequence[float]) -> None:
        super().__init__()
        self.sr_ratio = sr_ratio
        self.patch_embed = OverlapPatchEmbed(in_chans, dim, *patch)
        self.pos = pos_lib.build(pos, dim=dim, num_heads=num_heads, depth=depth, grid=native_grid,
                                 num_prefix=0, pos_kwargs=pos_kwargs)
        if sr_ratio > 1 and not self.pos.supports_kv_stride():
            bad = [p.name for p in self.pos.parts() if not p.supports_kv_stride()]
            raise ValueError(f"positional strategy {bad[0]!r} cannot be used in the Mix Transformer (MiT): its "
                             f"attention reads keys from a grid reduced {sr_ratio}x and {bad[0]!r} builds no "
                             f"context for reduced keys (its context() takes no kv_stride)")
        hidden = int(dim * mlp_ratio)
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, mlp_ratio, qkv_bias, mixer=self.pos.ffn_mixer(hidden), drop=drop,
                  attn_drop=attn_drop, drop_path=drop_path[i],
                  attn=SRAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, drop))
            for i in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x, grid = self.patch_embed(x)  # (B, h*w, dim)
        x = self.pos.embed(x, grid, 0)
        ctx = self.pos.context(grid, 0, kv_stride=self.sr_ratio)
        for i, blk in enumerate(self.blocks):
            x = blk(x, ctx.block(i))
            x = self.pos.after_block(x, i, grid, 0)
        return rearrange(self.norm(x), "b (h w) c -> b c h w", h=grid[0])  # (B, dim, h, w)


class MixTransformer(BlockModel):
    """MiT-B0..B5 with ``pos`` any strategy of ``vitpe.pos`` (``a+b`` too), options in ``pos_kwargs``
    (given to every stage). ``img_size`` sets only the native grids of grid-shaped strategies."""

    def __init__(self, img_size: int | Sequence[int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (64, 128, 320, 512), num_heads: Sequence[int] = (1, 2, 5, 8),
                 depths: Sequence[int] = (3, 4, 6, 3), mlp_ratios: Sequence[float] = (4, 4, 4, 4),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), qkv_bias: bool = True, pos: str = "mixffn",
                 pos_kwargs: dict[str, dict[str, Any]] | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "avg") -> None:
        super().__init__()
        if len({len(embed_dims), len(num_heads), len(depths), len(mlp_ratios), len(sr_ratios)}) != 1:
            raise ValueError("embed_dims, num_heads, depths, mlp_ratios and sr_ratios must have one entry per stage")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes, self.global_pool = num_classes, global_pool
        self.embed_dims = list(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.img_size = tuple(int(v) for v in to_2tuple(img_size))
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        self.feature_info: list[dict[str, Any]] = []
        size, chans, reduction = self.img_size, in_chans, 1
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            patch = (7, 4) if i == 0 else (3, 2)
            stage = MiTStage(chans, dim, depth, num_heads[i], mlp_ratios[i], sr_ratios[i], patch,
                             overlap_grid(size, *patch), pos, pos_kwargs, qkv_bias,
                             drop_rate, attn_drop_rate, dpr[sum(depths[:i]): sum(depths[: i + 1])])
            self.stages.append(stage)
            size, chans, reduction = stage.pos.native_grid, dim, reduction * patch[1]
            self.feature_info.append(dict(module=f"stages.{i}", num_chs=dim, reduction=reduction))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # -- init --------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """SegFormer's: truncated normal for linear layers, He (fan-out) normal for convolutions."""
        init_weights_(self, conv_fan_out=True)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"stages.{i}.pos.{n}" for i, s in enumerate(self.stages) for n, _ in s.pos.named_parameters()}

    # -- forward -----------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> last stage's map ``(B, C4, H/32, W/32)`` (sides rounded up)."""
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # -- timm interface ----------------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's intermediate-feature API: stage outputs ``(B, C_i, H/4/2^i, W/4/2^i)`` (or ``NHWC``).
        Every stage ends in its own LayerNorm, so ``norm`` changes nothing."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        feats = []
        stages = self.stages[: max_index + 1] if stop_early or intermediates_only else self.stages
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                feats.append(x if output_fmt == "NCHW" else x.permute(0, 2, 3, 1))
        return feats if intermediates_only else (x, feats)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take


def checkpoint_filter_fn(state_dict: dict[str, Any], model: MixTransformer) -> dict[str, Tensor]:
    """Map a SegFormer checkpoint (NVlabs, mmseg or Hugging Face layout, or a vitpe one) onto ``model``.

    SegFormer's Mix-FFN convolutions need a model whose strategy includes ``mixffn``; decode-head
    entries of a segmentation checkpoint are dropped (load those with ``Segmentor``).
    """
    sd = convert_segformer_state_dict(state_dict, head=False)
    has_dwconv = any(".mlp.mixer." in k for k in sd)
    if has_dwconv and not any(s.pos.find("mixffn") is not None for s in model.stages):
        raise ValueError(f"the checkpoint has Mix-FFN convolutions (mlp.dwconv) but the model's strategy is "
                         f"{model.stages[0].pos.name!r}; build it with pos='mixffn' (or a combination with it)")
    return sd


# -- timm registry ---------------------------------------------------------------------------
from ._timm import cfg, create, generate_default_cfgs, register_model  # noqa: E402

_SIZES: dict[str, dict[str, Any]] = {
    "b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "b3": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "b4": dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "b5": dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
}

default_cfgs = generate_default_cfgs({
    f"vitpe_mit_{size}": cfg(first_conv="stages.0.patch_embed.proj")
    for size in _SIZES})


def _mit(size: str, pretrained: bool, **kwargs: Any) -> MixTransformer:
    args = dict(_SIZES[size], num_heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1), mlp_ratios=(4, 4, 4, 4))
    args.update(kwargs)
    return create(MixTransformer, f"vitpe_mit_{size}", pretrained, checkpoint_filter_fn,
                  feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **args)


@register_model
def vitpe_mit_b0(pretrained: bool = False, **kwargs: Any) -> MixTransformer:
    """MiT-B0 (widths 32-64-160-256, depths 2-2-2-2), any positional strategy (``pos=``, default mixffn)."""
    return _mit("b0", pretrained, **kwargs)


@register_model
def vitpe_mit_b1(pretrained: bool = False, **kwargs: Any) -> MixTransformer:
    """MiT-B1 (widths 64-128-320-512, depths 2-2-2-2)."""
    return _mit("b1", pretrained, **kwargs)


@register_model
def vitpe_mit_b2(pretrained: bool = False, **kwargs: Any) -> MixTransformer:
    """MiT-B2 (widths 64-128-320-512, depths 3-4-6-3)."""
    return _mit("b2", pretrained, **kwargs)


@register_model
def vitpe_mit_b3(pretrained: bool = False, **kwargs: Any) -> MixTransformer:
    """MiT-B3 (widths 64-128-320-512, depths 3-4-18-3)."""
    return _mit("b3", pretrained, **kwargs)


@register_model
def vitpe_mit_b4(pretrained: bool = False, **kwargs: Any) -> MixTransformer:
    """MiT-B4 (widths 64-128-320-512, depths 3-8-27-3)."""
    return _mit("b4", pretrained, **kwargs)


@register_model
def vitpe_mit_b5(pretrained: bool = False, **kwargs: Any) -> MixTransformer:
    """MiT-B5 (widths 64-128-320-512, depths 3-6-40-3)."""
    return _mit("b5", pretrained, **kwargs)
