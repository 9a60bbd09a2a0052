"""LWM's released JAX checkpoints (streaming msgpack) -> Hugging Face checkpoint directories.

    # text (LWM-Text-*-Jax): loads in LlamaForCausalLM and RingLlamaForCausalLM
    python -m ringlwm.convert.lwm_jax --input LWM-Text-1M-Jax/params --config 7b \\
        --theta 5e7 --max-sequence-length 1048576 --out lwm-text-1m
    # vision-language (LWM-*-Jax): loads in RingLwmForCausalLM
    python -m ringlwm.convert.lwm_jax --input LWM-1M-Jax/params --config 7b \\
        --theta 5e7 --max-sequence-length 1048576 --vision --out lwm-1m

--config: a name of LWM's standard configs (``LWM_CONFIGS``: "7b", "debug", ...) or a JSON file of LWM's
config fields (``LLaMAConfig``/``VideoLLaMAConfig`` names: max_sequence_length, theta, rms_norm_eps, ...;
"json::PATH" as LWM spells it works too). LWM's scripts load "7b" and set theta and max_sequence_length
on top (``update_llama_config``): --theta, --max-sequence-length and --set KEY=VALUE do that here.
Output: config.json, model*.safetensors (5 GB shards), and with --tokenizer a copy of the
sentencepiece model as tokenizer.model. Memory: the converted weights plus one source tensor (the
largest is a stacked scan kernel: layers x hidden x ffn).

The input format (tux's / EasyLM's ``StreamingCheckpointer``): msgpack-packed (key path, value) pairs one
after another; each value is ``flax.serialization.to_bytes(array)`` (read by ``flax_msgpack.py``: msgpack
ExtType 1 holding the msgpack of (shape, dtype name, C-order bytes); an array over flax's chunk size is a
dict of chunks). The key paths of
a "params" file start at the model (``transformer/wte/embedding``); those of a "trainstate" file start
with ``params/params`` beside the optimizer state, which is skipped. "params::PATH" and
"trainstate::PATH" (LWM's ``load_checkpoint`` spelling) are accepted.

Parameter names (``lwm/llama.py``, ``lwm/vision_llama.py``) -> ringlwm / Hugging Face names:

    transformer/wte/embedding (V, H)                 model.embed_tokens.weight
    transformer/vte/embedding (8448, H)   [vision]   vision_embed_tokens.weight
    transformer/h/{i}/attention/w{q,k,v,o}/kernel    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    transformer/h/{i}/feed_forward/w{1,3,2}/kernel   model.layers.{i}.mlp.{gate,up,down}_proj.weight
    transformer/h/{i}/attention_norm/kernel          model.layers.{i}.input_layernorm.weight
    transformer/h/{i}/ffn_norm/kernel                model.layers.{i}.post_attention_layernorm.weight
    transformer/ln_f/kernel                          model.norm.weight
    lm_head/kernel (H, V)                            lm_head.weight
    vision_head/kernel (H, 8448)          [vision]   vision_head.weight

With ``scan_layers`` (LWM's default; its scripts run the released models so) the layers are one stack,
``transformer/h/scan_decoder/...``, with the layer axis at ``param_scan_axis`` (0 unless the config says).

Two layout changes. Flax ``Dense`` kernels are (in, out) and torch ``Linear`` weights (out, in): transposed.
RoPE: LWM rotates interleaved pairs (x[2i], x[2i+1]) of each head by frequency i (a complex multiply,
``apply_rotary_emb``); HF Llama rotates halves (x[i], x[i + d/2]) by the same frequencies
theta^(-2i/d) with the same signs. Moving output row 2i of wq and wk to row i and row 2i+1 to row
i + d/2, within each head, turns one into the other; q.k is unchanged because q and k are permuted
alike, so wv and wo stay as they are.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from transformers import LlamaConfig

from ringlwm.constants import VISION_VOCAB_SIZE
from ringlwm.convert.flax_msgpack import import_msgpack, unpack
from ringlwm.models.llama import set_context_length

# LWM's LLAMA_STANDARD_CONFIGS (lwm/llama.py); VideoLLaMAConfig adds vision_vocab_size 8448.
_BASE = {"initializer_range": 0.02, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "vocab_size": 32000}
LWM_CONFIGS = {
    "debug": {**_BASE, "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
              "max_sequence_length": 2048},
    "200m": {**_BASE, "hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 14,
             "num_attention_heads": 8, "max_sequence_length": 2048},
    "1b": {**_BASE, "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 22, "num_attention_heads": 16,
           "max_sequence_length": 2048},
    "3b": {**_BASE, "hidden_size": 3200, "intermediate_size": 8640, "num_hidden_layers": 26, "num_attention_heads": 32,
           "max_sequence_length": 2048},
    "7b": {**_BASE, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "max_sequence_length": 4096},
    "13b": {**_BASE, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
            "num_attention_heads": 40, "max_sequence_length": 2048},
}
LWM_DEFAULTS = {"theta": 10000.0, "vision_vocab_size": VISION_VOCAB_SIZE, "scan_layers": True, "param_scan_axis": 0,
                "tie_vision_embeddings": False}
# LWM's LLaMAConfig defaults bos/eos to 0/1, and its trainer overwrites them with the tokenizer's: Llama-2's
# 1/2. A config without them (the standard names) gets the tokenizer's.
LLAMA_BOS_ID, LLAMA_EOS_ID = 1, 2

_ARG_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (LWM path inside a layer) -> (HF name inside model.layers.{i}, how: "norm" as is, "t" transposed,
# "rope" transposed and RoPE-permuted)
_LAYER_PARAMS = {
    ("attention", "wq", "kernel"): ("self_attn.q_proj.weight", "rope"),
    ("attention", "wk", "kernel"): ("self_attn.k_proj.weight", "rope"),
    ("attention", "wv", "kernel"): ("self_attn.v_proj.weight", "t"),
    ("attention", "wo", "kernel"): ("self_attn.o_proj.weight", "t"),
    ("feed_forward", "w1", "kernel"): ("mlp.gate_proj.weight", "t"),
    ("feed_forward", "w3", "kernel"): ("mlp.up_proj.weight", "t"),
    ("feed_forward", "w2", "kernel"): ("mlp.down_proj.weight", "t"),
    ("attention_norm", "kernel"): ("input_layernorm.weight", "norm"),
    ("ffn_norm", "kernel"): ("post_attention_layernorm.weight", "norm"),
}
_TOP_PARAMS = {
    ("transformer", "wte", "embedding"): ("model.embed_tokens.weight", "norm"),
    ("transformer", "ln_f", "kernel"): ("model.norm.weight", "norm"),
    ("lm_head", "kernel"): ("lm_head.weight", "t"),
}
_VISION_PARAMS = {
    ("transformer", "vte", "embedding"): ("vision_embed_tokens.weight", "norm"),
    ("vision_head", "kernel"): ("vision_head.weight", "t"),
}
SCAN_NAME = "scan_decoder"


# ------------------------------------------------------------------------------------------------
# Reading the streaming msgpack format
# ------------------------------------------------------------------------------------------------


def _checkpoint_path(path) -> Path:
    text = str(path)
    if "::" in text:
        kind, text = text.split("::", 1)
        if kind not in ("params", "trainstate", "trainstate_params"):
            raise ValueError(f"unknown LWM checkpoint type {kind!r} in {path!r} (params::, trainstate:: or a path)")
    p = Path(text)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint file at {p}")
    return p


def iter_lwm_checkpoint(path) -> Iterator[tuple[tuple[str, ...], torch.Tensor]]:
    """(key path, tensor) for every model parameter of a streaming msgpack checkpoint, in file order.

    Key paths are relative to the model (("transformer", "wte", "embedding"), ...): a train state's
    ("params", "params", ...) prefix is dropped and its optimizer state skipped without being decoded.
    Tensors keep the stored dtype (bfloat16 included) and the Flax layout."""
    msgpack = import_msgpack()
    path = _checkpoint_path(path)
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, read_size=64 << 20, max_buffer_size=1 << 40, raw=False)
        for index, item in enumerate(unpacker):
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (list, tuple))
                    and isinstance(item[1], bytes)):
                raise ValueError(f"{path}: item {index} is not a (key path, serialized array) pair; not a "
                                 "streaming msgpack checkpoint (tux/EasyLM StreamingCheckpointer)?")
            key = tuple(str(k) for k in item[0])
            if key[:1] == ("params",):
                key = key[2:] if key[1:2] == ("params",) else key[1:]
            elif key[:1] in (("opt_state",), ("step",)):
                continue  # train-state entries that are not model parameters
            value = unpack(item[1])
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{path}: {'/'.join(key)} holds a {type(value).__name__}, not an array")
            yield key, value


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


def load_lwm_config(config: str | Path | dict, **overrides) -> dict:
    """LWM's config fields: a standard name ("7b"), a JSON file (or "json::PATH"), or a dict; then the
    overrides (e.g. theta=5e7, max_sequence_length=1048576), then LWM's defaults for what is unset."""
    if isinstance(config, dict):
        fields = dict(config)
    elif str(config) in LWM_CONFIGS:
        fields = dict(LWM_CONFIGS[str(config)])
    else:
        text = str(config)
        path = Path(text.split("::", 1)[1] if text.startswith("json::") else text)
        if not path.is_file():
            raise ValueError(f"--config {config!r} is neither a file nor one of LWM's configs {sorted(LWM_CONFIGS)}")
        fields = json.loads(path.read_text())
        if "llama_config" in fields:  # LWM's checkpoint metadata holds the config under this key
            fields = fields["llama_config"]
    fields.update({k: v for k, v in overrides.items() if v is not None})
    for key, value in LWM_DEFAULTS.items():
        fields.setdefault(key, value)
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "max_sequence_length") if k not in fields]
    if missing:
        raise ValueError(f"LWM config lacks {missing}")
    return fields


def hf_config(lwm: dict, *, vision: bool = False) -> LlamaConfig:
    """The Hugging Face config of an LWM config: ``LlamaConfig`` (text) or ``LwmConfig`` (vision)."""
    if vision and lwm.get("tie_vision_embeddings"):
        raise ValueError("tie_vision_embeddings=True is not supported (LWM's released models do not tie)")
    heads = int(lwm["num_attention_heads"])
    kwargs = dict(
        vocab_size=int(lwm["vocab_size"]), hidden_size=int(lwm["hidden_size"]),
        intermediate_size=int(lwm["intermediate_size"]), num_hidden_layers=int(lwm["num_hidden_layers"]),
        num_attention_heads=heads, num_key_value_heads=int(lwm.get("num_key_value_heads") or heads),
        max_position_embeddings=int(lwm["max_sequence_length"]), rms_norm_eps=float(lwm.get("rms_norm_eps", 1e-6)),
        initializer_range=float(lwm.get("initializer_range", 0.02)),
        tie_word_embeddings=bool(lwm.get("tie_word_embeddings", False)), hidden_act="silu", attention_dropout=0.0,
        bos_token_id=int(lwm.get("bos_token_id", LLAMA_BOS_ID)),
        eos_token_id=int(lwm.get("eos_token_id", LLAMA_EOS_ID)),
    )
    if vision:
        from ringlwm.models.lwm import LwmConfig

        config = LwmConfig(vision_vocab_size=int(lwm["vision_vocab_size"]), **kwargs)
        config.architectures = ["RingLwmForCausalLM"]
    else:
        config = LlamaConfig(**kwargs)
        config.architectures = ["LlamaForCausalLM"]
    set_context_length(config, kwargs["max_position_embeddings"], rope_theta=float(lwm["theta"]))
    return config


# ------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------


def interleaved_to_halves(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """RoPE layout change of a q or k projection, torch layout (num_heads * head_dim, in): within each head,
    output row 2i moves to row i and row 2i+1 to row i + head_dim/2 (interleaved pairs -> halves)."""
    rows, cols = weight.shape
    head_dim = rows // num_heads
    if rows % num_heads or head_dim % 2:
        raise ValueError(f"cannot split {rows} rows into {num_heads} heads of an even head_dim")
    return weight.reshape(num_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_interleaved(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of ``interleaved_to_halves`` (HF -> LWM)."""
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def _expected_shapes(config: LlamaConfig, vision: bool) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax shapes of every parameter LWM's model has, per layer (not stacked)."""
    h, ffn, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {("transformer", "wte", "embedding"): (vocab, h), ("transformer", "ln_f", "kernel"): (h,)}
    if not config.tie_word_embeddings:
        shapes[("lm_head", "kernel")] = (h, vocab)
    if vision:
        shapes[("transformer", "vte", "embedding")] = (config.vision_vocab_size, h)
        shapes[("vision_head", "kernel")] = (h, config.vision_vocab_size)
    per_layer = {("attention", "wq", "kernel"): (h, q), ("attention", "wk", "kernel"): (h, kv),
                 ("attention", "wv", "kernel"): (h, kv), ("attention", "wo", "kernel"): (q, h),
                 ("feed_forward", "w1", "kernel"): (h, ffn), ("feed_forward", "w3", "kernel"): (h, ffn),
                 ("feed_forward", "w2", "kernel"): (ffn, h), ("attention_norm", "kernel"): (h,),
                 ("ffn_norm", "kernel"): (h,)}
    for i in range(config.num_hidden_layers):
        for rest, shape in per_layer.items():
            shapes[("transformer", "h", str(i), *rest)] = shape
    return shapes


def _to_torch_layout(value: torch.Tensor, how: str, num_heads: int, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None:
        value = value.to(dtype)
    if how == "norm":
        return value.clone()  # own the memory (the source tensor views the file's bytes)
    value = value.t()
    if how == "rope":
        value = interleaved_to_halves(value, num_heads)
    return value.contiguous()


def convert_lwm_params(
    items: Iterable[tuple[tuple[str, ...], torch.Tensor]],
    config: LlamaConfig,
    *,
    vision: bool = False,
    param_scan_axis: int = 0,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """ringlwm / Hugging Face state dict from LWM's (key path, Flax tensor) pairs (``iter_lwm_checkpoint``).

    Layers come per layer (``transformer/h/{i}/...``) or stacked (``transformer/h/scan_decoder/...``, layer
    axis ``param_scan_axis``). Every tensor's shape is checked against ``config``; missing or unexpected
    parameters raise a ValueError naming them. dtype: cast to it (None: keep the stored dtype)."""
    expected = _expected_shapes(config, vision)
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, ...]] = set()
    unexpected: list[str] = []

    def place(key: tuple[str, ...], value: torch.Tensor) -> None:
        if key not in expected:
            unexpected.append("/".join(key))
            return
        if tuple(value.shape) != expected[key]:
            raise ValueError(f"{'/'.join(key)}: shape {tuple(value.shape)} in the checkpoint, the config gives "
                             f"{expected[key]} (Flax layout); is --config the checkpoint's?")
        if key in seen:
            raise ValueError(f"{'/'.join(key)} appears twice in the checkpoint")
        seen.add(key)
        if key[:2] == ("transformer", "h"):
            name, how = _LAYER_PARAMS[key[3:]]
            name = f"model.layers.{key[2]}.{name}"
            heads = config.num_attention_heads if key[4] == "wq" else config.num_key_value_heads
        else:
            name, how = {**_TOP_PARAMS, **_VISION_PARAMS}[key]
            heads = 0
        state[name] = _to_torch_layout(value, how, heads, dtype)

    for key, value in items:
        if key[:3] == ("transformer", "h", SCAN_NAME):
            layers = config.num_hidden_layers
            if value.dim() < 2 or param_scan_axis >= value.dim() or value.shape[param_scan_axis] != layers:
                raise ValueError(f"{'/'.join(key)}: shape {tuple(value.shape)} has no axis {param_scan_axis} of "
                                 f"{layers} layers (scan_layers checkpoint; set param_scan_axis if it differs)")
            for i, layer_value in enumerate(value.unbind(param_scan_axis)):
                place(("transformer", "h", str(i), *key[3:]), layer_value)
        else:
            place(key, value)

    if unexpected:
        hint = ""
        if not vision and any(k.startswith(("transformer/vte", "vision_head")) for k in unexpected):
            hint = " (vision-language checkpoint: convert with vision=True / --vision)"
        raise ValueError(f"unexpected parameters in the checkpoint{hint}: {sorted(unexpected)[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
    missing = ["/".join(k) for k in expected if k not in seen]
    if missing:
        hint = ""
        if vision and all(k.startswith(("transformer/vte", "vision_head")) for k in missing):
            hint = " (a text checkpoint? convert without --vision)"
        raise ValueError(f"missing parameters in the checkpoint{hint}: {missing[:10]}"
                         f"{f' ... ({len(missing)} in all)' if len(missing) > 10 else ''}")
    return state


def convert_checkpoint(
    input_path,
    config: str | Path | dict,
    out_dir,
    *,
    vision: bool = False,
    dtype: torch.dtype | None = None,
    tokenizer=None,
    max_shard_size: str = "5GB",
    **config_overrides,
) -> Path:
    """Convert one LWM JAX checkpoint into ``out_dir`` (config.json, safetensors); returns ``out_dir``.

    config_overrides: LWM config fields set on top of ``config`` (theta, max_sequence_length, ...).
    tokenizer: a sentencepiece model file copied to ``out_dir/tokenizer.model`` (optional)."""
    from huggingface_hub import save_torch_state_dict

    lwm = load_lwm_config(config, **config_overrides)
    hf = hf_config(lwm, vision=vision)
    state = convert_lwm_params(iter_lwm_checkpoint(input_path), hf, vision=vision,
                               param_scan_axis=int(lwm["param_scan_axis"]), dtype=dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.dtype = next(iter(state.values())).dtype
    hf.save_pretrained(out)
    save_torch_state_dict(state, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ringlwm.convert.lwm_jax", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="streaming msgpack checkpoint (params::PATH accepted)")
    parser.add_argument("--config", required=True, help=f"LWM config: JSON file or one of {sorted(LWM_CONFIGS)}")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vision", action="store_true", help="a vision-language checkpoint (RingLwmForCausalLM)")
    parser.add_argument("--theta", type=float,
                        help="RoPE theta (LWM: 1e7 for 128K/256K, 2.5e7 for 512K, 5e7 for 1M and vision)")
    parser.add_argument("--max-sequence-length", type=int, help="context length (max_position_embeddings)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other LWM config field, e.g. --set param_scan_axis=1")
    parser.add_argument("--dtype", choices=sorted(_ARG_DTYPES), help="cast the weights (default: as stored)")
    parser.add_argument("--tokenizer", help="sentencepiece tokenizer.model to copy beside the weights")
    args = parser.parse_args(argv)
    overrides = _parse_set(args.set)
    overrides.update(theta=args.theta, max_sequence_length=args.max_sequence_length)
    try:
        out = convert_checkpoint(args.input, args.config, args.out, vision=args.vision,
                                 dtype=_ARG_DTYPES.get(args.dtype), tokenizer=args.tokenizer, **overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
