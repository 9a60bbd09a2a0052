"""The needle protocol: prompt assembly, depth placement, scoring, resume, heatmap; and the demo's data."""

from __future__ import annotations

import json
import random
import re
import shutil

import pytest
import torch
from byte_tokenizer import ByteTokenizer
from tiny_models import tiny_llama_config
from transformers import LlamaForCausalLM

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
from ringlwm.eval.needle import main as needle_main
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
    config = tiny_llama_config(vocab_size=tokenizer.vocab_size, num_hidden_layers=1)
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


@pytest.mark.parametrize("where, allowed", [("early", range(0, 4)), ("late", range(27, 31)),
                                            ("anywhere", range(0, 31))])
def test_demo_records_place_the_needle_where_asked(where, allowed):
    """Stage 2's needles in the first or last tenth of the haystack (the sentence index of the needle among the
    haystack's 30 sentences and itself), and anywhere by default: over many draws every allowed index shows up."""
    seen = set()
    for i in range(300):
        rec = needle_record(random.Random(i), 30, where=where)
        body = rec["prompt"][len(PREFIX):rec["prompt"].index(" What is the special magic")]
        sentences = [s for s in body.split(". ") if s]
        index = next(j for j, s in enumerate(sentences) if s.startswith("The special magic"))
        assert len(sentences) == 31 and index in allowed, (where, index)
        seen.add(index)
    assert seen == set(allowed)


# --- provenance: a rerun into the same output resumes only what the same model and settings produced ----------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """Two tiny Llama checkpoints of one config and different weights."""
    dirs = []
    for seed in (0, 1):
        config = tiny_llama_config(vocab_size=tokenizer.vocab_size, num_hidden_layers=1)
        torch.manual_seed(seed)
        path = tmp_path_factory.mktemp(f"model{seed}")
        LlamaForCausalLM(config).save_pretrained(path)
        dirs.append(path)
    return dirs


@pytest.fixture
def generate_calls(monkeypatch):
    """Counts the prompts that reach ringlwm.generate.generate."""
    import ringlwm.generate

    calls = []
    original = ringlwm.generate.generate

    def counting(model, prompts, **kwargs):
        calls.append(len(prompts))
        return original(model, prompts, **kwargs)

    monkeypatch.setattr(ringlwm.generate, "generate", counting)
    return calls


def test_cli_refuses_another_models_results_and_overwrite_starts_fresh(tokenizer, model_dirs, tmp_path,
                                                                       generate_calls):
    a, b = model_dirs
    out = tmp_path / "needle.json"
    common = ["--tokenizer", tokenizer.path, "--lengths", "256", "--depths", "0,100", "--trials", "1",
              "--max-new-tokens", "4", "--out", str(out), "--heatmap", str(tmp_path / "heat.png")]
    needle_main(["--model", str(a), *common])
    assert sum(generate_calls) == 2
    first = out.read_bytes()
    saved = json.loads(first)
    assert saved["provenance"]["model"]["path"] == str(a.resolve()) and len(saved["results"]) == 2

    needle_main(["--model", str(a), *common])  # the same model and settings: resumed, nothing asked again
    assert sum(generate_calls) == 2 and out.read_bytes() == first

    with pytest.raises(ValueError, match=r"different settings \(model\.path: .*model\.weights") as refused:
        needle_main(["--model", str(b), *common])
    assert "--overwrite" in str(refused.value)
    assert sum(generate_calls) == 2 and out.read_bytes() == first  # nothing generated, nothing written

    # The same folder holding other weights (retrained in place) is refused too.
    moved = tmp_path / "moved"
    shutil.copytree(a, moved)
    needle_main(["--model", str(moved), *common[:-4], "--out", str(tmp_path / "moved.json"),
                 "--heatmap", str(tmp_path / "heat.png")])
    for f in b.iterdir():
        shutil.copy(f, moved / f.name)
    with pytest.raises(ValueError, match=r"model\.weights"):
        needle_main(["--model", str(moved), *common[:-4], "--out", str(tmp_path / "moved.json"),
                     "--heatmap", str(tmp_path / "heat.png")])

    # --overwrite starts fresh: B's answers, the same as B writes into an empty output.
    calls = sum(generate_calls)
    needle_main(["--model", str(b), *common, "--overwrite"])
    assert sum(generate_calls) == calls + 2
    fresh = tmp_path / "fresh.json"
    needle_main(["--model", str(b), *common[:-4], "--out", str(fresh), "--heatmap", str(tmp_path / "heat.png")])
    replaced, expected = json.loads(out.read_text()), json.loads(fresh.read_text())
    assert replaced["provenance"] == expected["provenance"]
    assert replaced["provenance"]["model"]["path"] == str(b.resolve())
    assert replaced["results"] == expected["results"]


class Bytes(ByteTokenizer):
    """Bytes as tokens, for models of 300 ids: ids past the bytes decode to nothing."""

    def decode(self, ids):
        return super().decode([i for i in ids if i < self.vocab_size])


def _tiny_model(tokenizer, seed=0):
    config = tiny_llama_config(vocab_size=300, num_hidden_layers=1)
    torch.manual_seed(seed)
    return RingLlamaForCausalLM(config).eval()


@pytest.mark.parametrize("change, key", [
    ({"max_new_tokens": 5}, "decoding.max_new_tokens"),
    ({"seed": 1}, "needle.seed"),
    ({"num_needles": 2}, "needle.num_needles"),
    ({"haystack": generated_haystack(2000, seed=7)}, "haystack"),
    ({"provenance": {"model": "other"}}, "model"),
    ({"tokenizer": Bytes()}, "tokenization."),
])
def test_resume_refuses_changed_settings_and_names_them(tokenizer, tmp_path, generate_calls, change, key):
    model = _tiny_model(tokenizer)
    out = tmp_path / "needle.json"
    kw = dict(tokenizer=tokenizer, haystack=generated_haystack(2000, seed=6), lengths=[400], depths=[50.0],
              trials=2, max_new_tokens=4, seed=0, out_path=out, provenance={"model": "mine"})
    first = run_needle_eval(model, **kw)
    saved = out.read_bytes()
    assert run_needle_eval(model, **kw) == first and sum(generate_calls) == 2  # resumed: nothing asked again
    with pytest.raises(ValueError, match=rf"different settings \({re.escape(key)}"):
        run_needle_eval(model, **{**kw, **change})
    assert out.read_bytes() == saved and sum(generate_calls) == 2
    # --overwrite: the same call starts fresh and records the new settings
    run_needle_eval(model, **{**kw, **change, "overwrite": True})
    assert sum(generate_calls) > 2
    stored = json.loads(out.read_text())
    assert stored["provenance"] != json.loads(saved)["provenance"]
    run_needle_eval(model, **{**kw, **change})  # and resumes under them
    with pytest.raises(ValueError, match=re.escape(key)):
        run_needle_eval(model, **kw)


def test_results_that_record_no_provenance_are_refused(tokenizer, tmp_path, generate_calls):
    model = _tiny_model(tokenizer)
    out = tmp_path / "needle.json"
    kw = dict(haystack=generated_haystack(2000, seed=6), lengths=[256], depths=[0.0], trials=1, max_new_tokens=4,
              out_path=out)
    # an output written before results recorded their provenance, by some other model
    old = {"settings": {"lengths": [256]}, "results": [{"key": "256/0.0/0", "context_length": 256, "depth": 0.0,
                                                        "trial": 0, "answer": "stale", "score": 1.0}]}
    out.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="do not record what produced them; pass --overwrite"):
        run_needle_eval(model, tokenizer, **kw)
    assert json.loads(out.read_text()) == old and not generate_calls
    fresh = run_needle_eval(model, tokenizer, overwrite=True, **kw)
    assert generate_calls == [1] and fresh[0]["answer"] != "stale"
    assert json.loads(out.read_text())["results"] == fresh
    out.write_text("not json")
    with pytest.raises(ValueError, match="is not JSON .*--overwrite"):
        run_needle_eval(model, tokenizer, **kw)


def _refused_on_every_rank(rank, world_size, model_dirs, out):
    from ringlwm.runtime import load_model, model_fingerprint

    tok = Bytes()
    kw = dict(haystack=generated_haystack(300, seed=6), lengths=[400], depths=[0.0], trials=1, max_new_tokens=3,
              out_path=out)
    a, b = (load_model(p, purpose="test") for p in model_dirs)
    first = run_needle_eval(a, tok, provenance={"model": model_fingerprint(model_dirs[0])}, **kw)
    errors = []
    try:  # the other model: every rank reads the file and refuses
        run_needle_eval(b, tok, provenance={"model": model_fingerprint(model_dirs[1])}, **kw)
    except ValueError as err:
        errors.append(str(err))
    try:  # one rank disagrees (e.g. the model at another path on its node): both stop, none hangs
        provenance = {"model": model_fingerprint(model_dirs[0]), "node": "x" if rank == 1 else "y"}
        run_needle_eval(a, tok, provenance=provenance, **kw)
    except ValueError as err:
        errors.append(str(err))
    return first, errors


def test_every_rank_refuses_together(model_dirs, tmp_path):
    from dist_utils import run_distributed

    out = tmp_path / "needle.json"
    (first0, errors0), (first1, errors1) = run_distributed(_refused_on_every_rank, 2, [str(p) for p in model_dirs],
                                                           str(out))
    assert first0 == first1 and len(first0) == 1
    assert len(errors0) == len(errors1) == 2
    assert all("model.weights" in e for e in (errors0[0], errors1[0])), (errors0[0], errors1[0])
    assert "node" in errors0[1] and "node" in errors1[1]
    assert json.loads(out.read_text())["results"] == first0
