"""What the evaluations (needle, RULER) share: who writes, and how their token ids are fingerprinted."""

from __future__ import annotations

import hashlib
from array import array

import torch.distributed as dist


def is_rank0() -> bool:
    """The rank that writes results (one process: always)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def ids_fingerprint(*id_lists) -> str:
    """16 hex digits over token id lists (lengths and values): the same ids give the same fingerprint in any
    process, so a resumed evaluation can check that it tokenises as the run it resumes."""
    digest = hashlib.sha256()
    for ids in id_lists:
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(array("q", ids).tobytes())
    return digest.hexdigest()[:16]
