"""Attention on CPU tensors through PyTorch's fused flash kernel for CPU.

``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` computes blockwise attention in C++ with
fp32 accumulation and returns the log-sum-exp; its ``_backward`` recomputes the probabilities from a
given (out, lse), so it also serves one ring step with the merged statistics of the whole ring. Both
handle GQA natively (k/v with fewer heads) and accept any strides.

What we add on top: the masks (causal with position offsets, segment ids) as an additive float mask,
built only when is_causal alone cannot express them (documents on a diagonal block: is_causal plus a mask of
the documents, so the kernel still skips the key blocks above the diagonal); lse = -inf for rows whose keys are all masked
(the kernel returns out = 0 and lse = 0 for those); skipping blocks that nobody can see.

Packed documents, each one contiguous run of ids on both sides (what the packer makes), are computed one
document at a time ("documents" plan): a query run attends only to the key run of its own id, so each pair is
one small kernel call without a float mask (is_causal where it is the pair's causality), and the work falls
from seq_q x seq_k to the sum of the documents' squares (about 3x less at 1024 tokens of ~150-token
documents, fwd+bwd, head_dim 16). Ids that repeat in separate runs keep the float mask.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

_fwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _MaskPlan:
    """How to express one block's mask to the fused kernel.

    mode: "none" (every key visible), "causal" (the kernel's own is_causal), "mask" (additive float mask
    of shape (batch or 1, 1, seq_q, seq_k)), "causal_mask" (the kernel's is_causal, which skips the key
    blocks above the diagonal, plus a float mask of the documents), "documents" (``pieces``: one kernel call
    per document present on both sides; rows in no piece see nothing), or "empty" (no query sees any key).
    """

    __slots__ = ("mode", "float_mask", "dead_rows", "pieces")

    def __init__(self, mode, float_mask=None, dead_rows=None, pieces=None):
        self.mode = mode
        self.float_mask = float_mask
        self.dead_rows = dead_rows  # (batch or 1, 1, seq_q) bool: rows with no visible key, or None
        self.pieces = pieces  # "documents": [_Piece]


class _Piece:
    """One document of one batch row: ``queries`` and ``keys`` index (batch, heads, seq, d) tensors (one row, a
    run of positions); ``plan`` is this sub-block's own (no ids: "none", "causal" or "mask")."""

    __slots__ = ("queries", "keys", "plan")

    def __init__(self, queries, keys, plan):
        self.queries, self.keys, self.plan = queries, keys, plan


_PLAN_CACHE: OrderedDict = OrderedDict()
_PLAN_CACHE_SIZE = 8
_PLAN_CACHE_BYTES = 256 * 2**20  # masks kept in all; a larger one is rebuilt at each call


def _ids_key(ids: torch.Tensor) -> tuple:
    return (ids.untyped_storage().data_ptr(), ids.storage_offset(), tuple(ids.shape), ids.stride(), ids._version,
            ids.dtype, ids.device)


def _plan(q, k, causal, segment_ids, kv_segment_ids, q_offset, kv_offset) -> _MaskPlan:
    """The block's mask plan. With segment ids the float mask costs seq_q x seq_k work and memory; every layer
    of a model (and the backward) asks for the same one, so the last few are kept. The key holds the ids'
    memory, layout and version counter, and the entry holds the ids themselves (their memory cannot be
    reused by other ids while cached; an in-place change bumps the version)."""
    if segment_ids is None:
        return _build_plan(q, k, causal, segment_ids, kv_segment_ids, q_offset, kv_offset)
    key = (_ids_key(segment_ids), _ids_key(kv_segment_ids), causal, q_offset, kv_offset, q.shape[2], k.shape[2],
           q.dtype, q.device)
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        _PLAN_CACHE.move_to_end(key)
        return hit[0]
    plan = _build_plan(q, k, causal, segment_ids, kv_segment_ids, q_offset, kv_offset)
    size = lambda p: 0 if p.float_mask is None else p.float_mask.nbytes  # noqa: E731
    if size(plan) <= _PLAN_CACHE_BYTES // 2:
        _PLAN_CACHE[key] = (plan, segment_ids, kv_segment_ids)
        while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE or sum(size(v[0]) for v in _PLAN_CACHE.values()) > _PLAN_CACHE_BYTES:
            _PLAN_CACHE.popitem(last=False)
    return plan


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool visibility mask as the kernel's additive float mask (0 visible, -inf not)."""
    float_mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return float_mask.masked_fill_(~visible, float("-inf"))


def _build_plan(q, k, causal, segment_ids, kv_segment_ids, q_offset, kv_offset) -> _MaskPlan:
    seq_q, seq_k = q.shape[2], k.shape[2]
    causal_needed = causal and q_offset - kv_offset < seq_k - 1  # else every query sees every key
    aligned = q_offset == kv_offset and seq_q == seq_k  # the kernel's is_causal is this block's causality
    if causal and q_offset + seq_q - 1 < kv_offset:
        return _MaskPlan("empty")
    if segment_ids is not None and bool((segment_ids == segment_ids[:, :1]).all()) and bool(
            (kv_segment_ids == segment_ids[:, :1]).all()):
        segment_ids = kv_segment_ids = None  # one document on both sides: the ids change nothing
    if segment_ids is None:
        if not causal_needed:
            return _MaskPlan("none")
        if aligned:
            return _MaskPlan("causal")
    else:
        pieces = _document_pieces(q, k, causal, segment_ids, kv_segment_ids, q_offset, kv_offset)
        if pieces is not None:
            return _MaskPlan("empty") if not pieces else _MaskPlan("documents", pieces=pieces)
    same = None if segment_ids is None else (segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
    if causal_needed and same is not None and aligned:
        # The kernel's own causal mask skips the key blocks above the diagonal (half the work); the float mask
        # only separates documents. With the same ids on both sides every row sees itself; otherwise a row
        # may see nothing.
        dead = None
        if not torch.equal(segment_ids, kv_segment_ids):
            dead = ~(same & torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril()).any(dim=-1)
            dead = dead if bool(dead.any()) else None
        return _MaskPlan("causal_mask", _additive(same, q.dtype), dead)
    visible = same
    if causal_needed:
        q_pos = torch.arange(seq_q, device=q.device) + q_offset
        k_pos = torch.arange(seq_k, device=q.device) + kv_offset
        causal_visible = (q_pos[:, None] >= k_pos[None, :])[None, None]
        visible = causal_visible if visible is None else visible & causal_visible
    dead = ~visible.any(dim=-1)
    return _MaskPlan("mask", _additive(visible, q.dtype), dead if bool(dead.any()) else None)


def _runs(ids: list[int]) -> dict[int, tuple[int, int]] | None:
    """{id: (start, end)} when each id is one contiguous run, else None."""
    runs: dict[int, tuple[int, int]] = {}
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            if ids[start] in runs:
                return None
            runs[ids[start]] = (start, i)
            start = i
    return runs


def _document_pieces(q, k, causal, segment_ids, kv_segment_ids, q_offset, kv_offset) -> list[_Piece] | None:
    """The "documents" plan's pieces, or None when some id is not one contiguous run (then the float mask). Each
    piece is a block of one document, planned like any block without ids."""
    pieces = []
    for row, (q_ids, kv_ids) in enumerate(zip(segment_ids.tolist(), kv_segment_ids.tolist())):
        q_runs, kv_runs = _runs(q_ids), _runs(kv_ids)
        if q_runs is None or kv_runs is None:
            return None
        for doc, q_run in q_runs.items():
            if doc not in kv_runs:
                continue  # no key of this document here: its rows see nothing
            k_run = kv_runs[doc]
            queries = (slice(row, row + 1), slice(None), slice(*q_run))
            keys = (slice(row, row + 1), slice(None), slice(*k_run))
            plan = _build_plan(q[queries], k[keys], causal, None, None, q_offset + q_run[0], kv_offset + k_run[0])
            if plan.mode != "empty":
                pieces.append(_Piece(queries, keys, plan))
    return pieces


def _call_forward(plan, q, k, v, scale, stat_dtype):
    """(out, lse) of a block whose plan calls the kernel once (every mode but "empty" and "documents")."""
    out, lse = _fwd_op(q, k, v, 0.0, plan.mode in ("causal", "causal_mask"), attn_mask=plan.float_mask, scale=scale)
    lse = lse.to(stat_dtype)
    if plan.dead_rows is not None:
        dead = plan.dead_rows.expand(lse.shape)
        lse = lse.masked_fill(dead, float("-inf"))
        out = out.masked_fill(dead[..., None], 0.0)
    return out, lse


def _call_backward(plan, dout, q, k, v, out, lse, scale):
    """(dq, dk, dv) of such a block; inputs already in the gradients' dtype, lse finite."""
    mask = None if plan.float_mask is None else plan.float_mask.to(q.dtype)
    return _bwd_op(dout, q, k, v, out, lse, 0.0, plan.mode in ("causal", "causal_mask"), attn_mask=mask, scale=scale)


def cpu_attention_forward(
    q, k, v, *, causal, scale, segment_ids=None, kv_segment_ids=None, q_offset=0, kv_offset=0
):
    """Returns (out like q, lse (batch, heads, seq_q) float32 (float64 for float64 inputs)).
    Arguments are already validated."""
    stat_dtype = torch.promote_types(q.dtype, torch.float32)
    plan = _plan(q, k, causal, segment_ids, kv_segment_ids, q_offset, kv_offset)
    if plan.mode == "empty":
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        return out, torch.full(q.shape[:3], float("-inf"), dtype=stat_dtype, device=q.device)
    if plan.mode != "documents":
        return _call_forward(plan, q, k, v, scale, stat_dtype)
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=stat_dtype, device=q.device)
    for p in plan.pieces:
        out[p.queries], lse[p.queries] = _call_forward(p.plan, q[p.queries], k[p.keys], v[p.keys], scale, stat_dtype)
    return out, lse


def cpu_attention_backward(
    dout, q, k, v, out, lse, *, causal, scale, segment_ids=None, kv_segment_ids=None, q_offset=0, kv_offset=0
):
    """Returns (dq, dk, dv) shaped like q, k, v, in float32 (float64 for float64 inputs).

    fp16/bf16 inputs are upcast to fp32 first, so that a ring can sum per-step gradients without
    rounding each one to 16 bits.
    """
    grad_dtype = torch.promote_types(q.dtype, torch.float32)
    plan = _plan(q, k, causal, segment_ids, kv_segment_ids, q_offset, kv_offset)
    if plan.mode == "empty":
        return tuple(torch.zeros(t.shape, dtype=grad_dtype, device=t.device) for t in (q, k, v))
    dout, q, k, v, out = (t.to(grad_dtype) for t in (dout, q, k, v, out))
    # Rows that attended nothing carry lse = -inf; their scores are all -inf too, so any finite lse
    # gives them zero probabilities (and no NaN from -inf - -inf).
    lse = torch.where(torch.isneginf(lse), 0.0, lse).to(grad_dtype)
    if plan.mode != "documents":
        return _call_backward(plan, dout, q, k, v, out, lse, scale)
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    for p in plan.pieces:
        dq[p.queries], dk[p.keys], dv[p.keys] = _call_backward(
            p.plan, dout[p.queries], q[p.queries], k[p.keys], v[p.keys], out[p.queries], lse[p.queries], scale)
    return dq, dk, dv
