"""Cross-rank agreement: the ranks of a ring make the same calls, on shards of one batch.

Call agreement: ``ring_attention`` checks its inputs locally, then, once per distinct call signature
(shapes, dtype, causal, scale, backend, grad needed), that every rank of the group agrees
(``check_call_agreement``: one all_gather of a small fixed-size buffer; agreed signatures are cached per
group). A rank whose inputs fail either check raises, and so does every other rank, with the same message.

Batch agreement: the ranks of a sequence group must hold shards of one batch.

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
import json
import weakref
from collections import OrderedDict

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
    mine = mine.to(_agreement_device(group))
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


def call_signature(q, k, v, segment_ids, causal, scale, backend, world_size) -> dict:
    """What must be the same on every rank of the ring: the blocks it moves (shapes, dtype, segment ids),
    the schedule (causal, world size), the math (scale, backend) and whether a backward ring will follow."""
    batch, heads, local_len, head_dim = q.shape
    return {
        "world_size": world_size,
        "batch": batch,
        "heads": heads,
        "kv_heads": k.shape[1],
        "local_len": local_len,
        "head_dim": head_dim,
        "dtype": str(q.dtype),
        "device": q.device.type,
        "causal": bool(causal),
        "scale": scale,
        "segment_ids": None if segment_ids is None else str(segment_ids.dtype),
        "backend": backend,
        "needs_grad": torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
    }


# Signatures every rank of a group has agreed on: group -> OrderedDict used as an LRU set. Ranks make the same
# calls in the same order, so they add and evict the same entries and skip the check on the same calls.
_AGREED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_AGREED_PER_GROUP = 256
_PAYLOAD_BYTES = 1024  # per rank: a JSON signature (~300 bytes) and, if the local check failed, its message


def _agreement_device(group) -> torch.device:
    """CPU where the group's backend can move CPU tensors (gloo, mpi, ucc, or a cpu:... mapping); else the
    current accelerator, as NCCL needs."""
    if moves_host_memory(group):
        return torch.device("cpu")
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.current_accelerator() is not None:
        return torch.device(accelerator.current_accelerator().type, accelerator.current_device_index())
    return torch.device("cuda", torch.cuda.current_device())


def any_rank(flag: bool, group) -> bool:
    """Whether ``flag`` holds on any rank of ``group`` (one all_reduce of one integer): a check that only some
    ranks can fail (their own shard) then raises on every rank, instead of leaving the others waiting."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return bool(flag)
    value = torch.tensor([int(bool(flag))], dtype=torch.int32, device=_agreement_device(group))
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def _encode(signature: dict | None, error: Exception | None, device: torch.device) -> torch.Tensor:
    error_field = None if error is None else [type(error).__name__, str(error)]
    data = json.dumps({"signature": signature, "error": error_field}).encode()
    if len(data) > _PAYLOAD_BYTES and error_field is not None:
        # Only the error message can be long; cut it to what fits.
        overflow = len(data) - _PAYLOAD_BYTES + 16
        error_field[1] = error_field[1][: max(0, len(error_field[1]) - overflow)] + " [...]"
        data = json.dumps({"signature": signature, "error": error_field}).encode()
    if len(data) > _PAYLOAD_BYTES:
        raise ValueError(f"ring_attention signature too long to check across ranks: {signature}")
    buf = torch.zeros(_PAYLOAD_BYTES, dtype=torch.uint8)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buf.to(device)


def _decode(buf: torch.Tensor) -> dict:
    return json.loads(bytes(buf.cpu().tolist()).rstrip(b"\0"))


def _rank_list(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"


def _rejection(errors: dict[int, list[str]], world_size: int) -> Exception:
    """One exception, the same on every rank, for local check failures on some ranks."""
    kinds = {kind for kind, _ in errors.values()}
    cls = TypeError if kinds == {"TypeError"} else ValueError
    messages = {message for _, message in errors.values()}
    if len(errors) == world_size and len(messages) == 1:
        return cls(messages.pop())  # every rank failed the same way: the plain local message
    by_message: dict[str, list[int]] = {}
    for rank, (_, message) in sorted(errors.items()):
        by_message.setdefault(message, []).append(rank)
    details = "; ".join(f"{_rank_list(ranks)}: {message}" for message, ranks in by_message.items())
    return cls(
        f"ring_attention inputs rejected on {len(errors)} of the {world_size} ranks of the group ({details}); "
        "every rank raises this error, since the ring cannot run without all of its ranks"
    )


def check_call_agreement(group, signature: dict | None, error: Exception | None, world_size: int) -> None:
    """One all_gather of every rank's signature (or local error); raises the same exception on every rank
    if any rank's local check failed or the signatures differ."""
    device = _agreement_device(group)
    mine = _encode(signature, error, device)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=group)
    payloads = [_decode(buf) for buf in gathered]
    errors = {rank: p["error"] for rank, p in enumerate(payloads) if p["error"] is not None}
    if errors:
        raise _rejection(errors, world_size)
    signatures = [p["signature"] for p in payloads]
    fields = list(dict.fromkeys(name for sig in signatures for name in sig))
    differing = []
    for name in fields:
        values = [sig.get(name) for sig in signatures]
        if len({json.dumps(value) for value in values}) > 1:
            differing.append(f"{name} {values}")
    if differing:
        raise ValueError(
            f"ring_attention inputs differ across the {world_size} ranks of the group: {'; '.join(differing)} "
            "(values by rank). Every rank must call ring_attention with its zigzag shard of the same batch "
            "(shard_sequence), the same dtype, head counts, segment_ids given or not, causal, scale and backend"
        )


def agree_once(group, signature: dict, world_size: int) -> None:
    """``check_call_agreement`` for ``signature`` unless the ranks of ``group`` agreed on it already (an LRU set
    per group: ranks make the same calls in the same order, so they add and evict the same entries)."""
    key = tuple(signature.values())
    resolved_group = group if group is not None else dist.group.WORLD
    agreed = _AGREED.get(resolved_group)
    if agreed is not None and key in agreed:
        agreed.move_to_end(key)
        return
    check_call_agreement(group, signature, None, world_size)
    agreed = _AGREED.setdefault(resolved_group, OrderedDict())
    agreed[key] = None
    if len(agreed) > _AGREED_PER_GROUP:
        agreed.popitem(last=False)
