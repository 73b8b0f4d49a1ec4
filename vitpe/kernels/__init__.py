"""Hand-written GPU kernels for the layers where the library kernels leave speed behind.

Each kernel has a reference path in plain torch; the model takes the kernel only where it applies
(CUDA tensors, Triton installed) and ``ENABLED`` is true.
"""
from .depthwise import ENABLED, available, depthwise_conv_tokens

__all__ = ["ENABLED", "available", "depthwise_conv_tokens"]
