"""The library FlashAttention backends (torch_flash, cudnn, flash_attn) without a GPU.

- Their adapters (layouts, varlen documents, masks, GQA, rows without keys, fp32 gradients) run on CPU against an
  fp64 emulation of the libraries' contract (``FlashOps``: bottom-right causal flag, varlen, lse layouts, +inf for
  rows without keys), compared with an independent dense reference, per block and through a 2- and 3-rank ring.
- Under FakeTensorMode the real ATen ops (torch's FlashAttention-2 and cuDNN attention) take the adapters' calls
  on fake cuda tensors and give what the block contract promises.
- Selection: "auto" from a measured table with fake GPU names and capabilities, the fallbacks and their one-time
  notices, refusals that name the way out.
- Importing ringlwm needs neither a GPU nor flash-attn.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from dist_utils import run_distributed
from reference import max_err, reference_attention
from ringlwm.kernels import Backend, block_attention_backward, block_attention_forward, library_flash, register_backend
from ringlwm.kernels.blockwise import select_backend
from ringlwm.kernels.library_flash import CudnnOps, Documents, FlashOps
from torch._subclasses.fake_tensor import FakeTensorMode

# ------------------------------------------------------------------------------------------------
# fp64 emulation of the libraries' contract (written from their documentation, not from ringlwm's kernels)
# ------------------------------------------------------------------------------------------------


def _sequences(q, k, docs):
    """(query rows, key rows) index ranges of each sequence: batch rows, or varlen documents."""
    if docs is None:
        b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        return [((i, slice(None)), (i, slice(None))) for i in range(b)], sq, sk
    cu_q, cu_k = docs.cu_q.tolist(), docs.cu_k.tolist()
    return [((slice(cu_q[i], cu_q[i + 1]),), (slice(cu_k[i], cu_k[i + 1]),)) for i in range(len(cu_q) - 1)], None, None


def _probabilities(qs, ks, causal, scale, lse=None):
    """qs (Lq, H, d), ks (Lk, Hk, d) in fp64 -> scores masked, and p with the given or own lse (H, Lq)."""
    group = qs.shape[1] // ks.shape[1]
    kk = ks.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", qs, kk) * scale
    lq, lk = qs.shape[0], ks.shape[0]
    if causal:  # bottom-right aligned, as FlashAttention-2 and later
        i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
        scores = scores.masked_fill(j > i + (lk - lq), float("-inf"))
    own = torch.logsumexp(scores, dim=-1) if lk else torch.full((qs.shape[1], lq), float("-inf"), dtype=qs.dtype)
    own = own.where(torch.isfinite(own), float("inf"))  # rows without keys: +inf, as the libraries
    use = own if lse is None else lse
    p = torch.exp(scores - use[..., None]) if lk else scores.new_zeros(qs.shape[1], lq, 0)
    return p, own, kk


def _emulated_forward(q, k, v, docs, causal, scale):
    seqs, _, _ = _sequences(q, k, docs)
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.zeros((q.shape[0], q.shape[2], q.shape[1]) if docs is None else (q.shape[1], q.shape[0]),
                      dtype=torch.float64)
    for qi, ki in seqs:
        qs, ks, vs = q[qi].double(), k[ki].double(), v[ki].double()
        p, own, _ = _probabilities(qs, ks, causal, scale)
        group = qs.shape[1] // ks.shape[1]
        out[qi] = torch.einsum("hqk,khd->qhd", p, vs.repeat_interleave(group, dim=1))
        if docs is None:
            lse[qi[0]] = own
        else:
            lse[:, qi[0]] = own
    return out.to(q.dtype), lse.float() if q.dtype != torch.float64 else lse


def _emulated_backward(dout, q, k, v, out, lse, docs, causal, scale):
    seqs, _, _ = _sequences(q, k, docs)
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v))
    for qi, ki in seqs:
        qs, ks, vs = q[qi].double(), k[ki].double(), v[ki].double()
        do, o = dout[qi].double(), out[qi].double()
        row_lse = (lse[qi[0]] if docs is None else lse[:, qi[0]]).double()
        p, _, kk = _probabilities(qs, ks, causal, scale, row_lse)
        group = qs.shape[1] // ks.shape[1]
        vv = vs.repeat_interleave(group, dim=1)
        dvv = torch.einsum("hqk,qhd->khd", p, do)
        dp = torch.einsum("qhd,khd->hqk", do, vv)
        delta = (do * o).sum(-1).transpose(0, 1)  # (H, Lq)
        ds = p * (dp - delta[..., None])
        dq[qi] = torch.einsum("hqk,khd->qhd", ds, kk) * scale
        dkk = torch.einsum("hqk,qhd->khd", ds, qs) * scale
        lk, hk, d = ks.shape
        dk[ki] = dkk.view(lk, hk, group, d).sum(2)
        dv[ki] = dvv.view(lk, hk, group, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


EMULATED = FlashOps(_emulated_forward, _emulated_backward)


def _emulated_cudnn_forward(q, k, v, causal, scale):
    out, lse = _emulated_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, causal, scale)
    return out.transpose(1, 2), lse


def _emulated_cudnn_backward(dout, q, k, v, out, lse, causal, scale):
    assert k.shape[1] == q.shape[1], "cuDNN gets K/V with Q's heads"
    t = [x.transpose(1, 2) for x in (dout, q, k, v, out)]
    return tuple(g.transpose(1, 2) for g in _emulated_backward(*t[:5], lse, None, causal, scale))


EMULATED_CUDNN = CudnnOps(_emulated_cudnn_forward, _emulated_cudnn_backward)

ADAPTERS = {
    "torch_flash-like": (functools.partial(library_flash.flash_forward, EMULATED),
                         functools.partial(library_flash.flash_backward, EMULATED)),
    "cudnn-like": (functools.partial(library_flash.cudnn_forward, ops=EMULATED_CUDNN),
                   functools.partial(library_flash.cudnn_backward, ops=EMULATED_CUDNN)),
}


def _inputs(batch, heads, kv_heads, seq_q, seq_k, head_dim, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_q, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, kv_heads, seq_k, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, kv_heads, seq_k, head_dim, generator=gen, dtype=dtype)
    dout = torch.randn(batch, heads, seq_q, head_dim, generator=gen, dtype=dtype)
    return q, k, v, dout


def _reference(q, k, v, dout, lse_for_backward=None, out_for_backward=None, **mask):
    """Dense fp64 (out, lse) and the block gradients from a given merged (out, lse) (a ring's), by definition."""
    from reference import attention_mask

    out, lse = reference_attention(q, k, v, scale=0.25, **mask)
    b, h, sq, _ = q.shape
    allowed = attention_mask(b, sq, k.shape[2], **mask)
    group = h // k.shape[1]
    kk, vv = (t.repeat_interleave(group, 1) for t in (k, v))
    scores = (q @ kk.transpose(-1, -2) * 0.25).masked_fill(~allowed, float("-inf"))
    use_lse = lse if lse_for_backward is None else lse_for_backward
    use_out = out if out_for_backward is None else out_for_backward
    p = torch.exp(scores - use_lse.where(torch.isfinite(use_lse), float("inf"))[..., None])
    dv = (p.transpose(-1, -2) @ dout).view(b, k.shape[1], group, k.shape[2], -1).sum(2)
    ds = p * (dout @ vv.transpose(-1, -2) - (dout * use_out).sum(-1, keepdim=True))
    dq = ds @ kk * 0.25
    dk = (ds.transpose(-1, -2) @ q * 0.25).view(b, k.shape[1], group, k.shape[2], -1).sum(2)
    return out, lse, (dq, dk, dv)


def _packed(batch, seqlen, cuts, pad=0):
    ids = torch.zeros(batch, seqlen, dtype=torch.long)
    for b in range(batch):
        for cut in cuts[b]:
            ids[b, cut:] += 1
        if pad:
            ids[b, seqlen - pad:] = -1  # the packer's padding segment
    return ids


# (name, batch, heads, kv_heads, seq_q, seq_k, causal, q_offset, kv_offset, segments)
CASES = [
    ("full", 2, 4, 4, 12, 12, False, 0, 0, None),
    ("diagonal", 2, 4, 2, 12, 12, True, 0, 0, None),
    ("full by offset", 1, 4, 1, 8, 12, True, 20, 4, None),
    ("empty by offset", 1, 2, 2, 8, 8, True, 0, 8, None),
    ("packed, diagonal", 2, 4, 2, 16, 16, True, 0, 0, "same"),
    ("packed, one row (token views, no copies)", 1, 4, 2, 16, 16, True, 0, 0, "same"),
    ("packed, one row, keys from elsewhere", 1, 4, 2, 10, 14, False, 0, 0, "other"),
    ("packed, keys from elsewhere", 2, 4, 2, 10, 14, False, 0, 0, "other"),
]


def _segments(kind, batch, seq_q, seq_k):
    if kind is None:
        return {}
    if kind == "same":
        ids = _packed(batch, seq_q, [[3, 9], [5]], pad=2)
        return {"segment_ids": ids, "kv_segment_ids": ids}
    # queries: documents 2, 3 (and padding); keys: 0, 1, 2: document 3 has no key here, 0 and 1 no query
    q_ids = _packed(batch, seq_q, [[4], [6]], pad=1) + 2
    q_ids[q_ids == 1] = -1
    k_ids = _packed(batch, seq_k, [[3, 8], [2, 5]])
    return {"segment_ids": q_ids, "kv_segment_ids": k_ids}


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_adapters_match_the_dense_reference(adapter, case):
    name, batch, heads, kv_heads, seq_q, seq_k, causal, q_offset, kv_offset, kind = case
    if adapter == "cudnn-like" and kind is not None:
        pytest.skip("cudnn takes one document per row (the fallback test covers the refusal)")
    forward, backward = ADAPTERS[adapter]
    q, k, v, dout = _inputs(batch, heads, kv_heads, seq_q, seq_k, 16, seed=len(name))
    mask = dict(causal=causal, q_offset=q_offset, kv_offset=kv_offset, **_segments(kind, batch, seq_q, seq_k))
    ref_out, ref_lse, ref_grads = _reference(q, k, v, dout, **mask)
    out, lse = forward(q, k, v, scale=0.25, **mask)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float64
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "lse = -inf marks exactly the rows without keys"
    finite = torch.isfinite(ref_lse)
    assert max_err(out, ref_out) < 1e-12
    assert not finite.any() or max_err(lse[finite], ref_lse[finite]) < 1e-12
    grads = backward(dout, q, k, v, ref_out, ref_lse, scale=0.25, **mask)
    for g, want, t in zip(grads, ref_grads, (q, k, v)):
        assert g.shape == t.shape and g.dtype == torch.float64
        assert max_err(g, want) < 1e-12


def test_block_gradients_from_the_rings_merged_statistics():
    """A ring hands every block the merged (out, lse) of all blocks: two key blocks' gradients from those add up to
    the gradients of attention over both (packed documents, GQA)."""
    q, k, v, dout = _inputs(2, 4, 2, 10, 20, 16, seed=7)
    seg = _packed(2, 20, [[6, 13], [9]])
    q_seg, halves = seg[:, 10:], (slice(0, 10), slice(10, 20))
    whole = dict(segment_ids=q_seg, kv_segment_ids=seg)
    out, lse, grads = _reference(q, k, v, dout, **whole)
    dq = torch.zeros_like(q)
    for part in halves:
        dq_b, dk_b, dv_b = library_flash.flash_backward(EMULATED, dout, q, k[:, :, part], v[:, :, part], out, lse,
                                                        scale=0.25, causal=False, segment_ids=q_seg,
                                                        kv_segment_ids=seg[:, part])
        dq += dq_b
        assert max_err(dk_b, grads[1][:, :, part]) < 1e-12 and max_err(dv_b, grads[2][:, :, part]) < 1e-12
    assert max_err(dq, grads[0]) < 1e-12


def test_documents_as_varlen_sequences():
    q_ids = torch.tensor([[2, 2, 3, 3, 3, -1], [0, 0, 0, 0, 1, 1]])
    k_ids = torch.tensor([[0, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1]])
    docs = library_flash.packed_documents(q_ids, k_ids)
    # row 0: documents 0 (keys only), 1 (keys only), 2, 3 (queries only), -1 (queries only); row 1: 0 (queries), 1
    assert docs.cu_q.tolist() == [0, 0, 0, 2, 5, 6, 10, 12]
    assert docs.cu_k.tolist() == [0, 1, 3, 6, 6, 6, 6, 12]
    assert (docs.max_q, docs.max_k) == (4, 6) and docs.cu_q.dtype == torch.int32
    assert docs.keyless.tolist() == [False, False, True, True, True, True, True, True, True, True, False, False]
    split = library_flash.packed_documents(torch.tensor([[0, 1, 0]]), torch.tensor([[0, 1, 0]]))
    assert "split into pieces" in split
    swapped = library_flash.packed_documents(torch.tensor([[0, 0, 1]]), torch.tensor([[1, 0, 0]]))
    assert "different orders" in swapped


def test_block_masks():
    assert library_flash.block_mask(8, 8, False, 0, 100) == "full"
    assert library_flash.block_mask(8, 8, True, 8, 0) == "full"  # every key before every query
    assert library_flash.block_mask(8, 8, True, 7, 0) == "full"  # the last key at the first query's position
    assert library_flash.block_mask(8, 8, True, 6, 0) == "offset"
    assert library_flash.block_mask(8, 8, True, 0, 8) == "empty"
    assert library_flash.block_mask(8, 8, True, 16, 16) == "diagonal"
    assert library_flash.block_mask(8, 12, True, 0, 0) == "offset"  # non-square: the libraries align bottom-right


def test_what_the_library_backends_cannot_express():
    q = torch.zeros(1, 4, 8, 64, dtype=torch.bfloat16)
    k = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    assert library_flash.unsupported("torch_flash", q, k, True, None, None, 0, 0) is None
    assert "float32" in library_flash.unsupported("torch_flash", q.float(), k.float(), True, None, None, 0, 0)
    assert "head_dim 72" not in (library_flash.unsupported("torch_flash", q[..., :72], k[..., :72], True, None, None,
                                                           0, 0) or "")
    assert "head_dim 100" in library_flash.unsupported("torch_flash", torch.zeros(1, 4, 8, 100, dtype=torch.bfloat16),
                                                       torch.zeros(1, 2, 8, 100, dtype=torch.bfloat16), True, None,
                                                       None, 0, 0)
    big = torch.zeros(1, 4, 8, 192, dtype=torch.bfloat16)
    assert library_flash.unsupported("torch_flash", big, big, True, None, None, 0, 0) is None
    assert "up to 128" in library_flash.unsupported("cudnn", big, big, True, None, None, 0, 0)
    assert "offsets" in library_flash.unsupported("torch_flash", q, k, True, None, None, 4, 0)
    ids = torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2]])
    assert "split into pieces" in library_flash.unsupported("torch_flash", q, k, True, ids, ids, 0, 0)
    packed = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2]])
    assert library_flash.unsupported("torch_flash", q, k, True, packed, packed, 0, 0) is None
    assert "one per row" in library_flash.unsupported("cudnn", q, k, True, packed, packed, 0, 0)
    one = torch.full((1, 8), 5)
    assert library_flash.unsupported("cudnn", q, k, True, one, one, 0, 0) is None


# ------------------------------------------------------------------------------------------------
# The ring with an emulated library backend: the adapters under the ring's strided views and tiles
# ------------------------------------------------------------------------------------------------

def _ring_case(world_size, *, causal, kv_heads=4, packed=True, seed=0, chunk=6):
    """ring_attention on the emulated library backend against the dense fp64 reference: out and every gradient."""
    from ringlwm import ring_attention, shard_sequence, unshard_sequence

    seqlen = 2 * world_size * chunk
    q, k, v, dout = _inputs(2, 4, kv_heads, seqlen, seqlen, 16, seed=seed)
    seg = _packed(2, seqlen, [[5, 11, 17], [9]], pad=3) if packed else None
    mask = dict(causal=causal, segment_ids=seg, kv_segment_ids=seg)
    ref_out, _, ref_grads = _reference(q, k, v, dout, **mask)
    local = [shard_sequence(t, dim=2).requires_grad_() for t in (q, k, v)]
    local_seg = shard_sequence(seg, dim=1) if packed else None
    out = ring_attention(*local, causal=causal, segment_ids=local_seg, scale=0.25, backend="emulated_flash")
    out.backward(shard_sequence(dout, dim=2))
    for name, got, want in zip(("out", "dq", "dk", "dv"), [out] + [t.grad for t in local], [ref_out, *ref_grads]):
        err = max_err(unshard_sequence(got.detach(), dim=2), want)
        assert err < 1e-12, f"{name}: {err:.2e} (W={world_size}, causal={causal}, packed={packed})"


def _ring_with_emulated_library(rank, world_size):
    from ringlwm.ring import attention

    register_backend("emulated_flash", lambda: Backend(*ADAPTERS["torch_flash-like"]))  # this process's table
    for causal in (True, False):
        _ring_case(world_size, causal=causal, kv_heads=2, seed=40 + causal)
    _ring_case(world_size, causal=True, packed=False, seed=42)
    # backward tiles: square diagonal tiles with offsets, unmasked tiles below them
    attention.BACKWARD_TILE_BYTES, attention.BACKWARD_TILE = 0, 5
    _ring_case(world_size, causal=True, kv_heads=2, seed=43)


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_ring_with_an_emulated_library_backend_matches_fp64(world_size):
    run_distributed(_ring_with_emulated_library, world_size)


# ------------------------------------------------------------------------------------------------
# The real ATen ops, on fake cuda tensors
# ------------------------------------------------------------------------------------------------

def _promised(q, k):
    """What the block contract promises (the custom ops' fake implementations)."""
    with FakeTensorMode(), torch.no_grad():
        qf = torch.empty(q.shape, dtype=q.dtype, device="meta")
        kf = torch.empty(k.shape, dtype=k.dtype, device="meta")
        out, lse = block_attention_forward(qf, kf, kf, causal=True)
        grads = block_attention_backward(out, qf, kf, kf, out, lse, causal=True)
    return [(tuple(t.shape), t.dtype) for t in (out, lse, *grads)]


@pytest.mark.parametrize("backend", ["torch_flash", "cudnn"])
@pytest.mark.parametrize("packed", [False, True])
def test_the_aten_ops_take_the_adapters_calls_on_fake_cuda_tensors(backend, packed, monkeypatch):
    if backend == "cudnn" and packed:
        pytest.skip("cudnn takes no varlen documents")
    batch, heads, kv_heads, seq, head_dim = 2, 8, 2, 256, 128
    with FakeTensorMode(), torch.no_grad():
        q = torch.empty(batch, heads, seq, head_dim, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(batch, kv_heads, seq, head_dim, dtype=torch.bfloat16, device="cuda")
        v = torch.empty_like(k)
        kwargs = dict(causal=True, scale=head_dim ** -0.5)
        if packed:  # the ids' values cannot be read here: the documents come from the planner of real ids
            ids = torch.zeros(batch, seq, dtype=torch.long, device="cuda")
            docs = Documents(torch.zeros(2 * batch + 1, dtype=torch.int32, device="cuda"),
                             torch.zeros(2 * batch + 1, dtype=torch.int32, device="cuda"), 200, 200, None)
            monkeypatch.setattr(library_flash, "packed_documents", lambda *a, **kw: docs)
            kwargs.update(segment_ids=ids, kv_segment_ids=ids)
        forward = getattr(library_flash, f"{backend}_forward")
        backward = getattr(library_flash, f"{backend}_backward")
        out, lse = forward(q, k, v, **kwargs)
        dout = out.clone(memory_format=torch.contiguous_format)  # (.contiguous() fails on fake cuda here)
        grads = backward(dout, q, k, v, out, lse, **kwargs)
        got = [(tuple(t.shape), t.dtype) for t in (out, lse, *grads)]
        assert all(t.device.type == "cuda" for t in (out, lse, *grads))
    assert got == _promised(torch.empty(batch, heads, seq, head_dim, dtype=torch.bfloat16),
                            torch.empty(batch, kv_heads, seq, head_dim, dtype=torch.bfloat16))


# ------------------------------------------------------------------------------------------------
# Selection: auto, fallbacks, notices, refusals
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """An H200 with cuDNN 9 and no flash-attn, a measured table at a temporary path; notices reset."""
    monkeypatch.setattr(library_flash, "device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(library_flash, "device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
    monkeypatch.setattr(library_flash, "flash_attn_flavour", lambda device=None: None)
    monkeypatch.setenv(library_flash.TABLE_ENV, str(tmp_path / "table.json"))
    monkeypatch.setattr(library_flash, "_TABLE", {})
    monkeypatch.setattr(library_flash, "_NOTICES", set())
    return tmp_path / "table.json"


class _Notices(list):
    @property
    def text(self) -> str:
        return "\n".join(record.getMessage() for record in self)


@pytest.fixture
def notices():
    """The warnings of the ``ringlwm.kernels`` logger (caught at the logger: ringlwm's logger does not propagate)."""
    records = _Notices()
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    log = logging.getLogger("ringlwm.kernels")
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)


def _fake_cuda(shape, dtype=torch.bfloat16):
    mode = FakeTensorMode()
    with mode:
        return torch.empty(shape, dtype=dtype, device="cuda")


def test_auto_picks_the_measured_fastest_per_gpu_and_head_dim(fake_gpu, notices):
    fake_gpu.write_text(json.dumps({"version": 1, "gpus": {"NVIDIA H200": {"fastest": {"64": "cudnn",
                                                                                      "128": "torch_flash"}}}}))
    q64, q128, q96 = (_fake_cuda((1, 4, 16, d)) for d in (64, 128, 96))
    assert library_flash.auto_backend(q64) == "cudnn"
    assert library_flash.auto_backend(q128) == "torch_flash"
    assert library_flash.auto_backend(q96) == "torch_flash"  # the nearest measured head_dim (a tie: the larger)
    assert library_flash.auto_backend(torch.zeros(1, 4, 16, 64)) == "cpu"
    assert library_flash.auto_backend(q64, holds_no_data=True) == "triton"  # fake GPUs: the planner's kernel
    assert not notices


def test_auto_without_a_measurement_says_so_once(fake_gpu, notices, monkeypatch):
    q = _fake_cuda((1, 4, 16, 64))
    assert library_flash.auto_backend(q) == "torch_flash"
    assert library_flash.auto_backend(q) == "torch_flash"
    assert len(notices) == 1 and "make gpu-check" in notices.text and "NVIDIA H200" in notices.text
    monkeypatch.setattr(library_flash, "device_capability", lambda device=None: (7, 5))
    assert library_flash.auto_backend(q) == "triton"  # no FlashAttention-2 before sm80
    # a measured choice that cannot run here (flash-attn not installed) is not taken
    fake_gpu.write_text(json.dumps({"version": 1, "gpus": {"NVIDIA H200": {"fastest": {"64": "flash_attn"}}}}))
    monkeypatch.setattr(library_flash, "_TABLE", {})
    monkeypatch.setattr(library_flash, "device_capability", lambda device=None: (9, 0))
    assert library_flash.auto_backend(q) == "torch_flash"
    assert "'flash_attn', which cannot run here" in notices.text


def test_a_stale_or_broken_table_is_refused(fake_gpu):
    fake_gpu.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid attention backend table"):
        library_flash.auto_backend(_fake_cuda((1, 4, 16, 64)))
    fake_gpu.write_text(json.dumps({"version": 0, "gpus": {}}))
    library_flash._TABLE.clear()
    with pytest.raises(ValueError, match="rerun make gpu-check"):
        library_flash.auto_backend(_fake_cuda((1, 4, 16, 64)))


def test_blocks_a_library_cannot_express_fall_back_with_one_notice(fake_gpu, notices):
    q, k = _fake_cuda((1, 4, 16, 64)), _fake_cuda((1, 2, 16, 64))
    assert select_backend("torch_flash", q, k, True) == "torch_flash"
    assert select_backend("cudnn", q, k, False) == "cudnn"
    assert select_backend("torch_flash", q, k, True, q_offset=4) == "triton"
    assert select_backend("torch_flash", q, k, True, q_offset=4) == "triton"
    assert len(notices) == 1 and "with offsets" in notices.text and "'triton'" in notices.text
    q32, k32 = _fake_cuda((1, 4, 16, 64), torch.float32), _fake_cuda((1, 2, 16, 64), torch.float32)
    assert select_backend("cudnn", q32, k32, True) == "triton"  # cudnn -> torch_flash -> triton
    assert "'cudnn' cannot express torch.float32" in notices.text and "'torch_flash' cannot express" in notices.text
    assert select_backend(None, q, k, True) == "triton"  # auto on a fake GPU
    assert select_backend("auto", torch.zeros(1, 4, 8, 64), torch.zeros(1, 4, 8, 64)) == "cpu"


def test_library_backends_refuse_what_cannot_run_and_name_the_way_out(fake_gpu, monkeypatch):
    q = torch.zeros(1, 4, 8, 64, dtype=torch.bfloat16)
    for name in ("torch_flash", "cudnn", "flash_attn"):
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            block_attention_forward(q, q, q, causal=True, backend=name)
    gpu = torch.device("cuda")
    assert library_flash.unavailable("flash_attn", gpu).startswith("the 'flash_attn' backend needs the flash-attn "
                                                                   "package: pip install flash-attn")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 8900)
    assert "cuDNN 9" in library_flash.unavailable("cudnn", gpu)
    monkeypatch.setattr(library_flash, "device_capability", lambda device=None: (7, 0))
    assert "compute capability 8.0" in library_flash.unavailable("torch_flash", gpu)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*auto"):
        block_attention_forward(q, q, q, backend="flash")


def _fake_flash_attn_modules(old_style: bool):
    """Stand-ins for flash-attn 2 (``flash_attn.flash_attn_interface``; ``old_style``: the 2.4-2.5 signatures, a
    window pair and 8 results) and flash-attn 4 (``flash_attn.cute.interface``) on the emulated contract."""
    fa2 = types.ModuleType("flash_attn.flash_attn_interface")

    def docs_of(cu_q, cu_k, max_q, max_k):
        return Documents(cu_q, cu_k, max_q, max_k, None)

    def results(out, lse):
        return (out, None, None, None, out, lse, None, None) if old_style else (out, lse, None, None)

    if old_style:
        def forward(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes, return_softmax):
            assert window_size == (-1, -1) and dropout_p == 0.0
            return results(*EMULATED.forward(q, k, v, None, causal, softmax_scale))
    else:
        def forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                    alibi_slopes, return_softmax):
            assert (window_size_left, window_size_right, softcap) == (-1, -1, 0.0)
            return results(*EMULATED.forward(q, k, v, None, causal, softmax_scale))

    def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                       causal, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                       return_softmax=False, block_table=None):
        docs = docs_of(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return results(*EMULATED.forward(q, k, v, docs, causal, softmax_scale))

    def backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size_left,
                 window_size_right, softcap, alibi_slopes, deterministic, rng_state=None):
        for target, g in zip((dq, dk, dv), EMULATED.backward(dout, q, k, v, out, softmax_lse, None, causal,
                                                             softmax_scale)):
            target.copy_(g)

    def varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                        alibi_slopes, deterministic, rng_state=None):
        docs = docs_of(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        for target, g in zip((dq, dk, dv), EMULATED.backward(dout, q, k, v, out, softmax_lse, docs, causal,
                                                             softmax_scale)):
            target.copy_(g)

    fa2._flash_attn_forward, fa2._flash_attn_varlen_forward = forward, varlen_forward
    fa2._flash_attn_backward, fa2._flash_attn_varlen_backward = backward, varlen_backward

    fa4 = types.ModuleType("flash_attn.cute.interface")

    def fwd(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
            max_seqlen_q=None, max_seqlen_k=None, softmax_scale=None, causal=False, return_lse=False):
        assert return_lse and q.is_contiguous()
        docs = None if cu_seqlens_q is None else docs_of(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        out, lse = EMULATED.forward(q, k, v, docs, causal, softmax_scale)
        return out, lse, None, None, None

    def bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, cu_seqlens_q=None, cu_seqlens_k=None,
            max_seqlen_q=None, max_seqlen_k=None):
        docs = None if cu_seqlens_q is None else docs_of(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return (*EMULATED.backward(dout, q, k, v, out, lse, docs, causal, softmax_scale), None)

    fa4._flash_attn_fwd, fa4._flash_attn_bwd = fwd, bwd
    return fa2, fa4


@pytest.mark.parametrize("flavour", ["flash-attn-2", "flash-attn-2 (2.4-2.5)", "flash-attn-4"])
def test_the_flash_attn_backend_on_stand_ins_of_its_versions(flavour, monkeypatch):
    """The flash_attn backend binds flash-attn 2's private functions by name (both signature generations, both
    result layouts) and flash-attn 4's, and gives the dense reference's results through them."""
    fa2, fa4 = _fake_flash_attn_modules(old_style="2.4" in flavour)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", fa2)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", fa4)
    monkeypatch.setattr(library_flash, "flash_attn_flavour", lambda device=None: flavour.split(" ")[0])
    monkeypatch.setattr(library_flash, "_FLASH_ATTN_OPS", {})
    for name, batch, heads, kv_heads, seq_q, seq_k, causal, q_offset, kv_offset, kind in CASES:
        q, k, v, dout = _inputs(batch, heads, kv_heads, seq_q, seq_k, 16, seed=len(name))
        mask = dict(causal=causal, q_offset=q_offset, kv_offset=kv_offset, **_segments(kind, batch, seq_q, seq_k))
        ref_out, ref_lse, ref_grads = _reference(q, k, v, dout, **mask)
        out, lse = library_flash.flash_attn_forward(q, k, v, scale=0.25, **mask)
        assert max_err(out, ref_out) < 1e-12, name
        grads = library_flash.flash_attn_backward(dout, q, k, v, ref_out, ref_lse, scale=0.25, **mask)
        assert all(max_err(g, want) < 1e-12 for g, want in zip(grads, ref_grads)), name


def test_flash_attn_signatures_are_bound_by_name():
    def new_style(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                  alibi_slopes, return_softmax):
        pass

    def old_style(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes, return_softmax):
        pass

    wanted = dict(q=1, k=2, v=3, dropout_p=0.0, softmax_scale=0.5, causal=True, window_size_left=-1,
                  window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False)
    assert library_flash._keywords(new_style, **wanted) == wanted
    old = library_flash._keywords(old_style, **wanted)
    assert old["window_size"] == (-1, -1) and "softcap" not in old and "window_size_left" not in old

    def future(q, k, v, softmax_scale, causal, sink_tokens):
        pass

    with pytest.raises(RuntimeError, match="sink_tokens"):
        library_flash._keywords(future, **wanted)


def test_importing_ringlwm_needs_no_gpu_and_no_flash_attn():
    """Importing the package and its kernels and running a block with "auto" imports neither flash-attn nor ringlwm's
    Triton kernels (torch itself may import Triton); nor does a model. CUDA hidden."""
    script = textwrap.dedent(
        """
        import sys
        import torch
        import ringlwm
        from ringlwm.kernels import blockwise_attention, library_flash
        q = torch.randn(1, 2, 8, 16)
        blockwise_attention(q, q, q, causal=True, backend="auto")
        def loaded():
            return sorted(m for m in sys.modules if m.split(".")[0] == "flash_attn" or m.endswith("triton_flash"))
        print(loaded())
        from ringlwm.models import RingLlamaForCausalLM
        print(loaded())
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                          env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-2:] == ["[]", "[]"]


# ------------------------------------------------------------------------------------------------
# On a GPU (make gpu-check's tests part): the real kernels against fp64, within 2x of SDPA's own error
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", library_flash.LIBRARY_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ["full", "causal", "gqa causal", "packed causal"])
def test_the_library_kernels_on_a_gpu_within_2x_of_sdpa(backend, dtype, case):
    from test_blockwise_attention import _packed_segments, check_against_reference

    reason = library_flash.unavailable(backend, torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    kv_heads = 2 if case.startswith("gqa") else 4
    q, k, v, dout = _inputs(1, 4, kv_heads, 333, 333, 64, seed=5, dtype=torch.float32)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    ids = _packed_segments(1, 333, 4, seed=6) if case.startswith("packed") else None
    causal = case != "full"
    ran = select_backend(backend, q.cuda(), k.cuda(), causal, None if ids is None else ids.cuda(),
                         None if ids is None else ids.cuda())
    assert ran == backend or (backend == "cudnn" and ids is not None and ran == "torch_flash")
    check_against_reference(backend, q, k, v, dout, causal=causal, segment_ids=ids, kv_segment_ids=ids)
