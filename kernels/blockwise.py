"""Public attention API of ``ringlwm.kernels``: one device, no processes.

Three layers, as in flash-attention:
  backend forward/backward (Triton kernels, or the fused CPU kernel)
  -> ``block_attention_forward`` / ``block_attention_backward``: validated, dispatching, one block
  -> ``BlockwiseAttention`` (autograd Function) -> ``blockwise_attention``.

The block functions are what a ring calls at each step: a forward that returns (out, lse) for one
K/V block, and a backward that takes the ring's merged (out, lse) and returns float32 gradients to sum.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from .cpu_flash import cpu_attention_backward, cpu_attention_forward


class Backend(NamedTuple):
    forward: Callable
    backward: Callable


def _triton_backend() -> Backend:
    from .triton_flash import triton_attention_backward, triton_attention_forward  # imports triton lazily

    return Backend(triton_attention_forward, triton_attention_backward)


_BACKENDS: dict[str, Callable[[], Backend]] = {
    "triton": _triton_backend,
    "cpu": lambda: Backend(cpu_attention_forward, cpu_attention_backward),
}

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Add a block-attention backend: ``factory()`` returns ``Backend(forward, backward)`` with the
    signatures of ``triton_attention_forward`` / ``triton_attention_backward``."""
    _BACKENDS[name] = factory


def default_backend(device: torch.device) -> str:
    """Triton on GPUs, the fused CPU kernel on CPU (Triton on CPU tensors needs TRITON_INTERPRET=1)."""
    return "cpu" if device.type == "cpu" else "triton"


def _meta_attention_forward(q, k, v, *, causal, scale, segment_ids=None, kv_segment_ids=None, q_offset=0,
                            kv_offset=0):
    """Meta tensors hold no data, so no kernel runs: outputs with the shapes and dtypes of a real call."""
    stat_dtype = torch.promote_types(q.dtype, torch.float32)  # as the CPU kernel: float64 stays float64
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(q.shape[:3], dtype=stat_dtype,
                                                                             device=q.device)


def _meta_attention_backward(dout, q, k, v, out, lse, *, causal, scale, segment_ids=None, kv_segment_ids=None,
                             q_offset=0, kv_offset=0):
    grad_dtype = torch.promote_types(q.dtype, torch.float32)
    return tuple(torch.empty(t.shape, dtype=grad_dtype, device=t.device) for t in (q, k, v))


_META_BACKEND = Backend(_meta_attention_forward, _meta_attention_backward)


def resolve_backend(name: str | None, q: torch.Tensor) -> tuple[str, Backend]:
    """(name, implementation) of the backend that runs ``q``'s attention: ``name`` checked against q's device,
    dtype and head_dim, or the device's default; raises naming what would work."""
    if q.device.type == "meta":
        # Shape propagation (e.g. a model built on the meta device): whatever the backend, no kernel can run.
        if name is not None and name not in _BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}")
        return "meta", _META_BACKEND
    name = name or default_backend(q.device)
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}")
    if name == "cpu" and q.device.type != "cpu":
        raise ValueError(f"the 'cpu' attention backend needs CPU tensors, got tensors on {q.device}")
    if name == "triton":
        if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the 'triton' backend on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)")
        if q.dtype not in _TRITON_DTYPES:
            raise TypeError(f"the 'triton' backend supports {_TRITON_DTYPES}, got {q.dtype}")
        if not 16 <= q.shape[-1] <= 256:
            raise ValueError(f"the 'triton' backend supports head_dim 16..256, got {q.shape[-1]}")
    return name, _BACKENDS[name]()


def _check_segment_ids(name: str, ids: torch.Tensor, batch: int, length: int, device: torch.device) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or tuple(ids.shape) != (batch, length):
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must have shape (batch, seq) = {(batch, length)}, got {shape}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but q is on {device}")


def check_attention_inputs(q, k, v, segment_ids, kv_segment_ids, q_offset, kv_offset):
    """Validate q, k, v (batch, heads, seq, head_dim), segment ids and offsets as every backend needs them;
    raises TypeError / ValueError naming the problem."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"q, k and v must be on one device: q is on {q.device}, {name} on {t.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"q, k and v must have one dtype: q is {q.dtype}, {name} is {t.dtype}")
    if q.dtype not in _CPU_DTYPES:
        raise TypeError(f"attention needs a floating dtype among {_CPU_DTYPES}, got {q.dtype}")
    batch, heads, seq_q, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch or head_dim"
        )
    kv_heads, seq_k = k.shape[1], k.shape[2]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if min(batch, heads, seq_q, seq_k, head_dim) == 0:
        raise ValueError(f"empty attention inputs: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if (segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both segment_ids and kv_segment_ids, or neither")
    if segment_ids is not None:
        _check_segment_ids("segment_ids", segment_ids, batch, seq_q, q.device)
        _check_segment_ids("kv_segment_ids", kv_segment_ids, batch, seq_k, q.device)
    for name, off in (("q_offset", q_offset), ("kv_offset", kv_offset)):
        if isinstance(off, bool) or not isinstance(off, int):
            raise TypeError(f"{name} must be a Python int, got {type(off).__name__}")


def _prepare(q, k, v, causal, scale, segment_ids, kv_segment_ids, q_offset, kv_offset, backend):
    check_attention_inputs(q, k, v, segment_ids, kv_segment_ids, q_offset, kv_offset)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    _, impl = resolve_backend(backend, q)
    kwargs = dict(
        causal=bool(causal), scale=scale, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        q_offset=q_offset, kv_offset=kv_offset,
    )
    return impl, kwargs


def block_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    segment_ids: torch.Tensor | None = None,
    kv_segment_ids: torch.Tensor | None = None,
    q_offset: int = 0,
    kv_offset: int = 0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query block over one key/value block; no autograd.

    q: (batch, heads, seq_q, head_dim); k, v: (batch, kv_heads, seq_k, head_dim), heads % kv_heads == 0.
    segment_ids: the queries' (batch, seq_q) and kv_segment_ids: the keys' (batch, seq_k), both or neither
    (the names of ``blockwise_attention``). Query i sees key j when ``q_offset + i >= kv_offset + j`` (if
    ``causal``) and ``segment_ids[b, i] == kv_segment_ids[b, j]`` (if segment ids are given). Returns ``out`` (like q, contiguous) and ``lse`` (batch, heads, seq_q), float32
    (float64 for float64 inputs on CPU), natural log. A row that sees no key gets out = 0, lse = -inf.
    """
    impl, kwargs = _prepare(q, k, v, causal, scale, segment_ids, kv_segment_ids, q_offset, kv_offset, backend)
    return impl.forward(q, k, v, **kwargs)


def block_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    segment_ids: torch.Tensor | None = None,
    kv_segment_ids: torch.Tensor | None = None,
    q_offset: int = 0,
    kv_offset: int = 0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block's attention, given the upstream gradient ``dout`` and the final
    ``out`` / ``lse`` of the query rows (for a ring: merged over all blocks, not this block's own).

    Shapes and masking as in ``block_attention_forward``. Returns (dq, dk, dv) shaped like q, k, v in
    float32 (float64 for float64 inputs on CPU), ready to be summed over blocks without rounding.
    """
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must have q's shape {tuple(q.shape)}")
    if tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"lse must have shape (batch, heads, seq_q) = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    impl, kwargs = _prepare(q, k, v, causal, scale, segment_ids, kv_segment_ids, q_offset, kv_offset, backend)
    return impl.backward(dout.to(q.dtype), q, k, v, out.to(q.dtype), lse, **kwargs)


class BlockwiseAttention(torch.autograd.Function):
    """Autograd wrapper: forward saves (q, k, v, out, lse); backward recomputes the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, segment_ids, kv_segment_ids, causal, scale, q_offset, kv_offset, backend):
        kwargs = dict(
            causal=causal, scale=scale, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
            q_offset=q_offset, kv_offset=kv_offset, backend=backend,
        )
        out, lse = block_attention_forward(q, k, v, **kwargs)
        ctx.save_for_backward(q, k, v, out, lse, segment_ids, kv_segment_ids)
        ctx.kwargs = {key: val for key, val in kwargs.items() if not key.endswith("segment_ids")}
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, segment_ids, kv_segment_ids = ctx.saved_tensors
        dq, dk, dv = block_attention_backward(
            dout, q, k, v, out, lse, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, **ctx.kwargs
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def blockwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    segment_ids: torch.Tensor | None = None,
    return_lse: bool = False,
    kv_segment_ids: torch.Tensor | None = None,
    q_offset: int = 0,
    kv_offset: int = 0,
    backend: str | None = None,
):
    """Memory-efficient exact attention (FlashAttention-2 algorithm), differentiable.

    q: (batch, heads, seq_q, head_dim); k, v: (batch, kv_heads, seq_k, head_dim) with heads % kv_heads
    == 0 (GQA/MQA: K/V are never expanded in memory). Any strides.
    segment_ids: (batch, seq) integers: a query attends only keys of its own segment (packed documents).
    The ring form: ``segment_ids`` are the queries' (batch, seq_q) and ``kv_segment_ids`` the keys'
    (batch, seq_k); ``q_offset``/``kv_offset`` are the blocks' positions in the full sequence, so that
    causal masking compares ``q_offset + i >= kv_offset + j``.
    backend: "triton" (default on GPU) or "cpu" (default on CPU: PyTorch's fused CPU flash kernel).

    Returns out (batch, heads, seq_q, head_dim) in q's dtype, and with ``return_lse`` also the
    log-sum-exp (batch, heads, seq_q) float32. Rows with no visible key give out = 0, lse = -inf.
    On meta tensors no kernel runs: out and lse (and the gradients) are meta tensors of those shapes and
    dtypes (lse float64 for float64 inputs, as on the CPU backend), for shape propagation.
    """
    if segment_ids is not None and kv_segment_ids is None:
        if q.dim() == 4 and k.dim() == 4 and q.shape[2] != k.shape[2]:
            raise ValueError(
                f"seq_q ({q.shape[2]}) != seq_k ({k.shape[2]}): pass kv_segment_ids for the keys' segments"
            )
        kv_segment_ids = segment_ids
    if kv_segment_ids is not None and segment_ids is None:
        raise ValueError("kv_segment_ids needs segment_ids for the queries")
    out, lse = BlockwiseAttention.apply(
        q, k, v, segment_ids, kv_segment_ids, bool(causal), scale, q_offset, kv_offset, backend
    )
    return (out, lse) if return_lse else out


def merge_attention(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions of the same queries over disjoint key sets, exactly.

    out, block_out: (..., seq, head_dim); lse, block_lse: (..., seq), natural log. Returns the attention
    over the union of the key sets as (out float32, lse float32): out = w * out + (1 - w) * block_out
    with w = exp(lse - lse_new), lse_new = logaddexp(lse, block_lse). A side with lse = -inf (no keys)
    gets weight 0, and rows empty on both sides stay out = 0, lse = -inf (no NaN from -inf - -inf).
    Accumulate in float32 (float64 for float64 inputs) and cast once at the end: rounding each step to
    16 bits compounds over a ring.
    """
    acc = torch.promote_types(torch.promote_types(out.dtype, block_out.dtype), torch.float32)
    out, block_out, lse, block_lse = (t.to(acc) for t in (out, block_out, lse, block_lse))
    new_lse = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isneginf(new_lse), 0.0, new_lse)
    merged = out * torch.exp(lse - safe).unsqueeze(-1) + block_out * torch.exp(block_lse - safe).unsqueeze(-1)
    return merged, new_lse
