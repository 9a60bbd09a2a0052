"""Which block backend on this GPU: each one against fp64 (error) and against each other (time), and the table
that ``attention_backend: auto`` reads.

    python -m bench.backends [--budget 200] [--quick]      (make gpu-check runs it as its `backends` part)

For each backend that can run here (triton, torch_flash, cudnn, flash_attn when installed):
- error: bf16 out, dq, dk, dv against an fp64 reference (SDPA's math backend with an explicit mask, on the GPU),
  head_dim 64 and 128, causal, 4K tokens, with and without packed documents, and SDPA's own bf16 error beside it
  (flash; with documents its memory-efficient kernel, which takes the mask): ``ratio`` = the backend's error /
  SDPA's;
- time: forward+backward through ``blockwise_attention`` (what the ring calls per block), head_dim 64 and 128
  (2048 wide: 32 or 16 heads, GQA 4:1), causal and not, 4K-64K tokens, and packed documents (8 per sequence);
  ``vs_triton`` = triton's time / this backend's in the same run.
A block a backend cannot express runs on its fallback (the row says which ran: ``ran``).
Writes bench/results/gpu/backends.csv and attention_backends.json, and the same table to
$RINGLWM_ATTENTION_TABLE or ~/.cache/ringlwm/attention_backends.json (other GPUs' entries kept). A backend enters
the table's choice only where its error is within 2x SDPA's (plus a bf16 floor).
Without a GPU it runs the same loop on CPU tensors with the "cpu" backend (a rehearsal of the code, no table).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from bench.common import RESULTS, append_csv, print_table, stamp, time_fn

LIBRARY_AND_OURS = ("triton", "torch_flash", "cudnn", "flash_attn")
ERROR_FLOOR = 4e-3  # bf16: about half a unit of rounding at magnitude 1 (as the kernel tests)


def available_backends(device: torch.device) -> list[str]:
    from ringlwm.kernels import library_flash

    if device.type != "cuda":
        return ["cpu"]
    names = []
    for name in LIBRARY_AND_OURS:
        if name in library_flash.LIBRARY_BACKENDS and library_flash.unavailable(name, device):
            continue
        names.append(name)
    return names


def _packed_ids(batch: int, seqlen: int, docs: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seqlen + docs)
    ids = torch.zeros(batch, seqlen, dtype=torch.long)
    for b in range(batch):
        cuts = torch.randperm(seqlen - 1, generator=gen)[: docs - 1] + 1
        ids[b, cuts] = 1
    return ids.cumsum(-1).to(device)


def _inputs(batch, heads, kv_heads, seqlen, head_dim, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = [(batch, heads, seqlen, head_dim), (batch, kv_heads, seqlen, head_dim),
              (batch, kv_heads, seqlen, head_dim), (batch, heads, seqlen, head_dim)]
    return [torch.randn(s, generator=gen, device=device, dtype=torch.float32).to(dtype) for s in shapes]


def _ran(name: str, q, k, causal, segment_ids) -> str:
    from ringlwm.kernels import select_backend

    return select_backend(name, q, k, causal, segment_ids, segment_ids)


def _grads(fn, q, k, v, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach().double()] + [t.grad.double() for t in leaves]


def error_rows(device: torch.device, backends: list[str], seqlen: int) -> list[dict]:
    """bf16 (or fp32 on CPU) errors against fp64 of out and the gradients, per backend."""
    import torch.nn.functional as F
    from ringlwm.kernels import blockwise_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for head_dim in (64, 128):
        for packed in (False, True):
            q, k, v, dout = _inputs(1, 8, 2, seqlen, head_dim, torch.float64, device, seed=head_dim + packed)
            ids = _packed_ids(1, seqlen, 8, device) if packed else None
            allowed = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()
            if packed:
                allowed = allowed & (ids[0][:, None] == ids[0][None, :])

            def sdpa(backend, q, k, v, allowed=allowed):
                group = q.shape[1] // k.shape[1]
                k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
                with sdpa_kernel(backend):
                    if backend == SDPBackend.FLASH_ATTENTION:
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

            reference = _grads(lambda q, k, v: sdpa(SDPBackend.MATH, q, k, v), q, k, v, dout)
            low = [t.to(dtype) for t in (q, k, v, dout)]
            baseline, baseline_name = None, None
            if device.type == "cuda":  # SDPA flash takes no documents: its memory-efficient kernel takes the mask
                kind = SDPBackend.EFFICIENT_ATTENTION if packed else SDPBackend.FLASH_ATTENTION
                baseline = _grads(lambda q, k, v, kind=kind: sdpa(kind, q, k, v), *low)
                baseline_name = "sdpa_efficient" if packed else "sdpa_flash"
            for name in backends:
                got = _grads(lambda q, k, v, name=name, ids=ids: blockwise_attention(q, k, v, causal=True,
                                                                                     segment_ids=ids, backend=name),
                             *low)
                row = {"head_dim": head_dim, "seqlen": seqlen, "packed": packed, "backend": name,
                       "ran": _ran(name, low[0], low[1], True, ids), "baseline": baseline_name}
                for i, tensor in enumerate(("out", "dq", "dk", "dv")):
                    row[f"{tensor}_err"] = (got[i] - reference[i]).abs().max().item()
                    if baseline is not None:
                        row[f"{tensor}_sdpa_err"] = (baseline[i] - reference[i]).abs().max().item()
                ratios = [row[f"{t}_err"] / max(row.get(f"{t}_sdpa_err", math.nan), 1e-30)
                          for t in ("out", "dq", "dk", "dv")]
                row["ratio"] = max(ratios) if all(math.isfinite(r) for r in ratios) else math.nan
                row["within_2x"] = all(row[f"{t}_err"] <= 2 * row.get(f"{t}_sdpa_err", math.inf) + ERROR_FLOOR
                                       for t in ("out", "dq", "dk", "dv"))
                rows.append(row)
    return rows


def time_configs(device: torch.device, quick: bool) -> list[tuple]:
    """(head_dim, seqlen, causal, packed) in increasing cost; the budget keeps what it reaches."""
    if device.type != "cuda":
        return [(64, 512, True, False), (64, 512, True, True), (64, 512, False, False)]
    lengths = (4096, 16384) if quick else (4096, 16384, 65536)
    configs = [(d, s, c, False) for s in lengths for d in (128, 64) for c in (True, False)]
    configs += [(d, s, True, True) for s in lengths for d in (128, 64)]
    return sorted(configs, key=lambda c: (c[1], not c[2], c[3]))


def time_rows(device: torch.device, backends: list[str], quick: bool, deadline: float) -> list[dict]:
    from ringlwm.kernels import blockwise_attention

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for head_dim, seqlen, causal, packed in time_configs(device, quick):
        if time.monotonic() > deadline:
            break
        heads = 2048 // head_dim if device.type == "cuda" else 4
        q, k, v, dout = _inputs(1, heads, heads // 4, seqlen, head_dim, dtype, device)
        ids = _packed_ids(1, seqlen, 8, device) if packed else None
        leaves = [t.requires_grad_() for t in (q, k, v)]
        measured, timed = {}, []
        for name in backends:
            if time.monotonic() > deadline:
                break

            def step(name=name, leaves=leaves, causal=causal, ids=ids, dout=dout):
                out = blockwise_attention(*leaves, causal=causal, segment_ids=ids, backend=name)
                out.backward(dout)
                for t in leaves:
                    t.grad = None

            try:
                measured[name] = time_fn(step, device, warmup=1, reps=3)
            except Exception as error:  # noqa: BLE001 - a backend that fails here is reported, the others go on
                rows.append({"head_dim": head_dim, "seqlen": seqlen, "causal": causal, "packed": packed,
                             "backend": name, "error": f"{type(error).__name__}: {str(error)[:200]}"})
                continue
            fwd = 4 * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
            timed.append({"head_dim": head_dim, "seqlen": seqlen, "causal": causal, "packed": packed,
                          "backend": name, "ran": _ran(name, q, k, causal, ids), "fwdbwd_ms": measured[name] * 1e3,
                          "tflops": 3.5 * fwd / measured[name] / 1e12})
        reference = measured.get("triton", measured.get("cpu"))  # the CPU rehearsal has no triton
        for row in timed:
            if reference:
                row["vs_triton"] = reference * 1e3 / row["fwdbwd_ms"]
        rows += timed
    return rows


def fastest(times: list[dict], errors: list[dict]) -> dict[str, str]:
    """Per head_dim, the backend with the least total forward+backward time over the configurations that every
    candidate finished, among those whose errors were within 2x SDPA flash's and that ran themselves (no fallback)
    on every measured configuration."""
    choice = {}
    for head_dim in sorted({r["head_dim"] for r in times}):
        rows = [r for r in times if r["head_dim"] == head_dim and "fwdbwd_ms" in r]
        bad = {r["backend"] for r in errors if r["head_dim"] == head_dim and not r["within_2x"]}
        bad |= {r["backend"] for r in rows if r["ran"] != r["backend"]}
        candidates = {r["backend"] for r in rows} - bad
        configs = {(r["seqlen"], r["causal"], r["packed"]) for r in rows}
        common = [c for c in configs if all(any((r["seqlen"], r["causal"], r["packed"]) == c and r["backend"] == b
                                                 for r in rows) for b in candidates)]
        if not candidates or not common:
            continue
        total = {b: sum(r["fwdbwd_ms"] for r in rows if r["backend"] == b
                        and (r["seqlen"], r["causal"], r["packed"]) in common) for b in candidates}
        choice[str(head_dim)] = min(total, key=total.get)
    return choice


def write_table(gpu: str, choice: dict[str, str], info: dict, paths: list[Path]) -> None:
    """Record ``choice`` for ``gpu`` in each table at ``paths`` (other GPUs' entries kept)."""
    for path in paths:
        table = {"version": 1, "gpus": {}}
        if path.is_file():
            try:
                old = json.loads(path.read_text())
                if old.get("version") == 1:
                    table = old
            except json.JSONDecodeError:
                pass
        table["gpus"][gpu] = {"fastest": choice, **info}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.backends", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=200.0, help="seconds for the timing loop")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--error-length", type=int, default=None, help="tokens of the error cases (4096 on a GPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # the fallback notices
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = available_backends(device)
    print(f"backends on {stamp(device)['device']}: {', '.join(backends)}", flush=True)
    start = time.monotonic()
    errors = error_rows(device, backends, args.error_length or (4096 if device.type == "cuda" else 256))
    times = time_rows(device, backends, args.quick, start + args.budget)
    info = stamp(device)
    append_csv("backends", [{**info, "kind": "error", **r} for r in errors] +
               [{**info, "kind": "time", **r} for r in times])
    print_table(errors, ["head_dim", "packed", "backend", "ran", "out_err", "dq_err", "dk_err", "dv_err", "ratio"])
    print()
    print_table(times, ["head_dim", "seqlen", "causal", "packed", "backend", "ran", "fwdbwd_ms", "tflops",
                        "vs_triton"])
    choice = fastest(times, errors) if device.type == "cuda" else {}
    if choice:
        from ringlwm.kernels import library_flash

        write_table(info["device"], choice, {"date": info["date"], "torch": info["torch"], "git": info["git"]},
                    [RESULTS / "attention_backends.json", library_flash.table_path()])
        print(f"\nauto on {info['device']}: {choice} (written to {library_flash.table_path()})")
    return {"backends": backends, "choice": choice, "errors": errors, "times": times}


if __name__ == "__main__":
    main()
