"""Ring attention for Hugging Face decoder models of several families, without a ringlwm model class.

    model = AutoModelForCausalLM.from_pretrained("path/to/qwen3")      # a local Llama 2/3, Mistral, Qwen2/3 dir
    enable_ring(model, sp_group=group)                                  # attention over the ring, in place
    out = model(input_ids=ids, position_ids=pos, segment_ids=seg, labels=..., shift_labels=targets)

Every family whose attention goes through transformers' attention interface takes the ring by switching its
``attn_implementation`` to ``"ringlwm_ring"`` (registered by ``ringlwm.models.llama``); nothing is patched.
The tensors are this rank's zigzag shards, as for ``RingLlamaForCausalLM``; ``segment_ids`` reach the
attention through transformers' keyword arguments, and the model's own loss takes ``shift_labels`` and
``num_items_in_batch`` (transformers' ``ForCausalLMLoss``). Its loss is this rank's part: the Trainer path
(``ringlwm.hf``) sums the group's parts through the gradient reduction; a plain loop divides by the group's
target count itself.

``from_pretrained(..., attn_implementation="ringlwm_ring")`` works as well (the options take their
defaults), on one process or with a group set by ``enable_ring``.

Sliding windows (Mistral, Qwen2/Qwen3 with ``use_sliding_window``): the ring has no windowed kernel, so a
call whose sequence is longer than the window raises; shorter ones are exact (the window is inactive).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ringlwm.models.llama import ATTN_IMPLEMENTATION, DEFAULT_OPTIONS, RingLlamaForCausalLM

# model_type -> what is checked for it (logits and gradients against eager on 1, 2 and 4 gloo ranks)
SUPPORTED_FAMILIES = {
    "llama": "Llama 2/3 (RoPE scaling, GQA, tied embeddings)",
    "mistral": "Mistral (sliding window: exact when inactive, else an error)",
    "qwen2": "Qwen2 (attention biases; sliding window as Mistral)",
    "qwen3": "Qwen3 (q/k norms; sliding window as Mistral)",
    "ringlwm_lwm": "RingLwmForCausalLM",
}


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a decoder (the modules the attention interface receives)."""
    return [m for name, m in model.named_modules() if name.endswith("self_attn") and hasattr(m, "layer_idx")]


def enable_ring(model: nn.Module, *, sp_group: dist.ProcessGroup | None = None, **options) -> nn.Module:
    """Switch ``model`` (a transformers decoder of a supported family, or a ringlwm model) to ring attention
    over ``sp_group``, in place, and return it. options: ``ringlwm_options`` (``attention_backend`` for any
    family; ring models also take ``mlp_chunk_size``, ``norm_chunk_size``, ``loss_chunk_size``,
    ``activation_checkpointing``, ``activation_offloading``).

    sp_group: the ranks that share one sequence. None is only accepted on one process: in a world of several
    processes pass the group explicitly (``dist.group.WORLD`` when every rank holds part of one sequence;
    ``ringlwm.hf.setup_sequence_parallel`` builds the dp x sp groups), because data-parallel ranks hold
    different sequences and must not be attended as one."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"enable_ring supports the families {sorted(SUPPORTED_FAMILIES)} (model_type), got "
                         f"{model_type!r}; other decoders are not checked against their eager attention")
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown ringlwm_options {sorted(unknown)}; known: {sorted(DEFAULT_OPTIONS)}")
    if sp_group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(f"enable_ring in a world of {dist.get_world_size()} processes needs sp_group (the ranks "
                         "that share one sequence): dist.group.WORLD for all of them, or the groups of "
                         "ringlwm.hf.setup_sequence_parallel(sp_size) for data x sequence parallelism")
    if isinstance(model, RingLlamaForCausalLM):
        model.apply_options(**options)
    else:
        if set(options) - {"attention_backend"}:
            raise ValueError(f"{type(model).__name__} takes only the attention_backend option; "
                             f"{sorted(set(options) - {'attention_backend'})} need RingLlamaForCausalLM")
        config.ringlwm_options = {**DEFAULT_OPTIONS, **(getattr(config, "ringlwm_options", None) or {}), **options}
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.ringlwm_sp_group = sp_group
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"found no self-attention modules in {type(model).__name__}")
    for module in modules:
        module.ringlwm_sp_group = sp_group
    return model
