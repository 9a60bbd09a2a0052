"""ringlwm.models: Hugging Face models that run sequence-parallel over the ring."""

from ringlwm.models.llama import (
    ATTN_IMPLEMENTATION,
    ChunkedLlamaMLP,
    RingLlamaForCausalLM,
    rope_theta,
    set_context_length,
)
from ringlwm.models.loss import IGNORE_INDEX, linear_cross_entropy, sequence_parallel_loss

__all__ = [
    "ATTN_IMPLEMENTATION",
    "ChunkedLlamaMLP",
    "IGNORE_INDEX",
    "RingLlamaForCausalLM",
    "linear_cross_entropy",
    "rope_theta",
    "sequence_parallel_loss",
    "set_context_length",
]
