"""Classification datasets and timm transforms, built from the config sections below.

``data.path`` is an ImageNet-layout folder or ``synthetic``. Evaluation at another size resizes
the shorter side to that size over ``data.crop_pct`` and centre-crops that size (folders), or
renders the synthetic scene at that size, so the model sees the same content on a finer or coarser
patch grid.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal

from timm.data import DEFAULT_CROP_PCT, create_transform
from torch.utils.data import Dataset

from ..config import ConfigError, DataConfig
from ..errors import UserError
from . import synthetic
from .folder import CachedImages, ImageFolder
from .gpu_decode import EncodedFolder, check_aug


@dataclass
class ClsDataConfig(DataConfig):
    train_split: str = "train"  # sub-folder of data.path used for training
    val_split: str = "val"  # sub-folder used for validation and the resolution evaluation
    cache: bool = False  # decode every training/validation image once into memory (small datasets like CIFAR)
    decode: Literal["cpu", "gpu"] = "cpu"  # gpu: workers only read training JPEGs; the device decodes, crops, flips
    synthetic_train: int = 1600  # samples of the synthetic training set (enough for a tiny ViT to learn it)
    synthetic_val: int = 500  # samples of the synthetic validation set
    # evaluation of folders at a size S: the shorter side resized to S / crop_pct, then the centre S x S
    # (timm's crop_pct; 1.0: the whole shorter side). None: the model's own, as timm's validate.py takes
    # it (its pretrained config: 0.9 for vitpe's ViTs at 224 px and up, 1.0 for the 32-px ones; 0.875
    # for a model without one), written into the run's config.yaml
    crop_pct: float | None = None

    def __post_init__(self) -> None:
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError(f"key 'data.crop_pct': expected a fraction in (0, 1], got {self.crop_pct}")


@dataclass
class AugConfig:
    scale: tuple[float, float] = (0.35, 1.0)  # RandomResizedCrop area range; at 32 px DeiT's 0.08 leaves too little
    ratio: tuple[float, float] = (0.75, 1.3333)  # RandomResizedCrop aspect range
    hflip: float = 0.5  # horizontal-flip probability (ignored for synthetic data, where it would flip labels)
    color_jitter: float = 0.0  # timm colour jitter strength; 0 disables it
    auto_augment: str | None = None  # timm RandAugment spec, e.g. "rand-m9-mstd0.5-inc1"; None disables it
    re_prob: float = 0.0  # random-erasing probability
    re_mode: Literal["const", "rand", "pixel"] = "pixel"  # erased pixels: zeros, per-channel or per-pixel noise
    # (timm's train.py and DeiT: pixel; timm's create_transform alone defaults to const)
    re_count: int = 1  # erased boxes per image
    mixup: float = 0.0  # mixup alpha (0 disables); mixing needs soft targets, handled by the loss
    cutmix: float = 0.0  # cutmix alpha (0 disables)
    label_smoothing: float = 0.1  # smoothing of the one-hot targets (also used inside mixup)
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"] = "bicubic"  # resize
    # interpolation, for training and evaluation (the GPU decoding path: bicubic, bilinear or nearest)


def is_synthetic(data: DataConfig) -> bool:
    return data.path == "synthetic"


def train_transform(img_size: int, aug: AugConfig, mean: tuple, std: tuple) -> Callable:
    """timm's training pipeline: random-resized crop, flip, optional jitter/RandAugment/erasing."""
    try:
        return create_transform(img_size, is_training=True, scale=tuple(aug.scale), ratio=tuple(aug.ratio),
                                hflip=aug.hflip, vflip=0.0, color_jitter=aug.color_jitter or None,
                                auto_augment=aug.auto_augment, re_prob=aug.re_prob, re_mode=aug.re_mode,
                                re_count=aug.re_count, interpolation=aug.interpolation, mean=mean, std=std)
    except (AssertionError, ValueError, KeyError) as e:  # timm refuses a policy string with an assertion
        raise UserError(f"aug: timm's training transform refused these settings (auto_augment="
                        f"{aug.auto_augment!r}): {type(e).__name__}: {e}") from None


def eval_transform(size: int, mean: tuple, std: tuple, interpolation: str = "bicubic",
                   crop_pct: float = 1.0) -> Callable:
    """Resize the shorter side to ``size / crop_pct``, centre-crop ``size`` x ``size``, normalise."""
    return create_transform(size, is_training=False, crop_pct=crop_pct, interpolation=interpolation, mean=mean,
                            std=std)


def norm_stats(data: DataConfig, model_mean: tuple, model_std: tuple) -> tuple[tuple, tuple]:
    """Synthetic images are normalised their own way; folders use the model's statistics."""
    return (synthetic.MEAN, synthetic.STD) if is_synthetic(data) else (tuple(model_mean), tuple(model_std))


def model_crop_pct(name: str) -> float:
    """The crop fraction of model ``name``'s timm pretrained config, as ``resolve_data_config`` takes
    it (timm's default, 0.875, for a model without one)."""
    import timm

    import vitpe  # noqa: F401  (registers vitpe's models, so their configs are found)

    pc = timm.get_pretrained_cfg(name)
    return float(pc.crop_pct) if pc is not None and pc.crop_pct else DEFAULT_CROP_PCT


def resolve_crop_pct(data: ClsDataConfig, model_name: str) -> None:
    """Set ``data.crop_pct`` from the model where the config leaves it None."""
    if data.crop_pct is None:
        data.crop_pct = model_crop_pct(model_name)


def build_train_val(data: ClsDataConfig, aug: AugConfig, mean: tuple, std: tuple,
                    seed: int = 0) -> tuple[Dataset, Dataset, list[str]]:
    """Training and validation sets at ``data.img_size`` and the class names."""
    if is_synthetic(data):
        train = synthetic.SyntheticPositions(data.synthetic_train, data.img_size, seed, "train")
        return train, eval_dataset(data, data.img_size, mean, std, aug.interpolation, seed), list(train.classes)
    transform = train_transform(data.img_size, aug, mean, std)
    if data.decode == "gpu":  # decoded and augmented on the device (vitpe.data.gpu_decode)
        if data.cache:
            raise UserError("data.decode=gpu decodes the files every epoch; set data.cache=false or data.decode=cpu")
        check_aug(aug)
        train = EncodedFolder(data.path, data.train_split)
    elif data.cache:
        train = _decoded(data.path, data.train_split, data.workers, ()).with_transform(transform)
    else:
        train = ImageFolder(data.path, data.train_split, transform)
    val = eval_dataset(data, data.img_size, mean, std, aug.interpolation, seed, classes=train.classes)
    return train, val, list(train.classes)


def eval_dataset(data: ClsDataConfig, size: int, mean: tuple, std: tuple, interpolation: str = "bicubic",
                 seed: int = 0, classes: list[str] | None = None) -> Dataset:
    """The validation set seen at ``size`` (the resolution evaluation calls this once per size)."""
    if is_synthetic(data):
        return synthetic.SyntheticPositions(data.synthetic_val, size, seed, "val")
    if data.crop_pct is None:
        raise ValueError("data.crop_pct is None: resolve it from the model first (model_crop_pct)")
    transform = eval_transform(size, mean, std, interpolation, data.crop_pct)
    if data.cache:
        return _decoded(data.path, data.val_split, data.workers, tuple(classes or ())).with_transform(transform)
    return ImageFolder(data.path, data.val_split, transform, classes=classes)


@functools.lru_cache(maxsize=4)
def _decoded(path: str, split: str, workers: int, classes: tuple[str, ...]) -> CachedImages:
    """One decode of a split per process, shared by every size, run and checkpoint of the process."""
    return CachedImages(ImageFolder(path, split, None, classes=list(classes) or None), workers)


__all__ = ["AugConfig", "ClsDataConfig", "build_train_val", "eval_dataset", "eval_transform", "is_synthetic",
           "model_crop_pct", "norm_stats", "resolve_crop_pct", "train_transform"]
