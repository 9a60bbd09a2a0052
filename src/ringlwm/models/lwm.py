"""RingLwmForCausalLM: LWM's vision-language model (text and VQGAN-code vocabularies) on the ring.

    model = RingLwmForCausalLM.from_pretrained("path/to/lwm")   # a text Llama checkpoint works too: the
                                                                # vision table and head start random
    out = model(input_ids, position_ids, shift_labels=batch["labels"], segment_ids=seg, sp_group=group,
                vision_mask=batch["vision_mask"], label_vision_mask=batch["label_vision_mask"],
                loss_weights=batch["loss_weights"])
    out.loss, out.vision_loss, out.text_loss

Every tensor argument is this rank's zigzag shard, as for ``RingLlamaForCausalLM`` (``PackedLoader(...,
vision=True)`` yields all of them). The layout is LWM's ``FlaxVideoLLaMAForCausalLM``
(``lwm/vision_llama.py``):
  * two embedding tables: text (``model.embed_tokens``, ``vocab_size`` rows) and vision
    (``vision_embed_tokens``, ``vision_vocab_size`` = 8448 rows: 8192 VQGAN codes, then <eof> 8192,
    <eov> 8193 and unused ids). ``vision_mask`` says per input token which table its id indexes;
  * the Llama decoder of ``RingLlamaForCausalLM``, unchanged (ring attention, RoPE, chunked MLP);
  * two heads: text (``lm_head``) and vision (``vision_head``). ``label_vision_mask`` says per position
    whether its *target* (the next token) is vision, and so which head is trained there: the last token
    of the text "<vision>" marker predicts the first code with the vision head, <eov> predicts the first
    token of "</vision>" with the text head.

Targets, as in ``RingLlamaForCausalLM`` (transformers' convention): ``shift_labels`` are the next-token
targets shifted before sharding, and ``label_vision_mask`` is aligned with them (the loader's ``labels``
and ``label_vision_mask``). ``labels`` are unshifted (one process only): ``label_vision_mask`` is then
aligned with ``labels`` (per label: is it a vision id), defaults to ``vision_mask`` (right when the labels
are the input ids), and the model shifts both.

Loss (LWM's ``lwm/train.py``): ``vision_loss_weight * vision_loss + text_loss_weight * text_loss``, 0.5 and
0.5 in LWM (set on the config). Each part is the weighted mean cross-entropy over its own targets across
the whole sequence group (blockwise, ``models/loss.py``: no (tokens x vocab) logits). A part with no
target counts 0, as in LWM: a text-only batch gives ``text_loss_weight * text_loss``. LWM averages per
sequence first, then over the batch; ringlwm averages over all tokens of the group at once, as its text
model does.

Checkpoints: ``save_pretrained`` writes safetensors and a config.json of ``LwmConfig`` (a ``LlamaConfig``
with the vision fields, ``model_type`` "ringlwm_lwm", registered with AutoConfig and
AutoModelForCausalLM on import). The text parts keep Llama's parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from ringlwm.constants import VISION_VOCAB_SIZE
from ringlwm.models.llama import (
    RingCausalLMOutput,
    RingLlamaForCausalLM,
    _targets,
)
from ringlwm.models.loss import IGNORE_INDEX, linear_cross_entropy, reduce_head_losses


@strict
class LwmConfig(LlamaConfig):
    """``LlamaConfig`` plus LWM's vision vocabulary and the loss weights of the two modalities."""

    model_type = "ringlwm_lwm"

    vision_vocab_size: int = VISION_VOCAB_SIZE
    """Rows of the vision embedding and the vision head (LWM: 8448 = 8192 VQGAN codes + 256 special ids)."""
    vision_loss_weight: int | float = 0.5
    """Weight of the mean vision cross-entropy in the loss (LWM: 0.5)."""
    text_loss_weight: int | float = 0.5
    """Weight of the mean text cross-entropy in the loss (LWM: 0.5)."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.vision_vocab_size < 1:
            raise ValueError(f"vision_vocab_size must be positive, got {self.vision_vocab_size}")
        weights = (self.vision_loss_weight, self.text_loss_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise ValueError(f"vision_loss_weight and text_loss_weight must be >= 0 and not both 0, got {weights}")


def lwm_config_from_text(config: LlamaConfig, **vision_fields) -> LwmConfig:
    """An ``LwmConfig`` with the text model's fields (a vision-language stage starting from a text
    checkpoint) and the given vision fields (vision_vocab_size, vision_loss_weight, text_loss_weight)."""
    fields = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    fields.update(vision_fields)
    return LwmConfig.from_dict(fields)


def _lwm_targets(labels, shift_labels, label_vision_mask, vision_mask, sp_group, *, check_group: bool = True):
    """(targets, target vision mask) aligned with the inputs. With ``shift_labels`` both are used as given;
    with unshifted ``labels`` the label vision mask is per label (default: ``vision_mask``, the labels being
    the input ids) and both are shifted, as ``RingLlamaForCausalLM`` shifts labels."""
    targets = _targets(labels, shift_labels, sp_group, check_group=check_group)
    if shift_labels is None and labels is not None:
        per_label = label_vision_mask if label_vision_mask is not None else vision_mask
        if per_label is not None:
            label_vision_mask = torch.nn.functional.pad(per_label[..., 1:].bool(), (0, 1), value=False)
    return targets, label_vision_mask


@dataclass
class LwmCausalLMOutput(RingCausalLMOutput):
    """``loss``: the weighted loss (see the module docstring). ``vision_loss``/``text_loss``: its two parts,
    the group means (``loss_reduction="sum"``: this rank's weighted sums). ``logits`` (text head) and
    ``vision_logits`` (vision head): (batch, local_len, vocab) each, with ``return_logits=True`` or when no
    labels are given."""

    vision_logits: torch.FloatTensor | None = None
    vision_loss: torch.FloatTensor | None = None
    text_loss: torch.FloatTensor | None = None


class RingLwmForCausalLM(RingLlamaForCausalLM):
    """LWM's vision-language model running sequence-parallel over the ring (see the module docstring)."""

    config_class = LwmConfig
    plain_architecture = None  # its own class: LwmConfig is registered with transformers' Auto classes

    @property
    def loss_heads(self) -> dict[str, float]:
        """(vision, text) heads with LWM's coefficients (config vision_loss_weight / text_loss_weight)."""
        return {"vision": float(self.config.vision_loss_weight), "text": float(self.config.text_loss_weight)}

    def label_weight_sums(self, labels: torch.Tensor | None = None, loss_weights: torch.Tensor | None = None, *,
                          shift_labels: torch.Tensor | None = None, label_vision_mask: torch.Tensor | None = None,
                          vision_mask: torch.Tensor | None = None, **_unused) -> torch.Tensor:
        """(2,) float64 (vision, text) sums of the token weights of the positions with a target: the batch's
        normalisers, known before any forward. shift_labels or labels (unshifted), label_vision_mask,
        vision_mask, loss_weights: (batch, local_len), as ``forward`` takes them."""
        labels, label_vision_mask = _lwm_targets(labels, shift_labels, label_vision_mask, vision_mask, None,
                                                 check_group=False)
        valid = labels != IGNORE_INDEX
        weights = torch.ones(labels.shape, device=labels.device) if loss_weights is None else loss_weights
        weights = torch.where(valid, weights.double(), 0.0)
        vision = torch.zeros_like(valid) if label_vision_mask is None else label_vision_mask.bool()
        return torch.stack([(weights * vision).sum(), (weights * ~vision).sum()])

    def __init__(self, config: LlamaConfig):
        if not isinstance(config, LwmConfig):
            config = lwm_config_from_text(config)
        super().__init__(config)

    def post_init(self):
        # LlamaForCausalLM.__init__ ends with post_init, which initialises every weight: the vision modules
        # are created here so that they are initialised (and loaded, and reported missing) like the rest.
        if not hasattr(self, "vision_head"):
            self.vision_embed_tokens = nn.Embedding(self.config.vision_vocab_size, self.config.hidden_size)
            self.vision_head = nn.Linear(self.config.hidden_size, self.config.vision_vocab_size, bias=False)
        super().post_init()

    def embed(self, input_ids: torch.Tensor, vision_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, seq) ids -> (batch, seq, hidden): the text table where ``vision_mask`` is False, the
        vision table where it is True. Both tables are looked up for every token (as LWM does), so both get
        a gradient on every rank, vision tokens or not."""
        text_rows, vision_rows = self.config.vocab_size, self.config.vision_vocab_size
        vision = torch.zeros_like(input_ids, dtype=torch.bool) if vision_mask is None else vision_mask.bool()
        bad_text = ~vision & ((input_ids < 0) | (input_ids >= text_rows))
        bad_vision = vision & ((input_ids < 0) | (input_ids >= vision_rows))
        if not self._can_read_values(input_ids, vision):
            self._assert_in_graph(~(bad_text | bad_vision).any(),
                                  f"input ids out of range: text ids (vision_mask False) must lie in [0, {text_rows}), "
                                  f"vision ids (vision_mask True) in [0, {vision_rows})")
        elif bool(bad_text.any()) or bool(bad_vision.any()):
            raise ValueError(f"input ids out of range: text ids (vision_mask False) must lie in [0, {text_rows}), "
                             f"vision ids (vision_mask True) in [0, {vision_rows}); {int(bad_text.sum())} text and "
                             f"{int(bad_vision.sum())} vision ids are not")
        text = self.model.embed_tokens(input_ids.masked_fill(vision, 0))
        image = self.vision_embed_tokens(input_ids.masked_fill(~vision, 0))
        return torch.where(vision[..., None], image, text)

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
        vision_mask: torch.Tensor | None = None,
        label_vision_mask: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        loss_reduction: str = "mean",
        return_logits: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> LwmCausalLMOutput:
        """Shapes: input_ids, position_ids, labels, shift_labels, segment_ids, vision_mask, label_vision_mask,
        loss_weights, attention_mask: (batch, local_len), this rank's zigzag shards. vision_mask (bool): input
        token i is a vision id (None: all text). shift_labels: next-token targets aligned with the inputs,
        shifted before sharding (-100: no loss), each in its head's vocabulary; label_vision_mask (bool): the
        target shift_labels[i] is a vision id (vision head); it may be None only when vision_mask is (an
        all-text batch). labels: unshifted (one process; see the module docstring). attention_mask: a 2-D
        padding mask, as in ``RingLlamaForCausalLM``. ``num_items_in_batch`` is refused: one count cannot
        normalise two weighted head means (use ringlwm's trainer, or ``loss_reduction="sum"``).

        loss_reduction="mean": ``loss`` is the weighted loss of the whole sequence group, the same on every
        rank. "sum" (for a trainer normalising over a larger batch: data-parallel ranks, accumulation
        steps): ``vision_loss`` / ``text_loss`` are this rank's raw weighted sums and ``loss`` is
        ``sum_h c_h * s_h`` with ``loss_heads``' coefficients (what "sum" means for every ringlwm model); a
        trainer divides each head by its weight over the batch (``label_weight_sums``) before the coefficients. Either way ``loss_sums`` / ``loss_weight_sums`` are this rank's
        (vision, text) sums and weights (the contract of ``RingLlamaForCausalLM``).
        """
        if past_key_values is not None or use_cache or "ringlwm_cache" in kwargs:
            raise NotImplementedError("RingLwmForCausalLM.forward takes no KV cache: cached (and sequence-parallel) "
                                      "decoding goes through ringlwm.generate's engine (prefill, decode_step, "
                                      "cached_decode), as vision generation does; call forward without a cache")
        if num_items_in_batch is not None:
            raise ValueError("RingLwmForCausalLM's loss weights two per-head means (vision_loss_weight, "
                             "text_loss_weight), which one num_items_in_batch cannot normalise; train it with "
                             "ringlwm's trainer (train_step), or call it with loss_reduction='sum' and normalise "
                             "each head by label_weight_sums")
        sp_group, ulysses_group, sequence = self._ring_group(sp_group, ulysses_group, kwargs, attention_mask,
                                                             input_ids, inputs_embeds)
        labels, label_vision_mask = _lwm_targets(labels, shift_labels, label_vision_mask, vision_mask, sequence)
        labels, segment_ids, position_ids = self._ring_inputs(
            labels, shifted=shift_labels is not None, input_ids=input_ids, inputs_embeds=inputs_embeds,
            position_ids=position_ids, segment_ids=segment_ids, attention_mask=attention_mask, sp_group=sequence)
        for name, t in (("vision_mask", vision_mask), ("label_vision_mask", label_vision_mask),
                        ("loss_weights", loss_weights)):
            if t is not None and tuple(t.shape) != tuple(position_ids.shape):
                raise ValueError(f"{name} must have shape (batch, local_len) = {tuple(position_ids.shape)}, "
                                 f"got {tuple(t.shape)}")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, vision_mask)
        elif vision_mask is not None:
            raise ValueError("vision_mask selects the embedding table of input_ids; inputs_embeds are used as given")
        outputs = self.model(inputs_embeds=inputs_embeds, position_ids=position_ids, segment_ids=segment_ids,
                             sp_group=sp_group, ulysses_group=ulysses_group, use_cache=False, ring_plans={},
                             **kwargs)
        hidden = outputs.last_hidden_state

        loss = vision_loss = text_loss = loss_sums = loss_weight_sums = None
        if labels is not None:
            if label_vision_mask is None and vision_mask is not None:
                raise ValueError("label_vision_mask is required with vision_mask and labels: it picks the head "
                                 "(text or vision) for each target (PackedLoader(..., vision=True) yields it)")
            (vision_sum, vision_weight), (text_sum, text_weight) = self._head_losses(
                hidden, labels, label_vision_mask, loss_weights)
            loss_sums = torch.stack([vision_sum, text_sum])
            loss_weight_sums = torch.stack([vision_weight, text_weight])
            loss, (vision_loss, text_loss) = reduce_head_losses(
                [vision_sum, text_sum], [vision_weight, text_weight], list(self.loss_heads.values()),
                reduction=loss_reduction, sp_group=sequence)
        logits = vision_logits = None
        if return_logits is None:  # as in transformers: logits when there are no labels
            return_logits = labels is None
        if return_logits:
            logits, vision_logits = self.lm_head(hidden), self.vision_head(hidden)
        return LwmCausalLMOutput(loss=loss, logits=logits, vision_logits=vision_logits, vision_loss=vision_loss,
                                 text_loss=text_loss, hidden_states=outputs.hidden_states,
                                 attentions=outputs.attentions, loss_sums=loss_sums,
                                 loss_weight_sums=loss_weight_sums)

    def _head_losses(self, hidden, labels, label_vision_mask, loss_weights):
        """((vision_sum, vision_weight), (text_sum, text_weight)): blockwise CE of each head over the tokens
        whose target is of its modality. Each head sees only its own tokens (gathered rows), so the text
        head's (tokens x 32K) logits are never computed for vision targets, nor the other way round."""
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        flat_labels = labels.reshape(-1)
        valid = flat_labels != IGNORE_INDEX
        vision = (torch.zeros_like(valid) if label_vision_mask is None else label_vision_mask.reshape(-1).bool())
        flat_weights = None if loss_weights is None else loss_weights.reshape(-1)
        chunk = self.config.ringlwm_options["loss_chunk_size"]
        results = []
        for name, head, mine in (("vision", self.vision_head, valid & vision), ("text", self.lm_head, valid & ~vision)):
            rows = head.weight.shape[0]
            if not self._can_read_values(flat_labels, mine):
                self._assert_in_graph(~(mine & ((flat_labels < 0) | (flat_labels >= rows))).any(),
                                      f"{name} labels must lie in [0, {rows}) (label_vision_mask "
                                      f"{'True' if name == 'vision' else 'False'})")
            elif (target := flat_labels[mine]).numel() and (int(target.min()) < 0 or int(target.max()) >= rows):
                raise ValueError(f"{name} labels must lie in [0, {rows}) (label_vision_mask "
                                 f"{'True' if name == 'vision' else 'False'}), got values in "
                                 f"[{int(target.min())}, {int(target.max())}]")
            index = mine.nonzero().squeeze(1)
            weights = None if flat_weights is None else flat_weights.index_select(0, index)
            results.append(linear_cross_entropy(flat_hidden.index_select(0, index), head.weight,
                                                flat_labels.index_select(0, index), weights, chunk_size=chunk))
        return results[0], results[1]


AutoConfig.register(LwmConfig.model_type, LwmConfig, exist_ok=True)
AutoModelForCausalLM.register(LwmConfig, RingLwmForCausalLM, exist_ok=True)
