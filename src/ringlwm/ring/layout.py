"""The zigzag sequence layout of the ring.

The full sequence is cut into 2*W equal chunks; rank r holds chunks r and 2W-1-r, concatenated in that
order. Under a causal mask every rank then has the same amount of work: the early chunk r sees few keys,
the late chunk 2W-1-r many, and the sum is the same for all r. The local order is still increasing in
global position, so a causal mask over local indices is right for a rank's own block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def sp_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_divisible(seq_len: int, world_size: int, what: str = "sequence length") -> None:
    """The zigzag layout needs 2 * world_size equal chunks; say what length would work when it does not."""
    chunks = 2 * world_size
    if seq_len % chunks:
        lower, upper = seq_len - seq_len % chunks, seq_len + chunks - seq_len % chunks
        hint = f"{upper}" if lower == 0 else f"{lower} or {upper}"
        raise ValueError(
            f"{what} {seq_len} cannot be split into 2 * world_size = {chunks} equal zigzag chunks; "
            f"use a multiple of {chunks} (e.g. {hint}), padding with masked tokens"
        )


def zigzag_positions(seq_len: int, rank: int, world_size: int, device=None) -> torch.Tensor:
    """Global positions (local_len,) of the tokens rank ``rank`` holds in the zigzag layout."""
    check_divisible(seq_len, world_size)
    chunk = seq_len // (2 * world_size)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * world_size - 1 - rank) * chunk, (2 * world_size - rank) * chunk, device=device)
    return torch.cat([first, second])


def shard_sequence(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This rank's zigzag part of the full tensor ``x`` along ``dim`` (a contiguous copy).

    x: any shape with the full sequence (seq_len) along ``dim``; returns the same shape with local_len =
    seq_len / W along ``dim``.
    """
    rank, world_size = sp_world(group)
    dim = dim % x.dim()
    check_divisible(x.shape[dim], world_size)
    if world_size == 1:
        return x
    chunks = x.chunk(2 * world_size, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world_size - 1 - rank]], dim=dim).contiguous()


def unshard_sequence(x_local: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Gather every rank's zigzag part back into the full tensor, in sequence order (not differentiable)."""
    rank, world_size = sp_world(group)
    if world_size == 1:
        return x_local
    dim = dim % x_local.dim()
    if x_local.shape[dim] % 2:
        raise ValueError(f"a zigzag shard holds two equal chunks; local length {x_local.shape[dim]} is odd")
    parts = [torch.empty_like(x_local) for _ in range(world_size)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    chunks = [None] * (2 * world_size)
    for r, part in enumerate(parts):
        chunks[r], chunks[2 * world_size - 1 - r] = part.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)
