"""Packing: documents into full-length training sequences, with shifted labels, positions and segments.

    for seq in pack_documents(examples, seq_len=4096):   # examples: (token_ids, loss_mask) pairs
        seq["input_ids"], seq["labels"], seq["position_ids"], seq["segment_ids"]  # (seq_len,) int64
        seq["loss_weights"]                                                       # (seq_len,) float32

Placement (greedy, in order, never reordering documents), with ``split="long"`` (the default):
  * a document that fits in the space left goes there whole;
  * one that does not fit but fits in a sequence of its own ends the current sequence (padded) and starts
    the next: no short document is ever cut, and a context never starts mid-document;
  * one longer than seq_len starts a fresh sequence and is cut into consecutive pieces of seq_len; its
    last piece is followed by the next documents.
The price is padding at the end of a sequence that a document did not fit into; ``stats.pad_fraction``
reports it (documents much shorter than seq_len waste little, documents near seq_len / 2 the most).
``split="always"`` fills every sequence to the end instead, cutting whichever document crosses the
boundary (LWM's and Megatron's concatenate-and-chunk): no padding but at the very end, at the cost of
contexts that start mid-document. ``bench/data.py`` reports the padding of both on its corpus.

Each piece of a document in a sequence is one segment (ids 0, 1, ... in the sequence; padding is
segment -1), and its positions restart at 0, so a continuation piece also starts at position 0 and every
position is < seq_len.

Labels: the loss mask of an example marks trained *target* tokens (see ``fields.py``), so
labels[i] = token[i+1] when token i+1 is in the same document and mask[i+1] is set, else -100 (the last
token of a document, usually EOS, predicts nothing). The last token of a non-final piece predicts the
first token of the continuation (it has the context of its own piece), so cutting a document loses no
target; ``continuation_labels=False`` drops that target instead.

Loss weights (the model's loss is sum(w * CE) / sum(w) over the whole global batch):
  * "token" (default): w = mask value of the target (1.0 for a trained token). Every trained token counts
    the same, as in plain LM training and LWM's text stages; a float mask passes through unchanged.
    (LWM's 0.5 vision / 0.5 text weighting is not a token weight: ``RingLwmForCausalLM`` averages each
    modality's loss on its own and weights the two means.)
  * "example": the weights of each piece in a sequence are scaled to sum to 1, so a 20-token chat answer
    counts as much as a 20,000-token one instead of being drowned by it (useful for instruction mixes of
    very uneven lengths). Per piece, not per document: a book cut into pieces gives each piece one unit.

Vision tokens (``vision=True``, for ``RingLwmForCausalLM``): examples may also be (token_ids, loss_mask,
vision_mask) triples (``data/vision_tokens.py``; a plain pair is all text). Every sequence then also has
  * "vision_mask" (bool): input token i is a VQGAN code / frame token (vision embedding), not text;
  * "label_vision_mask" (bool): the target of position i, token i+1, is a vision token (vision head).
Both are False on padding, and they follow the tokens through splitting exactly like the labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from ringlwm.constants import IGNORE_INDEX, PAD_SEGMENT
from ringlwm.data.stream import Stream, as_stream

KEYS = ("input_ids", "labels", "position_ids", "segment_ids", "loss_weights")
VISION_KEYS = ("vision_mask", "label_vision_mask")  # bool; only with vision=True
LOSS_WEIGHTINGS = ("token", "example")
SPLITS = ("long", "always")


@dataclass
class PackingStats:
    sequences: int = 0
    documents: int = 0
    split_documents: int = 0  # documents cut into pieces
    tokens: int = 0  # document tokens placed (padding excluded)
    pad_tokens: int = 0
    loss_tokens: int = 0  # positions with a label

    @property
    def pad_fraction(self) -> float:
        total = self.tokens + self.pad_tokens
        return self.pad_tokens / total if total else 0.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class _Doc:
    """One example ready to place: ids, shifted labels and target weights (all (length,)), with vision=True
    the input and target vision masks (else None), how much of it is placed already, and the upstream
    position just before it was read (to re-read it on restore)."""

    __slots__ = ("ids", "labels", "weights", "vision", "label_vision", "length", "offset", "before")

    def __init__(self, ids, labels, weights, before, vision=None, label_vision=None):
        self.ids, self.labels, self.weights = ids, labels, weights
        self.vision, self.label_vision = vision, label_vision
        self.length, self.offset, self.before = len(ids), 0, before


def _prepare(example, index: int, before, vision: bool = False) -> _Doc:
    vision_mask = None
    try:
        if isinstance(example, (tuple, list)) and len(example) == 3 and not np.isscalar(example[0]):
            token_ids, loss_mask, vision_mask = example
        else:
            token_ids, loss_mask = example
    except (TypeError, ValueError):
        raise ValueError(f"example {index}: expected a (token_ids, loss_mask) pair or a (token_ids, loss_mask, "
                         f"vision_mask) triple, got {type(example).__name__}") from None
    ids = np.asarray(token_ids)
    mask = np.asarray(loss_mask, dtype=np.float32)
    if ids.ndim != 1 or mask.ndim != 1 or len(ids) != len(mask):
        raise ValueError(f"example {index}: token_ids {ids.shape} and loss_mask {mask.shape} must be 1-D of one length")
    if vision_mask is not None:
        vision_mask = np.asarray(vision_mask)
        if vision_mask.shape != ids.shape or vision_mask.dtype.kind not in "bui":
            raise ValueError(f"example {index}: vision_mask {vision_mask.shape} must be booleans of the length of "
                             f"token_ids {ids.shape}")
        vision_mask = vision_mask.astype(bool)
        if not vision and vision_mask.any():
            raise ValueError(f"example {index} has vision tokens: pack with vision=True (PackedSequences, "
                             "PackedLoader) so that the vision masks reach the model")
    if len(ids) == 0:
        raise ValueError(f"example {index} is empty (no tokens)")
    if ids.dtype.kind not in "iu" or int(ids.min()) < 0:
        raise ValueError(f"example {index}: token ids must be non-negative integers")
    if not np.isfinite(mask).all() or (mask < 0).any():
        raise ValueError(f"example {index}: loss_mask must be booleans or non-negative finite weights")
    ids = ids.astype(np.int64, copy=False)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(mask[1:] > 0, ids[1:], IGNORE_INDEX)
    weights = np.zeros(len(ids), dtype=np.float32)
    weights[:-1] = mask[1:]
    if not vision:
        return _Doc(ids, labels, weights, before)
    if vision_mask is None:
        vision_mask = np.zeros(len(ids), dtype=bool)
    label_vision = np.zeros(len(ids), dtype=bool)
    label_vision[:-1] = vision_mask[1:]
    return _Doc(ids, labels, weights, before, vision_mask, label_vision)


class _PackIterator:
    def __init__(self, config: PackedSequences, examples: Iterator, state: dict | None = None):
        self.config = config
        self._examples = examples
        self._resumable = callable(getattr(examples, "state_dict", None))
        self._pending: _Doc | None = None
        self._index = -1  # examples read by this iterator (for error messages)
        self.stats = PackingStats()
        self._positions = np.arange(config.seq_len, dtype=np.int64)
        if state:
            self.stats.load_state_dict(state["stats"])
            if state["offset"]:
                self._pending = self._read()
                if self._pending is None or self._pending.length <= state["offset"]:
                    raise ValueError("packing state does not match the examples: the split document is gone")
                self._pending.offset = state["offset"]

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        """Upstream position before the document being placed, how much of it is placed, and the stats."""
        if not self._resumable:
            raise TypeError("packing over a plain iterator cannot be saved; pack a stream (PackedSequences)")
        pending = self._pending
        return {
            "examples": pending.before if pending is not None else self._examples.state_dict(),
            "offset": pending.offset if pending is not None else 0,
            "stats": self.stats.state_dict(),
        }

    def _read(self) -> _Doc | None:
        before = self._examples.state_dict() if self._resumable else None
        example = next(self._examples, None)
        if example is None:
            return None
        self._index += 1
        return _prepare(example, self._index, before, self.config.vision)

    def __next__(self) -> dict[str, np.ndarray]:
        seq_len = self.config.seq_len
        pieces: list[tuple[_Doc, int, int]] = []
        space = seq_len
        while space > 0:
            doc = self._pending if self._pending is not None else self._read()
            if doc is None:
                break
            self._pending = doc
            if doc.offset == 0 and doc.length <= space:
                pieces.append((doc, 0, doc.length))
                space -= doc.length
                self._pending = None
                self.stats.documents += 1
            elif pieces and self.config.split == "long":
                break  # it starts the next sequence
            else:
                # A piece: of a document longer than seq_len at the start of a sequence, of the continuation
                # of one, or (split="always") of whatever document crosses the end of the sequence.
                if doc.offset == 0:
                    self.stats.documents += 1
                    self.stats.split_documents += 1
                end = min(doc.length, doc.offset + space)
                pieces.append((doc, doc.offset, end))
                space -= end - doc.offset
                doc.offset = end
                if end == doc.length:
                    self._pending = None
        if not pieces:
            raise StopIteration
        return self._emit(pieces, space)

    def _emit(self, pieces, num_pad: int) -> dict[str, np.ndarray]:
        cfg = self.config
        ids, labels, positions, segments, weights = [], [], [], [], []
        vision, label_vision = [], []
        for segment, (doc, start, end) in enumerate(pieces):
            n = end - start
            lab, w = doc.labels[start:end], doc.weights[start:end]
            if end < doc.length and not cfg.continuation_labels:
                lab, w = lab.copy(), w.copy()
                lab[-1], w[-1] = IGNORE_INDEX, 0.0
            if cfg.loss_weighting == "example" and w.sum() > 0:
                w = w / w.sum()
            ids.append(doc.ids[start:end])
            labels.append(lab)
            weights.append(w)
            positions.append(self._positions[:n])
            segments.append(np.full(n, segment, dtype=np.int64))
            if cfg.vision:
                vision.append(doc.vision[start:end])
                label_vision.append(doc.label_vision[start:end])
        if num_pad:
            ids.append(np.full(num_pad, cfg.pad_id, dtype=np.int64))
            labels.append(np.full(num_pad, IGNORE_INDEX, dtype=np.int64))
            weights.append(np.zeros(num_pad, dtype=np.float32))
            positions.append(self._positions[:num_pad])  # padding is a segment of its own, positions from 0
            segments.append(np.full(num_pad, PAD_SEGMENT, dtype=np.int64))
            if cfg.vision:
                vision.append(np.zeros(num_pad, dtype=bool))
                label_vision.append(np.zeros(num_pad, dtype=bool))
        out = {
            "input_ids": np.concatenate(ids),
            "labels": np.concatenate(labels),
            "position_ids": np.concatenate(positions),
            "segment_ids": np.concatenate(segments),
            "loss_weights": np.concatenate(weights).astype(np.float32, copy=False),
        }
        if cfg.vision:
            out["vision_mask"] = np.concatenate(vision)
            out["label_vision_mask"] = np.concatenate(label_vision)
        self.stats.sequences += 1
        self.stats.tokens += cfg.seq_len - num_pad
        self.stats.pad_tokens += num_pad
        self.stats.loss_tokens += int((out["labels"] != IGNORE_INDEX).sum())
        return out


class PackedSequences(Stream):
    """The packed sequences of an example stream, as a resumable stream (what ``PackedLoader`` reads).

    examples: a stream (``encode_source``, ``Mixture``), a list, or a factory; see ``pack_documents`` for
    the rest. A saved state holds the upstream position of the document being placed and its offset, so
    a restore re-reads (and re-tokenizes) at most that one document. vision: also emit the bool
    ``VISION_KEYS`` masks (see the module docstring).
    """

    def __init__(self, examples, seq_len: int, *, loss_weighting: str = "token", pad_id: int = 0,
                 continuation_labels: bool = True, split: str = "long", vision: bool = False):
        if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
        if not isinstance(pad_id, (int, np.integer)) or pad_id < 0:
            raise ValueError(f"pad_id must be a non-negative token id, got {pad_id!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.examples = as_stream(examples) if examples is not None else None
        self.seq_len, self.loss_weighting = int(seq_len), loss_weighting
        self.pad_id, self.continuation_labels, self.split = int(pad_id), bool(continuation_labels), split
        self.vision = bool(vision)

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys of every packed sequence."""
        return KEYS + VISION_KEYS if self.vision else KEYS

    def iter_from(self, state: dict | None) -> _PackIterator:
        return _PackIterator(self, self.examples.iter_from(state["examples"] if state else None), state)


def pack_documents(
    examples: Iterable[tuple],
    seq_len: int,
    *,
    loss_weighting: str = "token",
    pad_id: int = 0,
    continuation_labels: bool = True,
    split: str = "long",
    vision: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Pack (token_ids, loss_mask) examples, in order, into sequences of exactly ``seq_len`` tokens.

    examples: any iterable (a generator too) of pairs of equal-length sequences: int token ids and bool
    (or non-negative float) loss masks, as from ``encode_example``. Yields dicts of the ``KEYS`` arrays,
    each (seq_len,): input_ids, labels, position_ids, segment_ids int64; loss_weights float32. The last
    sequence is padded (pad_id, label -100, weight 0, segment -1). loss_weighting ("token", "example"),
    continuation_labels and split ("long", "always"): see the module docstring. vision: examples may be
    (token_ids, loss_mask, vision_mask) triples, and every sequence also has the bool ``VISION_KEYS`` arrays.
    """
    config = PackedSequences(None, seq_len, loss_weighting=loss_weighting, pad_id=pad_id,
                             continuation_labels=continuation_labels, split=split, vision=vision)
    return _PackIterator(config, iter(examples))
