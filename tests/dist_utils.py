"""Distributed test bodies run through ``ringlwm.distributed.run_local`` (gloo, one thread per rank)."""

from ringlwm.distributed import run_local


def run_distributed(fn, world_size: int, *args) -> list:
    return run_local(fn, world_size, *args, threads_per_rank=1)


def grid_groups(sp: int, ulysses: int):
    """This rank's (ring group, Ulysses group) in a world of dp x sp x ulysses ranks, Ulysses innermost (the
    layout of ringlwm's device mesh and of ``setup_sequence_parallel``). Every rank makes every group, in the
    same order."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    ring = uly = None
    for base in range(0, world, sp * ulysses):
        for u in range(ulysses):
            ranks = [base + s * ulysses + u for s in range(sp)]
            g = dist.new_group(ranks)
            if rank in ranks:
                ring = g
        for s in range(sp):
            ranks = [base + s * ulysses + u for u in range(ulysses)]
            g = dist.new_group(ranks)
            if rank in ranks:
                uly = g
    return ring, uly
