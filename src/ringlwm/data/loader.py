"""PackedLoader: this rank's batches of packed sequences, zigzag-sharded, resumable from a small state.

    loader = PackedLoader(mixture, seq_len=32768, batch_size=1, dp_rank=dp, dp_size=DP, sp_rank=sp, sp_size=SP)
    for batch in loader:          # input_ids, labels, position_ids, segment_ids: (batch_size, seq_len // SP)
        ...                       # int64; loss_weights float32; already in this rank's zigzag layout
                                  # vision=True adds vision_mask, label_vision_mask (bool), sharded alike
    state = loader.state_dict()   # small, picklable; the same on every rank

Which rank gets what: every rank runs the same deterministic pipeline and numbers the packed sequences
0, 1, 2, ... (the *global* sequence index). A step consumes batch_size * dp_size of them; global
sequence i goes to data-parallel rank i % dp_size. So the dp ranks see disjoint sequences, all
sequence-parallel ranks of one dp rank see the same sequences (and keep their own zigzag part), and the
loader's state after a step is identical on every rank: save it from any one rank. A restore may even use
another dp_size or batch_size (the global numbering just continues); seq_len and the stream must match.

The stream ends at the last *full* global batch: a partial one is dropped, because a rank that ran out
one step before the others would hang the collectives of the step it skipped.

Cost: each dp rank tokenizes and packs the whole stream and keeps 1/dp_size of it (sequences for the
other ranks are built and dropped); ``bench/data.py`` measures the tokens/s this leaves per core. A
restore re-reads at most the document being placed (or, for a factory without resumable state, replays
every example consumed: O(corpus so far); see ``stream.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ringlwm.data.packing import PackedSequences
from ringlwm.data.stream import Stream, as_stream
from ringlwm.ring.layout import check_layout, zigzag_positions

STATE_VERSION = 1


def shard_batch(batch: dict, sp_rank: int, sp_size: int, ulysses_rank: int = 0,
                ulysses_size: int = 1) -> dict[str, torch.Tensor]:
    """This sequence-parallel rank's zigzag part of every tensor in ``batch`` (no process group needed).

    batch: dict of (batch, seq_len, ...) tensors or arrays with the full sequence along dim 1; returns
    (batch, seq_len // sp_size, ...) tensors holding chunks sp_rank and 2 * sp_size - 1 - sp_rank of the
    2 * sp_size equal chunks, in that order (``ringlwm.ring.layout``). With ``ulysses_size`` > 1 (the 2-D
    layout, ``ringlwm.ring.ulysses``): piece ``ulysses_rank`` of ``ulysses_size`` equal pieces of that shard,
    (batch, seq_len // (sp_size * ulysses_size), ...).
    """
    if not 0 <= sp_rank < sp_size:
        raise ValueError(f"sp_rank must be in [0, sp_size = {sp_size}), got {sp_rank}")
    if not 0 <= ulysses_rank < ulysses_size:
        raise ValueError(f"ulysses_rank must be in [0, ulysses_size = {ulysses_size}), got {ulysses_rank}")
    parts = sp_size * ulysses_size
    out = {}
    index = None
    for key, value in batch.items():
        t = torch.as_tensor(value)
        if t.dim() < 2:
            raise ValueError(f"{key}: expected (batch, seq_len, ...), got shape {tuple(t.shape)}")
        if parts > 1:
            if index is None or index.numel() * parts != t.shape[1] or index.device != t.device:
                index = zigzag_positions(t.shape[1], sp_rank, sp_size, device=t.device, ulysses_rank=ulysses_rank,
                                         ulysses=ulysses_size)
            t = t.index_select(1, index)
        out[key] = t
    return out


class PackedLoader:
    """Batches of packed, zigzag-sharded sequences for one (dp_rank, sp_rank); see the module docstring.

    examples: a stream of (token_ids, loss_mask) examples (``Mixture``, ``encode_source``), a list, or a
    factory ``seed -> iterable of examples``; a factory that returns a resumable stream (e.g. a
    ``Mixture`` built with that seed) restores in O(1), one that returns a plain iterable replays.
    seq_len: the full (global) sequence length, a multiple of 2 * sp_size. ulysses_rank, ulysses_size: the 2-D
    layout (``shard_batch``), each rank's piece of its ring shard. batch_size: sequences per dp
    rank per step. seed: passed to a factory; recorded in the state and checked on restore.
    device: where the batches go (CPU tensors when None). loss_weighting, pad_id, continuation_labels,
    split, vision: see ``packing.py`` (vision=True for ``RingLwmForCausalLM``: the examples may carry
    vision masks, and every batch has the ``VISION_KEYS`` tensors too).
    """

    def __init__(self, examples, seq_len: int, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 sp_rank: int = 0, sp_size: int = 1, seed: int = 0, device: torch.device | str | None = None, *,
                 loss_weighting: str = "token", pad_id: int = 0, continuation_labels: bool = True, split: str = "long",
                 vision: bool = False, ulysses_rank: int = 0, ulysses_size: int = 1):
        for name, value in (("batch_size", batch_size), ("dp_size", dp_size), ("sp_size", sp_size),
                            ("ulysses_size", ulysses_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size = {dp_size}), got {dp_rank}")
        if not 0 <= sp_rank < sp_size:
            raise ValueError(f"sp_rank must be in [0, sp_size = {sp_size}), got {sp_rank}")
        if not 0 <= ulysses_rank < ulysses_size:
            raise ValueError(f"ulysses_rank must be in [0, ulysses_size = {ulysses_size}), got {ulysses_rank}")
        check_layout(seq_len, sp_size, ulysses_size, "seq_len")
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.dp_rank, self.dp_size, self.sp_rank, self.sp_size = dp_rank, dp_size, sp_rank, sp_size
        self.ulysses_rank, self.ulysses_size = ulysses_rank, ulysses_size
        self.device = torch.device(device) if device is not None else None
        self.stream = self._make_stream(examples)
        self.packed = PackedSequences(self.stream, seq_len, loss_weighting=loss_weighting, pad_id=pad_id,
                                      continuation_labels=continuation_labels, split=split, vision=vision)
        self._it = self.packed.iter_from(None)
        self._sequences = 0  # global sequences consumed
        self._batches = 0

    def _make_stream(self, examples) -> Stream:
        if callable(examples) and not hasattr(examples, "iter_from"):
            made = examples(self.seed)
            if isinstance(made, Iterator):  # one-shot: replay the factory on restore
                return as_stream(lambda: examples(self.seed))
            return as_stream(made)
        return as_stream(examples)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        """The next batch: KEYS (and with vision, VISION_KEYS) -> (batch_size, seq_len // sp_size) tensors."""
        mine = []
        step = self.batch_size * self.dp_size
        for j in range(step):
            seq = next(self._it, None)
            if seq is None:
                self._sequences += j
                raise StopIteration  # a partial global batch is dropped (see the module docstring)
            if (self._sequences + j) % self.dp_size == self.dp_rank:
                mine.append(seq)
        self._sequences += step
        self._batches += 1
        batch = {key: torch.from_numpy(np.stack([s[key] for s in mine])) for key in self.packed.keys}
        batch = shard_batch(batch, self.sp_rank, self.sp_size, self.ulysses_rank, self.ulysses_size)
        if self.device is not None:
            batch = {k: v.to(self.device) for k, v in batch.items()}
        return batch

    def state_dict(self) -> dict:
        """Picklable position after the last batch yielded: counters and upstream offsets, no token data."""
        return {
            "version": STATE_VERSION,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "split": self.packed.split,
            "vision": self.packed.vision,
            "sequences": self._sequences,
            "batches": self._batches,
            "packer": self._it.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from ``state_dict`` of a loader over the same stream, seq_len, seed, split
        and vision)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}; this loader reads {STATE_VERSION}")
        mine = {"seq_len": self.seq_len, "seed": self.seed, "split": self.packed.split, "vision": self.packed.vision}
        for key, value in mine.items():
            saved = state.get(key, False) if key == "vision" else state[key]  # states from before vision: text
            if saved != value:
                raise ValueError(f"loader state was saved with {key}={saved!r}, this loader has {value!r}: "
                                 "the packed sequences would differ")
        self._it = self.packed.iter_from(state["packer"])
        self._sequences, self._batches = state["sequences"], state["batches"]

    @property
    def stats(self) -> dict:
        """Batches and global sequences consumed, packing counters (tokens, padding, documents), and the
        stream's own stats (skips by reason per source, mixture draws and epochs) when it has them."""
        return {
            "batches": self._batches,
            "sequences": self._sequences,
            "packing": self._it.stats,
            "stream": getattr(self.stream, "stats", None),
        }
