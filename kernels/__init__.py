"""ringlwm.kernels: exact blockwise (flash-style) attention on one device.

- ``blockwise_attention``: the differentiable function (causal, packed segments, GQA, returns lse).
- ``block_attention_forward`` / ``block_attention_backward``: one block's (out, lse) and its float32
  gradients, the pieces a ring calls at each step; ``merge_attention`` combines partial (out, lse).
- Backends: ``"triton"`` (FlashAttention-2 kernels, default on GPU; on CPU tensors under
  ``TRITON_INTERPRET=1``) and ``"cpu"`` (PyTorch's fused CPU flash kernel, default on CPU).
"""

from .blockwise import (
    Backend,
    BlockwiseAttention,
    block_attention_backward,
    block_attention_forward,
    blockwise_attention,
    check_attention_inputs,
    default_backend,
    merge_attention,
    register_backend,
    resolve_backend,
)

__all__ = [
    "Backend",
    "BlockwiseAttention",
    "block_attention_backward",
    "block_attention_forward",
    "blockwise_attention",
    "check_attention_inputs",
    "default_backend",
    "merge_attention",
    "register_backend",
    "resolve_backend",
]
