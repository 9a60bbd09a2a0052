"""Ulysses x ring: head-parallel all-to-all inside a node, the ring across nodes (2-D sequence parallelism).

A sequence is spread over ``sp x ulysses`` ranks. The ring's zigzag shard of ring rank r (chunks r and
2sp-1-r of 2sp) is cut into ``ulysses`` contiguous pieces, and Ulysses rank u holds piece u:

    ring rank r, Ulysses rank u:  tokens  zigzag_shard(r)[u * n : (u + 1) * n],  n = seq_len / (sp * ulysses)

Attention, after the projections and RoPE (each rank: all heads of its piece):
1. one all-to-all over the Ulysses group per Q, K and V: heads scattered, sequence gathered, so that every
   rank of the Ulysses group holds its ring rank's whole zigzag shard for heads / ulysses of the heads;
2. the ring, unchanged, over the ring group (its plan, segment skipping, fp32 merge);
3. one all-to-all back: sequence scattered, heads gathered.
The backward of each all-to-all is the transposed one. Each token crosses the Ulysses group once per tensor,
while the ring moves each K/V block sp - 1 times: Ulysses inside a node (NVLink), the ring across nodes.

GQA: the heads must divide by ``ulysses``; the K/V heads either divide by it too, or ``ulysses`` divides by
them, and then each K/V head is repeated ``ulysses / kv_heads`` times before the all-to-all (its gradient is
the sum over the copies: exact).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ringlwm.ring.comm import all_gather_by_rank, moves_host_memory
from ringlwm.ring.layout import ring_world, sp_world, ulysses_world


def check_ulysses_heads(heads: int, kv_heads: int, ulysses: int) -> int:
    """How often each K/V head is repeated before the all-to-all (1: none). Raises ValueError naming the
    Ulysses degrees that work for these heads when ``ulysses`` is not one of them."""
    if ulysses == 1:
        return 1
    if heads % ulysses == 0 and (kv_heads % ulysses == 0 or ulysses % kv_heads == 0):
        return 1 if kv_heads % ulysses == 0 else ulysses // kv_heads
    valid = [u for u in range(1, heads + 1) if heads % u == 0 and (kv_heads % u == 0 or u % kv_heads == 0)]
    raise ValueError(f"ulysses = {ulysses} does not fit {heads} attention heads and {kv_heads} key/value heads: "
                     f"the heads must divide by it, and the key/value heads divide by it or it by them; degrees "
                     f"that work: {valid}")


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all_single of (world, ...) slabs: slab j goes to rank j; slab j of the result came from rank j."""
    send = x.contiguous()
    if moves_host_memory(group) and send.device.type != "cpu":
        recv = torch.empty_like(send, device="cpu")
        dist.all_to_all_single(recv, send.cpu(), group=group)
        return recv.to(x.device)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def _heads_to_sequence(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """(batch, heads, n, dim) of this rank's piece -> (batch, heads / world, world * n, dim): the group's
    pieces in Ulysses-rank order, for this rank's slice of the heads."""
    b, h, n, d = x.shape
    slabs = x.reshape(b, world, h // world, n, d).transpose(0, 1)  # (world, b, h/w, n, d): slab j -> rank j
    got = _all_to_all(slabs, group)  # slab j: rank j's piece, our heads
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // world, world * n, d)


def _sequence_to_heads(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """The inverse of ``_heads_to_sequence``: (batch, heads / world, world * n, dim) -> (batch, heads, n, dim)."""
    b, hw, wn, d = x.shape
    n = wn // world
    slabs = x.reshape(b, hw, world, n, d).permute(2, 0, 1, 3, 4)  # (world, b, h/w, n, d): piece j -> rank j
    got = _all_to_all(slabs, group)  # slab j: our piece, rank j's heads
    return got.transpose(0, 1).reshape(b, world * hw, n, d)


class _AllToAll(torch.autograd.Function):
    """One of the two all-to-alls; its backward is the other one."""

    @staticmethod
    def forward(ctx, x, group, world, to_sequence: bool):
        ctx.args = (group, world, to_sequence)
        return (_heads_to_sequence if to_sequence else _sequence_to_heads)(x, group, world)

    @staticmethod
    def backward(ctx, grad):
        group, world, to_sequence = ctx.args
        return (_sequence_to_heads if to_sequence else _heads_to_sequence)(grad, group, world), None, None, None


def heads_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-to-all over the Ulysses ``group``: (batch, heads, n, dim), all heads of this rank's
    piece -> (batch, heads / ulysses, ulysses * n, dim), the group's whole shard for this rank's heads."""
    _, world = sp_world(group)
    return x if world == 1 else _AllToAll.apply(x, group, world, True)


def sequence_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """The inverse all-to-all of ``heads_to_sequence`` (its backward is ``heads_to_sequence``)."""
    _, world = sp_world(group)
    return x if world == 1 else _AllToAll.apply(x, group, world, False)


def gather_pieces(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every Ulysses rank's piece of ``x`` along ``dim``, concatenated in rank order (not differentiable): the
    ring rank's whole zigzag shard (segment ids, positions)."""
    _, world = sp_world(group)
    return x if world == 1 else torch.cat(all_gather_by_rank(x, group, world), dim=dim)


_SEQUENCE_GROUPS: dict[tuple, tuple] = {}


def sequence_group(ring_group, ulysses_group):
    """The group of every rank that holds one sequence: the ring's ranks times the Ulysses ranks (losses, the
    batch agreement check and input checks reduce over it). ``ring_group`` itself without Ulysses. Made once
    per pair, by the group's own ranks only (``use_local_synchronization``): every rank of it must call this
    at the same point (a forward, the ring's setup), as they do the collectives that follow."""
    _, ulysses = ulysses_world(ulysses_group)
    if ulysses == 1:
        return ring_group
    _, ring = ring_world(ring_group, ulysses_group)
    if ring == 1:
        return ulysses_group
    key = (id(ring_group), id(ulysses_group))
    if key not in _SEQUENCE_GROUPS or _SEQUENCE_GROUPS[key][:2] != (ring_group, ulysses_group):
        me = dist.get_rank()
        ring_ranks = dist.get_process_group_ranks(ring_group)
        ulysses_ranks = dist.get_process_group_ranks(ulysses_group)
        # A product layout (a device mesh): rank(s, u) = ring_ranks[s] + ulysses_ranks[u] - me.
        ranks = sorted({r + q - me for r in ring_ranks for q in ulysses_ranks})
        if len(ranks) != ring * ulysses or set(ring_ranks) & set(ulysses_ranks) != {me}:
            raise ValueError(f"the ring group {ring_ranks} and the Ulysses group {ulysses_ranks} do not form a "
                             "2-D grid of ranks (build them from one device mesh: ringlwm.hf.setup_sequence_parallel "
                             "or ringlwm.parallel.ParallelDims)")
        _SEQUENCE_GROUPS[key] = (ring_group, ulysses_group, dist.new_group(ranks, use_local_synchronization=True))
    return _SEQUENCE_GROUPS[key][2]


def register_sequence_group(ring_group, ulysses_group, group) -> None:
    """Make ``group`` (built beside the ring and Ulysses groups, by every rank) what ``sequence_group`` returns
    for them, instead of a group it would make itself."""
    _SEQUENCE_GROUPS[(id(ring_group), id(ulysses_group))] = (ring_group, ulysses_group, group)

