"""Long-context chat data from books (LWM's recipe): QA pairs about ~1K-token chunks, asked after long contexts.

    python -m ringlwm.qa.book_qa --books books/ more.jsonl --tokenizer tok.model --out data/book_qa \\
        --backend openai --base-url http://127.0.0.1:8000/v1 --model llama-3-8b-instruct \\
        [--chunk-tokens 1000] [--lengths 32k,128k,1m] [--pairs-per-chunk 3] [--seed 0]
    python -m ringlwm.qa.book_qa ... --backend hf --model models/llama-2-7b-chat --batch-size 8
    python -m ringlwm.qa.book_qa --books ... --tokenizer ... --out ... --lengths 256k   # no --model: assemble only

1. Books (.txt files, folders of them, JSONL with a text field) are cut into chunks of at most
   ``--chunk-tokens`` tokens of the training tokenizer at paragraph or sentence ends (``chunks.py``).
2. A question writer (a local Hugging Face model or an OpenAI-compatible endpoint, ``backends.py``)
   gets ``QA_PROMPT`` for each chunk and answers with "Q: ..." / "A: ..." lines; ``parse_qa`` keeps the
   well-formed pairs and counts the rest by reason. Each finished chunk is appended to ``OUT/qa.jsonl``.
3. Examples are assembled for each target length: consecutive chunks of one book as the context, then a
   question about one of them, in LWM's chat format, into ``OUT/examples_{length}.jsonl``:

       {"prompt": "You are a helpful assistant. USER: {context} {question} ASSISTANT: ", "answer": "...",
        "book": ..., "first_chunk": a, "last_chunk": b, "question_chunk": k, "question": ...,
        "target_length": L, "num_tokens": n}

   Train on them with the field spec "[prompt],answer" (loss on the answer and EOS only).

Assembly. ``num_tokens`` is the length of ``encode_example(record, "[prompt],answer", tokenizer)``
(BOS and EOS included), the length the trainer sees. A book's chunks are cut, in order, into windows
that do not overlap: each grows while the sum of its chunks' counts, plus the format's own tokens and
the longest QA pair of the book, stays within L. In each window a chunk with pairs is drawn for the
question, and one of its pairs; the example is then counted exactly and, in the rare case that it has
more than L tokens, loses chunks at its end (at its start when the question is in the last chunk).
An example is written only when it has at most L and at least L - tolerance tokens, tolerance =
chunk_tokens + max_pair_tokens + 32 (a full window misses L by less than its next chunk and the QA
room it did not use). What is not written is counted in the summary, by reason: "book_too_short" (the
whole book cannot reach L - tolerance), "tail_too_short" (what is left after a book's last window),
"no_question" (no chunk of the window has a pair), "too_short" (trimmed below the bound; rare), and
"over_max_examples" (``--max-examples-per-book`` keeps that many windows of a book per length, drawn
at random). So a length of 1M needs books of about 1M tokens; concatenate shorter ones if you want them.

Resuming. ``qa.jsonl`` is append-only, one line per chunk whose generation finished, keyed by (book id,
chunk index) with a hash of the chunk's text; a rerun reads it back and asks only for the chunks not
in it (a line cut short by a crash is dropped and the file truncated to the last whole line). A chunk
whose request failed is counted and not recorded, so the next run asks again; but when every request
of a run's first batch fails, the run stops (the writer is down or misconfigured). A stored chunk whose
text changed (other books, tokenizer or --chunk-tokens) stops the run: use a fresh --out. The examples
files and ``summary.json`` are rewritten from ``qa.jsonl`` at the end of every run, so a rerun with
other --lengths assembles new files without generating anything.

Provenance. ``OUT/provenance.json`` records what produced ``qa.jsonl``: "chunking" (the tokenizer's
fingerprint and --chunk-tokens, see ``chunks.chunking_provenance``) and "generation" (the
question writer's ``provenance()``: a local model's path and hashes of its config, weights and tokenizer,
dtype and prompt format, or an endpoint's URL (without credentials) and model name, never the API key;
with --max-new-tokens, --temperature, --top-p; and the hash of ``QA_PROMPT``, --pairs-per-chunk and
--seed). A generating run (with --model) on an OUT whose qa.jsonl holds pairs resumes only when all of it
is the same; else it stops before asking anything, naming the keys that differ. A qa.jsonl without
provenance.json (written before it existed) is refused the same way. Books are not part of it: adding
books to a run is fine, and a stored chunk whose text changed is refused by its hash (above). Batch size,
concurrency, device, --max-pair-tokens, --lengths and --max-examples-per-book (assembly) may change.
``--overwrite`` deletes OUT's qa.jsonl, provenance.json, summary.json and examples files (nothing else)
and starts fresh; it needs --model. Assembling only (no --model) generates nothing, so the question
writer and its settings are not compared: it assembles from whatever qa.jsonl holds, and leaves
provenance.json as it is (it describes qa.jsonl). It still refuses a provenance.json whose "chunking"
differs (other tokenizer or --chunk-tokens); a qa.jsonl without provenance.json is assembled, its
chunks checked by their text hashes only.

Determinism: chunking depends on the text, tokenizer and chunk size alone; chunks are asked in book
order; each chunk's seed (for sampling) and each window's choice of question come from
``random.Random(f"{seed}/{book}/...")``, independent of what ran before, so an interrupted and resumed
run writes the same examples as an uninterrupted one (given the same question-writer outputs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from ringlwm.data.chat import chat_prompt
from ringlwm.data.fields import encode_example
from ringlwm.data.tokenizer import Tokenizer
from ringlwm.qa.backends import BackendError, GenerationError, HFGenerator, OpenAIGenerator
from ringlwm.qa.chunks import Book, Chunk, chunk_text, chunking_provenance, load_books
from ringlwm.runtime import check_provenance, text_fingerprint

__all__ = [
    "QA_PROMPT", "FIELD_SPEC", "Book", "Chunk", "load_books", "chunk_text",
    "qa_prompt", "parse_qa", "QAStore", "assemble_examples", "BookQASummary", "run_book_qa", "parse_lengths",
    "GenerationError", "BackendError", "HFGenerator", "OpenAIGenerator", "writer_provenance", "main",
]

QA_PROMPT = """\
Below is a passage from a book. Write {num_pairs} question-answer pairs about it.

Rules:
- Each question asks about one specific fact stated in the passage (who, what, where, when, why, how many).
- The question will be asked after the whole book, so make clear which part it is about: name the people, \
places or things involved. Never write "the passage", "the text", "this chapter" or "the author".
- Each answer is correct according to the passage alone, in one or two sentences.
- Write each pair as two lines, exactly in this format, and nothing else:
Q: <question>
A: <answer>

Passage:
<<<
{passage}
>>>"""

FIELD_SPEC = "[prompt],answer"
QA_FILE = "qa.jsonl"
PROVENANCE_FILE = "provenance.json"
_SLACK = 32  # tokens: boundary merges between chunks and the estimate of the format's own tokens


def qa_prompt(passage: str, num_pairs: int = 3) -> str:
    """The question writer's prompt for one chunk."""
    return QA_PROMPT.format(passage=passage, num_pairs=num_pairs)


# "Q: ...", "Question 2: ...", "**A:** ...", "1. Q: ...", "- A1: ..."
_QA_LINE = re.compile(r"^\s*(?:[-*>#]+\s*)?(?:\d+[.)]\s*)?(?:\*\*|__)?\s*(?P<tag>question|answer|q|a)\s*\d*\s*"
                      r"(?:\*\*|__)?\s*[:\uff1a]\s*(?:\*\*|__)?(?P<text>.*)$", re.IGNORECASE)


# "Q: Who came? A: Ann." on one line: an answer tag right after the question mark
_INLINE_ANSWER = re.compile(r"(?<=\?)\s+(?:\*\*)?(?:a|answer)\s*(?:\*\*)?\s*:\s*", re.IGNORECASE)


def _normalize(question: str) -> str:
    return " ".join(re.sub(r"\W+", " ", question.lower()).split())


def parse_qa(text: str) -> tuple[list[dict], Counter]:
    """The question-answer pairs in a writer's output, and what was dropped, counted by reason.

    Lines starting "Q:" / "A:" (also "Question:", "Answer:", numbered or in markdown bold) open a question
    or an answer; other lines continue the open one (joined with a space) until a blank line; lines
    outside any pair (a preamble) are passed over. Reasons: "empty_output" (nothing but whitespace),
    "unparseable_output" (no Q or A line at all), and per pair "missing_answer" (a question with no
    answer), "missing_question" (an answer with no question), "empty_pair" (a blank question or answer),
    "duplicate" (a question already asked in this output, ignoring case and punctuation).
    """
    dropped: Counter = Counter()
    if not text or not text.strip():
        dropped["empty_output"] += 1
        return [], dropped
    raw: list[list[str]] = []  # [question, answer or None]
    open_part = None  # 0: a question continues, 1: an answer continues
    found = False
    for line in text.splitlines():
        m = _QA_LINE.match(line)
        if m:
            found = True
            body = m["text"].strip(" *_\t")
            if m["tag"].lower().startswith("q"):
                if raw and raw[-1][1] is None:
                    dropped["missing_answer"] += 1
                    raw.pop()
                question, *answer = _INLINE_ANSWER.split(body, maxsplit=1)
                answer = answer[0].strip(" *_\t") if answer else ""
                raw.append([question.strip(), answer or None])
                open_part = 1 if answer else 0
            elif raw and raw[-1][1] is None:
                raw[-1][1] = body
                open_part = 1
            else:
                dropped["missing_question"] += 1
                open_part = None
        elif not line.strip():
            open_part = None
        elif open_part is not None:
            raw[-1][open_part] = (raw[-1][open_part] + " " + line.strip()).strip()
    if not found:
        dropped["unparseable_output"] += 1
        return [], dropped
    if raw and raw[-1][1] is None:
        dropped["missing_answer"] += 1
        raw.pop()
    pairs, seen = [], set()
    for question, answer in raw:
        if not question or not answer:
            dropped["empty_pair"] += 1
        elif _normalize(question) in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(_normalize(question))
            pairs.append({"question": question, "answer": answer})
    return pairs, dropped


class QAStore:
    """``qa.jsonl``: one JSON line per finished chunk, {"book", "chunk", "sha1", "pairs", "dropped", "raw"}.

    Append-only; ``records`` maps (book, chunk) to the first line stored for it. A last line cut short
    (no newline, not JSON) is dropped and the file truncated there; a bad line elsewhere raises.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[tuple[str, int], dict] = {}
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        offset, number = 0, 0
        while offset < len(data):
            end = data.find(b"\n", offset)
            line = data[offset:] if end < 0 else data[offset:end]
            number += 1
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:
                if end < 0 or not data[end + 1:].strip():  # the last line, cut short by a crash
                    with open(self.path, "r+b") as f:
                        f.truncate(offset)
                    return
                raise ValueError(f"{self.path}:{number}: not JSON; this file is written by book_qa only "
                                 "(delete the line, or use a fresh --out)") from None
            if record is not None:
                self.records.setdefault((record["book"], record["chunk"]), record)
            if end < 0:  # a whole record without its newline: add one, so the next append starts a line
                with open(self.path, "ab") as f:
                    f.write(b"\n")
                return
            offset = end + 1

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self.records

    def check(self, chunks: Iterable[Chunk]) -> None:
        """Raise if a stored chunk's text differs from the chunk of that key now."""
        for c in chunks:
            stored = self.records.get(c.key)
            if stored is not None and stored["sha1"] != c.sha1:
                raise ValueError(
                    f"{self.path} holds chunk {c.index} of book {c.book!r} with other text than it has now: the "
                    "books, the tokenizer or --chunk-tokens changed since it was written; use a fresh --out "
                    "(or the earlier settings, or --overwrite to start again)")

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.records.setdefault((record["book"], record["chunk"]), record)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "big") >> 1


def _chat_record(context: str, question: str, answer: str) -> dict:
    return {"prompt": chat_prompt(f"{context} {question}"), "answer": answer}


def assemble_examples(book: Book, chunks: Sequence[Chunk], pairs: dict[int, list[dict]], tokenizer: Tokenizer,
                      length: int, *, chunk_tokens: int, max_pair_tokens: int, seed: int = 0,
                      max_examples: int | None = None) -> tuple[list[dict], Counter]:
    """Chat examples of at most ``length`` tokens from one book (the rule is in the module docstring).

    chunks: the book's chunks in order; pairs: chunk index -> its kept QA pairs. Returns the records and
    the windows not written, by reason.
    """
    skipped: Counter = Counter()
    tolerance = chunk_tokens + max_pair_tokens + _SLACK

    def count(record: dict) -> int:
        return len(encode_example(record, FIELD_SPEC, tokenizer)[0])

    base = count(_chat_record("", "", ""))
    pair_tokens = {(k, i): len(tokenizer.encode(p["question"])) + len(tokenizer.encode(p["answer"]))
                   for k, ps in pairs.items() for i, p in enumerate(ps)}
    reserve = max(pair_tokens.values(), default=0)
    if not chunks or base + reserve + sum(c.num_tokens for c in chunks) < length - tolerance:
        skipped["book_too_short"] += 1
        return [], skipped
    # Full windows (the next chunk would not fit) come out at least L - tolerance + _SLACK / 2 long.
    budget = length - base - reserve - _SLACK // 2
    if max(c.num_tokens for c in chunks) > budget:
        raise ValueError(f"target length {length} leaves {budget} tokens for the context: too short for chunks "
                         f"of up to {chunk_tokens} tokens (lower --chunk-tokens or raise the length)")
    windows: list[tuple[int, int]] = []  # [a, b) chunk ranges, planned with the chunks' counts
    a = 0
    while a < len(chunks):
        b, total = a, 0
        while b < len(chunks) and total + chunks[b].num_tokens <= budget:
            total += chunks[b].num_tokens
            b += 1
        if b == len(chunks) and base + reserve + total < length - tolerance:
            skipped["tail_too_short"] += 1
        else:
            windows.append((a, b))
        a = b
    if max_examples is not None and len(windows) > max_examples:
        rng = random.Random(f"{seed}/{book.id}/{length}")
        skipped["over_max_examples"] += len(windows) - max_examples
        windows = [windows[i] for i in sorted(rng.sample(range(len(windows)), max_examples))]
    examples: list[dict] = []
    for a, b in windows:
        rng = random.Random(f"{seed}/{book.id}/{length}/{a}")
        candidates = [k for k in range(a, b) if pairs.get(k)]
        if not candidates:
            skipped["no_question"] += 1
            continue
        k = rng.choice(candidates)
        i = rng.randrange(len(pairs[k]))
        pair = pairs[k][i]
        while True:
            context = book.text[chunks[a].start:chunks[b - 1].end].strip()
            record = _chat_record(context, pair["question"], pair["answer"])
            n = count(record)
            if n <= length or a == b - 1:
                break
            # Drop enough chunks at once (each recount encodes the whole example), their counts scaled by
            # how far the window's sum of chunk counts fell short of its real length.
            window = sum(c.num_tokens for c in chunks[a:b])
            excess = (n - length) * window / max(1, n - base - pair_tokens[(k, i)])
            while excess > 0 and a < b - 1:
                if k < b - 1:
                    b -= 1
                    excess -= chunks[b].num_tokens
                else:
                    excess -= chunks[a].num_tokens
                    a += 1
        if not length - tolerance <= n <= length:
            skipped["too_short"] += 1
        else:
            record.update(book=book.id, first_chunk=a, last_chunk=b - 1, question_chunk=k,
                          question=pair["question"], target_length=length, num_tokens=n)
            examples.append(record)
    return examples, skipped


@dataclass
class BookQASummary:
    """Counts of one run; the chunk and pair counts cover every chunk of the books, resumed or not."""

    books: int = 0
    chunks: int = 0
    chunks_resumed: int = 0  # found in qa.jsonl at the start
    chunks_generated: int = 0  # answered in this run
    chunks_failed: dict[str, int] = field(default_factory=dict)  # no output this run, by error kind
    chunks_pending: int = 0  # not generated (failed, or no generator given)
    chunks_without_pairs: int = 0
    pairs_kept: int = 0
    pairs_dropped: dict[str, int] = field(default_factory=dict)  # by reason (see parse_qa; "too_long")
    examples: dict[int, int] = field(default_factory=dict)  # per target length
    skipped: dict[int, dict[str, int]] = field(default_factory=dict)  # windows not written, per length

    def format(self) -> str:
        lines = [f"books {self.books}, chunks {self.chunks} ({self.chunks_resumed} resumed, {self.chunks_generated} "
                 f"generated now, {self.chunks_pending} pending), chunks without pairs {self.chunks_without_pairs}",
                 f"failed this run: {sum(self.chunks_failed.values())} {dict(self.chunks_failed) or ''}".rstrip(),
                 f"pairs kept {self.pairs_kept}, dropped {sum(self.pairs_dropped.values())} "
                 f"{dict(self.pairs_dropped) or ''}".rstrip()]
        for length, n in self.examples.items():
            skipped = self.skipped.get(length) or {}
            lines.append(f"length {length:>8}: {n} examples" + (f", not written {skipped}" if skipped else ""))
        return "\n".join(lines)


def writer_provenance(generator) -> dict:
    """The question writer's ``provenance()``, or its class name when it has none (see backends.py)."""
    method = getattr(generator, "provenance", None)
    if callable(method):
        return method()
    return {"class": f"{type(generator).__module__}.{type(generator).__qualname__}"}


def _remove_outputs(out: Path) -> None:
    """What book_qa writes in OUT, and nothing else (OUT may hold other files)."""
    for path in [out / QA_FILE, out / PROVENANCE_FILE, out / "summary.json", *out.glob("examples_*.jsonl"),
                 *out.glob("examples_*.jsonl.tmp")]:
        if path.is_file():
            path.unlink()


def _read_provenance(out: Path) -> dict | None:
    path = out / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it, or pass --overwrite to start fresh") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a provenance record; restore it, or pass --overwrite to start fresh")
    return record


def run_book_qa(books: Sequence[Book] | Iterable[str | os.PathLike], tokenizer: Tokenizer, out_dir: str | os.PathLike,
                generator=None, *, chunk_tokens: int = 1000, lengths: Sequence[int] = (32768, 131072),
                pairs_per_chunk: int = 3, max_pair_tokens: int = 256, max_examples_per_book: int | None = None,
                seed: int = 0, progress: bool = True, overwrite: bool = False) -> BookQASummary:
    """Chunk, generate QA (resuming ``out_dir/qa.jsonl``), and write ``out_dir/examples_{L}.jsonl`` per length.

    books: Book objects, or paths for ``load_books``. generator: see ``backends.py`` (None: assemble
    from the stored QA only). max_pair_tokens: pairs whose question and answer have more tokens together
    are dropped ("too_long"). overwrite: delete the outputs in ``out_dir`` first (needs a generator).
    Resuming checks ``out_dir/provenance.json`` (see the module docstring). Returns the summary, also
    written to ``out_dir/summary.json``.
    """
    books = [books] if isinstance(books, (str, os.PathLike, Book)) else list(books)
    if not all(isinstance(b, Book) for b in books):
        books = load_books(books)
    lengths = sorted(set(int(n) for n in lengths))
    if not lengths or lengths[0] < 1:
        raise ValueError(f"lengths must be positive token counts, got {lengths}")
    out = Path(out_dir)
    if overwrite and generator is None:
        raise ValueError(f"--overwrite would delete the QA pairs in {out} with nothing to write new ones: "
                         "give a question writer (--model), or leave out --overwrite to assemble from them")
    summary = BookQASummary(books=len(books))

    chunks = {b.id: chunk_text(b.text, tokenizer, chunk_tokens, book=b.id)
              for b in tqdm(books, desc="chunking", unit="book", disable=not progress)}
    every = [c for cs in chunks.values() for c in cs]
    summary.chunks = len(every)
    current = {"chunking": chunking_provenance(tokenizer, chunk_tokens)}
    if generator is not None:
        current["generation"] = {"writer": writer_provenance(generator), "prompt": text_fingerprint(QA_PROMPT),
                                 "pairs_per_chunk": pairs_per_chunk, "seed": seed}
    current = json.loads(json.dumps(current))  # as it reads back (tuples become lists)
    if overwrite:
        _remove_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    store = QAStore(out / QA_FILE)
    store.check(every)
    previous = _read_provenance(out)
    if generator is not None:
        # Pairs stored: they must come from the same writer, settings and chunking. None stored: a fresh start.
        check_provenance((previous or {}) if store.records else None, current, what="book QA pairs",
                         path=store.path, overwrite=False)
        tmp = out / (PROVENANCE_FILE + ".tmp")
        tmp.write_text(json.dumps(current, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, out / PROVENANCE_FILE)
    elif store.records and previous is not None:
        check_provenance({"chunking": previous.get("chunking")}, {"chunking": current["chunking"]},
                         what="book QA pairs", path=store.path, overwrite=False)
    todo = [c for c in every if c.key not in store]
    summary.chunks_resumed = len(every) - len(todo)

    failed: Counter = Counter()
    if generator is not None and todo:
        group = max(1, int(getattr(generator, "batch_size", 1)))
        bar = tqdm(total=len(todo), desc="writing QA", unit="chunk", disable=not progress)
        for start in range(0, len(todo), group):
            batch = todo[start:start + group]
            outputs = generator.generate([qa_prompt(c.text, pairs_per_chunk) for c in batch],
                                         [_seed(seed, c.book, c.index) for c in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"the generator returned {len(outputs)} outputs for {len(batch)} prompts")
            for c, output in zip(batch, outputs):
                if not isinstance(output, str):
                    kind = getattr(output, "kind", type(output).__name__)
                    if not failed:
                        tqdm.write(f"book_qa: chunk {c.index} of {c.book!r} failed: {output}", file=sys.stderr)
                    failed[kind] += 1
                    continue
                pairs, dropped = parse_qa(output)
                store.append({"book": c.book, "chunk": c.index, "sha1": c.sha1, "pairs": pairs,
                              "dropped": dict(dropped), "raw": output})
                summary.chunks_generated += 1
            if start == 0 and len(batch) > 1 and not summary.chunks_generated:
                raise BackendError(f"every request of the first batch ({len(batch)} chunks) failed, e.g. "
                                   f"{outputs[0]}; is the question writer up? Nothing was recorded.")
            bar.update(len(batch))
            bar.set_postfix(failed=sum(failed.values()))
        bar.close()
    summary.chunks_failed = dict(failed)
    summary.chunks_pending = len(todo) - summary.chunks_generated

    dropped: Counter = Counter()
    kept: dict[str, dict[int, list[dict]]] = {}
    for c in every:
        record = store.records.get(c.key)
        if record is None:
            continue
        dropped.update(record["dropped"])
        good = []
        for p in record["pairs"]:
            if len(tokenizer.encode(p["question"])) + len(tokenizer.encode(p["answer"])) > max_pair_tokens:
                dropped["too_long"] += 1
            else:
                good.append(p)
        summary.pairs_kept += len(good)
        summary.chunks_without_pairs += not good
        kept.setdefault(c.book, {})[c.index] = good
    summary.pairs_dropped = dict(sorted(dropped.items()))

    for length in lengths:
        skipped: Counter = Counter()
        path = out / f"examples_{length}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        num = 0
        with open(tmp, "w", encoding="utf-8") as f:
            for b in tqdm(books, desc=f"assembling {length}", unit="book", disable=not progress):
                records, why = assemble_examples(b, chunks[b.id], kept.get(b.id, {}), tokenizer, length,
                                                 chunk_tokens=chunk_tokens, max_pair_tokens=max_pair_tokens,
                                                 seed=seed, max_examples=max_examples_per_book)
                skipped.update(why)
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
                num += len(records)
        os.replace(tmp, path)
        summary.examples[length] = num
        summary.skipped[length] = dict(sorted(skipped.items()))
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=1) + "\n", encoding="utf-8")
    return summary


def parse_lengths(text: str) -> list[int]:
    """"32768,131072" or "32k,128k,1m" (k = 1024, m = 1024**2) -> token counts."""
    scale = {"k": 1024, "m": 1024 ** 2}
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        m = re.fullmatch(r"(\d+)([km]?)", item)
        if not m or int(m[1]) == 0:
            raise ValueError(f"bad length {item!r} in {text!r}: use token counts such as 32768 or 32k, comma-separated")
        out.append(int(m[1]) * scale.get(m[2], 1))
    if not out:
        raise ValueError(f"no lengths in {text!r}")
    return out


def main(argv=None) -> BookQASummary:
    from ringlwm.data.tokenizer import load_tokenizer

    p = argparse.ArgumentParser(prog="python -m ringlwm.qa.book_qa", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--books", nargs="+", required=True, metavar="PATH", help=".txt files, folders of them, JSONL")
    p.add_argument("--tokenizer", required=True, help="the training tokenizer (.model file or folder): counts tokens")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--backend", choices=("hf", "openai"), default=None,
                   help="default: openai when --base-url is given, else hf")
    p.add_argument("--model", default=None, help="hf: a local model folder; openai: the model name. Omitted: no "
                   "generation, assemble from OUT/qa.jsonl")
    p.add_argument("--chunk-tokens", type=int, default=1000)
    p.add_argument("--lengths", default="32768,131072", help="target lengths in tokens, e.g. 32k,128k,1m")
    p.add_argument("--pairs-per-chunk", type=int, default=3)
    p.add_argument("--max-pair-tokens", type=int, default=256, help="drop longer question+answer pairs")
    p.add_argument("--max-examples-per-book", type=int, default=None, help="per length; default: all windows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-field", default="text", help="JSONL: the field holding a book's text")
    p.add_argument("--id-field", default=None, help="JSONL: the field holding a book's id")
    p.add_argument("--skip-bad-books", action="store_true", help="pass over empty or unreadable books")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--overwrite", action="store_true", help="delete OUT's QA pairs, examples and summary and "
                   "start fresh (default: resume, when the question writer and settings match)")
    p.add_argument("--no-progress", action="store_true")
    hf = p.add_argument_group("hf backend")
    hf.add_argument("--batch-size", type=int, default=8)
    hf.add_argument("--device", default=None)
    hf.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: as saved)")
    api = p.add_argument_group("openai backend")
    api.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000/v1")
    api.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    api.add_argument("--concurrency", type=int, default=8)
    api.add_argument("--timeout", type=float, default=120.0, help="seconds per socket operation")
    api.add_argument("--retries", type=int, default=4)
    api.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry; doubles")
    args = p.parse_args(argv)
    try:
        lengths = parse_lengths(args.lengths)
    except ValueError as e:
        p.error(str(e))
    backend = args.backend or ("openai" if args.base_url else "hf")
    if backend == "openai" and args.model and not args.base_url:
        p.error("--backend openai needs --base-url")
    if args.overwrite and args.model is None:
        p.error("--overwrite deletes the QA pairs in --out: give --model to write new ones")

    try:
        tokenizer = load_tokenizer(args.tokenizer)
        books = load_books(args.books, text_field=args.text_field, id_field=args.id_field,
                           on_error="skip" if args.skip_bad_books else "raise")
        generator = None
        if args.model is None:
            print("book_qa: no --model: assembling from the stored QA only", file=sys.stderr)
        elif backend == "hf":
            generator = HFGenerator(args.model, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_p=args.top_p, device=args.device,
                                    dtype=args.dtype)
        else:
            generator = OpenAIGenerator(args.base_url, args.model, api_key_env=args.api_key_env,
                                        concurrency=args.concurrency, timeout=args.timeout, max_retries=args.retries,
                                        backoff=args.backoff, max_tokens=args.max_new_tokens,
                                        temperature=args.temperature, top_p=args.top_p if args.top_p < 1 else None)
        summary = run_book_qa(books, tokenizer, args.out, generator, chunk_tokens=args.chunk_tokens,
                              lengths=lengths, pairs_per_chunk=args.pairs_per_chunk,
                              max_pair_tokens=args.max_pair_tokens, max_examples_per_book=args.max_examples_per_book,
                              seed=args.seed, progress=not args.no_progress, overwrite=args.overwrite)
    except (OSError, ValueError, BackendError) as e:  # DataError is a ValueError
        sys.exit(f"book_qa: {e}")
    print(summary.format())
    files = ", ".join(f"examples_{n}.jsonl" for n in summary.examples)
    print(f"wrote {files} and summary.json to {args.out} (train with field spec {FIELD_SPEC!r})")
    return summary


if __name__ == "__main__":
    main()
