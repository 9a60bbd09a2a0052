"""A dispatch mode that records the ringlwm attention custom ops called below it (shared by the custom-op
and compile tests)."""

from __future__ import annotations

import ringlwm.kernels  # noqa: F401 - registers the ops
import torch
from torch.utils._python_dispatch import TorchDispatchMode

FORWARD_OP = torch.ops.ringlwm.block_attention_forward.default
BACKWARD_OP = torch.ops.ringlwm.block_attention_backward.default


class RecordOps(TorchDispatchMode):
    """``calls``: (op, its backend argument) for each ringlwm attention op called below it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (FORWARD_OP, BACKWARD_OP):
            self.calls.append((func, args[-1]))
        return func(*args, **(kwargs or {}))
