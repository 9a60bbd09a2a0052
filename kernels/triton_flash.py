"""FlashAttention-2 style forward and backward kernels in Triton.

Layout of every tensor argument (any strides; the launchers pass them through):
    q, out, dout: (batch, heads, seq_q, head_dim)
    k, v:         (batch, kv_heads, seq_k, head_dim), heads % kv_heads == 0 (GQA / MQA)
    lse, delta:   (batch, heads, seq_q) float32, contiguous
    segment_ids:  (batch, seq_q) and kv_segment_ids: (batch, seq_k), int32, contiguous

Masking. Query i may attend key j when
    j < seq_k                                         (tails)
    and q_offset + i >= kv_offset + j                 (if causal)
    and segment_ids[i] == kv_segment_ids[j]           (if segment ids are given)
The offsets place the block in a longer sequence, so that one call computes one ring step.

Numerics. Scores and the softmax statistics are fp32; the row maximum is tracked in log2 units so the
kernels use exp2. A row whose keys are all masked has m = -inf; we subtract a safe 0 instead of m there
(exp2(-inf - 0) = 0, whereas exp2(-inf - -inf) is NaN), and return out = 0, lse = -inf for it.

Tails (query rows past seq_q, key rows past seq_k in the last tile) are loaded as zeros and never stored.
The forward and dQ kernels mask key tails like any masked key (a zero key still scores 0, and in the
backward p = exp2(0 - lse) overflows to inf for a row whose real scores are all below about -88, then
inf * 0 = NaN). The dK/dV kernel never stores its key tails and leaves query tails unmasked: with
q = dout = lse = delta = 0 there, p = exp2(0 - 0) = 1 and every product they enter is zero.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The kernels keep scores and the log-sum-exp in log2 units (exp2 is the hardware instruction): the launchers
# scale scores by LOG2E = log2(e), and the forward turns its lse back into natural log with LN2 = ln(2).
LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # constexpr: the only kind of global a Triton kernel may read

# Segment ids of out-of-bounds lanes in masked loads: queries past seq_q, keys past seq_k. Nothing depends
# on these values: every such lane is masked by bounds, never stored, or adds zeros (see Tails above). They still
# cannot match a real id in practice: real ids are documents 0, 1, ... and padding PAD_SEGMENT = -1
# (ringlwm.data.packing; ringlwm.generate pads prompts with -1 too), compared as int32, far from the int32
# minimum; and the two differ, so a tail query never matches a tail key either.
_NO_QUERY_SEGMENT = tl.constexpr(-(2**31))
_NO_KEY_SEGMENT = tl.constexpr(-(2**31) + 1)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The interpreter runs one fixed, small configuration (autotuning there would only cost time).
_INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}


def _smem_bytes(block_m: int, block_n: int, block_d: int, stages: int, elem: int) -> int:
    """Rough shared memory estimate: one resident (M, D) tile plus (stages) buffered pairs of (N, D) tiles."""
    return (block_m * block_d + 2 * stages * block_n * block_d) * elem


# Leaves headroom under the 164 KiB of an A100 and 227 KiB of an H100 for the compiler's own scratch.
_SMEM_LIMIT = 150 * 1024


def _prune(configs, named_args, **kwargs):
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    elem = named_args["Q"].element_size() if "Q" in named_args else 2
    kept = [
        c
        for c in configs
        if _smem_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_d, c.num_stages, elem) <= _SMEM_LIMIT
    ]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _configs(pairs, warps=(4, 8), stages=(2, 3)):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n in pairs
        for w in warps
        for s in stages
    ]


_FWD_CONFIGS = _configs([(128, 64), (128, 32), (64, 64), (128, 128)])
_BWD_CONFIGS = _configs([(64, 64), (32, 64), (64, 128), (128, 64), (32, 32)])
_AUTOTUNE_KEY = ["seq_q", "seq_k", "HEAD_DIM", "CAUSAL", "HAS_SEG"]


def autotune_configs(kernel: str, capability: int, dtype: str, head_dim: int):
    """The autotune list of one kernel ("fwd", "dkdv", "dq") for a target (e.g. 90), dtype and head_dim."""
    return _FWD_CONFIGS if kernel == "fwd" else _BWD_CONFIGS


# Whether the sequences are whole tiles: then no load, store or score needs a bounds mask (constexpr flags,
# set per launch from the chosen configuration).
HEURISTICS = {
    "EVEN_M": lambda args: args["seq_q"] % args["BLOCK_M"] == 0,
    "EVEN_N": lambda args: args["seq_k"] % args["BLOCK_N"] == 0,
}


def _autotuned(configs):
    """Autotune on a GPU; under the interpreter the launcher passes fixed block sizes instead."""

    def wrap(fn):
        fn = triton.heuristics(HEURISTICS)(fn)
        if _INTERPRET:
            return fn
        return triton.autotune(configs=configs, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune})(
            fn
        )

    return wrap


def _launch_meta() -> dict:
    return dict(_INTERPRET_BLOCKS) if _INTERPRET else {}


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptrs, rows, n_rows, d_ok, ROW_MASK: tl.constexpr, D_MASK: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, masking only what can be out of bounds: rows past n_rows (ROW_MASK) and
    columns past head_dim (D_MASK, when head_dim is not a power of two). Masked lanes read 0."""
    if ROW_MASK:
        if D_MASK:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & d_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if D_MASK:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_rows(ptrs, x, rows, n_rows, d_ok, ROW_MASK: tl.constexpr, D_MASK: tl.constexpr):
    """Store a (rows, BLOCK_D) tile, masked like _load_rows."""
    if ROW_MASK:
        if D_MASK:
            tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & d_ok[None, :])
        else:
            tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        if D_MASK:
            tl.store(ptrs, x, mask=d_ok[None, :])
        else:
            tl.store(ptrs, x)


@triton.jit
def _key_segments(KSeg, cols, seq_k, KEY_MASK: tl.constexpr):
    if KEY_MASK:
        k_seg = tl.load(KSeg + cols, mask=cols < seq_k, other=_NO_KEY_SEGMENT)
    else:
        k_seg = tl.load(KSeg + cols)
    return k_seg


@triton.jit
def _mask_scores(s, q_pos, q_seg, cols, KSeg, seq_k, kv_offset,
                 CAUSAL_MASK: tl.constexpr, KEY_MASK: tl.constexpr, HAS_SEG: tl.constexpr):
    """-inf where query i (rows of s) may not attend key cols[j]; only the masks asked for are built."""
    if KEY_MASK:
        s = tl.where(cols[None, :] < seq_k, s, float("-inf"))
    if CAUSAL_MASK:
        s = tl.where(q_pos[:, None] >= kv_offset + cols[None, :], s, float("-inf"))
    if HAS_SEG:
        k_seg = _key_segments(KSeg, cols, seq_k, KEY_MASK)
        s = tl.where(q_seg[:, None] == k_seg[None, :], s, float("-inf"))
    return s


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, q_pos, q_seg, d_ok,
    K, V, KSeg, stride_kn, stride_vn,
    lo, hi, seq_k, kv_offset, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL_MASK: tl.constexpr, KEY_MASK: tl.constexpr,
    D_MASK: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(K + cols[:, None] * stride_kn + offs_d[None, :], cols, seq_k, d_ok, KEY_MASK, D_MASK)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = _mask_scores(s, q_pos, q_seg, cols, KSeg, seq_k, kv_offset, CAUSAL_MASK, KEY_MASK, HAS_SEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if CAUSAL_MASK or KEY_MASK or HAS_SEG:  # a row may have seen no key yet: m = -inf
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_safe = m_new
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V + cols[:, None] * stride_vn + offs_d[None, :], cols, seq_k, d_ok, KEY_MASK, D_MASK)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_autotuned(_FWD_CONFIGS)
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, QSeg, KSeg,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    num_heads, group_size, seq_q, seq_k, q_offset, kv_offset, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    kvh = h // group_size
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    D_MASK: tl.constexpr = HEAD_DIM != BLOCK_D

    q = _load_rows(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                   offs_m, seq_q, d_ok, not EVEN_M, D_MASK)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    if HAS_SEG:
        q_seg = tl.load(QSeg + b * seq_q + offs_m, mask=offs_m < seq_q, other=_NO_QUERY_SEGMENT)
        k_seg_base = KSeg + b * seq_k
    else:
        q_seg = offs_m  # unused
        k_seg_base = KSeg
    q_pos = q_offset + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys [0, full_hi) are whole in-bounds tiles visible to every query of this block: no causal/tail mask.
    # Keys [full_hi, hi) need the mask; keys >= hi are invisible to the whole block (causal) and skipped.
    if CAUSAL:
        hi = tl.minimum(seq_k, tl.maximum(q_offset + start_m + BLOCK_M - kv_offset, 0))
        full_hi = tl.minimum(seq_k, tl.maximum(q_offset + start_m + 1 - kv_offset, 0))
    else:
        hi = seq_k
        full_hi = seq_k
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, q_pos, q_seg, d_ok, k_base, v_base, k_seg_base, stride_kn, stride_vn,
        0, full_hi, seq_k, kv_offset, qk_scale,
        BLOCK_N, BLOCK_D, False, False, D_MASK, HAS_SEG, DOT_PRECISION,
    )
    if CAUSAL or not EVEN_N:  # (with EVEN_N every masked tile lies inside seq_k: no key tail mask)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, q_pos, q_seg, d_ok, k_base, v_base, k_seg_base, stride_kn, stride_vn,
            full_hi, hi, seq_k, kv_offset, qk_scale,
            BLOCK_N, BLOCK_D, CAUSAL, not EVEN_N, D_MASK, HAS_SEG, DOT_PRECISION,
        )

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    _store_rows(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                acc.to(Out.dtype.element_ty), offs_m, seq_q, d_ok, not EVEN_M, D_MASK)
    if EVEN_M:
        tl.store(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, lse)
    else:
        tl.store(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=offs_m < seq_q)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_delta_kernel(
    Out, DOut, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_db, stride_dh, stride_dm, stride_dd,
    num_heads, seq_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[i] = sum_d dout[i, d] * out[i, d], the row term of the softmax gradient."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * seq_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seq_q)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, k_pos, k_seg, d_ok,
    Q, DOut, lse_ptr, delta_ptr, QSeg, stride_qm, stride_dom,
    lo, hi, seq_q, q_offset, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL_MASK: tl.constexpr, ROW_MASK: tl.constexpr,
    D_MASK: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = _load_rows(Q + rows[:, None] * stride_qm + offs_d[None, :], rows, seq_q, d_ok, ROW_MASK, D_MASK)
        do = _load_rows(DOut + rows[:, None] * stride_dom + offs_d[None, :], rows, seq_q, d_ok, ROW_MASK, D_MASK)
        if ROW_MASK:
            lse = tl.load(lse_ptr + rows, mask=rows < seq_q, other=0.0)
            delta = tl.load(delta_ptr + rows, mask=rows < seq_q, other=0.0)
        else:
            lse = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        # Work with the transposed scores (keys x queries) so that dk, dv come out without transposes.
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        if CAUSAL_MASK:
            s_t = tl.where(q_offset + rows[None, :] >= k_pos[:, None], s_t, float("-inf"))
        if HAS_SEG:
            q_seg = tl.load(QSeg + rows, mask=rows < seq_q, other=_NO_QUERY_SEGMENT)
            s_t = tl.where(k_seg[:, None] == q_seg[None, :], s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@_autotuned(_BWD_CONFIGS)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, QSeg, KSeg,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    num_kv_heads, group_size, seq_q, seq_k, q_offset, kv_offset, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    """One program per (key block, batch * kv_head); loops over the query heads of its GQA group."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    kvh = (pid_bh % num_kv_heads).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    D_MASK: tl.constexpr = HEAD_DIM != BLOCK_D

    k = _load_rows(K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                   offs_n, seq_k, d_ok, not EVEN_N, D_MASK)
    v = _load_rows(V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                   offs_n, seq_k, d_ok, not EVEN_N, D_MASK)
    if HAS_SEG:
        k_seg = tl.load(KSeg + b * seq_k + offs_n, mask=offs_n < seq_k, other=_NO_KEY_SEGMENT)
        q_seg_base = QSeg + b * seq_q
    else:
        k_seg = offs_n  # unused
        q_seg_base = QSeg
    k_pos = kv_offset + offs_n

    # Queries [lo, full_lo) see part of this key block (causal mask); [full_lo, full_hi) see all of it and are
    # whole tiles; [full_hi, seq_q) is the last, partial query tile (row mask).
    if CAUSAL:
        lo = tl.minimum(tl.maximum(kv_offset + start_n - q_offset, 0), seq_q)
        full_lo = tl.minimum(tl.maximum(kv_offset + start_n + BLOCK_N - 1 - q_offset, 0), seq_q)
        lo = (lo // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(full_lo, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        full_lo = 0
    full_hi = tl.maximum((seq_q // BLOCK_M) * BLOCK_M, full_lo)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(group_size):
        h = kvh * group_size + g
        bh = b * num_kv_heads * group_size + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DOut + b * stride_dob + h * stride_doh
        lse_ptr = Lse + bh * seq_q
        delta_ptr = Delta + bh * seq_q
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, k_pos, k_seg, d_ok, q_base, do_base, lse_ptr, delta_ptr, q_seg_base, stride_qm, stride_dom,
            lo, full_lo, seq_q, q_offset, qk_scale,
            BLOCK_M, BLOCK_D, CAUSAL, not EVEN_M, D_MASK, HAS_SEG, DOT_PRECISION,
        )
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, k_pos, k_seg, d_ok, q_base, do_base, lse_ptr, delta_ptr, q_seg_base, stride_qm, stride_dom,
            full_lo, full_hi, seq_q, q_offset, qk_scale,
            BLOCK_M, BLOCK_D, False, False, D_MASK, HAS_SEG, DOT_PRECISION,
        )
        if not EVEN_M:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, k_pos, k_seg, d_ok, q_base, do_base, lse_ptr, delta_ptr, q_seg_base, stride_qm,
                stride_dom, full_hi, seq_q, seq_q, q_offset, qk_scale,
                BLOCK_M, BLOCK_D, False, True, D_MASK, HAS_SEG, DOT_PRECISION,
            )

    dk = dk * scale
    kv_mask = (offs_n[:, None] < seq_k) & d_ok[None, :]
    tl.store(DK + b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + kvh * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, q_pos, q_seg, d_ok,
    K, V, KSeg, stride_kn, stride_vn,
    lo, hi, seq_k, kv_offset, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL_MASK: tl.constexpr, KEY_MASK: tl.constexpr,
    D_MASK: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(K + cols[:, None] * stride_kn + offs_d[None, :], cols, seq_k, d_ok, KEY_MASK, D_MASK)
        v = _load_rows(V + cols[:, None] * stride_vn + offs_d[None, :], cols, seq_k, d_ok, KEY_MASK, D_MASK)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = _mask_scores(s, q_pos, q_seg, cols, KSeg, seq_k, kv_offset, CAUSAL_MASK, KEY_MASK, HAS_SEG)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@_autotuned(_BWD_CONFIGS)
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, QSeg, KSeg,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    num_heads, group_size, seq_q, seq_k, q_offset, kv_offset, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    """One program per (query block, batch * head)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    kvh = h // group_size
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    D_MASK: tl.constexpr = HEAD_DIM != BLOCK_D

    q = _load_rows(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                   offs_m, seq_q, d_ok, not EVEN_M, D_MASK)
    do = _load_rows(DOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                    offs_m, seq_q, d_ok, not EVEN_M, D_MASK)
    if EVEN_M:
        lse = tl.load(Lse + pid_bh.to(tl.int64) * seq_q + offs_m)
        delta = tl.load(Delta + pid_bh.to(tl.int64) * seq_q + offs_m)
    else:
        lse = tl.load(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, mask=offs_m < seq_q, other=0.0)
        delta = tl.load(Delta + pid_bh.to(tl.int64) * seq_q + offs_m, mask=offs_m < seq_q, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    if HAS_SEG:
        q_seg = tl.load(QSeg + b * seq_q + offs_m, mask=offs_m < seq_q, other=_NO_QUERY_SEGMENT)
        k_seg_base = KSeg + b * seq_k
    else:
        q_seg = offs_m  # unused
        k_seg_base = KSeg
    q_pos = q_offset + offs_m

    # Keys [0, full_hi): whole in-bounds tiles visible to every query of this block; [full_hi, hi): masked.
    if CAUSAL:
        hi = tl.minimum(seq_k, tl.maximum(q_offset + start_m + BLOCK_M - kv_offset, 0))
        full_hi = tl.minimum(seq_k, tl.maximum(q_offset + start_m + 1 - kv_offset, 0))
    else:
        hi = seq_k
        full_hi = seq_k
    full_hi = (full_hi // BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, q_pos, q_seg, d_ok, k_base, v_base, k_seg_base, stride_kn, stride_vn,
        0, full_hi, seq_k, kv_offset, qk_scale,
        BLOCK_N, BLOCK_D, False, False, D_MASK, HAS_SEG, DOT_PRECISION,
    )
    if CAUSAL or not EVEN_N:
        dq = _bwd_dq_inner(
            dq, q, do, lse, delta, q_pos, q_seg, d_ok, k_base, v_base, k_seg_base, stride_kn, stride_vn,
            full_hi, hi, seq_k, kv_offset, qk_scale,
            BLOCK_N, BLOCK_D, CAUSAL, not EVEN_N, D_MASK, HAS_SEG, DOT_PRECISION,
        )
    dq = dq * scale
    _store_rows(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
                dq.to(DQ.dtype.element_ty), offs_m, seq_q, d_ok, not EVEN_M, D_MASK)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

_MAX_INT32 = 2**31 - 1


def _fit_int32_offsets(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernels address (batch, head, seq, dim) tensors with a unit stride along dim (it lets them load
    whole rows as vectors and copy them asynchronously) and int32 offsets inside one (batch, head) slice: copy
    a tensor that breaks either, and refuse one whose slice cannot fit int32 offsets at all."""
    out = []
    for t in tensors:
        if (t.stride(3) != 1 and t.shape[3] > 1) or t.shape[2] * t.stride(2) + t.shape[3] > _MAX_INT32:
            t = t.contiguous()
            if t.shape[2] * t.shape[3] > _MAX_INT32:
                raise ValueError(
                    f"one (batch, head) slice of shape {tuple(t.shape[2:])} has more than 2**31 elements; "
                    "split the sequence over more ranks"
                )
        out.append(t)
    return tuple(out)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs mean the user asked for fp32 math: no silent TF32 rounding of q, k, v.
    return "ieee" if dtype == torch.float32 else "tf32"


def _seg_args(segment_ids, kv_segment_ids, q):
    """The kernels compare segment ids as int32: ids must lie in the int32 range (the data's do: 0, 1, ...
    and -1 for padding)."""
    if segment_ids is None:
        dummy = torch.empty(1, dtype=torch.int32, device=q.device)
        return dummy, dummy, False
    return segment_ids.to(torch.int32).contiguous(), kv_segment_ids.to(torch.int32).contiguous(), True


def triton_attention_forward(
    q, k, v, *, causal, scale, segment_ids=None, kv_segment_ids=None, q_offset=0, kv_offset=0
):
    """Returns (out like q, lse (batch, heads, seq_q) float32). Arguments are already validated."""
    q, k, v = _fit_int32_offsets(q, k, v)
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    q_seg, k_seg, has_seg = _seg_args(segment_ids, kv_segment_ids, q)

    def grid(meta):
        return (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)

    _fwd_kernel[grid](
        q, k, v, out, lse, q_seg, k_seg,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        heads, heads // kv_heads, seq_q, seq_k, q_offset, kv_offset, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), CAUSAL=causal, HAS_SEG=has_seg,
        DOT_PRECISION=_dot_precision(q.dtype), **_launch_meta(),
    )
    return out, lse


def triton_attention_backward(
    dout, q, k, v, out, lse, *, causal, scale, segment_ids=None, kv_segment_ids=None, q_offset=0, kv_offset=0
):
    """Returns (dq, dk, dv) in float32, shaped like q, k, v. ``lse`` may come from a larger attention
    (the merged lse of a ring) as long as ``out`` is the matching merged output."""
    q, k, v, out, dout = _fit_int32_offsets(q, k, v, out, dout)
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    block_d = _block_d(head_dim)
    q_seg, k_seg, has_seg = _seg_args(segment_ids, kv_segment_ids, q)

    # Rows that attended nothing carry lse = -inf; any finite value gives them p = 0 (their scores are -inf).
    # The kernels work in log2 units.
    lse2 = torch.where(torch.isneginf(lse), 0.0, lse.float() * LOG2E).contiguous()
    delta = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    delta_block = 64 if block_d <= 128 else 32
    _bwd_delta_kernel[(triton.cdiv(seq_q, delta_block), batch * heads)](
        out, dout, delta, *out.stride(), *dout.stride(), heads, seq_q,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=delta_block,
    )

    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.empty(v.shape, dtype=torch.float32, device=q.device)
    common = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, HAS_SEG=has_seg,
        DOT_PRECISION=_dot_precision(q.dtype), **_launch_meta(),
    )
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(seq_k, meta["BLOCK_N"]), batch * kv_heads)](
        q, k, v, dout, lse2, delta, dk, dv, q_seg, k_seg,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        kv_heads, heads // kv_heads, seq_q, seq_k, q_offset, kv_offset, scale * LOG2E, scale,
        **common,
    )
    _bwd_dq_kernel[lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)](
        q, k, v, dout, lse2, delta, dq, q_seg, k_seg,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *dq.stride()[:3],
        heads, heads // kv_heads, seq_q, seq_k, q_offset, kv_offset, scale * LOG2E, scale,
        **common,
    )
    return dq, dk, dv


__all__ = ["triton_attention_forward", "triton_attention_backward"]
