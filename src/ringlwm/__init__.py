"""ringlwm: RingAttention training and inference for million-token-context Llama models.

Layout (each layer imports only from the ones above it):
    ringlwm.kernels   attention on one device (Triton kernels, fused CPU path)
    ringlwm.ring      attention across a process group (RingAttention, zigzag sharding)
"""

from ringlwm.kernels import blockwise_attention
from ringlwm.ring import RingAttention, ring_attention, shard_sequence, unshard_sequence

__version__ = "0.1.0"

__all__ = [
    "RingAttention",
    "__version__",
    "blockwise_attention",
    "ring_attention",
    "shard_sequence",
    "unshard_sequence",
]
