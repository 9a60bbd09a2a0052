"""Run a test body on W gloo processes on this machine.

``run_distributed(fn, world_size, *args)`` spawns W processes, initialises a gloo process group through a
FileStore (no ports to race for), limits each to one thread (2 cores on the CI machine), and calls
``fn(rank, world_size, *args)``. An exception in any rank fails the test with that rank's traceback.
``fn`` must be a module-level function (it is pickled by name into the children).
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world_size, store_path, fn, args):
    torch.set_num_threads(1)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world_size, os.path.join(tmp, "store"), fn, args), nprocs=world_size, join=True)
