"""Public attention API of ``ringlwm.kernels``: one device, no processes.

Three layers, as in flash-attention:
  backend forward/backward (Triton kernels, or the fused CPU kernel)
  -> the ``torch.library`` custom ops ``ringlwm::block_attention_forward`` / ``_backward`` (one block; a
     fake implementation gives shapes and dtypes, autograd is registered on the forward op)
  -> ``block_attention_forward`` / ``block_attention_backward``: validated, one block
  -> ``blockwise_attention``: the differentiable function.

The block functions are what a ring calls at each step: a forward that returns (out, lse) for one
K/V block, and a backward that takes the ring's merged (out, lse) and returns float32 gradients to sum.

Because the kernels sit behind custom ops, ``torch.compile(fullgraph=True)`` records each block as one
graph node (nothing inside a kernel launcher is traced), and ``FakeTensorMode`` / meta tensors run the
fake implementation: no kernel, no device needed, the shapes and dtypes of a real call. The Python layer
checks the arguments and resolves the backend before calling an op; the op takes the backend by name.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import FakeTensor

from . import library_flash
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
    # FlashAttention from libraries (``library_flash``): CUDA tensors, fp16/bf16; blocks they cannot express go
    # to the next backend in ``library_flash.FALLBACK`` with a one-time notice.
    "torch_flash": lambda: Backend(library_flash.torch_flash_forward, library_flash.torch_flash_backward),
    "cudnn": lambda: Backend(library_flash.cudnn_forward, library_flash.cudnn_backward),
    "flash_attn": lambda: Backend(library_flash.flash_attn_forward, library_flash.flash_attn_backward),
}

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Add a block-attention backend: ``factory()`` returns ``Backend(forward, backward)`` with the
    signatures of ``triton_attention_forward`` / ``triton_attention_backward``."""
    _BACKENDS[name] = factory


def backend_names() -> list[str]:
    """The names a backend argument takes: the registered backends and "auto"."""
    return sorted(_BACKENDS) + ["auto"]


def default_backend(device: torch.device) -> str:
    """"auto" on GPUs (the measured fastest, ``auto_backend``), the fused CPU kernel on CPU (Triton on CPU tensors
    needs TRITON_INTERPRET=1)."""
    return "cpu" if device.type == "cpu" else "auto"


def _holds_no_data(t: torch.Tensor) -> bool:
    """Meta and fake tensors: only shapes and dtypes exist, so no kernel runs and no device driver is needed.
    While torch.compile traces, Dynamo answers isinstance for the real tensors the graph will run on: False
    there, so a compiled call is checked as an eager one."""
    return t.device.type == "meta" or isinstance(t, FakeTensor)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of lse and of the gradients: float32, or float64 for float64 inputs (as the CPU kernel)."""
    return torch.promote_types(dtype, torch.float32)


def _no_kernel_forward(q, k, v, *, causal, scale, segment_ids=None, kv_segment_ids=None, q_offset=0, kv_offset=0):
    """What every backend's forward returns, without running one: out like q (contiguous) and
    lse (batch, heads, seq_q) in the statistics dtype. The fake implementation of the forward op."""
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_stat_dtype(q.dtype))


def _no_kernel_backward(dout, q, k, v, out, lse, *, causal, scale, segment_ids=None, kv_segment_ids=None,
                        q_offset=0, kv_offset=0):
    """(dq, dk, dv) shaped like q, k, v (contiguous) in the statistics dtype, without running a kernel."""
    return tuple(t.new_empty(t.shape, dtype=_stat_dtype(q.dtype)) for t in (q, k, v))


_NO_KERNEL = Backend(_no_kernel_forward, _no_kernel_backward)


def _checked_backend_name(name: str | None, q: torch.Tensor) -> str:
    """The name of the backend that runs ``q``'s attention: ``name`` ("auto" resolved) checked against q's device,
    dtype and head_dim, or the device's default; raises naming what would work."""
    name = name or default_backend(q.device)
    if name == "auto":
        name = library_flash.auto_backend(q, _holds_no_data(q))
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS) + ['auto']}")
    if q.device.type == "meta":
        return name  # shape propagation (e.g. a model built on the meta device): whatever the backend, no kernel
    if name == "cpu" and q.device.type != "cpu":
        raise ValueError(f"the 'cpu' attention backend needs CPU tensors, got tensors on {q.device}")
    if name == "triton":
        # Fake CPU tensors may stand for GPU tensors (a fake-device memory plan): no kernel runs on them, so the
        # interpreter is not needed; dtype and head_dim are checked as a real run would.
        if q.device.type == "cpu" and not _holds_no_data(q) and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the 'triton' backend on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)")
        if q.dtype not in _TRITON_DTYPES:
            raise TypeError(f"the 'triton' backend supports {_TRITON_DTYPES}, got {q.dtype}")
        if not 16 <= q.shape[-1] <= 256:
            raise ValueError(f"the 'triton' backend supports head_dim 16..256, got {q.shape[-1]}")
    if name in library_flash.LIBRARY_BACKENDS and not _holds_no_data(q):
        reason = library_flash.unavailable(name, q.device)
        if reason:
            raise ValueError(reason)
    return name


def select_backend(name: str | None, q: torch.Tensor, k: torch.Tensor, causal: bool = False,
                   segment_ids: torch.Tensor | None = None, kv_segment_ids: torch.Tensor | None = None,
                   q_offset: int = 0, kv_offset: int = 0) -> str:
    """The backend that runs this block: ``name`` ("auto" and None resolved, checked as ``resolve_backend``), or,
    when it is a library backend that cannot express the block (dtype, head_dim, a causal mask with offsets,
    segment ids that are not contiguous documents), the next one in ``library_flash.FALLBACK``, with a one-time
    notice naming the reason. Never a different mask: a block goes only where it is computed exactly.
    On tensors without data, and while torch.compile traces, the segment ids' values are not read (they are taken
    to be contiguous documents; if they are not, the kernel call refuses them with the reason)."""
    name = _checked_backend_name(name, q)
    if q.device.type == "meta":
        return name
    while name in library_flash.FALLBACK:
        reason = library_flash.unsupported(name, q, k, causal, segment_ids, kv_segment_ids, q_offset, kv_offset,
                                           read_ids=not _holds_no_data(q) and not torch.compiler.is_compiling())
        if reason is None:
            return name
        target = library_flash.FALLBACK[name]
        library_flash.notice_once(f"attention backend {name!r} cannot express {reason}: those blocks run on "
                                  f"{target!r}")
        name = _checked_backend_name(target, q)
    return name


def resolve_backend(name: str | None, q: torch.Tensor) -> tuple[str, Backend]:
    """(name, implementation) of the backend that runs ``q``'s attention: ``name`` checked against q's device,
    dtype and head_dim, or the device's default; raises naming what would work.

    On tensors without data no kernel runs and the implementation returns empty outputs of the right shapes
    and dtypes: on meta tensors the name is "meta" (any known ``name`` is accepted); on fake tensors
    (``FakeTensorMode``) it is the backend a real run would use, checked as for real tensors, except that
    "triton" on fake CPU tensors needs no TRITON_INTERPRET."""
    checked = _checked_backend_name(name, q)
    if q.device.type == "meta":
        return "meta", _NO_KERNEL
    if _holds_no_data(q):
        return checked, _NO_KERNEL
    return checked, _BACKENDS[checked]()


# ------------------------------------------------------------------------------------------------
# The custom ops. Arguments are positional and already checked by the Python layer below; the backend comes
# by name (resolved before the call, so the op never picks one by itself) and is checked again against the
# real tensors here, as the ops are public too (torch.ops.ringlwm.*).
# ------------------------------------------------------------------------------------------------

_FORWARD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? segment_ids, Tensor? kv_segment_ids, bool causal, float scale, "
    "int q_offset, int kv_offset, str backend) -> (Tensor out, Tensor lse)"
)
_BACKWARD_SCHEMA = (
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? segment_ids, "
    "Tensor? kv_segment_ids, bool causal, float scale, int q_offset, int kv_offset, str backend) "
    "-> (Tensor dq, Tensor dk, Tensor dv)"
)


def _as_promised(backend: str, what: str, t: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """A backend's output as the fake implementation describes it. Compiled graphs and fake-tensor runs take
    shapes, dtypes and strides from the fake implementation, so a real result that differed would be misread
    silently: shape and dtype are checked, and the layout made contiguous (the CPU kernel returns lse and the
    gradients in (batch, seq, heads) order)."""
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise RuntimeError(
            f"attention backend {backend!r} returned {what} of shape {tuple(t.shape)} and dtype {t.dtype}; "
            f"expected {tuple(shape)} and {dtype}"
        )
    return t.contiguous()


@torch.library.custom_op("ringlwm::block_attention_forward", mutates_args=(), schema=_FORWARD_SCHEMA)
def _forward_op(q, k, v, segment_ids, kv_segment_ids, causal, scale, q_offset, kv_offset, backend):
    impl = _BACKENDS[_checked_backend_name(backend, q)]()
    out, lse = impl.forward(q, k, v, causal=causal, scale=scale, segment_ids=segment_ids,
                            kv_segment_ids=kv_segment_ids, q_offset=q_offset, kv_offset=kv_offset)
    return (_as_promised(backend, "out", out, q.shape, q.dtype),
            _as_promised(backend, "lse", lse, q.shape[:3], _stat_dtype(q.dtype)))


@_forward_op.register_fake
def _forward_fake(q, k, v, segment_ids, kv_segment_ids, causal, scale, q_offset, kv_offset, backend):
    return _no_kernel_forward(q, k, v, causal=causal, scale=scale)


@torch.library.custom_op("ringlwm::block_attention_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def _backward_op(dout, q, k, v, out, lse, segment_ids, kv_segment_ids, causal, scale, q_offset, kv_offset, backend):
    impl = _BACKENDS[_checked_backend_name(backend, q)]()
    grads = impl.backward(dout, q, k, v, out, lse, causal=causal, scale=scale, segment_ids=segment_ids,
                          kv_segment_ids=kv_segment_ids, q_offset=q_offset, kv_offset=kv_offset)
    return tuple(_as_promised(backend, what, g, t.shape, _stat_dtype(q.dtype))
                 for what, g, t in zip(("dq", "dk", "dv"), grads, (q, k, v)))


@_backward_op.register_fake
def _backward_fake(dout, q, k, v, out, lse, segment_ids, kv_segment_ids, causal, scale, q_offset, kv_offset,
                   backend):
    return _no_kernel_backward(dout, q, k, v, out, lse, causal=causal, scale=scale)


def _setup_context(ctx, inputs, output):
    q, k, v, segment_ids, kv_segment_ids, causal, scale, q_offset, kv_offset, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, segment_ids, kv_segment_ids)
    ctx.options = (causal, scale, q_offset, kv_offset, backend)
    # lse is a statistic for merging and for the backward: a loss through it would get no gradient here, so
    # autograd refuses it instead of returning a wrong zero.
    ctx.mark_non_differentiable(lse)


def _forward_op_backward(ctx, dout, _dlse):
    """The backward recomputes the probabilities from (q, k, v, out, lse); gradients are cast to the inputs'
    dtypes once, from float32."""
    q, k, v, out, lse, segment_ids, kv_segment_ids = ctx.saved_tensors
    dq, dk, dv = _backward_op(dout, q, k, v, out, lse, segment_ids, kv_segment_ids, *ctx.options)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


_forward_op.register_autograd(_forward_op_backward, setup_context=_setup_context)


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


def _op_arguments(q, k, v, causal, scale, segment_ids, kv_segment_ids, q_offset, kv_offset, backend) -> tuple:
    """The custom ops' arguments after q, k, v, checked, with the scale and the backend resolved."""
    check_attention_inputs(q, k, v, segment_ids, kv_segment_ids, q_offset, kv_offset)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = select_backend(backend, q, k, causal, segment_ids, kv_segment_ids, q_offset, kv_offset)
    return segment_ids, kv_segment_ids, bool(causal), scale, q_offset, kv_offset, backend


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
    """Attention of one query block over one key/value block: the op ``ringlwm::block_attention_forward``.

    q: (batch, heads, seq_q, head_dim); k, v: (batch, kv_heads, seq_k, head_dim), heads % kv_heads == 0.
    segment_ids: the queries' (batch, seq_q) and kv_segment_ids: the keys' (batch, seq_k), both or neither
    (the names of ``blockwise_attention``). Query i sees key j when ``q_offset + i >= kv_offset + j`` (if
    ``causal``) and ``segment_ids[b, i] == kv_segment_ids[b, j]`` (if segment ids are given). Returns ``out``
    (like q, contiguous) and ``lse`` (batch, heads, seq_q) contiguous, float32 (float64 for float64 inputs
    on CPU), natural log. A row that sees no key gets out = 0, lse = -inf.
    ``out`` is differentiable (with grad enabled, the op's registered backward: this block alone); ``lse``
    is not. A ring calls it with grad disabled and runs its own backward from the merged (out, lse).
    """
    out, lse = _forward_op(
        q, k, v, *_op_arguments(q, k, v, causal, scale, segment_ids, kv_segment_ids, q_offset, kv_offset, backend)
    )
    return out, lse


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

    Shapes and masking as in ``block_attention_forward``. Returns (dq, dk, dv) shaped like q, k, v,
    contiguous, in float32 (float64 for float64 inputs on CPU), ready to be summed over blocks without
    rounding. The op ``ringlwm::block_attention_backward``; not differentiable itself.
    """
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must have q's shape {tuple(q.shape)}")
    if tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"lse must have shape (batch, heads, seq_q) = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    args = _op_arguments(q, k, v, causal, scale, segment_ids, kv_segment_ids, q_offset, kv_offset, backend)
    dq, dk, dv = _backward_op(dout.to(q.dtype), q, k, v, out.to(q.dtype), lse, *args)
    return dq, dk, dv


class BlockwiseAttention(torch.autograd.Function):
    """Autograd Function form of ``blockwise_attention`` (positional arguments as in the forward op), kept for
    callers of ``BlockwiseAttention.apply``: forward saves (q, k, v, out, lse); backward recomputes the
    probabilities. ``blockwise_attention`` itself uses the autograd registered on the op."""

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
    backend: "auto" (default on GPU: the fastest measured there, ``library_flash.auto_backend``), "torch_flash",
    "cudnn", "flash_attn" (library FlashAttention, ``library_flash``), "triton", or "cpu" (default on CPU: PyTorch's
    fused CPU flash kernel).

    Returns out (batch, heads, seq_q, head_dim) in q's dtype, and with ``return_lse`` also the
    log-sum-exp (batch, heads, seq_q) float32. Rows with no visible key give out = 0, lse = -inf.
    On meta and fake tensors no kernel runs: out and lse (and the gradients) are meta / fake tensors of
    those shapes and dtypes (lse float64 for float64 inputs, as on the CPU backend), for shape propagation;
    under ``FakeTensorMode`` the backend is checked as for a real run, except that "triton" on fake CPU
    tensors needs no TRITON_INTERPRET. ``torch.compile(fullgraph=True)`` traces it as the custom ops
    ``ringlwm::block_attention_forward`` / ``_backward``.
    """
    if segment_ids is not None and kv_segment_ids is None:
        if q.dim() == 4 and k.dim() == 4 and q.shape[2] != k.shape[2]:
            raise ValueError(
                f"seq_q ({q.shape[2]}) != seq_k ({k.shape[2]}): pass kv_segment_ids for the keys' segments"
            )
        kv_segment_ids = segment_ids
    if kv_segment_ids is not None and segment_ids is None:
        raise ValueError("kv_segment_ids needs segment_ids for the queries")
    out, lse = block_attention_forward(q, k, v, causal=causal, scale=scale, segment_ids=segment_ids,
                                       kv_segment_ids=kv_segment_ids, q_offset=q_offset, kv_offset=kv_offset,
                                       backend=backend)
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
    16 bits compounds over a ring. ``merge_attention_`` does the same in place in the accumulators.
    """
    acc = torch.promote_types(torch.promote_types(out.dtype, block_out.dtype), torch.float32)
    out, lse = out.to(acc, copy=True), lse.to(acc, copy=True)
    merge_attention_(out, lse, block_out, block_lse)
    return out, lse


MERGE_CHUNK_ELEMENTS = 1 << 24  # elements of ``out`` merged per chunk: a 64 MiB fp32 temporary at most


def merge_attention_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """``merge_attention`` into the accumulators ``out`` (float32/64, any strides: a ring passes slices of
    its whole accumulator) and ``lse``, in place. The block's weighted output is formed a slice of rows at
    a time, so no temporary of out's size exists (at 512K tokens x 32 heads x 128 an fp32 copy is 8 GiB);
    the values are those of ``merge_attention``, bit for bit (the same elementwise operations)."""
    acc = out.dtype
    if acc not in (torch.float32, torch.float64) or lse.dtype != acc:
        raise TypeError(f"merge_attention_ accumulates in place in float32/float64 out and lse, got {out.dtype} "
                        f"and {lse.dtype}")
    block_lse = block_lse.to(acc)
    new_lse = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isneginf(new_lse), 0.0, new_lse)
    out.mul_(torch.exp(lse - safe).unsqueeze(-1))
    block_weight = torch.exp(block_lse - safe).unsqueeze(-1)
    rows = out.shape[-2]
    per_row = max(1, out.numel() // max(rows, 1))
    step = max(1, MERGE_CHUNK_ELEMENTS // per_row)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        out.narrow(-2, start, n).add_(block_out.narrow(-2, start, n).to(acc) * block_weight.narrow(-2, start, n))
    lse.copy_(new_lse)
