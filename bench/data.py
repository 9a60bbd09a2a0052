"""Data benchmark: tokenization + packing throughput on one core, against sentencepiece alone.

    python -m bench.data [--quick]

A corpus of JSONL documents (~100 MB; 5 MB with --quick) of Zipf-distributed pseudo-words, with
document lengths from a few hundred bytes to ~100 KB, is generated in a temporary folder, and a
sentencepiece BPE model (8K pieces) is trained on a sample of it. Then, one thread, one process:

    sp_encode   reference: sentencepiece ``encode`` over the texts already in memory
    read+encode read_jsonl -> encode_source (JSON parsing, field spec, BOS/EOS, loss masks)
    pack        pack_documents over the examples already tokenized (packing alone), split="long"
    pack always the same with split="always" (no padding but at the end; compare pad_fraction)
    loader      PackedLoader end to end (read, tokenize, pack, batch, torch tensors), sp_size 1
    loader sp4  the same, sp_size=4 (this rank's zigzag quarter)
    loader dp4  the same, dp_size=4 (each rank packs everything and keeps a quarter)

``tokens_per_s`` is the corpus's sentencepiece tokens (BOS/EOS not counted) over the row's seconds, so
``vs_sp_encode`` (reference seconds / row seconds) is the share of raw tokenizer speed that is left:
1.0 means the pipeline costs nothing beyond sentencepiece itself. The reference is timed first and
last, and the faster run is used.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import append_csv, print_table, stamp
from ringlwm.data import (
    PackedLoader,
    encode_source,
    load_tokenizer,
    pack_documents,
    read_jsonl,
    train_sentencepiece,
)

SEQ_LEN = 32768
VOCAB = 8000


def make_corpus(folder: Path, megabytes: float, seed: int = 0) -> tuple[Path, list[str]]:
    """JSONL of {"text": ...} documents totalling about ``megabytes`` MB; returns (path, texts)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(1, 10, 20_000)
    words = np.array(["".join(rng.choice(letters, n)) for n in lengths])
    probs = 1.0 / np.arange(1, len(words) + 1) ** 1.1  # Zipf-like, as in natural text
    probs /= probs.sum()
    texts, size = [], 0
    target = int(megabytes * 1e6)
    while size < target:
        num_words = int(np.clip(rng.lognormal(6.5, 1.0), 20, 20_000))  # median ~650 words, ~4 KB
        idx = rng.choice(len(words), num_words, p=probs)
        doc = " ".join(words[idx])
        if num_words > 200:  # paragraphs
            cut = num_words // 3
            doc = doc.replace(f" {words[idx[cut]]} ", f" {words[idx[cut]]}\n\n", 1)
        texts.append(doc)
        size += len(doc) + 12
    path = folder / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path, texts


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _drain(loader) -> int:
    n = 0
    for batch in loader:
        n += batch["input_ids"].numel()
    return n


def main(quick: bool = False) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> list[dict]:
    megabytes = 5 if quick else 100
    base = stamp(torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path, texts = make_corpus(folder, megabytes)
        corpus_mb = path.stat().st_size / 1e6
        t0 = time.perf_counter()
        tok = load_tokenizer(train_sentencepiece(texts[:300], VOCAB, folder / "sp", input_sentence_size=200_000))
        train_s = time.perf_counter() - t0
        print(f"corpus: {len(texts)} documents, {corpus_mb:.1f} MB; tokenizer: {tok.vocab_size} pieces "
              f"(trained in {train_s:.1f}s)", flush=True)

        def reference() -> tuple[float, int]:
            t0 = time.perf_counter()
            n = sum(len(tok.sp.encode(t)) for t in texts)
            return time.perf_counter() - t0, n

        # The reference runs first and last, and the faster of the two counts: on a shared machine a
        # slow spell during one of them would otherwise make every ratio look better than it is.
        ref_s, num_tokens = reference()

        def row(part, seconds, **extra):
            r = dict(base, part=part, corpus_mb=round(corpus_mb, 1), tokens=num_tokens, seconds=round(seconds, 3),
                     tokens_per_s=round(num_tokens / seconds), vs_sp_encode=round(ref_s / seconds, 3),
                     seq_len="", pad_fraction="")  # every row has every column (one CSV header)
            r.update(extra)
            rows.append(r)
            print(f"{part}: {seconds:.2f}s, {num_tokens / seconds / 1e6:.2f}M tokens/s", flush=True)

        enc_s, examples = _timed(lambda: list(encode_source(read_jsonl(path), "text", tok)))
        row("read+encode", enc_s)
        for name, split in (("pack", "long"), ("pack always", "always")):
            packer = pack_documents(examples, SEQ_LEN, split=split)
            pack_s, _ = _timed(lambda packer=packer: sum(1 for _ in packer))
            row(name, pack_s, seq_len=SEQ_LEN, pad_fraction=round(packer.stats.pad_fraction, 4))
        del examples

        for name, kw in (("loader", {}), ("loader sp4", {"sp_size": 4}), ("loader dp4", {"dp_size": 4})):
            loader = PackedLoader(encode_source(read_jsonl(path), "text", tok), SEQ_LEN, 1, **kw)
            seconds, _ = _timed(lambda loader=loader: _drain(loader))
            row(name, seconds, seq_len=SEQ_LEN, pad_fraction=round(loader.stats["packing"].pad_fraction, 4))

        again_s, _ = reference()
        first_s, ref_s = ref_s, min(ref_s, again_s)
        print(f"sp_encode: {first_s:.2f}s first, {again_s:.2f}s last", flush=True)
        for r in rows:
            r["vs_sp_encode"] = round(ref_s / r["seconds"], 3)
        row("sp_encode", ref_s)
        rows.insert(0, rows.pop())

    out = append_csv("data", rows)
    print(f"\ndata pipeline on {base['device']} ({base['date']}, {base['git']}); rows appended to {out}")
    print_table(rows, ["part", "corpus_mb", "tokens", "seconds", "tokens_per_s", "vs_sp_encode", "pad_fraction"])
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 5 MB corpus instead of 100 MB")
    main(quick=parser.parse_args().quick)
