"""ring_attention with inputs that disagree across ranks, or fail the local checks on one rank only.

Every case must raise the same error on every rank, before any ring exchange is posted (so that the next
collective still works), and the cross-rank check must cost one collective per new call signature only.
All cases run in sequence in one 2-process launch; the group they use has a short timeout, so a hang
fails the test instead of stalling it.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from ringlwm.kernels import blockwise_attention

import ringlwm.ring.agreement as agreement
from ringlwm import ring_attention, shard_sequence, unshard_sequence

BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 16


def _local(rank, *, seq=8, heads=HEADS, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed + rank)
    q = torch.randn(BATCH, heads, seq, HEAD_DIM, generator=gen).to(dtype)
    k = torch.randn(BATCH, KV_HEADS, seq, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(BATCH, KV_HEADS, seq, HEAD_DIM, generator=gen).to(dtype)
    return q, k, v


class _Counter:
    """Counts the collectives and ring exchanges this process issues."""

    def __init__(self):
        self.all_gather = 0
        self.p2p = 0
        self._real = (dist.all_gather, dist.batch_isend_irecv)

    def __enter__(self):
        real_gather, real_p2p = self._real

        def all_gather(*args, **kwargs):
            self.all_gather += 1
            return real_gather(*args, **kwargs)

        def batch_isend_irecv(ops):
            self.p2p += 1
            return real_p2p(ops)

        dist.all_gather, dist.batch_isend_irecv = all_gather, batch_isend_irecv
        return self

    def __exit__(self, *exc):
        dist.all_gather, dist.batch_isend_irecv = self._real


def _all_ranks_raise(group, rank, error, match, make_inputs, **kwargs):
    """One rank's call; pytest.raises runs on every rank, so every rank must raise."""
    q, k, v = make_inputs()
    with _Counter() as count, pytest.raises(error, match=match):
        ring_attention(q, k, v, group=group, **kwargs)
    assert count.p2p == 0, "a ring exchange was posted before the inputs were checked"
    assert count.all_gather == 1, count.all_gather


def _collectives_still_work(group, rank, world_size):
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total, group=group)
    assert total.item() == world_size * (world_size + 1) / 2
    dist.barrier(group=group)


def _inconsistent_inputs(rank, world_size):
    group = dist.new_group(list(range(world_size)), timeout=timedelta(seconds=30))
    odd = rank == 1  # the rank whose inputs differ

    # Inputs that pass every local check but differ between ranks: ValueError naming the field, by rank.
    cases = [
        (r"local_len \[8, 6\]", lambda: _local(rank, seq=6 if odd else 8), {}),
        (r"dtype \['torch.float32', 'torch.float64'\]",
         lambda: _local(rank, dtype=torch.float64 if odd else torch.float32), {}),
        (r"heads \[4, 2\]", lambda: _local(rank, heads=2 if odd else 4), {}),
        (r"causal \[True, False\]", lambda: _local(rank), {"causal": not odd}),
    ]
    for match, make, kwargs in cases:
        _all_ranks_raise(group, rank, ValueError, "differ across the 2 ranks.*" + match, make, **kwargs)
        _collectives_still_work(group, rank, world_size)
    seg = None if odd else torch.zeros(BATCH, 8, dtype=torch.long)
    _all_ranks_raise(group, rank, ValueError, r"segment_ids \['torch.int64', None\]", lambda: _local(rank),
                     segment_ids=seg)

    # A local failure on one rank only (integer inputs): the same TypeError everywhere, naming the rank and
    # the problem, and nothing left posted: the next collectives complete.
    def ints():
        q, k, v = _local(rank)
        return tuple(t.long() for t in (q, k, v)) if odd else (q, k, v)

    _all_ranks_raise(group, rank, TypeError, r"rejected on 1 of the 2 ranks .*rank 1: .*floating dtype", ints)
    _collectives_still_work(group, rank, world_size)
    # Float segment ids on one rank only.
    seg = torch.zeros(BATCH, 8, dtype=torch.float32 if odd else torch.long)
    _all_ranks_raise(group, rank, TypeError, r"rank 1: segment_ids must be an integer tensor", lambda: _local(rank),
                     segment_ids=seg)
    # The same local failure on every rank: the plain local message, as without the cross-rank check.
    _all_ranks_raise(group, rank, ValueError, r"^heads \(3\) must be a multiple of kv_heads \(2\)$",
                     lambda: _local(0, heads=3))
    _collectives_still_work(group, rank, world_size)

    # Consistent inputs: the ring runs and is exact; the check costs one all_gather for a new signature
    # and none for a signature already agreed on.
    seq = 8 * world_size
    gen = torch.Generator().manual_seed(7)
    full = [torch.randn(BATCH, h, seq, HEAD_DIM, generator=gen, dtype=torch.float64)
            for h in (HEADS, KV_HEADS, KV_HEADS)]
    local = [shard_sequence(t, dim=2, group=group) for t in full]
    for causal in (True, False):
        want = blockwise_attention(*full, causal=causal)
        with _Counter() as first:
            out = ring_attention(*local, causal=causal, group=group)
        with _Counter() as second:
            again = ring_attention(*local, causal=causal, group=group)
        assert (first.all_gather, second.all_gather) == (1, 0), (first.all_gather, second.all_gather)
        assert first.p2p == second.p2p > 0
        assert torch.equal(out, again)
        torch.testing.assert_close(unshard_sequence(out, dim=2, group=group), want, rtol=1e-10, atol=1e-10)
    # Gradients: a new signature (a backward ring follows), checked once; the backward adds no check.
    local = [t.requires_grad_() for t in local]
    for _ in range(2):
        with _Counter() as count:
            ring_attention(*local, group=group).sum().backward()
    assert count.all_gather == 0
    assert len(agreement._AGREED[group]) == 3


def test_inconsistent_inputs_raise_on_every_rank():
    run_distributed(_inconsistent_inputs, 2)
