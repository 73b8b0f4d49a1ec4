"""Backbones; importing this registers them with timm (``timm.list_models('vitpe_*')``)."""
from .mit import MixTransformer
from .vit import VisionTransformer, checkpoint_filter_fn

__all__ = ["MixTransformer", "VisionTransformer", "checkpoint_filter_fn"]
