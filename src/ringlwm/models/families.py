"""Ring attention for Hugging Face decoder models of several families, without a ringlwm model class.

    model = AutoModelForCausalLM.from_pretrained("path/to/qwen3")      # a local Llama 2/3, Mistral, Qwen2/3 dir
    enable_ring(model, sp_group=group)                                  # attention over the ring, in place
    out = model(input_ids=ids, position_ids=pos, segment_ids=seg, labels=..., shift_labels=targets)

Every family whose attention goes through transformers' attention interface takes the ring by switching its
``attn_implementation`` to ``"ringlwm_ring"`` (registered by ``ringlwm.models.hf_attention``); nothing is patched.
The tensors are this rank's zigzag shards, as for ``RingLlamaForCausalLM``; ``segment_ids`` reach the
attention through transformers' keyword arguments. On a ring of several ranks the model keeps
``RingLlamaForCausalLM``'s contract (``enable_ring``): ``shift_labels`` and ``position_ids`` required, no KV
cache, and a ``loss`` that is the sequence group's (its mean, or its sum over ``num_items_in_batch``), the same
on every rank. ``disable_ring`` takes a model off the ring (generation, export on one process).

``from_pretrained(..., attn_implementation="ringlwm_ring")`` works as well (the options take their
defaults), on one process or with a group set by ``enable_ring``.

Sliding windows (Mistral, Qwen2/Qwen3 with ``use_sliding_window``): the ring has no windowed kernel, so a
call whose sequence is longer than the window raises; shorter ones are exact (the window is inactive).
"""

from __future__ import annotations

import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ringlwm.models.hf_attention import (
    ATTN_IMPLEMENTATION,
    DEFAULT_OPTIONS,
    SharedGroup,
    check_attention_heads,
    check_ring_call,
    local_group,
)
from ringlwm.models.llama import RingLlamaForCausalLM
from ringlwm.models.loss import IGNORE_INDEX, reduce_head_losses
from ringlwm.registry import FAMILIES
from ringlwm.ring.layout import sp_world, ulysses_world

# model_type -> what is checked for it (logits and gradients against eager on 1, 2 and 4 gloo ranks)
SUPPORTED_FAMILIES = {model_type: family.checked for model_type, family in FAMILIES.items()}


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a decoder (the modules the attention interface receives)."""
    return [m for name, m in model.named_modules() if name.endswith("self_attn") and hasattr(m, "layer_idx")]


def enable_ring(model: nn.Module, *, sp_group: dist.ProcessGroup | None = None,
                ulysses_group: dist.ProcessGroup | None = None, **options) -> nn.Module:
    """Switch ``model`` (a transformers decoder of a supported family, or a ringlwm model) to ring attention
    over ``sp_group``, in place, and return it. ``ulysses_group``: the 2-D layout (``ringlwm.ring.ulysses``),
    Ulysses' all-to-all over these ranks inside the ring (its heads, in groups of ``attention_head_chunks``, must fit: ``check_attention_heads``). options: ``ringlwm_options`` (``attention_backend`` for any
    family; ring models also take ``mlp_chunk_size``, ``norm_chunk_size``, ``loss_chunk_size``,
    ``activation_checkpointing``, ``activation_offloading``).

    sp_group: the ranks that share one sequence. None is only accepted on one process: in a world of several
    processes pass the group explicitly (``dist.group.WORLD`` when every rank holds part of one sequence;
    ``ringlwm.hf.setup_sequence_parallel`` builds the dp x sp groups), because data-parallel ranks hold
    different sequences and must not be attended as one.

    A transformers model then follows ``RingLlamaForCausalLM``'s contract on a ring of several ranks: it
    refuses ``labels`` without ``shift_labels`` (a zigzag shard cannot be shifted locally), a call without
    ``position_ids`` and KV-cache calls (generation: ``disable_ring`` first), checks ``sequence_fingerprint``
    when the batch carries one (``ringlwm.ring.agreement``), and its ``loss`` is the sequence group's: the
    group's target sum over ``num_items_in_batch``, or the group's mean, the same on every rank, with gradients
    that add up over the group to the single-process ones. On one process it is transformers' own loss.
    Nothing is patched: the attention goes through transformers' attention interface, the checks are a forward
    pre-hook on the decoder, the loss is the model's ``loss_function``; ``disable_ring`` undoes all three."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"enable_ring supports the families {sorted(SUPPORTED_FAMILIES)} (model_type), got "
                         f"{model_type!r}; other decoders are not checked against their eager attention")
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown ringlwm_options {sorted(unknown)}; known: {sorted(DEFAULT_OPTIONS)}")
    if (sp_group is None and ulysses_group is None and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1):
        raise ValueError(f"enable_ring in a world of {dist.get_world_size()} processes needs sp_group (the ranks "
                         "that share one sequence): dist.group.WORLD for all of them, or the groups of "
                         "ringlwm.hf.setup_sequence_parallel(sp_size) for data x sequence parallelism")
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"found no self-attention modules in {type(model).__name__}")
    if ulysses_group is not None:
        check_attention_heads(config.num_attention_heads,
                              getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                              options.get("attention_head_chunks", (getattr(config, "ringlwm_options", None) or {}).get(
                                  "attention_head_chunks")), ulysses_world(ulysses_group)[1])
    holder = SharedGroup(sp_group, ulysses_group)
    base = transformers_model(model)
    if isinstance(base, RingLlamaForCausalLM):
        base.apply_options(**options)
    else:
        if set(options) - {"attention_backend"}:
            raise ValueError(f"{type(base).__name__} takes only the attention_backend option; "
                             f"{sorted(set(options) - {'attention_backend'})} need RingLlamaForCausalLM")
        state = base.__dict__.get("_ringlwm_ring")
        if state is None:  # what disable_ring restores
            previous = config._attn_implementation
            state = base._ringlwm_ring = {
                "attn_implementation": "sdpa" if previous in (None, ATTN_IMPLEMENTATION) else previous,
                "loss_function": base.__dict__.get("_loss_function"),
                "hook": base.get_decoder().register_forward_pre_hook(check_ring_call, with_kwargs=True),
            }
        state["options"] = {**state.get("options", {}), **options}
        ring_options = {**DEFAULT_OPTIONS, **state["options"]}
        for module in modules:  # on the modules, not the config: a saved config stays the model's own
            module.ringlwm_options = ring_options
        base.set_attn_implementation(ATTN_IMPLEMENTATION)
        base.loss_function = RingCausalLMLoss(state["loss_function"] or type(base).loss_function.fget(base), holder)
    for module in _ring_parts(model, base, modules):
        module.ringlwm_group = holder
    return model


def disable_ring(model: nn.Module) -> _RingOff:
    """Take ``model`` off the ring, in place: a transformers model gets back its own attention implementation,
    loss and forward (for ``generate`` or export on one process); a ringlwm model attends on this process alone
    (a group of one rank). ``enable_ring`` puts it back, and so does leaving the returned context manager:

        disable_ring(model); model.generate(...)              # for good
        with disable_ring(model): model.generate(...)         # back on its ring afterwards
    """
    base = transformers_model(model)
    modules = attention_modules(model)
    holder = getattr(model, "ringlwm_group", None) or getattr(base, "ringlwm_group", None) or SharedGroup(None)
    restore = _RingOff(model, holder, dict(base.__dict__.get("_ringlwm_ring", {}).get("options") or {}))
    if isinstance(base, RingLlamaForCausalLM):
        holder = SharedGroup(local_group())
        for module in _ring_parts(model, base, modules):
            module.ringlwm_group = holder
        return restore
    state = base.__dict__.pop("_ringlwm_ring", None)
    if state is None:
        raise ValueError(f"{type(base).__name__} is not on the ring (enable_ring was not called on it)")
    state["hook"].remove()
    base.set_attn_implementation(state["attn_implementation"])
    if state["loss_function"] is None:
        base.__dict__.pop("_loss_function", None)
    else:
        base.loss_function = state["loss_function"]
    for module in _ring_parts(model, base, modules):
        module.__dict__.pop("ringlwm_group", None)
        module.__dict__.pop("ringlwm_options", None)
    return restore


class _RingOff:
    """What ``disable_ring`` returns: used as a context manager, it puts the model back on its ring on exit."""

    def __init__(self, model: nn.Module, holder: SharedGroup, options: dict):
        self.model, self.holder, self.options = model, holder, options

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc) -> None:
        enable_ring(self.model, sp_group=self.holder.group, ulysses_group=self.holder.ulysses, **self.options)


def _ring_parts(model: nn.Module, base: nn.Module, modules: list[nn.Module]) -> list[nn.Module]:
    """The modules that carry the ring's group: the model (a PEFT wrapper too), the transformers model, its
    decoder and its attention modules, each once."""
    return list({id(m): m for m in (model, base, base.get_decoder(), *modules)}.values())


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (PeftModel -> LoraModel -> model), else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class RingCausalLMLoss:
    """A transformers model's ``loss_function`` on the ring. One process: the model's own loss, as it is. A ring
    of several ranks: ``shift_labels`` are required (labels are refused: a shard cannot be shifted), and the loss
    is the sequence group's, as ``RingLlamaForCausalLM``'s: the group's target sum over ``num_items_in_batch``,
    or the group's mean; the gradient flows through this rank's own sum."""

    def __init__(self, own_loss, holder: SharedGroup):
        self.own_loss, self.holder = own_loss, holder

    def __call__(self, logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                 shift_labels=None, **kwargs):
        group = self.holder.sequence
        _, world_size = sp_world(group)
        if world_size == 1:
            return self.own_loss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                 ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        if shift_labels is None:
            raise ValueError(
                f"labels (unshifted, transformers' meaning) on a ring of {world_size} ranks: a zigzag shard cannot be "
                "shifted locally (its last token's target lives on another rank). Pass shift_labels, the next-token "
                "targets shifted over the whole sequence before sharding: ringlwm.hf.RingCollator makes them (with "
                "position_ids and segment_ids); a usual Hugging Face collator does not shard and cannot feed the ring"
            )
        targets = shift_labels.to(logits.device).reshape(-1)
        loss_sum = F.cross_entropy(logits.float().reshape(-1, vocab_size), targets, ignore_index=ignore_index,
                                   reduction="sum")
        weight = (targets != ignore_index).sum().to(loss_sum.dtype)
        return reduce_head_losses([loss_sum], [weight], [1.0], reduction="mean", sp_group=group,
                                  num_items_in_batch=num_items_in_batch)[0]
