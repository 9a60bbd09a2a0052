"""The model families ringlwm knows, in one place: the trainer, the checkpoint loader and ``enable_ring`` read it.

Each family is a transformers ``model_type``. Those with a ringlwm class train with ``python -m ringlwm.train``
and load through ``ringlwm.runtime.load_model``; every family takes the ring through ``enable_ring`` (its
logits and gradients are checked against eager attention on 1, 2 and 4 gloo ranks). Imports nothing heavy:
the classes are resolved on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    model_type: str
    checked: str
    """What the tests check for it."""
    ringlwm_class: str | None = None
    """``module:Class`` of the ringlwm model that trains and loads it; None: ``enable_ring`` only."""
    vision: bool = False


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "Llama 2/3 (RoPE scaling, GQA, tied embeddings)", "ringlwm.models.llama:RingLlamaForCausalLM"),
    Family("mistral", "Mistral (sliding window: exact when inactive, else an error)"),
    Family("qwen2", "Qwen2 (attention biases; sliding window as Mistral)"),
    Family("qwen3", "Qwen3 (q/k norms; sliding window as Mistral)"),
    Family("ringlwm_lwm", "RingLwmForCausalLM", "ringlwm.models.lwm:RingLwmForCausalLM", vision=True),
)}


def trainable_model_types(vision: bool | None = None) -> tuple[str, ...]:
    """The model types ringlwm trains and loads (vision: True only vision-language, False only text)."""
    return tuple(t for t, f in FAMILIES.items() if f.ringlwm_class and (vision is None or f.vision == vision))


def ringlwm_class(model_type: str):
    """The ringlwm model class of ``model_type`` (ValueError naming the trainable types when it has none)."""
    family = FAMILIES.get(model_type)
    if family is None or family.ringlwm_class is None:
        raise ValueError(f"model_type {model_type!r} has no ringlwm model class; ringlwm trains "
                         f"{list(trainable_model_types())}")
    module, name = family.ringlwm_class.split(":")
    return getattr(importlib.import_module(module), name)


def training_class(vision: bool):
    """The class the trainer builds: the vision-language model with ``model.vision``, else the text one."""
    return ringlwm_class(trainable_model_types(vision=vision)[0])
