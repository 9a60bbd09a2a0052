"""RULER's synthetic tasks, generated offline from a seed and fitted to a context length in the model's tokens.

    maker = SampleMaker(tokenizer, seed=0, template="lwm")            # haystack=None: generated filler
    sample = maker.sample("niah_multikey_1", 4096, index=0)
    sample.ids           # [BOS] + tokens of sample.prompt: len(sample.ids) + sample.max_new_tokens <= 4096
    sample.references    # the strings a correct answer contains

The task definitions (templates, answer prefixes, generation budgets, haystack kinds, needle formats and
the parameters of synthetic.yaml) are RULER's (NVIDIA/RULER, scripts/data/synthetic); the code is
ringlwm's own. See ``ringlwm.eval.ruler`` for what differs from RULER.

A sample is a deterministic function of (seed, task, length, index, template, tokenizer, haystack text, QA
file): its random draws come from ``random.Random(f"{seed}/{task}/{length}/{index}")``, made afresh for
each haystack size tried, so that only the size changes while the largest size that fits is searched. The
search starts from the size fitted for sample 0 of the same (task, length) and gallops, then bisects, to
the largest haystack size n whose prompt fits (prompt tokens + answer budget <= length) while n + 1 would
not; both are tokenized and checked, so the length is exact in the model's own tokens and as full as one
haystack unit allows (a noise paragraph, an essay word, a numbered word, a coded word, a document).
"""

from __future__ import annotations

import json
import math
import random
import re
import string
import uuid
from dataclasses import dataclass
from pathlib import Path

from ringlwm.data.chat import CHAT_ASSISTANT, CHAT_PREFIX
from ringlwm.eval.ruler_words import WordLists, pseudo_words, word_lists

# ------------------------------------------------------------------------------------------------
# Task definitions (RULER's scripts/data/synthetic/constants.py and scripts/synthetic.yaml)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    template: str
    answer_prefix: str
    tokens_to_generate: int
    metric: str  # "all": the fraction of the references found; "part": 1 when any is found


KINDS = {
    "niah": Kind(
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
        "{type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
        128, "all"),
    "variable_tracking": Kind(
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
        "assigned the value {query}, they are: ",
        30, "all"),
    "common_words_extraction": Kind(
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
        "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
        120, "all"),
    "freq_words_extraction": Kind(
        "Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
        "the dots '....'. What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
        50, "all"),
    "qa": Kind(
        "Answer the question based on the given documents. Only give me the answer and do not output any other "
        "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
        "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        " Answer:",
        32, "part"),
}


def _niah(haystack, key, value, k=1, v=1, q=1):
    return ("niah", dict(haystack=haystack, key=key, value=value, num_k=max(k, q), num_v=v, num_q=q))


TASKS = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", k=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", v=4),
    "niah_multiquery": _niah("essay", "words", "numbers", q=4),
    "vt": ("variable_tracking", dict(haystack="noise", num_chains=1, num_hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0, coded_wordlen=6)),
    "qa_1": ("qa", dict(dataset="squad")),
    "qa_2": ("qa", dict(dataset="hotpotqa")),
}
QA_TASKS = {"qa_1": "squad", "qa_2": "hotpotqa"}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = tuple(round(100 * i / 39) for i in range(40))  # 40 evenly spaced depths, 0..100 %
VT_ICL_TOKENS = 500  # RULER's variable-tracking example: a whole task prompt of up to 500 tokens, answered
CWE_FEWSHOT_BELOW = 4096  # shorter contexts get a smaller example and fewer repeats (RULER's switch)
TEMPLATES = ("lwm", "none", "chat")
LWM_TEMPLATE = CHAT_PREFIX + "{task_template}" + CHAT_ASSISTANT + " "  # RULER's lwm-chat, its trailing space kept
SINGULAR = (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer"))  # RULER's, in its order


def definitions() -> dict:
    """Everything that defines the suite's prompts, as JSON (recorded in the results' provenance)."""
    return {"tasks": {name: {"kind": kind, **params} for name, (kind, params) in TASKS.items()},
            "kinds": {name: vars(k) for name, k in KINDS.items()}, "noise": NOISE, "needle": NEEDLE,
            "depths": list(DEPTHS), "vt_icl_tokens": VT_ICL_TOKENS, "cwe_fewshot_below": CWE_FEWSHOT_BELOW,
            "lwm_template": LWM_TEMPLATE, "singular": [list(pair) for pair in SINGULAR], "version": 2}


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------


@dataclass
class Draft:
    """One task prompt before the model's template: the task text (the user's turn), the answer prefix and the
    references; where RULER puts worked examples: ``turn_start`` opens the user's turn (vt's example), each
    of ``shots`` (task text, answer prefix, answer: cwe's example) is a whole templated prompt answered,
    before the task's; ``singular``: RULER's singular rewording, which it applies to the whole template
    string, the model's template included."""
    text: str
    answer_prefix: str
    references: list[str]
    turn_start: str = ""
    shots: tuple = ()
    singular: bool = False


def singular(text: str) -> str:
    """RULER's rewording of a needle prompt with one answer ("Some ... are" -> "A ... is"), on any text."""
    for plural, one in SINGULAR:
        text = text.replace(plural, one)
    return text


def _sentences(text: str) -> list[str]:
    """Split after ".", "!" or "?" (and closing quotes or brackets) followed by white space."""
    return [s for s in re.split(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+", text.strip()) if s]


def _insert_at_depths(sentences: list[str], needles: list[str], depths: list[int]) -> str:
    """The sentences with needle i after the first depth_i % of them (RULER's essay insertion)."""
    cuts = sorted(int(len(sentences) * d / 100) for d in depths)
    parts, last = [], 0
    for cut, needle in zip(cuts, needles):
        parts += sentences[last:cut] + [needle]
        last = cut
    parts += sentences[last:]
    return " ".join(parts)


def _random_value(rng: random.Random, kind: str, words: WordLists) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        return f"{rng.choice(words.adjectives)}-{rng.choice(words.nouns)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}: numbers, words or uuids")


def _distinct(rng: random.Random, kind: str, count: int, words: WordLists, avoid=()) -> list[str]:
    out, seen = [], set(avoid)
    while len(out) < count:
        value = _random_value(rng, kind, words)
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out


def _zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta(alpha) for alpha > 1: a partial sum and its Euler-Maclaurin tail (error < 1e-12)."""
    if alpha <= 1:
        raise ValueError(f"fwe needs alpha > 1 (the zeta distribution), got {alpha}")
    n = terms
    head = math.fsum(k ** -alpha for k in range(1, n))
    return head + n ** (1 - alpha) / (alpha - 1) + n ** -alpha / 2 + alpha * n ** (-alpha - 1) / 12


def _noise_insert(rng: random.Random, sentences: list[str], items: list[str]) -> list[str]:
    """Items kept in order, each before its own distinct sentence (RULER's noise-haystack insertion)."""
    slots = sorted(rng.sample(range(len(sentences)), len(items)))
    out = list(sentences)
    for j, (slot, item) in enumerate(zip(slots, items)):
        out.insert(slot + j, item)
    return out


# ------------------------------------------------------------------------------------------------
# Task builders: draft(rng, n) -> Draft with a haystack of n units; min_units; valid(n)
# ------------------------------------------------------------------------------------------------


class _Builder:
    min_units = 1

    def valid(self, n: int) -> bool:
        return True


class _Niah(_Builder):
    def __init__(self, maker: SampleMaker, params: dict):
        self.maker, self.p = maker, params
        self.min_units = params["num_k"] * params["num_v"] if params["haystack"] != "essay" else 1

    def draft(self, rng: random.Random, n: int) -> Draft:
        p = self.p
        words = self.maker.words
        keys = _distinct(rng, p["key"], p["num_k"], words)
        values = [_distinct(rng, p["value"], p["num_v"], words) for _ in keys]
        needles = [NEEDLE.format(type_needle_v=p["value"], key=k, value=v) for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(needles)
        asked = rng.sample(range(len(keys)), p["num_q"])
        queries = [keys[i] for i in asked]
        answers = [v for i in asked for v in values[i]]
        query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]

        if p["haystack"] == "essay":
            depths = rng.sample(DEPTHS, len(needles))
            context = _insert_at_depths(_sentences(" ".join(self.maker.essay_words(n))), needles, depths)
        else:
            if p["haystack"] == "noise":
                sentences = [NOISE] * n
            else:  # "needle": distractor needles of other keys
                other = _distinct(rng, p["key"], n, words, avoid=keys)
                sentences = [NEEDLE.format(type_needle_v=p["value"], key=k, value=_random_value(rng, p["value"], words))
                             for k in other]
            context = "\n".join(_noise_insert(rng, sentences, needles))

        template, prefix, type_v = KINDS["niah"].template, KINDS["niah"].answer_prefix, p["value"]
        if len(answers) == 1:  # RULER's singular wording (also on the model's template: SampleMaker.wrap)
            template, prefix = singular(template), singular(prefix)
            type_v = type_v[:-1]
        return Draft(template.format(type_needle_v=type_v, context=context, query=query),
                     prefix.format(type_needle_v=type_v, query=query), answers, singular=len(answers) == 1)


class _VariableTracking(_Builder):
    def __init__(self, maker: SampleMaker, params: dict, icl_units: int | None):
        self.maker, self.p, self.icl_units = maker, params, icl_units
        self.min_units = params["num_hops"] + 1

    def _chains(self, rng: random.Random, letters: int) -> tuple[list[list[str]], list[list[str]], list[str]]:
        hops, count = self.p["num_hops"], self.p["num_chains"]
        names: list[str] = []
        while len(names) < count * (hops + 1):
            name = "".join(rng.choices(string.ascii_uppercase, k=letters))
            if name not in names:
                names.append(name)
        values: list[str] = []
        while len(values) < count:
            value = str(rng.randint(10000, 99998))
            if value not in values:
                values.append(value)
        groups = [names[i * (hops + 1):(i + 1) * (hops + 1)] for i in range(count)]
        chains = [[f"VAR {g[0]} = {value}"] + [f"VAR {g[j + 1]} = VAR {g[j]} " for j in range(hops)]
                  for g, value in zip(groups, values)]
        return groups, chains, values

    def _task(self, rng: random.Random, n: int, letters: int) -> tuple[str, str, list[str], list[str]]:
        groups, chains, values = self._chains(rng, letters)
        sentences = [NOISE] * n
        for chain in chains:
            sentences = _noise_insert(rng, sentences, chain)
        kind = KINDS["variable_tracking"]
        text = kind.template.format(context="\n".join(sentences), query=values[0])
        prefix = kind.answer_prefix.format(num_v=self.p["num_hops"] + 1, query=values[0])
        return text, prefix, groups[0], values

    def icl(self, rng: random.Random, n: int) -> str:
        """RULER's worked example: a whole shorter task with 3-letter names (its text and answer prefix, no model
        template), a space, the answer, a new line."""
        text, prefix, names, _ = self._task(rng, n, 3)
        return text + prefix + " " + " ".join(names) + "\n"

    def draft(self, rng: random.Random, n: int) -> Draft:
        example = self.icl(rng, self.icl_units) if self.icl_units is not None else None
        text, prefix, names, _ = self._task(rng, n, 5)
        return Draft(text, prefix, names, turn_start="" if example is None else example + "\n")


class _CommonWords(_Builder):
    def __init__(self, maker: SampleMaker, params: dict, length: int):
        self.maker, self.p = maker, params
        self.short = length < CWE_FEWSHOT_BELOW
        self.min_units = params["num_cw"]

    def _example(self, words: list[str], common_repeats: int, uncommon_repeats: int, rng) -> tuple[str, list[str]]:
        common, uncommon = words[:self.p["num_cw"]], words[self.p["num_cw"]:]
        listed = common * common_repeats + uncommon * uncommon_repeats
        rng.shuffle(listed)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), common

    def draft(self, rng: random.Random, n: int) -> Draft:
        kind, real = KINDS["common_words_extraction"], self.maker.real_words
        shot_words, shot_repeats, repeats = ((20, (3, 1), (6, 1)) if self.short
                                             else (40, (10, 3), (self.p["freq_cw"], self.p["freq_ucw"])))
        shot_context, shot_answer = self._example(rng.sample(real, shot_words), *shot_repeats, rng)
        shot = (kind.template.format(context=shot_context), kind.answer_prefix,
                " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot_answer)))
        order = rng.sample(real, len(real))
        if n > len(order):
            more = list(self.maker.words.extra) + self.maker.made_up_words
            if n > len(order) + len(more):
                raise ValueError(f"cwe: {n} distinct words needed, the word lists hold {len(order) + len(more)}")
            order += rng.sample(more, n - len(order))
        context, common = self._example(order[:n], *repeats, rng)
        return Draft(kind.template.format(context=context), kind.answer_prefix, common, shots=(shot,))


class _FreqWords(_Builder):
    def __init__(self, maker: SampleMaker, params: dict, length: int, budget: int):
        self.p = params
        self.vocab_size = max(4, (length - budget) // 50)  # RULER: (max_seq_length - tokens_to_generate) // 50
        self.norm = _zeta(params["alpha"])

    def counts(self, n: int) -> list[int]:
        return [int(n * k ** -self.p["alpha"] / self.norm) for k in range(1, self.vocab_size + 1)]

    def valid(self, n: int) -> bool:
        """The three answers (ranks 2-4) occur, and more often than rank 5: one right answer."""
        c = self.counts(n)
        return c[3] >= 1 and (len(c) == 4 or c[3] > c[4])

    def draft(self, rng: random.Random, n: int) -> Draft:
        vocab: set[str] = set()
        while len(vocab) < self.vocab_size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=self.p["coded_wordlen"])))
        words = sorted(vocab)
        rng.shuffle(words)
        words[0] = "..."  # the most frequent "word" is noise
        listed = [w for w, c in zip(words, self.counts(n)) for _ in range(c)]
        rng.shuffle(listed)
        kind = KINDS["freq_words_extraction"]
        return Draft(kind.template.format(context=" ".join(listed)), kind.answer_prefix, words[1:4])


QA_POSITIONS = ("ruler", "random")


class _QA(_Builder):
    def __init__(self, maker: SampleMaker, dataset: str, index: int):
        self.shuffle = maker.qa_position == "ruler"
        self.seed = maker.seed
        self.questions, self.docs = maker.qa_data(dataset)
        if index >= len(self.questions):
            raise ValueError(f"{dataset}: sample {index} needs question {index}; the file holds "
                             f"{len(self.questions)} answerable questions: ask for at most that many --samples")
        self.q = self.questions[index]
        self.min_units = len(self.q["gold"])

    def draft(self, rng: random.Random, n: int) -> Draft:
        q, docs = self.q, self.docs
        near = [i for i in q["near"] if i not in q["gold"]]
        taken = set(q["gold"]) | set(near)
        others = [i for i in range(len(docs)) if i not in taken]
        order = q["gold"] + rng.sample(near, len(near)) + rng.sample(others, len(others))
        chosen = order[:n] if n <= len(order) else order + [i % len(docs) for i in range(n - len(order))]
        if self.shuffle:  # RULER: a fresh Random(seed) each time, the gold first before it
            random.Random(self.seed).shuffle(chosen)
        else:
            rng.shuffle(chosen)
        context = "\n\n".join(f"Document {i + 1}:\n{docs[d]}" for i, d in enumerate(chosen))
        kind = KINDS["qa"]
        return Draft(kind.template.format(context=context, query=q["query"]), kind.answer_prefix, q["answers"])


def read_qa_file(path: str | Path, dataset: str) -> tuple[list[dict], list[str]]:
    """Questions ({query, answers, gold, near}: document indices) and sorted distinct documents of a SQuAD
    JSON ({"data": [{"paragraphs": [{"context", "qas": [{"question", "answers": [{"text"}]}]}]}]}, answerable
    questions only) or a HotpotQA JSON ([{"question", "answer", "context": [[title, [sentences]]]}])."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{dataset} file {path}: cannot read it as JSON ({err})") from None
    try:
        if dataset == "squad":
            articles = [[p["context"] for p in a["paragraphs"]] for a in data["data"]]
            docs = sorted({c for a in articles for c in a})
            at = {c: i for i, c in enumerate(docs)}
            questions = []
            for a in data["data"]:
                near = [at[p["context"]] for p in a["paragraphs"]]
                for p in a["paragraphs"]:
                    for qa in p["qas"]:
                        answers = [x["text"] for x in qa.get("answers", [])]
                        if answers and not qa.get("is_impossible", False):
                            questions.append({"query": qa["question"], "answers": answers,
                                              "gold": [at[p["context"]]], "near": near})
        elif dataset == "hotpotqa":
            def doc(title, sentences):
                return f"{title}\n{''.join(sentences)}"

            docs = sorted({doc(t, s) for d in data for t, s in d["context"]})
            at = {c: i for i, c in enumerate(docs)}
            questions = [{"query": d["question"], "answers": [d["answer"]],
                          "gold": list(dict.fromkeys(at[doc(t, s)] for t, s in d["context"])), "near": []}
                         for d in data]
        else:
            raise ValueError(f"unknown QA dataset {dataset!r}: squad or hotpotqa")
    except (KeyError, TypeError) as err:
        shape = ('{"data": [{"paragraphs": [{"context": ..., "qas": [...]}]}]}' if dataset == "squad"
                 else '[{"question": ..., "answer": ..., "context": [[title, [sentences]]]}]')
        raise ValueError(f"{dataset} file {path} is not in {dataset}'s layout ({type(err).__name__}: {err}); "
                         f"expected {shape}") from None
    if not questions:
        raise ValueError(f"{dataset} file {path} holds no answerable questions")
    return questions, docs


# ------------------------------------------------------------------------------------------------
# Samples
# ------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    task: str
    length: int
    index: int
    prompt: str  # the whole text given to the model (chat template and answer prefix included), after BOS
    ids: list[int]  # [BOS] + tokenizer.encode(prompt): what the model reads
    references: list[str]
    max_new_tokens: int
    metric: str
    answer_prefix: str
    units: int  # haystack size: noise paragraphs, essay words, listed words, coded words or documents

    def record(self) -> dict:
        """The ``--dump-samples`` line."""
        return {"task": self.task, "length": self.length, "index": self.index, "prompt": self.prompt,
                "references": self.references, "prompt_tokens": len(self.ids),
                "max_new_tokens": self.max_new_tokens, "metric": self.metric, "answer_prefix": self.answer_prefix,
                "haystack_units": self.units}


class DoesNotFit(ValueError):
    """A task cannot be built at a length with this tokenizer (the message says why and what length would do);
    a RULER run skips that task at that length and says so in its table."""


class TooShort(ValueError):
    pass


class SampleMaker:
    """Makes the samples of every task for one tokenizer and settings (see the module docstring).

    template: "lwm" wraps the task as LWM's chat ("You are a helpful assistant. USER: {task} ASSISTANT:"
    + answer prefix), "none" gives the task and its answer prefix alone. haystack: the essay text (None:
    ``ringlwm.eval.needle.generated_haystack`` from the seed). qa_files: {"squad": path, "hotpotqa": path}.
    max_new_tokens: one answer budget for every task instead of RULER's per-task ones. qa_position: "ruler"
    (RULER's: the documents of a QA sample are shuffled by ``random.Random(seed)`` made anew for each sample,
    one permutation per document count, so the gold document sits at one depth per length) or "random"
    (a permutation per sample: every depth). words: the word lists (``ringlwm.eval.ruler_words.word_lists``:
    "auto" is RULER's, wonderwords', when installed)."""

    def __init__(self, tokenizer, *, seed: int = 0, template: str = "lwm", haystack: str | None = None,
                 qa_files: dict | None = None, max_new_tokens: int | None = None, qa_position: str = "ruler",
                 words: str = "auto"):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}: choose one of {', '.join(TEMPLATES)}")
        if qa_position not in QA_POSITIONS:
            raise ValueError(f"unknown qa_position {qa_position!r}: choose one of {', '.join(QA_POSITIONS)}")
        self.qa_position = qa_position
        self._chat: str | None = None
        self.tokenizer, self.seed, self.template = tokenizer, seed, template
        self.max_new_tokens = max_new_tokens
        self.bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        self._essay = None if haystack is None else re.sub(r"\s+", " ", haystack).strip().split(" ")
        if self._essay is not None and not self._essay[0]:
            raise ValueError("the essay haystack is empty")
        self._generated: list[str] = []
        self.qa_files = {k: Path(v) for k, v in (qa_files or {}).items()}
        self._qa: dict[str, tuple] = {}
        self._start: dict[tuple, int] = {}
        self._icl: dict[int, int] = {}
        self.words = word_lists(words)
        self.real_words = self.words.common_words()
        self._made_up: list[str] | None = None

    # --- sources ---

    @property
    def made_up_words(self) -> list[str]:
        if self._made_up is None:  # none that is a real word of the lists in use
            real = set(self.real_words) | set(self.words.extra)
            self._made_up = [w for w in pseudo_words() if w not in real]
        return self._made_up

    def essay_words(self, n: int) -> list[str]:
        """The first n words of the essay (a user's text repeats when shorter, as RULER's essays do)."""
        if self._essay is not None:
            words = self._essay
            return words[:n] if n <= len(words) else (words * (n // len(words) + 1))[:n]
        from ringlwm.eval.needle import generated_haystack

        while len(self._generated) < n:  # the filler of more sentences starts with that of fewer
            sentences = max(4000, n // 5 + 1)  # about 11 words a sentence
            self._generated = generated_haystack(sentences, seed=self.seed).split(" ")
        return self._generated[:n]

    def qa_data(self, dataset: str) -> tuple[list[dict], list[str]]:
        if dataset not in self._qa:
            if dataset not in self.qa_files:
                raise ValueError(f"the {dataset} task needs a local {dataset} JSON file (--qa-{dataset} FILE)")
            self._qa[dataset] = read_qa_file(self.qa_files[dataset], dataset)
        return self._qa[dataset]

    # --- prompts ---

    def budget(self, task: str) -> int:
        """The answer budget of a task: RULER's tokens_to_generate, or the one given for all."""
        return self.max_new_tokens if self.max_new_tokens is not None else KINDS[_kind(task)].tokens_to_generate

    def wrap(self, draft: Draft) -> str:
        """The prompt, as RULER composes it for its model templates: "lwm" is RULER's lwm-chat byte for byte
        ("... ASSISTANT: " + the answer prefix, which starts with a space), "none" its "base" (the task
        alone), "chat" the tokenizer's own chat template (a user turn, then the generation prompt). A
        worked example of cwe is a whole prompt of the same template, answered, before the task's; vt's opens
        the user's turn; RULER's singular rewording covers the template's text too."""
        def turn(text: str) -> str:
            wrapper = self._turn_template()
            if draft.singular:
                wrapper = singular(wrapper)
            return wrapper.replace("{task_template}", text)

        shots = [turn(text) + prefix + " " + answer for text, prefix, answer in draft.shots]
        prompt = turn(draft.turn_start + draft.text) + draft.answer_prefix
        return "\n".join([*shots, prompt])

    def _turn_template(self) -> str:
        if self.template == "lwm":
            return LWM_TEMPLATE
        if self.template == "none":
            return "{task_template}"
        if self._chat is None:
            tok = getattr(self.tokenizer, "tok", None)
            if tok is None or not getattr(tok, "chat_template", None):
                raise ValueError("template 'chat' needs a Hugging Face tokenizer with a chat template (a folder "
                                 "whose tokenizer_config.json holds chat_template); this tokenizer has none: use "
                                 "--template lwm or none")
            marker = "\x00TASK\x00"
            text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                           add_generation_prompt=True)
            bos = tok.bos_token
            if bos and text.startswith(bos) and self.bos:  # the prompt's ids start with BOS already
                text = text[len(bos):]
            if text.count(marker) != 1:
                raise ValueError("the tokenizer's chat template does not hold the user's message once")
            self._chat = text.replace(marker, "{task_template}")
        return self._chat

    def _rng(self, task: str, length: int, index) -> random.Random:
        return random.Random(f"{self.seed}/{task}/{length}/{index}")

    def _builder(self, task: str, length: int, index: int) -> _Builder:
        kind, params = TASKS[task]
        if kind == "niah":
            return _Niah(self, params)
        if kind == "variable_tracking":
            return _VariableTracking(self, params, self._icl_units(task, length, params))
        if kind == "common_words_extraction":
            return _CommonWords(self, params, length)
        if kind == "freq_words_extraction":
            return _FreqWords(self, params, length, self.budget(task))
        return _QA(self, params["dataset"], index)

    def _icl_units(self, task: str, length: int, params: dict) -> int:
        """The noise size of variable tracking's worked example: the most that fits min(500, length / 4)
        tokens (at least one per chain link), the same for every sample of a length."""
        if length not in self._icl:
            plain = _VariableTracking(self, params, None)
            limit = min(VT_ICL_TOKENS, length // 4)

            def count(n):
                return len(self.tokenizer.encode(plain.icl(self._rng(task, length, "icl"), n)))

            try:
                self._icl[length] = _fit(count, limit, plain.min_units, plain.min_units)
            except TooShort:
                self._icl[length] = plain.min_units
        return self._icl[length]

    def prompt_ids(self, task: str, length: int, index: int, units: int) -> list[int]:
        """[BOS] + the tokens of the prompt this sample would have with ``units`` haystack units (the size
        ``sample`` searches over): for checking that one unit more would not fit."""
        builder = self._builder(task, length, index)
        return self.bos + self.tokenizer.encode(self.wrap(builder.draft(self._rng(task, length, index), units)))

    def sample(self, task: str, length: int, index: int) -> Sample:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; RULER's tasks are {', '.join(TASKS)}")
        budget = self.budget(task)
        builder = self._builder(task, length, index)
        limit = length - budget
        counts: dict[int, int] = {}
        largest: dict[int, tuple[Draft, str, list[int]]] = {}  # the largest size measured to fit (what _fit returns)

        def make(n: int):
            draft = builder.draft(self._rng(task, length, index), n)
            prompt = self.wrap(draft)
            return draft, prompt, self.bos + self.tokenizer.encode(prompt)

        def count(n: int) -> int:
            if n not in counts:
                made = make(n)
                counts[n] = len(made[2])
                if counts[n] <= limit and n > max(largest, default=-1):
                    largest.clear()
                    largest[n] = made
            return counts[n]

        key = (task, length)
        if key not in self._start and index != 0:
            self.sample(task, length, 0)  # every sample starts its search where sample 0 ended: deterministic
        start = self._start.get(key) or _estimate(count, limit, builder.min_units)
        try:
            n = _fit(count, limit, start, builder.min_units)
        except TooShort:
            need = count(builder.min_units) + budget
            raise DoesNotFit(f"{task} does not fit {length} tokens with this tokenizer: its smallest prompt "
                             f"({builder.min_units} haystack units) takes {need - budget} tokens + {budget} "
                             f"for the answer = {need}; use lengths of at least {need}") from None
        while n > builder.min_units and not builder.valid(n):
            n -= 1
        if not builder.valid(n):
            raise DoesNotFit(f"{task} at {length} tokens has too few words for one right answer (the three "
                             "most frequent must each occur more often than the fourth); use a longer length")
        if index == 0:
            self._start[key] = n
        draft, prompt, ids = largest[n] if n in largest else make(n)
        if len(ids) + budget > length:  # _fit only returns sizes it measured to fit; a broken invariant stops here
            raise AssertionError(f"{task}: {len(ids)} + {budget} tokens exceed {length}")
        return Sample(task, length, index, prompt, ids, draft.references, budget, KINDS[_kind(task)].metric,
                      draft.answer_prefix, n)


def _kind(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; RULER's tasks are {', '.join(TASKS)}")
    return TASKS[task][0]


def _estimate(count, limit: int, minimum: int) -> int:
    """A first guess of the size that fits, from the token cost of two small sizes."""
    a = max(minimum, 1)
    b = a + max(8, a)
    ca, cb = count(a), count(b)
    if cb <= ca:  # more haystack, no more tokens: no size would ever fill the length
        raise ValueError(f"the tokenizer gives {cb} tokens for a prompt of {b} haystack units and {ca} for {a}: "
                         "it does not encode this text (an empty or broken vocabulary?); check the tokenizer")
    per_unit = (cb - ca) / (b - a)
    return max(minimum, int(a + (limit - ca) / per_unit))


def _fit(count, limit: int, start: int, minimum: int) -> int:
    """The size n >= minimum with count(n) <= limit < count(n + 1), galloping from ``start`` then bisecting.
    Raises TooShort when count(minimum) > limit."""
    start = max(start, minimum)
    if count(start) <= limit:
        lo, step = start, 1
        while count(lo + step) <= limit:
            lo, step = lo + step, step * 2
        hi = lo + step
    else:
        hi, step = start, 1
        while True:
            lo = hi - step
            if lo <= minimum:
                lo = minimum
                if count(lo) > limit:
                    raise TooShort(limit)
                break
            if count(lo) <= limit:
                break
            hi, step = lo, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) <= limit:
            lo = mid
        else:
            hi = mid
    return lo
