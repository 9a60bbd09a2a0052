"""The trainer with LWM's vision-language model: a tiny RingLwmForCausalLM on pre-tokenized frames."""

from __future__ import annotations

import json
import random

import torch
from test_trainer import _train, _write

from ringlwm.data import train_sentencepiece
from ringlwm.eval.needle import generated_haystack
from ringlwm.models import RingLwmForCausalLM


def _vision_data(tmp_path):
    tok = train_sentencepiece([generated_haystack(300, seed=1) + " <vision> </vision>"], vocab_size=200,
                              model_prefix=tmp_path / "tok")
    rng = random.Random(0)
    with open(tmp_path / "vl.jsonl", "w") as f:
        for i in range(64):
            frame = [rng.randrange(32) for _ in range(256)]  # a small code range: learnable statistics
            caption = generated_haystack(1, seed=i)
            spec = "[vision],caption" if i % 2 else "[caption],vision"  # image-text and text-image
            f.write(json.dumps({"vision": [frame], "caption": caption, "fields": spec}) + "\n")
    return tok


def _recipe(tmp_path, tok, sp):
    return {
        "model": {"init": "random", "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
                  "num_kv_heads": 2, "vision": True, "vision_vocab_size": 8448},
        "data": {"tokenizer": str(tok), "sources": [{"format": "jsonl", "path": str(tmp_path / "vl.jsonl"),
                                                     "vision": True}]},
        "stages": [{"name": "vl", "seq_len": 512, "rope_theta": 5.0e7, "steps": 6, "lr": 3.0e-3, "batch_size": 2,
                    "sp": sp}],
        "logging": {"wandb": False, "progress": False},
    }


def test_vision_language_training_sp2_equals_sp1_and_exports(tmp_path):
    tok = _vision_data(tmp_path)
    ring = _train(_write(tmp_path, _recipe(tmp_path, tok, 2), "sp2.yaml"), tmp_path / "sp2", 2)
    single = _train(_write(tmp_path, _recipe(tmp_path, tok, 1), "sp1.yaml"), tmp_path / "sp1", 1)
    for a, b in zip(ring, single):
        assert a["vision_loss"] > 0 and a["text_loss"] > 0
        # loss = 0.5 * vision mean + 0.5 * text mean over the global batch
        assert abs(a["loss"] - 0.5 * (a["vision_loss"] + a["text_loss"])) < 1e-4 * a["loss"]
        for key in ("loss", "vision_loss", "text_loss"):
            assert abs(a[key] - b[key]) <= 1e-4 * abs(b[key]), (key, a, b)
    assert ring[-1]["vision_loss"] < ring[0]["vision_loss"]
    model = RingLwmForCausalLM.from_pretrained(tmp_path / "sp2" / "hf")
    assert model.config.vision_vocab_size == 8448 and model.config.rope_parameters["rope_theta"] == 5.0e7
    with torch.no_grad():
        out = model(torch.tensor([[5, 6, 7]]), return_logits=True)
    assert out.vision_logits.shape == (1, 3, 8448)
