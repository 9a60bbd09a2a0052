"""Independent references for attention tests: PyTorch SDPA with an explicit boolean mask.

Nothing here shares code with ringlwm: masks are built from their definition, probabilities come from
``torch.nn.functional.scaled_dot_product_attention`` pinned to its math backend (on CPU its default
would be the same fused flash kernel that ringlwm's CPU path calls), the log-sum-exp from
``torch.logsumexp``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def attention_mask(batch, seqlen_q, seqlen_k, *, causal=False, segment_ids=None, kv_segment_ids=None,
                   q_offset=0, kv_offset=0):
    """(batch, 1, seq_q, seq_k) bool: True where query i may attend key j."""
    mask = torch.ones(batch, 1, seqlen_q, seqlen_k, dtype=torch.bool)
    if causal:
        q_pos = torch.arange(seqlen_q) + q_offset
        k_pos = torch.arange(seqlen_k) + kv_offset
        mask &= (q_pos[:, None] >= k_pos[None, :])[None, None]
    if segment_ids is not None:
        mask &= (segment_ids.cpu()[:, :, None] == kv_segment_ids.cpu()[:, None, :])[:, None]
    return mask


def reference_attention(q, k, v, *, causal=False, scale=None, segment_ids=None, kv_segment_ids=None,
                        q_offset=0, kv_offset=0):
    """SDPA in the inputs' dtype (on CPU) with an explicit mask. Returns (out, lse float64).

    Rows that see no key: SDPA would give NaN; we give them out = 0, lse = -inf (the kernels' contract)
    by attending a dummy all-True row and zeroing it, which also zeroes their gradients.
    """
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    mask = attention_mask(batch, seqlen_q, seqlen_k, causal=causal, segment_ids=segment_ids,
                          kv_segment_ids=kv_segment_ids, q_offset=q_offset, kv_offset=kv_offset).to(q.device)
    alive = mask.any(dim=-1, keepdim=True)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~alive, scale=scale, enable_gqa=True)
    out = out * alive.to(out.dtype)
    group = heads // k.shape[1]
    scores = q.detach().double() @ k.detach().double().repeat_interleave(group, 1).transpose(-1, -2) * scale
    lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return out, lse


def max_err(a, b) -> float:
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def assert_within_baseline(name, got, ref64, baseline, floor):
    """flash-attention's rule: the kernel's error against fp64 is at most ~2x the error of plain PyTorch
    attention in the same dtype (``baseline``), plus a small absolute floor for near-exact cases."""
    err = max_err(got, ref64)
    base_err = max_err(baseline, ref64)
    tol = 2.0 * base_err + floor
    assert err <= tol, f"{name}: max error {err:.3e} > tolerance {tol:.3e} (PyTorch baseline {base_err:.3e})"
