"""The run directory remembers the recipe that trained it, so that a rerun never silently does something else.

``OUT/recipe.json`` holds the resolved recipe (file + key=value overrides + --steps) of the run's first
start. A rerun with the same ``--out`` compares its own resolved recipe with it:
- the same recipe: resume from the newest verified checkpoint (or say that the run is complete);
- only schedule, bookkeeping and exact memory keys changed (``stages.N.steps``, ``stages.N.warmup_steps``,
  ``checkpoint.*``, ``logging.*``, ``model.activation_checkpointing``, ``model.activation_offloading``,
  ``model.offload_prefetch``: the last three change where activations live, never a value;
  ``parallel.fsdp_units``: how parameters are gathered, not the checkpoint layout): allowed where the checkpoints allow it. More steps for the stage that holds the newest
  checkpoint continue training it; the learning-rate schedule of that stage is recomputed for its new
  number of steps (warmup, then cosine down to ``min_lr_ratio`` at the new last step) from the resumed
  step on. Steps below what a checkpoint already holds, or new steps for a stage that a later stage has
  already started from, are errors;
- anything else (model shape, data, tokenizer, stage list, learning rate, parallel layout, seed): an error
  naming the differing keys, unless ``--restart`` discards the run's checkpoints and metrics first.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import torch.distributed as dist

from ringlwm.log import logger
from ringlwm.runtime import describe_differences
from ringlwm.train.config import TrainConfig, to_dict

RECORD = "recipe.json"
ADJUSTABLE = ("stages.*.steps", "stages.*.warmup_steps", "checkpoint.*", "logging.*",
              "model.activation_checkpointing", "model.activation_offloading", "model.offload_prefetch",
              "model.ulysses_recompute", "parallel.fsdp_units")


def flatten(tree, prefix: str = "") -> dict:
    """Nested dicts and lists of dicts -> {dotted.key: value}; lists of scalars stay whole values."""
    flat = {}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and any(isinstance(x, (dict, list)) for x in tree):
        items = enumerate(tree)
    else:
        return {prefix[:-1]: tree}
    for key, value in items:
        if isinstance(value, (dict, list)) and value and (isinstance(value, dict)
                                                          or any(isinstance(x, (dict, list)) for x in value)):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_record(out_dir: Path) -> dict | None:
    path = Path(out_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def write_record(out_dir: Path, recipe: dict) -> None:
    path = Path(out_dir) / RECORD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(recipe, indent=1))
    tmp.replace(path)


def check_rerun(saved: dict, current: dict, *, out_dir: Path, resume_stage: int | None,
                resume_step: int | None, stage_names: list[str]) -> list[str]:
    """Compare a rerun's recipe with the run's record. Returns the changed keys (all allowed) or raises
    ValueError naming what differs and what would work. ``resume_stage``/``resume_step``: the checkpoint
    the rerun resumes from (None: none yet, so any schedule change is allowed)."""
    old, new = flatten(saved), flatten(current)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k, "<absent>") != new.get(k, "<absent>")]
    fixed = [k for k in changed if not any(fnmatch.fnmatchcase(k, pattern) for pattern in ADJUSTABLE)]
    if fixed:
        raise ValueError(
            f"{out_dir} was trained with another recipe: {describe_differences(old, new, fixed)}. Rerun with the "
            f"same recipe and overrides to resume, choose a new --out, or pass --restart to discard {out_dir}'s "
            "checkpoints and metrics and train from the start")
    if resume_stage is None:
        return changed
    for key in changed:
        parts = key.split(".")
        if parts[0] != "stages" or parts[2] not in ("steps", "warmup_steps"):
            continue
        index = int(parts[1])
        name = stage_names[index]
        if index < resume_stage:
            raise ValueError(
                f"{key} changed ({describe_differences(old, new, [key])}), but stage {name!r} is finished and "
                f"stage {stage_names[resume_stage]!r} already started from its end; more steps can only go to "
                f"stage {stage_names[resume_stage]!r} or later. Pass --restart to train again from the start")
        if index == resume_stage and parts[2] == "steps" and new[key] < resume_step:
            raise ValueError(
                f"{key} is {new[key]}, but the newest checkpoint already holds {resume_step} steps of stage "
                f"{name!r}; give at least {resume_step}, or pass --restart to train again from the start")
    return changed


def stage_done(config: TrainConfig, resume, index: int) -> bool:
    """Whether stage ``index`` is finished according to the checkpoint the run resumes from."""
    return resume is not None and (resume.stage > index
                                   or (resume.stage == index and resume.step >= config.stages[index].steps))


def prepare_run(config: TrainConfig, out_dir: Path, checkpointer, *, restart: bool):
    """Compare the rerun's recipe with the run's record, choose the checkpoint to resume from (the newest
    verified one of ``checkpointer``, a ``Checkpointer``) and write the record. Returns that checkpoint or
    None. Raises the same error on every rank when the recipe differs in a way a resume cannot honour."""
    rank = dist.get_rank()
    recipe = to_dict(config)
    if restart:
        checkpointer.clear()
        if rank == 0:
            for name in ("metrics.jsonl", RECORD):
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
