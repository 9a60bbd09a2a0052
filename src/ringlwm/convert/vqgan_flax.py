"""LWM's VQGAN weights (a Flax parameter tree) -> ringlwm's PyTorch ``VQGAN``. Needs neither flax nor jax.

    python -m ringlwm.convert.vqgan_flax --input vqgan --out vqgan_torch/ [--config config.json]
    vqgan = VQGAN.from_pretrained("vqgan_torch/")

Input formats, told apart by their first bytes:
- msgpack, as written by ``flax.serialization.to_bytes`` (the format is described and read in
  ``flax_msgpack.py``). ``bfloat16`` leaves (no numpy dtype) are widened to float32 exactly.
- pickle: LWM's own loader (``lwm/vqgan.py``) reads its released ``vqgan`` file with ``pickle.load``. It is
  read here with a restricted unpickler that builds only numpy arrays, plain containers and stand-ins for
  flax's FrozenDict and jax arrays, and refuses any other global by name (a pickle can run arbitrary code).

The tree (optionally under a top-level "params") is LWM's ``VQGANModel``. Flax names the submodules of a
compact module ``ClassName_k``, counting per class within the parent in creation order, so:

    quant_conv, post_quant_conv: {kernel, bias};  quantize/embeddings (num_embeddings, dim)
    encoder/Conv_0 (conv_in), encoder/Conv_1 (conv_out), encoder/GroupNorm_0 (norm_out)
    encoder/DownsamplingBlock_{i}: ResnetBlock_{j}, AttnBlock_{j} (if any), Downsample_0/Conv_0
    encoder/MidBlock_0: ResnetBlock_0, AttnBlock_0 (if any), ResnetBlock_1
    decoder/Conv_0 (conv_in), decoder/MidBlock_0, decoder/GroupNorm_0, decoder/Conv_1 (conv_out)
    decoder/UpsamplingBlock_{k}: ResnetBlock_{j}, AttnBlock_{j}, Upsample_0/Conv_0 -- the decoder builds the
        deepest level first, so UpsamplingBlock_0 is level L-1 (16x16, widest) and UpsamplingBlock_{L-1} level 0
    ResnetBlock: GroupNorm_0, Conv_0, GroupNorm_1, Conv_1, Conv_2 (1x1 shortcut, when the width changes)
    AttnBlock: GroupNorm_0, Conv_0 (q), Conv_1 (k), Conv_2 (v), Conv_3 (output projection)

Layouts: conv kernels are (kh, kw, in, out) in Flax and (out, in, kh, kw) in PyTorch (both cross-correlate,
so no flip); dense kernels (in, out) -> (out, in); GroupNorm ``scale`` -> ``weight``; the rest as is.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
from pathlib import Path

import numpy as np
import torch

from ringlwm.convert.flax_msgpack import unpack
from ringlwm.models.vqgan import VQGAN, VQGANConfig


class CheckpointMismatchError(ValueError):
    """The checkpoint's parameter tree does not match the VQGAN config (missing, unexpected or misshapen keys)."""


# ---------------------------------------------------------------------------------------------- reading


def read_flax_msgpack(data: bytes) -> dict:
    """Bytes of ``flax.serialization.to_bytes(tree)`` -> the nested dict of numpy arrays (``flax_msgpack.unpack``;
    bfloat16 leaves widened to float32, exactly)."""

    def to_numpy(node):
        if isinstance(node, dict):
            return {k: to_numpy(v) for k, v in node.items()}
        if isinstance(node, torch.Tensor):
            return (node.float() if node.dtype == torch.bfloat16 else node).numpy()
        return node

    return to_numpy(unpack(data))


def _numpy_from_jax_pickle(fun, args, arr_state, _aval_state):
    """Stand-in for jax's ``_reconstruct_array``: a jax.Array pickles as the numpy array it holds."""
    array = fun(*args)
    array.__setstate__(arr_state)
    return array


class _RestrictedUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # protocol 2 stores bytes as latin-1 text
        *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")),
        *((m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")),  # protocol 5
    }
    _STAND_INS = {
        ("flax.core.frozen_dict", "FrozenDict"): dict,  # pickles as FrozenDict(plain_dict)
        ("jax._src.array", "_reconstruct_array"): _numpy_from_jax_pickle,
    }

    def find_class(self, module, name):
        if (module, name) in self._STAND_INS:
            return self._STAND_INS[(module, name)]
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"the pickle needs {module}.{name}, which this loader does not build (it reads only nested dicts of "
            "numpy/jax arrays); re-save the tree with flax.serialization.to_bytes and convert that")


def read_flax_pickle(data: bytes) -> dict:
    """A pickled parameter tree (LWM's ``vqgan`` file format) -> the nested dict of numpy arrays."""
    return _RestrictedUnpickler(io.BytesIO(data)).load()


def read_flax_checkpoint(path: str | Path) -> dict:
    """A Flax parameter tree from a msgpack (``flax.serialization.to_bytes``) or pickle file."""
    data = Path(path).read_bytes()
    head = data[:1]
    if head == b"\x80":  # pickle protocol >= 2 (an empty msgpack map would also be 0x80, and is no checkpoint)
        tree = read_flax_pickle(data)
    elif head and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):  # msgpack map
        tree = read_flax_msgpack(data)
    else:
        raise ValueError(f"{path}: neither a flax msgpack checkpoint (a msgpack map) nor a pickle "
                         f"(first bytes {data[:4]!r})")
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: expected a tree of parameters (a dict), got {type(tree).__name__}")
    return tree


def flatten_params(tree: dict) -> dict[str, np.ndarray]:
    """Nested dict -> {"encoder/Conv_0/kernel": array}; a lone top-level "params" wrapper is removed."""
    if set(tree) == {"params"}:
        tree = tree["params"]
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, path + "/")
            else:
                flat[path] = np.asarray(value)

    walk(tree, "")
    return flat


# ---------------------------------------------------------------------------------------------- name map


def _resnet(torch_prefix: str, flax_prefix: str, has_shortcut: bool) -> dict[str, str]:
    pairs = [("norm1", "GroupNorm_0"), ("conv1", "Conv_0"), ("norm2", "GroupNorm_1"), ("conv2", "Conv_1")]
    if has_shortcut:
        pairs.append(("shortcut", "Conv_2"))
    return {f"{torch_prefix}.{t}": f"{flax_prefix}/{f}" for t, f in pairs}


def _attn(torch_prefix: str, flax_prefix: str) -> dict[str, str]:
    pairs = [("norm", "GroupNorm_0"), ("q", "Conv_0"), ("k", "Conv_1"), ("v", "Conv_2"), ("proj_out", "Conv_3")]
    return {f"{torch_prefix}.{t}": f"{flax_prefix}/{f}" for t, f in pairs}


def _level(config: VQGANConfig, torch_prefix: str, flax_prefix: str, level: int, in_ch: int, num_blocks: int,
           resample: str | None) -> dict[str, str]:
    width = config.hidden_channels * config.channel_mult[level]
    names = {}
    for j in range(num_blocks):
        names |= _resnet(f"{torch_prefix}.blocks.{j}", f"{flax_prefix}/ResnetBlock_{j}", (in_ch if j == 0 else width) != width)
        if config.resolution // 2**level in config.attn_resolutions:
            names |= _attn(f"{torch_prefix}.attns.{j}", f"{flax_prefix}/AttnBlock_{j}")
    if resample is not None and config.resample_with_conv:
        names[f"{torch_prefix}.resample.conv"] = f"{flax_prefix}/{resample}_0/Conv_0"
    return names


def _mid(config: VQGANConfig, torch_prefix: str, flax_prefix: str) -> dict[str, str]:
    names = _resnet(f"{torch_prefix}.block_1", f"{flax_prefix}/ResnetBlock_0", False)
    names |= _resnet(f"{torch_prefix}.block_2", f"{flax_prefix}/ResnetBlock_1", False)
    if not config.no_attn_mid_block:
        names |= _attn(f"{torch_prefix}.attn", f"{flax_prefix}/AttnBlock_0")
    return names


def flax_module_names(config: VQGANConfig) -> dict[str, str]:
    """PyTorch module path -> Flax module path, e.g. "decoder.up.4.blocks.0.conv1" ->
    "decoder/UpsamplingBlock_0/ResnetBlock_0/Conv_0", for every module with parameters."""
    widths = [config.hidden_channels * m for m in config.channel_mult]
    last = config.num_resolutions - 1
    names = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv", "quantizer": "quantize",
             "encoder.conv_in": "encoder/Conv_0", "encoder.norm_out": "encoder/GroupNorm_0",
             "encoder.conv_out": "encoder/Conv_1", "decoder.conv_in": "decoder/Conv_0",
             "decoder.norm_out": "decoder/GroupNorm_0", "decoder.conv_out": "decoder/Conv_1"}
    for i in range(config.num_resolutions):
        in_ch = config.hidden_channels if i == 0 else widths[i - 1]
        names |= _level(config, f"encoder.down.{i}", f"encoder/DownsamplingBlock_{i}", i, in_ch,
                        config.num_res_blocks, "Downsample" if i != last else None)
        in_ch = widths[-1] if i == last else widths[i + 1]
        names |= _level(config, f"decoder.up.{i}", f"decoder/UpsamplingBlock_{last - i}", i, in_ch,
                        config.num_res_blocks + 1, "Upsample" if i != 0 else None)
    names |= _mid(config, "encoder.mid", "encoder/MidBlock_0")
    names |= _mid(config, "decoder.mid", "decoder/MidBlock_0")
    return names


def flax_param_names(model: VQGAN) -> dict[str, str]:
    """PyTorch parameter name -> Flax parameter path, for every parameter of ``model``."""
    modules = flax_module_names(model.config)
    names = {}
    for torch_name, param in model.named_parameters():
        module_path, leaf = torch_name.rsplit(".", 1)
        if module_path not in modules:
            raise AssertionError(f"no Flax name for PyTorch module {module_path}: flax_module_names is out of date")
        if leaf == "weight":
            flax_leaf = "scale" if param.dim() == 1 else "kernel"
        else:
            flax_leaf = leaf
        names[torch_name] = f"{modules[module_path]}/{flax_leaf}"
    return names


def to_torch_layout(array: np.ndarray) -> np.ndarray:
    """A Flax leaf in PyTorch layout: conv kernels (kh, kw, in, out) -> (out, in, kh, kw), dense kernels
    (in, out) -> (out, in); vectors and the codebook unchanged (the caller knows which leaves are kernels)."""
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if array.ndim == 2:
        return array.T
    return array


def flax_to_state_dict(tree: dict, model: VQGAN) -> dict[str, torch.Tensor]:
    """A Flax parameter tree (nested or flattened with "/") -> a state dict for ``model`` (float32, PyTorch
    layouts). Raises CheckpointMismatchError naming every missing, unexpected and misshapen key."""
    flat = tree if all(isinstance(v, np.ndarray) for v in tree.values()) else flatten_params(tree)
    names = flax_param_names(model)
    expected = dict(model.named_parameters())
    missing = sorted(set(names.values()) - set(flat))
    unexpected = sorted(set(flat) - set(names.values()))
    state, wrong = {}, []
    for torch_name, flax_name in names.items():
        if flax_name not in flat:
            continue
        array = flat[flax_name]
        is_kernel = flax_name.endswith("/kernel")
        converted = to_torch_layout(array) if is_kernel else array
        want = tuple(expected[torch_name].shape)
        if tuple(converted.shape) != want:
            want_flax = (want[2], want[3], want[1], want[0]) if is_kernel and len(want) == 4 else want
            wrong.append(f"{flax_name}: checkpoint {tuple(array.shape)}, config expects {want_flax} "
                         f"(PyTorch {torch_name} {want})")
            continue
        state[torch_name] = torch.from_numpy(np.array(converted, dtype=np.float32, order="C"))
    if missing or unexpected or wrong:
        lines = [f"the Flax checkpoint does not match {model.config}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + "\n    ".join(["", *shown]))
        raise CheckpointMismatchError("\n".join(lines))
    return state


def load_flax_vqgan(path_or_tree: str | Path | dict, config: VQGANConfig | None = None) -> VQGAN:
    """A Flax VQGAN checkpoint file (or its tree) -> VQGAN in eval mode (float32, CPU)."""
    tree = path_or_tree if isinstance(path_or_tree, dict) else read_flax_checkpoint(path_or_tree)
    with torch.device("meta"):
        model = VQGAN(config or VQGANConfig())
    model.load_state_dict(flax_to_state_dict(tree, model), assign=True)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ringlwm.convert.vqgan_flax", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="LWM's VQGAN weights: flax msgpack or pickle")
    parser.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    parser.add_argument("--config", help="JSON file of VQGANConfig fields (default: LWM's config)")
    args = parser.parse_args(argv)
    config = VQGANConfig.from_dict(json.loads(Path(args.config).read_text())) if args.config else VQGANConfig()
    model = load_flax_vqgan(args.input, config)
    out = model.save_pretrained(args.out)
    num = sum(p.numel() for p in model.parameters())
    print(f"converted {len(list(model.parameters()))} tensors ({num / 1e6:.1f}M parameters) -> {out}")


if __name__ == "__main__":
    main()
