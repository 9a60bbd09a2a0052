"""Synthetic motif documents: deterministic per (seed, index), resumable from an index, in range."""

from __future__ import annotations

import itertools

import pytest

from ringlwm.data import SyntheticMotifs


def test_examples_are_motifs_in_range_and_resume_exactly():
    stream = SyntheticMotifs(50, [8, 40], seed=3)
    it = iter(stream)
    first = list(itertools.islice(it, 5))
    state = it.state_dict()
    assert state == {"index": 5}
    rest = list(itertools.islice(it, 5))
    assert list(itertools.islice(stream.iter_from(state), 5)) == rest
    assert list(itertools.islice(SyntheticMotifs(50, [8, 40], seed=3), 5)) == first  # same seed, same data
    assert list(itertools.islice(SyntheticMotifs(50, [8, 40], seed=4), 5)) != first
    for tokens, mask in first + rest:
        assert 8 <= len(tokens) <= 40 and mask == [True] * len(tokens)
        assert all(0 <= t < 50 for t in tokens)


def test_vocabulary_too_small():
    with pytest.raises(ValueError, match="at least 4 tokens"):
        SyntheticMotifs(3, [8, 40], seed=0)
