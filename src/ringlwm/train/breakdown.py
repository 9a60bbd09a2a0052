"""Where a training step's time goes: phase timers (``logging.breakdown``) and a profiler summary by category
(``logging.profile_steps``).

Phase timers split the wall time of each step into data (the loader), forward, backward, grad_norm (the
clipping norm and its all-reduce), optimizer, and other (the loss all-reduces, bookkeeping); they add up to
the step's time. On a GPU each phase ends with a device synchronisation, so the times are the device's,
at the price of the overlap between phases.

The profiler summary runs torch.profiler over a few steps and sums each operator's self time (time in the
operator itself, not in the operators it calls, so categories do not double count) into categories:
matmul, attention (the block kernels), ring (the ring's own step loop, merges and waits on its point-to-point
transfers), dtensor (DTensor dispatch), communication (collectives and their waits), fsdp (FSDP2's copy-in/copy-out and hooks), host_read (``.item()``-style reads that wait for the
device), optimizer, loss, elementwise and other. On CPU self time is where the cores went; on GPU the
device times are given as well.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

PHASES = ("data", "forward", "backward", "grad_norm", "optimizer", "other")


class PhaseTimer:
    """``mark(phase)`` closes the phase that ran since the previous mark; ``take()`` returns the step's
    seconds per phase (``other`` gets what no phase claimed) and starts the next step."""

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled
        self.sync = enabled and device.type == "cuda"
        self.device = device
        self._start = self._last = time.perf_counter()
        self._times = dict.fromkeys(PHASES, 0.0)

    def mark(self, phase: str) -> None:
        if not self.enabled:
            return
        if self.sync:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self._times[phase] += now - self._last
        self._last = now

    def take(self) -> dict | None:
        if not self.enabled:
            return None
        if self.sync:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        times = dict(self._times)
        times["other"] += (now - self._start) - sum(times.values())
        self._start = self._last = now
        self._times = dict.fromkeys(PHASES, 0.0)
        return {k: round(v, 6) for k, v in times.items()}


# Operator name -> category, first match wins (lower-case substring tests).
_RULES = (
    ("attention", ("ringlwm::block_attention", "ringlwm.block_attention", "scaled_dot_product", "flash")),
    ("ring", ("ringattention",)),  # the ring's own Python: step loop, merges, waits on its sends and receives
    ("dtensor", ("pythonsubclass",)),  # DTensor dispatch
    ("communication", ("gloo", "nccl", "c10d::", "record_param_comms", "all_gather", "allgather", "reduce_scatter",
                       "all_reduce", "allreduce", "broadcast", "send", "recv", "barrier", "wait_tensor",
                       "_wait", "wait")),
    ("fsdp", ("fsdp",)),
    ("host_read", ("_local_scalar_dense", "aten::item", "aten::is_nonzero", "cudastreamsynchronize",
                   "cudadevicesynchronize")),
    ("optimizer", ("optimizer.step", "adamw", "_foreach", "_fused_adam")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "gemm", "aten::baddbmm")),
    ("loss", ("logsumexp", "cross_entropy", "nll_loss", "log_softmax", "gather")),
    ("copy", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::cat", "aten::clone", "aten::contiguous",
              "aten::split", "aten::chunk", "aten::narrow", "aten::slice", "aten::view", "aten::empty",
              "aten::zeros", "aten::fill_", "aten::zero_")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::pow", "aten::rsqrt", "aten::mean",
                     "aten::silu", "aten::exp", "aten::where", "aten::neg", "aten::sum", "aten::sqrt",
                     "aten::embedding", "aten::index", "aten::cos", "aten::sin", "aten::sigmoid")),
)


def categorize(name: str) -> str:
    low = name.lower()
    for category, needles in _RULES:
        if any(n in low for n in needles):
            return category
    return "other"


def summarize_profile(prof, steps: int) -> dict:
    """Seconds per step by category (self CPU time; self device time too where recorded) and the top
    operators, from a finished torch.profiler.profile."""
    cpu: dict[str, float] = {}
    device: dict[str, float] = {}
    top = []
    for event in prof.key_averages():
        category = categorize(event.key)
        self_cpu = event.self_cpu_time_total / 1e6 / steps
        self_device = getattr(event, "self_device_time_total", 0) / 1e6 / steps
        cpu[category] = cpu.get(category, 0.0) + self_cpu
        if self_device:
            device[category] = device.get(category, 0.0) + self_device
        top.append((self_cpu, event.key, category, event.count // steps))
    top.sort(reverse=True)
    return {
        "steps": steps,
        "cpu_seconds_per_step": {k: round(v, 6) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])},
        "device_seconds_per_step": {k: round(v, 6) for k, v in sorted(device.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": name, "category": cat, "cpu_seconds_per_step": round(t, 6), "calls_per_step": n}
                    for t, name, cat, n in top[:25]],
    }


class StepProfiler:
    """torch.profiler over steps [first, last] (1-based global step numbers) of this rank; on the last one,
    writes OUT/profile/rank{rank}.json (``summarize_profile``)."""

    def __init__(self, out_dir: Path, rank: int, steps: list[int] | None, device: torch.device):
        self.window = tuple(steps) if steps else None
        self.path = Path(out_dir) / "profile" / f"rank{rank}.json"
        self.device = device
        self._prof = None

    def before(self, step: int) -> None:
        if self.window and step == self.window[0] and self._prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()

    def after(self, step: int) -> None:
        if self._prof is None or step != self.window[1]:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._prof.__exit__(None, None, None)
        summary = summarize_profile(self._prof, self.window[1] - self.window[0] + 1)
        self._prof = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(summary, indent=1))
