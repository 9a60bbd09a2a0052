"""bench.backends without a GPU: how the measured table is chosen and written, that "auto" reads it back, and a CPU
rehearsal of the measuring loop (the "cpu" backend on CPU tensors)."""

from __future__ import annotations

import json

from ringlwm.kernels import library_flash

from bench import backends, common


def _time(backend, head_dim, ms, seqlen=4096, causal=True, packed=False, ran=None):
    return {"head_dim": head_dim, "seqlen": seqlen, "causal": causal, "packed": packed, "backend": backend,
            "ran": ran or backend, "fwdbwd_ms": ms}


def _error(backend, head_dim, ok=True):
    return {"head_dim": head_dim, "backend": backend, "within_2x": ok}


def test_the_fastest_backend_is_chosen_per_head_dim_among_the_accurate_ones_that_ran_themselves():
    times = [_time("triton", 64, 10.0), _time("torch_flash", 64, 6.0), _time("cudnn", 64, 5.0),
             _time("triton", 64, 40.0, seqlen=16384), _time("torch_flash", 64, 20.0, seqlen=16384),
             _time("cudnn", 64, 30.0, seqlen=16384),  # cudnn: faster at 4K, slower in total
             _time("triton", 128, 10.0), _time("torch_flash", 128, 4.0), _time("cudnn", 128, 3.0),
             _time("flash_attn", 128, 1.0, packed=True, ran="torch_flash")]
    errors = [_error("cudnn", 128, ok=False), _error("torch_flash", 128), _error("triton", 128)]
    choice = backends.fastest(times, errors)
    # 64: torch_flash 26 ms in total against cudnn's 35; 128: cudnn's error is out, flash_attn fell back
    assert choice == {"64": "torch_flash", "128": "torch_flash"}
    # a backend that did not finish a configuration is compared on the ones every candidate finished
    partial = [_time("triton", 64, 10.0), _time("torch_flash", 64, 12.0), _time("triton", 64, 100.0, seqlen=65536)]
    assert backends.fastest(partial, []) == {"64": "triton"}


def test_the_table_keeps_other_gpus_and_auto_reads_it(tmp_path, monkeypatch):
    path = tmp_path / "attention_backends.json"
    backends.write_table("NVIDIA H100 80GB HBM3", {"64": "cudnn"}, {"torch": "x"}, [path])
    backends.write_table("NVIDIA H200", {"64": "torch_flash", "128": "cudnn"}, {"torch": "y"}, [path])
    table = json.loads(path.read_text())
    assert set(table["gpus"]) == {"NVIDIA H100 80GB HBM3", "NVIDIA H200"} and table["version"] == 1
    assert library_flash.measured_backend(table, "NVIDIA H200", 128) == "cudnn"
    assert library_flash.measured_backend(table, "NVIDIA H100 80GB HBM3", 128) == "cudnn"  # nearest measured
    assert library_flash.measured_backend(table, "NVIDIA A100-SXM4-80GB", 128) is None
    monkeypatch.setenv(library_flash.TABLE_ENV, str(path))
    monkeypatch.setattr(library_flash, "_TABLE", {})
    assert library_flash.read_table() == table


def test_the_measuring_loop_rehearses_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(backends, "RESULTS", tmp_path)
    result = backends.main(["--budget", "20", "--error-length", "64"])
    assert result["backends"] == ["cpu"] and result["choice"] == {}  # no table from a CPU run
    assert {r["packed"] for r in result["errors"]} == {False, True}
    assert all(r["out_err"] < 1e-5 for r in result["errors"])  # fp32 against fp64
    assert result["times"] and all(r["ran"] == "cpu" for r in result["times"])
    assert (tmp_path / "backends.csv").is_file() and not (tmp_path / "attention_backends.json").exists()
