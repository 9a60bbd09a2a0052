"""Synthetic documents for smoke tests and the tiny recipe: no files, no tokenizer.

    examples = SyntheticMotifs(vocab_size=256, lengths=[32, 400], seed=0)   # endless (token_ids, loss_mask)

Each document is a random motif of 2-12 tokens repeated to a random length in ``lengths`` (inclusive),
tokens drawn from a Zipf distribution over the vocabulary. A model first learns the skewed unigram
statistics (a quick, reliable drop in loss), then can only do better by attending back to the motif.
"""

from __future__ import annotations

import itertools
import random
import sys

from ringlwm.data.stream import Stream, _IndexIterator


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

    # An endless lazy sequence, so the index iterator of ListStream (state {"index": i}) serves it.
    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> tuple[list[int], list[bool]]:
        return self.example(index)

    def iter_from(self, state: dict | None):
        return _IndexIterator(self, 0 if state is None else int(state["index"]))
