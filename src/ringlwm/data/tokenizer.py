"""Tokenizers: a sentencepiece ``.model`` file or a local Hugging Face tokenizer folder, behind one face.

    tok = load_tokenizer("tokenizer.model")          # or a folder with tokenizer.json / tokenizer_config.json
    tok.encode("Hello") -> [ids], no special tokens;  tok.decode(ids) -> str (special tokens dropped)
    tok.bos_id, tok.eos_id, tok.pad_id (None when the tokenizer has none), tok.vocab_size

BOS and EOS are not added by ``encode``: ``fields.encode_example`` adds them once per document, as the
tokenizer defines them (a tokenizer without a BOS gets none).

Train a small sentencepiece model on local text (seconds for a few MB):

    python -m ringlwm.data.tokenizer train --input corpus.txt [more.txt ...] --vocab-size 8000 --out tok/sp

The trained model follows Llama's conventions: BPE, unk=0, bos=1, eos=2, no pad, no normalization (the
text round-trips: decode(encode(text)) == text for characters seen in training), digits split, runs of
spaces and "\\n" kept as pieces. ``byte_fallback=True`` makes every UTF-8 string encodable (needs a
vocabulary of more than 256 + 3).
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


def _id_or_none(i: int | None) -> int | None:
    return None if i is None or i < 0 else int(i)


class SentencePieceTokenizer:
    """A sentencepiece model (``.model`` file or serialized proto bytes)."""

    def __init__(self, model: str | os.PathLike | bytes):
        import sentencepiece as spm

        if isinstance(model, bytes):
            self.sp = spm.SentencePieceProcessor(model_proto=model)
            self.path = None
        else:
            self.path = os.fspath(model)
            try:
                self.sp = spm.SentencePieceProcessor(model_file=self.path)
            except (OSError, RuntimeError) as e:
                raise ValueError(f"{self.path} is not a sentencepiece model ({e}); load_tokenizer takes a .model "
                                 "file or a tokenizer folder") from e
        self.bos_id = _id_or_none(self.sp.bos_id())
        self.eos_id = _id_or_none(self.sp.eos_id())
        self.pad_id = _id_or_none(self.sp.pad_id())
        self.vocab_size = int(self.sp.vocab_size())

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


class HFTokenizer:
    """A tokenizer folder saved by Hugging Face ``save_pretrained`` (loaded with AutoTokenizer, offline)."""

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        self.path = os.fspath(path)
        self.tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.bos_id = _id_or_none(self.tok.bos_token_id)
        self.eos_id = _id_or_none(self.tok.eos_token_id)
        self.pad_id = _id_or_none(self.tok.pad_token_id)
        self.vocab_size = len(self.tok)  # includes added tokens: the embedding must have this many rows

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


HF_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(path: str | os.PathLike) -> SentencePieceTokenizer | HFTokenizer:
    """A sentencepiece ``.model`` file, or a folder: a Hugging Face tokenizer (tokenizer.json or
    tokenizer_config.json) if it holds one, else its ``tokenizer.model`` as sentencepiece. Never downloads."""
    p = Path(path)
    if p.is_file():
        return SentencePieceTokenizer(p)
    if p.is_dir():
        if any((p / name).is_file() for name in HF_FILES):
            return HFTokenizer(p)
        if (p / "tokenizer.model").is_file():
            return SentencePieceTokenizer(p / "tokenizer.model")
        raise ValueError(f"{p} holds no tokenizer: expected {' or '.join(HF_FILES)} (Hugging Face) or tokenizer.model")
    raise FileNotFoundError(f"no tokenizer at {p}: give a sentencepiece .model file or a local tokenizer folder")


def _lines(inputs: Iterable[str | os.PathLike]):
    """Training sentences: the lines of each file (Path) or text (str). sentencepiece trains on lines, so
    newlines never reach it; "\\n" enters the vocabulary as a user-defined symbol instead."""
    for item in inputs:
        if isinstance(item, os.PathLike):
            with open(item, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield line.rstrip("\n")
        elif isinstance(item, str):
            if item and not any(c.isspace() for c in item) and os.path.isfile(item):
                raise ValueError(f"{item!r} names a file; pass pathlib.Path({item!r}) to train on its contents")
            yield from (line for line in item.split("\n") if line.strip())
        else:
            raise TypeError(f"training input must be a str (text) or a path (file), got {type(item).__name__}")


def train_sentencepiece(
    input_files_or_texts: Iterable[str | os.PathLike],
    vocab_size: int,
    model_prefix: str | os.PathLike,
    *,
    model_type: str = "bpe",
    byte_fallback: bool = False,
    character_coverage: float = 1.0,
    num_threads: int = 1,
    **options,
) -> Path:
    """Train a sentencepiece model and write ``{model_prefix}.model`` and ``.vocab``; returns the .model path.

    input_files_or_texts: ``pathlib.Path`` items are files (read line by line), ``str`` items are texts.
    vocab_size is an upper bound: a small corpus may give fewer pieces (``hard_vocab_limit=False``).
    options: more sentencepiece trainer options (e.g. ``input_sentence_size=1_000_000`` to sample a large
    corpus), overriding the defaults below.
    """
    import sentencepiece as spm

    if vocab_size < 8:
        raise ValueError(f"vocab_size must be at least 8, got {vocab_size}")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    settings = dict(
        model_type=model_type,
        vocab_size=int(vocab_size),
        hard_vocab_limit=False,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=1 << 16,
        num_threads=num_threads,
        minloglevel=2,
    )
    settings.update(options)
    sentences = _lines(input_files_or_texts)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=model, **settings)
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training failed: {e}") from e
    model_path = prefix.with_name(prefix.name + ".model")
    model_path.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(prefix.with_name(prefix.name + ".vocab"), "w", encoding="utf-8") as f:
        for i in range(sp.vocab_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n")
    return model_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ringlwm.data.tokenizer", description="Tokenizer tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a sentencepiece model on local text files")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--model-type", default="bpe", choices=("bpe", "unigram", "char", "word"))
    train.add_argument("--byte-fallback", action="store_true", help="encode unseen characters as UTF-8 bytes")
    train.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    for name in args.input:
        if not os.path.isfile(name):
            parser.error(f"no such file: {name}")
    path = train_sentencepiece([Path(p) for p in args.input], args.vocab_size, args.out, model_type=args.model_type,
                               byte_fallback=args.byte_fallback, num_threads=args.threads)
    tok = SentencePieceTokenizer(path)
    print(f"wrote {path} ({tok.vocab_size} pieces) and {path.with_suffix('.vocab')}")


if __name__ == "__main__":
    main()
