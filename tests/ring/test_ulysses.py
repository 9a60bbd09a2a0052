"""Ulysses x ring (2-D sequence parallelism) on 2 and 4 gloo processes against fp64 full attention.

Every rank builds the same full tensors from one seed and computes the reference itself (fp64, explicit
mask: tests/reference.py), takes its part with ``shard_sequence(x, dim, ring, ulysses)``, runs
``ring_attention(..., group=ring, ulysses_group=ulysses)`` and compares ``unshard_sequence`` of the outputs and
gradients with the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import grid_groups, run_distributed
from reference import max_err, reference_attention

from ringlwm import RingAttention, ring_attention, shard_sequence, unshard_sequence
from ringlwm.ring import check_layout, check_ulysses_heads, sequence_group


def _inputs(batch, heads, kv_heads, seqlen, head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads), (batch, kv_heads), (batch, kv_heads), (batch, heads)]
    return [torch.randn(*s, seqlen, head_dim, generator=gen, dtype=torch.float64) for s in shapes]


def _packed(batch, seqlen, cuts):
    """Segment ids with documents starting at ``cuts`` (row b: shifted by b, so rows differ)."""
    ids = torch.zeros(batch, seqlen, dtype=torch.long)
    for b in range(batch):
        for c in cuts:
            ids[b, (c + b) % seqlen:] += 1
    return ids


def _check(ring, uly, *, causal, heads=4, kv_heads=4, seqlen=48, cuts=None, module=False, seed=0, tol=1e-10):
    q, k, v, dout = _inputs(2, heads, kv_heads, seqlen, 16, seed)
    seg = _packed(2, seqlen, cuts) if cuts else None
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference_attention(*ref_in, causal=causal, segment_ids=seg, kv_segment_ids=seg)
    ref_out.backward(dout)

    local = [shard_sequence(t, 2, ring, uly).requires_grad_() for t in (q, k, v)]
    local_seg = None if seg is None else shard_sequence(seg, 1, ring, uly)
    if module:
        out = RingAttention(causal=causal, group=ring, ulysses_group=uly)(*local, segment_ids=local_seg)
    else:
        out = ring_attention(*local, causal=causal, segment_ids=local_seg, group=ring, ulysses_group=uly)
    assert out.shape == local[0].shape
    out.backward(shard_sequence(dout, 2, ring, uly))
    for name, got, want in zip(("out", "dq", "dk", "dv"), [out] + [t.grad for t in local],
                               [ref_out] + [t.grad for t in ref_in]):
        err = max_err(unshard_sequence(got.detach(), 2, ring, uly), want)
        assert err <= tol, f"{name}: max error {err:.3e} (causal={causal}, heads {heads}/{kv_heads})"


def _matches_full_attention(rank, world_size, sp, ulysses):
    ring, uly = grid_groups(sp, ulysses)
    if sp == 1:
        ring = None  # Ulysses alone: no ring group
    for causal in (True, False):
        _check(ring, uly, causal=causal)
    _check(ring, uly, causal=True, kv_heads=ulysses if ulysses <= 4 else 4, seed=1)  # GQA, kv heads divide
    _check(ring, uly, causal=True, heads=4, kv_heads=1, seed=2)  # K/V heads repeated for the all-to-all
    # documents whose boundaries fall inside the Ulysses pieces (a piece is 48 / (sp * ulysses) tokens)
    _check(ring, uly, causal=True, kv_heads=2 if ulysses <= 2 else 1, cuts=[5, 17, 30], seed=3)
    _check(ring, uly, causal=False, cuts=[7, 29], module=True, seed=4)


@pytest.mark.parametrize("sp,ulysses", [(1, 2), (2, 1), (2, 2), (1, 4)])
def test_ulysses_ring_matches_full_attention(sp, ulysses):
    run_distributed(_matches_full_attention, sp * ulysses, sp, ulysses)


def _count_collectives(rank, world_size):
    """Per call at (sp=2, ulysses=2): four all-to-alls forward (Q, K, V, the output) and four backward, one
    gather of the segment ids over the Ulysses group shared by every call with the same ids and cache."""
    ring, uly = grid_groups(2, 2)
    counts = {"all_to_all_single": 0, "all_gather": 0}
    originals = {name: getattr(dist, name) for name in counts}

    def counting(name):
        def call(*args, **kwargs):
            if kwargs.get("group") is uly:
                counts[name] += 1
            return originals[name](*args, **kwargs)
        return call

    q, k, v, dout = _inputs(1, 4, 2, 32, 8, 0)
    seg = shard_sequence(_packed(1, 32, [9]), 1, ring, uly)
    local = [shard_sequence(t, 2, ring, uly).requires_grad_() for t in (q, k, v)]
    ring_attention(*local, group=ring, ulysses_group=uly, segment_ids=seg)  # agreement checks settle here
    for name in counts:
        setattr(dist, name, counting(name))
    try:
        cache = {}
        out = ring_attention(*local, group=ring, ulysses_group=uly, segment_ids=seg, plan_cache=cache)
        forward = dict(counts)
        ring_attention(*local, group=ring, ulysses_group=uly, segment_ids=seg, plan_cache=cache)  # a second layer
        second = {n: counts[n] - forward[n] for n in counts}
        before = dict(counts)
        out.backward(shard_sequence(dout, 2, ring, uly))
        backward = {n: counts[n] - before[n] for n in counts}
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return forward, second, backward


def test_four_all_to_alls_per_layer_forward():
    for forward, second, backward in run_distributed(_count_collectives, 4):
        assert forward == {"all_to_all_single": 4, "all_gather": 1}, forward
        assert second == {"all_to_all_single": 4, "all_gather": 0}, second
        assert backward["all_to_all_single"] == 4, backward


def _bad_degrees(rank, world_size):
    ring, uly = grid_groups(1, 4)
    q = torch.randn(1, 6, 8, 8, dtype=torch.float64)
    k = v = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    try:
        ring_attention(q, k, v, ulysses_group=uly)
    except ValueError as exc:
        return str(exc)
    return None


def test_heads_that_do_not_fit_ulysses_are_refused_on_every_rank():
    messages = run_distributed(_bad_degrees, 4)
    assert all(m and "ulysses = 4" in m and "[1, 3, 6]" in m for m in messages), messages


def test_ulysses_head_rules_and_layout_lengths():
    assert check_ulysses_heads(32, 8, 8) == 1
    assert check_ulysses_heads(32, 8, 16) == 2  # every K/V head twice
    assert check_ulysses_heads(4, 1, 4) == 4
    with pytest.raises(ValueError, match=r"degrees that work: \[1, 2, 4, 8\]"):
        check_ulysses_heads(8, 8, 3)
    with pytest.raises(ValueError, match="kv|key/value"):
        check_ulysses_heads(12, 8, 3)  # 12 % 3 == 0 but neither 8 % 3 nor 3 % 8
    check_layout(48, 2, 2)
    check_layout(6, 1, 3)  # Ulysses alone: pieces only
    with pytest.raises(ValueError, match="multiple of 12"):
        check_layout(40, 2, 3)  # 2 * sp = 4 zigzag chunks; each ring shard in 3 pieces


def _sequence_group_ranks(rank, world_size):
    ring, uly = grid_groups(2, 2)
    group = sequence_group(ring, uly)
    return dist.get_process_group_ranks(group), sequence_group(ring, uly) is group


def test_sequence_group_spans_ring_and_ulysses_ranks():
    got = run_distributed(_sequence_group_ranks, 4)
    assert got == [([0, 1, 2, 3], True)] * 4


def _saved_bytes(*args, **kwargs):
    """Bytes of the distinct storages autograd keeps for the backward of ``ring_attention(*args, **kwargs)``,
    and its output."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ring_attention(*args, **kwargs)
    return sum(kept.values()), out


def _recompute_is_bitwise(rank, world_size, sp, ulysses):
    ring, uly = grid_groups(sp, ulysses)
    if sp == 1:
        ring = None
    results = []
    for dtype, heads, kv_heads, cuts in ((torch.float32, 4, 4, None), (torch.bfloat16, 4, 1, [5, 17, 30]),
                                         (torch.bfloat16, 8, 2, None)):
        q, k, v, dout = (t.to(dtype) for t in _inputs(2, heads, kv_heads, 48, 16, seed=heads + kv_heads))
        seg = None if cuts is None else shard_sequence(_packed(2, 48, cuts), 1, ring, uly)
        runs = []
        for recompute in (False, True):
            local = [shard_sequence(t, 2, ring, uly).requires_grad_() for t in (q, k, v)]
            saved, out = _saved_bytes(*local, causal=True, segment_ids=seg, group=ring, ulysses_group=uly,
                                      ulysses_recompute=recompute)
            out.backward(shard_sequence(dout, 2, ring, uly))
            runs.append((saved, [out.detach()] + [t.grad for t in local]))
        for got, want in zip(runs[1][1], runs[0][1]):
            assert got.dtype == want.dtype and torch.equal(got, want)
        results.append((runs[0][0], runs[1][0], kv_heads))
    return results


@pytest.mark.parametrize("sp,ulysses", [(1, 2), (2, 2), (1, 4)])
def test_ulysses_recompute_is_bitwise_and_keeps_less(sp, ulysses):
    """``ulysses_recompute``: the same output and gradients, bit for bit (fp32 and bf16, K/V repeated for the
    all-to-all, packed documents), and the backward keeps the heads-layout inputs instead of the all-to-all
    outputs: as much without K/V repeats (the same bytes in the other layout), less by the repeats with them."""
    for plain, kept, kv_heads in run_distributed(_recompute_is_bitwise, sp * ulysses, sp, ulysses)[0]:
        if kv_heads < ulysses:  # K/V heads repeated to fit the Ulysses degree
            assert kept < plain, (plain, kept, kv_heads)
        else:
            assert kept == plain, (plain, kept, kv_heads)
