"""A ringlwm checkpoint through lm-evaluation-harness's Hugging Face backend (`lm_eval --model hf`).

The task is a local YAML multiple-choice task over a JSONL file the test writes (nothing downloaded). The
harness's accuracy must equal the accuracy from log-likelihoods we compute ourselves with the same model.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_llama_config
from transformers import LlamaForCausalLM

from ringlwm.data import load_tokenizer, train_sentencepiece
from ringlwm.eval.needle import generated_haystack
from ringlwm.models import RingLlamaForCausalLM
from ringlwm.train.checkpoint import export_hf_tokenizer

lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"question": "The river was", "choices": ["quiet", "golden", "paper"], "answer": 0},
    {"question": "She walked along the", "choices": ["road", "winter", "said"], "answer": 0},
    {"question": "The old king", "choices": ["told", "bright", "under"], "answer": 1},
    {"question": "A letter from my", "choices": ["friend", "quickly", "the"], "answer": 0},
    {"question": "They crossed the", "choices": ["forest", "often", "warm"], "answer": 2},
    {"question": "In the morning the", "choices": ["light", "never", "of"], "answer": 0},
]

TASK = """task: ringlwm_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    ctx = [tok.bos_id] + tok.encode(context)
    whole = [tok.bos_id] + tok.encode(context + continuation)
    ids = torch.tensor(whole)[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, return_logits=True).logits[0].double(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def test_lm_eval_hf_backend_on_an_exported_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok_path = train_sentencepiece([generated_haystack(600, seed=1)], vocab_size=300, model_prefix=tmp_path / "tok")
    config = tiny_llama_config(vocab_size=300, max_position_embeddings=128, initializer_range=0.3)
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    LlamaForCausalLM(config).save_pretrained(ckpt)
    export_hf_tokenizer(tok_path, ckpt)

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text(TASK.format(data=data))

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="hf", model_args=f"pretrained={ckpt},dtype=float32", tasks=["ringlwm_tiny_mc"],
                          task_manager=TaskManager(include_path=str(tasks)), batch_size=2, device="cpu")
    harness_acc = out["results"]["ringlwm_tiny_mc"]["acc,none"]

    model = RingLlamaForCausalLM.from_pretrained(ckpt).eval()
    tok = load_tokenizer(tok_path)
    correct = 0
    for doc in DOCS:
        scores = [_loglikelihood(model, tok, doc["question"], " " + c) for c in doc["choices"]]
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    assert harness_acc == pytest.approx(correct / len(DOCS))
