"""Test-wide setup: on a machine without CUDA, Triton kernels run under the Triton interpreter.

TRITON_INTERPRET must be set before triton decorates any kernel, so before ringlwm.kernels.triton_flash
is imported. On a GPU machine the same tests run the compiled kernels.
"""

import inspect
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# What a test body calls when it starts processes: gloo workers (dist_utils.run_distributed, run_local) or a
# torchrun / subprocess launch through the modules' helpers (_train, runs, _run, subprocess).
_STARTS_PROCESSES = ("run_distributed(", "run_local(", "torch.distributed.run", "_train(", "runs(", "_run(",
                     "subprocess.")


def pytest_collection_modifyitems(config, items):
    """Mark ``dist`` every test that starts processes (``-m "not dist"``: the in-process tests alone)."""
    for item in items:
        try:
            source = inspect.getsource(item.function)
        except (AttributeError, OSError, TypeError):
            continue
        if any(call in source for call in _STARTS_PROCESSES):
            item.add_marker(pytest.mark.dist)
