"""The trainer end to end: `torchrun -m ringlwm.train` on 1-2 gloo processes with tiny recipes.

Independent references: the same run with another sequence-parallel degree (sp=1 on one process),
an uninterrupted run (for SIGKILL + resume), the configured theta/length (for the stage change).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaForCausalLM

from ringlwm.parallel import ParallelDims
from ringlwm.train.config import load_config

RECIPE = {
    "model": {"init": "random", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
              "num_heads": 4, "num_kv_heads": 2},
    "data": {"sources": [{"format": "synthetic", "synthetic_lengths": [8, 100]}], "seed": 3},
    "stages": [{"name": "s0", "seq_len": 128, "rope_theta": 10000.0, "steps": 20, "lr": 1.0e-2, "warmup_steps": 2,
                "batch_size": 4, "sp": 2}],
    "checkpoint": {"save_every": 0, "keep_last": 2},
    "logging": {"wandb": False, "progress": False},
}


def _write(tmp_path, recipe, name="recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def _command(recipe_path, out, nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "ringlwm.train", str(recipe_path), "--out", str(out), *args]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def _train(recipe_path, out, nproc, *args, timeout=300):
    proc = subprocess.run(_command(recipe_path, out, nproc, *args), env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return _metrics(out)


def _metrics(out):
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_tiny_run_loss_falls_and_writes_everything(tmp_path):
    rows = _train(_write(tmp_path, RECIPE), tmp_path / "run", 2)
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in ("loss", "lr", "tokens_per_s", "mfu", "max_memory_gb", "grad_norm"):
        assert key in rows[0]
    assert rows[0]["mfu"] is None  # no known peak on a CPU
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-5:]) / 5
    assert first > 3.9  # log(64) = 4.16 at random init
    assert last < first - 0.4, [round(r["loss"], 2) for r in rows]
    assert (tmp_path / "run" / "hf" / "config.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / "stage00-step0000020" / "meta.json").is_file()


def test_sp2_equals_sp1_on_the_same_data(tmp_path):
    """One process with sp=1 and two processes with sp=2 see the same sequences: same loss curve."""
    ring = _train(_write(tmp_path, RECIPE, "sp2.yaml"), tmp_path / "sp2", 2, "--steps", "6")
    single_recipe = json.loads(json.dumps(RECIPE))
    single_recipe["stages"][0]["sp"] = 1
    single = _train(_write(tmp_path, single_recipe, "sp1.yaml"), tmp_path / "sp1", 1, "--steps", "6")
    for a, b in zip(ring, single):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * abs(b["grad_norm"]), (a, b)


def test_sigkill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"][0]["steps"] = 16
    path = _write(tmp_path, recipe)
    reference = _train(path, tmp_path / "full", 2, "--save-every", "4")

    out = tmp_path / "killed"
    proc = subprocess.Popen(_command(path, out, 2, "--save-every", "4"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    proc.wait()
    killed_at = len(_metrics(out))
    assert 10 <= killed_at < 16, killed_at

    resumed = _train(path, out, 2, "--save-every", "4")
    assert [r["step"] for r in resumed] == list(range(1, 17))
    checkpoint_step = 8 if killed_at < 12 else 12
    for a, b in zip(resumed[checkpoint_step:], reference[checkpoint_step:]):
        for key in ("loss", "lr", "grad_norm"):
            assert a[key] == b[key], (key, a, b)


def test_two_stages_change_theta_length_and_sp(tmp_path):
    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"] = [
        {"name": "short", "seq_len": 64, "rope_theta": 10000.0, "steps": 10, "lr": 3.0e-3, "batch_size": 2, "sp": 1},
        {"name": "long", "seq_len": 256, "rope_theta": 160000.0, "steps": 4, "lr": 1.0e-3, "batch_size": 1, "sp": 2},
    ]
    rows = _train(_write(tmp_path, recipe), tmp_path / "run", 2)
    assert [r["stage"] for r in rows] == ["short"] * 10 + ["long"] * 4
    assert {r["seq_len"] for r in rows[10:]} == {256} and {r["sp"] for r in rows[10:]} == {2}
    assert rows[10]["rope_theta"] == 160000.0 and rows[0]["rope_theta"] == 10000.0
    # The long stage starts from the short stage's weights (resharded from sp=1 to sp=2), not from scratch.
    assert rows[10]["loss"] < rows[0]["loss"] - 0.3, (rows[0]["loss"], rows[10]["loss"])
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    assert hf.config.max_position_embeddings == 256
    assert hf.config.rope_parameters["rope_theta"] == 160000.0
    with torch.no_grad():
        assert torch.isfinite(hf(input_ids=torch.arange(40)[None]).logits).all()


# ------------------------------------------------------------------------------------------------
# Bad configurations (no processes)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,match",
    [
        ("model.hidden_sise=3", "unknown key"),
        ("stages.0.seq_len=102", "multiple of 4"),
        ("stages.0.steps=0", "steps must be positive"),
        ("stages.0.warmup_steps=50", "warmup_steps"),
        ("model.num_kv_heads=3", "num_kv_heads"),
        ("data.sources=[]", "data.sources is empty"),
        ("data.sources.0.format=csv", "format must be one of"),
        ("model.init=/no/such/dir", "no checkpoint directory"),
        ("stages.0.lr=fast", "lr must be float"),
        ("stages.3.lr=1", "no list index"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        load_config(_write(tmp_path, RECIPE), [override])


def test_missing_recipe_and_text_without_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="tokenizer is required"):
        load_config(_write(tmp_path, RECIPE), ["data.sources.0.format=jsonl", "data.sources.0.path=x.jsonl"])


def test_parallel_dims_check_the_world():
    assert ParallelDims(1, -1, 2, 8).dp_shard == 4
    with pytest.raises(ValueError, match=r"dp_replicate=1 x dp_shard=-1 x sp=3 vs world_size=4"):
        ParallelDims(1, -1, 3, 4)
    with pytest.raises(ValueError, match="multiply to the world size"):
        ParallelDims(2, 1, 1, 4)
    with pytest.raises(ValueError, match="only one of"):
        ParallelDims(-1, -1, 1, 4)
