"""One optimizer step, for the trainer and the planner alike: ``train_step`` (forward and backward of every
micro-batch with the exact global loss), ``optimizer_step`` (clip, finite check, AdamW) and the learning-rate
schedule ``lr_at``.

Loss bookkeeping (a classic source of silent bugs in context-parallel trainers): one step function for every
model. Each rank computes raw weighted loss sums per loss head over its zigzag shard; the heads' token weights
over every rank and accumulation micro-batch are all-reduced before any backward, and each rank
backpropagates ``world_size * sum_h c_h * sum_h / weight_h``. FSDP averages gradients over the world, so the
update is the gradient of the exact weighted token mean of the global batch (per head, with LWM's head
coefficients), whatever the dp/sp/accumulation split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ringlwm.models.loss import can_read_values
from ringlwm.train.breakdown import PhaseTimer
from ringlwm.train.config import StageConfig


def lr_at(stage: StageConfig, step: int) -> float:
    """Linear warmup to stage.lr, then cosine decay to stage.lr * min_lr_ratio at the last step."""
    if stage.warmup_steps and step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    decay_steps = max(stage.steps - stage.warmup_steps, 1)
    progress = min((step - stage.warmup_steps) / decay_steps, 1.0)
    floor = stage.lr * stage.min_lr_ratio
    return floor + (stage.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _model_inputs(batch: dict, vision: bool) -> dict:
    """The model's keyword arguments for one micro-batch of the loader."""
    inputs = {name: batch[name] for name in ("input_ids", "position_ids", "segment_ids", "loss_weights")}
    inputs["shift_labels"] = batch["labels"]  # the loader's labels are shifted before sharding
    if vision:
        inputs.update(vision_mask=batch["vision_mask"], label_vision_mask=batch["label_vision_mask"])
    return inputs


def train_step(model, micro: list[dict], sp_group, world: int, *, vision: bool,
               timer: PhaseTimer | None = None, ulysses_group=None) -> tuple[torch.Tensor, dict]:
    """Forward and backward of one optimizer step over its micro-batches, for any ringlwm model.

    The loss of the global batch is ``sum_h c_h * S_h / W_h`` over the model's loss heads (``loss_heads``:
    coefficients c_h), with S_h the weighted loss sum and W_h the token weight of head h over every rank
    and micro-batch. The weights are known before any forward (``label_weight_sums``): one all-reduce
    gives W, and each micro-batch backpropagates ``world * sum_h c_h * s_h / W_h`` from its raw sums s_h
    (``loss_reduction="sum"``); FSDP averages the gradients over the world, which makes the update the
    gradient of the global loss, whatever the dp/sp/accumulation split. Everything stays on the device: a
    second all-reduce sums the loss for the metrics, read by the caller once per step.
    Returns (the global loss as a 0-d tensor, per-head global means when the model has several heads).
    ``timer``: a ``PhaseTimer`` that gets the forward and backward phases. ``ulysses_group``: the 2-D layout's
    (the batches are then this rank's piece of its ring shard)."""
    timer = timer or PhaseTimer(torch.device("cpu"), enabled=False)
    heads = model.loss_heads
    first = micro[0]["labels"]
    coefficients = torch.tensor(list(heads.values()), dtype=torch.float64, device=first.device)
    weights = torch.stack([model.label_weight_sums(**_model_inputs(b, vision)) for b in micro]).sum(0)
    dist.all_reduce(weights)
    timer.mark("other")
    # Empty heads (no token of that kind in the whole batch) contribute nothing instead of 0/0.
    scale = (world * coefficients / weights.clamp(min=1e-30)).float()
    sums = torch.zeros(len(heads), dtype=torch.float64, device=first.device)
    for batch in micro:
        out = model(**_model_inputs(batch, vision), sp_group=sp_group, ulysses_group=ulysses_group,
                    loss_reduction="sum")
        timer.mark("forward")
        (out.loss_sums * scale).sum().backward()
        sums += out.loss_sums.detach().double()
        timer.mark("backward")
    dist.all_reduce(sums)
    means = torch.where(weights > 0, sums / weights.clamp(min=1e-30), 0.0)
    loss = (coefficients * means).sum()
    # A head without tokens in the batch has no mean: NaN here, None in the metrics.
    parts = ({f"{name}_loss": torch.where(weights[h] > 0, means[h], float("nan")) for h, name in enumerate(heads)}
             if len(heads) > 1 else {})
    return loss, parts


class NonFiniteStepError(FloatingPointError):
    """A step's loss or gradient norm was NaN or inf: the step was not applied (see ``optim.on_nonfinite``)."""


@dataclass
class StepOutcome:
    """What ``optimizer_step`` did: the step's loss and gradient norm (None where tensors hold no values: the
    planner's fake devices) and whether the update was applied."""

    loss: float | None
    grad_norm: float | None
    applied: bool


def optimizer_step(model, optimizer, loss: torch.Tensor, *, grad_clip: float,
                   timer: PhaseTimer | None = None) -> StepOutcome:
    """The optimizer step after the backward of every micro-batch, for the trainer and the planner alike:
    clip the global gradient norm (``grad_clip``; 0: no clipping, the norm is still measured), read the loss
    and the norm (the step's one host read), then AdamW and zero_grad, unless either is NaN or inf: then the
    gradients are dropped and nothing is applied (``applied=False``; the caller stops or skips). Every rank
    decides alike: the loss is all-reduced and the norm is global. ``timer``: gets the grad_norm and optimizer
    phases."""
    timer = timer or PhaseTimer(torch.device("cpu"), enabled=False)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    if can_read_values(loss, grad_norm):
        loss_value, norm_value = torch.stack([loss.detach().double(),
                                              grad_norm.detach().to(loss.device, torch.float64)]).tolist()
        applied = math.isfinite(loss_value) and math.isfinite(norm_value)
    else:  # fake tensors (the planner): shapes only, the step as it would run
        loss_value = norm_value = None
        applied = True
    timer.mark("grad_norm")
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    timer.mark("optimizer")
    return StepOutcome(loss_value, norm_value, applied)
