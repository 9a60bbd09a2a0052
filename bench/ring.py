"""Ring benchmark: ring_attention on W gloo ranks against the ideal, single-process time / W.

    python -m bench.run --part ring [--quick]

CPU, fp32, causal, forward+backward, batch 1, 8 heads, head_dim 64, one thread per process. The
reference is PyTorch's fused SDPA (one process, one thread) on the full sequence, timed in the same run;
``efficiency`` = (reference time / W) / ring time. Each (W, length) runs in fresh processes, so that
``peak_rss_mb`` (the process's peak resident memory, max over ranks) belongs to that configuration alone;
``attn_mem_mb`` is the growth of the peak during the timed steps, which must grow linearly with the local
length (never with the square of the full length).

On a 2-core machine W=4 puts two processes on each core: its efficiency is bounded by 0.5 there.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench.common import append_csv, print_table, stamp, time_fn
from ringlwm import ring_attention
from ringlwm.distributed import run_local
from ringlwm.ring import zigzag_positions

HEADS, HEAD_DIM = 8, 64


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak) in MiB. Linux only; getrusage's
    ru_maxrss is no use here, as a spawned child inherits its parent's high-water mark."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _inputs(seqlen):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, HEADS, seqlen, HEAD_DIM, generator=gen) for _ in range(4)]


def _reps(seqlen):
    return (1, 3) if seqlen <= 8192 else (0, 1)  # (warmup, timed)


def _ring_worker(rank, world_size, seqlen):
    # Only this rank's part is ever made (the values do not matter for timing): the full-length inputs
    # would otherwise set the peak memory before the ring runs.
    q, k, v, dout = _inputs(seqlen // world_size)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    before = _status_mb("VmRSS")
    _reset_peak_rss()

    def step():
        dist.barrier()
        out = ring_attention(q, k, v, causal=True)
        out.backward(dout)
        dist.barrier()

    warmup, reps = _reps(seqlen)
    seconds = time_fn(step, q.device, warmup=warmup, reps=reps)
    return {"seconds": seconds, "peak_rss_mb": _status_mb("VmHWM"), "before_mb": before}


def _reference_seconds(seqlen):
    """Fused SDPA on the full sequence, one process, one thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q, k, v, dout = _inputs(seqlen)
        q, k, v = (t.requires_grad_() for t in (q, k, v))

        def step():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)

        warmup, reps = _reps(seqlen)
        return time_fn(step, q.device, warmup=warmup, reps=reps)
    finally:
        torch.set_num_threads(threads)


def main(quick: bool = False) -> list[dict]:
    device = torch.device("cpu")
    base = stamp(device)
    base["device"] = f"cpu ({os.cpu_count()} cores), gloo, 1 thread per rank"
    seqlens = (4096, 8192) if quick else (4096, 8192, 16384, 32768)
    worlds = (2,) if quick else (1, 2, 4)
    rows = []
    for seqlen in seqlens:
        ref = _reference_seconds(seqlen)
        for world_size in worlds:
            if world_size == 1 and seqlen > 8192:
                continue  # W=1 is blockwise_attention itself, measured by the kernels part
            results = run_local(_ring_worker, world_size, seqlen)
            ring_s = max(r["seconds"] for r in results)
            peak = max(r["peak_rss_mb"] for r in results)
            growth = max(r["peak_rss_mb"] - r["before_mb"] for r in results)
            rows.append(dict(base, world_size=world_size, seqlen=seqlen, local_seqlen=seqlen // world_size,
                             heads=HEADS, head_dim=HEAD_DIM, reference_s=round(ref, 4), ideal_s=round(ref / world_size, 4),
                             ring_s=round(ring_s, 4), efficiency=round(ref / world_size / ring_s, 3),
                             peak_rss_mb=round(peak, 1), attn_mem_mb=round(growth, 1)))
            print(f"ring W={world_size} seq={seqlen}: {ring_s:.3f}s vs ideal {ref / world_size:.3f}s", flush=True)
    path = append_csv("ring", rows)
    print(f"\nring on {base['device']} ({base['date']}, {base['git']}); rows appended to {path}")
    print_table(rows, ["world_size", "seqlen", "local_seqlen", "reference_s", "ideal_s", "ring_s", "efficiency",
                       "peak_rss_mb", "attn_mem_mb"])
    return rows


# ------------------------------------------------------------------------------------------------
# Ring vs Ulysses vs 2-D at the same world size (`ring` part, table `ring_layouts`)
# ------------------------------------------------------------------------------------------------

LAYOUT_WORLD = 4
LAYOUTS = ((4, 1, "ring"), (1, 4, "ulysses"), (2, 2, "2-D"))  # (sp, ulysses, name)


def _layout_worker(rank, world_size, seqlen, sp, ulysses):
    """One fwd+bwd of ``ring_attention`` on this layout: seconds, and the bytes this rank sent (the ring's
    point-to-point sends, the all-to-alls' slabs for the other ranks)."""
    from ringlwm.hf import setup_sequence_parallel

    groups = setup_sequence_parallel(sp, ulysses_size=ulysses)
    ring, uly = groups.sp_group, groups.ulysses_group
    q, k, v, dout = _inputs(seqlen // world_size)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    sent = [0]
    batch, a2a = dist.batch_isend_irecv, dist.all_to_all_single

    def counting_batch(ops):
        sent[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return batch(ops)

    def counting_a2a(out, inp, *args, **kwargs):
        world = dist.get_world_size(kwargs.get("group"))
        sent[0] += inp.numel() * inp.element_size() * (world - 1) // world
        return a2a(out, inp, *args, **kwargs)

    def step():
        dist.barrier()
        out = ring_attention(q, k, v, causal=True, group=ring if sp > 1 else None,
                             ulysses_group=uly if ulysses > 1 else None)
        out.backward(dout)
        dist.barrier()

    warmup, reps = _reps(seqlen)
    dist.batch_isend_irecv, dist.all_to_all_single = counting_batch, counting_a2a
    try:
        step()
        per_step = sent[0]
        seconds = time_fn(step, q.device, warmup=warmup, reps=reps)
    finally:
        dist.batch_isend_irecv, dist.all_to_all_single = batch, a2a
    return {"seconds": seconds, "sent_mb": per_step / 2**20}


def main_layouts(quick: bool = False) -> list[dict]:
    """Ring, Ulysses and the 2-D layout at W=4, same shapes, same run: time against the ring's, MiB sent per
    rank per fwd+bwd."""
    device = torch.device("cpu")
    base = stamp(device)
    base["device"] = f"cpu ({os.cpu_count()} cores), gloo, 1 thread per rank"
    rows = []
    for seqlen in (4096,) if quick else (4096, 16384):
        ring_s = None
        for sp, ulysses, name in LAYOUTS:
            results = run_local(_layout_worker, LAYOUT_WORLD, seqlen, sp, ulysses)
            seconds = max(r["seconds"] for r in results)
            ring_s = ring_s or seconds
            rows.append(dict(base, world_size=LAYOUT_WORLD, seqlen=seqlen, layout=name, sp=sp, ulysses=ulysses,
                             heads=HEADS, head_dim=HEAD_DIM, seconds=round(seconds, 4),
                             vs_ring=round(ring_s / seconds, 3),
                             sent_mb_per_rank=round(max(r["sent_mb"] for r in results), 2)))
            print(f"{name} (sp {sp}, ulysses {ulysses}) seq={seqlen}: {seconds:.3f}s", flush=True)
    path = append_csv("ring_layouts", rows)
    print(f"\nlayouts on {base['device']} ({base['date']}, {base['git']}); rows appended to {path}")
    print_table(rows, ["seqlen", "layout", "sp", "ulysses", "seconds", "vs_ring", "sent_mb_per_rank"])
    return rows


# ------------------------------------------------------------------------------------------------
# Training a tiny model at long lengths: memory per rank, and one step at >= 128K tokens (`long`)
# ------------------------------------------------------------------------------------------------

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2)


def _train_step_worker(rank, world_size, seqlen):
    """One forward + backward of the tiny model on this rank's zigzag shard; peak memory and time."""
    import time

    from transformers import LlamaConfig

    from ringlwm.models import RingLlamaForCausalLM, set_context_length

    config = LlamaConfig(**TINY, tie_word_embeddings=False)
    set_context_length(config, seqlen, rope_theta=1e6)
    config.ringlwm_options = {"activation_checkpointing": True, "mlp_chunk_size": 8192, "loss_chunk_size": 8192}
    torch.manual_seed(0)
    model = RingLlamaForCausalLM(config)
    local = seqlen // world_size
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, TINY["vocab_size"], (1, local), generator=gen)
    pos = zigzag_positions(seqlen, rank, world_size)[None]
    before = _status_mb("VmRSS")
    _reset_peak_rss()
    t0 = time.perf_counter()
    model(ids, pos, shift_labels=ids).loss.backward()  # timing only: any targets
    dist.barrier()
    return {"seconds": time.perf_counter() - t0, "peak_mb": _status_mb("VmHWM"), "growth_mb": _status_mb("VmHWM") - before}


def train_memory_rows(lengths_by_world: dict[int, tuple[int, ...]], base: dict) -> list[dict]:
    rows = []
    for world_size, lengths in lengths_by_world.items():
        for seqlen in lengths:
            results = run_local(_train_step_worker, world_size, seqlen)
            rows.append(dict(base, world_size=world_size, seqlen=seqlen, local_seqlen=seqlen // world_size,
                             step_s=round(max(r["seconds"] for r in results), 2),
                             peak_rss_mb=round(max(r["peak_mb"] for r in results), 1),
                             step_mem_mb=round(max(r["growth_mb"] for r in results), 1)))
            print(f"tiny-model step W={world_size} seq={seqlen}: {rows[-1]['step_s']}s, "
                  f"+{rows[-1]['step_mem_mb']} MB per rank", flush=True)
    return rows


def longest_trainable(rows: list[dict], budget_mb: float) -> dict[int, int]:
    """Per world size: the longest sequence whose step memory fits ``budget_mb`` per rank, from a linear
    fit (memory = a + b * local tokens) of the measured steps. Extrapolated: the compute at such lengths
    takes hours on this machine."""
    out = {}
    for world_size in sorted({r["world_size"] for r in rows}):
        pts = [(r["local_seqlen"], r["step_mem_mb"]) for r in rows if r["world_size"] == world_size]
        n = len(pts)
        mean_x = sum(x for x, _ in pts) / n
        mean_y = sum(y for _, y in pts) / n
        slope = sum((x - mean_x) * (y - mean_y) for x, y in pts) / sum((x - mean_x) ** 2 for x, _ in pts)
        intercept = mean_y - slope * mean_x
        out[world_size] = int((budget_mb - intercept) / slope) * world_size
    return out


def main_memory(quick: bool = False) -> list[dict]:
    base = stamp(torch.device("cpu"))
    base["device"] = f"cpu ({os.cpu_count()} cores), gloo, 1 thread per rank"
    lengths = (8192, 16384) if quick else (8192, 16384, 32768)
    rows = train_memory_rows({1: lengths, 2: tuple(2 * n for n in lengths)}, base)
    budget = 12 * 1024  # 24 GiB machine, 2 ranks
    longest = longest_trainable(rows, budget)
    for row in rows:
        row["longest_at_12gib"] = longest[row["world_size"]]
    path = append_csv("ring_memory", rows)
    print(f"\ntiny-model training memory; rows appended to {path}")
    print_table(rows, ["world_size", "seqlen", "local_seqlen", "step_s", "step_mem_mb", "peak_rss_mb"])
    print("longest trainable sequence at 12 GiB per rank (linear fit of the measured steps): "
          + ", ".join(f"W={w}: {n:,} tokens" for w, n in longest.items())
          + (f"; ratio {longest[2] / longest[1]:.2f}" if 1 in longest and 2 in longest else ""))
    return rows


def main_long(seqlen: int = 131072) -> list[dict]:
    """One full training step (forward + backward) of the tiny model at ``seqlen`` tokens on 2 processes."""
    base = stamp(torch.device("cpu"))
    base["device"] = f"cpu ({os.cpu_count()} cores), gloo, 1 thread per rank"
    rows = train_memory_rows({2: (seqlen,)}, base)
    path = append_csv("long", rows)
    print(f"\nlong: one training step at {seqlen:,} tokens on 2 processes; rows appended to {path}")
    print_table(rows, ["world_size", "seqlen", "local_seqlen", "step_s", "step_mem_mb", "peak_rss_mb"])
    return rows
