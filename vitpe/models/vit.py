"""Plain ViT / DeiT whose positional encoding is a swappable strategy.

Layout and state-dict keys follow timm's ``VisionTransformer`` (``cls_token``, ``reg_token``,
``patch_embed.proj``, ``blocks.i.attn.qkv``, ``norm``, ``head``), so timm checkpoints load with only
the table moved to the strategy (``pos_embed`` -> ``pos.pos_embed``). Any input whose sides are
multiples of the patch size runs without rebuilding: the strategy follows the grid (timm's
``dynamic_img_size`` is always on; ``dynamic_img_pad`` pads other sizes).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.layers import resample_patch_embed, to_2tuple
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from .. import pos as pos_lib
from ..layers import Block, PatchEmbed
from ..layers.init import init_weights_
from ..pos.base import Grid
from ._timm import BlockModel

_POOLS = ("token", "avg", "max", "avgmax", "")



class VisionTransformer(BlockModel):
    """ViT with ``pos`` any strategy of ``vitpe.pos`` (a name or ``a+b``), options in ``pos_kwargs``."""

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "token", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, class_token: bool = True,
                 pos: str = "learned", pos_kwargs: dict[str, dict[str, Any]] | None = None,
                 drop_rate: float = 0.0, pos_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, fc_norm: bool | None = None, reg_tokens: int = 0,
                 no_embed_class: bool = False, dynamic_img_size: bool = True, dynamic_img_pad: bool = False) -> None:
        """timm's arguments where they apply: ``reg_tokens`` register tokens after the class token;
        ``no_embed_class`` gives prefix tokens no row of a learned table (``prefix_pos=False``);
        ``dynamic_img_size`` is accepted and always on; ``dynamic_img_pad`` pads an input whose sides
        are not multiples of the patch size at the bottom and right, as timm does."""
        super().__init__()
        if global_pool not in _POOLS:
            raise ValueError(f"global_pool must be one of {_POOLS}, got {global_pool!r}"
                             + (" (attention pooling is not supported)" if global_pool == "map" else ""))
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.dynamic_img_pad = dynamic_img_pad
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be a multiple of num_heads {num_heads}")
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.img_size = tuple(int(v) for v in to_2tuple(img_size))
        grid = self.patch_embed.grid_of(*self.img_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        if no_embed_class and "learned" in pos_lib.split(pos):
            pos_kwargs = dict(pos_kwargs or {})
            pos_kwargs["learned"] = {**pos_kwargs.get("learned", {}), "prefix_pos": False}
        self._pos_args = dict(spec=pos, dim=embed_dim, num_heads=num_heads, depth=depth,
                              num_prefix=self.num_prefix_tokens, pos_kwargs=pos_kwargs)
        self.pos = pos_lib.build(**self._pos_args, grid=grid)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, mixer=self.pos.ffn_mixer(int(embed_dim * mlp_ratio)),
                  drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i])
            for i in range(depth)])
        use_fc_norm = global_pool in ("avg", "max", "avgmax") if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=self.patch_embed.patch_size[0])
                             for i in range(depth)]
        self.init_weights()

    # -- init --------------------------------------------------------------------------------
    def init_weights(self) -> None:
        init_weights_(self)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The prefix tokens and the strategy's parameters. Register tokens are left undecayed as
        the class token is; timm's ViT decays them (its set names only ``cls_token``,
        ``pos_embed`` and ``dist_token``)."""
        names = {"cls_token", "reg_token"}
        names |= {f"pos.{n}" for n, _ in self.pos.named_parameters()}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups as timm's ViT names them (layer-wise learning-rate decay): the stem
        (patch embedding, prefix tokens and the strategy's parameters), then one group a block."""
        return dict(stem=r"^cls_token|^reg_token|^pos\.|^patch_embed", blocks=[(r"^blocks\.(\d+)", None),
                                                                               (r"^norm", (99999,))])

    # -- trunk -------------------------------------------------------------------------------
    def _embed(self, x: Tensor) -> tuple[Tensor, Grid]:
        if self.dynamic_img_pad:
            p = self.patch_embed.patch_size
            x = F.pad(x, (0, -x.shape[-1] % p[1], 0, -x.shape[-2] % p[0]))
        x, grid = self.patch_embed(x)  # (B, N, C)
        # The residual stream keeps the parameters' dtype: under bf16 autocast the convolution
        # returns bf16, but sums of many blocks' outputs belong in float32 (as in timm).
        x = x.to(self.patch_embed.proj.weight.dtype)
        prefix = [t.expand(x.shape[0], -1, -1).to(x.dtype) for t in (self.cls_token, self.reg_token) if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        x = self.pos.embed(x, grid, self.num_prefix_tokens)  # (B, P + N, C)
        return self.pos_drop(x), grid

    def _blocks(self, x: Tensor, grid: Grid, upto: int | None = None):
        """Yield ``(i, x)`` after each block (and its after-block hook)."""
        ctx = self.pos.context(grid, self.num_prefix_tokens)
        for i, blk in enumerate(self.blocks[: None if upto is None else upto + 1]):
            x = blk(x, ctx.block(i))
            x = self.pos.after_block(x, i, grid, self.num_prefix_tokens)
            yield i, x

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> normalised tokens ``(B, P + H/p * W/p, C)``."""
        x, grid = self._embed(x)
        for _, x in self._blocks(x, grid):
            pass
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool:  # over the patch tokens
            patches = x[:, self.num_prefix_tokens:]
            if self.global_pool == "avg":
                x = patches.mean(dim=1)
            elif self.global_pool == "max":
                x = patches.amax(dim=1)
            else:  # avgmax
                x = 0.5 * (patches.amax(dim=1) + patches.mean(dim=1))
        x = self.head_drop(self.fc_norm(x))
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
            if global_pool not in _POOLS:
                raise ValueError(f"global_pool must be one of {_POOLS}, got {global_pool!r}")
            if global_pool == "token" and self.cls_token is None:
                raise ValueError("global_pool='token' needs a class token")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def set_input_size(self, img_size: int | Sequence[int] | None = None,
                       patch_size: int | Sequence[int] | None = None) -> None:
        """timm's: make ``img_size`` (and ``patch_size``) the model's own. Every size runs anyway;
        this resamples the grid-shaped tables (learned, relative bias) to the new grid once, so
        that it runs without resampling, and a new patch size resamples the patch embedding's
        kernel as timm does. The data config reports the new size. A strategy whose tables change
        shape is built again (its values resampled, its frozen parameters and mode kept): build the
        optimizer after this call, as its parameters are new tensors."""
        p = tuple(int(v) for v in to_2tuple(patch_size)) if patch_size is not None else self.patch_embed.patch_size
        if p[0] != p[1] or p[0] < 1:
            raise ValueError(f"set_input_size: patch_size must be a positive square, got {patch_size!r}")
        new_size = tuple(int(v) for v in to_2tuple(img_size)) if img_size is not None else self.img_size
        if new_size[0] % p[0] or new_size[1] % p[0]:  # checked before anything changes
            raise ValueError(f"set_input_size: img_size {new_size[0]}x{new_size[1]} is not a multiple of the "
                             f"patch size {p[0]}")
        if patch_size is not None:
            old = self.patch_embed.proj
            proj = nn.Conv2d(old.in_channels, old.out_channels, p, p).to(old.weight.device, old.weight.dtype)
            with torch.no_grad():
                proj.weight.copy_(resample_patch_embed(old.weight, list(p)))
                proj.bias.copy_(old.bias)
            self.patch_embed.proj, self.patch_embed.patch_size = proj, p
            for info in self.feature_info:
                info["reduction"] = p[0]
        if img_size is not None:
            self.img_size = tuple(int(v) for v in to_2tuple(img_size))
        grid = self.patch_embed.grid_of(*self.img_size)
        if grid != self.pos.native_grid:
            old_pos = self.pos
            # the new strategy where the old one's tensors were (a strategy of buffers alone too)
            ref = next((t for t in (*old_pos.parameters(), *old_pos.buffers()) if t.is_floating_point()),
                       self.patch_embed.proj.weight)
            self.pos = pos_lib.build(**self._pos_args, grid=grid).to(ref.device, ref.dtype)
            self.pos.load_state_dict(old_pos.state_dict())  # grid-shaped tables resampled on load
            # the old strategy's state apart from its values: train or eval, and which tensors train
            self.pos.train(old_pos.training)
            frozen = {n for n, t in old_pos.named_parameters() if not t.requires_grad}
            for n, t in self.pos.named_parameters():
                t.requires_grad_(n not in frozen)
        cfg = getattr(self, "pretrained_cfg", None)
        if cfg is not None:
            self.pretrained_cfg = self.default_cfg = dict(cfg, input_size=(cfg["input_size"][0], *self.img_size))

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's intermediate-feature API: block outputs as ``(B, C, H/p, W/p)`` maps (or ``NLC``)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x, grid = self._embed(x)
        feats = []
        for i, x in self._blocks(x, grid, upto=max_index if stop_early else None):
            if i in take:
                feats.append(self.norm(x) if norm else x)
        P = self.num_prefix_tokens
        prefixes = [f[:, :P] for f in feats]
        feats = [f[:, P:] for f in feats]
        if output_fmt == "NCHW":
            feats = [f.reshape(B, grid[0], grid[1], f.shape[-1]).permute(0, 3, 1, 2).contiguous() for f in feats]
        if return_prefix_tokens and P:
            feats = list(zip(feats, prefixes))
        if intermediates_only:
            return feats
        return self.norm(x), feats

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take


# -- timm registry ---------------------------------------------------------------------------
from ._timm import CIFAR_MEAN, CIFAR_STD, cfg, create, generate_default_cfgs, register_model  # noqa: E402
from .vit_convert import checkpoint_filter_fn  # noqa: E402  (timm checkpoints -> this model)

default_cfgs = generate_default_cfgs({
    "vitpe_vit_tiny_patch16_224": cfg(),
    "vitpe_vit_small_patch16_224": cfg(),
    "vitpe_vit_base_patch16_224": cfg(),
    "vitpe_vit_tiny_patch4_32": cfg(32, 10, mean=CIFAR_MEAN, std=CIFAR_STD),
    "vitpe_vit_small_patch4_32": cfg(32, 10, mean=CIFAR_MEAN, std=CIFAR_STD),
})

_SIZES = {"tiny": dict(embed_dim=192, depth=12, num_heads=3),
          "small": dict(embed_dim=384, depth=12, num_heads=6),
          "base": dict(embed_dim=768, depth=12, num_heads=12)}


def _vit(variant: str, pretrained: bool, size: str, default_patch: int, **kwargs: Any) -> VisionTransformer:
    """``variant``'s model; ``kwargs`` (``patch_size``, ``img_size``, ``pos``, ...) override its
    defaults, as timm's ``create_model`` arguments do (a checkpoint of another patch size has its
    patch embedding resampled by ``checkpoint_filter_fn``)."""
    args = dict(_SIZES[size], patch_size=default_patch)
    args.update(kwargs)
    return create(VisionTransformer, variant, pretrained, checkpoint_filter_fn,
                  feature_cfg=dict(out_indices=3, feature_cls="getter"), **args)


@register_model
def vitpe_vit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Tiny (192 wide, 12 blocks, 3 heads), 16x16 patches, any positional strategy (``pos=``)."""
    return _vit("vitpe_vit_tiny_patch16_224", pretrained, "tiny", 16, **kwargs)


@register_model
def vitpe_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Small (384 wide, 12 blocks, 6 heads), 16x16 patches."""
    return _vit("vitpe_vit_small_patch16_224", pretrained, "small", 16, **kwargs)


@register_model
def vitpe_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Base / DeiT-Base (768 wide, 12 blocks, 12 heads), 16x16 patches."""
    return _vit("vitpe_vit_base_patch16_224", pretrained, "base", 16, **kwargs)


@register_model
def vitpe_vit_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Tiny on 32x32 images (CIFAR) with 4x4 patches: an 8x8 grid."""
    return _vit("vitpe_vit_tiny_patch4_32", pretrained, "tiny", 4, img_size=kwargs.pop("img_size", 32), **kwargs)


@register_model
def vitpe_vit_small_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Small on 32x32 images with 4x4 patches."""
    return _vit("vitpe_vit_small_patch4_32", pretrained, "small", 4, img_size=kwargs.pop("img_size", 32), **kwargs)
