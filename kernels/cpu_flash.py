"""Attention on CPU tensors through PyTorch's fused flash kernel for CPU.

``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` computes blockwise attention in C++ with
fp32 accumulation and returns the log-sum-exp; its ``_backward`` recomputes the probabilities from a
given (out, lse), so it also serves one ring step with the merged statistics of the whole ring. Both
handle GQA natively (k/v with fewer heads) and accept any strides.

What we add on top: the masks (causal with position offsets, segment ids) as an additive float mask,
built only when is_causal alone cannot express them; lse = -inf for rows whose keys are all masked
(the kernel returns out = 0 and lse = 0 for those); skipping blocks that nobody can see.
"""

from __future__ import annotations

import torch

_fwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _MaskPlan:
    """How to express one block's mask to the fused kernel.

    mode: "none" (every key visible), "causal" (the kernel's own is_causal), "mask" (additive float mask
    of shape (batch or 1, 1, seq_q, seq_k)), or "empty" (no query sees any key).
    """

    __slots__ = ("mode", "float_mask", "dead_rows")

    def __init__(self, mode, float_mask=None, dead_rows=None):
        self.mode = mode
        self.float_mask = float_mask
        self.dead_rows = dead_rows  # (batch or 1, 1, seq_q) bool: rows with no visible key, or None


def _plan(q, k, causal, segment_ids, kv_segment_ids, q_offset, kv_offset) -> _MaskPlan:
    seq_q, seq_k = q.shape[2], k.shape[2]
    causal_needed = causal and q_offset - kv_offset < seq_k - 1  # else every query sees every key
    if causal and q_offset + seq_q - 1 < kv_offset:
        return _MaskPlan("empty")
    if segment_ids is None:
        if not causal_needed:
            return _MaskPlan("none")
        if q_offset == kv_offset and seq_q == seq_k:
            return _MaskPlan("causal")
    visible = None
    if causal_needed:
        q_pos = torch.arange(seq_q, device=q.device) + q_offset
        k_pos = torch.arange(seq_k, device=q.device) + kv_offset
        visible = (q_pos[:, None] >= k_pos[None, :])[None, None]
    if segment_ids is not None:
        same = (segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
        visible = same if visible is None else visible & same
    float_mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
    float_mask.masked_fill_(~visible, float("-inf"))
    dead = ~visible.any(dim=-1)
    return _MaskPlan("mask", float_mask, dead if bool(dead.any()) else None)


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
    out, lse = _fwd_op(q, k, v, 0.0, plan.mode == "causal", attn_mask=plan.float_mask, scale=scale)
    lse = lse.to(stat_dtype)
    if plan.dead_rows is not None:
        dead = plan.dead_rows.expand(lse.shape)
        lse = lse.masked_fill(dead, float("-inf"))
        out = out.masked_fill(dead[..., None], 0.0)
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
    mask = None if plan.float_mask is None else plan.float_mask.to(grad_dtype)
    # Rows that attended nothing carry lse = -inf; their scores are all -inf too, so any finite lse
    # gives them zero probabilities (and no NaN from -inf - -inf).
    lse = torch.where(torch.isneginf(lse), 0.0, lse).to(grad_dtype)
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, 0.0, plan.mode == "causal", attn_mask=mask, scale=scale)
    return dq, dk, dv
