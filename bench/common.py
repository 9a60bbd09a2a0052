"""Shared benchmark plumbing: timing, run stamps, CSV rows, printed tables.

Every figure a benchmark reports is a ratio against a reference measured in the same run (this machine
is shared and noisy); absolute numbers stand beside it.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

# RINGLWM_BENCH_RESULTS redirects the CSVs (make gpu-check writes bench/results/gpu/).
RESULTS = Path(os.environ.get("RINGLWM_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stamp(device: torch.device) -> dict:
    """Columns that say where and when a row was measured."""
    import ringlwm

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "device": device_name(device),
        "git": git_revision(),
        "ringlwm": ringlwm.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, *, warmup: int = 2, reps: int = 5, min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds (device-synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start_all < min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def append_csv(name: str, rows: list[dict]) -> Path:
    """Append rows to bench/results/<name>.csv. Columns: the file's, then any new ones the rows bring (the
    file is rewritten with the wider header; older rows get empty cells there)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    old_rows, fields = [], []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            old_rows = list(reader)
    new_fields = [k for row in rows for k in row if k not in fields]
    fields += list(dict.fromkeys(new_fields))
    if new_fields and old_rows:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(old_rows)
    with path.open("a" if path.exists() and (old_rows or not new_fields) else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if f.tell() == 0:
            writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
