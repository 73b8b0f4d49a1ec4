"""Hand-written GPU kernels for the layers where the library kernels leave speed behind.

Each kernel has a reference path in plain torch; the model takes the kernel only where it applies
(CUDA tensors, Triton installed) and ``depthwise.ENABLED`` is true (``VITPE_TRITON=0`` at start-up,
or set ``vitpe.kernels.depthwise.ENABLED = False``, where the flag lives, not a copy of it).
"""
from . import depthwise
from .depthwise import available, depthwise_conv_tokens

__all__ = ["available", "depthwise", "depthwise_conv_tokens"]
