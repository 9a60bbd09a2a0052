"""Per-step metrics: OUT/metrics.jsonl, wandb (offline unless told otherwise), a progress bar on rank 0.

The progress bar redraws in place on a terminal; when stderr is a file or a pipe (a log of ``make demo``,
a SLURM job), a redraw per step would fill the log, so a plain progress line is written every
``PLAIN_PROGRESS_SECONDS`` instead (and at the last step).

Throughput and MFU. tokens_per_s counts every token of the global batch (packing fills sequences, so
padding is small). Model FLOPs per token follow the PaLM appendix: 6 * parameters for the matmuls,
plus 6 * layers * hidden * seq_len for causal attention (12 * L * H * S, halved by the causal mask).
MFU divides by the device's dense bf16 peak; it is null where that peak is unknown (CPUs).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from ringlwm.log import logger

# Dense bf16 peak FLOP/s (vendor data sheets, without sparsity).
PLAIN_PROGRESS_SECONDS = 10.0

_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAK_FLOPS.items():
        if key in name:
            return peak
    return None


def cpu_matmul_flops(threads: int = 2, size: int = 2048) -> float:
    """This machine's fp32 matmul FLOP/s on ``threads`` threads (mean of 10 after 3 warm-up products of two
    ``size`` x ``size`` matrices): the CPU's peak for MFU, and what a CPU run's time scales with."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(3):
            a @ b
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        return 10 * 2 * size**3 / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)


def cpu_times(stat: Path = Path("/proc/stat")) -> tuple[int, int] | None:
    """(steal, total) CPU time in clock ticks since boot, summed over this machine's CPUs, from Linux's
    /proc/stat; None elsewhere. The difference of two readings gives the share of CPU time the hypervisor gave
    to other guests (steal) while a run was timed: a run on a shared cloud machine is slower by about that."""
    try:
        fields = stat.read_text().splitlines()[0].split()
    except OSError:
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    ticks = [int(x) for x in fields[1:]]
    return ticks[7], sum(ticks[:8])  # user nice system idle iowait irq softirq steal (guest is within user)


def steal_fraction(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    """The share of CPU time stolen between two ``cpu_times`` readings (None when either is None)."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])


def flops_per_token(num_params: int, num_layers: int, hidden: int, seq_len: int) -> float:
    return 6.0 * num_params + 6.0 * num_layers * hidden * seq_len


@dataclass(frozen=True)
class StepWork:
    """One optimizer step of a stage: training FLOPs per token, micro-batches per step, tokens over the world."""

    flops_per_token: float
    grad_accum: int
    tokens: int


def step_work(model_config, num_params: int, stage, dp: int) -> StepWork:
    """What one optimizer step of ``stage`` computes with ``dp`` data-parallel ranks (the trainer's metrics and
    the planner's time estimate both start here)."""
    grad_accum = stage.resolve_grad_accum(dp)
    per_token = flops_per_token(num_params, model_config.num_hidden_layers, model_config.hidden_size,
                                stage.seq_len)
    return StepWork(per_token, grad_accum, stage.seq_len * stage.batch_size * dp * grad_accum)


def max_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


class MetricsLogger:
    """Rank 0 writes; other ranks' calls are no-ops."""

    def __init__(self, out_dir: Path, *, enabled: bool, config: dict, wandb_cfg, progress: bool, total_steps: int):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._wandb = None
        self._bar = None
        self._plain = False
        self._total = total_steps
        self._done = 0
        self._last_line = float("-inf")
        self._start = time.monotonic()
        if not enabled:
            return
        if wandb_cfg.wandb:
            self._wandb = self._init_wandb(Path(out_dir), config, wandb_cfg)
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)
        elif progress:
            self._plain = True

    @staticmethod
    def _init_wandb(out_dir: Path, config: dict, cfg):
        try:
            import wandb
        except ImportError:
            logger.info("wandb is not installed: logging to metrics.jsonl only (pip install wandb)")
            return None
        os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
        id_file = out_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        return wandb.init(project=cfg.wandb_project, id=run_id, resume="allow", dir=str(out_dir), config=config)

    def truncate_after(self, global_step: int) -> None:
        """On resume: drop lines of steps the checkpoint does not cover (they will be run again)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= global_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self._done = global_step
        if self._bar is not None:
            self._bar.n = global_step
            self._bar.refresh()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
        self._done = record["step"]
        if self._bar is not None:
            self._bar.n = self._done
            self._bar.set_postfix(stage=record["stage"], loss=f"{record['loss']:.4f}",
                                  tok_s=f"{record['tokens_per_s']:.0f}")
        elif self._plain:
            now = time.monotonic()
            if now - self._last_line >= PLAIN_PROGRESS_SECONDS or self._done == self._total:
                self._last_line = now
                print(f"train: step {self._done}/{self._total} stage {record['stage']} loss {record['loss']:.4f} "
                      f"lr {record['lr']:.3g} {record['tokens_per_s']:.0f} tok/s "
                      f"({now - self._start:.0f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
