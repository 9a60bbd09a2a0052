"""Test-wide setup: on a machine without CUDA, Triton kernels run under the Triton interpreter.

TRITON_INTERPRET must be set before triton decorates any kernel, so before ringlwm.kernels.triton_flash
is imported. On a GPU machine the same tests run the compiled kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
