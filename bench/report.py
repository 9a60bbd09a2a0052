"""Markdown summary and PNG plots of bench/results/*.csv (the newest run of each part).

    python -m bench.report        (also run at the end of `make bench`)
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from bench.common import RESULTS


def _latest(name: str) -> list[dict]:
    path = RESULTS / f"{name}.csv"
    if not path.is_file():
        return []
    rows = list(csv.DictReader(path.open()))
    if not rows:
        return []
    newest = max(r["date"] for r in rows)
    return [r for r in rows if r["date"] == newest]


def _table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return lines


def _plot(path: Path, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str,
          logx: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _compile_section(rows: list[dict]) -> list[str]:
    """The compile report (bench/compile.py): per kernel, target, head_dim and dtype, the largest spill-free
    configuration of the autotune list (causal; segment ids alike unless noted)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["kernel"], r["arch"], int(r["head_dim"]), r["dtype"])].append(r)
    order = {"fwd": 0, "dkdv": 1, "dq": 2}
    table = []
    for key in sorted(groups, key=lambda k: (order.get(k[0], 9), k[1], k[2], k[3])):
        rs = groups[key]
        ok = [r for r in rs if r["spill_free"] == "True"]
        causal = [r for r in (ok or rs) if r["variant"] == "causal"] or ok or rs
        best = max(causal, key=lambda r: (r["spill_free"] == "True", int(r["block_m"]) * int(r["block_n"]),
                                          int(r["num_stages"]), -int(r["stack"] or 0)))
        table.append({
            "kernel": key[0], "arch": key[1], "head_dim": key[2], "dtype": key[3],
            "config": f"{best['block_m']}x{best['block_n']} w{best['num_warps']} s{best['num_stages']}",
            "regs": best["regs"], "stack": best["stack"], "smem_kib": f"{int(best['smem']) / 1024:.0f}",
            "tensor_core": f"HGMMA {best['hgmma']}" if int(best["hgmma"] or 0) else f"HMMA {best['hmma']}",
            "cp_async": best["cp_async"], "spill_free": f"{len(ok)}/{len(rs)}",
            "errors": sum(bool(r["error"]) for r in rs),
        })
    first = rows[0]
    return [f"## Kernel compile report (no GPU: triton {first['triton']} and its ptxas, {first['date']})", "",
            "Every autotune configuration compiled for sm_80 and sm_90 on this machine (`make bench PART=compile`,",
            "bench/compile.py). Per row: the largest spill-free configuration (causal), its registers per thread,",
            "stack frame (bytes; > 0 means spills), shared memory, tensor-core and cp.async instruction counts;",
            "spill_free counts the spill-free configurations over all configurations and variants compiled.", ""] + \
        _table(table, ["kernel", "arch", "head_dim", "dtype", "config", "regs", "stack", "smem_kib", "tensor_core",
                       "cp_async", "spill_free", "errors"]) + [""]


def main() -> Path:
    out = ["# ringlwm benchmark results", "",
           "Every figure is measured against a reference timed in the same run; the CSVs beside this file hold",
           "all rows (device, date, git revision, versions). Regenerate with `make bench` or `python -m bench.report`.",
           ""]
    kernels = _latest("kernels")
    if kernels:
        out += [f"## Kernels ({kernels[0]['device']}, {kernels[0]['date']})", ""]
        out += _table(kernels, ["impl", "dtype", "causal", "seqlen", "head_dim", "fwd_ms", "bwd_ms", "fwdbwd_ms",
                                "fwdbwd_tflops", "fwdbwd_speedup_vs_sdpa"]) + [""]
        series = defaultdict(list)
        for r in kernels:
            series[f"{r['impl']} d{r['head_dim']} {'causal' if r['causal'] == 'True' else 'full'}"].append(
                (int(r["seqlen"]), float(r["fwdbwd_tflops"])))
        _plot(RESULTS / "kernels.png", series, "sequence length", "fwd+bwd TFLOP/s", "Attention kernels")
        out += ["![kernels](kernels.png)", ""]
    ring = _latest("ring")
    if ring:
        out += [f"## Ring attention ({ring[0]['device']}, {ring[0]['date']})", "",
                "efficiency = (single-process fused SDPA time / W) / ring time; attn_mem_mb = growth of a rank's",
                "peak memory during the timed steps.", ""]
        out += _table(ring, ["world_size", "seqlen", "local_seqlen", "ideal_s", "ring_s", "efficiency",
                             "attn_mem_mb"]) + [""]
        eff, mem = defaultdict(list), defaultdict(list)
        for r in ring:
            eff[f"W={r['world_size']}"].append((int(r["seqlen"]), float(r["efficiency"])))
            mem[f"W={r['world_size']}"].append((int(r["local_seqlen"]), float(r["attn_mem_mb"])))
        _plot(RESULTS / "ring_efficiency.png", eff, "sequence length", "efficiency vs ideal", "Ring efficiency")
        _plot(RESULTS / "ring_memory.png", mem, "local sequence length", "MB per rank", "Ring memory per rank")
        out += ["![ring efficiency](ring_efficiency.png) ![ring memory](ring_memory.png)", ""]
    memory = _latest("ring_memory")
    if memory:
        out += ["## Training a tiny model: memory per rank and the longest trainable sequence", ""]
        out += _table(memory, ["world_size", "seqlen", "local_seqlen", "step_s", "step_mem_mb", "longest_at_12gib"])
        out += ["", "`longest_at_12gib`: extrapolated from a linear fit of the measured step memory (compute at",
                "such lengths would take hours here).", ""]
    compiled = _latest("compile")
    if compiled:
        out += _compile_section(compiled)
    for name, title, columns in (
        ("long", "One training step at 128K tokens (2 processes)",
         ["world_size", "seqlen", "local_seqlen", "step_s", "step_mem_mb", "peak_rss_mb"]),
        ("train", "Training throughput", ["shape", "impl", "tokens_per_s", "vs_hf", "vs_hf_documents", "vs_hf_ddp",
                                          "mfu", "matmul_peak_gflops"]),
        ("data", "Data pipeline", None),
    ):
        rows = _latest(name)
        if rows:
            out += [f"## {title} ({rows[0]['device']}, {rows[0]['date']})", ""]
            out += _table(rows, columns or [c for c in rows[0] if c not in ("date", "device", "git", "ringlwm",
                                                                            "torch", "triton")]) + [""]
    train = [r for r in (_latest("train") or []) if r.get("t_forward")]
    if train:
        out += ["### Where a ringlwm step's time goes (seconds per step)", "",
                "Phases (`logging.breakdown`, wall time) and rank 0's self CPU time by profiler category",
                "(`logging.profile_steps`, over two steps after the timed ones).", ""]
        phases = [c for c in train[0] if c.startswith("t_")]
        cpu = sorted({c for r in train for c in r if c.startswith("cpu_") and r[c]},
                     key=lambda c: -max(float(r[c] or 0) for r in train))
        out += _table(train, ["shape", "impl", *phases]) + [""]
        out += _table(train, ["shape", "impl", *cpu[:10]]) + [""]
    path = RESULTS / "SUMMARY.md"
    path.write_text("\n".join(out) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
