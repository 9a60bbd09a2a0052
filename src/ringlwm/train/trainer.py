"""The training loop: config -> run record -> per stage (``train.stage``: mesh, model, optimizer, loader) ->
steps (``train.step``: the exact global loss, the optimizer step with its finite check) -> metrics and
checkpoints.

    run = build_stage(config, index, world, device, mixed, fresh)   # StageRun
    start = run.restore(checkpointer, resume)                        # the resumed or the previous stage's weights
    loss, parts = train_step(run.model, micro, run.sp_group, run.world, vision=...)
    outcome = optimizer_step(run.model, run.optimizer, loss, grad_clip=...)   # applied only when finite
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ringlwm.distributed import init_distributed
from ringlwm.log import logger
from ringlwm.parallel.mesh import ulysses_nodes
from ringlwm.train.breakdown import PhaseTimer, StepProfiler
from ringlwm.train.checkpoint import Checkpointer, export_hf, rng_state
from ringlwm.train.config import TrainConfig, to_dict
from ringlwm.train.metrics import MetricsLogger, device_peak_flops, max_memory_gb, step_work
from ringlwm.train.run_record import prepare_run, stage_done
from ringlwm.train.stage import StageRun, build_stage
from ringlwm.train.step import NonFiniteStepError, lr_at, optimizer_step, train_step

__all__ = ["train", "NonFiniteStepError"]


def train(config: TrainConfig, out_dir: str | Path, *, save_every: int | None = None, restart: bool = False) -> None:
    """Train the recipe's stages into ``out_dir`` (under torchrun, or as one process): resume from its newest
    verified checkpoint when the recipe allows it (``run_record``), then each unfinished stage in turn, with
    metrics (``metrics.jsonl``), checkpoints every ``save_every`` steps and at each stage's end, and the last
    stage exported as a Hugging Face checkpoint (``hf/``) when ``checkpoint.export_hf``."""
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
    resume = prepare_run(config, out_dir, checkpointer, restart=restart)
    if all(stage_done(config, resume, i) for i in range(len(config.stages))):
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
        if stage_done(config, resume, index):
            continue
        run = build_stage(config, index, world, device, mixed, fresh=index == 0 and resume is None)
        ulysses = ""
        if run.dims.ulysses > 1:
            nodes = ulysses_nodes(run.ulysses_group)
            ulysses = f", ulysses {run.dims.ulysses} " + ("(inside one node)" if len(set(nodes)) == 1 else
                                                          f"(across nodes {sorted(set(nodes))}: slow all-to-all)")
        logger.info(f"stage {stage.name!r}: seq_len {stage.seq_len}, sp {run.dims.sp}{ulysses}, RoPE {run.rope}")
        start = run.restore(checkpointer, resume)
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
        loss, parts = train_step(model, micro, run.sp_group, run.world, vision=config.model.vision, timer=timer,
                                 ulysses_group=run.ulysses_group)
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
            **({"ulysses": dims.ulysses} if dims.ulysses > 1 else {}),
            "rope_theta": rope.get("rope_theta"), "rope": rope, **parts,
            **({"skipped_steps": skipped} if skipped else {}),
            **({"breakdown": breakdown} if breakdown is not None else {}),
        })
        done = step + 1 == stage.steps
        if config.checkpoint.enabled and (done or (save_every and (step + 1) % save_every == 0)):
            last_good = checkpointer.save(stage=run.index, step=step + 1, final=done, model=model,
                                          optimizer=run.optimizer,
                                          extra={"loader": run.loader.state_dict(), "rng": rng_state()},
                                          parallel=run.parallel)
