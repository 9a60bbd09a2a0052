"""RingAttention on 2, 3 and 4 gloo processes against fp64 full attention on one process.

Every rank builds the same full tensors from one seed, computes the reference itself (SDPA, math backend,
fp64, explicit mask: tests/reference.py), shards its inputs with ``shard_sequence``, runs the ring, and
compares ``unshard_sequence`` of the ring's outputs and gradients with the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from reference import max_err, reference_attention
from ringlwm.kernels import blockwise_attention

import ringlwm.ring.attention as ring_module
from ringlwm import RingAttention, ring_attention, shard_sequence, unshard_sequence


def _full_inputs(batch, heads, kv_heads, seqlen, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seqlen, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, seqlen, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, seqlen, head_dim, generator=gen, dtype=torch.float64)
    dout = torch.randn(batch, heads, seqlen, head_dim, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, dout)]


def _packed(batch, seqlen, num_docs, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, seqlen, dtype=torch.long)
    for b in range(batch):
        ids[b, torch.randperm(seqlen - 1, generator=gen)[: num_docs - 1] + 1] = 1
    return ids.cumsum(-1)


def _check_case(*, world_size, causal, heads=4, kv_heads=4, segments=False, dtype=torch.float64, tol=1e-10,
                use_module=False, backend=None, group=None, seed=0, chunk=6, head_dim=32):
    seqlen = 2 * world_size * chunk
    q, k, v, dout = _full_inputs(2, heads, kv_heads, seqlen, head_dim, dtype, seed)
    seg = _packed(2, seqlen, 4, seed + 1) if segments else None

    ref_in = [t.detach().double().clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference_attention(*ref_in, causal=causal, segment_ids=seg, kv_segment_ids=seg)
    ref_out.backward(dout.double())

    local = [shard_sequence(t, dim=2, group=group).requires_grad_() for t in (q, k, v)]
    local_seg = shard_sequence(seg, dim=1, group=group) if segments else None
    if use_module:
        out = RingAttention(causal=causal, group=group, backend=backend)(*local, segment_ids=local_seg)
    else:
        out = ring_attention(*local, causal=causal, segment_ids=local_seg, group=group, backend=backend)
    assert out.dtype == dtype and out.shape == local[0].shape
    out.backward(shard_sequence(dout, dim=2, group=group))

    got = [out] + [t.grad for t in local]
    want = [ref_out] + [t.grad for t in ref_in]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        full = unshard_sequence(g.detach(), dim=2, group=group)
        err = max_err(full, w)
        assert err <= tol, f"{name}: max error {err:.3e} > {tol:.1e} (W={world_size}, causal={causal})"


def _matches_full_attention(rank, world_size):
    for causal in (True, False):
        _check_case(world_size=world_size, causal=causal)
    _check_case(world_size=world_size, causal=True, heads=4, kv_heads=2, segments=True, seed=3)  # GQA + packing
    _check_case(world_size=world_size, causal=False, heads=4, kv_heads=1, segments=True, seed=4)  # MQA + packing
    _check_case(world_size=world_size, causal=True, use_module=True, seed=5)
    # fp32: the error of single-device fp32 attention is ~1e-6 here; the ring's fp32 merge adds no more.
    _check_case(world_size=world_size, causal=True, dtype=torch.float32, tol=1e-5, kv_heads=2, segments=True, seed=6)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_matches_full_attention(world_size):
    run_distributed(_matches_full_attention, world_size)


def _triton_backend_in_the_ring(rank, world_size):
    # Block sizes under the interpreter are 32, so chunks of 40 exercise full and partial tiles.
    _check_case(world_size=world_size, causal=True, kv_heads=2, segments=True, dtype=torch.float32, tol=1e-5,
                backend="triton", chunk=40, heads=2)


def test_ring_with_triton_block_kernel():
    run_distributed(_triton_backend_in_the_ring, 2)


def _tiled_backward(rank, world_size):
    """Local lengths above BACKWARD_TILE: each step's backward runs in ragged tiles (causal diagonal tiles
    masked with offsets, tiles above it dropped, segment ids sliced per tile); the fp64 reference holds."""
    from ringlwm.ring import attention

    attention.BACKWARD_TILE_BYTES = 0  # tiles of BACKWARD_TILE tokens, whatever the heads
    attention.BACKWARD_TILE = 5  # local length 12: tiles of 5, 5 and 2 queries and keys
    for causal in (True, False):
        _check_case(world_size=world_size, causal=causal, kv_heads=2, segments=True, seed=21)
    _check_case(world_size=world_size, causal=True, seed=22)
    attention.BACKWARD_TILE = 32  # the Triton kernels under the interpreter, local length 80
    _check_case(world_size=world_size, causal=True, kv_heads=2, segments=True, dtype=torch.float32, tol=1e-5,
                backend="triton", chunk=40, heads=2, seed=23)


def test_ring_backward_in_tiles_matches_full_attention():
    run_distributed(_tiled_backward, 2)


def test_backward_tiles_hold_a_bounded_gradient_block():
    """Tile sides: 64K tokens at Llama-3.1-8B's 32 heads x 128 (a 1 GiB fp32 dq block), more tokens for fewer
    heads at the same bytes, never fewer than BACKWARD_TILE."""
    from ringlwm.ring.attention import BACKWARD_TILE, BACKWARD_TILE_BYTES, backward_tile

    meta = lambda b, h, d: torch.empty(b, h, 8, d, device="meta")  # noqa: E731
    assert backward_tile(meta(1, 32, 128)) == 65536
    assert backward_tile(meta(1, 1, 128)) == 2**21
    assert backward_tile(meta(2, 3, 128)) * 2 * 3 * 128 * 4 <= BACKWARD_TILE_BYTES
    assert backward_tile(meta(4, 64, 256)) == BACKWARD_TILE


def _sub_groups(rank, world_size):
    """Two rings of 2 inside a world of 4 (as on a data x sequence mesh), each on its own data."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    _check_case(world_size=2, causal=True, kv_heads=2, segments=True, group=mine, seed=10 + rank // 2)


def test_ring_on_sub_groups():
    run_distributed(_sub_groups, 4)


def _count_communication_and_work(rank, world_size):
    """Exactly the expected point-to-point operations, and the same attention work on every rank."""
    ops = []
    real_batch = dist.batch_isend_irecv
    dist.batch_isend_irecv = lambda op_list: ops.append(len(op_list)) or real_batch(op_list)
    work = []
    real_fwd = ring_module.block_attention_forward

    def counting_forward(q, k, v, *, causal, **kw):
        pairs = q.shape[2] * k.shape[2]
        work.append(pairs // 2 if causal else pairs)  # a causal diagonal block does about half the work
        return real_fwd(q, k, v, causal=causal, **kw)

    ring_module.block_attention_forward = counting_forward
    try:
        for segments in (False, True):
            ops.clear()
            q, k, v, dout = _full_inputs(1, 4, 2, 8 * world_size, 16, torch.float64, seed=1)
            local = [shard_sequence(t, dim=2).requires_grad_() for t in (q, k, v)]
            seg = shard_sequence(torch.zeros(1, 8 * world_size, dtype=torch.long), dim=1) if segments else None
            out = ring_attention(*local, causal=True, segment_ids=seg)
            forward_ops = sum(ops)
            out.backward(shard_sequence(dout, dim=2))
            backward_ops = sum(ops) - forward_ops
            # k and v, each one send + one receive; key segment ids do not travel (one all_gather, _ring_plan).
            per_block = 2
            assert forward_ops == 2 * per_block * (world_size - 1), (forward_ops, world_size)
            # K/V travel W-1 hops again; dK/dV travel W hops back to their owners.
            assert backward_ops == 2 * per_block * (world_size - 1) + 2 * 2 * world_size, backward_ops
    finally:
        dist.batch_isend_irecv = real_batch
        ring_module.block_attention_forward = real_fwd
    # Load balance of the zigzag layout: every rank computed the same number of query-key pairs.
    totals = [torch.zeros(1, dtype=torch.long) for _ in range(world_size)]
    dist.all_gather(totals, torch.tensor([sum(work)]))
    assert len({int(t) for t in totals}) == 1, [int(t) for t in totals]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ring_point_to_point_count_and_balance(world_size):
    run_distributed(_count_communication_and_work, world_size)


def _packed_by_chunk_pairs(rank, world_size):
    """Documents of two zigzag chunks each (ids = chunk // 2): with W = 3, rank 0 holds documents {0, 2},
    rank 1 {0, 2}, rank 2 {1}, so some ring steps share no document. Those steps run no kernel in either
    direction, the result stays exact, and the plan is made once per call (one gather, one host sync), the
    backward reusing it."""
    assert world_size == 3
    chunk = 4
    seq_len = 2 * world_size * chunk
    calls = {"forward": 0, "backward": 0, "plan": 0, "gather": 0}
    real = {name: getattr(ring_module, name) for name in
            ("block_attention_forward", "block_attention_backward", "_shared_segments", "_gather_segment_ids")}

    def counting(name, key):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return real[name](*args, **kwargs)
        return wrapper

    ring_module.block_attention_forward = counting("block_attention_forward", "forward")
    ring_module.block_attention_backward = counting("block_attention_backward", "backward")
    ring_module._shared_segments = counting("_shared_segments", "plan")
    ring_module._gather_segment_ids = counting("_gather_segment_ids", "gather")
    try:
        seg = (torch.arange(seq_len) // (2 * chunk)).expand(2, seq_len)
        for causal in (True, False):
            q, k, v, dout = _full_inputs(2, 4, 2, seq_len, 16, torch.float64, seed=20)
            ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
            ref_out, _ = reference_attention(*ref_in, causal=causal, segment_ids=seg, kv_segment_ids=seg)
            ref_out.backward(dout)
            local = [shard_sequence(t, dim=2).requires_grad_() for t in (q, k, v)]
            for key in calls:
                calls[key] = 0
            out = ring_attention(*local, causal=causal, segment_ids=shard_sequence(seg, dim=1))
            after_forward = dict(calls)
            out.backward(shard_sequence(dout, dim=2))
            # Steps with work: own block, plus the one other rank holding a shared document (ranks 0 and 1).
            expected = [2, 2, 1][rank]
            assert after_forward == {"forward": expected, "backward": 0, "plan": 1, "gather": 1}, after_forward
            assert calls == {"forward": expected, "backward": expected, "plan": 1, "gather": 1}, calls
            for name, g, w in zip(("out", "dq", "dk", "dv"), [out] + [t.grad for t in local],
                                  [ref_out] + [t.grad for t in ref_in]):
                err = max_err(unshard_sequence(g.detach(), dim=2), w)
                assert err <= 1e-10, f"{name}: max error {err:.3e} (causal={causal})"
        # Without segment ids there is nothing to plan: no gather, no host sync.
        for key in calls:
            calls[key] = 0
        ring_attention(*local, causal=True).sum().backward()
        assert calls == {"forward": 3, "backward": 3, "plan": 0, "gather": 0}, calls
    finally:
        for name, fn in real.items():
            setattr(ring_module, name, fn)


def test_ring_skips_steps_without_shared_documents():
    run_distributed(_packed_by_chunk_pairs, 3)


def test_shared_segments_is_exact_per_row():
    """The overlap test behind the plan: per batch row, never pooled across rows; any integer ids."""
    q_ids = torch.tensor([[5, -1, 3, 3], [0, 0, 1, 2]])
    assert ring_module._shared_segments([
        (q_ids, torch.tensor([[4, 4], [5, 3]])),  # row 0 lacks 4, row 1 lacks 5 and 3: nothing shared
        (q_ids, torch.tensor([[7, -1], [9, 9]])),  # -1 (padding) is an id like any other
        (q_ids, torch.tensor([[0, 1], [8, 2]])),
        (q_ids[:, 2:], torch.tensor([[6], [2]])),
    ]) == [False, True, True, True]


def _layout_and_errors(rank, world_size):
    full = torch.arange(2 * world_size * 2).view(1, -1)
    local = shard_sequence(full, dim=1)
    chunk = 2
    expected = torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk),
                          torch.arange((2 * world_size - 1 - rank) * chunk, (2 * world_size - rank) * chunk)])
    assert torch.equal(local[0], expected)
    assert torch.equal(unshard_sequence(local, dim=1), full)
    with pytest.raises(ValueError, match=f"multiple of {2 * world_size}"):
        shard_sequence(torch.zeros(1, 2 * world_size * 2 + 1), dim=1)
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="odd"):
        ring_attention(q, q, q)
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="segment_ids"):
        ring_attention(q, q, q, segment_ids=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="same local sequence length"):
        ring_attention(q, q[:, :, :4], q[:, :, :4])


def test_zigzag_layout_and_bad_inputs():
    run_distributed(_layout_and_errors, 3)


def test_world_size_one_is_blockwise_attention():
    """Without a process group the ring is exactly the single-device kernel, error messages included."""
    assert not dist.is_initialized()
    q, k, v, _ = _full_inputs(1, 4, 2, 10, 16, torch.float64, seed=2)
    seg = _packed(1, 10, 2, seed=3)
    assert torch.equal(ring_attention(q, k, v, segment_ids=seg),
                       blockwise_attention(q, k, v, causal=True, segment_ids=seg))
    assert torch.equal(shard_sequence(q, dim=2), q) and torch.equal(unshard_sequence(q, dim=2), q)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        ring_attention(q[:, :3], k, v)
