"""Errors a user can act on. The command-line entry points print them as one line, no traceback."""
from __future__ import annotations


class UserError(Exception):
    """Base class of every error caused by the user's input (config, data, checkpoint, options)."""


class DataError(UserError):
    """Missing or unusable data: no such folder, no classes, no images."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read safely (corrupt, or carrying code)."""


__all__ = ["CheckpointError", "DataError", "UserError"]
