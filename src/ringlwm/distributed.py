"""Process groups: the entry points' setup (``init_distributed``) and W local gloo processes (``run_local``).

    device = init_distributed()       # under torchrun every rank joins the world; a plain process: a group of one
    results = run_local(fn, 2, arg)   # fn(rank, world_size, arg) on 2 processes; returns [fn's result per rank]

Training uses ``torchrun`` instead; this is for trying the ring on one machine without a launcher.
The group is initialised through a FileStore (no ports to race for); each process gets
``threads_per_rank`` intra-op threads, so that W processes share the cores instead of oversubscribing.
``fn`` must be a module-level function (it is pickled by name into the children).
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world_size, tmp, threads_per_rank, fn, args):
    torch.set_num_threads(threads_per_rank)
    if not torch.cuda.is_available():
        # Triton kernels on CPU tensors run only under the interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    store = dist.FileStore(os.path.join(tmp, "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(tmp, f"result{rank}.pt"))


def run_local(fn, world_size: int, *args, threads_per_rank: int = 1) -> list:
    """Spawn ``world_size`` processes running ``fn(rank, world_size, *args)``; return their results by rank.
    An exception in any rank is raised here with that rank's traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world_size, tmp, threads_per_rank, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(tmp, f"result{r}.pt"), weights_only=False) for r in range(world_size)]


def init_distributed() -> torch.device:
    """Initialise torch.distributed once and return this process's device.

    Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) every rank joins the world group: NCCL on GPUs, with
    ``torch.cuda.set_device(LOCAL_RANK)`` and ``device_id`` (so that NCCL binds each rank to its own GPU
    and communicators start eagerly), gloo on CPUs. A plain ``python -m ...`` becomes a group of one over an
    in-memory store (no port to collide with another run). Already initialised: only the device is returned.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if dist.is_initialized():
        return device
    device_id = device if device.type == "cuda" else None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, device_id=device_id)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id)
    return device


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
