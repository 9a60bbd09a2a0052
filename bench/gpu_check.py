"""`make gpu-check`: what only a GPU can tell, in one script of at most 9 minutes on one H100/H200.

    python -m bench.gpu_check [--parts tests,error,backends,ring,train,options,kernels] [--budget 540]

Parts, each in its own subprocess with its own time limit (a part that cannot run prints why and is
skipped; the others go on):
  tests    the kernel tests, compiled for the GPU (bf16 included: the CPU interpreter gets bf16 tl.dot wrong)
  error    bf16 error against an fp64 reference of ringlwm's Triton kernels and of SDPA's flash backend,
           forward and backward, head_dim 64 and 128, causal
  backends every block backend that runs here (triton, torch_flash, cudnn, flash_attn) against fp64 (error) and
           each other (fwd+bwd time, d64/d128, causal and not, 4K-64K tokens, packed documents): bench.backends;
           writes the table that ``attention_backend: auto`` reads
  kernels  the kernels benchmark against SDPA flash: 16K tokens per batch, model width 2048, head_dim 64/128,
           causal and not, 1K-16K tokens
  ring     ring_attention on 2 processes sharing the one GPU, blocks computed by each backend on it, against
           fp64 full attention, beside the same backend's single-device error (NCCL refuses two ranks on one
           GPU, so the ring runs on gloo, which stages the K/V blocks through host memory: exactness, not speed)
  train    one training step of 4 Llama-3-8B-sized layers (width 4096, GQA 32/8, vocabulary 128,256) at
           32K tokens through the trainer: peak memory, tokens/s and MFU
  options  the same layers at 16K tokens, two steps, with each memory option of issue 26 on and off
           (attention_head_chunks, offload_prefetch, parallel.offload: params): equal losses, peak memory
           against the planner's, step time
Writes bench/results/gpu/*.csv and prints one table. Without a GPU (the CPU rehearsal) every part that
needs one says so and is skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "gpu"
# The benchmark goes last: it takes what the budget leaves and keeps the rows measured by then.
PARTS = ("tests", "error", "backends", "ring", "train", "options", "kernels")
LIMITS = {"tests": 120, "error": 60, "backends": 200, "ring": 90, "train": 120, "options": 150,
          "kernels": 240}  # seconds
# issue 26's options, each against the same run without it: (name, recipe overrides)
OPTION_RUNS = [
    ("baseline", []),
    ("attention_head_chunks=4", ["model.attention_head_chunks=4"]),
    ("offloading, offload_prefetch=false", ["model.activation_offloading=true", "model.offload_prefetch=false"]),
    ("offloading, offload_prefetch=true", ["model.activation_offloading=true"]),
    ("parallel.offload=params", ["parallel.offload=params"]),
]

EIGHT_B_LAYERS = {
    "model": {"init": "random", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
              "num_layers": 4, "num_heads": 32, "num_kv_heads": 8, "activation_checkpointing": True,
              "mlp_chunk_size": 8192, "loss_chunk_size": 8192},
    "data": {"sources": [{"format": "synthetic", "synthetic_lengths": [1024, 32768]}]},
    "stages": [{"name": "s32k", "seq_len": 32768, "rope_theta": 500000.0, "steps": 3, "lr": 1.0e-5, "sp": 1}],
    "checkpoint": {"enabled": False, "export_hf": False},
    "logging": {"wandb": False, "progress": False},
}


def _run(command: list[str], limit: float, env: dict | None = None) -> tuple[int, str]:
    """Run a part's command; (return code, its output tail). 124 when it ran out of time."""
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                              env={**os.environ, **(env or {})})
        return proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return 124, out[-4000:]


def _write_csv(name: str, rows: list[dict]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def part_tests(limit: float) -> dict:
    code, out = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels",
                         "tests/models/test_offload.py"], limit)
    last = [line for line in out.splitlines() if " passed" in line or " failed" in line]
    return {"status": "ok" if code == 0 else f"exit {code}", "result": last[-1] if last else out[-300:]}


def bf16_errors() -> list[dict]:
    """Max abs error against fp64 (SDPA's math backend on the GPU) of out, dq, dk, dv in bf16, for ringlwm's
    Triton kernels and SDPA flash; the ratio is the kernels' error over SDPA's (the tests allow 2x)."""
    import torch.nn.functional as F
    from ringlwm.kernels import blockwise_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for head_dim in (64, 128):
        gen = torch.Generator(device="cuda").manual_seed(head_dim)
        shape = (2, 16, 4096, head_dim)
        q, k, v, dout = (torch.randn(shape, device="cuda", generator=gen, dtype=torch.float64) for _ in range(4))

        def grads(fn, dtype, q=q, k=k, v=v, dout=dout):
            leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
            out = fn(*leaves)
            out.backward(dout.to(dtype))
            return [out.detach().double()] + [t.grad.double() for t in leaves]

        def sdpa_math(q, k, v):
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def sdpa_flash(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        reference = grads(sdpa_math, torch.float64)
        ours = grads(lambda q, k, v: blockwise_attention(q, k, v, causal=True, backend="triton"), torch.bfloat16)
        theirs = grads(sdpa_flash, torch.bfloat16)
        for name, r, a, b in zip(("out", "dq", "dk", "dv"), reference, ours, theirs):
            err_ours, err_sdpa = (a - r).abs().max().item(), (b - r).abs().max().item()
            rows.append({"head_dim": head_dim, "seqlen": shape[2], "tensor": name, "ringlwm_err": err_ours,
                         "sdpa_flash_err": err_sdpa, "ratio": err_ours / max(err_sdpa, 1e-30)})
    return rows


def part_error(limit: float) -> dict:
    code, out = _run([sys.executable, "-c", "import json, bench.gpu_check as g; print(json.dumps(g.bf16_errors()))"],
                     limit)
    if code != 0:
        return {"status": f"exit {code}", "result": out[-300:]}
    rows = json.loads(out.strip().splitlines()[-1])
    _write_csv("bf16_error", rows)
    worst = max(rows, key=lambda r: r["ratio"])
    return {"status": "ok", "result": f"worst ratio to SDPA flash {worst['ratio']:.2f} ({worst['tensor']}, "
                                      f"d={worst['head_dim']})"}


def part_kernels(limit: float) -> dict:
    code, out = _run([sys.executable, "-c", "from bench import kernels; kernels.main()"], limit,
                     env={"RINGLWM_BENCH_RESULTS": str(OUT)})
    if code != 0:
        return {"status": f"exit {code}", "result": out[-300:]}
    rows = list(csv.DictReader((OUT / "kernels.csv").open()))
    ours = [r for r in rows if r["impl"] == "ringlwm" and r["causal"] == "True" and r["head_dim"] == "128"
            and 4096 <= int(r["seqlen"]) <= 16384]
    speedups = ", ".join(f"{r['seqlen']}: {float(r['fwdbwd_speedup_vs_sdpa']):.2f}x" for r in ours[-3:])
    return {"status": "ok", "result": f"fwd+bwd vs SDPA flash, d=128 causal: {speedups}"}


def part_backends(limit: float) -> dict:
    code, out = _run([sys.executable, "-m", "bench.backends", "--budget", str(max(30.0, limit - 60))], limit,
                     env={"RINGLWM_BENCH_RESULTS": str(OUT)})
    if code != 0:
        return {"status": f"exit {code}", "result": out[-300:]}
    chosen = [line for line in out.splitlines() if line.startswith("auto on")]
    print(out[-4000:])
    return {"status": "ok", "result": chosen[-1] if chosen else "no table written (see bench/results/gpu/backends.csv)"}


def _ring_worker() -> None:
    """One rank of the one-GPU ring check (run under torchrun by ``part_ring``): each backend's ring against fp64
    full attention, beside the same backend's error on one device."""
    import torch.distributed as dist
    from ringlwm.kernels import blockwise_attention

    from bench.backends import available_backends
    from ringlwm import ring_attention, shard_sequence, unshard_sequence

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    device = torch.device("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 4096, 128, device="cuda", generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 4096, 128, device="cuda", generator=gen, dtype=torch.float64) for _ in range(2))
    ids = torch.zeros(1, 4096, dtype=torch.long)
    ids[0, torch.tensor([700, 1500, 2900, 3100])] = 1
    ids = ids.cumsum(-1).cuda()
    rows = []
    for backend in available_backends(device):
        cases = [(torch.bfloat16, True, None), (torch.bfloat16, True, ids), (torch.bfloat16, False, None)]
        if backend == "triton":
            cases += [(torch.float32, True, None), (torch.float32, False, None)]
        for dtype, causal, seg in cases:
            reference = blockwise_attention(q.cpu(), k.cpu(), v.cpu(), causal=causal, backend="cpu",
                                            segment_ids=None if seg is None else seg.cpu()).cuda()
            single = blockwise_attention(*(t.to(dtype) for t in (q, k, v)), causal=causal, segment_ids=seg,
                                         backend=backend)
            local = [shard_sequence(t.to(dtype), dim=2) for t in (q, k, v)]
            local_seg = None if seg is None else shard_sequence(seg, dim=1)
            out = unshard_sequence(ring_attention(*local, causal=causal, segment_ids=local_seg, backend=backend),
                                   dim=2)
            rows.append({"backend": backend, "dtype": str(dtype).replace("torch.", ""), "causal": causal,
                         "packed": seg is not None, "ring_err_vs_fp64": (out.double() - reference).abs().max().item(),
                         "single_device_err_vs_fp64": (single.double() - reference).abs().max().item()})
    if rank == 0:
        print(json.dumps(rows))
    dist.destroy_process_group()


def part_ring(limit: float) -> dict:
    code, out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                      "bench.gpu_check", "--ring-worker"], limit)
    if code != 0:
        return {"status": f"exit {code}", "result": out[-300:]}
    rows = json.loads([line for line in out.splitlines() if line.startswith("[")][-1])
    _write_csv("ring", rows)
    worst = {}
    for row in rows:
        worst[row["backend"]] = max(worst.get(row["backend"], 0.0),
                                    row["ring_err_vs_fp64"] / max(row["single_device_err_vs_fp64"], 1e-30))
    return {"status": "ok", "result": "ring error / one-device error, worst: "
                                      + ", ".join(f"{b} {r:.2f}" for b, r in worst.items())}


def part_train(limit: float) -> dict:
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "eight_b_layers.yaml"
        recipe.write_text(yaml.safe_dump(EIGHT_B_LAYERS))
        code, out = _run([sys.executable, "-m", "ringlwm.train", str(recipe), "--out", str(Path(tmp) / "run")], limit)
        if code != 0:
            return {"status": f"exit {code}", "result": out[-300:]}
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        # The planner's peak for the same recipe (fake devices, on this machine's CPU), against the allocator's.
        code, plan_out = _run([sys.executable, "-m", "ringlwm.plan", str(recipe), "--json", "--overhead", "0",
                               "--world-size", "1"], max(30.0, limit / 4))
    planned = None
    if code == 0:
        plan = json.loads(plan_out.strip().splitlines()[-1])
        planned = plan["memory_bytes"]["total"] / 2**30
    for row in rows:
        row["planned_peak_gib"] = planned
    _write_csv("train_8b_layers", rows)
    last = rows[-1]  # the first step compiles and autotunes
    real = max(r["max_memory_gb"] for r in rows)
    versus = (f", planner {planned:.1f} GiB ({planned / real - 1:+.1%} vs max_memory_allocated {real:.1f})"
              if planned else f", planner failed: {plan_out[-200:]}")
    return {"status": "ok", "result": f"{last['tokens_per_s']:.0f} tok/s, MFU {last['mfu'] or 0:.3f}, "
                                      f"peak {last['max_memory_gb']:.1f} GiB{versus}"}


def part_options(limit: float) -> dict:
    """Each option of ``OPTION_RUNS`` on 4 8B-sized layers at 16K tokens, 2 steps: the losses equal the
    baseline's (the options are exact), max_memory_allocated within 10 % of the planner's peak."""
    import yaml

    rows, deadline = [], time.monotonic() + limit
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "eight_b_layers.yaml"
        recipe.write_text(yaml.safe_dump(EIGHT_B_LAYERS))
        for name, overrides in OPTION_RUNS:
            left = deadline - time.monotonic()
            if left < 20:
                break
            common = ["stages.0.seq_len=16384", "stages.0.steps=2", *overrides]
            out_dir = Path(tmp) / name.replace(" ", "_").replace(",", "").replace("=", "-")
            code, out = _run([sys.executable, "-m", "ringlwm.train", str(recipe), "--out", str(out_dir), *common],
                             left)
            if code != 0:
                rows.append({"option": name, "status": f"exit {code}", "detail": out[-200:]})
                continue
            steps = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
            code, plan_out = _run([sys.executable, "-m", "ringlwm.plan", str(recipe), *common, "--json",
                                   "--overhead", "0", "--world-size", "1"], max(20.0, deadline - time.monotonic()))
            planned = json.loads(plan_out.strip().splitlines()[-1])["memory_bytes"]["total"] / 2**30 if code == 0 else None
            real = max(s["max_memory_gb"] for s in steps)
            rows.append({"option": name, "status": "ok", "losses": [s["loss"] for s in steps],
                         "peak_gib": real, "planned_gib": planned,
                         "planned_vs_real": None if planned is None else round(planned / real - 1, 4),
                         "step_seconds": steps[-1]["tokens"] / steps[-1]["tokens_per_s"]})
    _write_csv("options_8b_layers", rows)
    base = next((r for r in rows if r["option"] == "baseline" and r["status"] == "ok"), None)
    notes = []
    for r in rows:
        if r["status"] != "ok":
            notes.append(f"{r['option']}: {r['status']}")
            continue
        same = base is not None and r["losses"] == base["losses"]
        notes.append(f"{r['option']}: losses {'equal' if same else 'DIFFER'}, peak {r['peak_gib']:.1f} GiB "
                     f"(planner {r['planned_vs_real']:+.1%})" if r["planned_vs_real"] is not None else
                     f"{r['option']}: peak {r['peak_gib']:.1f} GiB, planner failed")
    return {"status": "ok" if rows else "no run", "result": "; ".join(notes)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all parts together")
    parser.add_argument("--ring-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ring_worker:
        _ring_worker()
        return
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if gpu else "no GPU"
    start = time.monotonic()
    summary = []
    for part in parts:
        left = args.budget - (time.monotonic() - start)
        if not gpu and part != "tests":
            summary.append({"part": part, "status": "skipped", "result": "needs a CUDA GPU"})
        elif left < 20:
            summary.append({"part": part, "status": "skipped", "result": f"out of budget ({args.budget:.0f} s)"})
        else:
            t0 = time.monotonic()
            row = globals()[f"part_{part}"](min(LIMITS[part], left))
            summary.append({"part": part, **row, "seconds": round(time.monotonic() - t0, 1)})
        print(f"[gpu-check] {part}: {summary[-1]['status']}: {summary[-1]['result']}", flush=True)
    stamp = {"device": device, "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "torch": torch.__version__}
    if gpu:
        _write_csv("summary", [{**stamp, **row} for row in summary])
    print(f"\ngpu-check on {device}:")
    width = max(len(r["part"]) for r in summary)
    for row in summary:
        print(f"  {row['part']:<{width}}  {row['status']:<8}  {row['result']}")


if __name__ == "__main__":
    main()
