"""Activation offloading: the checkpointed decoder layers' inputs live in host memory between the forward and
the backward (``ringlwm_options["activation_offloading"]``, with ``activation_checkpointing``).

With activation checkpointing, what a decoder stack keeps for its backward is one tensor per layer: the
layer's input (batch x local_len x hidden), from which the backward recomputes the layer. At long context
these inputs are most of a GPU's memory (Llama-3.1-8B at 128K tokens per GPU: 32 layers x 1 GiB in bf16).
``offloaded_checkpoint`` is a drop-in for ``torch.utils.checkpoint.checkpoint`` (non-reentrant) as the
decoder layers' checkpoint function:

- forward: the layer input is copied to host memory (pinned, on a side CUDA stream, so the copy overlaps the
  layer's compute; the device tensor's memory is handed back to the allocator once the copy is done) and the
  layer runs checkpointed; only the host copy is kept;
- backward: when the layer's recompute starts, its input is copied back to the device (waiting on the copy
  that was started earlier), and the copy of the layer below it (the next one the backward reaches) starts
  on the side stream, so it overlaps this layer's recompute and backward. With ``offload_prefetch=False``
  no copy starts ahead: each recompute loads its own input, so one layer input fewer is on the device (at
  long context a layer's compute takes minutes against a copy of a second).

The copies are exact (the same bits come back), so losses and gradients are bitwise those of plain
activation checkpointing. On a CPU device the "host copy" is a copy in the same memory: the mechanism runs
(and is tested) but saves nothing. The planner (``ringlwm.plan``) sets ``OffloadStore.host_device`` to "meta"
so that, under fake tensors, host copies are told apart from device memory and counted as host bytes.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.checkpoint import checkpoint


class _Stash:
    """One layer input: its host copy, and while needed, its device tensor."""

    __slots__ = ("store", "device_tensor", "device", "host", "requires_grad", "copied", "loaded", "load_done",
                 "prev", "__weakref__")

    def __init__(self, store: OffloadStore, hidden: torch.Tensor):
        self.store = store
        self.requires_grad = hidden.requires_grad
        self.device_tensor = hidden  # the forward uses the original (it links the autograd graph)
        self.device = hidden.device
        self.loaded = None
        self.load_done = None
        self.prev = None
        self.host = store.copy_to_host(hidden)
        self.copied = store.record()  # event: the host copy is complete (None off CUDA)
        store.count(self.host.nbytes)

    def release(self) -> None:
        """After the layer's forward: keep only the host copy."""
        self.device_tensor = None

    def prefetch(self) -> None:
        """Start copying the host copy back to the device (no-op if already started)."""
        if self.loaded is None and self.host is not None:
            self.loaded, self.load_done = self.store.copy_to_device(self.host, self.copied, self.device)

    def take(self) -> torch.Tensor:
        """The layer input for a run of the layer: the original in the forward, the reloaded copy in the
        recompute (which also starts the prefetch of the layer below)."""
        if self.device_tensor is not None:
            return self.device_tensor
        if self.loaded is not None:
            self.store.prefetched += 1
        self.prefetch()
        tensor = self.store.wait(self.loaded, self.load_done)
        self.loaded = self.load_done = None  # a second recompute (retain_graph) reloads again
        below = self.prev() if self.prev is not None and self.store.prefetch else None
        if below is not None:
            below.prefetch()
        return tensor.detach().requires_grad_(self.requires_grad)

    def __del__(self):
        host = getattr(self, "host", None)
        if host is not None:
            self.store.count(-host.nbytes)


class OffloadStore:
    """Host copies of one model's checkpointed layer inputs, linked in forward order for the backward's
    prefetch, and the bytes they hold (``host_bytes``, ``peak_host_bytes``)."""

    host_device: str | None = None  # None: "cpu"; the planner sets "meta" (host copies apart from device ones)
    prefetch: bool = True  # False (option offload_prefetch): each recompute loads its own input, none ahead

    def __init__(self):
        self.host_bytes = 0
        self.peak_host_bytes = 0
        self.prefetched = 0  # recomputes whose input was already on its way back (a layer above started it)
        self._last = None
        self._stream = None

    def begin(self) -> None:
        """A new forward of the decoder stack: its first layer has no layer below it."""
        self._last = None

    def count(self, nbytes: int) -> None:
        self.host_bytes += nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)

    def reset_peak(self) -> None:
        self.peak_host_bytes = self.host_bytes

    # device specifics ------------------------------------------------------------------------------

    def _side_stream(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def copy_to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        target = self.host_device or "cpu"
        if tensor.device.type != "cuda":
            return tensor.detach().to(target, copy=True)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device=target, pin_memory=True)
        side = self._side_stream(tensor.device)
        side.wait_stream(torch.cuda.current_stream(tensor.device))  # the input is written
        with torch.cuda.stream(side):
            host.copy_(tensor.detach(), non_blocking=True)
        tensor.record_stream(side)  # its memory is not reused before the copy has read it
        return host

    def record(self):
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self._stream)
        return event

    def copy_to_device(self, host: torch.Tensor, copied, device: torch.device):
        if device.type != "cuda":  # off CUDA: a plain copy (as on a GPU, the same bits)
            return host.to(device, copy=True), None
        current = torch.cuda.current_stream(device)
        out = torch.empty(host.shape, dtype=host.dtype, device=device)  # allocated on the compute stream
        side = self._stream
        side.wait_stream(current)
        with torch.cuda.stream(side):
            if copied is not None:
                side.wait_event(copied)
            out.copy_(host, non_blocking=True)
        out.record_stream(side)
        return out, self.record()

    def wait(self, tensor: torch.Tensor, done) -> torch.Tensor:
        if done is not None:
            torch.cuda.current_stream(tensor.device).wait_event(done)
        return tensor

    # the checkpoint function --------------------------------------------------------------------------

    def checkpoint(self, function, hidden, *args, **kwargs):
        """``torch.utils.checkpoint.checkpoint(function, hidden, *args, use_reentrant=False)`` keeping
        ``hidden`` (the layer input) in host memory until the recompute."""
        if not isinstance(hidden, torch.Tensor) or not torch.is_grad_enabled():
            return checkpoint(function, hidden, *args, use_reentrant=False, **kwargs)
        stash = _Stash(self, hidden)
        if self._last is not None:
            stash.prev = self._last
        self._last = weakref.ref(stash)

        def run(*rest):
            return function(stash.take(), *rest)

        try:
            return checkpoint(run, *args, use_reentrant=False, **kwargs)
        finally:
            stash.release()


def offload_layer_inputs(model: torch.nn.Module, store: OffloadStore | None) -> None:
    """Give the decoder layers of ``model`` (those with transformers' ``gradient_checkpointing`` flag set)
    ``store.checkpoint`` as their checkpoint function; ``store`` None: plain non-reentrant checkpoint."""
    from functools import partial

    func = store.checkpoint if store is not None else partial(checkpoint, use_reentrant=False)
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = func
