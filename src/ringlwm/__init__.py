"""ringlwm: RingAttention training and inference for million-token-context Llama models.

Layout (each layer imports only from the ones above it):
    ringlwm.kernels   attention on one device (Triton kernels, fused CPU path)
"""

from ringlwm.kernels import blockwise_attention

__version__ = "0.1.0"

__all__ = ["blockwise_attention", "__version__"]
