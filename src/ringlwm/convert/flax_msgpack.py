"""flax's msgpack encoding (``flax.serialization.to_bytes``), read without flax or jax: the one reader behind
LWM's model checkpoints (``lwm_jax.py``: one encoded array per streamed item) and its VQGAN weights
(``vqgan_flax.py``: one encoded tree).

    tree = unpack(data)          # nested dicts, arrays as torch tensors in their stored dtype

The leaves are msgpack ext objects. Ext code 1 is an ndarray (code 3 a numpy scalar, read as a 0-d
array) whose payload is itself msgpack: ``[shape, dtype name, C-order raw bytes]``; code 2 is a complex
scalar ``[real, imag]``. flax stores an array over its chunk size (2**30 bytes) as
``{"__msgpack_chunked_array__": True, "shape": {"0": ..}, "chunks": {"0": flat part, ..}}``. Arrays come
back as torch tensors, bfloat16 included (numpy has no bfloat16), reading the payload's bytes in place.
"""

from __future__ import annotations

import warnings

import torch

CHUNKED_ARRAY_KEY = "__msgpack_chunked_array__"
EXT_NDARRAY, EXT_COMPLEX, EXT_NPSCALAR = 1, 2, 3
DTYPES = {name: getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16",
    "uint8", "bool", "complex64", "complex128")}


def import_msgpack():
    try:
        import msgpack
    except ImportError as e:  # pragma: no cover - a dependency of the converters only
        raise ImportError("reading flax checkpoints needs msgpack: pip install msgpack") from e
    return msgpack


def decode_array(payload: bytes) -> torch.Tensor:
    """The payload of an ndarray ext object -> a tensor of its shape and dtype (sharing the bytes' memory)."""
    shape, name, buffer = import_msgpack().unpackb(payload, raw=True)
    name = name.decode() if isinstance(name, bytes) else name
    if name not in DTYPES:
        raise ValueError(f"flax msgpack: unsupported array dtype {name!r} (known: {sorted(DTYPES)})")
    if not buffer:
        return torch.empty(tuple(shape), dtype=DTYPES[name])
    with warnings.catch_warnings():
        # The tensor reads the bytes object in place (no copy); it is never written to.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(buffer, dtype=DTYPES[name]).reshape(tuple(shape))


def _ext_hook(code: int, payload: bytes):
    if code in (EXT_NDARRAY, EXT_NPSCALAR):
        return decode_array(payload)
    if code == EXT_COMPLEX:
        real, imag = import_msgpack().unpackb(payload)
        return complex(real, imag)
    raise ValueError(f"flax msgpack: unknown ext type code {code} (flax writes 1 ndarray, 2 complex, 3 numpy scalar)")


def unchunk(tree):
    """``tree`` with every chunked array (see the module docstring) joined into one tensor."""
    if isinstance(tree, dict):
        if tree.get(CHUNKED_ARRAY_KEY):
            shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
            chunks = [tree["chunks"][str(i)].reshape(-1) for i in range(len(tree["chunks"]))]
            return torch.cat(chunks).reshape(shape)
        return {k: unchunk(v) for k, v in tree.items()}
    return tree


def unpack(data: bytes):
    """Bytes of ``flax.serialization.to_bytes(x)`` -> x: nested dicts (and lists), arrays as tensors."""
    msgpack = import_msgpack()
    return unchunk(msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False))
