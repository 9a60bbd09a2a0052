"""VQGAN: shapes, nearest-codebook quantization, save/load, and the Flax converter against a NumPy re-run of
LWM's Flax model.

The converter test does not trust the converter's name map: ``FlaxScope`` re-creates LWM's parameter tree
the way Flax does (parameters made on first use, child modules auto-named ``ClassName_k`` per class in
creation order) while running a NumPy transcription of ``lwm/vqgan.py`` in NHWC; the same functions then
run the tree as the reference the converted PyTorch module must match.
"""

from __future__ import annotations

import json
import pickle
import sys
import types

import msgpack
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from ringlwm.convert.vqgan_flax import (
    CheckpointMismatchError,
    flax_param_names,
    load_flax_vqgan,
    main,
    read_flax_checkpoint,
    read_flax_msgpack,
    read_flax_pickle,
)
from ringlwm.models.vqgan import VQGAN, VectorQuantizer, VQGANConfig

TINY = VQGANConfig(resolution=32, hidden_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=8,
                   num_embeddings=64, quantized_embed_dim=4, num_groups=4)
TINY_ATTN = VQGANConfig(**{**TINY.to_dict(), "attn_resolutions": (8,), "no_attn_mid_block": False})


def tiny_model(config=TINY, seed=0):
    torch.manual_seed(seed)
    return VQGAN(config).eval()


def pixels(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------- module


def test_defaults_are_lwm_config():
    c = VQGANConfig()
    assert (c.resolution, c.hidden_channels, c.channel_mult, c.num_res_blocks) == (256, 128, (1, 2, 2, 4, 6), 2)
    assert (c.z_channels, c.num_embeddings, c.quantized_embed_dim) == (64, 8192, 64)
    assert (c.attn_resolutions, c.no_attn_mid_block, c.num_groups, c.norm_eps) == ((), True, 32, 1e-6)
    assert (c.latent_resolution, c.codes_per_frame) == (16, 256)
    assert VQGANConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown VQGANConfig fields"):
        VQGANConfig.from_dict({"resolutoin": 256})
    with pytest.raises(ValueError, match="num_groups"):
        VQGANConfig(hidden_channels=100)


def test_full_lwm_config_shapes():
    # Shapes of the full model without its compute (seconds per frame on 2 CPU cores): meta tensors.
    with torch.device("meta"):
        model = VQGAN()
        assert model.quantizer.embeddings.shape == (8192, 64)
        codes = model.encode(torch.empty(1, 3, 256, 256))
        video_codes = model.encode(torch.empty(1, 2, 3, 256, 256))
        frames = model.decode(torch.empty(1, 2, 16, 16, dtype=torch.long))
    assert codes.shape == (1, 16, 16) and codes.dtype == torch.int64
    assert video_codes.shape == (1, 2, 16, 16)
    assert frames.shape == (1, 2, 3, 256, 256)


@pytest.mark.slow
def test_full_lwm_config_one_frame():
    model = VQGAN().eval()
    with torch.inference_mode():
        codes = model.encode(pixels(1, 3, 256, 256))
        out = model.decode(codes)
    assert codes.shape == (1, 16, 16) and 0 <= codes.min() and codes.max() < 8192
    assert out.shape == (1, 3, 256, 256) and out.abs().max() <= 1


def test_encode_decode_shapes():
    model = tiny_model()
    with torch.inference_mode():
        codes = model.encode(pixels(2, 3, 32, 32))
        video = model.encode(pixels(2, 3, 3, 32, 32))
        out, video_out = model.decode(codes), model.decode(video)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.int64
    assert video.shape == (2, 3, 8, 8)
    assert 0 <= int(video.min()) and int(video.max()) < TINY.num_embeddings
    assert out.shape == (2, 3, 32, 32) and video_out.shape == (2, 3, 3, 32, 32)
    assert out.abs().max() <= 1
    # a video is its frames encoded one by one
    torch.testing.assert_close(video[1, 2], model.encode(pixels(2, 3, 3, 32, 32)[1, 2][None])[0], rtol=0, atol=0)


def test_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"expected frames of shape \(3, 32, 32\)"):
        model.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="must have 4 dims"):
        model.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="<eof>"):
        model.decode(torch.full((1, 8, 8), 64))


@pytest.mark.parametrize("chunk_rows", [4096, 100])
def test_quantize_picks_nearest_entry(monkeypatch, chunk_rows):
    monkeypatch.setattr(VectorQuantizer, "chunk_rows", chunk_rows)
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8192, 64)
    with torch.no_grad():
        quantizer.embeddings.normal_()
    z = torch.randn(2, 64, 16, 16)
    z_q, codes = quantizer(z)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 64).double()
    brute = torch.cdist(rows, quantizer.embeddings.detach().double()).argmin(1).view(2, 16, 16)
    assert torch.equal(codes, brute)
    torch.testing.assert_close(z_q, quantizer.embeddings.detach()[codes].permute(0, 3, 1, 2))
    # entries themselves, slightly moved, come back as their own codes
    picked = torch.randint(0, 8192, (2, 16, 16))
    near = quantizer.embeddings.detach()[picked].permute(0, 3, 1, 2) + 1e-3 * torch.randn(2, 64, 16, 16)
    assert torch.equal(quantizer(near)[1], picked)


def test_quantize_straight_through_gradient():
    model = tiny_model()
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    z_q, _ = model.quantize(z)
    z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_save_and_from_pretrained(tmp_path):
    model = tiny_model(TINY_ATTN)
    model.save_pretrained(tmp_path / "vq")
    loaded = VQGAN.from_pretrained(tmp_path / "vq")
    assert loaded.config == TINY_ATTN and not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = pixels(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model.encode(x), loaded.encode(x))
    with pytest.raises(FileNotFoundError, match="config.json"):
        VQGAN.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- Flax reference


class FlaxScope:
    """A Flax-like variable scope over a nested dict: params are created on first use; child modules are named
    ``ClassName_k``, k counting per class name within this scope in creation order (Flax's autonaming)."""

    def __init__(self, params: dict, rng: np.random.Generator):
        self.params, self.rng, self.counts = params, rng, {}

    def child(self, cls_name: str) -> FlaxScope:
        k = self.counts.get(cls_name, 0)
        self.counts[cls_name] = k + 1
        return self.named(f"{cls_name}_{k}")

    def named(self, name: str) -> FlaxScope:
        return FlaxScope(self.params.setdefault(name, {}), self.rng)

    def param(self, name: str, shape: tuple, kind: str) -> np.ndarray:
        if name not in self.params:
            if kind == "kernel":
                value = self.rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
            elif kind == "scale":
                value = 1 + 0.2 * self.rng.standard_normal(shape)
            else:
                value = (0.1 if kind == "bias" else 1.0) * self.rng.standard_normal(shape)
            self.params[name] = value.astype(np.float32)
        return self.params[name].astype(np.float64)


def silu(x):
    return x / (1 + np.exp(-x))


def conv(s, x, features, size=3, stride=1, padding=None):
    """nn.Conv on NHWC; padding None is Flax's "SAME" for odd kernels."""
    kernel = s.param("kernel", (size, size, x.shape[-1], features), "kernel")
    bias = s.param("bias", (features,), "bias")
    pad = padding if padding is not None else ((size // 2, size // 2), (size // 2, size // 2))
    x = np.pad(x, ((0, 0), *pad, (0, 0)))
    windows = sliding_window_view(x, (size, size), axis=(1, 2))[:, ::stride, ::stride]  # (b, h, w, c, kh, kw)
    return np.einsum("bhwcij,ijco->bhwo", windows, kernel) + bias


def group_norm(s, x, groups, eps=1e-6):
    b, h, w, c = x.shape
    scale, bias = s.param("scale", (c,), "scale"), s.param("bias", (c,), "bias")
    g = x.reshape(b, h, w, groups, c // groups)
    g = (g - g.mean((1, 2, 4), keepdims=True)) / np.sqrt(g.var((1, 2, 4), keepdims=True) + eps)
    return g.reshape(x.shape) * scale + bias


def resnet_block(s, x, groups, out=None):
    out = out or x.shape[-1]
    h = conv(s.child("Conv"), silu(group_norm(s.child("GroupNorm"), x, groups)), out)
    h = conv(s.child("Conv"), silu(group_norm(s.child("GroupNorm"), h, groups)), out)
    if out != x.shape[-1]:
        x = conv(s.child("Conv"), x, out, size=1)
    return h + x


def attn_block(s, x, groups):
    # LWM's AttnBlock adds a (b, h*w, c) result to its (b, h, w, c) input, which cannot run; this is the
    # intended computation (LWM's config has no attention, so its released weights never take this path).
    b, h, w, c = x.shape
    y = group_norm(s.child("GroupNorm"), x, groups)
    q, k, v = (conv(s.child("Conv"), y, c, size=1).reshape(b, h * w, c) for _ in range(3))
    a = np.einsum("bqd,bkd->bqk", q, k) * c**-0.5
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return x + conv(s.child("Conv"), np.einsum("bqk,bkd->bqd", a, v).reshape(b, h, w, c), c, size=1)


def mid_block(s, x, cfg):
    x = resnet_block(s.child("ResnetBlock"), x, cfg.num_groups)
    if not cfg.no_attn_mid_block:
        x = attn_block(s.child("AttnBlock"), x, cfg.num_groups)
    return resnet_block(s.child("ResnetBlock"), x, cfg.num_groups)


def lwm_encode(root, x, cfg):
    """NHWC pixels -> (codes, distance margin to the second-nearest entry), as VQGANModel.encode."""
    s, levels = root.named("encoder"), len(cfg.channel_mult)
    h = conv(s.child("Conv"), x, cfg.hidden_channels)
    for i in range(levels):
        block = s.child("DownsamplingBlock")
        for _ in range(cfg.num_res_blocks):
            h = resnet_block(block.child("ResnetBlock"), h, cfg.num_groups, cfg.hidden_channels * cfg.channel_mult[i])
            if h.shape[1] in cfg.attn_resolutions:
                h = attn_block(block.child("AttnBlock"), h, cfg.num_groups)
        if i != levels - 1:
            h = conv(block.child("Downsample").child("Conv"), h, h.shape[-1], stride=2, padding=((0, 1), (0, 1)))
    h = mid_block(s.child("MidBlock"), h, cfg)
    h = conv(s.child("Conv"), silu(group_norm(s.child("GroupNorm"), h, cfg.num_groups)), cfg.z_channels)
    z = conv(root.named("quant_conv"), h, cfg.quantized_embed_dim, size=1)
    emb = root.named("quantize").param("embeddings", (cfg.num_embeddings, cfg.quantized_embed_dim), "embeddings")
    d = ((z[..., None, :] - emb) ** 2).sum(-1)
    two = np.sort(d, -1)[..., :2]
    return d.argmin(-1), two[..., 1] - two[..., 0]


def lwm_decode(root, codes, cfg):
    """codes (b, h, w) -> NHWC pixels, as VQGANModel.decode."""
    emb = root.named("quantize").param("embeddings", (cfg.num_embeddings, cfg.quantized_embed_dim), "embeddings")
    h = conv(root.named("post_quant_conv"), emb[codes], cfg.z_channels, size=1)
    s, levels = root.named("decoder"), len(cfg.channel_mult)
    h = conv(s.child("Conv"), h, cfg.hidden_channels * cfg.channel_mult[-1])
    h = mid_block(s.child("MidBlock"), h, cfg)
    for i in reversed(range(levels)):
        block = s.child("UpsamplingBlock")
        for _ in range(cfg.num_res_blocks + 1):
            h = resnet_block(block.child("ResnetBlock"), h, cfg.num_groups, cfg.hidden_channels * cfg.channel_mult[i])
            if h.shape[1] in cfg.attn_resolutions:
                h = attn_block(block.child("AttnBlock"), h, cfg.num_groups)
        if i != 0:
            h = h.repeat(2, axis=1).repeat(2, axis=2)  # jax.image.resize "nearest" at exactly 2x
            h = conv(block.child("Upsample").child("Conv"), h, h.shape[-1])
    h = conv(s.child("Conv"), silu(group_norm(s.child("GroupNorm"), h, cfg.num_groups)), cfg.num_channels)
    return np.clip(h, -1, 1)


def lwm_tree(cfg, seed=0):
    """A random parameter tree with LWM's names and Flax layouts, made by running the model once (Flax's init)."""
    rng, params = np.random.default_rng(seed), {}
    x = np.zeros((1, cfg.resolution, cfg.resolution, cfg.num_channels))
    codes, _ = lwm_encode(FlaxScope(params, rng), x, cfg)
    lwm_decode(FlaxScope(params, rng), codes, cfg)
    return params


def flax_to_bytes(tree) -> bytes:
    """flax.serialization.to_bytes for a tree of numpy arrays: ext 1 = msgpack of (shape, dtype name, bytes)."""

    def ext(x):
        if isinstance(x, np.ndarray):
            return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True))
        raise TypeError(type(x))

    return msgpack.packb(tree, default=ext, strict_types=True)


@pytest.mark.parametrize("config", [TINY, TINY_ATTN], ids=["lwm_layout", "with_attention"])
def test_flax_checkpoint_round_trip(tmp_path, config):
    tree = lwm_tree(config)
    if config is TINY:
        assert set(tree) == {"encoder", "decoder", "quantize", "quant_conv", "post_quant_conv"}
        assert tree["decoder"]["UpsamplingBlock_0"]["ResnetBlock_0"]["Conv_0"]["kernel"].shape == (3, 3, 16, 16)
        assert "Conv_2" in tree["encoder"]["DownsamplingBlock_1"]["ResnetBlock_0"]  # 8 -> 16 shortcut
    (tmp_path / "vqgan.msgpack").write_bytes(flax_to_bytes({"params": tree}))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    main(["--input", str(tmp_path / "vqgan.msgpack"), "--out", str(tmp_path / "torch"),
          "--config", str(tmp_path / "config.json")])
    model = VQGAN.from_pretrained(tmp_path / "torch")

    # weights: every leaf used once, in PyTorch layout
    leaves = {}

    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            else:
                leaves[prefix + k] = v

    walk(tree)
    names = flax_param_names(model)
    assert sorted(names.values()) == sorted(leaves)
    state = model.state_dict()
    for torch_name, flax_name in names.items():
        src = leaves[flax_name]
        want = src.transpose(3, 2, 0, 1) if src.ndim == 4 else src
        assert np.array_equal(state[torch_name].numpy(), want), torch_name
    assert np.array_equal(model.encoder.conv_in.weight.detach().numpy(),
                          tree["encoder"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1))
    assert np.array_equal(model.decoder.up[-1].blocks[0].conv1.bias.detach().numpy(),
                          tree["decoder"]["UpsamplingBlock_0"]["ResnetBlock_0"]["Conv_0"]["bias"])

    # outputs: the NumPy re-run of LWM's model on the same tree
    x = pixels(2, 3, 32, 32, seed=1)
    ref_codes, margin = lwm_encode(FlaxScope(tree, None), x.permute(0, 2, 3, 1).double().numpy(), config)
    with torch.inference_mode():
        codes = model.encode(x).numpy()
        clear = margin > 1e-4  # far from a tie between two entries: fp32 and fp64 must agree
        assert clear.mean() > 0.9 and len(np.unique(ref_codes)) > 5
        assert np.array_equal(codes[clear], ref_codes[clear])
        out = model.decode(torch.from_numpy(ref_codes)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out, lwm_decode(FlaxScope(tree, None), ref_codes, config), atol=2e-5)


def test_reader_formats(tmp_path):
    tree = lwm_tree(TINY)
    from_msgpack = load_flax_vqgan(read_flax_msgpack(flax_to_bytes(tree)), TINY).state_dict()
    # LWM's own loader reads a pickle; FrozenDict-free trees of numpy arrays read without flax
    for protocol in (2, 4, 5):
        (tmp_path / "vqgan.pkl").write_bytes(pickle.dumps(tree, protocol=protocol))
        from_pickle = load_flax_vqgan(tmp_path / "vqgan.pkl", TINY).state_dict()
        assert all(torch.equal(from_msgpack[k], from_pickle[k]) for k in from_msgpack)

    # bfloat16 leaves (top half of a float32) and chunked arrays (flax's format for leaves over 2**30 bytes)
    values = np.array([1.5, -2.0, 3.140625], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    raw = msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb(((3,), "bfloat16", bf16.tobytes()))),
                         "b": {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 2},
                               "chunks": {"0": msgpack.ExtType(1, msgpack.packb(((3,), "float32", b"\0" * 12))),
                                          "1": msgpack.ExtType(1, msgpack.packb(((1,), "float32", values[:1].tobytes())))}}})
    restored = read_flax_msgpack(raw)
    np.testing.assert_array_equal(restored["a"], values)
    np.testing.assert_array_equal(restored["b"], [[0, 0], [0, 1.5]])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        read_flax_checkpoint(tmp_path / "evil.pkl")


def test_pickle_from_jax_reads_without_jax(monkeypatch):
    """A tree pickled in JAX (jax.Array leaves, FrozenDict nodes) reads without jax or flax: fake modules
    stand in for them while pickling, and are gone while reading."""

    def _reconstruct_array(fun, args, arr_state, aval_state):  # jax._src.array's signature
        raise AssertionError("the reader must not call jax")

    class FrozenDict(dict):
        def __reduce__(self):
            return FrozenDict, (dict(self),)  # as flax's FrozenDict

    class ArrayImpl:
        def __init__(self, value):
            self.value = value

        def __reduce__(self):  # as jax.Array
            fun, args, arr_state = self.value.__reduce__()
            return _reconstruct_array, (fun, args, arr_state, {"weak_type": False})

    modules = {name: types.ModuleType(name) for name in ("jax", "jax._src", "jax._src.array", "flax", "flax.core",
                                                          "flax.core.frozen_dict")}
    for obj, module in ((_reconstruct_array, "jax._src.array"), (FrozenDict, "flax.core.frozen_dict")):
        obj.__module__, obj.__qualname__ = module, obj.__name__
        setattr(modules[module], obj.__name__, obj)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    kernel = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    data = pickle.dumps(FrozenDict(params=FrozenDict(conv=FrozenDict(kernel=ArrayImpl(kernel)))))
    monkeypatch.undo()
    tree = read_flax_pickle(data)
    assert type(tree["params"]["conv"]) is dict and np.array_equal(tree["params"]["conv"]["kernel"], kernel)


def test_converter_names_the_problem():
    tree = lwm_tree(TINY)
    del tree["encoder"]["DownsamplingBlock_0"]["ResnetBlock_0"]["Conv_1"]["bias"]
    tree["encoder"]["Extra_0"] = {"kernel": np.zeros((1, 1, 8, 8), np.float32)}
    tree["decoder"]["Conv_0"]["kernel"] = np.zeros((3, 3, 8, 32), np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        load_flax_vqgan(tree, TINY)
    message = str(info.value)
    assert "missing (1)" in message and "encoder/DownsamplingBlock_0/ResnetBlock_0/Conv_1/bias" in message
    assert "unexpected (1)" in message and "encoder/Extra_0/kernel" in message
    assert "decoder/Conv_0/kernel: checkpoint (3, 3, 8, 32), config expects (3, 3, 8, 16)" in message
    with pytest.raises(CheckpointMismatchError, match=r"and \d+ more"):  # LWM's config on a small tree
        load_flax_vqgan(lwm_tree(TINY))
