"""The training loop: config -> mesh -> model -> loader -> steps -> metrics and checkpoints.

Per stage (progressive context extension): build the mesh for the stage's sp degree, build the model on
the meta device with the stage's length and RoPE theta, shard it (FSDP2), fill it (first stage: the
init checkpoint or a seeded random init, broadcast from rank 0; later stages: the previous stage's final
checkpoint through DCP, resharded), then train.

Loss bookkeeping (a classic source of silent bugs in context-parallel trainers): one step function
(``train_step``) for every model. Each rank computes raw weighted loss sums per loss head over its zigzag
shard; the heads' token weights over every rank and accumulation micro-batch are all-reduced before any
backward, and each rank backpropagates ``world_size * sum_h c_h * sum_h / weight_h``. FSDP averages
gradients over the world, so the update is the gradient of the exact weighted token mean of the global
batch (per head, with LWM's head coefficients), whatever the dp/sp/accumulation split.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig

from ringlwm.distributed import init_distributed
from ringlwm.log import logger
from ringlwm.models import RingLwmForCausalLM, set_context_length
from ringlwm.models.loss import can_read_values
from ringlwm.models.lwm import lwm_config_from_text
from ringlwm.parallel import ParallelDims, materialize, parallelize_llama
from ringlwm.registry import training_class
from ringlwm.runtime import load_model, read_model_config
from ringlwm.train.breakdown import PhaseTimer, StepProfiler
from ringlwm.train.checkpoint import Checkpointer, export_hf, rng_state, set_rng_state
from ringlwm.train.config import StageConfig, TrainConfig, to_dict
from ringlwm.train.data import build_loader, load_data_tokenizer
from ringlwm.train.metrics import MetricsLogger, device_peak_flops, max_memory_gb, step_work
from ringlwm.train.run_record import check_rerun, read_record, write_record


def lr_at(stage: StageConfig, step: int) -> float:
    """Linear warmup to stage.lr, then cosine decay to stage.lr * min_lr_ratio at the last step."""
    if stage.warmup_steps and step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    decay_steps = max(stage.steps - stage.warmup_steps, 1)
    progress = min((step - stage.warmup_steps) / decay_steps, 1.0)
    floor = stage.lr * stage.min_lr_ratio
    return floor + (stage.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def stage_model_config(config: TrainConfig, index: int, vocab_size: int | None) -> LlamaConfig:
    """The model config of stage ``index``. RoPE: the init checkpoint's parameters (type, theta, scaling
    fields; a random init: default RoPE, theta 10000), with theta set by the last stage up to ``index`` that
    sets ``rope_theta``. max_position_embeddings: the longest of the checkpoint's and every stage's so far,
    so that it never drops below what the model was trained for."""
    m = config.model
    if m.init == "random":
        if vocab_size is None:
            raise ValueError("model.vocab_size is needed for a random init without a tokenizer")
        model_config = LlamaConfig(vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                            num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                            num_key_value_heads=m.num_kv_heads, initializer_range=m.init_std,
                            tie_word_embeddings=False, attention_dropout=0.0)
    else:
        read_model_config(m.init, vision=False, purpose="model.init")
        model_config = LlamaConfig.from_pretrained(m.init)
        if vocab_size is not None and vocab_size > model_config.vocab_size:
            raise ValueError(f"the tokenizer has {vocab_size} tokens but the checkpoint's vocabulary is {model_config.vocab_size}")
    theta = next((s.rope_theta for s in reversed(config.stages[:index + 1]) if s.rope_theta is not None), None)
    longest = max(s.seq_len for s in config.stages[:index + 1])
    if m.init != "random":
        longest = max(longest, model_config.max_position_embeddings)
    set_context_length(model_config, longest, rope_theta=theta)
    model_config.ringlwm_options = {"loss_chunk_size": m.loss_chunk_size, "mlp_chunk_size": m.mlp_chunk_size,
                             "norm_chunk_size": m.norm_chunk_size,
                             "activation_checkpointing": m.activation_checkpointing,
                             "activation_offloading": m.activation_offloading,
                             "attention_backend": m.attention_backend}
    if m.vision:
        options = model_config.ringlwm_options
        model_config = lwm_config_from_text(model_config, vision_vocab_size=m.vision_vocab_size,
                                     vision_loss_weight=m.vision_loss_weight, text_loss_weight=m.text_loss_weight)
        model_config.ringlwm_options = options
    return model_config


def model_class(config: TrainConfig):
    """The class a recipe trains (``ringlwm.registry``: the vision-language one with ``model.vision``)."""
    return training_class(config.model.vision)


def initial_state_dict(config: TrainConfig, model_config: LlamaConfig) -> dict | None:
    """The first stage's weights, on rank 0 only (broadcast shard by shard by ``materialize``)."""
    if dist.get_rank() != 0:
        return None
    if config.model.init == "random":
        torch.manual_seed(config.seed)
        return model_class(config)(model_config).state_dict()
    text = load_model(config.model.init, dtype=torch.float32, vision=False, purpose="model.init").state_dict()
    if config.model.vision:
        # A text checkpoint gives the shared weights; the vision table and head start new (seeded).
        torch.manual_seed(config.seed)
        model = RingLwmForCausalLM(model_config)
        missing = set(model.state_dict()) - set(text)
        model.load_state_dict(text, strict=False)
        if not missing <= {"vision_embed_tokens.weight", "vision_head.weight"}:
            raise ValueError(f"{config.model.init} lacks weights {sorted(missing)}")
        return model.state_dict()
    return text


def _model_inputs(batch: dict, vision: bool) -> dict:
    """The model's keyword arguments for one micro-batch of the loader."""
    inputs = {name: batch[name] for name in ("input_ids", "position_ids", "segment_ids", "loss_weights")}
    inputs["shift_labels"] = batch["labels"]  # the loader's labels are shifted before sharding
    if vision:
        inputs.update(vision_mask=batch["vision_mask"], label_vision_mask=batch["label_vision_mask"])
    return inputs


def train_step(model, micro: list[dict], sp_group, world: int, *, vision: bool,
               timer: PhaseTimer | None = None) -> tuple[torch.Tensor, dict]:
    """Forward and backward of one optimizer step over its micro-batches, for any ringlwm model.

    The loss of the global batch is ``sum_h c_h * S_h / W_h`` over the model's loss heads (``loss_heads``:
    coefficients c_h), with S_h the weighted loss sum and W_h the token weight of head h over every rank
    and micro-batch. The weights are known before any forward (``label_weight_sums``): one all-reduce
    gives W, and each micro-batch backpropagates ``world * sum_h c_h * s_h / W_h`` from its raw sums s_h
    (``loss_reduction="sum"``); FSDP averages the gradients over the world, which makes the update the
    gradient of the global loss, whatever the dp/sp/accumulation split. Everything stays on the device: a
    second all-reduce sums the loss for the metrics, read by the caller once per step.
    Returns (the global loss as a 0-d tensor, per-head global means when the model has several heads).
    ``timer``: a ``PhaseTimer`` that gets the forward and backward phases."""
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
        out = model(**_model_inputs(batch, vision), sp_group=sp_group, loss_reduction="sum")
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


def rope_summary(model_config: LlamaConfig) -> dict:
    """The RoPE a stage trains with: its rope_parameters and max_position_embeddings."""
    params = dict(getattr(model_config, "rope_parameters", None) or {})
    return {**params, "max_position_embeddings": model_config.max_position_embeddings}


def _is_done(config: TrainConfig, resume, index: int) -> bool:
    """Whether stage ``index`` is finished according to the checkpoint the run resumes from."""
    return resume is not None and (resume.stage > index
                                   or (resume.stage == index and resume.step >= config.stages[index].steps))


def _prepare_run(config: TrainConfig, out_dir: Path, checkpointer: Checkpointer, *, restart: bool):
    """Compare the rerun's recipe with the run's record (``run_record``), choose the checkpoint to resume
    from (the newest verified one) and write the record. Returns that checkpoint or None. Raises the same
    error on every rank when the recipe differs in a way a resume cannot honour."""
    rank = dist.get_rank()
    recipe = to_dict(config)
    if restart:
        checkpointer.clear()
        if rank == 0:
            for name in ("metrics.jsonl", "recipe.json"):
                (out_dir / name).unlink(missing_ok=True)
            shutil.rmtree(out_dir / "hf", ignore_errors=True)
    saved = read_record(out_dir)
    resume = checkpointer.latest()
    if resume is None and checkpointer.complete():
        raise RuntimeError(f"every checkpoint in {checkpointer.root} failed verification (see the warnings above); "
                           "nothing to resume from. Pass --restart to train from the start, or use a new --out")
    if saved is not None:
        changed = check_rerun(saved, recipe, out_dir=out_dir, resume_stage=resume.stage if resume else None,
                              resume_step=resume.step if resume else None,
                              stage_names=[s.name for s in config.stages])
        if changed:
            logger.info(f"recipe changes since the run's last start (allowed): {', '.join(changed)}")
    elif resume is not None:
        raise ValueError(f"{out_dir} holds checkpoints but no recipe.json, so a resume cannot be checked against "
                         "the recipe that wrote them; pass --restart to train from the start, or use a new --out")
    dist.barrier()
    if rank == 0:
        write_record(out_dir, recipe)
    return resume


def build_optimizer(config: TrainConfig, model, lr: float) -> torch.optim.Optimizer:
    """AdamW over the (sharded) parameters: weight decay on matrices, none on vectors (norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=tuple(config.optim.betas), eps=config.optim.eps,
    )


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


@dataclass
class StageRun:
    """One stage's state, built once by ``build_stage``: where this rank sits (``dims``, the ring's group), the
    model config it trains with, the sharded model, its optimizer, the loader, and the stage's place in the run
    (``offset``: the optimizer steps of the stages before it)."""

    config: TrainConfig
    index: int
    dims: ParallelDims
    sp_group: dist.ProcessGroup
    model_config: LlamaConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: object
    data_cfg: object
    device: torch.device
    offset: int

    @property
    def stage(self) -> StageConfig:
        return self.config.stages[self.index]

    @property
    def world(self) -> int:
        return self.dims.world_size

    @property
    def rope(self) -> dict:
        return rope_summary(self.model_config)


def build_stage(config: TrainConfig, index: int, world: int, device: torch.device, mixed: bool, fresh: bool) -> StageRun:
    """Mesh, model (sharded, filled), optimizer and loader of stage ``index``. ``fresh``: the first stage of
    a new run (weights from the init checkpoint or a seeded init, broadcast from rank 0)."""
    stage = config.stages[index]
    dims = ParallelDims(config.parallel.dp_replicate, config.parallel.dp_shard, stage.sp, world)
    mesh, fsdp_mesh = dims.build_mesh(device.type)
    coords = dims.coordinates(mesh)
    data_cfg = config.stage_data(stage)
    tokenizer = load_data_tokenizer(data_cfg)
    vocab = tokenizer.vocab_size if tokenizer is not None else config.model.vocab_size
    model_config = stage_model_config(config, index, config.model.vocab_size or vocab)
    with torch.device("meta"):
        model = model_class(config)(model_config)
    parallelize_llama(model, fsdp_mesh, mixed_precision=mixed)  # activation checkpointing: a model option
    materialize(model, device, initial_state_dict(config, model_config) if fresh else None, broadcast=fresh)
    optimizer = build_optimizer(config, model, stage.lr)
    loader = build_loader(data_cfg, stage, tokenizer=tokenizer, vocab_size=model_config.vocab_size,
                          dp_rank=coords["dp_rank"], dp_size=dims.dp,
                          sp_rank=coords["sp_rank"], sp_size=dims.sp, seed=config.seed + index, device=device)
    offset = sum(s.steps for s in config.stages[:index])
    return StageRun(config, index, dims, mesh["sp"].get_group(), model_config, model, optimizer, loader, data_cfg,
                    device, offset)


def train(config: TrainConfig, out_dir: str | Path, *, save_every: int | None = None, restart: bool = False) -> None:
    out_dir = Path(out_dir)
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    save_every = config.checkpoint.save_every if save_every is None else save_every
    mixed = config.model.mixed_precision
    mixed = device.type == "cuda" if mixed is None else mixed
    checkpointer = Checkpointer(out_dir, keep_last=config.checkpoint.keep_last, device=device)
    resume = _prepare_run(config, out_dir, checkpointer, restart=restart)
    if all(_is_done(config, resume, i) for i in range(len(config.stages))):
        logger.info(f"{out_dir} is complete: its newest checkpoint {resume.path.name} ends the last stage. Nothing to "
                    "train; raise the last stage's steps to continue it, or pass --restart to train again")
        return
    metrics = MetricsLogger(out_dir, enabled=rank == 0, config=to_dict(config), wandb_cfg=config.logging,
                           progress=config.logging.progress, total_steps=sum(s.steps for s in config.stages))
    if resume is None:
        metrics.truncate_after(0)  # lines of an earlier attempt that never reached a checkpoint
    else:
        logger.info(f"resuming from {resume.path} (stage {resume.stage}, step {resume.step})")

    for index, stage in enumerate(config.stages):
        if _is_done(config, resume, index):
            continue
        fresh = index == 0 and resume is None
        run = build_stage(config, index, world, device, mixed, fresh)
        logger.info(f"stage {stage.name!r}: seq_len {stage.seq_len}, sp {run.dims.sp}, RoPE {run.rope}")
        start = 0
        if resume is not None and resume.stage == index:
            if resume.world_size != world or resume.parallel != {"sp": run.dims.sp, "dp": run.dims.dp}:
                raise ValueError(f"{resume.path} was written with world size {resume.world_size} and "
                                 f"{resume.parallel}; resuming inside a stage needs the same layout")
            extra = checkpointer.load(resume, run.model, run.optimizer)
            run.loader.load_state_dict(extra["loader"])
            set_rng_state(extra["rng"])
            start = resume.step
        elif index > 0:
            previous = config.stages[index - 1]
            source = checkpointer.stage_final(index - 1, previous.steps)
            if source is None:
                raise FileNotFoundError(f"stage {stage.name!r} needs a verified checkpoint of stage {previous.name!r} at "
                                        f"its step {previous.steps} in {checkpointer.root}")
            checkpointer.load(source, run.model)
        # Only now that the weights loaded: drop the metric lines of steps the checkpoint does not cover.
        metrics.truncate_after(run.offset + start)
        _train_stage(run, start, metrics, checkpointer, save_every, resume)
        if index == len(config.stages) - 1 and config.checkpoint.export_hf:
            export_hf(run.model, run.model_config, out_dir / "hf", tokenizer_path=run.data_cfg.tokenizer)
        del run
        resume = None
    metrics.close()
    dist.barrier()


def _train_stage(run: StageRun, start: int, metrics, checkpointer, save_every, resumed_from) -> None:
    """Steps ``start`` .. ``stage.steps`` of the stage, with metrics and checkpoints. ``resumed_from``: the
    checkpoint the run resumed from, if any (named by a non-finite stop when this stage has saved none)."""
    config, stage, model, dims = run.config, run.stage, run.model, run.dims
    work = step_work(run.model_config, sum(p.numel() for p in model.parameters()), stage, dims.dp)
    grad_accum, step_flops, tokens_per_step = work.grad_accum, work.flops_per_token, work.tokens
    peak = device_peak_flops(run.device)
    rope = run.rope
    iterator = iter(run.loader)
    model.train()
    timer = PhaseTimer(run.device, config.logging.breakdown)
    profiler = StepProfiler(checkpointer.root.parent, dist.get_rank(), config.logging.profile_steps, run.device)
    last_good = resumed_from.path if resumed_from is not None else None
    skipped = 0
    for step in range(start, stage.steps):
        profiler.before(run.offset + step + 1)
        t0 = time.perf_counter()
        timer.take()  # the step starts here
        lr = lr_at(stage, step)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        micro = [next(iterator) for _ in range(grad_accum)]
        timer.mark("data")
        loss, parts = train_step(model, micro, run.sp_group, run.world, vision=config.model.vision, timer=timer)
        outcome = optimizer_step(model, run.optimizer, loss, grad_clip=config.optim.grad_clip, timer=timer)
        if not outcome.applied:
            if config.optim.on_nonfinite == "stop":
                where = (f"the last good checkpoint is {last_good}" if last_good is not None
                         else "no checkpoint was written before it")
                raise NonFiniteStepError(
                    f"step {run.offset + step + 1} (stage {stage.name!r}, step {step + 1}): the loss ({outcome.loss}) "
                    f"or the gradient norm ({outcome.grad_norm}) is not finite; the update was not applied and "
                    f"nothing was written for this step; {where}. Resume from it with a lower learning rate or "
                    "other data, or set optim.on_nonfinite: skip to drop such steps"
                )
            skipped += 1
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        seconds = time.perf_counter() - t0
        breakdown = timer.take()
        profiler.after(run.offset + step + 1)
        tokens_per_s = tokens_per_step / seconds
        # The heads' means for the metrics (the loss and the norm were read by optimizer_step).
        parts = {k: None if math.isnan(float(v)) else float(v) for k, v in parts.items()}
        metrics.log({
            "step": run.offset + step + 1, "stage": stage.name, "stage_step": step + 1,
            "loss": outcome.loss if outcome.applied else None, "lr": lr,
            "grad_norm": outcome.grad_norm if outcome.applied else None,
            "tokens": tokens_per_step, "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * step_flops / (peak * run.world) if peak else None,
            "max_memory_gb": max_memory_gb(run.device), "seq_len": stage.seq_len, "sp": dims.sp,
            "rope_theta": rope.get("rope_theta"), "rope": rope, **parts,
            **({"skipped_steps": skipped} if skipped else {}),
            **({"breakdown": breakdown} if breakdown is not None else {}),
        })
        done = step + 1 == stage.steps
        if config.checkpoint.enabled and (done or (save_every and (step + 1) % save_every == 0)):
            last_good = checkpointer.save(stage=run.index, step=step + 1, final=done, model=model,
                                          optimizer=run.optimizer,
                                          extra={"loader": run.loader.state_dict(), "rng": rng_state()},
                                          parallel={"sp": dims.sp, "dp": dims.dp})
