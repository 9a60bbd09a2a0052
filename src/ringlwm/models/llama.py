"""RingLlamaForCausalLM: a Hugging Face Llama whose attention runs over the ring.

    model = RingLlamaForCausalLM.from_pretrained("path/to/llama")        # any local HF Llama checkpoint
    out = model(input_ids, position_ids, labels=labels, segment_ids=seg, sp_group=group)
    out.loss.backward()

Every tensor argument is this rank's zigzag shard (``ringlwm.shard_sequence``) of the full sequence.
Attention goes through transformers' attention interface under the name ``"ringlwm_ring"`` (registered
at import; transformers' own modules are not patched). Checkpoints stay plain Llama checkpoints:
``save_pretrained`` output loads in ``LlamaForCausalLM``.

Long-sequence memory: the loss is blockwise (``models/loss.py``: no (tokens x vocab) logits), the MLP can
run in chunks of tokens with rematerialisation (``mlp_chunk_size``), and each decoder layer can be
checkpointed (``activation_checkpointing``), all set on the config (``ringlwm_options``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP

from ringlwm.kernels import blockwise_attention
from ringlwm.models.loss import IGNORE_INDEX, linear_cross_entropy, sequence_parallel_loss
from ringlwm.ring import ring_attention, sp_world
from ringlwm.ring.decode import sharded_decode_attention

ATTN_IMPLEMENTATION = "ringlwm_ring"

# Options kept on the config (and so saved with it; plain LlamaForCausalLM ignores them).
DEFAULT_OPTIONS = {
    "loss_chunk_size": 4096,  # tokens per chunk of the blockwise cross-entropy
    "mlp_chunk_size": None,  # tokens per chunk of the blockwise feed-forward (None: whole sequence)
    "activation_checkpointing": False,  # recompute each decoder layer in the backward
    "attention_backend": None,  # block kernel for the ring ("triton", "cpu", ...; None: by device)
}


def _ring_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            segment_ids=None, sp_group=None, ringlwm_cache=None, **_kwargs):
    """transformers attention-interface function. query: (batch, heads, local_len, head_dim); key/value:
    (batch, kv_heads, kv_seq, head_dim). Returns ((batch, local_len, heads, head_dim), None).

    With ``ringlwm_cache`` (a ShardedKVCache, from ringlwm.generate): during the prefill each rank keeps its
    shard of the keys/values; during decoding the new token's K/V goes to its owner rank and the query
    attends the sharded cache (exact log-sum-exp merge across ranks)."""
    if dropout:
        raise ValueError("ring attention has no attention dropout; set config.attention_dropout = 0")
    if attention_mask is not None:
        raise ValueError("ring attention takes no attention_mask: express padding and packing with segment_ids")
    backend = module.config.ringlwm_options.get("attention_backend")
    if ringlwm_cache is not None and not ringlwm_cache.prefilling:
        ringlwm_cache.append(module.layer_idx, key, value)
        out = sharded_decode_attention(query, ringlwm_cache, module.layer_idx, scale=scaling, backend=backend)
        return out.transpose(1, 2), None
    if ringlwm_cache is not None:
        ringlwm_cache.store_prefill(module.layer_idx, key, value)
    if key.shape[2] != query.shape[2]:
        # Decoding against a KV cache (single process): the new queries sit at the end of the keys.
        if sp_world(sp_group)[1] > 1:
            raise ValueError("a KV cache with sequence parallelism goes through ringlwm.generate, not forward")
        out = blockwise_attention(query, key, value, causal=True, scale=scaling, q_offset=key.shape[2] - query.shape[2],
                                  backend=backend)
    else:
        out = ring_attention(query, key, value, causal=True, segment_ids=segment_ids, scale=scaling,
                             group=sp_group, backend=backend)
    return out.transpose(1, 2), None


def _no_mask(*_args, **_kwargs):
    """The ring never takes a dense mask: causality and documents come from positions and segment ids."""
    return None


AttentionInterface.register(ATTN_IMPLEMENTATION, _ring_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)


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

    def label_weight_sums(self, labels: torch.Tensor, loss_weights: torch.Tensor | None = None,
                          **_head_masks) -> torch.Tensor:
        """(num_heads,) float64 sums of the token weights of the positions with a label, per head: the
        normalisers of a batch, known before any forward. labels, loss_weights: (batch, local_len)."""
        valid = labels != IGNORE_INDEX
        weights = torch.ones(labels.shape, device=labels.device) if loss_weights is None else loss_weights
        return torch.where(valid, weights.double(), 0.0).sum()[None]

    def __init__(self, config: LlamaConfig):
        options = dict(DEFAULT_OPTIONS)
        options.update(getattr(config, "ringlwm_options", None) or {})
        unknown = set(options) - set(DEFAULT_OPTIONS)
        if unknown:
            raise ValueError(f"unknown ringlwm_options {sorted(unknown)}; known: {sorted(DEFAULT_OPTIONS)}")
        config.ringlwm_options = options
        config._attn_implementation = ATTN_IMPLEMENTATION
        super().__init__(config)
        self.apply_options()

    @classmethod
    def _check_and_adjust_attn_implementation(cls, attn_implementation, is_init_check: bool = False, **kwargs):
        return ATTN_IMPLEMENTATION

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
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; accept both.
        if hasattr(self, "activation_checkpointing_enable"):
            enable, disable = self.activation_checkpointing_enable, self.activation_checkpointing_disable
            active = self.is_activation_checkpointing
        else:
            enable, disable = self.gradient_checkpointing_enable, self.gradient_checkpointing_disable
            active = self.is_gradient_checkpointing
        if opts["activation_checkpointing"]:
            enable({"use_reentrant": False})
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
        if position_ids.numel() and int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"position {int(position_ids.max())} is beyond the model's max_position_embeddings "
                f"({self.config.max_position_embeddings}); raise it with set_context_length for context extension"
            )
        if position_ids.numel() and int(position_ids.min()) < 0:
            raise ValueError("position_ids must be non-negative")
        return position_ids

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        sp_group: dist.ProcessGroup | None = None,
        *,
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
        """Shapes: input_ids, position_ids, labels, segment_ids, loss_weights: (batch, local_len), this rank's
        zigzag shards. position_ids are global positions (restarting per document when packed); labels
        are next-token targets already aligned with the inputs (-100: no loss; the model does not shift);
        loss_weights (optional) weight each token's loss. ``loss`` is the weighted mean over the valid
        tokens of the whole sequence group, the same on every rank. With ``loss_reduction="sum"`` it is
        this rank's raw weighted sum instead (for a trainer that divides by the weight of a larger batch:
        data-parallel ranks, accumulation steps; see ``loss_heads``). Either way ``loss_sums`` and
        ``loss_weight_sums`` hold this rank's per-head sums and weights, shape (num_heads,). ``logits`` (batch, local_len, vocab) come with
        ``return_logits=True``, and by default when no labels are given (as in transformers: generation and
        evaluation read them; ``logits_to_keep`` keeps the last k positions); with labels the default is
        no logits, as the blockwise loss never needs them.

        With ``past_key_values``/``use_cache`` (generation on one process) it behaves as LlamaForCausalLM.
        """
        if past_key_values is not None or use_cache:
            if attention_mask is not None and not bool(attention_mask.all()):
                raise ValueError("padded batches are not supported in cached generation; pass prompts of one length")
            return super().forward(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds,
                                   past_key_values=past_key_values, use_cache=use_cache,
                                   logits_to_keep=logits_to_keep, **kwargs)
        if attention_mask is not None:
            raise ValueError("RingLlamaForCausalLM takes segment_ids instead of attention_mask")
        position_ids = self._check_inputs(input_ids, inputs_embeds, position_ids, labels, segment_ids, sp_group)
        outputs = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
                             segment_ids=segment_ids, sp_group=sp_group, use_cache=False, **kwargs)
        hidden = outputs.last_hidden_state
        loss = loss_sums = loss_weight_sums = None
        if labels is not None:
            loss_sum, weight_sum = linear_cross_entropy(
                hidden, self.lm_head.weight, labels, loss_weights,
                chunk_size=self.config.ringlwm_options["loss_chunk_size"],
            )
            loss_sums, loss_weight_sums = loss_sum[None], weight_sum[None]
            if loss_reduction == "sum":
                loss = loss_sum
            elif loss_reduction == "mean":
                loss = sequence_parallel_loss(loss_sum, weight_sum, sp_group)
            else:
                raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if return_logits is None:
            return_logits = labels is None
        logits = None
        if return_logits:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep])
        return RingCausalLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions, loss_sums=loss_sums,
                                  loss_weight_sums=loss_weight_sums)
