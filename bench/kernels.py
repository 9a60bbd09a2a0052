"""Kernel benchmark: ringlwm's blockwise attention against PyTorch SDPA (and flash-attn where installed).

    python -m bench.run --part kernels [--quick]

Forward, backward and forward+backward time and TFLOP/s in the FlashAttention convention: forward
4*b*h*s*s*d FLOPs, halved when causal; backward 2.5x forward. On a GPU: bf16, the Triton kernels, SDPA
pinned to its flash backend. On CPU: fp32, ringlwm's CPU path (the fused CPU kernel behind our masks
and checks) against SDPA's default CPU path. `speedup` = SDPA time / ringlwm time, same run.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from ringlwm.kernels import blockwise_attention

from bench.common import append_csv, print_table, stamp, time_fn


def attention_flops(batch, heads, seqlen, head_dim, causal, mode):
    fwd = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwdbwd": 3.5 * fwd}[mode]


def _impls(device):
    backend = "triton" if device.type == "cuda" else "cpu"  # ringlwm's own kernels (auto may pick a library's)
    impls = {"ringlwm": lambda q, k, v, causal: blockwise_attention(q, k, v, causal=causal, backend=backend)}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(q, k, v, causal):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        impls["sdpa-flash"] = sdpa
        with contextlib.suppress(ImportError):
            from flash_attn import flash_attn_func

            impls["flash-attn"] = lambda q, k, v, causal: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal
            ).transpose(1, 2)
    else:
        impls["sdpa"] = lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return impls


def _configs(device, quick):
    if device.type == "cuda":
        seqlens = (1024, 4096) if quick else (1024, 2048, 4096, 8192, 16384)
        dims = (128,) if quick else (64, 128)
        # FlashAttention's convention: 16K tokens per batch, model width 2048.
        return [(max(1, 16384 // s), 2048 // d, s, d, c, torch.bfloat16) for d in dims for s in seqlens
                for c in (True, False)]
    seqlens = (1024,) if quick else (1024, 2048, 4096)
    dims = (64,) if quick else (64, 128)
    return [(1, 8, s, d, c, torch.float32) for d in dims for s in seqlens for c in (True, False)]


def measure(fn, batch, heads, seqlen, head_dim, causal, dtype, device, reps):
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(batch, heads, seqlen, head_dim, device=device, dtype=dtype, generator=gen)
                     for _ in range(4))
    with torch.no_grad():
        fwd = time_fn(lambda: fn(q, k, v, causal), device, warmup=1, reps=reps)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def fwdbwd():
        out = fn(qg, kg, vg, causal)
        out.backward(dout)

    total = time_fn(fwdbwd, device, warmup=1, reps=reps)
    out = fn(qg, kg, vg, causal)
    bwd = time_fn(lambda: out.backward(dout, retain_graph=True), device, warmup=1, reps=reps)
    return fwd, bwd, total


def main(quick: bool = False) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reps = 10 if device.type == "cuda" else 3
    base = stamp(device)
    rows = []
    for batch, heads, seqlen, head_dim, causal, dtype in _configs(device, quick):
        times = {}
        for name, fn in _impls(device).items():
            times[name] = measure(fn, batch, heads, seqlen, head_dim, causal, dtype, device, reps)
        ref_name = "sdpa-flash" if device.type == "cuda" else "sdpa"
        for name, (fwd, bwd, total) in times.items():
            row = dict(base, impl=name, dtype=str(dtype).replace("torch.", ""), causal=causal, batch=batch,
                       heads=heads, seqlen=seqlen, head_dim=head_dim)
            for mode, t in (("fwd", fwd), ("bwd", bwd), ("fwdbwd", total)):
                row[f"{mode}_ms"] = round(t * 1e3, 3)
                row[f"{mode}_tflops"] = round(attention_flops(batch, heads, seqlen, head_dim, causal, mode) / t / 1e12,
                                              4)
            row["fwdbwd_speedup_vs_sdpa"] = round(times[ref_name][2] / total, 3)
            rows.append(row)
            path = append_csv("kernels", [row])  # row by row: a run cut short keeps what it measured
        print(f"measured b={batch} h={heads} s={seqlen} d={head_dim} causal={causal}", flush=True)
    print(f"\nkernels on {base['device']} ({base['date']}, {base['git']}); rows appended to {path}")
    print_table(rows, ["impl", "causal", "seqlen", "head_dim", "fwd_ms", "bwd_ms", "fwdbwd_ms", "fwd_tflops",
                       "fwdbwd_tflops", "fwdbwd_speedup_vs_sdpa"])
    return rows
