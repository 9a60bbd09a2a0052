"""Training throughput: the ringlwm trainer (sp = 1 and sp = 2 on 2 processes) against plain Hugging Face.

    python -m bench.run --part train [--quick]

One tiny Llama, one data stream (synthetic packed documents), one global batch per step (2 x 1024
tokens). ringlwm runs `torchrun -m ringlwm.train` with 2 processes: sp = 1 (data parallel over FSDP2) and
sp = 2 (the ring). The reference is plain `LlamaForCausalLM` (SDPA attention) trained by a minimal loop in
one process with 2 threads on the same batches. Tokens/s is the median over the steps after a warmup.
MFU: model FLOPs (6 N + attention, PaLM's count) per second over the fp32 matmul peak of this machine
measured in the same run (no vendor peak exists for it).
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

SEQ, BATCH = 1024, 2
MODEL = {"init": "random", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_layers": 4,
         "num_heads": 4, "num_kv_heads": 4}


def _llama_config():
    """The benchmarked model as a plain Hugging Face config (the same shape the recipe gives ringlwm)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=MODEL["vocab_size"], hidden_size=MODEL["hidden_size"],
                       intermediate_size=MODEL["intermediate_size"], num_hidden_layers=MODEL["num_layers"],
                       num_attention_heads=MODEL["num_heads"], num_key_value_heads=MODEL["num_kv_heads"],
                       max_position_embeddings=SEQ, tie_word_embeddings=False)


def _recipe(sp: int, steps: int) -> dict:
    return {
        "model": MODEL,
        "data": {"sources": [{"format": "synthetic", "synthetic_lengths": [64, 900]}], "seed": 0},
        "stages": [{"name": "bench", "seq_len": SEQ, "rope_theta": 10000.0, "steps": steps, "lr": 1.0e-3,
                    "batch_size": BATCH // (2 // sp), "sp": sp}],
        "checkpoint": {"save_every": 0, "export_hf": False},
        "logging": {"wandb": False, "progress": False},
    }


def _ringlwm_tokens_per_s(sp: int, steps: int, warmup: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(_recipe(sp, steps)))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "ringlwm.train", str(recipe), "--out", str(Path(tmp) / "run")], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = rows[warmup:]
    return statistics.median(r["tokens_per_s"] for r in rows), max(r["max_memory_gb"] for r in rows)


def _hf_tokens_per_s(steps: int, warmup: int) -> float:
    """Plain LlamaForCausalLM (SDPA) on the same packed batches, one process, 2 threads."""
    from transformers import LlamaForCausalLM

    from ringlwm.train.config import load_config
    from ringlwm.train.data import build_loader

    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(_recipe(1, steps)))
        config = load_config(recipe)
    loader = build_loader(config.data, config.stages[0], tokenizer=None, vocab_size=MODEL["vocab_size"], dp_rank=0,
                          dp_size=1, sp_rank=0, sp_size=1, seed=0, device=None)
    loader.batch_size = BATCH
    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config()).to(torch.float32)
    model.config._attn_implementation = "sdpa"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    times = []
    try:
        for _, batch in zip(range(steps), loader):
            t0 = time.perf_counter()
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                 ignore_index=-100, reduction="none")
            loss = (ce * batch["loss_weights"].reshape(-1)).sum() / batch["loss_weights"].sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return BATCH * SEQ / statistics.median(times[warmup:])


def matmul_peak_flops(threads: int = 2) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        for _ in range(3):
            a @ b
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        return 10 * 2 * 2048**3 / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)


def main(quick: bool = False) -> list[dict]:
    steps, warmup = (12, 4) if quick else (40, 8)
    base = stamp(torch.device("cpu"))
    base["device"] = f"cpu ({os.cpu_count()} cores)"
    peak = matmul_peak_flops()
    from transformers import LlamaForCausalLM

    from ringlwm.train.metrics import flops_per_token

    params = sum(p.numel() for p in LlamaForCausalLM(_llama_config()).parameters())
    per_token = flops_per_token(params, MODEL["num_layers"], MODEL["hidden_size"], SEQ)
    reference = _hf_tokens_per_s(steps, warmup)
    rows = [dict(base, impl="hf-sdpa (1 process, 2 threads)", sp=1, tokens_per_s=round(reference),
                 mfu=round(reference * per_token / peak, 4), vs_hf=1.0, max_memory_gb="")]
    for sp in (1, 2):
        tps, mem = _ringlwm_tokens_per_s(sp, steps, warmup)
        rows.append(dict(base, impl=f"ringlwm (2 processes, sp={sp})", sp=sp, tokens_per_s=round(tps),
                         mfu=round(tps * per_token / peak, 4), vs_hf=round(tps / reference, 3),
                         max_memory_gb=round(mem, 3)))
    for row in rows:
        row.update(params=params, seq_len=SEQ, global_batch=BATCH, matmul_peak_gflops=round(peak / 1e9, 1))
    path = append_csv("train", rows)
    print(f"\ntrain on {base['device']} ({base['date']}, {base['git']}); rows appended to {path}")
    print_table(rows, ["impl", "tokens_per_s", "vs_hf", "mfu", "max_memory_gb", "matmul_peak_gflops"])
    return rows
