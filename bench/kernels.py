"""Kernel benchmark: ringlwm's blockwise attention against PyTorch SDPA (and flash-attn where installed).

    python -m bench.run --part kernels [--quick]

Forward, backward and forward+backward time and TFLOP/s in the FlashAttention convention: forward
4*b*h*s*s*d FLOPs, halved when causal; backward 2.5x forward. On a GPU: bf16, the Triton kernels, SDPA
pinned to its flash backend. On CPU: fp32, ringlwm's CPU path (the fused CPU kernel behind our masks
and checks) against SDPA's default CPU path. `speedup` = SDPA time / ringlwm time, same run.

On CPU also packed documents (the demo's stage 1: ~150-token documents, causal): ringlwm's one call per document
against the fused kernel given the whole block's document mask (ringlwm's path before it split documents) and
SDPA with that mask (``packed_speedup_vs_fused_mask``, same run).
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


def packed_ids(seqlen: int, mean_doc: int, seed: int = 0) -> torch.Tensor:
    """(1, seqlen) segment ids of documents with lengths uniform in [mean_doc / 4, 7 mean_doc / 4]."""
    gen = torch.Generator().manual_seed(seed)
    ids, doc = [], 0
    while len(ids) < seqlen:
        ids += [doc] * int(torch.randint(mean_doc // 4, 7 * mean_doc // 4 + 1, (1,), generator=gen))
        doc += 1
    return torch.tensor([ids[:seqlen]])


def _packed_impls():
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def fused_mask(q, k, v, ids):
        same = ids[0][:, None] == ids[0][None, :]
        mask = torch.zeros(same.shape, dtype=q.dtype).masked_fill_(~same, float("-inf"))
        return fused(q, k, v, 0.0, True, attn_mask=mask[None, None])[0]

    def sdpa_mask(q, k, v, ids):
        visible = (ids[0][:, None] == ids[0][None, :]).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)

    return {"ringlwm": lambda q, k, v, ids: blockwise_attention(q, k, v, causal=True, segment_ids=ids, backend="cpu"),
            "fused-mask": fused_mask, "sdpa-mask": sdpa_mask}


def packed_rows(base: dict, quick: bool) -> list[dict]:
    """CPU, fp32, causal packed documents: fwd+bwd per implementation, ratio to the fused kernel with the mask."""
    rows = []
    for seqlen, heads, head_dim in ((1024, 8, 16),) + (() if quick else ((1024, 8, 64), (4096, 8, 64))):
        ids = packed_ids(seqlen, 150)
        gen = torch.Generator().manual_seed(1)
        q, k, v, dout = (torch.randn(1, heads, seqlen, head_dim, generator=gen) for _ in range(4))
        times = {}
        for name, fn in _packed_impls().items():
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

            def fwdbwd(fn=fn, qg=qg, kg=kg, vg=vg, ids=ids, dout=dout):
                fn(qg, kg, vg, ids).backward(dout)

            times[name] = time_fn(fwdbwd, q.device, warmup=1, reps=5)
        for name, t in times.items():
            rows.append(dict(base, impl=name, dtype="float32", causal=True, batch=1, heads=heads, seqlen=seqlen,
                             head_dim=head_dim, documents=int(ids.max()) + 1, fwdbwd_ms=round(t * 1e3, 3),
                             packed_speedup_vs_fused_mask=round(times["fused-mask"] / t, 3)))
        print(f"measured packed s={seqlen} d={head_dim} ({int(ids.max()) + 1} documents)", flush=True)
    path = append_csv("kernels_packed", rows)
    print(f"\npacked documents on {base['device']}; rows appended to {path}")
    print_table(rows, ["impl", "seqlen", "head_dim", "documents", "fwdbwd_ms", "packed_speedup_vs_fused_mask"])
    return rows


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
    if device.type == "cpu":
        rows += packed_rows(base, quick)
    return rows
