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
from tiny_models import tiny_llama_config
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


def _kill_after(recipe_path, out, nproc, lines: int, *args) -> None:
    """Start a run and SIGKILL the launcher and every rank once ``lines`` metric lines are written (mid-run)."""
    proc = subprocess.Popen(_command(recipe_path, out, nproc, *args), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        metrics = Path(out) / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= lines:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


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


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """RECIPE's first 6 steps (``--steps 6``) by layout, each run once for the module: {"sp1": 1 process,
    "sp2": 2 processes at sp=2, "2d": 4 processes at (sp=2, ulysses=2)}."""
    cache, tmp = {}, tmp_path_factory.mktemp("six_steps")

    def get(name):
        if name not in cache:
            recipe = json.loads(json.dumps(RECIPE))
            sp, ulysses, nproc = {"sp1": (1, 1, 1), "sp2": (2, 1, 2), "2d": (2, 2, 4)}[name]
            recipe["stages"][0].update(sp=sp, ulysses=ulysses)
            cache[name] = _train(_write(tmp, recipe, f"{name}.yaml"), tmp / name, nproc, "--steps", "6")
        return cache[name]

    return get


def _same_curve(rows, reference):
    for a, b in zip(rows, reference, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * abs(b["grad_norm"]), (a, b)


def test_sp2_equals_sp1_on_the_same_data(six_steps):
    """One process with sp=1 and two processes with sp=2 see the same sequences: same loss curve."""
    _same_curve(six_steps("sp2"), six_steps("sp1"))


def test_sigkill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"][0]["steps"] = 16
    path = _write(tmp_path, recipe)
    reference = _train(path, tmp_path / "full", 2, "--save-every", "4")

    out = tmp_path / "killed"
    _kill_after(path, out, 2, 10, "--save-every", "4")
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
        ("stages.0.min_lr_ratio=1.5", r"min_lr_ratio must lie in \[0, 1\]"),
        ("optim.weight_decay=-0.1", "weight_decay must be non-negative"),
        ("optim.grad_clip=-1", "grad_clip must be non-negative"),
        ("optim.betas=[0.9]", "betas must be two numbers"),
        ("optim.betas=[0.9, 1.5]", "betas must be two numbers"),
        ("stages.0.batch_size=true", "batch_size must be int, got True"),
        ("stages.0.rope_theta=-1", "rope_theta must be positive"),
        ("parallel.fsdp_units=blocks", r"fsdp_units must be one of \('layers', 'model'\)"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        load_config(_write(tmp_path, RECIPE), [override])


def test_init_checkpoint_of_another_family_is_refused_at_load(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"model.init: .* holds model_type 'gpt2'"):
        load_config(_write(tmp_path, RECIPE), [f"model.init={tmp_path / 'gpt2'}"])


def test_progress_is_a_line_every_few_seconds_when_not_on_a_terminal(tmp_path, monkeypatch, capsys):
    """A redraw per step filled the demo's log; on a file or pipe the logger writes timed plain lines."""
    from types import SimpleNamespace

    from ringlwm.train import metrics

    logger = metrics.MetricsLogger(tmp_path, enabled=True, config={}, wandb_cfg=SimpleNamespace(wandb=False),
                                   progress=True, total_steps=200)  # pytest's captured stderr is no terminal
    for step in range(1, 201):
        logger.log({"step": step, "stage": "s", "loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0})
    logger.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: step")]
    assert len(lines) == 2 and lines[-1].startswith("train: step 200/200"), lines  # the first and the last


def test_missing_recipe_and_text_without_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="tokenizer is required"):
        load_config(_write(tmp_path, RECIPE), ["data.sources.0.format=jsonl", "data.sources.0.path=x.jsonl"])


def test_parallel_dims_check_the_world():
    assert ParallelDims(1, -1, 2, 8).dp_shard == 4
    with pytest.raises(ValueError, match=r"dp_replicate=1 x dp_shard=-1 x sp=3 x ulysses=1 vs world_size=4; .* one of \[1, 2, 4\]"):
        ParallelDims(1, -1, 3, 4)
    with pytest.raises(ValueError, match="multiply to the world size"):
        ParallelDims(2, 1, 1, 4)
    with pytest.raises(ValueError, match="only one of"):
        ParallelDims(-1, -1, 1, 4)


# ------------------------------------------------------------------------------------------------
# Nothing silent: RoPE from the init checkpoint, reruns checked against the run's recipe, damaged checkpoints
# ------------------------------------------------------------------------------------------------

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def _llama3_style_checkpoint(path: Path) -> Path:
    """A tiny checkpoint whose config.json is written the way Llama-3 releases write it: top-level rope_theta
    500000 and a "llama3" rope_scaling block, max_position_embeddings 512."""

    cfg = tiny_llama_config(num_attention_heads=4, rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0})
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    raw = json.loads((path / "config.json").read_text())
    raw.pop("rope_parameters")
    raw.update(rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE))
    (path / "config.json").write_text(json.dumps(raw))
    return path


def test_stages_keep_the_init_checkpoints_rope_unless_they_set_theta(tmp_path):
    init = _llama3_style_checkpoint(tmp_path / "llama3")
    recipe = json.loads(json.dumps(RECIPE))
    recipe["model"] = {"init": str(init)}
    recipe["stages"] = [
        {"name": "keep", "seq_len": 128, "steps": 2, "lr": 1e-3, "batch_size": 2, "sp": 1},  # no rope_theta
        {"name": "theta", "seq_len": 128, "rope_theta": 1.0e6, "steps": 2, "lr": 1e-3, "batch_size": 2, "sp": 1},
    ]
    proc = subprocess.run(_command(_write(tmp_path, recipe), tmp_path / "run", 1), env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _metrics(tmp_path / "run")
    expected_keep = {**LLAMA3_ROPE, "rope_theta": 500000.0, "max_position_embeddings": 512}
    assert rows[0]["rope"] == expected_keep, rows[0]["rope"]
    assert rows[2]["rope"] == {**expected_keep, "rope_theta": 1.0e6}, rows[2]["rope"]
    assert "'rope_type': 'llama3'" in proc.stdout and "'rope_theta': 500000.0" in proc.stdout
    hf = json.loads((tmp_path / "run" / "hf" / "config.json").read_text())
    assert hf["rope_parameters"] == {**LLAMA3_ROPE, "rope_theta": 1.0e6}
    assert hf["max_position_embeddings"] == 512  # never below the checkpoint's, though the stages ran 128


def _weights_digest(hf_dir: Path) -> str:
    import hashlib

    return hashlib.sha256((hf_dir / "model.safetensors").read_bytes()).hexdigest()


def test_rerun_continues_with_more_steps_and_refuses_another_recipe(tmp_path):
    from ringlwm.train.step import lr_at

    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"][0].update(sp=1, steps=4, warmup_steps=1)
    path, out = _write(tmp_path, recipe), tmp_path / "run"
    first = _train(path, out, 1)
    before = _weights_digest(out / "hf")

    again = subprocess.run(_command(path, out, 1), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "is complete" in again.stdout, again.stdout + again.stderr[-3000:]

    more = _train(path, out, 1, "--steps", "8")  # 4 more steps, on the schedule of an 8-step stage
    assert [r["step"] for r in more] == list(range(1, 9))
    assert more[:4] == first
    config = load_config(path, ["stages.0.steps=8"])
    assert [r["lr"] for r in more[4:]] == [lr_at(config.stages[0], s) for s in range(4, 8)]
    assert _weights_digest(out / "hf") != before  # hf/ is the model after 8 steps

    for args, named in ((["model.hidden_size=64"], "model.hidden_size: 32 -> 64"),
                        (["data.seed=4", "--steps", "8"], "data.seed"),
                        (["--steps", "2"], "at least 8")):
        proc = subprocess.run(_command(path, out, 1, *args), env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and named in proc.stderr, (args, proc.stderr[-3000:])
    assert _metrics(out) == more  # refused reruns touch nothing

    restarted = _train(path, out, 1, "model.hidden_size=64", "--restart")
    assert [r["step"] for r in restarted] == [1, 2, 3, 4]
    assert json.loads((out / "hf" / "config.json").read_text())["hidden_size"] == 64


def test_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path):
    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"][0].update(steps=8, warmup_steps=1)
    path, out = _write(tmp_path, recipe), tmp_path / "run"
    reference = _train(path, out, 2, "--save-every", "4")
    newest = out / "checkpoints" / "stage00-step0000008"
    shard = newest / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated

    proc = subprocess.run(_command(path, out, 2, "--save-every", "4"), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "skipping checkpoint" in proc.stdout and "__1_0.distcp has 100 bytes" in proc.stdout, proc.stdout
    assert "stage00-step0000004" in proc.stdout
    resumed = _metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(resumed, reference):
        for key in ("loss", "lr", "grad_norm"):
            assert a[key] == b[key], (key, a, b)

    # Every checkpoint damaged: a clear error on every rank, and metrics.jsonl left as it was.
    for ckpt in (out / "checkpoints").iterdir():
        (ckpt / "extra-rank0.pt").unlink()
    before = (out / "metrics.jsonl").read_text()
    proc = subprocess.run(_command(path, out, 2, "--steps", "12"), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "failed verification" in proc.stderr, proc.stderr[-4000:]
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_checkpoints_off_trains_the_same_and_writes_none(tmp_path):
    """checkpoint.enabled: false (benchmarks, gpu-check) changes nothing but the files written."""
    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"][0].update(sp=1, steps=4, warmup_steps=1)
    path = _write(tmp_path, recipe)
    on = _train(path, tmp_path / "on", 1)
    off = _train(path, tmp_path / "off", 1, "checkpoint.enabled=false")
    for a, b in zip(on, off):
        for key in ("loss", "lr", "grad_norm"):
            assert a[key] == b[key], (key, a, b)
    assert (tmp_path / "on" / "checkpoints").is_dir() and not (tmp_path / "off" / "checkpoints").exists()
    assert (tmp_path / "off" / "hf" / "config.json").is_file()
    with pytest.raises(ValueError, match="allows one stage only"):
        two = json.loads(json.dumps(recipe))
        two["stages"].append({**two["stages"][0], "name": "second"})
        load_config(_write(tmp_path, two, "two.yaml"), ["checkpoint.enabled=false"])


@pytest.mark.slow
def test_breakdown_and_profile_change_nothing_and_account_for_the_step(tmp_path):
    """logging.breakdown: phases that add up to the step's wall time; logging.profile_steps: a per-category
    summary per rank, attention and communication among them (sp=2); the losses are bitwise those of a run
    without either."""
    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"][0].update(steps=5, warmup_steps=1)
    path = _write(tmp_path, recipe)
    plain = _train(path, tmp_path / "plain", 2)
    timed = _train(path, tmp_path / "timed", 2, "logging.breakdown=true", "logging.profile_steps=[3, 4]")
    for a, b in zip(plain, timed):
        for key in ("loss", "lr", "grad_norm"):
            assert a[key] == b[key], (key, a, b)
        assert "breakdown" not in a
    for row in timed:
        phases = row["breakdown"]
        assert set(phases) == {"data", "forward", "backward", "grad_norm", "optimizer", "other"}
        step_seconds = row["tokens"] / row["tokens_per_s"]
        assert abs(sum(phases.values()) - step_seconds) <= 0.05 * step_seconds + 2e-3, (phases, step_seconds)
        assert phases["forward"] > 0 and phases["backward"] > 0
    for rank in (0, 1):
        summary = json.loads((tmp_path / "timed" / "profile" / f"rank{rank}.json").read_text())
        assert summary["steps"] == 2
        cpu = summary["cpu_seconds_per_step"]
        assert cpu["attention"] > 0 and cpu["communication"] > 0 and cpu["matmul"] > 0, cpu
        assert summary["top_ops"]
    with pytest.raises(ValueError, match="profile_steps"):
        load_config(path, ["logging.profile_steps=[4, 2]"])


def _train_with_an_inf_gradient(rank, world_size, recipe_path, out, inf_step, overrides):
    """``train`` in this process group, with every gradient of the first parameter set to inf after the
    backward of optimizer step ``inf_step``. Returns the NonFiniteStepError message, or None."""
    from ringlwm.train import trainer

    original, calls = trainer.train_step, [0]

    def injected(model, micro, *args, **kwargs):
        result = original(model, micro, *args, **kwargs)
        calls[0] += 1
        if calls[0] == inf_step:
            grad = next(model.parameters()).grad
            (grad.to_local() if hasattr(grad, "to_local") else grad).fill_(float("inf"))
        return result

    trainer.train_step = injected
    try:
        trainer.train(load_config(recipe_path, overrides), out)
    except trainer.NonFiniteStepError as exc:
        return str(exc)
    return None


def _checkpoint_state(path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = Path(str(path) + ".pt")
    dcp_to_torch_save(path, target)
    return torch.load(target, weights_only=False)


def test_a_non_finite_step_is_never_applied(tmp_path):
    """An inf gradient norm at step 3 (sp=2, FSDP2 over 2 gloo ranks). Default: every rank stops with an error
    naming the step and the last good checkpoint; no metrics line, no checkpoint after it. optim.on_nonfinite
    skip: training goes on, the step's update is dropped (the weights and optimizer state after step 3 equal
    those after step 2, bitwise), the metrics count it, and the next steps train."""
    from dist_utils import run_distributed

    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"][0].update(steps=4)
    recipe["checkpoint"].update(save_every=1, keep_last=4)
    path = _write(tmp_path, recipe)
    stop = tmp_path / "stop"
    messages = run_distributed(_train_with_an_inf_gradient, 2, str(path), str(stop), 3, [])
    assert all(m and "step 3" in m and "stage00-step0000002" in m and "not finite" in m for m in messages), messages
    assert [r["step"] for r in _metrics(stop)] == [1, 2]
    assert sorted(p.name for p in (stop / "checkpoints").iterdir()) == ["stage00-step0000001", "stage00-step0000002"]

    skip = tmp_path / "skip"
    assert run_distributed(_train_with_an_inf_gradient, 2, str(path), str(skip), 3,
                           ["optim.on_nonfinite=skip"]) == [None, None]
    rows = _metrics(skip)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # finite steps train alike under either setting
    assert [(r["loss"], r["grad_norm"]) for r in rows[:2]] == [(r["loss"], r["grad_norm"]) for r in _metrics(stop)]
    assert rows[2]["loss"] is None and rows[2]["grad_norm"] is None and rows[2]["skipped_steps"] == 1
    assert rows[3]["skipped_steps"] == 1 and rows[3]["loss"] is not None
    two, three, four = (_checkpoint_state(skip / "checkpoints" / f"stage00-step000000{i}") for i in (2, 3, 4))
    for name, value in two["model"].items():
        assert torch.equal(value, three["model"][name]), name
    # AdamW's state (step count, moments) is untouched too; the param groups' lr follows the schedule.
    moments = [[t for t in torch.utils._pytree.tree_flatten(state["optim"]["state"])[0]] for state in (two, three)]
    assert len(moments[0]) == len(moments[1]) > 0 and all(torch.equal(a, b) for a, b in zip(*moments))
    assert any(not torch.equal(value, four["model"][name]) for name, value in three["model"].items())
    with pytest.raises(ValueError, match="on_nonfinite"):
        load_config(path, ["optim.on_nonfinite=ignore"])


def test_ulysses_x_ring_equals_sp1(six_steps):
    """Four processes at (sp=2, ulysses=2), two heads each after the all-to-all, train as one process does: the
    same loss curve and gradient norms over 6 steps."""
    two_d = six_steps("2d")
    assert {r["ulysses"] for r in two_d} == {2} and {r["sp"] for r in two_d} == {2}
    _same_curve(two_d, six_steps("sp1"))


@pytest.mark.slow
def test_ulysses_x_ring_sigkill_and_resume_is_bitwise(tmp_path):
    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"][0].update(steps=8, ulysses=2)
    path = _write(tmp_path, recipe)
    reference = _train(path, tmp_path / "full", 4, "--save-every", "4")
    out = tmp_path / "killed"
    _kill_after(path, out, 4, 5, "--save-every", "4")
    assert 5 <= len(_metrics(out)) < 8
    resumed = _train(path, out, 4, "--save-every", "4")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(resumed[4:], reference[4:]):
        for key in ("loss", "lr", "grad_norm"):
            assert a[key] == b[key], (key, a, b)


def test_ulysses_degrees_that_do_not_fit_are_refused_before_any_step(tmp_path):
    recipe = json.loads(json.dumps(RECIPE))
    recipe["model"].update(hidden_size=48, num_heads=3, num_kv_heads=3)
    recipe["stages"][0].update(sp=1, ulysses=2)
    proc = subprocess.run(_command(_write(tmp_path, recipe), tmp_path / "run", 2), env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "ulysses = 2 does not fit 3 attention heads" in proc.stderr and "[1, 3]" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not _metrics(tmp_path / "run")
    with pytest.raises(ValueError, match="multiple of 12"):
        load_config(_write(tmp_path, RECIPE), ["stages.0.seq_len=40", "stages.0.ulysses=3"])


def test_two_launchers_as_two_nodes_keep_ulysses_inside_a_node(tmp_path, six_steps):
    """Two torchrun launchers on localhost (c10d rendezvous, 2 processes each) as two "nodes", training at
    (sp=2, ulysses=2): each Ulysses group is one launcher's pair of ranks (the trainer gathers torchrun's
    GROUP_RANK over it), the ring crosses the launchers, and the losses are one 4-process launcher's."""
    import socket

    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"][0].update(ulysses=2)
    path = _write(tmp_path, recipe)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two_nodes"
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d",
         f"--rdzv_endpoint=localhost:{port}", "--rdzv_id=ringlwm-test", "-m", "ringlwm.train", str(path), "--out",
         str(out), "--steps", "6"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "ulysses 2 (inside one node)" in "".join(logs), "".join(logs)[-3000:]
    for a, b in zip(_metrics(out), six_steps("2d"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]) and a["sp"] == 2 and a["ulysses"] == 2, (a, b)
