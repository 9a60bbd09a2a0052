"""Compile report: every autotune configuration of every Triton attention kernel, compiled for real GPU targets
on this machine (no GPU needed), with what the compiler says about each.

    python -m bench.run --part compile              (make bench PART=compile)
    python -m bench.compile [--space autotune|candidates] [--arch sm90] [--dtype bf16] [--head-dim 128]
                            [--kernel fwd] [--variant causal] [--jobs 2] [--no-csv]

Triton compiles for a GPUTarget without a device: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90,
32))`` runs the whole pipeline down to a cubin with the ``ptxas`` that ships in the triton wheel, and that wheel's
``cuobjdump`` reads back the resource usage (``-res-usage``: registers, stack frame) and the SASS (``-sass``).
Each row is one (kernel, target, dtype, head_dim, variant, configuration):

    regs          registers per thread
    stack         stack frame in bytes (local memory; non-zero means the kernel spills registers)
    spill_st/ld   STL/LDL instructions in the SASS (spill stores and loads)
    smem          shared memory the kernel asks for at launch (Triton's dynamic shared memory), bytes
    smem_ok       smem within the target's per-block limit (sm_80 163 KiB, sm_90 227 KiB); else it cannot launch
    hgmma, hmma   tensor-core instructions: HGMMA (sm_90 warpgroup MMA) and HMMA (mma.sync, sm_80 and sm_90)
    cp_async      LDGSTS (asynchronous global->shared copies: the software pipeline of the K/V loads)
    tma           UTMALDG (sm_90 tensor-memory-accelerator loads)
    spill_free    stack == 0 and no STL, and a tensor-core instruction is present, and smem_ok

The arguments are those the launchers in ringlwm.kernels.triton_flash pass (contiguous (batch, heads, seq, dim)
tensors, 32 query heads over 8 KV heads, 4096 tokens), specialised the way Triton's JIT specialises a real launch
(16-byte aligned pointers, strides and lengths divisible by 16, the unit stride a constant). ``--space
candidates`` compiles a wider grid of tile shapes than the autotune lists (used to choose those lists).

Time: the default report (3 kernels x 2 targets x 2 dtypes x 3 head dims x 2 variants, 196 configurations)
takes about 2.5 minutes with 2 processes on 2 idle cores (each compile 1-4 s); it appends to
bench/results/compile.csv and SUMMARY.md shows the largest spill-free configuration per kernel and target.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

# The kernels must be real JIT functions here, not the interpreter's wrappers.
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ARCHS = {"sm80": 80, "sm90": 90}
DTYPES = ("fp16", "bf16")
HEAD_DIMS = (64, 128, 256)
KERNELS = ("fwd", "dkdv", "dq")  # = ringlwm.kernels.triton_flash.KERNELS
# (causal, segment ids): the variants training runs (causal language modelling, packed documents).
VARIANTS = {"causal": (True, False), "causal+seg": (True, True), "full": (False, False)}
DEFAULT_VARIANTS = ("causal", "causal+seg")
# Per-block shared memory a kernel may ask for (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {80: 166912, 90: 232448}

# Shapes of the arguments (the launchers' layout); only their divisibility matters to the compiler.
_BATCH, _HEADS, _KV_HEADS, _SEQ = 1, 32, 8, 4096

COLUMNS = ["kernel", "arch", "dtype", "head_dim", "variant", "block_m", "block_n", "num_warps", "num_stages",
           "regs", "stack", "spill_st", "spill_ld", "smem", "smem_ok", "hgmma", "hmma", "cp_async", "tma",
           "spill_free", "compile_s", "error"]


@dataclass(frozen=True)
class Case:
    kernel: str
    arch: str
    dtype: str
    head_dim: int
    variant: str
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _torch_dtype(name):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def kernel_args(kernel: str, dtype: str, head_dim: int, causal: bool, has_seg: bool):
    """(jit function, positional arguments, constexpr keywords) as the launcher passes them."""
    import torch
    from ringlwm.kernels import triton_flash as tf

    dt = _torch_dtype(dtype)

    def ptr(d):  # a fresh allocation: 16-byte aligned, as every tensor the launchers pass
        return torch.empty(16, dtype=d)

    d = head_dim
    q_strides = (_HEADS * _SEQ * d, _SEQ * d, d, 1)
    kv_strides = (_KV_HEADS * _SEQ * d, _SEQ * d, d, 1)
    group = _HEADS // _KV_HEADS
    qk_scale = d**-0.5 * tf.LOG2E
    meta = dict(HEAD_DIM=d, BLOCK_D=tf._block_d(d), CAUSAL=causal, HAS_SEG=has_seg,
                DOT_PRECISION=tf._dot_precision(dt))
    i32, f32 = torch.int32, torch.float32
    # q_offset = _SEQ, kv_offset = 0: a ring step below the diagonal (the values only set divisibility).
    if kernel == "fwd":
        args = [ptr(dt), ptr(dt), ptr(dt), ptr(dt), ptr(f32), ptr(i32), ptr(i32),
                *q_strides[:3], *kv_strides[:3], *kv_strides[:3], *q_strides[:3],
                _HEADS, group, _SEQ, _SEQ, _SEQ, 0, qk_scale]
        fn = tf._fwd_kernel
    elif kernel == "dkdv":
        args = [ptr(dt), ptr(dt), ptr(dt), ptr(dt), ptr(f32), ptr(f32), ptr(f32), ptr(f32), ptr(i32), ptr(i32),
                *q_strides[:3], *kv_strides[:3], *kv_strides[:3], *q_strides[:3], *kv_strides[:3], *kv_strides[:3],
                _KV_HEADS, group, _SEQ, _SEQ, _SEQ, 0, qk_scale, d**-0.5]
        fn = tf._bwd_dkdv_kernel
    elif kernel == "dq":
        args = [ptr(dt), ptr(dt), ptr(dt), ptr(dt), ptr(f32), ptr(f32), ptr(f32), ptr(i32), ptr(i32),
                *q_strides[:3], *kv_strides[:3], *kv_strides[:3], *q_strides[:3], *q_strides[:3],
                _HEADS, group, _SEQ, _SEQ, _SEQ, 0, qk_scale, d**-0.5]
        fn = tf._bwd_dq_kernel
    else:
        raise ValueError(kernel)
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):  # Autotuner -> Heuristics -> JITFunction
        fn = fn.fn
    return fn, args, meta


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def compile_case(case: Case) -> dict:
    """Compile one case and read back what the compiler made of it."""
    import triton
    from ringlwm.kernels import triton_flash as tf
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    row = asdict(case)
    causal, has_seg = VARIANTS[case.variant]
    cap = ARCHS[case.arch]
    fn, args, meta = kernel_args(case.kernel, case.dtype, case.head_dim, causal, has_seg)
    if not isinstance(fn, JITFunction):
        raise RuntimeError("bench.compile needs compiled kernels: import it with TRITON_INTERPRET unset or 0")
    target = GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    kwargs = dict(meta, BLOCK_M=case.block_m, BLOCK_N=case.block_n, num_warps=case.num_warps,
                  num_stages=case.num_stages)
    named = dict(zip(fn.arg_names, args), **kwargs)
    kwargs.update({name: rule(named) for name, rule in tf.HEURISTICS.items() if name in fn.arg_names})
    t0 = time.perf_counter()
    try:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - a failed compile is a row of the report
        row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200],
                   compile_s=round(time.perf_counter() - t0, 2), spill_free=False)
        return row
    compile_s = time.perf_counter() - t0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r"(REG|STACK):(\d+)", res))
    smem = int(compiled.metadata.shared)
    row.update(
        regs=int(usage.get("REG", -1)),
        stack=int(usage.get("STACK", -1)),
        spill_st=_count(r"\bSTL(?:\.\w+)*\s", sass),
        spill_ld=_count(r"\bLDL(?:\.\w+)*\s", sass),
        smem=smem,
        smem_ok=smem <= SMEM_LIMIT[cap],
        hgmma=_count(r"\bHGMMA\.", sass),
        hmma=_count(r"\bHMMA\.", sass),
        cp_async=_count(r"\bLDGSTS", sass),
        tma=_count(r"\bUTMALDG", sass),
        compile_s=round(compile_s, 2),
        error="",
    )
    row["spill_free"] = (row["stack"] == 0 and row["spill_st"] == 0 and row["smem_ok"]
                         and (row["hgmma"] + row["hmma"]) > 0)
    return row


# A wide grid of tile shapes for choosing the autotune lists (--space candidates).
# (BLOCK_M, BLOCK_N): for fwd and dq BLOCK_M queries per program and BLOCK_N keys per step; for dkdv BLOCK_N keys
# per program and BLOCK_M queries per step.
_CANDIDATE_TILES = {
    "fwd": [(128, 32), (128, 64), (128, 128), (64, 32), (64, 64), (64, 128)],
    "dkdv": [(16, 64), (32, 64), (64, 64), (16, 128), (32, 128), (64, 128), (16, 32), (32, 32), (64, 32)],
    "dq": [(64, 32), (64, 64), (64, 128), (128, 32), (128, 64), (128, 128)],
}


def autotune_cases(kernels=KERNELS, archs=tuple(ARCHS), dtypes=DTYPES, head_dims=HEAD_DIMS,
                   variants=DEFAULT_VARIANTS) -> list[Case]:
    """Every configuration of every autotune list the kernels carry for these targets, dtypes and head dims."""
    from ringlwm.kernels import triton_flash as tf

    cases = []
    for kernel, arch, dtype, head_dim, variant in itertools.product(kernels, archs, dtypes, head_dims, variants):
        for c in tf.autotune_configs(kernel, ARCHS[arch], dtype, head_dim, has_seg=VARIANTS[variant][1]):
            cases.append(Case(kernel, arch, dtype, head_dim, variant, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                              c.num_warps, c.num_stages))
    return cases


def candidate_cases(kernels=KERNELS, archs=tuple(ARCHS), dtypes=DTYPES, head_dims=HEAD_DIMS,
                    variants=("causal",), warps=(4, 8), stages=(2,)) -> list[Case]:
    cases = []
    for kernel, arch, dtype, head_dim, variant in itertools.product(kernels, archs, dtypes, head_dims, variants):
        for (m, n), w, s in itertools.product(_CANDIDATE_TILES[kernel], warps, stages):
            cases.append(Case(kernel, arch, dtype, head_dim, variant, m, n, w, s))
    return cases


def run_cases(cases: list[Case], jobs: int = 1, progress: bool = True) -> list[dict]:
    """Compile the cases in ``jobs`` processes (compiles are single-threaded); rows in the order of ``cases``."""
    rows = []
    t0 = time.perf_counter()
    if jobs <= 1:
        results = map(compile_case, cases)
        pool = None
    else:
        import multiprocessing

        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(compile_case, cases, chunksize=1)
    try:
        for i, row in enumerate(results, 1):
            rows.append(row)
            if progress and (i % 25 == 0 or i == len(cases)):
                print(f"  compiled {i}/{len(cases)} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.shutdown()
    return rows


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (kernel, arch, dtype, head_dim, variant): the spill-free row with the largest tile (then the most
    stages, then the fewest registers), or, where none is spill-free, the row with the smallest stack frame."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r.get("error"):
            groups.setdefault((r["kernel"], r["arch"], r["dtype"], r["head_dim"], r["variant"]), []).append(r)
    best = []
    for key in sorted(groups, key=lambda k: (KERNELS.index(k[0]), k[1], k[2], k[3], k[4])):
        rs = groups[key]
        free = [r for r in rs if r["spill_free"]]
        if free:
            pick = max(free, key=lambda r: (r["block_m"] * r["block_n"], r["num_stages"], -r["regs"]))
        else:
            pick = min(rs, key=lambda r: (not r["smem_ok"], r["stack"], -r["block_m"] * r["block_n"]))
        best.append(dict(pick, spill_free_configs=f"{len(free)}/{len(rs)}"))
    return best


def main(argv=None, *, quick: bool = False) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", choices=("autotune", "candidates"), default="autotune")
    parser.add_argument("--kernel", nargs="*", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--arch", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--dtype", nargs="*", default=list(DTYPES), choices=(*DTYPES, "fp32"))
    parser.add_argument("--head-dim", nargs="*", type=int, default=list(HEAD_DIMS))
    parser.add_argument("--variant", nargs="*", default=None, choices=list(VARIANTS))
    parser.add_argument("--stages", nargs="*", type=int, default=[2], help="num_stages tried (--space candidates)")
    parser.add_argument("--warps", nargs="*", type=int, default=[4, 8], help="num_warps tried (--space candidates)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--first", action="store_true",
                        help="only the first configuration of each list (the fast check in tests/kernels)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--no-csv", action="store_true", help="print only; do not append to bench/results")
    parser.add_argument("--all-rows", action="store_true", help="print every row, not the best per group")
    args = parser.parse_args(argv if argv is not None else [])
    if quick:
        args.head_dim, args.dtype = [128], ["bf16"]
    sel = dict(kernels=args.kernel, archs=args.arch, dtypes=args.dtype, head_dims=args.head_dim)
    if args.space == "autotune":
        cases = autotune_cases(**sel, variants=args.variant or DEFAULT_VARIANTS)
    else:
        cases = candidate_cases(**sel, variants=args.variant or ("causal",), warps=args.warps, stages=args.stages)
    if args.first:
        firsts = {}
        for c in cases:
            firsts.setdefault((c.kernel, c.arch, c.dtype, c.head_dim, c.variant), c)
        cases = list(firsts.values())

    # A private cache: every configuration really compiles, and compile_s is the cold compile time.
    with tempfile.TemporaryDirectory(prefix="ringlwm-compile-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        t0 = time.perf_counter()
        print(f"compiling {len(cases)} kernel configurations ({args.jobs} processes)", file=sys.stderr)
        rows = run_cases(cases, jobs=args.jobs)
        elapsed = time.perf_counter() - t0
    from bench.common import append_csv, print_table, stamp

    show = ["kernel", "arch", "dtype", "head_dim", "variant", "block_m", "block_n", "num_warps", "num_stages",
            "regs", "stack", "spill_st", "smem", "hgmma", "hmma", "cp_async", "spill_free"]
    if args.all_rows:
        print_table(rows, show + ["error"])
    else:
        print_table(best_rows(rows), show + ["spill_free_configs"])
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(rows, f)
    errors = [r for r in rows if r.get("error")]
    print(f"{len(rows)} configurations, {len(errors)} failed to compile, "
          f"{sum(bool(r['spill_free']) for r in rows)} spill-free; {elapsed:.0f} s with {args.jobs} processes")
    for r in errors[:10]:
        print("  FAILED", {k: r[k] for k in COLUMNS[:9]}, r["error"])
    if not args.no_csv and args.space == "autotune":
        import torch

        st = stamp(torch.device("cpu"))
        st["device"] = "compile only (ptxas)"
        path = append_csv("compile", [dict(st, **{c: r.get(c, "") for c in COLUMNS}) for r in rows])
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
