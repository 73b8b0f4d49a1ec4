"""Datasets: ImageNet-layout folders (robust to bad files), the synthetic positional task, and the
classification transforms. Detection and segmentation data live beside them."""
from .classification import AugConfig, ClsDataConfig, build_train_val, eval_dataset
from .folder import Batch, CachedImages, ImageFolder, Skipped, collate_skipping, load_rgb, to_rgb
from .synthetic import SyntheticPositions

__all__ = ["AugConfig", "Batch", "CachedImages", "ClsDataConfig", "ImageFolder", "Skipped", "SyntheticPositions",
           "build_train_val", "collate_skipping", "eval_dataset", "load_rgb", "to_rgb"]
