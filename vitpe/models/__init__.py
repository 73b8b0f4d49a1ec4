"""Backbones; importing this registers them with timm (``timm.list_models('vitpe_*')``)."""
from .vit import VisionTransformer, checkpoint_filter_fn

__all__ = ["VisionTransformer", "checkpoint_filter_fn"]
