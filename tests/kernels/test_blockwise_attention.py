"""blockwise_attention and the single-block pieces against fp64 SDPA with an explicit boolean mask.

Both backends run here: "cpu" (PyTorch's fused CPU kernel) and "triton" (compiled on a GPU, under
TRITON_INTERPRET=1 on CPU tensors otherwise; see conftest.py). Tolerances: error against fp64 at most
2x the error of plain SDPA in the same dtype, plus a small floor.
"""

from __future__ import annotations

import pytest
import torch
from reference import assert_within_baseline, max_err, reference_attention
from ringlwm.kernels import (
    block_attention_backward,
    block_attention_forward,
    blockwise_attention,
    merge_attention,
    merge_attention_,
)

GPU = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if GPU else "cpu"
BACKENDS = ["cpu", "triton"]
# Absolute floor: about half a unit of rounding at magnitude 1 for 16-bit types (fp16 eps 9.8e-4, bf16 7.8e-3),
# so that a baseline that happens to be nearly exact does not turn 2x into a bit-exactness test.
FLOOR = {torch.float32: 2e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}
LSE_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _device(backend):
    return "cpu" if backend == "cpu" else TRITON_DEVICE


def _inputs(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seqlen_q, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, seqlen_k, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim, generator=gen).to(dtype)
    dout = torch.randn(batch, heads, seqlen_q, head_dim, generator=gen).to(dtype)
    return q, k, v, dout


def _grads_of(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    out.backward(dout.to(out.dtype))
    return out.detach(), lse, q.grad, k.grad, v.grad


def _check_lse(lse, ref_lse, dtype):
    lse = lse.detach().double().cpu()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "lse = -inf must mark exactly the empty rows"
    finite = torch.isfinite(ref_lse)
    assert torch.isfinite(lse[finite]).all()
    if finite.any():
        assert max_err(lse[finite], ref_lse[finite]) <= LSE_TOL[dtype]


def check_against_reference(backend, q, k, v, dout, *, causal=False, segment_ids=None, kv_segment_ids=None,
                            q_offset=0, kv_offset=0):
    """Run the kernel (forward + backward) and compare out, lse, dq, dk, dv with fp64 SDPA."""
    dtype = q.dtype
    mask_kw = dict(causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                   q_offset=q_offset, kv_offset=kv_offset)
    ref = _grads_of(lambda a, b, c: reference_attention(a, b, c, **mask_kw), q.double(), k.double(), v.double(),
                    dout.double())
    base = _grads_of(lambda a, b, c: reference_attention(a, b, c, **mask_kw), q, k, v, dout)

    dev = _device(backend)
    seg = {}
    if segment_ids is not None:
        seg = dict(segment_ids=segment_ids.to(dev), kv_segment_ids=kv_segment_ids.to(dev))
    got = _grads_of(
        lambda a, b, c: blockwise_attention(a, b, c, causal=causal, q_offset=q_offset, kv_offset=kv_offset,
                                            return_lse=True, backend=backend, **seg),
        q.to(dev), k.to(dev), v.to(dev), dout.to(dev),
    )
    assert got[0].dtype == dtype and got[0].shape == q.shape
    assert got[1].dtype == torch.float32 and got[1].shape == q.shape[:3]
    for name, i in (("out", 0), ("dq", 2), ("dk", 3), ("dv", 4)):
        assert torch.isfinite(got[i]).all(), f"{name} has NaN/inf"
        assert got[i].dtype == dtype
        assert_within_baseline(name, got[i], ref[i], base[i], FLOOR[dtype])
    _check_lse(got[1], ref[1], dtype)
    return got, ref


SHAPES = [  # (batch, heads, kv_heads, seq, head_dim)
    pytest.param((2, 4, 4, 77, 64), id="mha-77-d64"),
    pytest.param((1, 4, 2, 130, 32), id="gqa-130-d32"),
    pytest.param((1, 4, 1, 64, 128), id="mqa-64-d128"),
    pytest.param((1, 2, 2, 33, 96), id="mha-33-d96"),
    pytest.param((1, 2, 1, 40, 256), id="mqa-40-d256"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_fp64_sdpa(backend, causal, shape):
    batch, heads, kv_heads, seqlen, head_dim = shape
    q, k, v, dout = _inputs(batch, heads, kv_heads, seqlen, seqlen, head_dim, torch.float32)
    check_against_reference(backend, q, k, v, dout, causal=causal)


def _low_precision_params():
    params = []
    for backend in BACKENDS:
        for dtype in (torch.float16, torch.bfloat16):
            marks = []
            if backend == "triton" and dtype == torch.bfloat16 and not GPU:
                marks = [pytest.mark.skip(reason="the Triton interpreter computes bf16 tl.dot wrongly; GPU only")]
            params.append(pytest.param(backend, dtype, marks=marks, id=f"{backend}-{str(dtype)[6:]}"))
    return params


@pytest.mark.parametrize("backend,dtype", _low_precision_params())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_low_precision_within_2x_of_sdpa(backend, dtype, causal):
    q, k, v, dout = _inputs(1, 4, 2, 97, 97, 64, dtype, seed=1)
    check_against_reference(backend, q, k, v, dout, causal=causal)


def _packed_segments(batch, seqlen, num_docs, seed):
    """Sorted segment ids, as the packer makes them: documents of random lengths side by side."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, seqlen, dtype=torch.long)
    for b in range(batch):
        cuts = torch.randperm(seqlen - 1, generator=gen)[: num_docs - 1] + 1
        ids[b, cuts] = 1
    return ids.cumsum(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_segments(backend, causal):
    q, k, v, dout = _inputs(2, 4, 2, 100, 100, 64, torch.float32, seed=2)
    seg = _packed_segments(2, 100, 5, seed=3)
    got, _ = check_against_reference(backend, q, k, v, dout, causal=causal, segment_ids=seg,
                                      kv_segment_ids=seg)
    # Attention never crosses documents: changing the keys of document 0 leaves document 1's output alone.
    dev = _device(backend)
    k2 = k.clone()
    k2[:, :, seg[0] == 0] += 1.0
    out2 = blockwise_attention(q.to(dev), k2.to(dev), v.to(dev), causal=causal, segment_ids=seg.to(dev),
                               backend=backend)
    other = seg[0] != 0
    assert torch.equal(out2[0][:, other].cpu(), got[0][0][:, other].cpu())
    assert not torch.equal(out2[0][:, ~other].cpu(), got[0][0][:, ~other].cpu())


def test_cpu_mask_cache_follows_the_ids():
    """The CPU kernel keeps the last few document masks (every layer asks for the same one). Ids changed in
    place, or new ids in memory that held old ones, must give their own mask: the fp64 reference holds."""
    q, k, v, dout = _inputs(1, 2, 2, 48, 48, 16, torch.float32, seed=7)
    seg = torch.zeros(1, 48, dtype=torch.long)
    seg[:, 20:] = 1
    for _ in range(2):  # the second call is served from the cache
        check_against_reference("cpu", q, k, v, dout, causal=True, segment_ids=seg, kv_segment_ids=seg)
    seg[:, 30:] = 2  # in place: the version counter changes
    check_against_reference("cpu", q, k, v, dout, causal=True, segment_ids=seg, kv_segment_ids=seg)
    for cut in (5, 40, 12):  # fresh ids of one size (the cache holds the ids, so no new ids take their memory)
        fresh = torch.tensor([[0] * cut + [1] * (48 - cut)])
        check_against_reference("cpu", q, k, v, dout, causal=True, segment_ids=fresh, kv_segment_ids=fresh)
        del fresh


def _runs_of(lengths_per_row, ids_per_row):
    """Segment ids made of contiguous runs: row r has documents ids_per_row[r] of lengths lengths_per_row[r]."""
    return torch.tensor([[doc for doc, n in zip(ids, lengths) for _ in range(n)]
                         for ids, lengths in zip(ids_per_row, lengths_per_row)])


DOCUMENT_CASES = [  # (q ids, kv ids, q_offset, kv_offset, causal); one row per batch entry
    pytest.param(_runs_of([[30, 50, 16, 8], [4, 70, 26, 4]], [[0, 1, 2, -1], [0, 1, 2, -1]]),
                 None, 0, 0, True, id="diagonal-packed-with-padding"),
    pytest.param(_runs_of([[30, 50, 20], [1, 98, 1]], [[0, 1, 2], [5, 6, 7]]), None, 0, 0, False,
                 id="not-causal"),
    # a later ring step: the document that spans both blocks sees all its earlier keys, the others none
    pytest.param(_runs_of([[20, 44], [64]], [[3, 4], [4]]), _runs_of([[40, 24], [10, 54]], [[2, 3], [3, 4]]),
                 64, 0, True, id="below-diagonal"),
    # overlapping positions: pieces need a causal mask of their own, some of whose rows see nothing
    pytest.param(_runs_of([[30, 40], [70]], [[1, 2], [2]]), _runs_of([[15, 30], [45]], [[1, 2], [2]]),
                 50, 60, True, id="partial-overlap-with-keyless-rows"),
    # documents present on one side only: their rows see nothing
    pytest.param(_runs_of([[10, 30, 8]], [[9, 1, 2]]), _runs_of([[12, 24, 12]], [[1, 7, 2]]), 0, 0, True,
                 id="documents-missing-on-one-side"),
]


@pytest.mark.parametrize("q_ids,kv_ids,q_offset,kv_offset,causal", DOCUMENT_CASES)
def test_cpu_packed_documents_one_call_each_match_fp64(q_ids, kv_ids, q_offset, kv_offset, causal):
    """Documents that are contiguous runs (what the packer makes) go one kernel call per document present on
    both sides, without the seq_q x seq_k float mask. Out, lse and the gradients against fp64 SDPA with the
    full mask, for diagonal, later and overlapping ring steps, keyless rows and padding ids; GQA 4/2."""
    import ringlwm.kernels.cpu_flash as cpu_flash

    kv_ids = q_ids if kv_ids is None else kv_ids
    q, k, v, dout = _inputs(q_ids.shape[0], 4, 2, q_ids.shape[1], kv_ids.shape[1], 16, torch.float32, seed=21)
    plan = cpu_flash._build_plan(q, k, causal, q_ids, kv_ids, q_offset, kv_offset)
    assert plan.mode == "documents" and plan.float_mask is None
    assert len(plan.pieces) <= sum(len(set(row.tolist())) for row in q_ids)
    got, ref = check_against_reference("cpu", q, k, v, dout, causal=causal, segment_ids=q_ids,
                                       kv_segment_ids=kv_ids, q_offset=q_offset, kv_offset=kv_offset)
    empty = torch.isneginf(ref[1])
    assert (got[0][empty] == 0).all() and (got[2][empty] == 0).all()


def test_cpu_ids_that_are_not_one_run_each_keep_the_float_mask():
    """An id in two separate runs (not what the packer makes) cannot be split into documents: the float mask,
    still exact."""
    import ringlwm.kernels.cpu_flash as cpu_flash

    ids = _runs_of([[20, 30, 14]], [[0, 1, 0]])
    q, k, v, dout = _inputs(1, 2, 2, 64, 64, 16, torch.float32, seed=22)
    assert cpu_flash._build_plan(q, k, True, ids, ids, 0, 0).mode == "causal_mask"
    check_against_reference("cpu", q, k, v, dout, causal=True, segment_ids=ids, kv_segment_ids=ids)


RING_CASES = [  # (seq_q, seq_k, q_offset, kv_offset, causal)
    pytest.param(64, 64, 64, 64, True, id="diagonal"),
    pytest.param(64, 64, 128, 0, True, id="below-diagonal-full"),
    pytest.param(64, 64, 0, 64, True, id="above-diagonal-empty"),
    pytest.param(70, 45, 50, 20, True, id="partial-overlap"),
    pytest.param(37, 53, 0, 0, False, id="rectangular-full"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seqlen_q,seqlen_k,q_offset,kv_offset,causal", RING_CASES)
def test_ring_form_offsets_and_two_segment_ids(backend, seqlen_q, seqlen_k, q_offset, kv_offset, causal):
    """One ring step: separate query/key segment ids and position offsets. Key segment 7 has no query,
    query segment 9 has no key: those rows see nothing and must come back as zeros with lse = -inf."""
    q, k, v, dout = _inputs(2, 4, 2, seqlen_q, seqlen_k, 32, torch.float32, seed=4)
    q_seg = torch.randint(0, 3, (2, seqlen_q), generator=torch.Generator().manual_seed(5))
    kv_seg = torch.randint(0, 3, (2, seqlen_k), generator=torch.Generator().manual_seed(6))
    q_seg[:, :5] = 9
    kv_seg[:, -5:] = 7
    got, ref = check_against_reference(backend, q, k, v, dout, causal=causal, segment_ids=q_seg,
                                       kv_segment_ids=kv_seg, q_offset=q_offset, kv_offset=kv_offset)
    empty = torch.isneginf(ref[1])
    assert empty[:, :, :5].all()
    assert (got[0].cpu()[empty] == 0).all() and (got[2].cpu()[empty] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocks_merged_by_lse_equal_full_attention(backend):
    """What the ring does: split keys into blocks, compute each block with offsets, merge (out, lse) in
    fp32, then run each block's backward with the merged (out, lse) and sum. Must equal one full call."""
    dev = _device(backend)
    seqlen, block = 96, 32
    q, k, v, dout = _inputs(2, 4, 2, seqlen, seqlen, 64, torch.float32, seed=7)
    seg = _packed_segments(2, seqlen, 3, seed=8)
    q, k, v, dout, seg = (t.to(dev) for t in (q, k, v, dout, seg))
    kw = dict(causal=True, backend=backend)

    out = torch.zeros(q.shape, dtype=torch.float32, device=dev)
    lse = torch.full(q.shape[:3], float("-inf"), device=dev)
    blocks = []
    for start in range(0, seqlen, block):
        sl = slice(start, start + block)
        blk = dict(kv_offset=start, segment_ids=seg, kv_segment_ids=seg[:, sl], **kw)
        o_b, lse_b = block_attention_forward(q, k[:, :, sl], v[:, :, sl], **blk)
        new_lse = torch.logaddexp(lse, lse_b)
        safe = torch.where(torch.isneginf(new_lse), 0.0, new_lse)
        out = out * torch.exp(lse - safe)[..., None] + o_b.float() * torch.exp(lse_b - safe)[..., None]
        lse = new_lse
        blocks.append((sl, blk))

    dq = torch.zeros(q.shape, dtype=torch.float32, device=dev)
    dks, dvs = [], []
    for sl, blk in blocks:
        dq_b, dk_b, dv_b = block_attention_backward(dout, q, k[:, :, sl], v[:, :, sl], out, lse, **blk)
        assert dq_b.dtype == dk_b.dtype == dv_b.dtype == torch.float32
        dq += dq_b
        dks.append(dk_b)
        dvs.append(dv_b)

    full = _grads_of(lambda a, b, c: blockwise_attention(a, b, c, segment_ids=seg, return_lse=True, **kw),
                     q, k, v, dout)
    assert max_err(out, full[0]) < 2e-6
    assert max_err(lse, full[1]) < 2e-6
    assert max_err(dq, full[2]) < 5e-6
    assert max_err(torch.cat(dks, 2), full[3]) < 5e-6
    assert max_err(torch.cat(dvs, 2), full[4]) < 5e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("segments", [False, True], ids=["no-segments", "sentinel-like-ids"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tails_with_very_negative_scores_and_sentinel_like_ids(backend, causal, segments):
    """Lengths with partial tiles (the interpreter's tiles are 32), every score of a row below -88 (lse < -88:
    exp(-lse) overflows fp32), and segment ids that equal the kernels' out-of-bounds values or the padding
    segment (-1): tails must change nothing. Before, a key tail gave dq = NaN here (p = exp2(0 - lse) = inf)."""
    gen = torch.Generator().manual_seed(16)
    head_dim, seq_q, seq_k = 64, 45, 71
    u = torch.randn(head_dim, generator=gen)
    u = u / u.norm() * head_dim**0.5
    q = (4 * u + 0.1 * torch.randn(1, 2, seq_q, head_dim, generator=gen)).float()
    k = (-4 * u + 0.1 * torch.randn(1, 1, seq_k, head_dim, generator=gen)).float()
    v = torch.randn(1, 1, seq_k, head_dim, generator=gen)
    dout = torch.randn(1, 2, seq_q, head_dim, generator=gen)
    seg = {}
    if segments:
        ids = torch.tensor([-1, -2, 0, -(2**31), -(2**31) + 1])
        seg = dict(segment_ids=ids[torch.randint(0, 5, (1, seq_q), generator=gen)],
                   kv_segment_ids=ids[torch.randint(0, 5, (1, seq_k), generator=gen)])
    mask_kw = dict(causal=causal, q_offset=seq_k - seq_q)
    ref_kw = dict(segment_ids=seg.get("segment_ids"), kv_segment_ids=seg.get("kv_segment_ids"), **mask_kw)
    ref = _grads_of(lambda a, b, c: reference_attention(a, b, c, **ref_kw), q.double(), k.double(), v.double(),
                    dout.double())
    base = _grads_of(lambda a, b, c: reference_attention(a, b, c, **ref_kw), q, k, v, dout)
    dev = _device(backend)
    got = _grads_of(
        lambda a, b, c: blockwise_attention(a, b, c, return_lse=True, backend=backend, **mask_kw,
                                            **{name: ids.to(dev) for name, ids in seg.items()}),
        q.to(dev), k.to(dev), v.to(dev), dout.to(dev),
    )
    live = torch.isfinite(ref[1])
    assert live.any() and (ref[1][live] < -88).all()
    assert torch.equal(torch.isneginf(got[1].cpu()), ~live)
    for name, i in (("out", 0), ("dq", 2), ("dk", 3), ("dv", 4)):
        assert torch.isfinite(got[i]).all(), f"{name} has NaN/inf"
        assert_within_baseline(name, got[i], ref[i], base[i], FLOOR[torch.float32])
    # |lse| > 88 here, so its fp32 rounding alone can exceed LSE_TOL: a relative tolerance on top.
    torch.testing.assert_close(got[1].cpu()[live].double(), ref[1][live], rtol=1e-6, atol=LSE_TOL[torch.float32])


def test_cpu_backward_of_an_invisible_block_returns_tensors():
    """A block no query can see (causal, keys after every query): the backward's early exit gives a tuple of
    zero float32 gradients like any other call (it used to return a generator)."""
    from ringlwm.kernels.cpu_flash import cpu_attention_backward

    q, k, v, dout = _inputs(1, 4, 2, 16, 16, 32, torch.float16, seed=17)
    out, lse = block_attention_forward(q, k, v, causal=True, kv_offset=16, backend="cpu")
    assert torch.isneginf(lse).all()
    grads = block_attention_backward(dout, q, k, v, out, lse, causal=True, kv_offset=16, backend="cpu")
    direct = cpu_attention_backward(dout, q, k, v, out, lse, causal=True, scale=0.1, kv_offset=16)
    for result in (grads, direct):
        assert isinstance(result, tuple) and len(result) == 3
        for g, t in zip(result, (q, k, v)):
            assert g.shape == t.shape and g.dtype == torch.float32 and not g.any()


def test_merge_attention_of_disjoint_key_sets_equals_full():
    """merge_attention against fp64 attention over the union, including rows empty on one or both sides."""
    q, k, v, _ = _inputs(2, 4, 2, 30, 50, 32, torch.float64, seed=13)
    q_seg = torch.randint(0, 3, (2, 30), generator=torch.Generator().manual_seed(14))
    kv_seg = torch.randint(0, 3, (2, 50), generator=torch.Generator().manual_seed(15))
    q_seg[:, :4] = 8  # no key anywhere: empty on both sides
    kv_seg[:, :25] = torch.where(kv_seg[:, :25] == 2, 0, kv_seg[:, :25])  # segment 2 only in the second half
    seg_kw = dict(segment_ids=q_seg)
    first, second = slice(0, 25), slice(25, 50)
    parts = [reference_attention(q, k[:, :, sl], v[:, :, sl], kv_segment_ids=kv_seg[:, sl], **seg_kw)
             for sl in (first, second)]
    out, lse = merge_attention(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    ref_out, ref_lse = reference_attention(q, k, v, kv_segment_ids=kv_seg, **seg_kw)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64  # fp32 at least; fp64 stays fp64
    assert torch.isfinite(out).all()
    assert max_err(out, ref_out) < 1e-12
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert max_err(lse[finite], ref_lse[finite]) < 1e-12
    merged32, _ = merge_attention(parts[0][0].float(), parts[0][1].float(), parts[1][0].float(), parts[1][1].float())
    assert merged32.dtype == torch.float32 and max_err(merged32, ref_out) < 1e-6
    assert torch.isneginf(parts[0][1][:, :, 4:]).any()  # the case "empty on one side only" was exercised


def test_merge_in_place_equals_the_functional_merge_bitwise(monkeypatch):
    """merge_attention_ (the ring's accumulator update, a slice of rows at a time) gives the bits of the
    two-product formula, on a strided slice of a larger accumulator, with bf16 block outputs and rows empty
    on either side."""
    import ringlwm.kernels.blockwise as blockwise

    monkeypatch.setattr(blockwise, "MERGE_CHUNK_ELEMENTS", 3 * 16)  # 3 rows per chunk, a ragged last one
    g = torch.Generator().manual_seed(3)
    whole = torch.randn(2, 3, 40, 16, generator=g)
    whole_lse = torch.randn(2, 3, 40, generator=g)
    whole_lse[:, :, :5] = float("-inf")
    block = torch.randn(2, 3, 20, 16, generator=g).bfloat16()
    block_lse = torch.randn(2, 3, 20, generator=g)
    block_lse[:, :, 3:8] = float("-inf")
    rows = slice(20, 40)
    # strided views, as the ring passes (vectorised and strided transcendental kernels may differ in the last bit)
    out, lse = whole.clone()[:, :, rows], whole_lse.clone()[:, :, rows]
    new_lse = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isneginf(new_lse), 0.0, new_lse)
    expected = out * torch.exp(lse - safe)[..., None] + block.float() * torch.exp(block_lse - safe)[..., None]
    rest = whole[:, :, :20].clone()
    merge_attention_(whole[:, :, rows], whole_lse[:, :, rows], block, block_lse)
    assert torch.equal(whole[:, :, rows], expected) and torch.equal(whole_lse[:, :, rows], new_lse)
    assert torch.equal(whole[:, :, :20], rest)
    functional, _ = merge_attention(out, lse, block, block_lse)  # on contiguous copies: last-bit differences
    assert max_err(functional, expected) < 1e-6
    with pytest.raises(TypeError, match="float32/float64"):
        merge_attention_(out.bfloat16(), lse, block, block_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """q, k, v as views of (batch, seq, heads, head_dim) projections, and a strided slice of the sequence."""
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(2, 90, 4, 64, generator=gen).transpose(1, 2)
    kv = torch.randn(2, 90, 2, 2, 64, generator=gen)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous())
    dout = torch.randn(2, 4, 90, 64, generator=gen)
    check_against_reference(backend, q, k, v, dout, causal=True)
    check_against_reference(backend, q[:, :, ::2], k[:, :, ::2], v[:, :, ::2], dout[:, :, ::2], causal=False)


def test_backends_agree():
    """The two paths are independent implementations; on the same inputs they agree to fp32 precision."""
    q, k, v, _ = _inputs(1, 4, 2, 75, 75, 64, torch.float32, seed=10)
    seg = _packed_segments(1, 75, 3, seed=11)
    a = blockwise_attention(q, k, v, causal=True, segment_ids=seg, backend="cpu")
    dev = TRITON_DEVICE
    b = blockwise_attention(q.to(dev), k.to(dev), v.to(dev), causal=True, segment_ids=seg.to(dev), backend="triton")
    assert max_err(a, b) < 2e-6


def test_cpu_path_gradcheck_fp64():
    """torch.autograd.gradcheck: the fused CPU backward against finite differences, in fp64."""
    q, k, v, _ = _inputs(1, 2, 1, 9, 7, 8, torch.float64, seed=12)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2]])
    kv_seg = torch.tensor([[0, 0, 1, 1, 1, 2, 3]])
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def fn(a, b, c):
        return blockwise_attention(a, b, c, causal=True, segment_ids=seg, kv_segment_ids=kv_seg, q_offset=2,
                                   backend="cpu")

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


def test_default_backend_on_cpu_is_the_fused_kernel(monkeypatch):
    import ringlwm.kernels.cpu_flash as cpu_flash

    calls = []
    real = cpu_flash._fwd_op
    monkeypatch.setattr(cpu_flash, "_fwd_op", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, _ = _inputs(1, 2, 2, 16, 16, 32, torch.float32)
    blockwise_attention(q, k, v, causal=True)
    assert calls == [1]


def test_scale_argument():
    q, k, v, _ = _inputs(1, 2, 2, 20, 20, 32, torch.float64)
    out = blockwise_attention(q, k, v, scale=0.3)
    ref, _ = reference_attention(q, k, v, scale=0.3)
    assert max_err(out, ref) < 1e-12
    assert max_err(out, blockwise_attention(q, k, v)) > 1e-3


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def _qkv(shape_q=(1, 4, 16, 32), shape_kv=(1, 2, 16, 32), dtype=torch.float32):
    return torch.randn(shape_q).to(dtype), torch.randn(shape_kv).to(dtype), torch.randn(shape_kv).to(dtype)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: (*_qkv((4, 16, 32)), {}), ValueError, "must be 4-D"),
        (lambda: (*_qkv((1, 3, 16, 32), (1, 2, 16, 32)), {}), ValueError, "multiple of kv_heads"),
        (lambda: (*_qkv((1, 4, 16, 64)), {}), ValueError, "batch or head_dim"),
        (lambda: (*_qkv((2, 4, 16, 32)), {}), ValueError, "batch or head_dim"),
        (lambda: (_qkv()[0], _qkv()[1], torch.randn(1, 2, 15, 32), {}), ValueError, "same shape"),
        (lambda: (_qkv()[0].half(), *_qkv()[1:], {}), TypeError, "one dtype"),
        (lambda: (*_qkv(dtype=torch.int32), {}), TypeError, "floating dtype"),
        (lambda: (*_qkv(), {"segment_ids": torch.zeros(1, 15, dtype=torch.long)}), ValueError, r"\(batch, seq\)"),
        (lambda: (*_qkv(), {"segment_ids": torch.zeros(1, 16)}), TypeError, "integer"),
        (lambda: (*_qkv(), {"backend": "nope"}), ValueError, "unknown attention backend"),
        (lambda: (*_qkv(), {"q_offset": 1.5}), TypeError, "q_offset"),
        (lambda: (*_qkv((1, 4, 16, 32), (1, 2, 20, 32)), {"segment_ids": torch.zeros(1, 16, dtype=torch.long)}),
         ValueError, "kv_segment_ids"),
        (lambda: (*_qkv((1, 4, 0, 32), (1, 2, 0, 32)), {}), ValueError, "empty"),
    ],
)
def test_bad_input_raises_clear_error(make, error, match):
    q, k, v, kwargs = make()
    with pytest.raises(error, match=match):
        blockwise_attention(q, k, v, **kwargs)


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        blockwise_attention(*_qkv(), backend="triton")


def test_triton_backend_rejects_unsupported_head_dim_and_fp64():
    with pytest.raises(ValueError, match="head_dim"):
        blockwise_attention(*_qkv((1, 2, 8, 8), (1, 2, 8, 8)), backend="triton")
    with pytest.raises(TypeError, match="triton"):
        blockwise_attention(*_qkv(dtype=torch.float64), backend="triton")


def test_block_backward_checks_shapes():
    q, k, v = _qkv()
    out, lse = block_attention_forward(q, k, v)
    with pytest.raises(ValueError, match="lse"):
        block_attention_backward(q, q, k, v, out, lse[:, :, :-1])
    with pytest.raises(ValueError, match="dout"):
        block_attention_backward(q[:, :, :-1], q, k, v, out, lse)


@pytest.mark.parametrize("backend", [None, "cpu", "triton"])
@pytest.mark.parametrize("dtype,lse_dtype", [(torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_meta_tensors_give_shapes_and_dtypes(backend, dtype, lse_dtype):
    """Meta tensors hold no data: no kernel runs, outputs and gradients are meta tensors shaped as a real call's
    (before: the default backend raised Triton's "0 active drivers")."""
    q = torch.empty(2, 4, 10, 32, dtype=dtype, device="meta", requires_grad=True)
    k, v = (torch.empty(2, 2, 10, 32, dtype=dtype, device="meta", requires_grad=True) for _ in range(2))
    seg = torch.empty(2, 10, dtype=torch.long, device="meta")
    out, lse = blockwise_attention(q, k, v, causal=True, segment_ids=seg, return_lse=True, backend=backend)
    assert (out.device.type, out.shape, out.dtype) == ("meta", q.shape, dtype)
    assert (lse.device.type, lse.shape, lse.dtype) == ("meta", (2, 4, 10), lse_dtype)
    out.sum().backward()
    for t in (q, k, v):
        assert (t.grad.device.type, t.grad.shape, t.grad.dtype) == ("meta", t.shape, dtype)
    blk_out, blk_lse = block_attention_forward(q, k, v, backend=backend)
    dq, dk, dv = block_attention_backward(blk_out, q, k, v, blk_out, blk_lse, backend=backend)
    assert blk_lse.shape == (2, 4, 10) and dq.shape == q.shape and dk.shape == dv.shape == k.shape
    assert dq.dtype == dk.dtype == torch.promote_types(dtype, torch.float32)
    # The checks still run: a wrong shape or an unknown backend is reported as on a real device.
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        blockwise_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="unknown attention backend"):
        blockwise_attention(q, k, v, backend="nope")
