"""Decoding against a KV cache that stays sharded across the ranks of the sequence-parallel group.

Each rank keeps, for every layer, the keys and values of the tokens it owns: its zigzag shard of the
prompt (from the ring prefill) and every W-th generated token (round-robin). A new query attends each
rank's shard locally, giving a partial (out, lse) per rank; the exact result is the log-sum-exp merge of
all partials, computed with two all-reduces:

    m   = max_r lse_r                                  (all_reduce MAX)
    num = sum_r exp(lse_r - m) * out_r,  den = sum_r exp(lse_r - m)    (one all_reduce SUM)
    out = num / den

No rank ever holds the whole cache. Rows whose keys are all masked contribute exp(-inf) = 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ringlwm.kernels import block_attention_forward
from ringlwm.ring.layout import sp_world


class ShardedKVCache:
    """Per-layer keys/values of the tokens this rank owns. k, v: (batch, kv_heads, tokens, head_dim);
    ``segment_ids`` (batch, tokens) marks padding (-1) so that it is never attended."""

    def __init__(self, num_layers: int, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank, self.world_size = sp_world(group)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.segment_ids: torch.Tensor | None = None
        self.num_generated = 0
        self.prefilling = False

    def set_prefill_segments(self, segment_ids: torch.Tensor) -> None:
        self.segment_ids = segment_ids

    def owner_of_next(self) -> int:
        return self.num_generated % self.world_size

    def store_prefill(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self.keys[layer], self.values[layer] = key, value

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Add the new token's K/V on its owner rank only."""
        if self.rank != self.owner_of_next():
            return
        self.keys[layer] = torch.cat([self.keys[layer], key], dim=2)
        self.values[layer] = torch.cat([self.values[layer], value], dim=2)

    def begin_token(self, batch: int, device) -> None:
        """Before the layers of a decoding step append: the owner's segment ids grow by the new token."""
        if self.rank == self.owner_of_next():
            fresh = torch.zeros(batch, 1, dtype=self.segment_ids.dtype, device=device)
            self.segment_ids = torch.cat([self.segment_ids, fresh], dim=1)

    def end_token(self) -> None:
        self.num_generated += 1


def sharded_decode_attention(query: torch.Tensor, cache: ShardedKVCache, layer: int, *, scale: float,
                             backend: str | None = None) -> torch.Tensor:
    """Attention of new queries (batch, heads, q, head_dim) over the whole sharded cache of ``layer``.

    The queries are the last tokens of the sequence, so every cached key is visible (no causal mask);
    padding is masked by segment ids (real tokens have id 0, padding -1). Returns (batch, heads, q,
    head_dim) in the query's dtype, identical on every rank.
    """
    keys, values = cache.keys[layer], cache.values[layer]
    batch, heads, q_len, head_dim = query.shape
    if keys is None or keys.shape[2] == 0:
        out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
        lse = torch.full((batch, heads, q_len), float("-inf"), device=query.device)
    else:
        q_seg = torch.zeros(batch, q_len, dtype=cache.segment_ids.dtype, device=query.device)
        out, lse = block_attention_forward(query, keys, values, causal=False, scale=scale, segment_ids=q_seg,
                                           kv_segment_ids=cache.segment_ids, backend=backend)
        out, lse = out.float(), lse.float()
    if cache.world_size > 1:
        peak = lse.clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=cache.group)
        peak = torch.where(torch.isneginf(peak), 0.0, peak)
        weight = torch.exp(lse - peak)
        packed = torch.cat([out * weight.unsqueeze(-1), weight.unsqueeze(-1)], dim=-1)
        dist.all_reduce(packed, group=cache.group)
        numerator, denominator = packed[..., :-1], packed[..., -1:]
        out = numerator / torch.clamp(denominator, min=torch.finfo(torch.float32).tiny)
    return out.to(query.dtype)
