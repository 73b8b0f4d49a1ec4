"""Registration of vitpe models with timm: configs, builder, and the after-build input-size fix."""
from __future__ import annotations

from typing import Any, Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
import torch
from torch import nn

from ..layers import Block
from ..pos.base import clear_caches

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def cfg(input_size: int = 224, num_classes: int = 1000, first_conv: str = "patch_embed.proj",
        mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN, std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
        **kw: Any) -> dict[str, Any]:
    """A timm pretrained config with no download location: weights come from a local file,
    given as ``pretrained_cfg_overlay=dict(file=PATH)``."""
    return dict(url="", num_classes=num_classes, input_size=(3, input_size, input_size), pool_size=None,
                crop_pct=0.9 if input_size >= 224 else 1.0, interpolation="bicubic", fixed_input_size=False,
                mean=mean, std=std, first_conv=first_conv, classifier="head", license="apache-2.0", **kw)


class BlockModel(nn.Module):
    """What vitpe's backbones (ViT, MiT) share beyond ``nn.Module``: timm's gradient checkpointing
    over their ``Block``s, and dropping their strategies' cached tables."""

    grad_checkpointing = False  # set_grad_checkpointing

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward instead of keeping its activations (timm's
        ``--grad-checkpointing``): less memory for a second forward's time."""
        self.grad_checkpointing = enable
        for m in self.modules():
            if isinstance(m, Block):
                m.grad_checkpointing = enable

    def clear_pos_cache(self) -> None:
        """Drop the positional tables cached for forwards without gradients; needed only after the
        strategy's parameters were edited through ``.data`` (``vitpe.pos.base.GridCache``)."""
        clear_caches(self)


def create(model_cls: type[nn.Module], variant: str, pretrained: bool, filter_fn: Callable | None,
           feature_cfg: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """Build through timm (so pretrained files, features_only and num_classes work as in timm),
    then make the model's data config report the input size it was built for."""
    model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn,
                                 feature_cfg=feature_cfg or {}, **kwargs)
    img_size = kwargs.get("img_size")
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, h, w))
        model.default_cfg = model.pretrained_cfg
    return model


__all__ = ["BlockModel", "CIFAR_MEAN", "CIFAR_STD", "cfg", "create", "generate_default_cfgs", "register_model"]
