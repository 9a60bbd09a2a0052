"""What every entry point shares (ringlwm.runtime): the model loader's type checks, fingerprints, provenance."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from tiny_models import tiny_llama_config
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from ringlwm.models import RingLlamaForCausalLM
from ringlwm.runtime import check_provenance, load_model, model_fingerprint, path_fingerprint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(
        root / "gpt2")
    llama = tiny_llama_config(num_hidden_layers=1, num_attention_heads=4)
    LlamaForCausalLM(llama).save_pretrained(root / "llama")
    (root / "empty").mkdir()
    return root


def test_loader_names_what_it_found(checkpoints):
    with pytest.raises(ValueError, match=r"model_type 'gpt2' \(GPT2LMHeadModel\).*needs .*Llama checkpoint"):
        load_model(checkpoints / "gpt2", purpose="ringlwm.generate")
    with pytest.raises(ValueError, match="LWM vision-language checkpoint"):
        load_model(checkpoints / "llama", vision=True)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(checkpoints / "empty")
    with pytest.raises(FileNotFoundError, match="no model directory"):
        load_model(checkpoints / "missing")
    model = load_model(checkpoints / "llama", dtype=torch.float64)
    reference = LlamaForCausalLM.from_pretrained(checkpoints / "llama", dtype=torch.float64)
    assert type(model) is RingLlamaForCausalLM and not model.training
    ids = torch.randint(0, 64, (1, 12))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("command", [["ringlwm.generate", "--prompt", "hi"],
                                     ["ringlwm.vision.generate", "chat", "--question", "what?", "--codes", "x.npy"]])
def test_commands_refuse_a_foreign_checkpoint_within_seconds(checkpoints, command):
    """Before: ringlwm.generate built a default 4096-wide Llama from a GPT-2 folder and was killed for memory."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", command[0], *command[1:], "--model", str(checkpoints / "gpt2"),
                           "--tokenizer", str(checkpoints / "gpt2")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "model_type 'gpt2'" in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - start < 60


def test_fingerprints_follow_content_not_location(checkpoints, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(checkpoints / "llama", copy)
    a, b = model_fingerprint(checkpoints / "llama"), model_fingerprint(copy)
    assert a["weights"] == b["weights"] and a["config"] == b["config"] and a["path"] != b["path"]
    state = LlamaForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        state.lm_head.weight[0, 0] += 1.0
    state.save_pretrained(copy)
    assert model_fingerprint(copy)["weights"] != a["weights"]
    assert path_fingerprint(copy / "config.json") == a["config"]


def test_provenance_check_names_the_differences(tmp_path):
    old = {"model": {"weights": "aa", "path": "/m"}, "seed": 0}
    assert check_provenance(old, old, what="results", path=tmp_path, overwrite=False) is True
    assert check_provenance(None, old, what="results", path=tmp_path, overwrite=False) is False
    assert check_provenance(old, {"seed": 1}, what="results", path=tmp_path, overwrite=True) is False
    with pytest.raises(ValueError, match=r"model.weights: 'aa' -> 'bb'.*--overwrite"):
        check_provenance(old, {"model": {"weights": "bb", "path": "/m"}, "seed": 0}, what="results", path=tmp_path,
                         overwrite=False)
    with pytest.raises(ValueError, match="do not record what produced them"):
        check_provenance({}, old, what="results", path=tmp_path, overwrite=False)
