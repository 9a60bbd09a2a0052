"""Data-parallel x sequence-parallel process groups for a Hugging Face training script.

    sp = setup_sequence_parallel(sp_size=2, model=model)   # after torch.distributed is up (the Trainer's
                                                          # TrainingArguments bring it up under torchrun)
    sp.sp_group, sp.dp_group, sp.sp_rank, sp.dp_rank      # and enable_ring(model, sp_group=sp.sp_group)

The world's ranks form ``dp_size = world / sp_size`` sequence groups of consecutive ranks (ranks 0..sp-1 hold
one sequence, and so on): the ring's point-to-point traffic stays between neighbours, on one node when
sp_size divides the GPUs per node. The data-parallel groups are the strided ranks that hold the same shard
position of different sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class SequenceParallel:
    """The degrees, this rank's coordinates and its groups (None on one process)."""

    sp_size: int
    dp_size: int
    sp_rank: int
    dp_rank: int
    sp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None

    @property
    def world_size(self) -> int:
        return self.sp_size * self.dp_size


def setup_sequence_parallel(sp_size: int, model: nn.Module | None = None, **ring_options) -> SequenceParallel:
    """Build the dp x sp groups over the initialised world (every rank must call this, in the same order as
    any other group creation), and with ``model`` put its attention on the ring over this rank's sequence
    group (``ringlwm.models.enable_ring``; ``ring_options`` go there). One process: sp_size must be 1."""
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else 1
    rank = dist.get_rank() if initialized else 0
    if sp_size < 1 or world % sp_size:
        raise ValueError(f"sp_size must divide the world size: world_size={world}, sp_size={sp_size} "
                         f"(dp_size would be {world / max(sp_size, 1):g}); choose sp_size among "
                         f"{[d for d in range(1, world + 1) if world % d == 0]}")
    dp_size = world // sp_size
    sp_group = dp_group = None
    if initialized:
        for d in range(dp_size):  # every rank creates every group, in one order
            group = dist.new_group(list(range(d * sp_size, (d + 1) * sp_size)))
            if d == rank // sp_size:
                sp_group = group
        for s in range(sp_size):
            group = dist.new_group(list(range(s, world, sp_size)))
            if s == rank % sp_size:
                dp_group = group
    sp = SequenceParallel(sp_size=sp_size, dp_size=dp_size, sp_rank=rank % sp_size, dp_rank=rank // sp_size,
                          sp_group=sp_group, dp_group=dp_group)
    if model is not None:
        from ringlwm.models import enable_ring

        enable_ring(model, sp_group=sp_group, **ring_options)
    return sp
