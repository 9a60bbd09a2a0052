"""RingLlamaForCausalLM: a Hugging Face Llama whose attention runs over the ring.

    model = RingLlamaForCausalLM.from_pretrained("path/to/llama")        # any local HF Llama checkpoint
    out = model(input_ids, position_ids, shift_labels=targets, segment_ids=seg, sp_group=group)
    out.loss.backward()
    model(ids, labels=ids).loss                                          # one process: LlamaForCausalLM's loss

Every tensor argument is this rank's zigzag shard (``ringlwm.shard_sequence``) of the full sequence.
Targets follow transformers: ``labels`` unshifted (the model shifts), ``shift_labels`` already shifted
before sharding (what sequence-parallel callers pass); ``attention_mask`` may be a 2-D padding mask and
``num_items_in_batch`` is honoured, so the Hugging Face Trainer sees an ordinary model (``ringlwm.hf``).
Attention goes through transformers' attention interface under the name ``"ringlwm_ring"`` (``hf_attention.py``,
registered at import; transformers' own modules are not patched). Checkpoints stay plain Llama checkpoints:
``save_pretrained`` output loads in ``LlamaForCausalLM``.

Long-sequence memory: the loss is blockwise (``models/loss.py``: no (tokens x vocab) logits), the MLP and
the RMSNorms can run in chunks of tokens with rematerialisation (``mlp_chunk_size``, ``norm_chunk_size``),
each decoder layer can be checkpointed (``activation_checkpointing``) and its checkpointed input kept in
host memory until the backward (``activation_offloading``, ``models/offload.py``), all set on the config
(``ringlwm_options``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from ringlwm.models.hf_attention import (  # noqa: F401 (re-exported: the names llama.py always had)
    ATTN_IMPLEMENTATION,
    DEFAULT_OPTIONS,
    RingPaddingMask,
    SharedGroup,
    bind_group,
    bound_group,
    bound_ulysses,
    check_padding_mask,
    check_ring_call,
    generation_refused,
    local_group,
    packed_segment_ids,
    padding_segment_ids,
)
from ringlwm.models.loss import IGNORE_INDEX, can_read_values, linear_cross_entropy, reduce_head_losses
from ringlwm.models.offload import OffloadStore, offload_layer_inputs
from ringlwm.ring import sequence_group, sp_world
from ringlwm.ring.agreement import FINGERPRINT_KEY, check_batch_agreement


class ChunkedLlamaMLP(LlamaMLP):
    """Blockwise feed-forward: the MLP over chunks of tokens, each recomputed in the backward, so the
    (tokens x intermediate_size) activations exist for one chunk at a time. Same weights as LlamaMLP."""

    chunk_size: int | None = None

    def forward(self, x):
        chunk = self.chunk_size
        if not chunk or x.shape[1] <= chunk:
            return super().forward(x)
        parts = []
        for piece in x.split(chunk, dim=1):
            if torch.is_grad_enabled() and piece.requires_grad:
                parts.append(checkpoint(super().forward, piece, use_reentrant=False))
            else:
                parts.append(super().forward(piece))
        return torch.cat(parts, dim=1)


class ChunkedLlamaRMSNorm(LlamaRMSNorm):
    """RMSNorm over chunks of tokens, each recomputed in the backward. transformers' norm computes in fp32, so
    its backward holds several fp32 copies of its input (at 512K tokens x 4096, 8 GiB each); here they exist
    for one chunk at a time. The output and the input's gradient are those of LlamaRMSNorm bit for bit (the
    norm is per token); the weight's gradient is summed chunk by chunk (the last bits may differ)."""

    chunk_size: int | None = None

    def forward(self, x):
        chunk = self.chunk_size
        if not chunk or x.dim() < 3 or x.shape[1] <= chunk or not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        norm = super().forward
        return torch.cat([checkpoint(norm, piece, use_reentrant=False) for piece in x.split(chunk, dim=1)], dim=1)


def set_context_length(config: LlamaConfig, max_position_embeddings: int, rope_theta: float | None = None) -> None:
    """Context extension: the stage's maximum length and RoPE base (LWM raises theta with each stage)."""
    config.max_position_embeddings = int(max_position_embeddings)
    if rope_theta is not None:
        params = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default"})
        params["rope_theta"] = float(rope_theta)
        config.rope_parameters = params


def rope_theta(config: LlamaConfig) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


RINGLWM_CONFIG_KEYS = ("ringlwm_options",)


def plain_config_dict(config: dict, architecture: str | None = None) -> dict:
    """A config dict as a checkpoint keeps it: no ringlwm key, ``architectures`` = [architecture] if given."""
    plain = {key: value for key, value in config.items() if key not in RINGLWM_CONFIG_KEYS}
    if architecture is not None:
        plain["architectures"] = [architecture]
    return plain


def _refuse_attn_implementation(cls, attn_implementation) -> None:
    if attn_implementation not in (None, ATTN_IMPLEMENTATION):
        raise ValueError(
            f"{cls.__name__} always attends over the ring ({ATTN_IMPLEMENTATION!r}); attn_implementation="
            f"{attn_implementation!r} cannot be honoured. Omit the argument, or load the checkpoint with "
            f"LlamaForCausalLM.from_pretrained(..., attn_implementation={attn_implementation!r}) for that attention"
        )


def _targets(labels, shift_labels, sp_group, *, check_group: bool = True) -> torch.Tensor | None:
    """Next-token targets aligned with the inputs, (batch, local_len). ``shift_labels`` are used as given
    (``labels`` is then ignored, as in transformers' loss). ``labels`` are transformers' unshifted labels: the
    target of position i is labels[i + 1] in the same row, the last position has none. A zigzag shard cannot
    be shifted locally, so with sequence parallelism only ``shift_labels`` is accepted."""
    if shift_labels is not None:
        return shift_labels
    if labels is None:
        return None
    if check_group and sp_world(sp_group)[1] > 1:
        raise ValueError(
            "labels (unshifted, transformers' meaning) cannot be shifted on a zigzag shard: with sequence "
            "parallelism pass shift_labels, the next-token targets shifted over the whole sequence before "
            "sharding (ringlwm.hf.RingCollator and ringlwm.data.PackedLoader make them)"
        )
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


@dataclass
class RingCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the loss contract shared by every ringlwm model (see ``loss_heads``):
    ``loss_sums`` (num_heads,) this rank's raw weighted loss sum per head and ``loss_weight_sums``
    (num_heads,) the sum of the token weights behind each, with labels only."""

    loss_sums: torch.FloatTensor | None = None
    loss_weight_sums: torch.FloatTensor | None = None


class RingLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` that runs sequence-parallel over the ring (see the module docstring).

    The loss contract (shared with ``RingLwmForCausalLM``): the model has loss heads with coefficients
    (``loss_heads``: here one, ``{"text": 1.0}``). Its loss is ``sum_h coefficient_h * mean_h``, each
    head's weighted mean over the tokens whose target it predicts. ``loss_reduction="mean"`` computes that
    over the sequence group; ``"sum"`` returns the raw sums (``loss_sums``) and weights
    (``loss_weight_sums``) of this rank, so that a trainer normalises over its whole global batch, whose
    per-head weights ``label_weight_sums`` gives before any forward.
    """

    @property
    def loss_heads(self) -> dict[str, float]:
        """Loss heads and their coefficients, in the order of ``loss_sums``."""
        return {"text": 1.0}

    def label_weight_sums(self, labels: torch.Tensor | None = None, loss_weights: torch.Tensor | None = None, *,
                          shift_labels: torch.Tensor | None = None, **_head_masks) -> torch.Tensor:
        """(num_heads,) float64 sums of the token weights of the positions with a target, per head: the
        normalisers of a batch, known before any forward. shift_labels (targets, as ``forward`` takes them) or
        labels (unshifted, one unsharded sequence per row), loss_weights: (batch, local_len)."""
        targets = _targets(labels, shift_labels, None, check_group=False)
        valid = targets != IGNORE_INDEX
        weights = torch.ones(targets.shape, device=targets.device) if loss_weights is None else loss_weights
        # Summed in the weights' dtype, as linear_cross_entropy sums its weight_sum: the same normaliser bits
        # whichever way a trainer asks (the float64 total is for the all-reduce over many ranks).
        return torch.where(valid, weights, 0.0).sum().double()[None]

    def __init__(self, config: LlamaConfig):
        # A copy: the caller's config (and any other model built from it) keeps its own attention.
        config = copy.deepcopy(config)
        options = dict(DEFAULT_OPTIONS)
        options.update(getattr(config, "ringlwm_options", None) or {})
        unknown = set(options) - set(DEFAULT_OPTIONS)
        if unknown:
            raise ValueError(f"unknown ringlwm_options {sorted(unknown)}; known: {sorted(DEFAULT_OPTIONS)}")
        config.ringlwm_options = options
        config._attn_implementation = ATTN_IMPLEMENTATION
        super().__init__(config)
        bind_group(self, None)  # the default sequence-parallel group (ringlwm.models.enable_ring binds another)
        bind_group(self.model, None)
        # Checks for callers that run the decoder without this class's forward (TRL's fused head calls base_model).
        self.model.register_forward_pre_hook(check_ring_call, with_kwargs=True)
        self.apply_options()

    plain_architecture: str | None = "LlamaForCausalLM"
    """What a saved checkpoint's ``architectures`` names: the transformers class that loads it without ringlwm."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' ``save_pretrained``, writing a plain checkpoint: config.json names
        ``plain_architecture`` and holds no ringlwm key (``ringlwm_options`` are run-time options: a loaded model
        takes the defaults unless given), so that serving tools that read ``architectures`` and a process without
        ringlwm load it."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            path = Path(save_directory) / "config.json"
            if path.exists():
                saved = json.loads(path.read_text())
                path.write_text(json.dumps(plain_config_dict(saved, self.plain_architecture), indent=2,
                                           sort_keys=True) + "\n")
        return result

    @classmethod
    def _check_and_adjust_attn_implementation(cls, attn_implementation, is_init_check: bool = False, **kwargs):
        _refuse_attn_implementation(cls, attn_implementation)
        return ATTN_IMPLEMENTATION

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        _refuse_attn_implementation(cls, kwargs.pop("attn_implementation", None))
        return super().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        _refuse_attn_implementation(cls, kwargs.pop("attn_implementation", None))
        return super()._from_config(config, **kwargs)

    def apply_options(self, **updates) -> None:
        """Set ``ringlwm_options`` (e.g. ``mlp_chunk_size=2048``) and apply them to the modules."""
        opts = self.config.ringlwm_options
        unknown = set(updates) - set(DEFAULT_OPTIONS)
        if unknown:
            raise ValueError(f"unknown ringlwm_options {sorted(unknown)}; known: {sorted(DEFAULT_OPTIONS)}")
        opts.update(updates)
        for layer in self.model.layers:
            if type(layer.mlp) is LlamaMLP:
                layer.mlp.__class__ = ChunkedLlamaMLP  # same parameters and state-dict keys
            if isinstance(layer.mlp, ChunkedLlamaMLP):
                layer.mlp.chunk_size = opts["mlp_chunk_size"]
        for norm in self.modules():
            if type(norm) is LlamaRMSNorm:
                norm.__class__ = ChunkedLlamaRMSNorm  # same parameters and state-dict keys
            if isinstance(norm, ChunkedLlamaRMSNorm):
                norm.chunk_size = opts["norm_chunk_size"]
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; accept both.
        if hasattr(self, "activation_checkpointing_enable"):
            enable, disable = self.activation_checkpointing_enable, self.activation_checkpointing_disable
            active = self.is_activation_checkpointing
        else:
            enable, disable = self.gradient_checkpointing_enable, self.gradient_checkpointing_disable
            active = self.is_gradient_checkpointing
        if opts["activation_offloading"] and not opts["activation_checkpointing"]:
            raise ValueError("activation_offloading moves the checkpointed layer inputs to host memory: it needs "
                             "activation_checkpointing=True")
        if opts["activation_checkpointing"]:
            enable({"use_reentrant": False})
            store = None
            if opts["activation_offloading"]:
                store = self.__dict__.get("offload_store")
                if store is None:
                    store = self.offload_store = OffloadStore()
                    self.model.register_forward_pre_hook(lambda *_: store.begin())
                store.prefetch = bool(opts["offload_prefetch"])
            offload_layer_inputs(self, store)
        elif active:
            disable()

    def _check_inputs(self, input_ids, inputs_embeds, position_ids, labels, segment_ids, sp_group):
        x = input_ids if input_ids is not None else inputs_embeds
        if x is None:
            raise ValueError("give input_ids or inputs_embeds")
        batch, local_len = x.shape[0], x.shape[1]
        _, world_size = sp_world(sp_group)
        if position_ids is None:
            if world_size > 1:
                raise ValueError("position_ids are required with sequence parallelism (global positions, sharded)")
            position_ids = torch.arange(local_len, device=x.device).expand(batch, local_len)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(batch, -1)
        for name, t in (("position_ids", position_ids), ("labels", labels), ("segment_ids", segment_ids)):
            if t is not None and tuple(t.shape) != (batch, local_len):
                raise ValueError(f"{name} must have shape (batch, local_len) = {(batch, local_len)}, got {tuple(t.shape)}")
        limit = self.config.max_position_embeddings
        if position_ids.numel() and not self._can_read_values(position_ids):
            self._assert_in_graph(
                ((position_ids >= 0) & (position_ids < limit)).all(),
                f"position_ids must lie in [0, max_position_embeddings = {limit}); raise it with set_context_length "
                "for context extension",
            )
        elif position_ids.numel() and int(position_ids.max()) >= limit:
            raise ValueError(
                f"position {int(position_ids.max())} is beyond the model's max_position_embeddings "
                f"({limit}); raise it with set_context_length for context extension"
            )
        elif position_ids.numel() and int(position_ids.min()) < 0:
            raise ValueError("position_ids must be non-negative")
        return position_ids

    def _ring_group(self, sp_group, ulysses_group, kwargs: dict, attention_mask, input_ids, inputs_embeds):
        """The groups of a ring forward: (ring, Ulysses, sequence = every rank of both). None: the ones
        ``enable_ring`` bound, else the world and no Ulysses. Then the checks every ringlwm forward makes first:
        the sequence group agrees on the batch (``sequence_fingerprint``, popped from ``kwargs``) and the padding
        mask is a 2-D one of ones and zeros."""
        if sp_group is None:
            sp_group = bound_group(self)
        if ulysses_group is None:
            ulysses_group = bound_ulysses(self)
        sequence = sequence_group(sp_group, ulysses_group)
        fingerprint = kwargs.pop(FINGERPRINT_KEY, None)
        if fingerprint is not None:
            check_batch_agreement(fingerprint, sequence)
        check_padding_mask(attention_mask, input_ids if input_ids is not None else inputs_embeds)
        return sp_group, ulysses_group, sequence

    def _cached_forward(self, input_ids, position_ids, inputs_embeds, attention_mask, past_key_values, use_cache,
                        logits_to_keep, sp_group, kwargs):
        """Generation with a KV cache, on one process: LlamaForCausalLM's forward."""
        sp_group, _, sequence = self._ring_group(sp_group, kwargs.pop("ulysses_group", None), {}, None, None, None)
        kwargs.pop(FINGERPRINT_KEY, None)
        if sp_world(sequence)[1] > 1:
            raise generation_refused(sp_world(sequence)[1])
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported in cached generation; pass prompts of one length")
        if past_key_values is not None:  # transformers 5 calls it ``cache`` (in kwargs) and warns on both
            kwargs["past_key_values"] = past_key_values
        return super().forward(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds,
                               use_cache=use_cache, logits_to_keep=logits_to_keep, sp_group=sp_group, **kwargs)

    def _ring_inputs(self, targets, *, shifted: bool, input_ids, inputs_embeds, position_ids, segment_ids,
                     attention_mask, sp_group):
        """The input setup every ringlwm forward shares, once its targets are made: no loss on padding, padding
        as segment ids, positions checked (made on one process). Returns (targets, segment_ids, position_ids)."""
        targets = self._mask_padding(targets, attention_mask, shifted=shifted)
        if attention_mask is not None:
            segment_ids = padding_segment_ids(attention_mask, segment_ids)
        position_ids = self._check_inputs(input_ids, inputs_embeds, position_ids, targets, segment_ids, sp_group)
        return targets, segment_ids, position_ids

    _can_read_values = staticmethod(can_read_values)  # see models/loss.py

    @staticmethod
    def _assert_in_graph(ok: torch.Tensor, message: str) -> None:
        """An input check that stays in a compiled graph without a host sync: ``ok`` (a 0-dim bool tensor)
        False raises RuntimeError(message) when the graph runs on CPU; on a GPU it is a device-side assert,
        which ends the process. On meta and fake tensors it checks nothing (there are no values)."""
        torch._assert_async(ok, message)

    @staticmethod
    def _mask_padding(targets, attention_mask, *, shifted: bool):
        """Targets without loss on padding: where the input is padding and, for targets this model shifted
        itself, where the target token is. (Already-shifted targets are the caller's: their padding targets
        must be -100 already, as the collators make them.) attention_mask: (batch, local_len) or None."""
        if targets is None or attention_mask is None:
            return targets
        keep = attention_mask.bool()
        if not shifted:
            keep = keep & torch.nn.functional.pad(keep[..., 1:], (0, 1), value=True)
        return targets.masked_fill(~keep, IGNORE_INDEX)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        sp_group: dist.ProcessGroup | None = None,
        *,
        ulysses_group: dist.ProcessGroup | None = None,
        shift_labels: torch.LongTensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        loss_weights: torch.Tensor | None = None,
        loss_reduction: str = "mean",
        return_logits: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Shapes: input_ids, position_ids, labels, shift_labels, segment_ids, loss_weights, attention_mask:
        (batch, local_len), this rank's zigzag shards. position_ids are global positions (restarting per
        document when packed). Targets, as in transformers: ``labels`` are unshifted (the model shifts them
        within each row, so ``model(ids, labels=ids)`` is LlamaForCausalLM's loss); ``shift_labels`` are the
        next-token targets already aligned with the inputs, shifted over the whole sequence before sharding,
        and are what sequence-parallel callers pass (labels then raise: a zigzag shard cannot be shifted).
        -100: no loss. loss_weights (optional) weight the target of each position. ``attention_mask``: a 2-D
        padding mask (1 on tokens; this rank's shard); padding attends only padding, no token attends it, and
        no position whose input or target is padding carries loss.

        ``loss``: the weighted mean over the targets of the whole sequence group, the same on every rank.
        With ``num_items_in_batch`` (transformers' Trainer, gradient accumulation) it is the group's weighted
        sum divided by it instead. With ``loss_reduction="sum"`` it is this rank's raw weighted sum (for a
        trainer that divides by the weight of a larger batch; see ``loss_heads``). Either way ``loss_sums`` and
        ``loss_weight_sums`` hold this rank's per-head sums and weights, shape (num_heads,). ``logits`` (batch,
        local_len, vocab) come with ``return_logits=True``, and by default when no targets are given (as in
        transformers: generation and evaluation read them; ``logits_to_keep`` keeps the last k positions);
        with targets the default is no logits, as the blockwise loss never needs them.
        ``sp_group`` None: the group set by ``ringlwm.models.enable_ring`` if any, else the whole world.
        ``ulysses_group``: the 2-D layout (``ringlwm.ring.ulysses``): the inputs are this rank's piece of its ring
        shard (``shard_sequence(x, 1, sp_group, ulysses_group)``); losses are over every rank of both groups.

        With ``past_key_values``/``use_cache`` (generation on one process) it behaves as LlamaForCausalLM.
        """
        if past_key_values is not None or use_cache:
            return self._cached_forward(input_ids, position_ids, inputs_embeds, attention_mask, past_key_values,
                                        use_cache, logits_to_keep, sp_group, {**kwargs, "ulysses_group": ulysses_group})
        sp_group, ulysses_group, sequence = self._ring_group(sp_group, ulysses_group, kwargs, attention_mask,
                                                             input_ids, inputs_embeds)
        labels, segment_ids, position_ids = self._ring_inputs(
            _targets(labels, shift_labels, sequence), shifted=shift_labels is not None, input_ids=input_ids,
            inputs_embeds=inputs_embeds, position_ids=position_ids, segment_ids=segment_ids,
            attention_mask=attention_mask, sp_group=sequence)
        # ring_plans: the layers share one gather of the segment ids and one skip plan per forward.
        outputs = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
                             segment_ids=segment_ids, sp_group=sp_group, ulysses_group=ulysses_group, use_cache=False,
                             ring_plans={}, **kwargs)
        hidden = outputs.last_hidden_state
        loss = loss_sums = loss_weight_sums = None
        if labels is not None:
            loss_sum, weight_sum = linear_cross_entropy(
                hidden, self.lm_head.weight, labels, loss_weights,
                chunk_size=self.config.ringlwm_options["loss_chunk_size"],
            )
            # New tensors, not views: FSDP2 hooks the outputs, and an in-place op on a view would drop its hook.
            loss_sums, loss_weight_sums = torch.stack([loss_sum]), torch.stack([weight_sum])
            loss, _ = reduce_head_losses([loss_sum], [weight_sum], [1.0], reduction=loss_reduction,
                                         sp_group=sequence, num_items_in_batch=num_items_in_batch)
        if return_logits is None:
            return_logits = labels is None
        logits = None
        if return_logits:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep])
        return RingCausalLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions, loss_sums=loss_sums,
                                  loss_weight_sums=loss_weight_sums)
