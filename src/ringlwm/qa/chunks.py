"""Books and their chunks for ``book_qa``: load books, cut each into chunks of at most N tokens.

    books = load_books(["books/", "more.jsonl"])          # [Book(id, text)], in a fixed order
    chunks = chunk_text(book.text, tok, 1000, book=book.id)

The chunking rule, for a limit of N tokens (counted with the training tokenizer):

1. The text is cut into sentences: a sentence ends at ``.``, ``!``, ``?`` or ``…``, then any closing
   quotes or brackets, then whitespace; a paragraph end (a blank line) also ends one. A sentence of more
   than N tokens is cut into words (at whitespace), and a word of more than N tokens into the longest
   runs of characters that fit. Whitespace stays with the piece before it, so the pieces, in order,
   give back the text exactly.
2. Pieces are packed in order. When the next piece does not fit, the chunk is closed at the strongest
   boundary inside it (paragraph end, then sentence end, then word end) that keeps it at least half
   full (by the sum of its pieces' token counts); the pieces after that boundary begin the next chunk.
3. The chunk's text is counted again as a whole (tokens merge across piece boundaries); in the rare case
   it then has more than N tokens, pieces move from its end to the next chunk until it fits.

So every chunk has at most N tokens; a chunk ends mid-sentence only where one sentence alone has more
than N tokens; a chunk has fewer than about N/2 tokens only at the end of a book or before a sentence
of more than N/2 tokens (one that cannot share a chunk with it). "About": tokens can merge across a
sentence end, so a chunk counted as a whole may come out a few tokens under the sum of its pieces. Chunks tile the text: ``text[c.start:c.end]`` over the chunks, in order, is
the whole text (save blank stretches that make no chunk of their own, such as a text of only
whitespace), and ``num_tokens`` counts that span (whitespace around it included); ``c.text`` is the
span without its surrounding whitespace, the passage shown to the question writer.

The sentence rule is deliberately simple ("Mr. Smith" ends a sentence after "Mr."); it only decides
where chunks may end, so a rare wrong cut costs nothing but a slightly odd chunk border.

``chunking_provenance(tokenizer, N)`` is what decides the chunks besides the text: N, and the tokenizer
(the hash of the file or files it was loaded from, its special ids, and its ids for a fixed probe text).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ringlwm.data.sources import read_jsonl, read_text_folder
from ringlwm.data.tokenizer import Tokenizer
from ringlwm.runtime import text_fingerprint, tokenizer_files_fingerprint

_PARAGRAPH_END = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+")
_WORD_END = re.compile(r"\s+")
# Boundary strengths: a chunk prefers to end after the strongest one.
CHAR, WORD, SENTENCE, PARAGRAPH = 0, 1, 2, 3


@dataclass(frozen=True)
class Book:
    id: str
    text: str


@dataclass(frozen=True)
class Chunk:
    """Characters ``start:end`` of book ``book``; ``index`` counts from 0 within the book."""

    book: str
    index: int
    start: int
    end: int
    num_tokens: int
    text: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.book, self.index)

    @property
    def sha1(self) -> str:
        return hashlib.sha1(self.text.encode("utf-8")).hexdigest()[:16]


def load_books(paths: str | os.PathLike | Iterable, *, text_field: str = "text", id_field: str | None = None,
               on_error: str = "raise") -> list[Book]:
    """Books from .txt files, folders of them (recursively), and JSONL files (one book per record).

    Ids: a text file's name, or its path from the folder given (``books/a/b.txt`` for the folder
    ``books``); a JSONL record's ``id_field`` when given, else ``{file name}:{record number}`` (from 1).
    Two books with one id raise a ValueError. on_error: as the readers' ("skip" passes over empty or
    unreadable books instead of raising).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    books: list[Book] = []
    seen: dict[str, str] = {}
    for raw in paths:
        path = Path(raw)
        if path.suffix == ".jsonl" and not path.is_dir():
            fields = [text_field] + ([id_field] if id_field else [])
            source = read_jsonl(path, on_error=on_error, fields=fields)
            items = ((str(r[id_field]) if id_field else f"{path.name}:{n}", r[text_field], f"{path} record {n}")
                     for n, r in enumerate(source, 1))
        else:
            root = path.parent if path.is_dir() else None
            items = ((Path(r["path"]).relative_to(root).as_posix() if root else path.name, r["text"], r["path"])
                     for r in read_text_folder(path, on_error=on_error))
        for book_id, text, where in items:
            if book_id in seen:
                raise ValueError(f"two books have the id {book_id!r}: {seen[book_id]} and {where} (give JSONL "
                                 "records distinct ids, or rename one file)")
            seen[book_id] = where
            books.append(Book(book_id, text))
    return books


def _split_after(text: str, pattern: re.Pattern) -> list[str]:
    """``text`` cut after each match of ``pattern``; whitespace-only pieces join their neighbour."""
    cuts = [m.end() for m in pattern.finditer(text) if 0 < m.end() < len(text)]
    out: list[str] = []
    for piece in (text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])):
        if out and (not piece.strip() or not out[-1].strip()):
            out[-1] += piece
        else:
            out.append(piece)
    return out


def _pieces(text: str, count: Callable[[str], int], limit: int) -> list[tuple[int, int, int]]:
    """[(num_chars, num_tokens, strength of the boundary it ends at)] with num_tokens <= limit each."""
    out: list[tuple[int, int, int]] = []

    def add(s: str, strength: int, n: int) -> None:
        if n <= limit:
            out.append((len(s), n, strength))
            return
        words = _split_after(s, _WORD_END)
        if len(words) > 1:
            for i, word in enumerate(words):
                add(word, strength if i == len(words) - 1 else WORD, count(word))
            return
        while s:  # one "word" of more than `limit` tokens: the longest prefixes that fit
            lo, hi = 1, len(s)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if count(s[:mid]) <= limit else (lo, mid - 1)
            out.append((lo, count(s[:lo]), strength if lo == len(s) else CHAR))
            s = s[lo:]

    for para in _split_after(text, _PARAGRAPH_END):
        sentences = _split_after(para, _SENTENCE_END)
        for i, sentence in enumerate(sentences):
            add(sentence, PARAGRAPH if i == len(sentences) - 1 else SENTENCE, count(sentence))
    return out


def _best_cut(pieces, i: int, j: int, limit: int) -> int:
    """End (exclusive) of the chunk pieces[i:j] must close at: the strongest boundary at least half full."""
    best, best_strength, total = j, -1, 0
    for k in range(i, j):
        total += pieces[k][1]
        if total * 2 >= limit and pieces[k][2] >= best_strength:
            best, best_strength = k + 1, pieces[k][2]
    return best


def chunk_text(text: str, tokenizer: Tokenizer, max_tokens: int = 1000, *, book: str = "") -> list[Chunk]:
    """``text`` cut into chunks of at most ``max_tokens`` tokens (the rule is in the module docstring)."""
    if max_tokens < 16:
        raise ValueError(f"max_tokens must be at least 16, got {max_tokens}")

    def count(s: str) -> int:
        return len(tokenizer.encode(s))

    pieces = _pieces(text, count, max_tokens)
    offsets = [0]
    for num_chars, _, _ in pieces:
        offsets.append(offsets[-1] + num_chars)
    chunks: list[Chunk] = []
    i = 0
    while i < len(pieces):
        j, total = i, 0
        while j < len(pieces) and total + pieces[j][1] <= max_tokens:
            total += pieces[j][1]
            j += 1
        if j < len(pieces):
            j = _best_cut(pieces, i, j, max_tokens)
        n = count(text[offsets[i]:offsets[j]])
        while n > max_tokens and j > i + 1:  # a single piece fits by construction
            j -= 1
            n = count(text[offsets[i]:offsets[j]])
        span = text[offsets[i]:offsets[j]]
        if span.strip():  # a blank span (an all-blank text, a huge run of spaces) makes no chunk
            chunks.append(Chunk(book, len(chunks), offsets[i], offsets[j], n, span.strip()))
        i = j
    return chunks


# A tokenizer folder's own files (a model folder also holds weights, which do not decide tokens).
_PROBE = ("Chapter XII.\n\n\"Mr. O'Hara's 3 ships,\" she said — Übermut, naïve café; 東京 and 🙂!\n"
          "Q: Who sailed on 4 July 1776? A: The captain (aged 42).")


def tokenizer_fingerprint(tokenizer: Tokenizer) -> dict:
    """What identifies a tokenizer: the hash of the file(s) it was loaded from (``tokenizer.path``: a file,
    or the tokenizer files of a folder; None when it has no path), its special ids, and a hash of its ids
    for a fixed probe text (so that tokenizers built in code are told apart too)."""
    path = getattr(tokenizer, "path", None)
    files = tokenizer_files_fingerprint(path) if path else None
    return {"files": files, "vocab_size": getattr(tokenizer, "vocab_size", None),
            "bos_id": getattr(tokenizer, "bos_id", None), "eos_id": getattr(tokenizer, "eos_id", None),
            "probe": text_fingerprint(json.dumps([int(i) for i in tokenizer.encode(_PROBE)]))}


def chunking_provenance(tokenizer: Tokenizer, max_tokens: int) -> dict:
    """What decides ``chunk_text``'s chunks besides the text itself."""
    return {"tokenizer": tokenizer_fingerprint(tokenizer), "chunk_tokens": int(max_tokens)}
