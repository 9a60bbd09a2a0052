"""The generation and needle commands end to end under torchrun (2 gloo processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from tiny_models import tiny_llama_config
from transformers import LlamaForCausalLM

from ringlwm.data import train_sentencepiece
from ringlwm.eval.needle import NEEDLE, PREFIX, generated_haystack
from ringlwm.train.checkpoint import export_hf_tokenizer


def _torchrun(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_generate_and_needle_commands(tmp_path):
    corpus = [generated_haystack(800, seed=1), NEEDLE.format(city="Oslo", number="1234567890") + " " + PREFIX,
              "Don't give information outside the document. What are the special magic numbers for? Is it?"]
    tok = train_sentencepiece(corpus, vocab_size=300, model_prefix=tmp_path / "tok")
    config = tiny_llama_config(vocab_size=300)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    export_hf_tokenizer(tok, model_dir)  # the CLIs load the tokenizer from the model directory by default

    out = _torchrun("ringlwm.generate", "--model", str(model_dir), "--tokenizer", str(tok), "--prompt",
                    "The old river", "--prompt", "A letter", "--max-new-tokens", "6")
    assert out.count("--- prompt") == 2  # rank 0 prints each prompt's continuation once

    results = tmp_path / "needle.json"
    out = _torchrun("ringlwm.eval.needle", "--model", str(model_dir), "--tokenizer", str(tok), "--lengths",
                    "256,384", "--depths", "0,100", "--trials", "1", "--max-new-tokens", "4", "--out", str(results))
    records = json.loads(results.read_text())["results"]
    assert len(records) == 4 and {r["context_length"] for r in records} == {256, 384}
    assert "context     256: accuracy" in out
    assert (tmp_path / "needle_heatmap.png").read_bytes()[:4] == b"\x89PNG"
