"""ringlwm.kernels: exact blockwise (flash-style) attention on one device.

- ``blockwise_attention``: the differentiable function (causal, packed segments, GQA, returns lse).
- ``block_attention_forward`` / ``block_attention_backward``: one block's (out, lse) and its float32
  gradients, the pieces a ring calls at each step; ``merge_attention`` combines partial (out, lse).
- Backends: ``"triton"`` (ringlwm's FlashAttention-2 kernels; on CPU tensors under ``TRITON_INTERPRET=1``),
  ``"cpu"`` (PyTorch's fused CPU flash kernel, default on CPU), and library FlashAttention on CUDA
  (``library_flash``): ``"torch_flash"`` (torch's FlashAttention-2), ``"cudnn"``, ``"flash_attn"`` (the flash-attn
  package). ``"auto"``, the default on GPUs, takes the fastest that ``make gpu-check`` measured on the GPU at hand.
- The block functions are the custom ops ``torch.ops.ringlwm.block_attention_forward`` / ``_backward``
  (fake implementations, autograd registered on the forward): ``torch.compile(fullgraph=True)`` traces them,
  and meta / ``FakeTensorMode`` tensors get outputs of the right shapes and dtypes without a kernel or device.
"""

import sys

_canonical = None
if __name__ != "ringlwm.kernels":
    # Workaround: with the repository root on sys.path (python -m ... or pytest run from there) this folder is
    # also importable as a top-level ``kernels``, and transformers imports any ``kernels`` it can find (it looks
    # for Hugging Face's kernel-hub package). A second copy of blockwise.py would register the ringlwm:: custom
    # ops again, silently replacing the first copy's implementations and their backend table. So ``kernels`` and
    # its submodules are made the very modules of ringlwm.kernels.
    import importlib

    try:
        _canonical = importlib.import_module("ringlwm.kernels")
    except ImportError:  # ringlwm is not installed: this copy is the only one
        _canonical = None

if _canonical is not None:
    sys.modules[__name__] = _canonical
    for _name, _module in list(sys.modules.items()):
        if _name.startswith("ringlwm.kernels."):
            sys.modules[__name__ + _name[len("ringlwm.kernels"):]] = _module
else:
    from .blockwise import (
        Backend,
        backend_names,
        block_attention_backward,
        block_attention_forward,
        blockwise_attention,
        check_attention_inputs,
        default_backend,
        merge_attention,
        merge_attention_,
        register_backend,
        resolve_backend,
        select_backend,
    )

    __all__ = [
        "Backend",
        "backend_names",
        "block_attention_backward",
        "block_attention_forward",
        "blockwise_attention",
        "check_attention_inputs",
        "default_backend",
        "merge_attention",
        "merge_attention_",
        "register_backend",
        "resolve_backend",
        "select_backend",
    ]
