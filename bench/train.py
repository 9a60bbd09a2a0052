"""Training throughput: the ringlwm trainer (sp = 1 and sp = 2 on 2 processes) against plain Hugging Face.

    python -m bench.run --part train [--quick]

Two shapes, each one data stream (synthetic packed documents) and one global batch of 2 sequences per step:
- ``tiny``: 4 layers, width 128, 2 x 1024 tokens (overheads dominate);
- ``compute``: 4 layers, width 512, 2 x 4096 tokens, 17M parameters (matmuls and attention dominate).

ringlwm runs ``torchrun -m ringlwm.train`` with 2 processes of 1 thread: sp = 1 (data parallel over FSDP2) and
sp = 2 (the ring), with ``logging.breakdown`` (phase times: data, forward, backward, grad_norm, optimizer,
other) and ``logging.profile_steps`` (rank 0's self CPU time per category: matmul, attention, ring,
communication, fsdp, dtensor, host_read, ...). Two references train plain ``LlamaForCausalLM`` (SDPA) on the
same batches with a minimal loop: one process with 2 threads (``hf-sdpa``, transformers' default call, whose
attention crosses the packed documents: it builds no document mask while a KV cache is on, and
``use_cache`` defaults to on), the same with ``use_cache=False`` (``hf-sdpa documents``: the document mask
ringlwm applies, so the same model), and two processes of 1 thread with DDP (``hf-ddp``: the same split of
the machine into processes as ringlwm). Tokens/s is the median over
the steps after a warmup; ratios are against both references measured in the same run. MFU: model FLOPs
(6 N + attention, PaLM's count) per second over the fp32 matmul peak of this machine measured in the same run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from bench.common import append_csv, print_table, stamp
from ringlwm.train.metrics import cpu_matmul_flops

SHAPES = {
    "tiny": {"model": {"init": "random", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
                       "num_layers": 4, "num_heads": 4, "num_kv_heads": 4},
             "seq": 1024, "lengths": [64, 900], "steps": 40, "warmup": 8},
    "compute": {"model": {"init": "random", "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1376,
                          "num_layers": 4, "num_heads": 8, "num_kv_heads": 8},
                "seq": 4096, "lengths": [256, 3600], "steps": 12, "warmup": 3},
}
BATCH = 2  # sequences per optimizer step (global)
PHASES = ("data", "forward", "backward", "grad_norm", "optimizer", "other")


def _llama_config(shape: dict):
    """The benchmarked model as a plain Hugging Face config (the same shape the recipe gives ringlwm)."""
    from transformers import LlamaConfig

    m = shape["model"]
    return LlamaConfig(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
                       intermediate_size=m["intermediate_size"], num_hidden_layers=m["num_layers"],
                       num_attention_heads=m["num_heads"], num_key_value_heads=m["num_kv_heads"],
                       max_position_embeddings=shape["seq"], tie_word_embeddings=False)


def _recipe(shape: dict, sp: int, steps: int) -> dict:
    return {
        "model": shape["model"],
        "data": {"sources": [{"format": "synthetic", "synthetic_lengths": shape["lengths"]}], "seed": 0},
        "stages": [{"name": "bench", "seq_len": shape["seq"], "rope_theta": 10000.0, "steps": steps, "lr": 1.0e-3,
                    "batch_size": BATCH // (2 // sp), "sp": sp}],
        "checkpoint": {"enabled": False},
        "logging": {"wandb": False, "progress": False, "breakdown": True},
    }


def _ringlwm_run(shape: dict, sp: int, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(_recipe(shape, sp, steps)))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        window = f"logging.profile_steps=[{steps - 1}, {steps}]"  # the last two steps (the profiler slows them)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "ringlwm.train", str(recipe), "--out", str(Path(tmp) / "run"), window], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        profile = json.loads((Path(tmp) / "run" / "profile" / "rank0.json").read_text())
    timed = rows[warmup:steps - 2]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "max_memory_gb": max(r["max_memory_gb"] for r in timed),
            "breakdown": {p: statistics.median(r["breakdown"][p] for r in timed) for p in PHASES},
            "profile": profile["cpu_seconds_per_step"]}


def _hf_batches(shape: dict, steps: int, dp_rank: int, dp_size: int):
    from ringlwm.train.config import load_config
    from ringlwm.train.data import build_loader

    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(_recipe(shape, 1, steps)))
        config = load_config(recipe)
    loader = build_loader(config.data, config.stages[0], tokenizer=None, vocab_size=shape["model"]["vocab_size"],
                          dp_rank=dp_rank, dp_size=dp_size, sp_rank=0, sp_size=1, seed=0, device=None)
    loader.batch_size = BATCH // dp_size
    return loader


def _hf_loop(model, loader, steps: int, weight_total=None, documents: bool = False) -> list[float]:
    """Plain training steps; returns each step's seconds. ``weight_total``: all-reduce the token count (DDP).
    ``documents``: keep attention inside packed documents. transformers derives that mask from position_ids
    only without a KV cache; with its default ``use_cache`` (a cache is made in training too) the attention
    is plain causal over the packed row, across documents (cheaper, and not the model ringlwm trains)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    times = []
    for _, batch in zip(range(steps), loader):
        t0 = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False if documents else None).logits
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                             ignore_index=-100, reduction="none")
        weights = batch["loss_weights"].sum()
        if weight_total is not None:
            weights = weight_total(weights)
        loss = (ce * batch["loss_weights"].reshape(-1)).sum() / weights
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def _hf_model(shape: dict):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config(shape)).to(torch.float32)
    model.config._attn_implementation = "sdpa"
    return model


def _hf_tokens_per_s(shape: dict, steps: int, warmup: int, documents: bool = False) -> float:
    """Plain LlamaForCausalLM (SDPA) on the same packed batches, one process, 2 threads."""
    loader = _hf_batches(shape, steps, 0, 1)
    model = _hf_model(shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        times = _hf_loop(model, loader, steps, documents=documents)
    finally:
        torch.set_num_threads(threads)
    return BATCH * shape["seq"] / statistics.median(times[warmup:])


def _hf_ddp_rank(rank: int, world: int, shape: dict, steps: int, warmup: int) -> float:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    loader = _hf_batches(shape, steps, rank, world)
    model = DistributedDataParallel(_hf_model(shape))

    def weight_total(w):
        w = w.clone()
        dist.all_reduce(w)
        return w / world  # DDP averages gradients over the ranks: scale back to the global token mean

    times = _hf_loop(model, loader, steps, weight_total)
    return statistics.median(times[warmup:])


def _hf_ddp_tokens_per_s(shape: dict, steps: int, warmup: int) -> float:
    """The same loop on 2 processes of 1 thread with DDP (gloo), each on its own sequence."""
    from ringlwm.distributed import run_local

    seconds = run_local(_hf_ddp_rank, 2, shape, steps, warmup, threads_per_rank=1)
    return BATCH * shape["seq"] / max(seconds)


def run_shape(name: str, shape: dict, base: dict, peak: float, quick: bool) -> list[dict]:
    from transformers import LlamaForCausalLM

    from ringlwm.train.metrics import flops_per_token

    steps, warmup = (max(6, shape["steps"] // 3), 2) if quick else (shape["steps"], shape["warmup"])
    params = sum(p.numel() for p in LlamaForCausalLM(_llama_config(shape)).parameters())
    per_token = flops_per_token(params, shape["model"]["num_layers"], shape["model"]["hidden_size"], shape["seq"])
    reference = _hf_tokens_per_s(shape, steps, warmup)
    masked = _hf_tokens_per_s(shape, steps, warmup, documents=True)
    ddp = _hf_ddp_tokens_per_s(shape, steps, warmup)
    rows = [dict(base, shape=name, impl="hf-sdpa (1 process, 2 threads; HF default: causal across documents)", sp=1,
                 tokens_per_s=round(reference), vs_hf=1.0, vs_hf_ddp=round(reference / ddp, 3),
                 vs_hf_documents=round(reference / masked, 3)),
            dict(base, shape=name, impl="hf-sdpa documents (1 process, 2 threads; use_cache=False)", sp=1,
                 tokens_per_s=round(masked), vs_hf=round(masked / reference, 3), vs_hf_ddp=round(masked / ddp, 3),
                 vs_hf_documents=1.0),
            dict(base, shape=name, impl="hf-ddp (2 processes, 1 thread each; causal across documents)", sp=1,
                 tokens_per_s=round(ddp), vs_hf=round(ddp / reference, 3), vs_hf_ddp=1.0,
                 vs_hf_documents=round(ddp / masked, 3))]
    for sp in (1, 2):
        run = _ringlwm_run(shape, sp, steps + 2, warmup)  # +2: the profiled steps, left out of the median
        tps = run["tokens_per_s"]
        row = dict(base, shape=name, impl=f"ringlwm (2 processes, sp={sp})", sp=sp, tokens_per_s=round(tps),
                   vs_hf=round(tps / reference, 3), vs_hf_ddp=round(tps / ddp, 3),
                   vs_hf_documents=round(tps / masked, 3),
                   max_memory_gb=round(run["max_memory_gb"], 3))
        row.update({f"t_{p}": round(run["breakdown"][p], 4) for p in PHASES})
        row.update({f"cpu_{k}": round(v, 4) for k, v in run["profile"].items()})
        rows.append(row)
    for row in rows:
        row["mfu"] = round(row["tokens_per_s"] * per_token / peak, 4)
        row.update(params=params, seq_len=shape["seq"], global_batch=BATCH, matmul_peak_gflops=round(peak / 1e9, 1))
    return rows


def main(quick: bool = False, shapes=("tiny", "compute")) -> list[dict]:
    base = stamp(torch.device("cpu"))
    base["device"] = f"cpu ({os.cpu_count()} cores)"
    peak = cpu_matmul_flops()
    rows = []
    for name in shapes:
        rows += run_shape(name, SHAPES[name], base, peak, quick)
    path = append_csv("train", rows)
    print(f"\ntrain on {base['device']} ({base['date']}, {base['git']}); rows appended to {path}")
    print_table(rows, ["shape", "impl", "tokens_per_s", "vs_hf", "vs_hf_ddp", "vs_hf_documents", "mfu",
                       "max_memory_gb"])
    phase_rows = [r for r in rows if "t_forward" in r]
    print_table(phase_rows, ["shape", "impl", *[f"t_{p}" for p in PHASES]])
    cpu_keys = sorted({k for r in phase_rows for k in r if k.startswith("cpu_")},
                      key=lambda k: -max(r.get(k, 0) for r in phase_rows))
    print_table(phase_rows, ["shape", "impl", *cpu_keys[:9]])
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES))
    args = parser.parse_args()
    main(args.quick, tuple(args.shape) if args.shape else ("tiny", "compute"))
