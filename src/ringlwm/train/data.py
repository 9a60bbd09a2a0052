"""From a recipe's data section to this rank's PackedLoader (ringlwm.data does the work).

Each source becomes a resumable stream of (token_ids, loss_mask) examples; the sources are interleaved
by ``Mixture`` at their weights (restarting a source when it runs out: epochs), packed to the stage's
length and sharded for this rank's (dp, sp) position. The ``synthetic`` format needs no files and no
tokenizer: documents of a random motif repeated, tokens drawn from a Zipf distribution. A model first
learns the skewed unigram statistics (a quick, reliable drop in loss: smoke tests), then can only do
better by attending back to the motif (the tiny recipe).
"""

from __future__ import annotations

import itertools
import random
import sys

from ringlwm.data import (
    Mixture,
    PackedLoader,
    encode_source,
    encode_vision_source,
    load_tokenizer,
    read_jsonl,
    read_parquet,
    read_text_folder,
)
from ringlwm.data.stream import Stream, _IndexIterator
from ringlwm.train.config import DataConfig, StageConfig


class SyntheticMotifs(Stream):
    """Endless examples; example i depends only on (seed, i), so a restore is O(1)."""

    def __init__(self, vocab_size: int, lengths: list[int], seed: int):
        if vocab_size < 4:
            raise ValueError(f"synthetic data needs a vocabulary of at least 4 tokens, got {vocab_size}")
        self.vocab_size, self.lengths, self.seed = vocab_size, lengths, seed
        self._zipf = list(itertools.accumulate(1.0 / (k + 1) for k in range(vocab_size)))

    def example(self, index: int) -> tuple[list[int], list[bool]]:
        rng = random.Random(f"{self.seed}/{index}")
        length = rng.randint(*self.lengths)
        motif = rng.choices(range(self.vocab_size), cum_weights=self._zipf, k=rng.randint(2, 12))
        tokens = (motif * (length // len(motif) + 1))[:length]
        return tokens, [True] * length

    # An endless lazy sequence, so the data package's index iterator (state {"index": i}) serves it.
    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> tuple[list[int], list[bool]]:
        return self.example(index)

    def iter_from(self, state: dict | None):
        return _IndexIterator(self, 0 if state is None else int(state["index"]))


def load_data_tokenizer(cfg: DataConfig):
    return load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None


def _source_stream(source, cfg: DataConfig, tokenizer, vocab_size: int, seed: int) -> Stream:
    if source.format == "synthetic":
        return SyntheticMotifs(vocab_size, source.synthetic_lengths, seed)
    if source.format == "jsonl":
        records = read_jsonl(source.path, on_error=cfg.on_error)
    elif source.format == "parquet":
        records = read_parquet(source.path, on_error=cfg.on_error)
    else:
        records = read_text_folder(source.path, on_error=cfg.on_error)
    if source.vision:
        # A record's own "fields" wins over the source's spec (LWM's fields_from_example).
        options = {} if source.max_frames is None else {"max_frames": source.max_frames}
        return encode_vision_source(records, source.fields, tokenizer, on_error=cfg.on_error, **options)
    return encode_source(records, source.fields, tokenizer, on_error=cfg.on_error)


def build_loader(cfg: DataConfig, stage: StageConfig, *, tokenizer, vocab_size: int, dp_rank: int, dp_size: int,
                 sp_rank: int, sp_size: int, seed: int, device) -> PackedLoader:
    streams = {f"{i}:{s.format}:{s.path}": _source_stream(s, cfg, tokenizer, vocab_size, cfg.seed + i)
               for i, s in enumerate(cfg.sources)}
    weights = {name: s.weight for name, s in zip(streams, cfg.sources)}
    mixture = Mixture(streams, weights, seed=cfg.seed, on_exhausted="restart")
    pad_id = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
    vision = any(s.vision for s in cfg.sources)
    return PackedLoader(mixture, stage.seq_len, stage.batch_size, dp_rank, dp_size, sp_rank, sp_size, seed=seed,
                        device=device, loss_weighting=cfg.loss_weighting, pad_id=pad_id, vision=vision)
