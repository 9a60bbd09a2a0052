"""The Triton kernels compiled for real GPU targets, without a GPU (bench/compile.py, `make bench PART=compile`).

Triton compiles for sm_80 and sm_90 on this machine with the ptxas of its wheel; cuobjdump reads back registers,
stack frame (spills), shared memory and the SASS. The autotune lists in ringlwm.kernels.triton_flash keep only
configurations that compile without spills, with tensor-core instructions and with the streamed loads pipelined
(cp.async); these tests hold them to that. The compiles run in a subprocess: this process runs the kernels
under the Triton interpreter (conftest.py), whose kernels cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(
    not ((NVIDIA_BIN / "ptxas").exists() and (NVIDIA_BIN / "cuobjdump").exists()),
    reason="this triton wheel ships no ptxas/cuobjdump",
)


def _compile(tmp_path, *args, timeout):
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compile", *args, "--json", str(out), "--no-csv"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _describe(r):
    return (f"{r['kernel']} {r['arch']} {r['dtype']} d{r['head_dim']} {r['variant']} "
            f"{r['block_m']}x{r['block_n']} w{r['num_warps']} s{r['num_stages']}")


def _check_spill_free(r):
    name = _describe(r)
    assert not r["error"], f"{name}: {r['error']}"
    assert r["stack"] == 0 and r["spill_st"] == 0, f"{name} spills: stack {r['stack']} B, {r['spill_st']} STL"
    assert r["smem_ok"], f"{name} asks for {r['smem']} B of shared memory"
    tensor_core = r["hgmma"] if r["arch"] == "sm90" and r["head_dim"] <= 128 else r["hgmma"] + r["hmma"]
    assert tensor_core > 0, f"{name} has no tensor-core instructions"
    assert r["cp_async"] > 0, f"{name}: the streamed loads are not pipelined (no cp.async)"


def test_first_configs_compile_spill_free_for_sm80_and_sm90(tmp_path):
    """One configuration per kernel (the first of its autotune list), head_dim 128 (Llama's), bf16, causal:
    compiles for sm_90 and sm_80 with no spills, HGMMA (sm_90) / HMMA (sm_80) and cp.async."""
    rows = _compile(tmp_path, "--first", "--head-dim", "128", "--dtype", "bf16", "--variant", "causal",
                    "--jobs", "2", timeout=600)
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in ("fwd", "dkdv", "dq")
                                                       for a in ("sm80", "sm90")}
    for r in rows:
        _check_spill_free(r)
        assert (r["hgmma"] if r["arch"] == "sm90" else r["hmma"]) > 0, _describe(r)


@pytest.mark.slow
def test_every_autotune_config_compiles_spill_free_for_sm80_and_sm90(tmp_path):
    """Every configuration of every autotune list (fwd, dkdv, dq; fp16 and bf16; head_dim 64, 128, 256; causal
    with and without segment ids) compiles for both targets, and each is spill-free with tensor cores."""
    rows = _compile(tmp_path, "--jobs", "2", timeout=3600)
    assert rows
    for r in rows:
        _check_spill_free(r)
    groups = {(r["kernel"], r["arch"], r["dtype"], r["head_dim"], r["variant"]) for r in rows}
    assert len(groups) == 3 * 2 * 2 * 3 * 2


def test_prune_keeps_the_lists_on_their_targets_and_fits_smaller_gpus():
    """The autotuner's prune keeps a list whole on the GPUs it was compiled for (A100: 163 KiB, H100: 227 KiB
    of shared memory per block) and, on a GPU with less (sm_86/sm_89: 99 KiB), keeps what its estimate fits."""
    from ringlwm.kernels import triton_flash as tf

    for kernel in tf.KERNELS:
        everything = tf._all_configs(kernel)
        for head_dim in (64, 96, 128, 256):
            block_d = tf._block_d(head_dim)
            for has_seg in (False, True):
                for dtype in ("fp16", "bf16", "fp32"):
                    for capability, smem in ((80, 166912), (90, 232448), (86, 101376), (89, 101376)):
                        listed = tf.autotune_configs(kernel, capability, dtype, head_dim, has_seg)
                        assert listed, (kernel, capability, dtype, head_dim, has_seg)
                        kept = tf._select(kernel, everything, capability, dtype, head_dim, has_seg, block_d,
                                          2 if dtype != "fp32" else 4, smem)
                        keys = {tf._config_key(c) for c in kept}
                        assert keys and keys <= {tf._config_key(c) for c in listed}
                        if capability in (80, 90):
                            assert len(keys) == len(listed)
