"""RingAttention: exact attention over a sequence split across the ranks of a process group.

Forward (W = world size of the group): W steps. At step i this rank holds the K/V block that started
on rank (rank - i) mod W. It starts sending that block on to the next rank, computes attention of its
queries against it, merges (out, lse) into fp32 accumulators, then waits for the next block.

Backward: a second ring. dQ accumulates locally; dK/dV accumulators (fp32) travel with the K/V blocks,
each rank adding its contribution, and after W hops they are back at the block's owner.

Which part of a block is computed (causal, zigzag layout: this rank holds chunks r and 2W-1-r):
  step 0 (own block)     all queries x all keys, causal mask on local indices
  source rank < r        all queries x the block's first chunk (chunk src < r), no mask
  source rank > r        the second query chunk (2W-1-r) x all keys, no mask
Every other pair is fully masked and skipped, so each rank does the same work at every step.

The ring holds no attention math: blocks go to ``ringlwm.kernels`` (Triton on GPU, the fused CPU kernel
on CPU, or a backend named by ``backend``), partial results are combined by ``merge_attention``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ringlwm.kernels import block_attention_backward, block_attention_forward, blockwise_attention, merge_attention
from ringlwm.ring.comm import RingComm
from ringlwm.ring.layout import sp_world


def _step_block(step: int, rank: int, world_size: int, causal: bool, local_len: int):
    """(query slice, key slice, causal mask?) of the computation at ``step``, or None when all is masked."""
    everything = slice(0, local_len)
    if not causal:
        return everything, everything, False
    if step == 0:
        return everything, everything, True
    half = local_len // 2
    src = (rank - step) % world_size
    if src < rank:
        return everything, slice(0, half), False
    return slice(half, local_len), everything, False


def _accumulator_dtype(q: torch.Tensor) -> torch.dtype:
    """fp32 for 16-bit and fp32 inputs (per-step results are never rounded to 16 bits); fp64 stays fp64."""
    return torch.promote_types(q.dtype, torch.float32)


def _shares_a_segment(q_seg: torch.Tensor | None, kv_seg: torch.Tensor | None) -> bool:
    """False only when no key of the block can be seen by any local query (packed documents). Batch rows are
    pooled, so this can only answer True too often, never wrongly skip work."""
    if q_seg is None:
        return True
    return bool(torch.isin(kv_seg.reshape(-1), q_seg.reshape(-1)).any())


def _ring_forward(q, k, v, segment_ids, causal, scale, group, backend):
    rank, world_size = sp_world(group)
    local_len = q.shape[2]
    comm = RingComm(group)
    acc = _accumulator_dtype(q)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    block = [k, v] + ([segment_ids] if segment_ids is not None else [])
    for step in range(world_size):
        if step + 1 < world_size:
            incoming = comm.start(block)
        plan = _step_block(step, rank, world_size, causal, local_len)
        kv_seg = block[2] if segment_ids is not None else None
        if plan is not None:
            qs, ks, blk_causal = plan
            q_seg = segment_ids[:, qs] if segment_ids is not None else None
            kv_seg = kv_seg[:, ks] if kv_seg is not None else None
            if _shares_a_segment(q_seg, kv_seg):
                blk_out, blk_lse = block_attention_forward(
                    q[:, :, qs], block[0][:, :, ks], block[1][:, :, ks], causal=blk_causal, scale=scale,
                    q_segment_ids=q_seg, kv_segment_ids=kv_seg, backend=backend,
                )
                out[:, :, qs], lse[:, :, qs] = merge_attention(out[:, :, qs], lse[:, :, qs], blk_out, blk_lse)
        if step + 1 < world_size:
            comm.wait()
            block = incoming
    return out, lse


def _ring_backward(dout, q, k, v, out, lse, segment_ids, causal, scale, group, backend):
    rank, world_size = sp_world(group)
    local_len = q.shape[2]
    kv_comm, grad_comm = RingComm(group), RingComm(group)
    acc = _accumulator_dtype(q)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    block = [k, v] + ([segment_ids] if segment_ids is not None else [])
    grad_incoming: list[torch.Tensor] = []
    for step in range(world_size):
        if step + 1 < world_size:
            incoming = kv_comm.start(block)
        plan = _step_block(step, rank, world_size, causal, local_len)
        grads = None
        if plan is not None:
            qs, ks, blk_causal = plan
            q_seg = segment_ids[:, qs] if segment_ids is not None else None
            kv_seg = block[2][:, ks] if segment_ids is not None else None
            if _shares_a_segment(q_seg, kv_seg):
                dq_blk, dk_blk, dv_blk = block_attention_backward(
                    dout[:, :, qs], q[:, :, qs], block[0][:, :, ks], block[1][:, :, ks], out[:, :, qs],
                    lse[:, :, qs], causal=blk_causal, scale=scale, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                    backend=backend,
                )
                dq[:, :, qs] += dq_blk
                grads = (ks, dk_blk, dv_blk)
        if step == 0:
            dk = torch.zeros(k.shape, dtype=acc, device=k.device)
            dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        else:
            # The accumulated gradients of the block we now hold, from the rank that held it before.
            grad_comm.wait()
            dk, dv = grad_incoming
        if grads is not None:
            ks, dk_blk, dv_blk = grads
            dk[:, :, ks] += dk_blk
            dv[:, :, ks] += dv_blk
        grad_incoming = grad_comm.start([dk, dv])
        if step + 1 < world_size:
            kv_comm.wait()
            block = incoming
    # The last hop brings this rank's own block's gradients home.
    grad_comm.wait()
    dk, dv = grad_incoming
    return dq, dk, dv


class _RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_ids, causal, scale, group, backend):
        out, lse = _ring_forward(q, k, v, segment_ids, causal, scale, group, backend)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, segment_ids)
        ctx.args = (causal, scale, group, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, segment_ids = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, segment_ids, *ctx.args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def _check_local_inputs(q, k, v, segment_ids, world_size):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, local_seq, head_dim), got {shape}")
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        raise ValueError(
            f"q, k, v must hold the same local sequence length, got {q.shape[2]}, {k.shape[2]}, {v.shape[2]}"
        )
    if world_size > 1 and q.shape[2] % 2:
        raise ValueError(
            f"local sequence length {q.shape[2]} is odd: a zigzag shard holds two equal chunks "
            "(shard the full sequence with shard_sequence, whose length must divide by 2 * world_size)"
        )
    if segment_ids is not None and (segment_ids.dim() != 2 or tuple(segment_ids.shape) != (q.shape[0], q.shape[2])):
        raise ValueError(
            f"segment_ids must have shape (batch, local_seq) = {(q.shape[0], q.shape[2])}, "
            f"got {tuple(segment_ids.shape)}"
        )


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    segment_ids: torch.Tensor | None = None,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Exact attention over a sequence sharded across ``group`` in the zigzag layout, differentiable.

    q: (batch, heads, local_seq, head_dim); k, v: (batch, kv_heads, local_seq, head_dim), this rank's
    shards from ``shard_sequence(x, dim=2)``. segment_ids: (batch, local_seq) this rank's shard of the
    packed-document ids, or None. group: the sequence-parallel process group (default: the world).
    backend: the block kernel ("triton", "cpu", ...; default by device).
    Returns (batch, heads, local_seq, head_dim) in q's dtype. With one rank (or no process group) this
    is ``blockwise_attention``.
    """
    _, world_size = sp_world(group)
    _check_local_inputs(q, k, v, segment_ids, world_size)
    if world_size == 1:
        return blockwise_attention(q, k, v, causal=causal, scale=scale, segment_ids=segment_ids, backend=backend)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _RingAttentionFunction.apply(q, k, v, segment_ids, bool(causal), float(scale), group, backend)


class RingAttention(nn.Module):
    """``ring_attention`` as a module: a drop-in for the attention call of an existing model.

    forward(q, k, v, segment_ids=None) with the shapes of ``ring_attention``.
    """

    def __init__(self, causal: bool = True, group: dist.ProcessGroup | None = None, scale: float | None = None,
                 backend: str | None = None):
        super().__init__()
        self.causal = causal
        self.group = group
        self.scale = scale
        self.backend = backend

    def forward(self, q, k, v, segment_ids=None):
        return ring_attention(q, k, v, causal=self.causal, segment_ids=segment_ids, scale=self.scale,
                              group=self.group, backend=self.backend)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, backend={self.backend or 'auto'}"
