"""Distributed test bodies run through ``ringlwm.distributed.run_local`` (gloo, one thread per rank)."""

from ringlwm.distributed import run_local


def run_distributed(fn, world_size: int, *args) -> list:
    return run_local(fn, world_size, *args, threads_per_rank=1)
