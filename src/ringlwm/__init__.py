"""ringlwm: RingAttention training and inference for million-token-context Llama models.

Layout (each layer imports only from the ones above it):
    ringlwm.kernels   attention on one device (Triton kernels, fused CPU path)
    ringlwm.ring      attention across a process group (RingAttention, zigzag sharding)
    ringlwm.models    RingLlamaForCausalLM (imports transformers; loaded on first use)
"""

from ringlwm.kernels import blockwise_attention
from ringlwm.ring import RingAttention, ring_attention, shard_sequence, unshard_sequence

__version__ = "0.1.0"


def __getattr__(name):
    # The model pulls in transformers (seconds to import): only when asked for.
    if name == "RingLlamaForCausalLM":
        from ringlwm.models import RingLlamaForCausalLM

        return RingLlamaForCausalLM
    raise AttributeError(f"module 'ringlwm' has no attribute {name!r}")


__all__ = [
    "RingAttention",
    "RingLlamaForCausalLM",
    "__version__",
    "blockwise_attention",
    "ring_attention",
    "shard_sequence",
    "unshard_sequence",
]
