"""Sharded checkpoints with torch.distributed.checkpoint, written atomically.

Layout: OUT/checkpoints/stage{S:02d}-step{N:07d}/ with the DCP shards of model and optimizer,
``extra-rank{R}.pt`` (this rank's data-loader position and RNG states) and ``meta.json``.

Atomicity: everything is written into ``.tmp-<name>``; after a barrier rank 0 writes ``meta.json`` and
renames the folder into place (a rename within one file system is atomic). A crash at any point leaves
either a complete checkpoint or a ``.tmp-`` folder that is never read and is cleared by the next save.

Verification: ``meta.json`` is written last and holds a manifest, every file of every rank with its size.
Before a checkpoint is used, every rank checks the manifest against the disk (a stat per file) and the
ranks agree on the result (one all-reduce); a resume takes the newest checkpoint that passes, with a
warning naming what was wrong with each newer one (a deleted or truncated file, a missing rank).

Resharding: DCP stores global tensors, so a checkpoint loads into a different FSDP/sp layout: that is how
a stage with another sequence-parallel degree starts from the previous stage's final weights. The
loader positions are per rank, so resuming *within* a stage needs the same world size and degrees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ringlwm.log import logger

_NAME = re.compile(r"^stage(\d{2})-step(\d{7})$")


@dataclass
class CheckpointInfo:
    path: Path
    stage: int
    step: int
    """Optimizer steps completed in that stage."""
    final: bool
    world_size: int
    parallel: dict


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    @staticmethod
    def name(stage: int, step: int) -> str:
        return f"stage{stage:02d}-step{step:07d}"

    def __init__(self, out_dir: str | Path, keep_last: int = 2, device: torch.device | str = "cpu"):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be at least 1, got {keep_last}")
        self.root = Path(out_dir) / "checkpoints"
        self.keep_last = keep_last
        self.device = torch.device(device)

    def complete(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first."""
        found = []
        if not self.root.is_dir():
            return found
        for path in self.root.iterdir():
            match = _NAME.match(path.name)
            meta_file = path / "meta.json"
            if match and meta_file.is_file():
                try:
                    meta = json.loads(meta_file.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    logger.info(f"warning: skipping checkpoint {path}: its meta.json is damaged")
                    continue
                found.append(CheckpointInfo(path, int(match[1]), int(match[2]), meta["final"], meta["world_size"],
                                            meta["parallel"]))
        return sorted(found, key=lambda c: (c.stage, c.step))

    @staticmethod
    def problem(info: CheckpointInfo) -> str | None:
        """What is wrong with a checkpoint on this rank's view of the disk, or None when its manifest holds."""
        meta = json.loads((info.path / "meta.json").read_text())
        files = meta.get("files")
        if files is None:
            return None  # written before manifests existed: nothing to check against
        for name, size in files.items():
            file = info.path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
        return None

    def usable(self, candidates: list[CheckpointInfo]) -> list[CheckpointInfo]:
        """The candidates (as rank 0 lists them) that pass verification on every rank, newest first. Each
        rejected newer one is reported on rank 0 with its reason; every rank returns the same list."""
        names = [c.path.name for c in candidates]
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [names]
            dist.broadcast_object_list(box, src=0)
            names = box[0]
        by_name = {c.path.name: c for c in self.complete()}
        problems = []
        for name in names:
            info = by_name.get(name)
            problems.append("it is gone or lost its meta.json" if info is None else self.problem(info))
        bad = torch.tensor([p is not None for p in problems], dtype=torch.int32, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1 and len(names):
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        good = []
        for name, problem, rejected in zip(names, problems, bad.tolist()):
            if rejected:
                if problem is not None:  # this rank's own finding: every rank that has one says it
                    logger.warning(f"warning: skipping checkpoint {self.root / name}: {problem}")
                else:
                    logger.info(f"warning: skipping checkpoint {self.root / name}: another rank found it incomplete")
            else:
                good.append(by_name[name])
        return sorted(good, key=lambda c: (c.stage, c.step), reverse=True)

    def latest(self) -> CheckpointInfo | None:
        """The newest checkpoint that passes verification on every rank (see ``usable``)."""
        for info in self.usable(sorted(self.complete(), key=lambda c: (c.stage, c.step), reverse=True)):
            return info
        return None

    def stage_final(self, stage: int, steps: int) -> CheckpointInfo | None:
        """The verified checkpoint at the end of ``stage`` (``steps`` optimizer steps), or None."""
        ends = [c for c in self.complete() if c.stage == stage and c.step == steps]
        good = self.usable(ends)
        return good[0] if good else None

    def save(self, *, stage: int, step: int, final: bool, model, optimizer, extra: dict, parallel: dict) -> Path:
        name = self.name(stage, step)
        tmp, dest = self.root / f".tmp-{name}", self.root / name
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=str(tmp))
        torch.save(extra, tmp / f"extra-rank{_rank()}.pt")
        _barrier()
        if _rank() == 0:
            world = dist.get_world_size() if dist.is_initialized() else 1
            missing = [r for r in range(world) if not (tmp / f"extra-rank{r}.pt").is_file()]
            if missing:
                raise RuntimeError(f"checkpoint {tmp}: ranks {missing} wrote no extra-rank file")
            # The manifest covers every rank's files (the folder is on a file system all ranks share, as
            # torch.distributed.checkpoint requires); meta.json is the last file written.
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            meta = {"stage": stage, "step": step, "final": final, "world_size": world, "parallel": parallel,
                    "files": files}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if dest.exists():  # a re-run that saves the same step again
                shutil.rmtree(dest)
            os.replace(tmp, dest)
            self._retain()
        _barrier()
        return dest

    def _retain(self) -> None:
        """Keep the newest ``keep_last`` checkpoints, and every stage's final one."""
        done = self.complete()
        newest = {c.path for c in done[-self.keep_last:]}
        for info in done:
            if info.path not in newest and not info.final:
                shutil.rmtree(info.path, ignore_errors=True)

    def load(self, info: CheckpointInfo, model, optimizer=None) -> dict | None:
        """Load model (and optimizer) state, resharded to the current layout. Returns this rank's extras
        when an optimizer is given (a resume), None otherwise (a new stage starting from these weights)."""
        state = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            state["optim"] = get_optimizer_state_dict(model, optimizer)
        dcp.load(state, checkpoint_id=str(info.path))
        set_model_state_dict(model, state["model"])
        if optimizer is None:
            return None
        set_optimizer_state_dict(model, optimizer, state["optim"])
        extra_file = info.path / f"extra-rank{_rank()}.pt"
        if not extra_file.is_file():
            raise FileNotFoundError(f"{extra_file} is missing: the checkpoint was written by fewer ranks")
        return torch.load(extra_file, weights_only=False)

    def clear(self) -> None:
        """Remove every checkpoint (``--restart``); rank 0 deletes, all ranks wait."""
        if _rank() == 0 and self.root.is_dir():
            shutil.rmtree(self.root)
        _barrier()


def full_model_state_dict(model) -> dict:
    """The whole model's weights on rank 0's CPU (empty dict elsewhere), gathered shard by shard."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def export_hf_tokenizer(tokenizer_path: str | Path, out_dir: Path) -> None:
    """Save the training tokenizer in Hugging Face form beside the model, so that ``AutoTokenizer`` (and
    tools built on it, such as lm-evaluation-harness) load the checkpoint directory as it is. A
    sentencepiece model becomes a Llama tokenizer that adds BOS, as the training documents start with it."""
    from transformers import AutoTokenizer, LlamaTokenizer

    source = Path(tokenizer_path)
    if source.is_dir():
        AutoTokenizer.from_pretrained(source).save_pretrained(out_dir)
        return
    shutil.copyfile(source, out_dir / "tokenizer.model")
    LlamaTokenizer.from_pretrained(out_dir, add_bos_token=True, add_eos_token=False).save_pretrained(out_dir)


def export_hf(model, model_config, path: Path, tokenizer_path: str | Path | None = None) -> None:
    """Write the trained weights as a plain Hugging Face Llama checkpoint (with its tokenizer) on rank 0."""
    from transformers import LlamaForCausalLM

    from ringlwm.models import RingLwmForCausalLM
    from ringlwm.models.llama import plain_config_dict

    state = full_model_state_dict(model)
    if _rank() == 0:
        config = type(model_config).from_dict(plain_config_dict(model_config.to_dict()))
        config._attn_implementation = None
        # A text model becomes a plain LlamaForCausalLM; a vision-language one keeps its class (LwmConfig is
        # registered with AutoConfig / AutoModelForCausalLM).
        hf = RingLwmForCausalLM(config) if isinstance(model, RingLwmForCausalLM) else LlamaForCausalLM(config)
        hf.load_state_dict(state)
        hf.save_pretrained(path)
        if tokenizer_path is not None:
            export_hf_tokenizer(tokenizer_path, Path(path))
    _barrier()
