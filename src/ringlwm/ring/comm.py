"""All point-to-point communication of the ring, in one small class.

Each rank sends to its successor and receives from its predecessor in the group. One exchange is
started with ``start`` (asynchronous: compute goes on meanwhile) and finished with ``wait``; starting a
second exchange before waiting on the first is a bug and raises. On NCCL the transfers run on NCCL's own
stream, so they overlap with attention kernels on the compute stream; ``wait`` makes the compute stream
wait for them (no host sync). On gloo they run on gloo's threads; gloo moves host memory only, so GPU
tensors on a gloo group are staged through host copies (``moves_host_memory``): exact, not fast, and what
lets ranks that share one GPU (which NCCL refuses) run the ring, as ``make gpu-check`` does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def moves_host_memory(group: dist.ProcessGroup | None) -> bool:
    """Whether the group's backend transfers CPU tensors (gloo, mpi, ucc, or a cpu:... mapping) rather than
    accelerator memory (NCCL)."""
    backend = str(dist.get_backend(group)).lower()
    return any(name in backend for name in ("gloo", "mpi", "ucc", "cpu:"))


def all_gather_by_rank(x: torch.Tensor, group, world_size: int) -> list[torch.Tensor]:
    """Every rank's ``x`` (same shape everywhere), by rank, on ``x``'s device (not differentiable). On a group
    that moves host memory (gloo) GPU tensors travel through host copies."""
    local = x.contiguous()
    if moves_host_memory(group):
        local = local.cpu()
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local, group=group)
    return [p.to(x.device) for p in parts]


class RingComm:
    """Double-buffered send-to-next / receive-from-previous exchanges within ``group``."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.send_peer = to_global((self.rank + 1) % self.world_size)
        self.recv_peer = to_global((self.rank - 1) % self.world_size)
        self._pending = None
        self._buffers: list[list[torch.Tensor] | None] = [None, None]
        self._flip = 0
        self._host_only = moves_host_memory(group)

    def _recv_buffers(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Alternate between two sets of receive buffers. The set reused now was the one sent from in the
        previous exchange, which ``wait`` has completed, and is no longer the current block."""
        bufs = self._buffers[self._flip]
        if bufs is None or any(b.shape != t.shape or b.dtype != t.dtype for b, t in zip(bufs, tensors)):
            bufs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
            self._buffers[self._flip] = bufs
        self._flip ^= 1
        return bufs

    def start(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Send ``tensors`` to the next rank and receive the same shapes from the previous one.

        Returns the receive buffers; read them only after ``wait``. ``tensors`` must not be modified
        before ``wait`` either.
        """
        if self._pending is not None:
            raise RuntimeError("RingComm.start called while the previous exchange is still pending; call wait()")
        tensors = [t.contiguous() for t in tensors]
        recv = self._recv_buffers(tensors)
        staged = self._host_only and any(t.device.type != "cpu" for t in tensors)
        send = [t.cpu() for t in tensors] if staged else tensors
        landing = [torch.empty(r.shape, dtype=r.dtype) for r in recv] if staged else recv
        ops = [dist.P2POp(dist.isend, t, self.send_peer, self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, r, self.recv_peer, self.group) for r in landing]
        self._pending = (dist.batch_isend_irecv(ops), send, list(zip(recv, landing)) if staged else [])
        return recv

    def wait(self) -> None:
        if self._pending is None:
            raise RuntimeError("RingComm.wait called with no exchange started")
        requests, _keepalive, staged = self._pending
        for req in requests:
            req.wait()
        for buffer, host in staged:
            buffer.copy_(host)
        self._pending = None
