"""flax's msgpack encoding, read without flax: arrays in their stored dtype (bf16 too), chunked arrays,
scalars, and a clear error for what flax never writes."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from ringlwm.convert.flax_msgpack import unpack


def ext_array(array: np.ndarray, dtype: str | None = None, code: int = 1) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb((list(array.shape), dtype or array.dtype.name, array.tobytes("C"))))


def test_arrays_chunks_and_scalars():
    values = torch.tensor([1.5, -2.0, 3.140625], dtype=torch.bfloat16)
    tree = {
        "bf16": ext_array(values.view(torch.int16).numpy(), "bfloat16"),
        "ints": ext_array(np.arange(6, dtype=np.int32).reshape(2, 3)),
        "nested": {"chunked": {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 2},
                               "chunks": {"0": ext_array(np.zeros(3, np.float32)),
                                          "1": ext_array(np.array([7.0], np.float32))}}},
        "scalar": ext_array(np.array(4.0, np.float64), code=3),
        "complex": msgpack.ExtType(2, msgpack.packb((1.0, -2.0))),
    }
    out = unpack(msgpack.packb(tree))
    assert out["bf16"].dtype == torch.bfloat16 and torch.equal(out["bf16"], values)
    assert torch.equal(out["ints"], torch.arange(6, dtype=torch.int32).reshape(2, 3))
    assert torch.equal(out["nested"]["chunked"], torch.tensor([[0.0, 0.0], [0.0, 7.0]]))
    assert out["scalar"].shape == () and out["scalar"].item() == 4.0
    assert out["complex"] == complex(1.0, -2.0)


def test_unknown_ext_code_and_dtype():
    with pytest.raises(ValueError, match="unknown ext type code 9"):
        unpack(msgpack.packb({"x": msgpack.ExtType(9, b"")}))
    with pytest.raises(ValueError, match="unsupported array dtype 'float8'"):
        unpack(msgpack.packb({"x": ext_array(np.zeros(2, np.uint8), "float8")}))
