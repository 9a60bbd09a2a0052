"""The needle protocol: prompt assembly, depth placement, scoring, resume, heatmap; and the demo's data."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import LlamaConfig

from ringlwm.data import load_tokenizer, train_sentencepiece
from ringlwm.demo import needle_record
from ringlwm.eval.needle import (
    NEEDLE,
    PREFIX,
    PromptBuilder,
    generated_haystack,
    load_haystack,
    make_trial,
    plot_heatmap,
    question_for,
    run_needle_eval,
    score,
)
from ringlwm.models import RingLlamaForCausalLM


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    corpus = [generated_haystack(800, seed=1), NEEDLE.format(city="Oslo", number="1234567890") + " " + PREFIX,
              "Don't give information outside the document. What are the special magic numbers for? Is it?"]
    return load_tokenizer(train_sentencepiece(corpus, vocab_size=300, model_prefix=path / "tok"))


def test_prompt_has_exact_length_and_lwm_template(tokenizer):
    builder = PromptBuilder(tokenizer, generated_haystack(3000, seed=2), answer_budget=16)
    for length in (200, 512, 1000):
        trial = make_trial(length, 50.0, 0, num_needles=1, num_asked=1, seed=0)
        ids = builder.build(trial)
        assert len(ids) == length - 16
        text = tokenizer.decode(ids)
        needle = trial.needles[0]
        assert text.startswith("You are a helpful assistant. USER: ")
        assert NEEDLE.format(city=needle.city, number=needle.number) in text
        assert text.rstrip().endswith("Keep your response short and direct. ASSISTANT:")
        assert question_for(trial) in text


@pytest.mark.parametrize("depth", [0.0, 30.0, 70.0, 100.0])
def test_needle_goes_to_a_sentence_boundary_near_its_depth(tokenizer, depth):
    builder = PromptBuilder(tokenizer, generated_haystack(3000, seed=3))
    trial = make_trial(800, depth, 1, num_needles=1, num_asked=1, seed=0)
    text = tokenizer.decode(builder.build(trial))
    context = text[len("You are a helpful assistant. USER: "):text.index(" What is the special magic")]
    at = context.index("The special magic")
    before = context[:at].rstrip()
    assert before == "" or before.endswith("."), before[-30:]
    assert abs(at / len(context) - depth / 100) < 0.1


def test_multi_needle_scores_per_needle(tokenizer):
    trial = make_trial(1000, 0.0, 0, num_needles=4, num_asked=2, seed=5)
    assert len({n.city for n in trial.needles}) == 4 and len(trial.asked) == 2
    assert "numbers for" in question_for(trial)
    asked = [trial.needles[i].number for i in trial.asked]
    assert score(f"{asked[0]} and {asked[1]}", trial) == 1.0
    assert score(f"only {asked[1]}", trial) == 0.5
    assert score("no idea", trial) == 0.0
    text = tokenizer.decode(PromptBuilder(tokenizer, generated_haystack(3000, seed=4)).build(trial))
    assert all(n.number in text for n in trial.needles)


def test_errors_name_the_problem(tokenizer, tmp_path):
    builder = PromptBuilder(tokenizer, generated_haystack(20, seed=5))
    with pytest.raises(ValueError, match="give a longer haystack"):
        builder.build(make_trial(5000, 0.0, 0, num_needles=1, num_asked=1, seed=0))
    with pytest.raises(ValueError, match="too short"):
        builder.build(make_trial(20, 0.0, 0, num_needles=1, num_asked=1, seed=0))
    with pytest.raises(FileNotFoundError, match="haystack not found"):
        load_haystack([str(tmp_path / "missing.txt")])


def test_eval_runs_resumes_and_draws(tokenizer, tmp_path):
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = RingLlamaForCausalLM(config).eval()
    out = tmp_path / "needle.json"
    kw = dict(haystack=generated_haystack(2000, seed=6), depths=[0.0, 100.0], trials=2, max_new_tokens=4,
              out_path=out)
    first = run_needle_eval(model, tokenizer, lengths=[256], **kw)
    assert len(first) == 4 and all(0.0 <= r["score"] <= 1.0 for r in first)
    saved = json.loads(out.read_text())["results"]
    assert [r["key"] for r in saved] == [r["key"] for r in first]
    # A rerun with one more length evaluates only the new cells and keeps the old answers.
    second = run_needle_eval(model, tokenizer, lengths=[256, 384], **kw)
    assert len(second) == 8
    assert {r["key"]: r["answer"] for r in second if r["context_length"] == 256} == {r["key"]: r["answer"] for r in first}
    png = tmp_path / "heat.png"
    plot_heatmap(second, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_records_are_lwm_prompts_whose_answer_repeats_the_needle():
    rec = needle_record(random.Random(1), 5)
    assert rec["prompt"].startswith(PREFIX) and rec["prompt"].endswith("ASSISTANT: ")
    assert rec["answer"] in rec["prompt"]
    number = rec["answer"].split(": ")[1].rstrip(".")
    assert len(number) == 7 and number.isdigit() and rec["prompt"].count(number) == 1
