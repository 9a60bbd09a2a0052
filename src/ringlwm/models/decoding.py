"""The decoding engine of every ringlwm model: a ring prefill, then one token at a time over a sharded KV cache.

    cache, hidden, positions = prefill(model, prompts, sp_group=group)      # the prompts over the ring
    hidden = decode_step(model, cache, tokens, vision=False, positions=positions)
    tokens = cached_decode(model, prompts, max_new_tokens=32, pick=..., sp_group=group)

Text generation (``ringlwm.generate``) and vision generation (``ringlwm.vision.generate``) both run on it.
Prompts of different lengths are left-padded to a multiple of 2 * world_size; padding has segment id -1
and is never attended, and each prompt's positions start at 0. Rank 0's choice of each token is broadcast,
so the ranks never disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from ringlwm.ring import shard_sequence, sp_world
from ringlwm.ring.decode import ShardedKVCache


def _group_src(group) -> int:
    return 0 if group is None else dist.get_global_rank(group, 0)


def pick_token(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """(batch, vocab) -> (batch,) next tokens; greedy when temperature == 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the first token past top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def _embed(model, ids: torch.Tensor, vision: torch.Tensor | None) -> torch.Tensor:
    """Input embeddings: a vision-language model picks its text or vision table per token; a text model has one."""
    if hasattr(model, "embed"):
        return model.embed(ids, vision)
    return model.model.embed_tokens(ids)


def head_logits(model, hidden: torch.Tensor, vision: bool = False) -> torch.Tensor:
    """(batch, hidden) -> logits of the vision head (vision=True) or the text head."""
    return (model.vision_head if vision else model.lm_head)(hidden)


@torch.no_grad()
def prefill(model, prompts: Sequence[Sequence[int]], vision_masks: Sequence[Sequence[bool]] | None = None, *,
            sp_group: dist.ProcessGroup | None = None) -> tuple[ShardedKVCache, torch.Tensor, torch.Tensor]:
    """Run the prompts over the ring, filling a ``ShardedKVCache``. prompts: token ids per row; vision_masks
    (vision-language models): per token, whether its id is a vision id. Returns (cache, hidden state of each
    prompt's last token (batch, hidden), the position of the next token per row); the same on every rank."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if vision_masks is not None and (len(prompts) != len(vision_masks)
                                     or any(len(p) != len(m) for p, m in zip(prompts, vision_masks))):
        raise ValueError("each prompt needs a vision mask of its length")
    _, world = sp_world(sp_group)
    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    chunks = 2 * world
    padded = -(-max(lengths) // chunks) * chunks
    batch = len(prompts)
    ids = torch.zeros(batch, padded, dtype=torch.long)
    vis = torch.zeros(batch, padded, dtype=torch.bool)
    pos = torch.zeros(batch, padded, dtype=torch.long)
    seg = torch.full((batch, padded), -1, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        n = len(prompt)
        ids[b, padded - n:] = torch.tensor(list(prompt), dtype=torch.long)
        if vision_masks is not None:
            vis[b, padded - n:] = torch.tensor(list(vision_masks[b]), dtype=torch.bool)
        pos[b, padded - n:] = torch.arange(n)
        seg[b, padded - n:] = 0
    ids, vis, pos, seg = (shard_sequence(t, dim=1, group=sp_group).to(device) for t in (ids, vis, pos, seg))
    cache = ShardedKVCache(model.config.num_hidden_layers, sp_group)
    cache.prefilling = True
    cache.set_prefill_segments(seg)
    hidden = model.model(inputs_embeds=_embed(model, ids, vis), position_ids=pos, segment_ids=seg,
                         sp_group=sp_group, ringlwm_cache=cache, use_cache=False).last_hidden_state
    cache.prefilling = False
    # The last position of the padded prompt is the end of chunk 2W-1, which rank 0 holds at the end.
    last = hidden[:, -1].contiguous()
    if world > 1:
        dist.broadcast(last, src=_group_src(sp_group), group=sp_group)
    return cache, last, torch.tensor(lengths, device=device)


@torch.no_grad()
def decode_step(model, cache: ShardedKVCache, tokens: torch.Tensor, vision: torch.Tensor | bool,
                positions: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (batch,) at ``positions`` (batch,); ``vision`` (bool or (batch,) bools) says
    which table embeds it. Returns the new last hidden states (batch, hidden)."""
    batch = tokens.shape[0]
    flag = torch.as_tensor(vision, dtype=torch.bool, device=tokens.device).expand(batch)
    cache.begin_token(batch, tokens.device)
    hidden = model.model(inputs_embeds=_embed(model, tokens[:, None], flag[:, None]),
                         position_ids=positions[:, None], sp_group=cache.group, ringlwm_cache=cache,
                         use_cache=False).last_hidden_state
    cache.end_token()
    return hidden[:, -1]


@torch.no_grad()
def cached_decode(model, prompts: Sequence[Sequence[int]], vision_masks: Sequence[Sequence[bool]] | None = None, *,
                  max_new_tokens: int, pick: Callable[[int, torch.Tensor], torch.Tensor],
                  is_vision: Callable[[int], bool] | None = None,
                  stop: Callable[[int, torch.Tensor], bool] | None = None,
                  sp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after each prompt: the engine of text and vision generation.

    Step i: ``is_vision(i)`` (None: always text) says whether new token i is vision (its head and, fed
    back, its embedding table); ``pick(i, logits)`` turns the head's logits (batch, vocab) into tokens
    (batch,) (called on every rank; rank 0's choice is broadcast, so the ranks never disagree);
    ``stop(i, tokens)`` ends after token i. Returns (batch, steps) tokens, the same on every rank."""
    _, world = sp_world(sp_group)
    limit = model.config.max_position_embeddings
    if prompts and max(len(p) for p in prompts) + max_new_tokens > limit:
        raise ValueError(f"prompt ({max(len(p) for p in prompts)} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's max_position_embeddings ({limit})")
    cache, hidden, positions = prefill(model, prompts, vision_masks, sp_group=sp_group)
    out = []
    for i in range(max_new_tokens):
        vision = bool(is_vision(i)) if is_vision is not None else False
        token = pick(i, head_logits(model, hidden, vision)).long().contiguous()
        if world > 1:
            dist.broadcast(token, src=_group_src(sp_group), group=sp_group)
        out.append(token)
        if (stop is not None and stop(i, token)) or i == max_new_tokens - 1:  # stop() sees every token
            break
        hidden = decode_step(model, cache, token, vision, positions)
        positions = positions + 1
    return torch.stack(out, dim=1)
