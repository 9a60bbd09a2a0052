"""Resumable streams: iterables whose position can be saved in a small dict and restored.

Every stage of the pipeline (source -> encoded examples -> mixture -> packed sequences) is a stream
with ``iter_from(state)``: ``iter_from(None)`` starts at the beginning, and the iterator it returns has
``state_dict()``, the position of the *next* item it will yield. ``stream.iter_from(it.state_dict())``
yields exactly what ``it`` would have yielded from there on. A stage's state holds its upstream's state,
so the loader's checkpoint is one nested dict of offsets and counters, never data.

What a restore costs depends on the bottom of the chain: a JSONL or text-folder source seeks (O(1)), a
Parquet source re-reads record batches up to the saved row without making Python records of them, a
list indexes. A plain callable that returns a fresh iterable (``ReplayStream``) can only be replayed:
its state is the number of items consumed, and a restore re-reads and drops them (O(items so far));
correct, but slow on a large corpus.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class StatefulIterator(Protocol):
    def __next__(self) -> Any: ...

    def state_dict(self) -> dict:
        """Picklable position of the next item."""
        ...


class Stream:
    """Base of the resumable streams: ``iter(stream)`` starts over; ``iter_from(state)`` resumes."""

    def iter_from(self, state: dict | None) -> StatefulIterator:
        raise NotImplementedError

    def __iter__(self) -> StatefulIterator:
        return self.iter_from(None)


class _IndexIterator:
    def __init__(self, items: Sequence, index: int):
        self._items, self._index = items, index

    def __iter__(self):
        return self

    def __next__(self):
        if self._index >= len(self._items):
            raise StopIteration
        self._index += 1
        return self._items[self._index - 1]

    def state_dict(self) -> dict:
        return {"index": self._index}


class ListStream(Stream):
    """An in-memory sequence of items; the state is an index."""

    def __init__(self, items: Sequence):
        self.items = items

    def iter_from(self, state: dict | None) -> _IndexIterator:
        return _IndexIterator(self.items, state["index"] if state else 0)


class _CountingIterator:
    def __init__(self, it: Iterator, consumed: int):
        self._it, self._consumed = it, consumed

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._it)
        self._consumed += 1
        return item

    def state_dict(self) -> dict:
        return {"consumed": self._consumed}


class ReplayStream(Stream):
    """Items of ``factory()``, a callable returning a fresh iterable each time (e.g. a generator function).

    A restore calls the factory again and drops the items already consumed: O(items so far).
    """

    def __init__(self, factory: Callable[[], Iterable]):
        self.factory = factory

    def iter_from(self, state: dict | None) -> _CountingIterator:
        consumed = state["consumed"] if state else 0
        it = iter(self.factory())
        if consumed:
            # islice drops the first `consumed` items without keeping them.
            next(itertools.islice(it, consumed, consumed), None)
        return _CountingIterator(it, consumed)


def as_stream(obj: Any, what: str = "examples") -> Stream:
    """A resumable stream from a stream, a list/tuple, or a zero-argument factory returning an iterable.

    A one-shot iterator (a generator object, ``iter(...)``) can be neither restarted nor resumed, so it is
    refused: pass the generator *function* (a factory) instead.
    """
    if isinstance(obj, Stream) or hasattr(obj, "iter_from"):
        return obj
    if isinstance(obj, (list, tuple)):
        return ListStream(obj)
    if callable(obj):
        return ReplayStream(obj)
    if isinstance(obj, Iterator):
        raise TypeError(
            f"{what}: a one-shot iterator ({type(obj).__name__}) can be neither restarted nor resumed; pass a "
            "list, a factory (a callable returning a fresh iterable, e.g. the generator function), or a stream"
        )
    if isinstance(obj, Iterable):
        return ReplayStream(lambda: obj)  # re-iterable (iter(obj) starts over each time)
    raise TypeError(f"{what}: expected a stream, a list, or a factory, got {type(obj).__name__}")
