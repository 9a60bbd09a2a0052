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
Every other pair is fully masked and skipped, so each rank does the same work at every step. With packed
documents (segment_ids), a step whose queries share no document with its keys in any batch row is skipped
too. Both directions follow one plan, made once per call by ``_ring_plan``.

The ring holds no attention math: blocks go to ``ringlwm.kernels`` (on GPU "auto": the backend measured fastest
there, e.g. torch's FlashAttention-2; the fused CPU kernel on CPU; or a backend named by ``backend``), partial
results are combined in place by ``merge_attention_``. Every step is an unmasked block or a square causal diagonal,
which every backend expresses.

Inputs are checked before any communication: first locally (shapes, dtypes, devices, backend), then for
agreement across the ranks of the group, once per distinct call signature (``ringlwm.ring.agreement``). A
rank whose inputs fail either check raises, and so does every other rank, with the same message.
``ring_settings`` is the documented seam for runs that measure the ring instead of training with it (the
planner on fake devices): it turns the cross-rank check off and makes every step compute.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from ringlwm.kernels import (
    block_attention_backward,
    block_attention_forward,
    blockwise_attention,
    check_attention_inputs,
    merge_attention_,
    resolve_backend,
)
from ringlwm.ring.agreement import agree_once, call_signature, check_call_agreement
from ringlwm.ring.comm import RingComm, all_gather_by_rank
from ringlwm.ring.layout import sp_world, ulysses_world
from ringlwm.ring.ulysses import (
    _heads_to_sequence,
    _sequence_to_heads,
    check_ulysses_heads,
    gather_pieces,
    heads_to_sequence,
    sequence_to_heads,
)


class _Step(NamedTuple):
    """This rank's work at one ring step: its queries[queries] against keys[keys] of the K/V block it holds,
    with a causal mask on local indices or none, and both sides' segment ids (None without packing)."""

    queries: slice
    keys: slice
    causal: bool
    segment_ids: torch.Tensor | None
    kv_segment_ids: torch.Tensor | None


def _step_slices(step: int, rank: int, world_size: int, causal: bool, local_len: int) -> tuple[slice, slice, bool]:
    """(query slice, key slice, causal mask?) at ``step``: the table in the module docstring."""
    everything = slice(0, local_len)
    if not causal:
        return everything, everything, False
    if step == 0:
        return everything, everything, True
    half = local_len // 2
    source = (rank - step) % world_size  # the rank the block at this step comes from
    if source < rank:
        return everything, slice(0, half), False
    return slice(half, local_len), everything, False


def _gather_segment_ids(segment_ids: torch.Tensor, group, world_size: int) -> list[torch.Tensor]:
    """Every rank's (batch, local_len) segment ids, by rank (gloo: GPU ids travel through host memory)."""
    return all_gather_by_rank(segment_ids, group, world_size)


def _shared_segments(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[bool]:
    """For each (query ids, key ids) pair, (batch, n_q) and (batch, n_k): whether some key's id is among the
    query ids of its batch row. Exact; computed on the ids' device, with one host sync for all pairs."""
    found = []
    for q_ids, kv_ids in pairs:
        sorted_q = torch.sort(q_ids, dim=1).values
        kv_ids = kv_ids.contiguous()
        where = torch.searchsorted(sorted_q, kv_ids).clamp_(max=sorted_q.shape[1] - 1)
        found.append((sorted_q.gather(1, where) == kv_ids).any())
    return torch.stack(found).tolist()


def _ring_plan(rank: int, world_size: int, causal: bool, local_len: int, segment_ids: torch.Tensor | None,
               group) -> list[_Step | None]:
    """This rank's work at each of the W ring steps, None where there is nothing to compute. The backward
    ring does the same work as the forward, so it reuses the forward's plan.

    Without segment ids every step has work. With them, a step whose query slice shares no segment id with
    its key slice (in any batch row) is skipped. Deciding that costs, once per call: one all_gather of every
    rank's segment ids (batch x local_len integers each) and one host sync for the W answers together; the
    kernels then take the key segment ids from that gather, so only K and V travel the ring. The gathered
    ids (batch x seq_len integers) stay with the plan until the backward.
    """
    slices = [_step_slices(step, rank, world_size, causal, local_len) for step in range(world_size)]
    if segment_ids is None:
        return [_Step(qs, ks, blk_causal, None, None) for qs, ks, blk_causal in slices]
    every_rank = _gather_segment_ids(segment_ids, group, world_size)
    steps = [
        _Step(qs, ks, blk_causal, segment_ids[:, qs], every_rank[(rank - step) % world_size][:, ks])
        for step, (qs, ks, blk_causal) in enumerate(slices)
    ]
    if not _SETTINGS.skip_unshared_steps:
        return steps
    shared = _shared_segments([(step.segment_ids, step.kv_segment_ids) for step in steps])
    return [step if keep else None for step, keep in zip(steps, shared)]


BACKWARD_TILE = 65536
"""Fewest queries and keys per side of a block-backward tile. A call returns fp32 gradients of all its queries
and keys (at 512K tokens per rank, 32 heads: an 8 GiB dq block); above the tile size the backward of a step
runs tile by tile, so those temporaries stay bounded, and its sums are added tile by tile in fp32. At or
below it (every CPU test and the demo) a step is one call, as before."""
BACKWARD_TILE_BYTES = 2**30
"""Most bytes of a tile's fp32 query-gradient block: with fewer heads per call (head chunks, Ulysses) a tile
holds more tokens for the same bytes (64K tokens at 32 heads x 128; 2M at 1 head), never fewer than
``BACKWARD_TILE``; fewer tiles, the same temporaries."""


def backward_tile(q: torch.Tensor) -> int:
    """Queries and keys per side of a backward tile for ``q`` (batch, heads, local_len, head_dim): a multiple of
    ``BACKWARD_TILE`` whose fp32 gradient block is at most ``BACKWARD_TILE_BYTES``."""
    b, h, _, d = q.shape
    fit = BACKWARD_TILE_BYTES // max(b * h * d * 4, 1)
    return max(BACKWARD_TILE, fit // BACKWARD_TILE * BACKWARD_TILE)


class _Tile(NamedTuple):
    queries: slice
    keys: slice
    causal: bool
    q_offset: int
    kv_offset: int
    segment_ids: torch.Tensor | None
    kv_segment_ids: torch.Tensor | None


def _tiles(work: _Step, limit: int) -> list[_Tile]:
    """The (queries x keys) tiles of a step, key tiles outer, each at most ``limit`` by ``limit``; with a
    causal step (local indices, queries and keys from 0), tiles wholly above the diagonal are dropped and
    those below it need no mask."""
    qs, ks = work.queries, work.keys
    if qs.stop - qs.start <= limit and ks.stop - ks.start <= limit:
        return [_Tile(qs, ks, work.causal, 0, 0, work.segment_ids, work.kv_segment_ids)]
    if work.causal and (qs.start, ks.start) != (0, 0):
        raise AssertionError("a causal ring step compares local indices of queries and keys that both start at 0")
    tiles = []
    for c in range(ks.start, ks.stop, limit):
        d = min(c + limit, ks.stop)
        for a in range(qs.start, qs.stop, limit):
            b = min(a + limit, qs.stop)
            if work.causal and c >= b:
                continue  # every key after every query
            masked = work.causal and d - 1 > a
            seg = None if work.segment_ids is None else work.segment_ids[:, a - qs.start:b - qs.start]
            kv_seg = None if work.kv_segment_ids is None else work.kv_segment_ids[:, c - ks.start:d - ks.start]
            tiles.append(_Tile(slice(a, b), slice(c, d), masked, a if masked else 0, c if masked else 0, seg,
                               kv_seg))
    return tiles


def _accumulator_dtype(q: torch.Tensor) -> torch.dtype:
    """fp32 for 16-bit and fp32 inputs (per-step results are never rounded to 16 bits); fp64 stays fp64."""
    return torch.promote_types(q.dtype, torch.float32)


def _ring_forward(q, k, v, plan, scale, group, backend):
    comm = RingComm(group)
    acc = _accumulator_dtype(q)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    block = [k, v]
    for step, work in enumerate(plan):
        more = step + 1 < len(plan)
        if more:
            incoming = comm.start(block)
        if work is not None:
            qs, ks = work.queries, work.keys
            blk_out, blk_lse = block_attention_forward(
                q[:, :, qs], block[0][:, :, ks], block[1][:, :, ks], causal=work.causal, scale=scale,
                segment_ids=work.segment_ids, kv_segment_ids=work.kv_segment_ids, backend=backend,
            )
            merge_attention_(out[:, :, qs], lse[:, :, qs], blk_out, blk_lse)
            del blk_out, blk_lse
        if more:
            comm.wait()
            block = incoming
    return out, lse


def _ring_backward(dout, q, k, v, out, lse, plan, scale, group, backend):
    kv_comm, grad_comm = RingComm(group), RingComm(group)
    acc = _accumulator_dtype(q)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    block = [k, v]
    grad_incoming: list[torch.Tensor] = []
    for step, work in enumerate(plan):
        more = step + 1 < len(plan)
        if more:
            incoming = kv_comm.start(block)
        if step == 0:
            dk = torch.zeros(k.shape, dtype=acc, device=k.device)
            dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        else:
            dk = dv = None  # the accumulated gradients of the block we now hold: in flight from its last holder
        for tile in _tiles(work, backward_tile(q)) if work is not None else ():
            qs, ks = tile.queries, tile.keys
            dq_blk, dk_blk, dv_blk = block_attention_backward(
                dout[:, :, qs], q[:, :, qs], block[0][:, :, ks], block[1][:, :, ks], out[:, :, qs],
                lse[:, :, qs], causal=tile.causal, scale=scale, segment_ids=tile.segment_ids,
                kv_segment_ids=tile.kv_segment_ids, q_offset=tile.q_offset, kv_offset=tile.kv_offset,
                backend=backend,
            )
            dq[:, :, qs] += dq_blk
            del dq_blk  # fp32 blocks of all the tile's queries: not held through the next kernel
            if dk is None:  # the transfer overlapped the step's first kernel
                grad_comm.wait()
                dk, dv = grad_incoming
            dk[:, :, ks] += dk_blk
            dv[:, :, ks] += dv_blk
            del dk_blk, dv_blk
        if dk is None:  # nothing to compute at this step
            grad_comm.wait()
            dk, dv = grad_incoming
        grad_incoming = grad_comm.start([dk, dv])
        if more:
            kv_comm.wait()
            block = incoming
    # The last hop brings this rank's own block's gradients home.
    grad_comm.wait()
    dk, dv = grad_incoming
    return dq, dk, dv


class _RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_ids, causal, scale, group, backend, plan_cache=None):
        rank, world_size = sp_world(group)
        plan = _cached_plan(plan_cache, rank, world_size, causal, q.shape[2], segment_ids, group)
        out, lse = _ring_forward(q, k, v, plan, scale, group, backend)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan  # its segment ids are integer tensors, outside autograd: kept as they are
        ctx.args = (scale, group, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, ctx.plan, *ctx.args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def _cached_plan(cache: dict | None, rank: int, world_size: int, causal: bool, local_len: int,
                 segment_ids: torch.Tensor | None, group) -> list[_Step | None]:
    """``_ring_plan``, reused from ``cache`` for the same segment ids object (held by the entry, so its
    identity cannot pass to other ids) with the same version, group, causality and length."""
    if cache is None or segment_ids is None:
        return _ring_plan(rank, world_size, causal, local_len, segment_ids, group)
    key = (id(segment_ids), segment_ids._version, id(group), causal, local_len)
    hit = cache.get(key)
    if hit is not None and hit[0] is segment_ids:
        return hit[1]
    plan = _ring_plan(rank, world_size, causal, local_len, segment_ids, group)
    cache[key] = (segment_ids, plan)
    return plan


def _check_local_inputs(q, k, v, segment_ids, world_size, scale, backend, zigzag: bool = True) -> float:
    """Everything this rank can check alone, before any communication. Returns the resolved scale.

    Raises ValueError or TypeError (the kernels' own checks: dtypes, devices, batch / heads / head_dim)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, local_len, head_dim), got {shape}")
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        raise ValueError(
            f"q, k, v must hold the same local sequence length, got {q.shape[2]}, {k.shape[2]}, {v.shape[2]}"
        )
    if zigzag and world_size > 1 and q.shape[2] % 2:
        raise ValueError(
            f"local sequence length {q.shape[2]} is odd: a zigzag shard holds two equal chunks "
            "(shard the full sequence with shard_sequence, whose length must divide by 2 * world_size)"
        )
    if segment_ids is not None and (
        not isinstance(segment_ids, torch.Tensor)
        or segment_ids.dim() != 2
        or tuple(segment_ids.shape) != (q.shape[0], q.shape[2])
    ):
        got = tuple(segment_ids.shape) if isinstance(segment_ids, torch.Tensor) else type(segment_ids).__name__
        raise ValueError(f"segment_ids must have shape (batch, local_len) = {(q.shape[0], q.shape[2])}, got {got}")
    if segment_ids is not None:
        if segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex or segment_ids.dtype == torch.bool:
            raise TypeError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
        if segment_ids.device != q.device:
            raise ValueError(f"segment_ids is on {segment_ids.device} but q is on {q.device}")
    # The block kernels' checks (float dtype shared by q/k/v, integer segment ids, one device, batch, head_dim,
    # heads a multiple of kv_heads) and the backend's (known, fits the device and dtype): failing any of them
    # inside the ring would leave this rank's first exchange posted.
    check_attention_inputs(q, k, v, segment_ids, segment_ids, 0, 0)
    resolve_backend(backend, q)
    if scale is None:
        return q.shape[-1] ** -0.5
    try:
        return float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}") from None


def _validate(q, k, v, segment_ids, causal, scale, group, backend, world_size, zigzag: bool = True) -> float:
    """Local checks, then (unless this call's signature is already agreed in ``group``, or ``ring_settings``
    turned the check off) the cross-rank check (``ringlwm.ring.agreement``). Returns the resolved scale. When
    it raises, no ring exchange has been posted on any rank."""
    error = None
    try:
        scale = _check_local_inputs(q, k, v, segment_ids, world_size, scale, backend, zigzag)
    except (TypeError, ValueError) as exc:
        if world_size == 1 or not _SETTINGS.check_agreement:
            raise
        error = exc
    if error is not None:
        # The other ranks may be in the agreement check with valid inputs: join it, so that they raise too.
        try:
            check_call_agreement(group, None, error, world_size)
        except (TypeError, ValueError) as combined:
            if type(combined) is type(error) and str(combined) == str(error):
                raise error from None  # the same message on every rank; keep this rank's traceback
            raise combined from error
        raise error  # not reached: the check raises on every rank when any rank reports an error
    if world_size == 1 or not _SETTINGS.check_agreement:
        return scale
    agree_once(group, call_signature(q, k, v, segment_ids, causal, scale, backend, world_size), world_size)
    return scale


def _ulysses_segment_ids(segment_ids, ulysses_group, plan_cache):
    """The ring shard's segment ids (every Ulysses rank's piece), gathered once per ``segment_ids`` object when
    the calls share a ``plan_cache`` (a model's layers), so that the ring's own plan cache sees one object."""
    if segment_ids is None:
        return None
    if plan_cache is None:
        return gather_pieces(segment_ids, 1, ulysses_group)
    key = ("ulysses", id(segment_ids), segment_ids._version, id(ulysses_group))
    hit = plan_cache.get(key)
    if hit is None or hit[0] is not segment_ids:
        hit = plan_cache[key] = (segment_ids, gather_pieces(segment_ids, 1, ulysses_group))
    return hit[1]


def _ulysses_ring_attention(q, k, v, *, causal, segment_ids, scale, group, ulysses_group, backend, plan_cache,
                            recompute=False):
    """``ring_attention`` on the 2-D layout (``ringlwm.ring.ulysses``): all-to-all to heads / ulysses of the ring
    shard, the ring (or, without one, one block) over it, all-to-all back. ``recompute``: the attention keeps
    Q, K and V as they came (this rank's piece, all heads, K/V not repeated) and runs their all-to-alls again
    in its backward (``_UlyssesAttention``)."""
    _, ulysses = sp_world(ulysses_group)
    # Checked before the first all-to-all, the same way on every Ulysses rank (shapes agree after this).
    _validate(q, k, v, segment_ids, causal, scale, ulysses_group, backend, ulysses, zigzag=False)
    repeat = check_ulysses_heads(q.shape[1], k.shape[1], ulysses)
    if recompute:
        shard_ids = _ulysses_segment_ids(segment_ids, ulysses_group, plan_cache)
        return _UlyssesAttention.apply(q, k, v, shard_ids, bool(causal), scale, group, ulysses_group, backend,
                                       plan_cache, repeat)
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    q, k, v = (heads_to_sequence(t, ulysses_group) for t in (q, k, v))
    shard_ids = _ulysses_segment_ids(segment_ids, ulysses_group, plan_cache)
    if group is None:  # Ulysses alone: the gathered shard is the whole sequence
        out = blockwise_attention(q, k, v, causal=causal, scale=scale, segment_ids=shard_ids, backend=backend)
    else:
        out = ring_attention(q, k, v, causal=causal, segment_ids=shard_ids, scale=scale, group=group,
                             backend=backend, plan_cache=plan_cache)
    return sequence_to_heads(out, ulysses_group)


class _UlyssesAttention(torch.autograd.Function):
    """Ulysses (x ring) attention that keeps its inputs in the heads layout (this rank's piece, all heads, K/V
    heads not repeated) and runs the all-to-alls of Q, K and V again in its backward, instead of keeping their
    outputs (the sequence layout, K/V repeated up to the Ulysses degree): for Llama-3.1-8B on 8 Ulysses ranks
    that halves what a layer's attention holds through the backward, for three more all-to-alls per layer.
    The same calls in the same order as the plain path: results and gradients are bitwise equal."""

    @staticmethod
    def forward(ctx, q, k, v, shard_ids, causal, scale, group, ulysses_group, backend, plan_cache, repeat):
        qs, ks, vs = _ulysses_inputs(q, k, v, ulysses_group, repeat)
        rank, ring = sp_world(group) if group is not None else (0, 1)  # None: Ulysses alone, no ring
        if group is not None:  # the ring's own input check, as ring_attention makes it after the all-to-all
            scale = _validate(qs, ks, vs, shard_ids, causal, scale, group, backend, ring)
        if ring > 1:
            plan = _cached_plan(plan_cache, rank, ring, causal, qs.shape[2], shard_ids, group)
            out, lse = _ring_forward(qs, ks, vs, plan, scale, group, backend)
            out = out.to(q.dtype)
        else:
            plan = None
            out, lse = block_attention_forward(qs, ks, vs, causal=causal, scale=scale, segment_ids=shard_ids,
                                               kv_segment_ids=shard_ids, backend=backend)
        ctx.save_for_backward(q, k, v, out, lse, shard_ids)
        ctx.args = (causal, scale, group, ulysses_group, backend, repeat, plan)
        return _sequence_to_heads(out, ulysses_group, sp_world(ulysses_group)[1])

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, shard_ids = ctx.saved_tensors
        causal, scale, group, ulysses_group, backend, repeat, plan = ctx.args
        ulysses = sp_world(ulysses_group)[1]
        dout = _heads_to_sequence(dout, ulysses_group, ulysses)
        qs, ks, vs = _ulysses_inputs(q, k, v, ulysses_group, repeat)
        if plan is not None:
            grads = list(_ring_backward(dout, qs, ks, vs, out, lse, plan, scale, group, backend))
        else:
            grads = list(block_attention_backward(dout, qs, ks, vs, out, lse, causal=causal, scale=scale,
                                                  segment_ids=shard_ids, kv_segment_ids=shard_ids, backend=backend))
        del dout, qs, ks, vs
        for i in range(3):  # one at a time: each fp32 gradient is freed once cast, before its all-to-all
            cast, grads[i] = grads[i].to(q.dtype), None
            grads[i] = _sequence_to_heads(cast, ulysses_group, ulysses)
            del cast
        dq, dk, dv = grads
        if repeat > 1:  # the sum over the copies, as autograd sums it through repeat_interleave
            with torch.enable_grad():
                kd, vd = k.detach().requires_grad_(), v.detach().requires_grad_()
                dk, dv = torch.autograd.grad((kd.repeat_interleave(repeat, dim=1), vd.repeat_interleave(repeat, dim=1)),
                                             (kd, vd), (dk, dv))
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _ulysses_inputs(q, k, v, ulysses_group, repeat):
    """Q, K, V after the all-to-all (K/V heads repeated first), outside autograd."""
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    ulysses = sp_world(ulysses_group)[1]
    return tuple(_heads_to_sequence(t, ulysses_group, ulysses) for t in (q, k, v))


@dataclass
class RingSettings:
    """What ``ring_settings`` changes (see there)."""

    check_agreement: bool = True
    skip_unshared_steps: bool = True


_SETTINGS = RingSettings()


@contextlib.contextmanager
def ring_settings(*, check_agreement: bool | None = None, skip_unshared_steps: bool | None = None):
    """Change how the ring runs within the block, for runs that measure it rather than train (the planner):

    check_agreement=False: no cross-rank check of the call signatures (a fake process group has no peers to
    answer; every rank of a real one must then make the same calls, unchecked).
    skip_unshared_steps=False: every ring step is computed, even one whose queries and keys share no document
    (no host read of the gathered ids to decide it; the work of a batch of one document per row, the most a
    step can cost). Results are exact either way: a skipped step adds nothing.
    """
    global _SETTINGS
    saved = _SETTINGS
    _SETTINGS = RingSettings(
        saved.check_agreement if check_agreement is None else bool(check_agreement),
        saved.skip_unshared_steps if skip_unshared_steps is None else bool(skip_unshared_steps),
    )
    try:
        yield _SETTINGS
    finally:
        _SETTINGS = saved


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype where autocast is on for ``device_type``, else None."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    segment_ids: torch.Tensor | None = None,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    ulysses_group: dist.ProcessGroup | None = None,
    backend: str | None = None,
    plan_cache: dict | None = None,
    ulysses_recompute: bool = False,
) -> torch.Tensor:
    """Exact attention over a sequence sharded across ``group`` in the zigzag layout, differentiable.

    q: (batch, heads, local_len, head_dim); k, v: (batch, kv_heads, local_len, head_dim), this rank's
    shards from ``shard_sequence(x, dim=2)`` (local_len = seq_len / W). segment_ids: (batch, local_len) this
    rank's shard of the packed-document ids, or None; with them, each call also gathers every rank's ids
    once (one all_gather, one host sync) to skip the ring steps that share no document.
    group: the sequence-parallel process group, the ring (default: the world).
    ulysses_group: with several ranks, the 2-D layout (``ringlwm.ring.ulysses``): q, k, v and segment_ids are
    this rank's piece of its ring shard (``shard_sequence(x, 2, group, ulysses_group)``); four all-to-alls
    over this group (Q, K, V, the output) put heads / ulysses of the ring shard on each rank around the ring.
    ``group`` None then means no ring (Ulysses alone). The heads must divide by its size, and the K/V heads
    divide by it or it by them (see ``check_ulysses_heads``). ``ulysses_recompute``: keep Q, K and V as given
    (not their all-to-all outputs, K/V repeated) for the backward, which runs their all-to-alls again;
    bitwise the same results, less memory held through the backward, three more all-to-alls.
    backend: the block kernel ("auto", "torch_flash", "cudnn", "flash_attn", "triton", "cpu"; default by device).
    plan_cache: a dict shared by calls that every rank makes in the same order with the same ``segment_ids``
    object (a model's layers within one forward, ``RingLlamaForCausalLM`` passes one): the first call's
    gather of the ids and its skip plan serve the others, so a forward costs one all_gather and one host
    sync instead of one per layer.
    Returns (batch, heads, local_len, head_dim) in q's dtype. With one rank (or no process group) this
    is ``blockwise_attention``.

    Every rank of ``group`` must make the same calls with the same shapes and options: a call with a new
    combination (shapes, dtype, causal, scale, segment ids given or not, backend, grad needed or not) first
    checks that all ranks agree (one small all_gather), and raises the same error on every rank otherwise;
    later calls with that combination add no collective.

    Under autocast (fp32 weights, mixed precision) q, k and v are cast to the autocast dtype, as autocast
    casts the inputs of ``scaled_dot_product_attention``; the blocks accumulate in fp32 as always.
    """
    dtype = autocast_dtype(q.device.type) if isinstance(q, torch.Tensor) else None
    if dtype is not None:
        with torch.autocast(q.device.type, enabled=False):
            return ring_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, segment_ids=segment_ids,
                                  scale=scale, group=group, ulysses_group=ulysses_group, backend=backend,
                                  plan_cache=plan_cache, ulysses_recompute=ulysses_recompute)
    if ulysses_world(ulysses_group)[1] > 1:
        return _ulysses_ring_attention(q, k, v, causal=causal, segment_ids=segment_ids, scale=scale, group=group,
                                       ulysses_group=ulysses_group, backend=backend, plan_cache=plan_cache,
                                       recompute=ulysses_recompute)
    _, world_size = sp_world(group)
    resolved_scale = _validate(q, k, v, segment_ids, causal, scale, group, backend, world_size)
    if world_size == 1:
        return blockwise_attention(q, k, v, causal=causal, scale=scale, segment_ids=segment_ids, backend=backend)
    return _RingAttentionFunction.apply(q, k, v, segment_ids, bool(causal), resolved_scale, group, backend, plan_cache)


class RingAttention(nn.Module):
    """``ring_attention`` as a module: a drop-in for the attention call of an existing model.

    forward(q, k, v, segment_ids=None) with the shapes of ``ring_attention``.
    """

    def __init__(self, causal: bool = True, group: dist.ProcessGroup | None = None, scale: float | None = None,
                 backend: str | None = None, ulysses_group: dist.ProcessGroup | None = None):
        super().__init__()
        self.causal = causal
        self.group = group
        self.ulysses_group = ulysses_group
        self.scale = scale
        self.backend = backend

    def forward(self, q, k, v, segment_ids=None):
        return ring_attention(q, k, v, causal=self.causal, segment_ids=segment_ids, scale=self.scale,
                              group=self.group, ulysses_group=self.ulysses_group, backend=self.backend)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, backend={self.backend or 'auto'}"
