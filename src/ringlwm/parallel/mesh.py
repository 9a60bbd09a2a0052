"""The device mesh: data parallel (replicate), FSDP (shard) and sequence parallel (the ring, and Ulysses).

    dims = ParallelDims(dp_replicate=1, dp_shard=-1, sp=2, world_size=4)   # -1: whatever is left
    mesh, fsdp_mesh = dims.build_mesh("cpu")   # the root mesh, and what FSDP2 shards over
    sp_group = mesh["sp"].get_group()          # the ring
    dims = ParallelDims(1, -1, sp=2, world_size=8, ulysses=2)   # the 2-D layout: mesh["ulysses"] too

``sp`` (sequence parallelism: the ring) is what torchtitan calls ``cp`` (context parallelism); ``ulysses``
is the all-to-all degree inside each ring rank (``ringlwm.ring.ulysses``).
Axes, outermost first: ("dp_replicate", "dp_shard", "sp", "ulysses"). Ranks of one Ulysses group are
adjacent (the all-to-all stays on one node), then the ring's. Parameters are sharded over dp_shard, sp and
ulysses jointly (as LWM shards over (fsdp, sp)): the FSDP mesh is (dp_replicate, dp_shard x sp x ulysses),
HSDP when dp_replicate > 1.
It is built beside the root mesh rather than sliced out of it, which torch is deprecating for
flattened dims. Every rank of one sp group reads the same sequences; the data-parallel
index is dp_replicate_index * dp_shard + dp_shard_index.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ringlwm.ring.ulysses import register_sequence_group

AXES = ("dp_replicate", "dp_shard", "sp", "ulysses")


@dataclass
class ParallelDims:
    """Degrees of the four mesh axes; one of dp_replicate / dp_shard may be -1 (fill the world)."""

    dp_replicate: int = 1
    dp_shard: int = -1
    sp: int = 1
    world_size: int = 1
    ulysses: int = 1

    def __post_init__(self):
        for name in ("dp_replicate", "dp_shard", "sp", "ulysses"):
            value = getattr(self, name)
            if value == 0 or value < -1 or (name in ("sp", "ulysses") and value == -1):
                raise ValueError(f"{name} must be a positive degree (or -1 for dp_replicate/dp_shard), got {value}")
        if self.dp_replicate == -1 and self.dp_shard == -1:
            raise ValueError("only one of dp_replicate and dp_shard can be -1")
        fixed = self.sp * self.ulysses * max(self.dp_replicate, 1) * max(self.dp_shard, 1)
        if self.world_size % fixed:
            raise ValueError(self._mismatch(f"world size {self.world_size} is not divisible by the fixed degrees"))
        if self.dp_replicate == -1:
            self.dp_replicate = self.world_size // fixed
        elif self.dp_shard == -1:
            self.dp_shard = self.world_size // fixed
        if self.dp_replicate * self.dp_shard * self.sp * self.ulysses != self.world_size:
            raise ValueError(self._mismatch("the degrees must multiply to the world size"))

    def _mismatch(self, why: str) -> str:
        per_sequence = [d for d in range(1, self.world_size + 1) if self.world_size % d == 0]
        return (f"{why}: dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x sp={self.sp} x "
                f"ulysses={self.ulysses} vs world_size={self.world_size}; sp x ulysses (x a fixed dp) must divide "
                f"it: one of {per_sequence}")

    @property
    def dp(self) -> int:
        """Number of data-parallel replicas of the sequence stream (distinct batches per step)."""
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
        """(the root mesh (dp_replicate, dp_shard, sp, ulysses), the FSDP mesh (dp_replicate?, dp_shard x sp x
        ulysses)). With both sp and ulysses above 1, the group of every rank of a sequence (ring x Ulysses) is
        made here too, for ``ringlwm.ring.sequence_group``."""
        mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.sp, self.ulysses),
                                mesh_dim_names=AXES)
        if self.dp_replicate == 1:
            fsdp_mesh = mesh[("dp_shard", "sp", "ulysses")]._flatten("dp_shard_sp")
        else:
            # Same row-major rank layout as the root mesh, so shard groups are its (dp_shard, sp, ulysses) blocks.
            fsdp_mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard * self.sp * self.ulysses),
                                         mesh_dim_names=("dp_replicate", "dp_shard_sp"))
        if self.sp > 1 and self.ulysses > 1:
            sequence = mesh[("sp", "ulysses")]._flatten("sp_ulysses")
            register_sequence_group(mesh["sp"].get_group(), mesh["ulysses"].get_group(), sequence.get_group())
        return mesh, fsdp_mesh

    def ulysses_group(self, mesh: DeviceMesh):
        """The Ulysses group of this rank (None when ulysses is 1)."""
        return mesh["ulysses"].get_group() if self.ulysses > 1 else None

    def coordinates(self, mesh: DeviceMesh) -> dict[str, int]:
        """This rank's (dp, sp, ulysses) indices: which data shard it reads and which part of it it holds."""
        dp_rank = mesh["dp_replicate"].get_local_rank() * self.dp_shard + mesh["dp_shard"].get_local_rank()
        return {"dp_rank": dp_rank, "sp_rank": mesh["sp"].get_local_rank(),
                "ulysses_rank": mesh["ulysses"].get_local_rank()}



def ulysses_nodes(group) -> list[int]:
    """The node (torchrun's ``GROUP_RANK``; 0 when launched otherwise) of each rank of the Ulysses ``group``, in
    rank order (one all_gather_object at a stage's start). The all-to-all belongs inside one node (NVLink)."""
    nodes = [None] * dist.get_world_size(group)
    dist.all_gather_object(nodes, int(os.environ.get("GROUP_RANK", 0)), group=group)
    return nodes
