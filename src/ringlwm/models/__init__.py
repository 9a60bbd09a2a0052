"""ringlwm.models: Hugging Face models that run sequence-parallel over the ring.

    llama.py  RingLlamaForCausalLM (text)     lwm.py    RingLwmForCausalLM (vision + text, LWM's layout)
    loss.py   blockwise cross-entropy          vqgan.py  the VQGAN image tokenizer (ringlwm.models.vqgan)
    hf_attention.py  the ring as transformers' attention ("ringlwm_ring"), its checks and group binding
    families.py  enable_ring / disable_ring: Llama, Mistral, Qwen2, Qwen3 from transformers on and off the ring
"""

from ringlwm.models.families import SUPPORTED_FAMILIES, disable_ring, enable_ring
from ringlwm.models.hf_attention import check_attention_heads
from ringlwm.models.llama import (
    ATTN_IMPLEMENTATION,
    ChunkedLlamaMLP,
    RingCausalLMOutput,
    RingLlamaForCausalLM,
    rope_theta,
    set_context_length,
)
from ringlwm.models.loss import IGNORE_INDEX, linear_cross_entropy, sequence_parallel_loss
from ringlwm.models.lwm import LwmConfig, RingLwmForCausalLM

__all__ = [
    "ATTN_IMPLEMENTATION",
    "ChunkedLlamaMLP",
    "IGNORE_INDEX",
    "LwmConfig",
    "RingCausalLMOutput",
    "RingLlamaForCausalLM",
    "RingLwmForCausalLM",
    "SUPPORTED_FAMILIES",
    "check_attention_heads",
    "disable_ring",
    "enable_ring",
    "linear_cross_entropy",
    "rope_theta",
    "sequence_parallel_loss",
    "set_context_length",
]
