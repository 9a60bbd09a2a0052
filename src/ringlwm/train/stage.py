"""One training stage's state, built once: ``build_stage`` makes a ``StageRun`` (where this rank sits, the model
config, the sharded and filled model, its optimizer, the loader) and ``StageRun.restore`` fills it from the
checkpoint a run resumes from, or from the previous stage's final one.

Per stage (progressive context extension): build the mesh for the stage's sp degree, build the model on the
meta device with the stage's length and RoPE theta, shard it (FSDP2), fill it (first stage: the init
checkpoint or a seeded random init, broadcast from rank 0; later stages: the previous stage's final
checkpoint through DCP, resharded). The planner builds its model with the same ``build_model`` and
``build_optimizer``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import LlamaConfig

from ringlwm.models import check_attention_heads, set_context_length
from ringlwm.models.lwm import lwm_config_from_text
from ringlwm.parallel import ParallelDims, materialize, parallelize_llama
from ringlwm.registry import training_class
from ringlwm.runtime import load_model, read_model_config
from ringlwm.train.checkpoint import Checkpointer, set_rng_state
from ringlwm.train.config import StageConfig, TrainConfig
from ringlwm.train.data import build_loader, load_data_tokenizer


def init_checkpoint_config(config: TrainConfig) -> dict | None:
    """The ``config.json`` of ``model.init``, checked (a text Llama checkpoint with weights) and read once per
    stage build; None for a random init."""
    if config.model.init == "random":
        return None
    return read_model_config(config.model.init, vision=False, purpose="model.init")


def stage_model_config(config: TrainConfig, index: int, vocab_size: int | None,
                       init_config: dict | None = None) -> LlamaConfig:
    """The model config of stage ``index``. RoPE: the init checkpoint's parameters (type, theta, scaling
    fields; a random init: default RoPE, theta 10000), with theta set by the last stage up to ``index`` that
    sets ``rope_theta``. max_position_embeddings: the longest of the checkpoint's and every stage's so far,
    so that it never drops below what the model was trained for. ``init_config``: the init checkpoint's
    ``config.json`` as ``init_checkpoint_config`` read it (read here when not given)."""
    m = config.model
    if m.init == "random":
        if vocab_size is None:
            raise ValueError("model.vocab_size is needed for a random init without a tokenizer")
        model_config = LlamaConfig(vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                                   num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                                   num_key_value_heads=m.num_kv_heads, initializer_range=m.init_std,
                                   tie_word_embeddings=False, attention_dropout=0.0)
    else:
        model_config = LlamaConfig.from_dict(init_config or init_checkpoint_config(config))
        if vocab_size is not None and vocab_size > model_config.vocab_size:
            raise ValueError(f"the tokenizer has {vocab_size} tokens but the checkpoint's vocabulary is {model_config.vocab_size}")
    theta = next((s.rope_theta for s in reversed(config.stages[:index + 1]) if s.rope_theta is not None), None)
    longest = max(s.seq_len for s in config.stages[:index + 1])
    if m.init != "random":
        longest = max(longest, model_config.max_position_embeddings)
    set_context_length(model_config, longest, rope_theta=theta)
    options = {"loss_chunk_size": m.loss_chunk_size, "mlp_chunk_size": m.mlp_chunk_size,
               "norm_chunk_size": m.norm_chunk_size, "activation_checkpointing": m.activation_checkpointing,
               "activation_offloading": m.activation_offloading, "attention_backend": m.attention_backend,
               "attention_head_chunks": m.attention_head_chunks, "offload_prefetch": m.offload_prefetch,
               "ulysses_recompute": m.ulysses_recompute}
    if m.vision:
        model_config = lwm_config_from_text(model_config, vision_vocab_size=m.vision_vocab_size,
                                            vision_loss_weight=m.vision_loss_weight, text_loss_weight=m.text_loss_weight)
    model_config.ringlwm_options = options
    return model_config


def model_class(config: TrainConfig):
    """The class a recipe trains (``ringlwm.registry``: the vision-language one with ``model.vision``)."""
    return training_class(config.model.vision)


def initial_state_dict(config: TrainConfig, model_config: LlamaConfig, init_config: dict | None = None) -> dict | None:
    """The first stage's weights, on rank 0 only (broadcast shard by shard by ``materialize``): a seeded random
    init, or the init checkpoint's (a text checkpoint under ``model.vision``: the shared weights, with the
    vision table and head seeded new)."""
    if dist.get_rank() != 0:
        return None
    cls = model_class(config)
    if config.model.init == "random":
        torch.manual_seed(config.seed)
        return cls(model_config).state_dict()
    text = load_model(config.model.init, dtype=torch.float32, vision=False, purpose="model.init",
                      config=init_config).state_dict()
    if not config.model.vision:
        return text
    torch.manual_seed(config.seed)
    model = cls(model_config)
    missing = set(model.state_dict()) - set(text)
    model.load_state_dict(text, strict=False)
    if not missing <= {"vision_embed_tokens.weight", "vision_head.weight"}:
        raise ValueError(f"{config.model.init} lacks weights {sorted(missing)}")
    return model.state_dict()


def build_model(cls, model_config: LlamaConfig, fsdp_mesh, device: torch.device, *, mixed: bool,
                state: dict | None = None, broadcast: bool = False, tensors=None, offload: bool = False,
                fsdp_units: str = "layers") -> torch.nn.Module:
    """``cls(model_config)`` built on the meta device, sharded with FSDP2 over ``fsdp_mesh`` (activation
    checkpointing and the other memory options are model options) and materialised on ``device``: filled from
    ``state`` (rank 0's, broadcast when ``broadcast``), else left to the caller (a checkpoint load).
    ``tensors``: a mode to materialise in (the planner's FakeTensorMode; the mesh is made outside it).
    ``offload``: parameters, gradients and optimizer state in host memory (``parallel.offload: params``);
    ``fsdp_units``: ``parallel.fsdp_units``."""
    with torch.device("meta"):
        model = cls(model_config)
    parallelize_llama(model, fsdp_mesh, mixed_precision=mixed, offload=offload, units=fsdp_units)
    with tensors or contextlib.nullcontext():
        materialize(model, device, state, broadcast=broadcast, offload=offload)
    return model


def build_optimizer(config: TrainConfig, model, lr: float) -> torch.optim.Optimizer:
    """AdamW over the (sharded) parameters: weight decay on matrices, none on vectors (norms). With
    ``parallel.offload: params`` the parameters are host tensors and the step is torch's fused CPU AdamW."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    fused = {"fused": True} if config.parallel.offload == "params" else {}
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=tuple(config.optim.betas), eps=config.optim.eps, **fused,
    )


def rope_summary(model_config: LlamaConfig) -> dict:
    """The RoPE a stage trains with: its rope_parameters and max_position_embeddings."""
    params = dict(getattr(model_config, "rope_parameters", None) or {})
    return {**params, "max_position_embeddings": model_config.max_position_embeddings}


@dataclass
class StageRun:
    """One stage's state, built once by ``build_stage``: where this rank sits (``dims``, the ring's group), the
    model config it trains with, the sharded model, its optimizer, the loader, and the stage's place in the run
    (``offset``: the optimizer steps of the stages before it)."""

    config: TrainConfig
    index: int
    dims: ParallelDims
    sp_group: dist.ProcessGroup
    ulysses_group: dist.ProcessGroup | None
    model_config: LlamaConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: object
    data_cfg: object
    device: torch.device
    offset: int

    @property
    def stage(self) -> StageConfig:
        return self.config.stages[self.index]

    @property
    def world(self) -> int:
        return self.dims.world_size

    @property
    def rope(self) -> dict:
        return rope_summary(self.model_config)

    @property
    def parallel(self) -> dict:
        """The layout a checkpoint records, and that a resume inside the stage must match."""
        layout = {"sp": self.dims.sp, "dp": self.dims.dp}
        return {**layout, "ulysses": self.dims.ulysses} if self.dims.ulysses > 1 else layout

    def restore(self, checkpointer: Checkpointer, resume) -> int:
        """Fill the stage from the checkpoint the run resumes from (``resume``: inside this stage, with its
        optimizer, loader and RNG state) or, for a stage after the first, from the previous stage's final
        checkpoint (weights only, resharded). Returns the stage step to start from."""
        if resume is not None and resume.stage == self.index:
            if resume.world_size != self.world or resume.parallel != self.parallel:
                raise ValueError(f"{resume.path} was written with world size {resume.world_size} and "
                                 f"{resume.parallel}; resuming inside a stage needs the same layout")
            extra = checkpointer.load(resume, self.model, self.optimizer)
            self.loader.load_state_dict(extra["loader"])
            set_rng_state(extra["rng"])
            return resume.step
        if self.index > 0:
            previous = self.config.stages[self.index - 1]
            source = checkpointer.stage_final(self.index - 1, previous.steps)
            if source is None:
                raise FileNotFoundError(f"stage {self.stage.name!r} needs a verified checkpoint of stage "
                                        f"{previous.name!r} at its step {previous.steps} in {checkpointer.root}")
            checkpointer.load(source, self.model)
        return 0


def build_stage(config: TrainConfig, index: int, world: int, device: torch.device, mixed: bool, fresh: bool) -> StageRun:
    """Mesh, model (sharded, filled), optimizer and loader of stage ``index``. ``fresh``: the first stage of
    a new run (weights from the init checkpoint or a seeded init, broadcast from rank 0)."""
    stage = config.stages[index]
    dims = ParallelDims(config.parallel.dp_replicate, config.parallel.dp_shard, stage.sp, world, stage.ulysses)
    data_cfg = config.stage_data(stage)
    tokenizer = load_data_tokenizer(data_cfg)
    vocab = tokenizer.vocab_size if tokenizer is not None else config.model.vocab_size
    init_config = init_checkpoint_config(config)
    model_config = stage_model_config(config, index, config.model.vocab_size or vocab, init_config)
    try:
        check_attention_heads(model_config.num_attention_heads, model_config.num_key_value_heads,
                              config.model.attention_head_chunks, stage.ulysses)
    except ValueError as exc:
        raise ValueError(f"stage {stage.name!r}: {exc}") from None
    mesh, fsdp_mesh = dims.build_mesh(device.type)
    coords = dims.coordinates(mesh)
    state = initial_state_dict(config, model_config, init_config) if fresh else None
    model = build_model(model_class(config), model_config, fsdp_mesh, device, mixed=mixed, state=state,
                        broadcast=fresh, offload=config.parallel.offload == "params",
                        fsdp_units=config.parallel.fsdp_units)
    del state
    optimizer = build_optimizer(config, model, stage.lr)
    loader = build_loader(data_cfg, stage, tokenizer=tokenizer, vocab_size=model_config.vocab_size,
                          dp_rank=coords["dp_rank"], dp_size=dims.dp,
                          sp_rank=coords["sp_rank"], sp_size=dims.sp, ulysses_rank=coords["ulysses_rank"],
                          ulysses_size=dims.ulysses, seed=config.seed + index, device=device)
    offset = sum(s.steps for s in config.stages[:index])
    return StageRun(config, index, dims, mesh["sp"].get_group(), dims.ulysses_group(mesh), model_config, model,
                    optimizer, loader, data_cfg, device, offset)
