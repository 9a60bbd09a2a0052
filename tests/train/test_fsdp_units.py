"""parallel.fsdp_units: "model" (the whole model one FSDP2 unit) against the default "layers" (one unit per decoder
layer, the input embeddings, the root). References: the per-layer run of the same recipe (the same losses and gradient
norms, bit for bit, on 2 ranks), its checkpoint (a run killed under one layout resumes under the other as the
uninterrupted run), and the per-layer planner (one unit holds every layer's full parameters at once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_trainer import RECIPE, _kill_after, _train, _write
from tiny_models import tiny_llama_config

from ringlwm import plan

ROOT = Path(__file__).resolve().parents[2]


def _recipe(units: str) -> dict:
    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"][0]["steps"] = 8
    recipe["parallel"] = {"fsdp_units": units}
    return recipe


def test_one_unit_trains_as_per_layer_units_and_resumes_across_them(tmp_path):
    layers = _write(tmp_path, _recipe("layers"), "layers.yaml")
    reference = _train(layers, tmp_path / "layers", 2, "--save-every", "2")
    one = _train(_write(tmp_path, _recipe("model"), "model.yaml"), tmp_path / "model", 2)
    assert [(r["loss"], r["grad_norm"]) for r in one] == [(r["loss"], r["grad_norm"]) for r in reference]

    out = tmp_path / "switched"
    _kill_after(layers, out, 2, 3, "--save-every", "2")
    saved = sorted(int(p.name.split("step")[-1]) for p in (out / "checkpoints").glob("stage00-step*"))
    assert saved and saved[-1] < 8, saved
    resumed = _train(layers, out, 2, "--save-every", "2", "parallel.fsdp_units=model")
    assert json.loads((out / "recipe.json").read_text())  # the run record allows the change
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(resumed[saved[-1]:], reference[saved[-1]:], strict=True):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), (a, b)


def _units(rank, world, units):
    from torch.distributed.fsdp import FSDPModule

    from ringlwm.models import RingLlamaForCausalLM
    from ringlwm.parallel import ParallelDims, parallelize_llama

    with torch.device("meta"):
        model = RingLlamaForCausalLM(tiny_llama_config(num_hidden_layers=3))
    _, fsdp_mesh = ParallelDims(1, -1, 1, world).build_mesh("cpu")
    parallelize_llama(model, fsdp_mesh, mixed_precision=False, units=units)
    return sorted(name for name, m in model.named_modules() if isinstance(m, FSDPModule))


def test_one_unit_is_the_root_alone():
    from dist_utils import run_distributed

    assert run_distributed(_units, 2, "model")[0] == [""]
    assert run_distributed(_units, 2, "layers")[0] == ["", "model.embed_tokens", "model.layers.0", "model.layers.1",
                                                       "model.layers.2"]
    with pytest.raises(Exception, match="FSDP units must be one of"):
        run_distributed(_units, 1, "blocks")


def test_the_planner_holds_every_layer_in_full_with_one_unit():
    overrides = ["model.hidden_size=512", "model.intermediate_size=1024", "model.num_heads=8", "model.num_kv_heads=8",
                 "model.num_layers=6"]
    peaks = {}
    for units in ("layers", "model"):
        config, preset = plan.load_recipe(ROOT / "recipes" / "tiny.yaml", overrides)
        config.parallel.fsdp_units = units
        setup = plan.make_setup(config, 0, preset, 2, 256)
        peaks[units] = plan.summarize(setup, plan.plan_step(setup), plan.Budget(overhead=0))
    layer = 2 * (4 * 512 * 512 + 3 * 512 * 1024)  # one decoder layer's matrices in bf16 (q, k, v, o; gate, up, down)
    whole = 2 * peaks["model"]["num_params"]  # the whole model gathered in bf16
    one, per_layer = peaks["model"]["tracker_bytes"], peaks["layers"]["tracker_bytes"]
    assert one["Unsharded Param"] == whole
    assert layer <= per_layer["Unsharded Param"] <= 2.2 * layer  # a layer and the next one's prefetch
    assert one["Sharded Param"] == per_layer["Sharded Param"]  # the same shards
    extra = peaks["model"]["memory_bytes"]["total"] - peaks["layers"]["memory_bytes"]["total"]
    assert extra >= whole - per_layer["Unsharded Param"], extra
