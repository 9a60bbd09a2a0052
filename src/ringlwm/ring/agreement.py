"""Batch agreement: the ranks of a sequence group must hold shards of one batch.

The ring attends the shards of its ranks as one sequence. Ranks that hold shards of *different* batches (a
sampler over the whole world instead of per data-parallel rank, as transformers' stock Trainer and TRL's
trainers make) run without any error and train on sequences that never existed. A collator that shards
(``ringlwm.hf.RingCollator``) therefore attaches ``sequence_fingerprint``: one int64 per row, a hash of the
row's full (unsharded) sequence, the same on every rank of the group when, and only when, they cut the same
batch. A model forward on the ring compares the fingerprints of its group once (``check_batch_agreement``:
one all_gather of two integers per rank and one host sync) and raises the same error on every rank when they
differ.

    batch["sequence_fingerprint"] = sequence_fingerprint(full_batch)   # before sharding: (rows,) int64
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from ringlwm.ring.comm import moves_host_memory
from ringlwm.ring.layout import sp_world

FINGERPRINT_KEY = "sequence_fingerprint"


def sequence_fingerprint(batch: dict) -> torch.Tensor:
    """(rows,) int64: for each row, a hash of every (rows, seq_len, ...) tensor of ``batch`` (the full sequences,
    before sharding), keys in sorted order. Equal batches give equal fingerprints in any process."""
    tensors = {key: torch.as_tensor(value) for key, value in sorted(batch.items())}
    rows = {t.shape[0] for t in tensors.values()}
    if len(rows) != 1:
        raise ValueError(f"sequence_fingerprint: the tensors must share their row count, got {sorted(rows)}")
    out = []
    for r in range(rows.pop()):
        digest = hashlib.blake2b(digest_size=8)
        for key, t in tensors.items():
            row = t[r].detach().cpu().contiguous()
            digest.update(f"{key}:{row.dtype}:{tuple(row.shape)}".encode())
            digest.update(row.numpy().tobytes())
        out.append(int.from_bytes(digest.digest(), "little", signed=True))
    return torch.tensor(out, dtype=torch.int64)


def check_batch_agreement(fingerprint: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """Raise ValueError on every rank of ``group`` when its ranks' ``sequence_fingerprint``s differ (shards of
    different batches). fingerprint: (rows,) int64 of this rank's batch. One process: nothing to check."""
    _, world_size = sp_world(group)
    if world_size == 1:
        return
    fingerprint = torch.as_tensor(fingerprint).reshape(-1).to(torch.int64)
    # Two integers per rank, whatever the batch: the row count and a position-weighted sum (int64 wraps).
    weights = torch.arange(1, 2 * fingerprint.numel(), 2, dtype=torch.int64, device=fingerprint.device)
    mine = torch.stack([torch.tensor(fingerprint.numel(), device=fingerprint.device), (fingerprint * weights).sum()])
    if moves_host_memory(group):
        mine = mine.cpu()
    elif mine.device.type == "cpu":
        mine = mine.to(torch.accelerator.current_accelerator())
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=group)
    values = [tuple(t.tolist()) for t in gathered]
    if len(set(values)) > 1:
        raise ValueError(
            f"the {world_size} ranks of this sequence group hold shards of different batches (sequence "
            f"fingerprints by rank: {[v[1] for v in values]}, rows {[v[0] for v in values]}); the ring would attend "
            "them as one sequence. Every rank of a sequence group must read the same examples and keep its own "
            "zigzag shard. Likely cause: a sampler over the whole world instead of per data-parallel rank "
            "(transformers.Trainer, TRL's trainers and accelerate's prepared loaders give each rank its own "
            "examples): use ringlwm.hf.RingTrainer / RingSFTTrainer, or a DistributedSampler(num_replicas="
            "sp.dp_size, rank=sp.dp_rank); the batches must be cut by ringlwm.hf.RingCollator"
        )
