"""FlashAttention-2 style forward and backward kernels in Triton.

Layout of every tensor argument (any strides, except that head_dim must have unit stride: the launchers copy
a tensor that has not; other strides pass through):
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
q = dout = lse = delta = 0 there, p = exp2(0 - 0) = 1 and every product they enter is zero. When the
lengths are whole tiles (EVEN_M, EVEN_N: heuristics per launch) there are no tails and no bounds masks.

Registers. What decides whether a configuration spills (bench/compile.py measures it for sm_80 and sm_90):
the loop state is scalar (each step rebuilds its tile of pointers from a base pointer and the step's rows; a
tile of pointers carried through the loop costs two registers per element); each loop builds only the masks
it needs, as compile-time choices (the head_dim mask only when head_dim is not a power of two, bounds masks
only for partial tiles, the causal mask only on the steps that cross the diagonal); the unit stride along
head_dim lets every row load as 16-byte vectors that stream through shared memory (cp.async, num_stages
buffers). The dK/dV kernel keeps k, v and the two fp32 accumulators for a whole key block, so its key blocks
of 128 pair with 16-32 queries per step (8 warps; on sm_90 each warpgroup's wgmma covers 64 of the rows).
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


# Autotune lists. Per kernel, target family (80: A100-class, mma.sync and cp.async; 90: H100-class, warpgroup MMA)
# and BLOCK_D, the (BLOCK_M, BLOCK_N, num_warps, num_stages) configurations that the compile report
# (`make bench PART=compile`, bench/compile.py, bench/results/compile.csv) shows to compile for that target
# with no register spills, with tensor-core instructions and with the streamed loads pipelined (num_stages >= 2:
# cp.async into num_stages shared-memory buffers), for fp16 and bf16, causal with and without segment ids; chosen
# from a wider sweep (`python -m bench.compile --space candidates`). For fwd and dq, BLOCK_M is the queries of a
# program and BLOCK_N the keys of a step; for dkdv, BLOCK_N is the keys of a program and BLOCK_M the queries of a
# step. A fifth element False/True restricts an entry to calls without/with segment ids (the segment-id masks
# cost registers). tests/kernels/test_compile.py compiles these lists.
_TUNED = {
    ("fwd", 90, 64): [(128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3)],
    ("fwd", 90, 128): [(128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
    ("fwd", 90, 256): [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 3)],
    ("fwd", 80, 64): [(128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3)],
    ("fwd", 80, 128): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3)],
    ("fwd", 80, 256): [(128, 32, 8, 2, False), (64, 64, 8, 2), (64, 32, 4, 2)],
    ("dkdv", 90, 64): [(64, 128, 8, 2), (32, 128, 8, 3), (32, 64, 4, 3)],
    ("dkdv", 90, 128): [(32, 128, 8, 2, False), (32, 128, 8, 3, True), (16, 128, 8, 3), (32, 64, 8, 3)],
    ("dkdv", 90, 256): [(64, 32, 8, 2, False), (32, 32, 8, 2)],
    ("dkdv", 80, 64): [(32, 128, 8, 2), (32, 64, 4, 3), (32, 64, 8, 3)],
    ("dkdv", 80, 128): [(64, 64, 8, 2, False), (32, 64, 8, 3), (16, 128, 8, 2)],
    ("dkdv", 80, 256): [(32, 32, 8, 2)],
    ("dq", 90, 64): [(128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3)],
    ("dq", 90, 128): [(128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
    ("dq", 90, 256): [(64, 64, 4, 2), (64, 64, 8, 2, False), (128, 32, 8, 2)],
    ("dq", 80, 64): [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
    ("dq", 80, 128): [(128, 64, 8, 2), (64, 128, 8, 2), (128, 32, 8, 3)],
    ("dq", 80, 256): [(64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 3)],
}
# fp32 inputs run the dots in IEEE fp32 (no tensor cores): small tiles, for checking rather than speed (no spills
# on sm_80; `python -m bench.compile --dtype fp32` shows a few hundred bytes of stack for fwd on sm_90).
_FP32 = {
    "fwd": [(32, 32, 8, 2), (16, 32, 4, 2)],
    "dkdv": [(16, 32, 4, 2), (32, 32, 8, 2)],
    "dq": [(32, 32, 8, 2), (16, 32, 4, 2)],
}
KERNELS = ("fwd", "dkdv", "dq")


def _config(m, n, w, s):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def _config_key(c) -> tuple:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


def _target(capability: int) -> int:
    """The target family whose list a GPU uses: sm_90 and newer the sm_90 list, sm_8x the sm_80 one (the
    autotuner's prune drops what does not fit the device's shared memory, e.g. on sm_86/sm_89)."""
    return 90 if capability >= 90 else 80


def autotune_configs(kernel: str, capability: int, dtype: str, head_dim: int, has_seg: bool | None = None):
    """The autotune list of one kernel ("fwd", "dkdv", "dq") for a GPU of this compute capability (e.g. 90,
    86), dtype ("fp16", "bf16", "fp32"), head_dim and (if given) with or without segment ids."""
    if dtype == "fp32":
        return [_config(*e) for e in _FP32[kernel]]
    block_d = min(max(_block_d(head_dim), 64), 256)
    entries = _TUNED[(kernel, _target(capability), block_d)]
    return [_config(*e[:4]) for e in entries if len(e) == 4 or has_seg is None or e[4] == has_seg]


def _all_configs(kernel: str) -> list:
    """Every configuration any list of this kernel names: the autotuner's list, pruned per call."""
    keys = {e[:4] for (k, _, _), entries in _TUNED.items() if k == kernel for e in entries}
    keys |= set(_FP32[kernel])
    return [_config(*key) for key in sorted(keys)]


def _smem_bytes(kernel: str, config, block_d: int, elem: int) -> int:
    """Shared memory of a configuration as the compiler lays it out for sm_90 (about the most any target
    asks for): the tiles that stay for the whole program plus num_stages buffers of the streamed ones."""
    m, n, _, stages = _config_key(config)
    if kernel == "fwd":  # q resident; k, v streamed
        return (m + 2 * stages * n) * block_d * elem
    if kernel == "dq":  # q, do resident; k, v streamed
        return (2 * m + 2 * stages * n) * block_d * elem
    return (2 * n + 2 * stages * m) * block_d * elem + 8 * stages * m  # k, v resident; q, do, lse, delta streamed


# Shared memory per block of the GPUs the lists were compiled for (sm_80: A100, sm_90: H100): within these,
# every listed configuration fits (the compile report checks it); a GPU with less (sm_86, sm_89: 99 KiB) keeps
# only the configurations whose estimate fits.
_LISTED_SMEM = {80: 166912, 90: 232448}


def _select(kernel, configs, capability, dtype, head_dim, has_seg, block_d, elem, smem_limit):
    """The autotuner's prune, without the device queries: the listed configurations for this call."""
    wanted = {_config_key(c) for c in autotune_configs(kernel, capability, dtype, head_dim, has_seg)}
    listed = [c for c in configs if _config_key(c) in wanted] or list(configs)
    if smem_limit >= _LISTED_SMEM[_target(capability)]:
        return listed
    fits = [c for c in listed if _smem_bytes(kernel, c, block_d, elem) <= smem_limit]
    return fits or [min(listed, key=lambda c: _smem_bytes(kernel, c, block_d, elem))]


_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        major, minor = torch.cuda.get_device_capability(q.device)
        props = torch.cuda.get_device_properties(q.device)
        smem_limit = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
        return _select(kernel, configs, 10 * major + minor, _DTYPE_NAMES[q.dtype], kwargs["HEAD_DIM"],
                       bool(kwargs["HAS_SEG"]), kwargs["BLOCK_D"], q.element_size(), smem_limit)

    return prune


# What changes the best configuration: the lengths, the head dim, the masks (dtypes are added by Triton).
_AUTOTUNE_KEY = ["seq_q", "seq_k", "HEAD_DIM", "CAUSAL", "HAS_SEG"]


# Whether the sequences are whole tiles: then no load, store or score needs a bounds mask (constexpr flags,
# set per launch from the chosen configuration).
HEURISTICS = {
    "EVEN_M": lambda args: args["seq_q"] % args["BLOCK_M"] == 0,
    "EVEN_N": lambda args: args["seq_k"] % args["BLOCK_N"] == 0,
}


def _autotuned(kernel: str):
    """Autotune on a GPU over the kernel's lists (pruned to this GPU, dtype, head_dim and masks); under the
    interpreter the launcher passes fixed block sizes instead."""

    def wrap(fn):
        fn = triton.heuristics(HEURISTICS)(fn)
        if _INTERPRET:
            return fn
        return triton.autotune(configs=_all_configs(kernel), key=_AUTOTUNE_KEY,
                               prune_configs_by={"early_config_prune": _pruner(kernel)})(fn)

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


@_autotuned("fwd")
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
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        if CAUSAL_MASK:
            p_t = tl.where(q_offset + rows[None, :] >= k_pos[:, None], p_t, 0.0)
        if HAS_SEG:
            if ROW_MASK:
                q_seg = tl.load(QSeg + rows, mask=rows < seq_q, other=_NO_QUERY_SEGMENT)
            else:
                q_seg = tl.load(QSeg + rows)
            p_t = tl.where(k_seg[:, None] == q_seg[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@_autotuned("dkdv")
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


@_autotuned("dq")
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
