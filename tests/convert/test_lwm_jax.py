"""LWM JAX checkpoints -> Hugging Face: synthetic checkpoints written here in the streaming msgpack format
(tux/EasyLM StreamingCheckpointer, with LWM's parameter names), converted, and the converted models'
logits compared with a forward pass written here from LWM's own math (Flax kernel layout, interleaved
complex RoPE), so that neither the transposes nor the RoPE permutation are checked against themselves."""

from __future__ import annotations

import json
import math

import msgpack
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from ringlwm.convert.lwm_jax import (
    convert_checkpoint,
    halves_to_interleaved,
    interleaved_to_halves,
    iter_lwm_checkpoint,
    main,
)
from ringlwm.models import RingLlamaForCausalLM, rope_theta
from ringlwm.models.lwm import RingLwmForCausalLM

CONFIG = {"vocab_size": 61, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_sequence_length": 128, "rms_norm_eps": 1e-6, "theta": 5e7,
          "tie_word_embeddings": False, "vision_vocab_size": 300}


# ------------------------------------------------------------------------------------------------
# LWM's side, written independently of the converter
# ------------------------------------------------------------------------------------------------


def lwm_params(cfg, *, vision=False, seed=0):
    """Random weights under LWM's Flax names and shapes (Dense kernels are (in, out)), per layer."""
    gen = torch.Generator().manual_seed(seed)
    h, ffn, v, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    p = {"transformer/wte/embedding": rand(v, h, scale=1.0), "transformer/ln_f/kernel": 1 + rand(h),
         "lm_head/kernel": rand(h, v)}
    for i in range(layers):
        pre = f"transformer/h/{i}/"
        p.update({pre + "attention/wq/kernel": rand(h, h), pre + "attention/wk/kernel": rand(h, h),
                  pre + "attention/wv/kernel": rand(h, h), pre + "attention/wo/kernel": rand(h, h),
                  pre + "feed_forward/w1/kernel": rand(h, ffn), pre + "feed_forward/w3/kernel": rand(h, ffn),
                  pre + "feed_forward/w2/kernel": rand(ffn, h), pre + "attention_norm/kernel": 1 + rand(h),
                  pre + "ffn_norm/kernel": 1 + rand(h)})
    if vision:
        p["transformer/vte/embedding"] = rand(cfg["vision_vocab_size"], h, scale=1.0)
        p["vision_head/kernel"] = rand(h, cfg["vision_vocab_size"])
    return p


def stack_layers(p, layers, axis=0):
    """LWM's scan_layers layout: one transformer/h/scan_decoder/... stack per parameter."""
    out = {k: v for k, v in p.items() if not k.startswith("transformer/h/")}
    names = {k.split("/", 3)[3] for k in p if k.startswith("transformer/h/")}
    for name in names:
        out[f"transformer/h/scan_decoder/{name}"] = torch.stack([p[f"transformer/h/{i}/{name}"] for i in range(layers)],
                                                                dim=axis)
    return out


def write_streaming_msgpack(path, params, *, dtype="float32", prefix=(), extra=(), chunk=()):
    """tux/EasyLM StreamingCheckpointer format: packed (key path, flax.serialization.to_bytes(array)) pairs.
    to_bytes of an array: msgpack ExtType 1 of msgpack (shape, dtype name, C-order bytes); ``chunk`` names
    arrays written in flax's chunked form ({"__msgpack_chunked_array__", "shape", "chunks"})."""

    def ext(arr: np.ndarray):
        return msgpack.ExtType(1, msgpack.packb((list(arr.shape), dtype, arr.tobytes("C")), use_bin_type=True))

    def raw(t: torch.Tensor) -> np.ndarray:
        if dtype == "bfloat16":
            return t.to(torch.bfloat16).view(torch.int16).numpy()  # the bytes of bf16
        return t.numpy().astype(dtype)

    items = [(k.split("/"), v) for k, v in extra] + [([*prefix, *k.split("/")], v) for k, v in params.items()]
    with open(path, "wb") as f:
        for key, tensor in items:
            arr = raw(tensor)
            name = "/".join(key[len(prefix):])
            if name in chunk:
                flat = arr.reshape(-1)
                pieces = [flat[i:i + 100] for i in range(0, flat.size, 100)]
                value = {"__msgpack_chunked_array__": True, "shape": {str(i): d for i, d in enumerate(arr.shape)},
                         "chunks": {str(i): ext(c) for i, c in enumerate(pieces)}}
            else:
                value = ext(arr)
            f.write(msgpack.packb([key, msgpack.packb(value, use_bin_type=True)], use_bin_type=True))


def lwm_forward(p, cfg, ids, vision_mask=None):
    """LWM's FlaxLLaMA / FlaxVideoLLaMA forward in float64: x @ kernel, RMSNorm, RoPE on interleaved pairs as
    a complex multiply (lwm/llama.py apply_rotary_emb), causal softmax attention, SwiGLU; returns
    (text logits, vision logits or None)."""
    p = {k: v.double() for k, v in p.items()}
    h, heads, layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    hd, eps = h // heads, cfg["rms_norm_eps"]
    b, t = ids.shape
    if vision_mask is None:
        x = p["transformer/wte/embedding"][ids]
    else:
        text = p["transformer/wte/embedding"][ids.masked_fill(vision_mask, 0)]
        vis = p["transformer/vte/embedding"][ids.masked_fill(~vision_mask, 0)]
        x = torch.where(vision_mask[..., None], vis, text)
    freqs = 1.0 / (cfg["theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    cis = torch.polar(torch.ones(t, hd // 2, dtype=torch.float64), torch.outer(torch.arange(t).double(), freqs))

    def rope(z):  # (b, t, heads, hd): pairs (2i, 2i+1) are the real and imaginary parts
        zc = torch.view_as_complex(z.reshape(b, t, heads, hd // 2, 2).contiguous())
        return torch.view_as_real(zc * cis[None, :, None, :]).reshape(b, t, heads, hd)

    def norm(z, w):
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * w

    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(layers):
        w = {k.split("/", 3)[3]: v for k, v in p.items() if k.startswith(f"transformer/h/{i}/")}
        y = norm(x, w["attention_norm/kernel"])
        q = rope((y @ w["attention/wq/kernel"]).view(b, t, heads, hd))
        k = rope((y @ w["attention/wk/kernel"]).view(b, t, heads, hd))
        v = (y @ w["attention/wv/kernel"]).view(b, t, heads, hd)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        attn = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        x = x + torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, h) @ w["attention/wo/kernel"]
        y = norm(x, w["ffn_norm/kernel"])
        gate, up = F.silu(y @ w["feed_forward/w1/kernel"]), y @ w["feed_forward/w3/kernel"]
        x = x + (gate * up) @ w["feed_forward/w2/kernel"]
    x = norm(x, p["transformer/ln_f/kernel"])
    vision_logits = x @ p["vision_head/kernel"] if "vision_head/kernel" in p else None
    return x @ p["lm_head/kernel"], vision_logits


def relative_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_rope_permutation_round_trip():
    w = torch.randn(4 * 8, 5)
    halves = interleaved_to_halves(w, 4)
    assert torch.equal(halves[:4], w[[0, 2, 4, 6]]) and torch.equal(halves[4:8], w[[1, 3, 5, 7]])
    assert torch.equal(halves_to_interleaved(halves, 4), w)


def test_text_checkpoint_cli(tmp_path):
    """Per-layer names, fp32, a JSON config: the converted model in plain LlamaForCausalLM and in
    RingLlamaForCausalLM gives LWM's logits."""
    params = lwm_params(CONFIG)
    ckpt, cfg_file, out = tmp_path / "params", tmp_path / "lwm.json", tmp_path / "hf"
    write_streaming_msgpack(ckpt, params)
    cfg_file.write_text(json.dumps({k: v for k, v in CONFIG.items() if k != "theta"}))
    main(["--input", f"params::{ckpt}", "--config", str(cfg_file), "--out", str(out), "--theta", "5e7"])
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    ref, _ = lwm_forward(params, CONFIG, ids)
    hf = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    assert hf.config.max_position_embeddings == 128 and rope_theta(hf.config) == 5e7
    assert hf.config.rms_norm_eps == 1e-6 and hf.config.bos_token_id == 1 and hf.config.eos_token_id == 2
    with torch.no_grad():
        assert relative_error(hf(input_ids=ids).logits, ref) < 1e-5
        ring = RingLlamaForCausalLM.from_pretrained(out)
        assert relative_error(ring(ids, return_logits=True).logits, ref) < 1e-5


def test_vision_checkpoint_scan_layers_trainstate_bf16(tmp_path):
    """LWM's released layout: layers stacked (scan_layers), here inside a train state with optimizer
    entries, in bf16, with one array in flax's chunked form; the vision-language model's two heads."""
    params = lwm_params(CONFIG, vision=True, seed=2)
    params = {k: v.to(torch.bfloat16).float() for k, v in params.items()}  # values exact in bf16
    stacked = stack_layers(params, CONFIG["num_hidden_layers"], axis=1)
    ckpt = tmp_path / "train_state"
    extra = [("opt_state/1/0/mu/transformer/wte/embedding", torch.zeros(3)), ("step", torch.zeros(()))]
    write_streaming_msgpack(ckpt, stacked, dtype="bfloat16", prefix=("params", "params"), extra=extra,
                            chunk={"transformer/vte/embedding"})
    keys = [k for k, _ in iter_lwm_checkpoint(ckpt)]
    assert ("transformer", "vte", "embedding") in keys and not any(k[0] in ("opt_state", "step") for k in keys)
    out = convert_checkpoint(f"trainstate::{ckpt}", "debug", tmp_path / "hf", vision=True,
                             **{k: CONFIG[k] for k in CONFIG if k != "tie_word_embeddings"}, param_scan_axis=1)
    model = RingLwmForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.vision_vocab_size == 300 and rope_theta(model.config) == 5e7
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 32), generator=gen)
    vision = torch.zeros(2, 32, dtype=torch.bool)
    vision[:, 6:20] = True
    ids = torch.where(vision, torch.randint(0, 300, (2, 32), generator=gen), ids)
    ref_text, ref_vision = lwm_forward(params, CONFIG, ids, vision)
    with torch.no_grad():
        out = model(ids, vision_mask=vision, return_logits=True)
    assert relative_error(out.logits, ref_text) < 1e-5
    assert relative_error(out.vision_logits, ref_vision) < 1e-5


def test_errors_name_what_is_wrong(tmp_path):
    params = lwm_params(CONFIG, vision=True)
    ckpt = tmp_path / "params"
    write_streaming_msgpack(ckpt, params)
    with pytest.raises(ValueError, match=r"unexpected parameters .*--vision.*vision_head/kernel"):
        convert_checkpoint(ckpt, CONFIG, tmp_path / "a")
    text_only = {k: v for k, v in params.items() if not k.startswith(("transformer/vte", "vision_head"))}
    del text_only["transformer/h/1/ffn_norm/kernel"]
    write_streaming_msgpack(ckpt, text_only)
    with pytest.raises(ValueError, match=r"missing parameters .*transformer/h/1/ffn_norm/kernel"):
        convert_checkpoint(ckpt, CONFIG, tmp_path / "b")
    write_streaming_msgpack(ckpt, {k: v for k, v in params.items() if not k.startswith(("transformer/vte", "vision"))})
    with pytest.raises(ValueError, match="a text checkpoint"):
        convert_checkpoint(ckpt, CONFIG, tmp_path / "c", vision=True)
    write_streaming_msgpack(ckpt, params)
    with pytest.raises(ValueError, match=r"shape \(32, 48\) .* gives \(32, 64\)"):
        convert_checkpoint(ckpt, {**CONFIG, "intermediate_size": 64}, tmp_path / "d", vision=True)
    (tmp_path / "junk").write_bytes(msgpack.packb({"not": "a checkpoint"}))
    with pytest.raises(ValueError, match="not a streaming msgpack checkpoint"):
        list(iter_lwm_checkpoint(tmp_path / "junk"))
    with pytest.raises(SystemExit):
        main(["--input", str(ckpt), "--config", "no-such-config", "--out", str(tmp_path / "e")])
