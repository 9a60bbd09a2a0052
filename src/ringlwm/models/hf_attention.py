"""The ring as a Hugging Face attention: what transformers' attention interface calls for
``attn_implementation="ringlwm_ring"``, for ``RingLlamaForCausalLM`` and for transformers' own models put on the
ring (``enable_ring``) alike.

    ATTN_IMPLEMENTATION     the name, registered with AttentionInterface and AttentionMaskInterface at import
    _ring_attention_forward the attention function (documents, padding, KV-cache decoding, autocast)
    check_ring_call         the decoder's forward pre-hook: the checks of a ring forward at sp > 1
    SharedGroup, bind_group, bound_group, local_group: which ranks a module's ring runs over

Registering changes nothing in transformers' own modules: a model uses the ring only when its config names it.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.distributed as dist
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ringlwm.constants import PAD_SEGMENT
from ringlwm.kernels import blockwise_attention
from ringlwm.models.loss import can_read_values
from ringlwm.ring import ring_attention, sp_world
from ringlwm.ring.agreement import FINGERPRINT_KEY, any_rank, check_batch_agreement
from ringlwm.ring.attention import autocast_dtype
from ringlwm.ring.decode import sharded_decode_attention
from ringlwm.ring.layout import ring_world, ulysses_world
from ringlwm.ring.ulysses import check_ulysses_heads, sequence_group

ATTN_IMPLEMENTATION = "ringlwm_ring"

# ringlwm_options: on a RingLlamaForCausalLM's config (left out of its saved config.json), on the attention
# modules of a transformers model put on the ring.
DEFAULT_OPTIONS = {
    "loss_chunk_size": 4096,  # tokens per chunk of the blockwise cross-entropy
    "mlp_chunk_size": None,  # tokens per chunk of the blockwise feed-forward (None: whole sequence)
    "norm_chunk_size": None,  # tokens per chunk of the RMSNorms, each recomputed in the backward (None: whole)
    "activation_checkpointing": False,  # recompute each decoder layer in the backward
    "activation_offloading": False,  # with checkpointing: keep the layer inputs in host memory (models/offload.py)
    "offload_prefetch": True,  # offloading: load the next layer's input during this one's backward
    "attention_backend": None,  # block kernel for the ring ("auto", "torch_flash", "triton", "cpu", ...; None: by device)
    "attention_head_chunks": None,  # run a layer's attention for heads / N at a time (None: all heads at once)
    "ulysses_recompute": False,  # Ulysses: keep Q, K, V in the heads layout, redo their all-to-alls in the backward
}


class RingPaddingMask:
    """What the ring's mask-interface function hands to its attention function in place of a dense mask: the
    2-D padding mask (batch, kv_len) of bool, True on real tokens. The attention turns it into segment ids
    (padding attends only padding, and no real token attends padding), so it is honoured, never dropped."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask


def padding_segment_ids(attention_mask: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """Segment ids that express a 2-D padding mask (batch, len) of 0/1 or bool: ``segment_ids`` (0 when None)
    on real tokens, PAD_SEGMENT on padding. No host sync."""
    keep = attention_mask.bool()
    base = torch.zeros(keep.shape, dtype=torch.long, device=keep.device) if segment_ids is None else segment_ids
    return torch.where(keep, base, PAD_SEGMENT)


def check_padding_mask(attention_mask: torch.Tensor | None, x: torch.Tensor | None) -> None:
    """A model's ``attention_mask`` must be a 2-D padding mask over its inputs x (batch, local_len, ...)."""
    if attention_mask is None or x is None:
        return
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"attention_mask must be a 2-D padding mask of the inputs' shape (batch, local_len) = "
                         f"{tuple(x.shape[:2])}, got {tuple(attention_mask.shape)}; ring attention cannot honour "
                         "a dense (4-D) mask: express packed documents with segment_ids")


def packed_segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Documents from positions that restart, as transformers reads packed (padding-free) batches: a new
    segment wherever a position is not its predecessor + 1. position_ids: (batch, len) of one process."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def _check_window(sliding_window, module, seq_len: int) -> None:
    """A sliding window shorter than the sequence would need windowed attention, which the ring's kernels do
    not have: refuse instead of silently attending the whole causal context."""
    if sliding_window is not None and int(sliding_window) < seq_len:
        raise ValueError(
            f"layer {getattr(module, 'layer_idx', '?')} of {type(module).__name__} uses a sliding window of "
            f"{int(sliding_window)} tokens, shorter than this sequence ({seq_len} tokens); ring attention has no "
            f"windowed kernel, so it would attend the whole causal context. Use sequences of at most "
            f"{int(sliding_window)} tokens, or set config.sliding_window = None (Qwen: use_sliding_window=False) "
            "to train with full attention on purpose"
        )


_UNSET = object()


class SharedGroup:
    """The sequence-parallel groups a module is bound to (``enable_ring``): the ring's ``group`` and, for the
    2-D layout, the ``ulysses`` group (None: none). Deep copies of the module share them: a ProcessGroup cannot
    be copied, and a copy of a model (``copy.deepcopy``) runs on the same ranks."""

    __slots__ = ("group", "ulysses")

    def __init__(self, group: dist.ProcessGroup | None, ulysses: dist.ProcessGroup | None = None):
        self.group, self.ulysses = group, ulysses

    @property
    def sequence(self) -> dist.ProcessGroup | None:
        """Every rank that holds the sequence (ring x Ulysses): losses and checks reduce over it."""
        return sequence_group(self.group, self.ulysses)

    def __deepcopy__(self, memo):
        return self


def bind_group(module: torch.nn.Module, group: dist.ProcessGroup | None,
               ulysses_group: dist.ProcessGroup | None = None) -> None:
    """Bind ``module`` to ``group`` (None: one process, or the world) and ``ulysses_group`` (None: none)."""
    module.ringlwm_group = SharedGroup(group, ulysses_group)


def bound_group(module: torch.nn.Module, default=None):
    """The ring group ``bind_group`` bound ``module`` to, else ``default``."""
    holder = getattr(module, "ringlwm_group", None)
    return default if holder is None else holder.group


def bound_ulysses(module: torch.nn.Module):
    """The Ulysses group ``bind_group`` bound ``module`` to (None: none)."""
    holder = getattr(module, "ringlwm_group", None)
    return None if holder is None else holder.ulysses


_LOCAL_GROUPS: dict[int, dist.ProcessGroup] = {}


def local_group() -> dist.ProcessGroup | None:
    """A group of this rank alone (None without torch.distributed): attention on it is one process's. Made
    without the other ranks (``use_local_synchronization``), once per rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    rank = dist.get_rank()
    if rank not in _LOCAL_GROUPS:
        _LOCAL_GROUPS[rank] = dist.new_group([rank], use_local_synchronization=True)
    return _LOCAL_GROUPS[rank]


def _resolve_sp_group(module, sp_group):
    """The call's group (a ring model always passes one; None: the world), else the one ``enable_ring`` put
    on the module. A plain transformers model in a world of several processes must say which ranks share a
    sequence: data-parallel ranks hold different sequences, and treating the world as one would silently
    attend them as one."""
    if sp_group is not _UNSET:
        return sp_group
    if hasattr(module, "ringlwm_group"):
        return bound_group(module)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} in a world of {dist.get_world_size()} processes without "
            "a sequence-parallel group: call ringlwm.models.enable_ring(model, sp_group=group) (or "
            "ringlwm.hf.setup_sequence_parallel) to say which ranks share a sequence"
        )
    return None


def generation_refused(world_size: int) -> ValueError:
    """The error for a KV-cache (generation) forward on a ring of several ranks: raised at once, on the rank
    that calls, instead of waiting for ranks that are not in this forward."""
    return ValueError(
        f"a KV-cache forward (generate, use_cache=True or past_key_values) on a model on a ring of {world_size} "
        "ranks: the ring would wait for the other ranks of its group, which are not in this call. To generate on "
        "one process call ringlwm.models.disable_ring(model) first (or `with disable_ring(model): ...`); for "
        "sequence-parallel decoding on every rank use ringlwm.generate"
    )


@functools.cache
def _forward_signature(cls) -> inspect.Signature:
    """The signature of a decoder class's forward (one per class, not one per call)."""
    return inspect.signature(cls.forward)


def check_ring_call(decoder: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a transformers decoder on the ring: the checks ``RingLlamaForCausalLM`` makes, once
    per forward and before any collective (see ``enable_ring``)."""
    fingerprint = kwargs.pop(FINGERPRINT_KEY, None)
    if "ringlwm_cache" in kwargs or "ring_plans" in kwargs:
        return args, kwargs  # ringlwm.generate's sharded decoding, or a ringlwm model's forward (checked there)
    group = sequence_group(kwargs.get("sp_group", bound_group(decoder)),
                           kwargs.get("ulysses_group", bound_ulysses(decoder)))
    _, world_size = sp_world(group)
    if world_size == 1:
        return args, kwargs
    bound = dict(_forward_signature(type(decoder)).bind_partial(*args, **kwargs).arguments)
    bound.update(bound.pop("kwargs", None) or {})  # what a **kwargs parameter took
    if bound.get("past_key_values") is not None or bound.get("cache") is not None or bound.get("use_cache"):
        raise generation_refused(world_size)
    if bound.get("position_ids") is None:
        raise ValueError(f"{type(decoder).__name__} on a ring of {world_size} ranks was called without "
                         "position_ids: each rank holds a zigzag shard, whose global positions it cannot guess. Pass "
                         "position_ids (and segment_ids, shift_labels), sharded like input_ids: ringlwm.hf.RingCollator "
                         "makes them")
    if fingerprint is None and bound.get("segment_ids") is None and bound.get("shift_labels") is None:
        raise ValueError(f"{type(decoder).__name__} on a ring of {world_size} ranks got a batch with no ringlwm "
                         "sharding (no segment_ids, shift_labels or sequence_fingerprint): a usual Hugging Face "
                         "collator gives every rank the whole batch, which the ring would attend as one longer "
                         "sequence. Use ringlwm.hf.RingCollator (a sequence sharded by hand passes its segment_ids, "
                         "zeros for one document)")
    if "use_cache" not in bound:
        kwargs["use_cache"] = False  # no KV cache built in a training forward
    if fingerprint is not None:
        check_batch_agreement(fingerprint, group)
    return args, kwargs


def _as_sdpa_under_autocast(attention):
    """Mixed precision (fp32 weights, autocast): the attention function gets q, k and v in the autocast dtype,
    as autocast gives scaled_dot_product_attention its inputs (RoPE leaves q and k in fp32 while v comes from
    a 16-bit matmul), and runs with autocast off: the kernels accumulate in fp32 themselves."""

    @functools.wraps(attention)
    def wrapper(module, query, key, value, *args, **kwargs):
        dtype = autocast_dtype(query.device.type)
        if dtype is None:
            return attention(module, query, key, value, *args, **kwargs)
        with torch.autocast(query.device.type, enabled=False):
            return attention(module, query.to(dtype), key.to(dtype), value.to(dtype), *args, **kwargs)

    return wrapper


@_as_sdpa_under_autocast
def _ring_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            segment_ids=None, sp_group=_UNSET, ringlwm_cache=None, position_ids=None,
                            sliding_window=None, ring_plans=None, ulysses_group=_UNSET, **_kwargs):
    """transformers attention-interface function. query: (batch, heads, local_len, head_dim); key/value:
    (batch, kv_heads, kv_seq, head_dim). Returns ((batch, local_len, heads, head_dim), None).

    Documents and padding: ``segment_ids`` (batch, local_len) when given; a 2-D padding mask arrives as a
    ``RingPaddingMask`` (from the mask-interface function) and becomes segment ids; on one process, positions
    that restart without segment ids or mask mark packed documents, as in transformers' own attention.
    ``sp_group``: the call's, else the one ``enable_ring`` put on the module (``ringlwm_sp_group``); a
    plain model in a world of several processes without either is refused.

    With ``ringlwm_cache`` (a ShardedKVCache, from ringlwm.generate): during the prefill each rank keeps its
    shard of the keys/values; during decoding the new token's K/V goes to its owner rank and the query
    attends the sharded cache (exact log-sum-exp merge across ranks)."""
    if dropout:
        raise ValueError("ring attention has no attention dropout; set config.attention_dropout = 0")
    padding = None
    if isinstance(attention_mask, RingPaddingMask):
        padding = attention_mask.mask
    elif attention_mask is not None:
        raise ValueError(
            "ring attention cannot honour a dense (4-D) attention mask; give a 2-D padding mask (batch, len) or "
            "segment_ids (batch, local_len) for packed documents"
        )
    sp_group = _resolve_sp_group(module, sp_group)
    ulysses_group = bound_ulysses(module) if ulysses_group is _UNSET else ulysses_group
    if ringlwm_cache is not None:
        ulysses_group = None  # sharded-KV decoding runs on the ring alone
    options = getattr(module, "ringlwm_options", None) or getattr(module.config, "ringlwm_options", None) or {}
    backend = options.get("attention_backend")
    _, world_size = ring_world(sp_group, ulysses_group)
    u_rank, ulysses = ulysses_world(ulysses_group)
    if ringlwm_cache is not None and not ringlwm_cache.prefilling:
        ringlwm_cache.append(module.layer_idx, key, value)
        out = sharded_decode_attention(query, ringlwm_cache, module.layer_idx, scale=scaling, backend=backend)
        return out.transpose(1, 2), None
    if ringlwm_cache is not None:
        ringlwm_cache.store_prefill(module.layer_idx, key, value)
    if key.shape[2] != query.shape[2]:
        # Decoding against a KV cache (single process): the new queries sit at the end of the keys.
        if world_size * ulysses > 1:
            raise ValueError("a KV cache with sequence parallelism goes through ringlwm.generate, not forward")
        if padding is not None and not bool(padding.all()):
            raise ValueError("ring attention decodes against a KV cache without padding; pass prompts of one "
                             "length (an attention_mask of ones) or drop the cache")
        _check_window(sliding_window, module, key.shape[2])
        out = blockwise_attention(query, key, value, causal=True, scale=scaling, q_offset=key.shape[2] - query.shape[2],
                                  backend=backend)
        return out.transpose(1, 2), None
    local_len = query.shape[2]
    _check_window(sliding_window, module, local_len * world_size * ulysses)
    if padding is not None:
        if tuple(padding.shape) != (query.shape[0], local_len):
            raise ValueError(f"attention_mask must be this rank's (batch, local_len) = {(query.shape[0], local_len)} "
                             f"padding mask, got shape {tuple(padding.shape)}")
        segment_ids = padding_segment_ids(padding, segment_ids)
    elif segment_ids is None and position_ids is not None:
        positions = position_ids.expand(query.shape[0], -1) if position_ids.shape[0] == 1 else position_ids
        if world_size * ulysses == 1:
            segment_ids = packed_segment_ids(positions)
            # One document (no restart): plain causal attention. On CPU, where reading the ids costs no sync,
            # this spares the fused CPU kernel the dense (len x len) mask that segment ids make it build.
            if query.device.type == "cpu" and can_read_values(segment_ids) and not bool(segment_ids.any()):
                segment_ids = None
        elif getattr(module, "layer_idx", 0) == 0:  # one check per forward, not one per layer
            # Agreed over the sequence group: a rank whose own part has no restart raises too.
            if any_rank(_restarts(positions, world_size, u_rank, ulysses), sequence_group(sp_group, ulysses_group)):
                raise ValueError("position_ids restart inside this rank's shard (packed documents) but no "
                                 "segment_ids were given; with sequence parallelism pass segment_ids (batch, "
                                 "local_len), sharded like the positions (ringlwm.hf.RingCollator makes both)")
    outs = [ring_attention(q, k, v, causal=True, segment_ids=segment_ids, scale=scaling, group=sp_group,
                           ulysses_group=ulysses_group, backend=backend, plan_cache=ring_plans,
                           ulysses_recompute=bool(options.get("ulysses_recompute")))
            for q, k, v in head_chunks(query, key, value, options.get("attention_head_chunks"))]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out.transpose(1, 2), None


def head_chunks(query, key, value, chunks: int | None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(q, k, v) per group of heads, for attention run one group at a time (``attention_head_chunks``): the
    ring's fp32 accumulators, receive buffers and gradient blocks then exist for heads / chunks of the heads
    at once; the projections stay whole. Each group's K/V heads are its query heads' (GQA); several groups
    may share one K/V head (its gradient is the sum over them, exact). Heads are independent, so the result
    is the one of all heads at once."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if not chunks or chunks == 1:
        return [(query, key, value)]
    chunk_heads(heads, kv_heads, chunks)
    step, group = heads // chunks, heads // kv_heads
    parts = []
    for h in range(0, heads, step):
        kv = slice(h // group, max((h + step) // group, h // group + 1))
        parts.append((query[:, h:h + step], key[:, kv], value[:, kv]))
    return parts


def chunk_heads(heads: int, kv_heads: int, chunks: int | None) -> tuple[int, int]:
    """(attention heads, key/value heads) of one group of ``attention_head_chunks``; raises ValueError naming
    the values that split these heads into equal groups."""
    if not chunks or chunks == 1:
        return heads, kv_heads
    if heads % chunks or (kv_heads % chunks and chunks % kv_heads):
        valid = [c for c in range(1, heads + 1) if heads % c == 0 and (kv_heads % c == 0 or c % kv_heads == 0)]
        raise ValueError(f"attention_head_chunks = {chunks} does not split {heads} attention heads and {kv_heads} "
                         f"key/value heads into equal groups; values that do: {valid}")
    return heads // chunks, max(kv_heads // chunks, 1)


def check_attention_heads(heads: int, kv_heads: int, chunks: int | None, ulysses: int) -> None:
    """Whether ``attention_head_chunks`` and the Ulysses degree fit these heads together: the chunks split
    the heads first, then each group's heads are scattered over the Ulysses ranks. Raises ValueError naming
    what works."""
    group_heads, group_kv = chunk_heads(heads, kv_heads, chunks)
    try:
        check_ulysses_heads(group_heads, group_kv, ulysses)
    except ValueError as exc:
        if group_heads == heads:
            raise
        fits = [c for c in range(1, heads + 1) if heads % c == 0 and (kv_heads % c == 0 or c % kv_heads == 0)
                and _ulysses_fits(*chunk_heads(heads, kv_heads, c), ulysses)]
        raise ValueError(f"attention_head_chunks = {chunks} leaves {group_heads} attention heads and {group_kv} "
                         f"key/value heads per group, which ulysses = {ulysses} cannot scatter ({exc}); "
                         f"attention_head_chunks that fit ulysses = {ulysses}: {fits}") from None


def _ulysses_fits(heads: int, kv_heads: int, ulysses: int) -> bool:
    try:
        check_ulysses_heads(heads, kv_heads, ulysses)
    except ValueError:
        return False
    return True


def _restarts(positions: torch.Tensor, ring: int, u_rank: int, ulysses: int) -> bool:
    """Whether positions (batch, local_len) restart inside this rank's part of the sequence: a step other than
    +1 anywhere but where its two zigzag chunks meet (ring of several ranks; with Ulysses, where this rank's
    piece of the ring shard crosses the middle of that shard, if it does)."""
    steps = torch.diff(positions, dim=-1) != 1
    if ring > 1:
        n = positions.shape[-1]
        middle = n * ulysses // 2 - u_rank * n  # the shard's second chunk starts at this local index
        if 0 < middle < n:
            steps[:, middle - 1] = False
    return bool(steps.any())


def _ring_mask(*_args, attention_mask=None, **_kwargs):
    """The ring never takes a dense mask: causality comes from positions, documents from segment ids. A 2-D
    padding mask is handed on (as a ``RingPaddingMask``) for the attention to turn into segment ids."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError("ring attention takes a 2-D padding mask (batch, len) or segment_ids, got an "
                         f"attention_mask of shape {tuple(attention_mask.shape)}")
    return RingPaddingMask(attention_mask)


AttentionInterface.register(ATTN_IMPLEMENTATION, _ring_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _ring_mask)
