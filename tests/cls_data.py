"""Helpers for the classification tests: a tiny ImageNet-layout folder made on the spot, the
argument list of a seconds-long training run, and the training script imported as a module."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from script_modules import ROOT, load_script  # noqa: F401  (tests take ROOT from here)

TINY_MODEL = ["--set", "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}"]


def make_folder(root: Path, per_class: int = 8, val_per_class: int = 4, size: int = 16,
                classes: tuple[str, ...] = ("red", "blue")) -> Path:
    """``root/{train,val}/<class>/*.png``: noisy images whose dominant colour is the class."""
    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "blue": (40, 40, 200), "green": (40, 200, 40)}
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.clip(np.array(colours[c]) + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i:03d}.png")
    return root


def tiny_argv(data: Path | str, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    """A run of a few steps: 16-px images, a 1-block 32-wide ViT, batch 8, no worker processes."""
    return ["--data", str(data), "--output", str(out), "--epochs", str(epochs), "--batch-size", "8",
            "--img-size", "16", "--device", "cpu", "--workers", "0", "--eval-sizes", "8,16,24",
            "--pos", "peg", *TINY_MODEL, "--set", "eval.throughput=false", "--set", "eval.batch_size=8",
            "--set", "optim.warmup_epochs=0.5", *extra]


def train_cls_module():
    """``train_cls.py`` (at the repository root, not a package) imported once."""
    if "train_cls" not in sys.modules:
        load_script("train_cls.py")
    return sys.modules["train_cls"]
