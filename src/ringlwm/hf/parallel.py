"""Data-parallel x sequence-parallel process groups for a Hugging Face training script.

    sp = setup_sequence_parallel(sp_size=2, model=model)   # after torch.distributed is up (the Trainer's
                                                          # TrainingArguments bring it up under torchrun)
    sp.sp_group, sp.dp_group, sp.sp_rank, sp.dp_rank      # and enable_ring(model, sp_group=sp.sp_group)
    sp = setup_sequence_parallel(sp_size=2, ulysses_size=4, model=model)   # the 2-D layout: Ulysses x ring

The world's ranks form ``dp_size = world / (sp_size * ulysses_size)`` sequence groups of consecutive ranks
(ranks 0..sp*ulysses-1 hold one sequence, and so on): rank = (dp_rank * sp_size + sp_rank) * ulysses_size +
ulysses_rank. The Ulysses groups (innermost, adjacent ranks) keep the all-to-all on one node; the ring's
point-to-point traffic goes between Ulysses groups. The data-parallel groups are the strided ranks that hold
the same part of different sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import nn

from ringlwm.ring.ulysses import register_sequence_group


@dataclass(frozen=True)
class SequenceParallel:
    """The degrees, this rank's coordinates and its groups (None on one process). ``sp_group``: the ring;
    ``ulysses_group``: the Ulysses all-to-all (None when ulysses_size is 1); ``sequence_group``: every rank of
    the sequence (both)."""

    sp_size: int
    dp_size: int
    sp_rank: int
    dp_rank: int
    sp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    ulysses_size: int = 1
    ulysses_rank: int = 0
    ulysses_group: dist.ProcessGroup | None = None
    sequence_group: dist.ProcessGroup | None = None

    @property
    def sequence_size(self) -> int:
        """The ranks that hold one sequence: sp_size * ulysses_size."""
        return self.sp_size * self.ulysses_size

    @property
    def world_size(self) -> int:
        return self.sequence_size * self.dp_size


def setup_sequence_parallel(sp_size: int, model: nn.Module | None = None, *, ulysses_size: int = 1,
                            **ring_options) -> SequenceParallel:
    """Build the dp x sp (x ulysses) groups over the initialised world (every rank must call this, in the same
    order as any other group creation), and with ``model`` put its attention on the ring over this rank's
    groups (``ringlwm.models.enable_ring``; ``ring_options`` go there). One process: both sizes must be 1."""
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else 1
    rank = dist.get_rank() if initialized else 0
    per_sequence = sp_size * ulysses_size
    if sp_size < 1 or ulysses_size < 1 or world % per_sequence:
        raise ValueError(f"sp_size * ulysses_size must divide the world size: world_size={world}, sp_size={sp_size}, "
                         f"ulysses_size={ulysses_size}; sp_size * ulysses_size among "
                         f"{[d for d in range(1, world + 1) if world % d == 0]}")
    dp_size = world // per_sequence
    dp_rank, inner = divmod(rank, per_sequence)
    sp_rank, ulysses_rank = divmod(inner, ulysses_size)
    groups = {"sp": None, "dp": None, "ulysses": None, "sequence": None}
    if initialized:
        def make(name: str, ranks: list[int]) -> None:  # every rank creates every group, in one order
            group = dist.new_group(ranks)
            if rank in ranks:
                groups[name] = group

        for d in range(dp_size):
            base = d * per_sequence
            if ulysses_size > 1 and sp_size > 1:
                make("sequence", list(range(base, base + per_sequence)))
            for u in range(ulysses_size):
                make("sp", [base + s * ulysses_size + u for s in range(sp_size)])
            if ulysses_size > 1:
                for s in range(sp_size):
                    make("ulysses", [base + s * ulysses_size + u for u in range(ulysses_size)])
        for i in range(per_sequence):
            make("dp", list(range(i, world, per_sequence)))
    if groups["sequence"] is None:
        groups["sequence"] = groups["ulysses"] if ulysses_size > 1 else groups["sp"]
    sp = SequenceParallel(sp_size=sp_size, dp_size=dp_size, sp_rank=sp_rank, dp_rank=dp_rank, sp_group=groups["sp"],
                          dp_group=groups["dp"], ulysses_size=ulysses_size, ulysses_rank=ulysses_rank,
                          ulysses_group=groups["ulysses"], sequence_group=groups["sequence"])
    if groups["ulysses"] is not None and sp_size > 1:
        register_sequence_group(groups["sp"], groups["ulysses"], groups["sequence"])
    if model is not None:
        from ringlwm.models import enable_ring

        enable_ring(model, sp_group=groups["sp"], ulysses_group=groups["ulysses"], **ring_options)
    return sp
