"""`make bench PART=plan`: the planner (``ringlwm.plan``) against real CPU steps, and the 8B table.

    python -m bench.plan [--quick] [--validate-only | --table-only]

1. Validation (bench/results/plan_validation.csv): small Llamas (widths 256-1024, 2 layers, local lengths
   1K-16K, W = 1, 2, 4 gloo processes). For each, the planner's fake step and the same step run for real
   on CPU, both measured by FSDPMemTracker: the peak per category must agree within 5 %, and the process's
   RSS growth (VmHWM during the step minus VmRSS before the model is built) within 15 % of the planned
   total.
2. Checks (bench/results/plan_checks.csv): fixed lengths against 80 GB per GPU, with the headroom: LWM-Text
   7B's 1M stage on 8 GPUs, Llama-3.1-8B at 4M on 8 and 16M on 32.
0. Goals (bench/results/plan_goals.csv): the shipped recipes under recipes/scale/ planned as they are, with
   the host-side costs (copies at 25 GB/s, the host AdamW step), and the host AdamW step timed on this CPU
   (bench/results/host_adamw.csv: fused against foreach, seconds per parameter).
3. Planning table (bench/results/plan_8b.csv): bf16 Llama-3.1-8B (GQA 32/8, vocabulary 128,256), 80 GB per
   GPU, 2 TiB host memory per node of 8: the longest sequence that fits on 1, 8 and 32 GPUs with each set
   of memory options, and the memory by category at that length.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# (name, hidden, intermediate, layers, heads, kv_heads, vocab, local_len, world, activation checkpointing,
#  mlp_chunk_size, loss_chunk_size[, further recipe overrides])
OFFLOAD_PARAMS = ("parallel.offload=params",)
HEAD_CHUNKS = ("model.attention_head_chunks=2",)
ULYSSES_RECOMPUTE = ("stages.0.sp=1", "stages.0.ulysses=2", "model.ulysses_recompute=true")
CASES = [
    ("h256-1k-w1", 256, 688, 2, 4, 2, 4096, 1024, 1, False, None, 1024),
    ("h512-4k-w2-ac", 512, 1376, 2, 8, 2, 8192, 4096, 2, True, 1024, 1024),
    ("h1024-2k-w2", 1024, 2752, 2, 8, 4, 8192, 2048, 2, False, None, 2048),
    ("h256-16k-w1-ac", 256, 688, 2, 4, 2, 4096, 16384, 1, True, 4096, 4096),
    ("h512-8k-w4-ac", 512, 1376, 2, 8, 2, 8192, 8192, 4, True, 2048, 2048),
    # issue 26's options: attention in head chunks; parameters, gradients and AdamW state on the host
    ("h512-4k-w2-ac-heads2", 512, 1376, 2, 8, 2, 8192, 4096, 2, True, 1024, 1024, HEAD_CHUNKS),
    ("h512-4k-w2-ac-offload", 512, 1376, 2, 8, 2, 8192, 4096, 2, True, 1024, 1024, OFFLOAD_PARAMS),
    ("h512-4k-u2-ac-recompute", 512, 1376, 2, 8, 2, 8192, 4096, 2, True, 1024, 1024, ULYSSES_RECOMPUTE),
]
QUICK = CASES[:3]

# The 8B table: Llama-3.1-8B on the LWM text recipe's long stage, one ring over all GPUs, with option sets
# from the recipe's own (activation checkpointing, MLP and loss in 8K chunks) to every memory option.
TABLE_RECIPE = "recipes/lwm_text_7b.yaml"
TABLE_STAGE = "512k"
TABLE_GPUS = (8, 32, 1)
TABLE_GRANULE = 4096  # tokens per GPU of the search: lengths are multiples of 8K per GPU
TABLE_START = 128 * 1024  # tokens per GPU of the first probe
HOST_MEMORY = "2TiB"  # per node of 8 GPUs (a DGX H100 has 2 TiB)
RECIPE_OPTIONS = "recipe: checkpointing, MLP and loss in 8K chunks"
ALL_OPTIONS = ["model.activation_offloading=true", "model.norm_chunk_size=8192", "model.loss_chunk_size=2048"]
TABLE_OPTIONS = {
    RECIPE_OPTIONS: [],
    "+ offloaded, RMSNorm in 8K chunks, loss in 2K chunks": ALL_OPTIONS,
}
ALL_LABEL = list(TABLE_OPTIONS)[-1]
# (GPUs, option set, first probe in tokens per GPU): each 8B probe takes 1-2 min on 2 cores.
TABLE_RUNS = [(8, RECIPE_OPTIONS, 128 * 1024), (8, ALL_LABEL, 512 * 1024), (32, ALL_LABEL, 512 * 1024),
              (1, ALL_LABEL, 0)]
# Fixed-length checks: (label, model preset, stage, GPUs, sequence length, options).
CHECKS = [
    ("LWM-Text 7B (Llama-2-7B), its 1M stage on 8 GPUs", "llama-2-7b", "1m", 8, 2**20, RECIPE_OPTIONS),
    ("Llama-3.1-8B, 4M on 8 GPUs (goal: beat ALST's 3.7M)", "llama-3.1-8b", TABLE_STAGE, 8, 4 * 2**20,
     ALL_LABEL),
    ("Llama-3.1-8B, 16M on 32 GPUs (goal)", "llama-3.1-8b", TABLE_STAGE, 32, 16 * 2**20, ALL_LABEL),
]
# The 2-D layout at the same scales: (label, model, stage, GPUs, sequence length, options, ulysses degree).
CHECKS_2D = [
    ("Llama-3.1-8B, 4M on 8 GPUs, Ulysses 8 (one node, no ring)", "llama-3.1-8b", TABLE_STAGE, 8, 4 * 2**20,
     ALL_LABEL, 8),
    ("Llama-3.1-8B, 16M on 32 GPUs, Ulysses 8 x ring 4", "llama-3.1-8b", TABLE_STAGE, 32, 16 * 2**20, ALL_LABEL, 8),
]
# Issue 26's goals, each a shipped recipe planned as it is: (label, recipe, GPUs, memory per GPU).
GOALS = [
    ("Llama-3.1-8B, 1.5M tokens on one H200", "recipes/scale/llama3_8b_1gpu.yaml", 1, "141GB"),
    ("Llama-3.1-8B, 6M tokens on 8 x 80 GB", "recipes/scale/llama3_8b_8gpu.yaml", 8, "80GB"),
    ("Llama-3.1-8B, 24M tokens on 32 x 80 GB", "recipes/scale/llama3_8b_32gpu.yaml", 32, "80GB"),
]
GOALS_CSV = RESULTS / "plan_goals.csv"
HOST_ADAMW_CSV = RESULTS / "host_adamw.csv"
CHECKS_2D_CSV = RESULTS / "plan_2d.csv"
CHECKS_CSV = RESULTS / "plan_checks.csv"
VALIDATION_CSV = RESULTS / "plan_validation.csv"
TABLE_CSV = RESULTS / "plan_8b.csv"


def case_config(case):
    from ringlwm.plan import load_recipe

    name, h, inter, layers, heads, kv, vocab, local, world, ac, mlp, loss_chunk, *extra = case
    overrides = [f"model.hidden_size={h}", f"model.intermediate_size={inter}", f"model.num_layers={layers}",
                 f"model.num_heads={heads}", f"model.num_kv_heads={kv}", f"model.vocab_size={vocab}",
                 f"model.activation_checkpointing={str(ac).lower()}",
                 f"model.mlp_chunk_size={mlp if mlp else 'null'}", f"model.loss_chunk_size={loss_chunk}",
                 f"stages.0.sp={world}", "stages.0.batch_size=1", *(extra[0] if extra else ())]
    config, _ = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml", overrides)
    return config


def validate_case(case) -> dict:
    """Plan and run one validation case; the CSV row."""
    from ringlwm.plan import make_setup, validate

    name, h, inter, layers, heads, kv, vocab, local, world, ac, mlp, loss_chunk, *extra = case
    setup = make_setup(case_config(case), 0, None, world, local * world, backend="cpu")
    t0 = time.perf_counter()
    r = validate(setup)
    row = {"case": name, "hidden": h, "layers": layers, "heads": f"{heads}/{kv}", "vocab": vocab,
           "local_len": local, "world": world, "activation_checkpointing": ac, "mlp_chunk": mlp or "",
           "loss_chunk": loss_chunk, "options": " ".join(extra[0]) if extra else ""}
    for cat in ("parameters", "gradients", "optimizer", "activations", "temporaries", "communication", "total"):
        row[f"{cat}_planned"] = r["planned"][cat]
        row[f"{cat}_real"] = r["real"][cat]
    row["max_category_rel_diff"] = round(max(r["rel_diff"].values()), 6)
    row["step_growth_planned"] = r["planned"]["step_growth"]
    row["rss_step_growth"] = r["rss_step_growth"]
    row["rss_step_rel_diff"] = round(r["rss_step_rel_diff"], 4)
    row["rss_process_growth"] = r["rss_growth"]
    row["rss_process_rel_diff"] = round(r["rss_rel_diff"], 4)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


_CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries", "communication", "total")


def _memory_columns(rec: dict) -> dict:
    mem = rec["memory_bytes"]
    row = {f"{k}_gib": round(mem[k] / 2**30, 2) for k in _CATEGORIES}
    row.update(gpu_gib=round(rec["gpu_bytes"] / 2**30, 2), gpu_limit_gib=round(rec["gpu_memory"] / 2**30, 2),
               host_per_gpu_gib=round(rec["host_bytes"] / 2**30, 2),
               host_per_node_gib=round(rec["host_node_bytes"] / 2**30, 2), fits=rec["fits"],
               step_seconds_h100_mfu40=round(rec["step_seconds"], 1),
               tokens_per_s_per_gpu=round(rec["tokens_per_s_per_gpu"], 1))
    return row


def _table_config(label: str, model: str = "llama-3.1-8b", stage: str = TABLE_STAGE):
    from ringlwm.plan import Budget, load_recipe, parse_bytes

    config, preset = load_recipe(Path(__file__).resolve().parents[1] / TABLE_RECIPE, TABLE_OPTIONS[label],
                                 model=model)
    index = [s.name for s in config.stages].index(stage)
    return config, preset, index, Budget(gpu_memory=80 * 10**9, host_memory=parse_bytes(HOST_MEMORY))


def table_row(gpus: int, label: str, start: int, log=print) -> dict:
    from ringlwm.plan import fmt_tokens, make_setup, max_seq_len, plan_step, summarize

    config, preset, index, budget = _table_config(label)
    t0 = time.perf_counter()
    row = {"model": "Llama-3.1-8B", "gpus": gpus, "gpu_memory": "80 GB", "options": label}
    # One GPU: the parameters and optimizer state alone (8B x (4 + 4 + 8) bytes = 128 GB) exceed 80 GB.
    length, rec = (0, None) if gpus == 1 else max_seq_len(
        config, index, preset, gpus, budget, sp=gpus, log=lambda m: log(m, flush=True), granule=TABLE_GRANULE,
        start=(start or TABLE_START) * gpus)
    row.update(max_seq_len=length, max_seq_len_human=fmt_tokens(length) if length else "0",
               tokens_per_gpu=length // gpus if length else 0)
    if rec is None:
        setup = make_setup(config, index, preset, gpus, 2 * gpus * 512, sp=gpus)
        rec = summarize(setup, plan_step(setup), budget)
        row["note"] = (f"nothing fits: at {fmt_tokens(rec['seq_len'])} tokens the step needs "
                       f"{rec['gpu_bytes'] / 2**30:.1f} GiB, parameters and optimizer state "
                       f"{(rec['memory_bytes']['parameters'] + rec['memory_bytes']['optimizer']) / 2**30:.1f} GiB")
    row.update(_memory_columns(rec))
    row["plan_seconds"] = round(time.perf_counter() - t0, 1)
    return row


def check_row(label: str, model: str, stage: str, gpus: int, seq_len: int, options: str, ulysses: int = 1) -> dict:
    from ringlwm.plan import make_setup, plan_step, summarize

    config, preset, index, budget = _table_config(options, model, stage)
    t0 = time.perf_counter()
    setup = make_setup(config, index, preset, gpus, seq_len, sp=gpus // ulysses, ulysses=ulysses)
    rec = summarize(setup, plan_step(setup), budget)
    row = {"check": label, "model": model, "stage": stage, "gpus": gpus, "sp": gpus // ulysses, "ulysses": ulysses,
           "seq_len": seq_len, "tokens_per_gpu": seq_len // gpus, "options": options, **_memory_columns(rec),
           "headroom_gib": round((rec["gpu_memory"] - rec["gpu_bytes"]) / 2**30, 2),
           "plan_seconds": round(time.perf_counter() - t0, 1)}
    return row


def _host_columns(rec: dict) -> dict:
    cost = rec["host_costs"]
    return {"host_to_gpu_gib": round(cost["to_device_bytes"] / 2**30, 1),
            "gpu_to_host_gib": round(cost["to_host_bytes"] / 2**30, 1),
            "pcie_gb_per_s": cost["pcie_bytes_per_s"] / 1e9, "copy_seconds": round(cost["copy_seconds"], 1),
            "copy_seconds_not_overlapped": round(cost["exposed_copy_seconds"], 1),
            "host_adamw_seconds": round(cost["host_adamw_seconds"], 1),
            "step_seconds_bound": round(cost["step_seconds_bound"], 1)}


def goal_row(label: str, recipe: str, gpus: int, gpu_memory: str) -> dict:
    """One of issue 26's goals: the shipped recipe planned as it is (its own stage, length and layout)."""
    from ringlwm.plan import Budget, load_recipe, make_setup, parse_bytes, plan_step, summarize

    config, preset = load_recipe(Path(__file__).resolve().parents[1] / recipe)
    budget = Budget(gpu_memory=parse_bytes(gpu_memory), host_memory=parse_bytes(HOST_MEMORY))
    t0 = time.perf_counter()
    setup = make_setup(config, 0, preset, gpus, None)
    rec = summarize(setup, plan_step(setup), budget)
    stage = setup.stage
    return {"goal": label, "recipe": recipe, "gpus": gpus, "sp": stage.sp, "ulysses": stage.ulysses,
            "seq_len": stage.seq_len, "tokens_per_gpu": stage.seq_len // gpus, **_memory_columns(rec),
            "headroom_gib": round((rec["gpu_memory"] - rec["gpu_bytes"]) / 2**30, 2), **_host_columns(rec),
            "plan_seconds": round(time.perf_counter() - t0, 1)}


def host_adamw(sizes=(2**22, 2**25), repeats: int = 5) -> list[dict]:
    """The optimizer step of ``parallel.offload: params`` on this CPU: torch's fused CPU AdamW against its
    foreach implementation (the reference, same run), fp32, 8 tensors per step, seconds per parameter at
    each thread count this machine has."""
    import torch

    rows = []
    threads = torch.get_num_threads()
    for n in sizes:
        params = [torch.zeros(n // 8, requires_grad=True) for _ in range(8)]
        for p in params:
            p.grad = torch.randn_like(p)
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            per = {}
            for name, kw in (("fused", {"fused": True}), ("foreach", {"foreach": True})):
                opt = torch.optim.AdamW(params, lr=1e-5, **kw)
                opt.step()
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    opt.step()
                    best = min(best, time.perf_counter() - t0)
                per[name] = best / n
            rows.append({"parameters": n, "threads": t, "fused_ns_per_param": round(per["fused"] * 1e9, 3),
                         "foreach_ns_per_param": round(per["foreach"] * 1e9, 3),
                         "fused_speedup": round(per["foreach"] / per["fused"], 2),
                         "llama_8b_seconds": round(per["fused"] * 8.03e9, 1)})
        torch.set_num_threads(threads)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main(quick: bool = False, validation: bool = True, table: bool = True, goals: bool = True) -> None:
    if goals:
        rows = host_adamw()
        for row in rows:
            print(json.dumps(row), flush=True)
        write_csv(HOST_ADAMW_CSV, rows)
        rows = []
        for goal in GOALS:
            rows.append(goal_row(*goal))
            print(json.dumps(rows[-1]), flush=True)
            write_csv(GOALS_CSV, rows)
    if validation:
        rows = []
        for case in QUICK if quick else CASES:
            rows.append(validate_case(case))
            print(json.dumps(rows[-1]), flush=True)
        write_csv(VALIDATION_CSV, rows)
    if table:
        rows = []
        for label, model, stage, gpus, seq_len, options in CHECKS:
            rows.append(check_row(label, model, stage, gpus, seq_len, options))
            print(json.dumps(rows[-1]), flush=True)
            write_csv(CHECKS_CSV, rows)
        rows = []
        for label, model, stage, gpus, seq_len, options, ulysses in CHECKS_2D:
            rows.append(check_row(label, model, stage, gpus, seq_len, options, ulysses))
            print(json.dumps(rows[-1]), flush=True)
            write_csv(CHECKS_2D_CSV, rows)
        rows = []
        for gpus, label, start in TABLE_RUNS:
            rows.append(table_row(gpus, label, start))
            print(json.dumps(rows[-1]), flush=True)
            write_csv(TABLE_CSV, rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--validate-only", action="store_true")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--goals-only", action="store_true", help="issue 26's goal recipes and the host AdamW")
    args = parser.parse_args()
    main(quick=args.quick, validation=not (args.table_only or args.goals_only),
         table=not (args.validate_only or args.goals_only), goals=not (args.validate_only or args.table_only))
