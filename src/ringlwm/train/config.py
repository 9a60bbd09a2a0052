"""Typed training configuration: recipe files (YAML or TOML) -> dataclasses that validate themselves.

    config = load_config("recipes/tiny.yaml", overrides=["optim.lr=3e-4", "stages.0.steps=20"])

Unknown keys are errors (a typo should not silently train with a default). ``key=value`` overrides take
dotted paths; list items by index (``stages.1.seq_len=4096``); values are parsed as YAML
(``true``, ``1e-4``, ``[1, 2]``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib
import yaml

from ringlwm.constants import FSDP_UNITS, VISION_VOCAB_SIZE
from ringlwm.ring.layout import check_layout

_SOURCE_FORMATS = ("jsonl", "parquet", "text", "synthetic")


@dataclass
class ModelConfig:
    init: str = "random"
    """"random" (a new model of the shape below) or the path of a local Hugging Face Llama checkpoint."""
    vocab_size: int | None = None
    """Random init only: vocabulary size; None takes the tokenizer's."""
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    init_std: float = 0.02
    """Random init only: standard deviation of the weights."""
    mixed_precision: bool | None = None
    """bf16 compute with fp32 master weights and gradient reduction; None: on GPU yes, on CPU no."""
    activation_checkpointing: bool = False
    activation_offloading: bool = False
    """With activation_checkpointing: the checkpointed layer inputs wait in host memory (pinned, copied on a
    side stream) between the forward and the backward; exact (ringlwm.models.offload)."""
    offload_prefetch: bool = True
    """With activation_offloading: load the next layer's input during this layer's backward (one more layer
    input on the device); false: each recompute loads its own. Exact either way."""
    mlp_chunk_size: int | None = None
    """Blockwise feed-forward chunk (tokens); None: the whole local sequence at once."""
    norm_chunk_size: int | None = None
    """RMSNorm chunk (tokens), each recomputed in the backward, so its fp32 temporaries exist for one chunk;
    None: the whole local sequence at once."""
    loss_chunk_size: int = 4096
    """Blockwise cross-entropy chunk (tokens)."""
    attention_backend: str | None = None
    """Block kernel of the ring: "auto" (on GPUs the fastest measured by make gpu-check), "torch_flash" (torch's
    FlashAttention-2), "cudnn", "flash_attn" (the flash-attn package), "triton" (ringlwm's kernels), "cpu"; blocks
    a library kernel cannot express run on the next (a one-time notice). None: "auto" on GPUs, "cpu" on CPU."""
    attention_head_chunks: int | None = None
    """Run each layer's attention for heads / N at a time (the ring's fp32 accumulators, receive buffers and
    gradient blocks exist for one group of heads; the projections stay whole); exact. None: all heads."""
    ulysses_recompute: bool = False
    """With a stage's ulysses > 1: each layer's attention keeps Q, K and V as they came (all heads of this
    rank's piece, K/V heads not repeated) and runs their all-to-alls again in its backward, instead of keeping
    the all-to-alls' outputs; three more all-to-alls per layer; bitwise the same."""
    vision: bool = False
    """Train LWM's vision-language model (RingLwmForCausalLM: text and vision embeddings and heads). From a
    text checkpoint the vision table and head start new."""
    vision_vocab_size: int = VISION_VOCAB_SIZE
    """Vision vocabulary: 8192 VQGAN codes + 256 special ids (<eof> 8192, <eov> 8193), as LWM."""
    vision_loss_weight: float = 0.5
    text_loss_weight: float = 0.5
    """loss = vision_loss_weight * vision mean + text_loss_weight * text mean (LWM: 0.5 / 0.5)."""

    def __post_init__(self):
        if self.vision_loss_weight < 0 or self.text_loss_weight < 0:
            raise ValueError("model: vision_loss_weight and text_loss_weight must be non-negative")
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "loss_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        for name in ("mlp_chunk_size", "norm_chunk_size", "attention_head_chunks"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be a positive number of tokens or null (whole sequence), got "
                                 f"{getattr(self, name)}")
        if self.activation_offloading and not self.activation_checkpointing:
            raise ValueError("model.activation_offloading keeps the checkpointed layer inputs in host memory: it "
                             "needs model.activation_checkpointing: true")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model: hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}) and "
                f"num_heads by num_kv_heads ({self.num_kv_heads})"
            )
        if self.attention_backend is not None:
            from ringlwm.kernels import backend_names

            if self.attention_backend not in backend_names():
                raise ValueError(f"model.attention_backend {self.attention_backend!r} is not a block backend; known: "
                                 f"{', '.join(backend_names())} (or null: by device)")
        if self.init != "random" and not Path(self.init).is_dir():
            raise ValueError(f"model.init: no checkpoint directory at {self.init!r} (or use 'random')")
        if self.init != "random":
            from ringlwm.runtime import read_model_config

            read_model_config(self.init, vision=False, purpose="model.init")  # a Llama checkpoint, said early


@dataclass
class SourceConfig:
    path: str = ""
    """A JSONL or Parquet file, or a folder of .txt files; unused for "synthetic"."""
    format: str = "jsonl"
    """jsonl | parquet | text | synthetic (random-token documents, for smoke tests)."""
    fields: str = "text"
    """LWM field spec: "," separates segments, "+" joins fields, "[...]" has no loss: "[question],answer"."""
    weight: float = 1.0
    """Sampling ratio of this source in the mixture."""
    synthetic_lengths: list[int] = field(default_factory=lambda: [16, 256])
    """"synthetic" only: [min, max] document length in tokens."""
    vision: bool = False
    """Records hold VQGAN frames (pre-tokenized "vision" fields, LWM's token format); needs model.vision."""
    max_frames: int | None = None
    """Vision sources: keep at most this many frames per video (uniformly sampled), None: all."""

    def __post_init__(self):
        if self.format not in _SOURCE_FORMATS:
            raise ValueError(f"data source format must be one of {_SOURCE_FORMATS}, got {self.format!r}")
        if self.weight <= 0:
            raise ValueError(f"data source weight must be positive, got {self.weight}")
        if self.format != "synthetic" and not self.path:
            raise ValueError(f"a {self.format} data source needs a path")
        if self.format == "synthetic" and not (len(self.synthetic_lengths) == 2 and 1 <= self.synthetic_lengths[0]
                                               <= self.synthetic_lengths[1]):
            raise ValueError(f"synthetic_lengths must be [min, max] with 1 <= min <= max, got {self.synthetic_lengths}")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    tokenizer: str | None = None
    """A sentencepiece .model file or a local Hugging Face tokenizer directory (None only for synthetic data)."""
    seed: int = 0
    on_error: str = "raise"
    """Bad records: "raise" (stop with the file and line) or "skip" (count and go on)."""
    loss_weighting: str = "token"
    """How losses of packed documents are weighted (see ringlwm.data.packing): "token" or "example"."""

    def __post_init__(self):
        if not self.sources:
            raise ValueError("data.sources is empty: name at least one source")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.tokenizer is None and any(s.format != "synthetic" for s in self.sources):
            raise ValueError("data.tokenizer is required for text sources")


@dataclass
class StageConfig:
    name: str = "stage"
    seq_len: int = 1024
    """Tokens per sequence; the model's max_position_embeddings becomes at least this (never less than the
    init checkpoint's)."""
    rope_theta: float | None = None
    """RoPE base of this stage. None keeps the RoPE of the stage before (the first stage: the init
    checkpoint's RoPE, type and scaling fields included, or 10000 for a random init); a value changes the
    base only, never the RoPE type or its scaling fields."""
    steps: int = 100
    lr: float = 1e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    batch_size: int = 1
    """Sequences per data-parallel replica per micro-step."""
    grad_accum: int = 1
    batch_tokens: int | None = None
    """Global tokens per optimizer step; when set, grad_accum is derived from it (and must come out whole)."""
    sp: int = 1
    """Sequence-parallel degree (ring size) of this stage."""
    ulysses: int = 1
    """Ulysses degree of this stage: all-to-all over this many adjacent ranks inside each ring rank (the 2-D
    layout, ``ringlwm.ring.ulysses``); a sequence spans sp x ulysses ranks."""
    data: DataConfig | None = None
    """This stage's data; None: the recipe's top-level data."""

    def __post_init__(self):
        for name in ("seq_len", "steps", "batch_size", "grad_accum", "sp", "ulysses"):
            if getattr(self, name) < 1:
                raise ValueError(f"stage {self.name!r}: {name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or (self.rope_theta is not None and self.rope_theta <= 0):
            raise ValueError(f"stage {self.name!r}: lr and rope_theta must be positive")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"stage {self.name!r}: min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"stage {self.name!r}: warmup_steps must lie in [0, steps={self.steps}]")
        check_layout(self.seq_len, self.sp, self.ulysses, what=f"stage {self.name!r}: seq_len")

    def resolve_grad_accum(self, dp: int) -> int:
        if self.batch_tokens is None:
            return self.grad_accum
        per_micro = self.seq_len * self.batch_size * dp
        if self.batch_tokens % per_micro:
            raise ValueError(
                f"stage {self.name!r}: batch_tokens {self.batch_tokens} is not a multiple of seq_len x batch_size x "
                f"dp = {self.seq_len} x {self.batch_size} x {dp} = {per_micro}"
            )
        return self.batch_tokens // per_micro


@dataclass
class OptimConfig:
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables."""
    on_nonfinite: str = "stop"
    """A step whose loss or gradient norm is NaN or inf is never applied. "stop": the run stops with an error
    naming the step and the last good checkpoint, and writes nothing for that step; "skip": the step's gradients
    are dropped, training goes on, and the metrics count the skipped steps (``skipped_steps``)."""

    def __post_init__(self):
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.95]; got {self.betas}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be non-negative, got {self.weight_decay}")
        if self.eps <= 0:
            raise ValueError(f"optim.eps must be positive, got {self.eps}")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be non-negative (0 disables clipping), got {self.grad_clip}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"optim.on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1
    """-1: all ranks not used by dp_replicate x sp."""
    offload: str = "none"
    """"params": FSDP2's CPUOffloadPolicy: sharded parameters, gradients and AdamW state in (pinned) host
    memory, each unit's parameters gathered to the device when it runs, the optimizer step on the host (torch's
    fused CPU AdamW). "none": all on the device."""
    fsdp_units: str = "layers"
    """"layers": one FSDP2 unit per decoder layer (each layer's parameters gathered just before it runs and
    freed after). "model": the whole model one unit (one all-gather and one reduce-scatter per step, every
    parameter held in full through the step): for tiny models whose step is mostly per-unit overhead (the CPU
    demo). The same sharded parameters and checkpoints either way (a resumed run may change it); gradients are
    reduced in one buffer instead of one per unit (equal sums on 2 ranks; on more, gloo may add in another order)."""

    def __post_init__(self):
        if self.offload not in ("none", "params"):
            raise ValueError(f"parallel.offload must be 'none' or 'params', got {self.offload!r}")
        if self.fsdp_units not in FSDP_UNITS:
            raise ValueError(f"parallel.fsdp_units must be one of {FSDP_UNITS}, got {self.fsdp_units!r}")


@dataclass
class CheckpointConfig:
    enabled: bool = True
    """False: no checkpoints at all (benchmarks and smoke runs; such a run cannot resume)."""
    save_every: int = 0
    """Steps between checkpoints within a stage (0: only at the end of each stage)."""
    keep_last: int = 2
    """Checkpoints kept per run (stage-final checkpoints are always kept)."""
    export_hf: bool = True
    """Write the final model as a Hugging Face checkpoint to OUT/hf."""


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_project: str = "ringlwm"
    wandb_mode: str = "offline"
    """offline unless you say otherwise (WANDB_MODE in the environment wins)."""
    progress: bool = True
    """A progress bar on rank 0."""
    breakdown: bool = False
    """Time each step's phases (data, forward, backward, gradient norm, optimizer) into the metrics line as
    ``breakdown``; on GPU each phase ends with a device synchronisation, which costs a little overlap."""
    profile_steps: list[int] | None = None
    """[first, last] (1-based, inclusive): profile those steps with torch.profiler and write rank r's time by
    category (matmuls, attention kernels, communication, FSDP bookkeeping, host reads, optimizer, ...) to
    OUT/profile/rank{r}.json."""

    def __post_init__(self):
        steps = self.profile_steps
        if steps is not None and (len(steps) != 2 or not all(isinstance(x, int) and x >= 1 for x in steps)
                                  or steps[0] > steps[1]):
            raise ValueError(f"logging.profile_steps must be [first, last] with 1 <= first <= last, got {steps}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig | None = None
    stages: list[StageConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0

    def __post_init__(self):
        if not self.stages:
            raise ValueError("a recipe needs at least one stage")
        datas = [self.data] + [s.data for s in self.stages]
        if any(src.vision for d in datas if d is not None for src in d.sources) and not self.model.vision:
            raise ValueError("a data source has vision: true but model.vision is false (set model.vision: true)")
        if not self.checkpoint.enabled and len(self.stages) > 1:
            raise ValueError("checkpoint.enabled: false allows one stage only (each stage starts from the previous "
                             "stage's final checkpoint)")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for stage in self.stages:
            if stage.data is None and self.data is None:
                raise ValueError(f"stage {stage.name!r} has no data and the recipe has no top-level data")

    def stage_data(self, stage: StageConfig) -> DataConfig:
        return stage.data or self.data


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def _build(cls, value, where: str):
    """Recursively turn plain dicts/lists into the annotated dataclasses, naming the path on errors."""
    hints = typing.get_type_hints(cls)
    if not isinstance(value, dict):
        raise ValueError(f"{where or 'recipe'} must be a mapping, got {type(value).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(value) - names
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in {where or 'recipe'}; known: {sorted(names)}")
    kwargs = {}
    for key, item in value.items():
        kwargs[key] = _convert(hints[key], item, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _convert(hint, item, where):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if item is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], item, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, item, where)
    if origin is list:
        if not isinstance(item, list):
            raise ValueError(f"{where} must be a list, got {item!r}")
        return [_convert(args[0], x, f"{where}[{i}]") for i, x in enumerate(item)]
    if hint is float and isinstance(item, (int, float)) and not isinstance(item, bool):
        return float(item)
    if hint is float and isinstance(item, str):
        try:
            return float(item)  # YAML reads "1e-4" without a dot as a string
        except ValueError:
            pass
    # bool is a subclass of int in Python: `batch_size: true` must not become a batch of 1.
    if hint in (int, float, str, bool) and (not isinstance(item, hint) or (hint is not bool and isinstance(item, bool))):
        raise ValueError(f"{where} must be {hint.__name__}, got {item!r}")
    return item


def _apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise ValueError(f"override {override!r} is not key=value")
    key, raw = override.split("=", 1)
    value = yaml.safe_load(raw)
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"override {key!r}: no list index {part!r} (length {len(node)})")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if node is None:
                node = {}
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ValueError(f"override {key!r}: no list index {last!r}")
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    text = path.read_text()
    tree = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    tree = tree or {}
    for override in overrides:
        _apply_override(tree, override)
    return _build(TrainConfig, tree, "")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
