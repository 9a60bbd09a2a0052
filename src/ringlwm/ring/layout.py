"""The zigzag sequence layout of the ring.

The full sequence is cut into 2*W equal chunks; rank r holds chunks r and 2W-1-r, concatenated in that
order. Under a causal mask every rank then has the same amount of work: the early chunk r sees few keys,
the late chunk 2W-1-r many, and the sum is the same for all r. The local order is still increasing in
global position, so a causal mask over local indices is right for a rank's own block.

With Ulysses (``ringlwm.ring.ulysses``) each ring shard is further cut into ``ulysses`` equal contiguous
pieces, one per Ulysses rank: ``shard_sequence(x, dim, group=ring_group, ulysses_group=u_group)``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def sp_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def ulysses_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) in a Ulysses group; (0, 1) for None (no Ulysses: unlike the ring's group, None is not the
    world)."""
    return (0, 1) if group is None else sp_world(group)


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


def zigzag_positions(seq_len: int, rank: int, world_size: int, device=None, *, ulysses_rank: int = 0,
                     ulysses: int = 1) -> torch.Tensor:
    """Global positions (local_len,) of the tokens rank ``rank`` holds in the zigzag layout; with ``ulysses``
    ranks per ring rank, those of Ulysses rank ``ulysses_rank``'s piece of that shard (the 2-D layout)."""
    check_layout(seq_len, world_size, ulysses)
    if world_size > 1:
        chunk = seq_len // (2 * world_size)
        first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
        second = torch.arange((2 * world_size - 1 - rank) * chunk, (2 * world_size - rank) * chunk, device=device)
        positions = torch.cat([first, second])
    else:
        positions = torch.arange(seq_len, device=device)
    return positions.chunk(ulysses)[ulysses_rank] if ulysses > 1 else positions


def layout_unit(sp: int, ulysses: int = 1) -> int:
    """The smallest sequence length step of the 2-D layout: 2 * sp zigzag chunks (2 on one rank), each ring
    shard in ``ulysses`` equal pieces (Ulysses alone: ``ulysses`` pieces, no zigzag)."""
    return math.lcm(2 * sp if sp > 1 or ulysses == 1 else 1, sp * ulysses)


def check_layout(seq_len: int, sp: int, ulysses: int = 1, what: str = "sequence length") -> None:
    """``check_divisible`` for the 2-D layout: the zigzag over ``sp`` ring ranks, each ring shard cut into
    ``ulysses`` equal pieces. Names the lengths that work when ``seq_len`` is not one of them."""
    if sp > 1 or ulysses == 1:
        check_divisible(seq_len, sp, what)
    if ulysses > 1:
        unit = layout_unit(sp, ulysses)
        if seq_len % unit:
            lower, upper = seq_len - seq_len % unit, seq_len + unit - seq_len % unit
            hint = f"{upper}" if lower == 0 else f"{lower} or {upper}"
            raise ValueError(f"{what} {seq_len} cannot be spread over sp = {sp} ring x ulysses = {ulysses} ranks "
                             f"(each ring shard in {ulysses} equal pieces); use a multiple of {unit} (e.g. {hint})")


def ring_world(group, ulysses_group) -> tuple[int, int]:
    """(rank, size) in the ring of a 2-D layout. ``group`` None: the world without Ulysses (the ring's default),
    no ring at all (Ulysses alone) with a Ulysses group of several ranks."""
    if group is None and ulysses_world(ulysses_group)[1] > 1:
        return 0, 1
    return sp_world(group)


def shard_sequence(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None,
                   ulysses_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This rank's part of the full tensor ``x`` along ``dim`` (a contiguous copy): its zigzag shard in the ring
    ``group``, and with a ``ulysses_group`` its piece of that shard (Ulysses rank u: piece u of ulysses equal
    contiguous pieces; see ``ringlwm.ring.ulysses``).

    x: any shape with the full sequence (seq_len) along ``dim``; returns the same shape with local_len =
    seq_len / (sp * ulysses) along ``dim``.
    """
    (rank, world_size), (u_rank, ulysses) = ring_world(group, ulysses_group), ulysses_world(ulysses_group)
    dim = dim % x.dim()
    check_layout(x.shape[dim], world_size, ulysses)
    if world_size > 1:
        chunks = x.chunk(2 * world_size, dim=dim)
        x = torch.cat([chunks[rank], chunks[2 * world_size - 1 - rank]], dim=dim)
    if ulysses > 1:
        return x.chunk(ulysses, dim=dim)[u_rank].clone(memory_format=torch.contiguous_format)  # its own storage
    return x.contiguous() if world_size > 1 else x


def unshard_sequence(x_local: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None,
                     ulysses_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Gather every rank's part back into the full tensor, in sequence order (not differentiable)."""
    (_, world_size), (_, ulysses) = ring_world(group, ulysses_group), ulysses_world(ulysses_group)
    dim = dim % x_local.dim()
    if ulysses > 1:
        parts = [torch.empty_like(x_local) for _ in range(ulysses)]
        dist.all_gather(parts, x_local.contiguous(), group=ulysses_group)
        x_local = torch.cat(parts, dim=dim)
    if world_size == 1:
        return x_local
    if x_local.shape[dim] % 2:
        raise ValueError(f"a zigzag shard holds two equal chunks; local length {x_local.shape[dim]} is odd")
    parts = [torch.empty_like(x_local) for _ in range(world_size)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    chunks = [None] * (2 * world_size)
    for r, part in enumerate(parts):
        chunks[r], chunks[2 * world_size - 1 - r] = part.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)
