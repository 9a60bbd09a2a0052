"""RingCollator: a Hugging Face data collator that packs examples and hands each rank its zigzag shard.

    collator = RingCollator(sp, seq_len=4096)           # sp: ringlwm.hf.setup_sequence_parallel(...)
    batch = collator([{"input_ids": [...]}, {"input_ids": [...], "labels": [...]}])
    # input_ids, position_ids, segment_ids, shift_labels, labels: (rows, seq_len // sp_size), this rank's shard;
    # sequence_fingerprint: (rows,), a hash of each full row, which the model compares across its sequence group

Each example is one document: ``input_ids`` and optionally ``labels`` (transformers' meaning: unshifted,
-100 for tokens without loss; default: the input ids). Documents are placed greedily, in order, into rows of
``seq_len`` tokens (one row of all of them, padded to a multiple of 2 * sp_size, when seq_len is None);
positions restart at 0 per document; segment ids number the documents of a row, padding is -1. The targets
are shifted before sharding, inside each document (the last token of a document predicts nothing), and then
every tensor is cut into the zigzag shard of this rank's place in its sequence group.

``shift_labels`` are what the models use. ``labels`` carries the same targets: transformers' Trainer counts
``num_items_in_batch`` only for batches with labels (from ``shift_labels`` when present), and a model given
both uses ``shift_labels``.
"""

from __future__ import annotations

import torch

from ringlwm.constants import IGNORE_INDEX, PAD_SEGMENT
from ringlwm.data.loader import shard_batch
from ringlwm.ring.agreement import FINGERPRINT_KEY, sequence_fingerprint
from ringlwm.ring.layout import check_layout, layout_unit


class RingCollator:
    """Packs a list of examples into rows and shards them for one sequence-parallel rank (module docstring).

    sp: a ``SequenceParallel`` (or anything with ``sp_rank``/``sp_size``, and ``ulysses_rank``/``ulysses_size``
    for the 2-D layout). seq_len: row length, a multiple of the layout's unit (2 * sp_size, times ulysses_size;
    None: one row per batch, as long as the examples need). pad_id: the input id of padding.
    """

    def __init__(self, sp, seq_len: int | None = None, pad_id: int = 0):
        self.sp_rank, self.sp_size = int(sp.sp_rank), int(sp.sp_size)
        self.ulysses_rank, self.ulysses_size = int(getattr(sp, "ulysses_rank", 0)), int(getattr(sp, "ulysses_size", 1))
        self.unit = layout_unit(self.sp_size, self.ulysses_size)
        if seq_len is not None:
            check_layout(seq_len, self.sp_size, self.ulysses_size, "seq_len")
        self.seq_len, self.pad_id = seq_len, pad_id

    def _documents(self, examples):
        docs = []
        for i, example in enumerate(examples):
            ids = torch.as_tensor(example["input_ids"], dtype=torch.long).reshape(-1)
            labels = example.get("labels")
            labels = ids.clone() if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(-1)
            if labels.shape != ids.shape or ids.numel() == 0:
                raise ValueError(f"example {i}: input_ids ({ids.numel()}) and labels ({labels.numel()}) must be "
                                 "non-empty and of one length")
            if self.seq_len is not None and ids.numel() > self.seq_len:
                raise ValueError(f"example {i} has {ids.numel()} tokens, more than seq_len={self.seq_len}; "
                                 "truncate or split it first, or raise seq_len")
            targets = torch.full_like(labels, IGNORE_INDEX)
            targets[:-1] = labels[1:]
            docs.append((ids, targets))
        return docs

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        docs = self._documents(examples)
        rows, current, used = [], [], 0
        for ids, targets in docs:
            if self.seq_len is not None and current and used + ids.numel() > self.seq_len:
                rows.append(current)
                current, used = [], 0
            current.append((ids, targets))
            used += ids.numel()
        rows.append(current)
        chunk = self.unit
        length = self.seq_len or -(-max(sum(d[0].numel() for d in row) for row in rows) // chunk) * chunk
        out = {name: torch.full((len(rows), length), fill, dtype=torch.long) for name, fill in
               (("input_ids", self.pad_id), ("position_ids", 0), ("segment_ids", PAD_SEGMENT),
                ("shift_labels", IGNORE_INDEX))}
        for r, row in enumerate(rows):
            start = 0
            for d, (ids, targets) in enumerate(row):
                end = start + ids.numel()
                out["input_ids"][r, start:end] = ids
                out["position_ids"][r, start:end] = torch.arange(ids.numel())
                out["segment_ids"][r, start:end] = d
                out["shift_labels"][r, start:end] = targets
                start = end
        fingerprint = sequence_fingerprint(out)
        out = shard_batch(out, self.sp_rank, self.sp_size, self.ulysses_rank, self.ulysses_size)
        out["labels"] = out["shift_labels"]  # see the module docstring
        out[FINGERPRINT_KEY] = fingerprint  # the ring checks that its ranks cut one batch (ringlwm.ring.agreement)
        return out
