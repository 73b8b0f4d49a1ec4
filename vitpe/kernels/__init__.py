"""Hand-written GPU kernels for the layers where the library kernels leave speed behind.

Each kernel has a reference path in plain torch; the model takes the kernel only where it applies
(CUDA tensors, Triton installed) and the module's ``ENABLED`` is true (``VITPE_TRITON=0`` at start-up
turns them all off; or set ``ENABLED`` to False on ``vitpe.kernels.depthwise``, ``.attention``,
``.rope`` or ``.bias_gelu``, where the flags live, not on copies of them).

- ``depthwise``: the 3x3 depthwise convolution on tokens (Mix-FFN, PEG);
- ``attention``: attention with a learned bias shared by the batch (``rpb``);
- ``rope``: rotary q and k out of the qkv projection, with the tables' gradient (``rope_*``);
- ``bias_gelu``: the plain MLP's fc1 bias and GELU in one pass each way (``IN_MLP = 0`` for torch's).
"""
from . import attention, bias_gelu, depthwise, rope
from .depthwise import available, depthwise_conv_tokens

__all__ = ["attention", "available", "bias_gelu", "depthwise", "depthwise_conv_tokens", "rope"]
