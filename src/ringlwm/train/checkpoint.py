"""Sharded checkpoints with torch.distributed.checkpoint, written atomically.

Layout: OUT/checkpoints/stage{S:02d}-step{N:07d}/ with the DCP shards of model and optimizer,
``extra-rank{R}.pt`` (this rank's data-loader position and RNG states) and ``meta.json``.

Atomicity: everything is written into ``.tmp-<name>``; after a barrier rank 0 writes ``meta.json`` and
renames the folder into place (a rename within one file system is atomic). A crash at any point leaves
either a complete checkpoint or a ``.tmp-`` folder that is never read and is cleared by the next save.

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
    def __init__(self, out_dir: str | Path, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be at least 1, got {keep_last}")
        self.root = Path(out_dir) / "checkpoints"
        self.keep_last = keep_last

    @staticmethod
    def name(stage: int, step: int) -> str:
        return f"stage{stage:02d}-step{step:07d}"

    def complete(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first."""
        found = []
        if not self.root.is_dir():
            return found
        for path in self.root.iterdir():
            match = _NAME.match(path.name)
            meta_file = path / "meta.json"
            if match and meta_file.is_file():
                meta = json.loads(meta_file.read_text())
                found.append(CheckpointInfo(path, int(match[1]), int(match[2]), meta["final"], meta["world_size"],
                                            meta["parallel"]))
        return sorted(found, key=lambda c: (c.stage, c.step))

    def latest(self) -> CheckpointInfo | None:
        done = self.complete()
        return done[-1] if done else None

    def stage_final(self, stage: int) -> CheckpointInfo | None:
        for info in reversed(self.complete()):
            if info.stage == stage and info.final:
                return info
        return None

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
            meta = {"stage": stage, "step": step, "final": final,
                    "world_size": dist.get_world_size() if dist.is_initialized() else 1, "parallel": parallel}
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


def export_hf(model, llama, path: Path, tokenizer_path: str | Path | None = None) -> None:
    """Write the trained weights as a plain Hugging Face Llama checkpoint (with its tokenizer) on rank 0."""
    from transformers import LlamaForCausalLM

    from ringlwm.models import RingLwmForCausalLM

    state = full_model_state_dict(model)
    if _rank() == 0:
        config = type(llama).from_dict(llama.to_dict())
        config._attn_implementation = None
        # A text model becomes a plain LlamaForCausalLM; a vision-language one keeps its class (LwmConfig is
        # registered with AutoConfig / AutoModelForCausalLM).
        hf = RingLwmForCausalLM(config) if isinstance(model, RingLwmForCausalLM) else LlamaForCausalLM(config)
        hf.load_state_dict(state)
        hf.save_pretrained(path)
        if tokenizer_path is not None:
            export_hf_tokenizer(tokenizer_path, Path(path))
    _barrier()
