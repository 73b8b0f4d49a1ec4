"""Errors a user can act on. The command-line entry points print them as one line, no traceback."""
from __future__ import annotations


class UserError(Exception):
    """Base class of every error caused by the user's input (config, data, checkpoint, options)."""


class DataError(UserError):
    """Missing or unusable data: no such folder, no classes, no images."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read safely (corrupt, or carrying code)."""


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: CUDA's (``torch.OutOfMemoryError``), or the CPU
    allocator's (a ``RuntimeError`` saying so)."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


__all__ = ["CheckpointError", "DataError", "UserError", "out_of_memory"]
