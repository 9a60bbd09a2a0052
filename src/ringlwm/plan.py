"""``python -m ringlwm.plan``: memory and time of one training step of a recipe at any scale, on fake devices.

    python -m ringlwm.plan recipes/lwm_text_7b.yaml                       # every stage at its own sp
    python -m ringlwm.plan recipes/tiny.yaml --world-size 8 --stage ctx1k --seq-len 65536
    python -m ringlwm.plan recipes/lwm_text_7b.yaml --stage 1m --world-size 64 --max-seq-len
    python -m ringlwm.plan recipes/lwm_text_7b.yaml --model llama-3.1-8b --world-size 8 --max-seq-len \\
        model.activation_checkpointing=true

One real training step (the trainer's ``train_step``, gradient clipping, AdamW step) of rank 0 of a world of
N runs under ``FakeTensorMode`` with torch's fake process group: FSDP2 sharding, the ring, activation
checkpointing, chunked MLP and loss and the optimizer state take their real shapes and dtypes, but no memory
is allocated and no kernel runs. Tensors are fake CPU tensors with the GPU path's dtypes (FSDP2 bf16 compute,
fp32 master weights, gradients and AdamW state): in a CPU-only torch, autograd on fake ``cuda`` tensors
aborts the process. Attention goes through the block custom ops' fake implementations (``--backend``).

Memory: torch's ``FSDPMemTracker`` over the step, with the optimizer state already created (a steady-state
step, not the first one). The peak is the tracker's snapshot at the moment of the highest total, by
category: parameters (sharded fp32 + gathered bf16), gradients, optimizer state, activations kept for the
backward, temporaries, communication buffers (all-gather, reduce-scatter), inputs. ``--overhead`` (CUDA
context, NCCL buffers, allocator fragmentation; default 3 GiB) is added before comparing with the GPU.
Host memory: with ``model.activation_offloading`` the checkpointed layer inputs wait in pinned host memory;
the fake run makes those copies on "meta" and the offload store counts them (peak per GPU; per node, times
``--gpus-per-node``, against ``--host-memory``).

Time: model FLOPs per token as the trainer counts them (``ringlwm.train.metrics.flops_per_token``: 6 x
parameters + 6 x layers x hidden x seq_len), times this rank's tokens per optimizer step, divided by
``--mfu`` x the device's dense bf16 peak (``--gpu``). Host-side costs beside it (``host_costs``): the
host<->device copies of offloaded layer inputs and parameters at ``--pcie`` bytes/s, which of them the
compute cannot hide, and the optimizer step on the host at ``--host-adamw`` seconds per parameter (measured
on this machine); ``step_seconds_bound`` adds what is not hidden.

What the fake run assumes, where a real step would read values:
- the ring's cross-rank input agreement (an all_gather of signatures) is skipped, and every ring step is
  computed (``ringlwm.ring.ring_settings``, the ring's seam for this): the segment-overlap plan would read
  gathered segment ids, so every block is assumed to share a document (the most work and memory; the
  gathered ids are still allocated as in a real step);
- host reads of boolean checks (``if bad.any(): raise``) read False: the inputs are taken to be valid;
- the optimizer's host read of its step count (bias correction) reads 1;
- a boolean selection (``mask.nonzero()``, the vision model's per-head token selection) selects every
  element, an upper bound (each head is planned as if it saw all tokens).

Validation: ``measure`` runs the same step for real on gloo processes with the same tracker (and the
process's peak RSS); ``tests/test_plan.py`` and ``bench/plan.py`` compare the two.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.utils._python_dispatch
from transformers import LlamaConfig

from ringlwm.constants import VISION_VOCAB_SIZE
from ringlwm.models import check_attention_heads
from ringlwm.ring import check_layout, ring_settings

GiB = 2**30

# Architectures for recipes whose checkpoint is not on this machine (model.init a placeholder path).
PRESETS = {
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=131072),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=4096),
}
# model.init paths whose name says the architecture (LWM-Text and LWM-Chat are Llama-2-7B).
_PRESET_HINTS = (("llama-3.1-8b", "llama-3.1-8b"), ("llama-3-8b", "llama-3.1-8b"), ("llama-2-7b", "llama-2-7b"),
                 ("lwm-text", "llama-2-7b"), ("lwm-chat", "llama-2-7b"), ("lwm", "llama-2-7b"))

# Dense bf16 peak FLOP/s of a device (data sheets, without sparsity).
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}

DEFAULT_OVERHEAD = 3 * GiB
DEFAULT_MFU = 0.4
DEFAULT_PCIE = 25e9
"""Host<->device bytes/s per GPU in each direction: what a PCIe Gen4 x16 link moves in practice (Gen5, on
H100/H200 SXM boards, about twice it). A stated assumption, not a measurement."""
HOST_ADAMW_SECONDS_PER_PARAM = 1.2e-9
"""torch's fused CPU AdamW on fp32 parameters, one core of this machine (an Intel Xeon VM): 1.11 ns per
parameter (`make bench PART=plan` re-measures it: bench/results/host_adamw.csv). Memory-bound (28 bytes
per parameter), so a node's cores shared by its GPUs' processes step about as fast each."""

# Report categories from FSDPMemTracker's.
CATEGORIES = {
    "parameters": ("Sharded Param", "Unsharded Param", "Buffer"),
    "gradients": ("Sharded Grad", "Unsharded Grad"),
    "optimizer": ("OptState",),
    "activations": ("Activation",),
    "temporaries": ("Temp",),
    "communication": ("All Gather", "Reduce Scatter"),
    "inputs": ("Inputs",),
}


def parse_bytes(text: str | int | float) -> int:
    """'80GiB', '80GB' (decimal), '1TiB', '512MiB', or a number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GiB, 80GB, 1TiB)")
    number, unit, binary = match.groups()
    power = "KMGT".find(unit.upper()) + 1 if unit else 0
    return int(float(number) * (1024 if binary or not unit else 1000) ** power)


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def fmt_tokens(n: int) -> str:
    for div, suffix in ((2**20, "M"), (2**10, "K")):
        if n >= div and n % (div // 16) == 0:
            return f"{n / div:g}{suffix}"
    return str(n)


# ------------------------------------------------------------------------------------------------
# The recipe -> the model of a stage
# ------------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] = (), *, model: str | None = None):
    """The recipe as a TrainConfig, and the preset its architecture came from (None: the recipe's own).

    A recipe whose ``model.init`` checkpoint is not on this machine is planned with a preset architecture
    (``model``, else guessed from the path's name: LWM recipes are Llama-2-7B): model.init becomes
    "random" with the preset's shape. ``model`` given replaces the recipe's architecture in any case."""
    import yaml

    from ringlwm.train.config import load_config

    tree = yaml.safe_load(Path(path).read_text()) or {}
    init = str((tree.get("model") or {}).get("init", "random"))
    for override in overrides:
        if override.startswith("model.init="):
            init = override.split("=", 1)[1]
    if model is None and init != "random" and not (Path(init) / "config.json").is_file():
        model = next((preset for hint, preset in _PRESET_HINTS if hint in init.lower()), None)
        if model is None:
            raise ValueError(f"model.init {init!r} is not a checkpoint on this machine: give --model "
                             f"({', '.join(PRESETS)}) or model.init=PATH of a Hugging Face config")
    if model is not None:
        if model not in PRESETS:
            raise ValueError(f"unknown --model {model!r}; known: {', '.join(PRESETS)}")
        p = PRESETS[model]
        overrides = [*overrides, "model.init=random", f"model.vocab_size={p['vocab_size']}",
                     f"model.hidden_size={p['hidden_size']}", f"model.intermediate_size={p['intermediate_size']}",
                     f"model.num_layers={p['num_hidden_layers']}", f"model.num_heads={p['num_attention_heads']}",
                     f"model.num_kv_heads={p['num_key_value_heads']}"]
    return load_config(path, overrides), model


def stage_model_config_planned(config, index: int, preset: str | None, seq_len: int) -> LlamaConfig:
    """The model config of stage ``index`` planned at ``seq_len`` (the trainer's ``stage_model_config``;
    a preset's RoPE theta and norm epsilon where the stage sets none)."""
    from ringlwm.models.llama import rope_theta, set_context_length
    from ringlwm.train.stage import stage_model_config

    vocab = config.model.vocab_size
    if vocab is None:
        vocab = _tokenizer_vocab(config, index)
    model_config = stage_model_config(config, index, vocab)
    if preset is not None:
        p = PRESETS[preset]
        model_config.rms_norm_eps = p["rms_norm_eps"]
        stage_theta = any(s.rope_theta is not None for s in config.stages[:index + 1])
        set_context_length(model_config, max(model_config.max_position_embeddings, p["max_position_embeddings"], seq_len),
                           rope_theta=rope_theta(model_config) if stage_theta else p["rope_theta"])
    elif model_config.max_position_embeddings < seq_len:
        set_context_length(model_config, seq_len)
    return model_config


def _tokenizer_vocab(config, index: int) -> int:
    from ringlwm.train.data import load_data_tokenizer

    data = config.stage_data(config.stages[index])
    if data.tokenizer and Path(data.tokenizer).exists():
        return load_data_tokenizer(data).vocab_size
    raise ValueError(f"the vocabulary comes from the tokenizer {data.tokenizer!r}, which is not on this machine: "
                     "give model.vocab_size=N")


def synthetic_batch(model_config, batch: int, local_len: int, sp: int, vision: bool, device: torch.device, *,
                    group=None, generator: torch.Generator | None = None, documents: int = 2,
                    ulysses_group=None) -> dict:
    """One micro-batch as the loader yields it (this rank's zigzag shard): int64 ids, labels, positions and
    segment ids (``documents`` 1 or 2 packed documents), float32 loss weights, and for the vision model bool
    vision masks."""
    from ringlwm.ring import shard_sequence

    seq = local_len * sp
    ids = torch.randint(0, model_config.vocab_size, (batch, seq), generator=generator)
    labels = torch.randint(0, model_config.vocab_size, (batch, seq), generator=generator)
    half = seq // 2 if documents == 2 else seq
    positions = torch.cat([torch.arange(half), torch.arange(seq - half)]).expand(batch, seq).contiguous()
    segments = (torch.arange(seq) >= half).long().expand(batch, seq).contiguous()
    out = {"input_ids": ids, "labels": labels, "position_ids": positions, "segment_ids": segments,
           "loss_weights": torch.ones(batch, seq)}
    if vision:
        mask = (torch.arange(seq) % 2 == 1).expand(batch, seq).contiguous()
        out["vision_mask"] = mask
        out["label_vision_mask"] = mask
        out["input_ids"] = torch.where(mask, ids % getattr(model_config, "vision_vocab_size", VISION_VOCAB_SIZE), ids)
        out["labels"] = torch.where(mask, labels % getattr(model_config, "vision_vocab_size", VISION_VOCAB_SIZE), labels)
    if sp > 1 or ulysses_group is not None:  # this rank's part in ``group`` (and its Ulysses piece)
        out = {k: shard_sequence(v, 1, group if sp > 1 else None, ulysses_group) for k, v in out.items()}
    return {k: v.to(device) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# One step, shared by the fake plan and the real measurement
# ------------------------------------------------------------------------------------------------


@dataclass
class StepSetup:
    """What a planned or measured step needs, independent of fake or real tensors."""

    config: object  # TrainConfig (with the stage's seq_len as planned)
    index: int
    model_config: LlamaConfig
    world: int
    mixed: bool = True
    options: dict = field(default_factory=dict)

    @property
    def stage(self):
        return self.config.stages[self.index]

    def dims(self):
        from ringlwm.parallel import ParallelDims

        p = self.config.parallel
        return ParallelDims(p.dp_replicate, p.dp_shard, self.stage.sp, self.world, self.stage.ulysses)


def build(setup: StepSetup, device: torch.device, *, init: bool, tensors=None):
    """Mesh, model (built on meta, FSDP2, materialised) and the trainer's optimizer; ``init``: fill the
    parameters with small random values (a real run; the values do not change the memory). ``tensors``: the
    mode the parameters and optimizer are made in (a FakeTensorMode; the mesh is made outside it)."""
    from ringlwm.train.stage import build_model, build_optimizer, model_class

    dims = setup.dims()
    mesh, fsdp_mesh = dims.build_mesh("cpu")
    model = build_model(model_class(setup.config), setup.model_config, fsdp_mesh, device, mixed=setup.mixed,
                        tensors=tensors, offload=setup.config.parallel.offload == "params",
                        fsdp_units=setup.config.parallel.fsdp_units)
    with tensors or contextlib.nullcontext():
        if init:
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0.0, 0.02)
        optimizer = build_optimizer(setup.config, model, setup.stage.lr)
    return dims, mesh, model, optimizer


def prime_optimizer(model, optimizer) -> None:
    """Create the optimizer state (AdamW's step, exp_avg, exp_avg_sq) with a step of zero gradients at lr 0,
    so the tracked step is a steady-state one. The parameters do not change."""
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr


def one_step(setup: StepSetup, model, optimizer, micro: list[dict], sp_group, ulysses_group=None) -> torch.Tensor:
    """The trainer's step: ``train_step`` (forward and backward of every micro-batch), then its
    ``optimizer_step`` (clipping, the finite check, AdamW, zero_grad). Returns the loss tensor."""
    from ringlwm.train.step import optimizer_step, train_step

    loss, _ = train_step(model, micro, sp_group, setup.world, vision=setup.config.model.vision,
                         ulysses_group=ulysses_group)
    optimizer_step(model, optimizer, loss, grad_clip=setup.config.optim.grad_clip)
    return loss


@contextlib.contextmanager
def _shape_inference_untracked(tracker):
    """DTensor infers an op's output shapes by running it on fake tensors of the global shapes
    (``ShardingPropagator._propagate_tensor_meta_non_cached``; for the gradient-norm clip: every gradient,
    unsharded). Those allocate nothing on any run, but a memory tracker on the mode stack saw them as
    activations (the full model in fp32 at the optimizer step); ``tracker`` skips them meanwhile."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    original = ShardingPropagator._propagate_tensor_meta_non_cached

    def untracked(self, *args, **kwargs):
        tracker.inferring += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            tracker.inferring -= 1

    ShardingPropagator._propagate_tensor_meta_non_cached = untracked
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = original


def _device_tracker(model, optimizer, host_resident: bool):
    """FSDPMemTracker that counts what a device holds:
    - not DTensor's shape inference (``_shape_inference_untracked``);
    - with ``host_resident``, the peak is the moment of the highest total without the ``HOST_RESIDENT``
      categories (in host memory under ``parallel.offload: params``; the sharded gradients grow through the
      backward, so the peak with them is a later moment than the device's), from the step's start on."""
    from copy import deepcopy

    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    def on_device(snap: dict) -> int:
        if not host_resident:
            return snap["Total"]
        return snap["Total"] - sum(v for k, v in snap.items() if getattr(k, "value", k) in HOST_RESIDENT)

    class DeviceTracker(FSDPMemTracker):
        inferring = 0

        def __enter__(self):
            super().__enter__()  # starts the peak at the current total, host-resident bytes included
            self._peak_mem = {dev: on_device(snap) for dev, snap in self._peak_mem_snap.items()}
            return self

        def _track(self, reftype, t) -> None:
            if not self.inferring:
                super()._track(reftype, t)

        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                total = on_device(snap)
                if self._peak_mem.get(dev, 0) < total:
                    self._peak_mem[dev] = total
                    self._peak_mem_snap[dev] = deepcopy(snap)

    return DeviceTracker(model, optimizer)


def tracked_step(setup: StepSetup, model, optimizer, micro, sp_group, on_start=lambda: None,
                 ulysses_group=None) -> dict:
    """The step under FSDPMemTracker: {tracker category: bytes} at the peak total, with 'Total', and 'Start'
    (the total when the step begins: parameters, optimizer state, inputs). ``on_start`` runs just before it.
    With ``parallel.offload: params`` the peak is the device's: the moment of the highest total without the
    categories kept in host memory (``host_resident`` then moves them out of the snapshot)."""
    tracker = _device_tracker(model, optimizer, setup.config.parallel.offload == "params")
    tracker.track_inputs(tuple(micro))
    with tracker, _shape_inference_untracked(tracker):
        start = tracker.get_tracker_snapshot("current")
        on_start()
        one_step(setup, model, optimizer, micro, sp_group, ulysses_group)
    snapshot = tracker.get_tracker_snapshot("peak")
    device_snapshot = _device_snapshot(snapshot)
    start_snapshot = _device_snapshot(start)
    raw = {str(getattr(k, "value", k)): int(v) for k, v in device_snapshot.items()}
    raw["Start"] = int(start_snapshot.get("Total", 0))
    return raw


def _device_snapshot(snapshot: dict) -> dict:
    """The tracker's snapshot of the (fake or real) compute device, "cpu"; host copies of offloaded
    activations are made on "meta" in a fake run (``OffloadStore.host_device``) and counted apart."""
    return next((v for k, v in (snapshot or {}).items() if torch.device(k).type == "cpu"), {})


HOST_RESIDENT = ("Sharded Param", "Sharded Grad", "OptState")
"""What ``parallel.offload: params`` keeps in host memory: the sharded parameters and gradients (FSDP2's
CPUOffloadPolicy) and the AdamW state (it steps on the host)."""


def host_resident(raw: dict) -> tuple[dict, dict]:
    """The tracker's bytes with the offloaded categories moved off the device: (device bytes, the host bytes
    by category). The fake run places every tensor on one device; the policy's placement is applied here.
    The gradient shards are counted whole (as large as the parameter shards, fp32): by the step's end every
    one is in host memory, though only some exist at the device's peak."""
    moved = {k: raw.get(k, 0) for k in HOST_RESIDENT}
    moved["Sharded Grad"] = max(moved["Sharded Grad"], moved["Sharded Param"])
    device = {**raw, **{k: 0 for k in HOST_RESIDENT}}
    device["Total"] = raw["Total"] - sum(raw.get(k, 0) for k in HOST_RESIDENT)
    device["Start"] = raw.get("Start", 0) - moved["Sharded Param"] - moved["OptState"]  # no gradients yet
    return device, moved


def categories(raw: dict) -> dict:
    out = {name: sum(raw.get(k, 0) for k in keys) for name, keys in CATEGORIES.items()}
    out["total"] = raw.get("Total", sum(out.values()))
    out["step_growth"] = out["total"] - raw.get("Start", 0)
    return out


# ------------------------------------------------------------------------------------------------
# Fake-mode helpers
# ------------------------------------------------------------------------------------------------


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Answers what a fake tensor cannot: a host read of a boolean (a validity check) reads False, and a
    boolean selection (nonzero) selects every element. Every answered call site is recorded."""

    def __init__(self):
        super().__init__()
        self.sites: dict[str, int] = {}

    def _site(self, kind):
        frames = [f for f in traceback.extract_stack()[:-2] if "/ringlwm/" in f.filename or "/kernels/" in f.filename]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        key = f"{kind} at {where}"
        self.sites[key] = self.sites.get(key, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            if args[0].dtype == torch.bool:
                self._site("bool read")
                return False
            if any("/torch/optim/" in f.filename for f in traceback.extract_stack()[-12:]):
                self._site("optimizer step count read")  # AdamW's bias correction reads its step count
                return 1
            raise RuntimeError(f"a fake run read a {args[0].dtype} value on the host ({traceback.format_stack()[-3]}): "
                               "the model or trainer has a data-dependent step that the planner cannot answer")
        if func is torch.ops.aten.nonzero.default:
            self._site("nonzero")
            x = args[0]
            return torch.empty((x.numel(), x.dim()), dtype=torch.long, device=x.device)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_world(world: int):
    """Torch's fake process group for a world of ``world`` ranks, this process being rank 0."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the planner needs a process without a process group (it creates a fake one)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _host_copies_on_meta():
    """Offloaded activations go to "meta" in a fake run, so the tracker's compute-device total leaves them out
    and the offload store counts them as host bytes."""
    from ringlwm.models.offload import OffloadStore

    saved = OffloadStore.host_device
    OffloadStore.host_device = "meta"
    try:
        yield
    finally:
        OffloadStore.host_device = saved


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------


def step_flops(setup: StepSetup, num_params: int) -> dict:
    from ringlwm.train.metrics import step_work

    dims = setup.dims()
    work = step_work(setup.model_config, num_params, setup.stage, dims.dp)  # the trainer's accounting
    rank_tokens = work.tokens // (dims.dp * dims.sp * dims.ulysses)
    return {"flops_per_token": work.flops_per_token, "rank_tokens": rank_tokens, "grad_accum": work.grad_accum,
            "rank_flops": work.flops_per_token * rank_tokens}


def backend_for_plan(requested: str | None) -> str:
    """The block backend of a fake run: the recipe's or the requested one; "triton" (the GPU path) when its
    custom ops trace on fake CPU tensors, else "cpu" (whose fake kernels have the same outputs)."""
    if requested:
        return requested
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        from ringlwm.kernels import block_attention_forward

        with FakeTensorMode():
            q = torch.empty(1, 2, 64, 64, dtype=torch.bfloat16)
            block_attention_forward(q, q, q, causal=True, scale=0.125, backend="triton")
        return "triton"
    except Exception:  # noqa: BLE001 - any refusal means the Triton ops do not trace on fake CPU tensors
        return "cpu"


def plan_step(setup: StepSetup, documents: int = 2) -> dict:
    """Run the step of rank 0 on fake tensors in a fake world; returns the plan as a dict."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.perf_counter()
    host_reads = _HostReads()
    with fake_world(setup.world), ring_settings(check_agreement=False, skip_unshared_steps=False):
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        dims, mesh, model, optimizer = build(setup, torch.device("cpu"), init=False, tensors=fake)
        with fake:
            sp_group, ulysses_group = mesh["sp"].get_group(), dims.ulysses_group(mesh)
            num_params = sum(p.numel() for p in model.parameters())
            stage = setup.stage
            local = stage.seq_len // (stage.sp * stage.ulysses)
            micro = [synthetic_batch(setup.model_config, stage.batch_size, local, 1, setup.config.model.vision,
                                     torch.device("cpu"), documents=documents)]
            prime_optimizer(model, optimizer)
            with host_reads, _host_copies_on_meta():
                store = getattr(model, "offload_store", None)
                raw = tracked_step(setup, model, optimizer, micro, sp_group,
                                   on_start=store.reset_peak if store else lambda: None, ulysses_group=ulysses_group)
            activations = store.peak_host_bytes if store else 0
        del model, optimizer, micro
    moved, grads_at_peak = {}, 0
    if setup.config.parallel.offload == "params":
        grads_at_peak = raw.get("Sharded Grad", 0)  # the host's gradient shards when the device peaks
        raw, moved = host_resident(raw)
    return {"raw": raw, "memory": categories(raw), "host_bytes": activations + sum(moved.values()),
            "host_activation_bytes": activations, "host_resident_bytes": moved, "host_grads_at_peak": grads_at_peak,
            "num_params": num_params,
            "assumed": dict(host_reads.sites), "seconds": time.perf_counter() - t0, **step_flops(setup, num_params)}


def make_setup(config, index: int, preset: str | None, world: int | None, seq_len: int | None,
               backend: str | None = None, mixed: bool = True, sp: int | None = None,
               ulysses: int | None = None) -> StepSetup:
    """The StepSetup of stage ``index`` at ``seq_len`` (default the stage's) on ``world`` ranks (default the
    stage's sp x ulysses). ``sp``: the ring size (default the stage's; the rest of the world when the stage's
    does not divide ``world``). ``ulysses``: the Ulysses degree (default the stage's)."""
    config = copy.deepcopy(config)
    stage = config.stages[index]
    if seq_len is not None:
        stage.seq_len = int(seq_len)
        if stage.batch_tokens is not None and stage.batch_tokens < stage.seq_len:
            stage.batch_tokens = None  # one sequence per step when a sequence outgrows the step's tokens
    if ulysses is not None:
        stage.ulysses = int(ulysses)
    if sp is not None:
        stage.sp = int(sp)
    elif world and world % (stage.sp * stage.ulysses) and world % stage.ulysses == 0:
        stage.sp = world // stage.ulysses  # a world the stage's ring does not divide: one ring over the rest
    world = world or stage.sp * stage.ulysses
    if world % (stage.sp * stage.ulysses):
        raise ValueError(f"stage {stage.name!r}: world size {world} is not a multiple of sp x ulysses = "
                         f"{stage.sp} x {stage.ulysses}")
    check_layout(stage.seq_len, stage.sp, stage.ulysses, f"stage {stage.name!r}: seq_len")
    config.model.attention_backend = backend_for_plan(backend or config.model.attention_backend)
    if stage.batch_tokens is not None:
        from ringlwm.parallel import ParallelDims

        dp = ParallelDims(config.parallel.dp_replicate, config.parallel.dp_shard, stage.sp, world, stage.ulysses).dp
        if stage.batch_tokens % (stage.seq_len * stage.batch_size * dp):
            stage.batch_tokens = None  # planning another world or length: one micro-batch per step
    model_config = stage_model_config_planned(config, index, preset, stage.seq_len)
    check_attention_heads(model_config.num_attention_heads, model_config.num_key_value_heads,
                          config.model.attention_head_chunks, stage.ulysses)
    return StepSetup(config=config, index=index, model_config=model_config, world=world, mixed=mixed)


@dataclass
class Budget:
    gpu_memory: int = 80 * 10**9
    host_memory: int = 2**40  # per node
    gpus_per_node: int = 8
    overhead: int = DEFAULT_OVERHEAD
    gpu: str = "H100"
    mfu: float = DEFAULT_MFU
    pcie: float = DEFAULT_PCIE  # host<->device bytes/s per GPU, each direction
    host_adamw: float = HOST_ADAMW_SECONDS_PER_PARAM

    @property
    def peak_flops(self) -> float:
        return GPU_PEAK_FLOPS[self.gpu]


def host_costs(setup: StepSetup, result: dict, budget: Budget, compute_seconds: float) -> dict:
    """Bounds on what the FLOP count leaves out of a step, per GPU: the host<->device copies and the AdamW
    step on the host. Per micro-batch, an offloaded layer input goes to the host in the forward and comes
    back in the backward; with ``parallel.offload: params`` each FSDP unit's fp32 parameter shard comes to
    the device before each of its two all-gathers (forward, backward) and its gradient shard goes back after
    the reduce-scatter (torch FSDP2's CPUOffloadPolicy). The copies run on side streams beside the compute
    (the offload store's, FSDP2's all-gather and reduce-scatter streams) except the reload of layer inputs
    without ``offload_prefetch``, which the backward waits for; copies longer than the compute show too. The
    optimizer step follows the backward: with the state on the host it is torch's fused CPU AdamW."""
    micro = result["grad_accum"]
    activations = result["host_activation_bytes"]
    resident = result["host_resident_bytes"]
    params = resident.get("Sharded Param", 0)  # fp32 shards; every gradient shard (as large) goes back by the
    to_device = micro * (activations + 2 * params)  # step's end, though only some exist at the peak
    to_host = micro * (activations + params)
    copy_seconds = max(to_device, to_host) / budget.pcie  # full duplex: each direction at its own rate
    waited = 0.0 if setup.config.model.offload_prefetch else micro * activations / budget.pcie
    exposed = waited + max(0.0, copy_seconds - waited - compute_seconds)
    adamw = params / 4 * budget.host_adamw if setup.config.parallel.offload == "params" else 0.0
    return {"to_device_bytes": to_device, "to_host_bytes": to_host, "pcie_bytes_per_s": budget.pcie,
            "copy_seconds": copy_seconds, "exposed_copy_seconds": exposed, "overlapped": exposed == 0.0,
            "host_adamw_seconds": adamw, "host_adamw_seconds_per_param": budget.host_adamw,
            "step_seconds_bound": compute_seconds + exposed + adamw}


def summarize(setup: StepSetup, result: dict, budget: Budget) -> dict:
    """The plan's JSON record."""
    mem = result["memory"]
    gpu_need = mem["total"] + budget.overhead
    node_gpus = min(setup.world, budget.gpus_per_node)
    host_node = result["host_bytes"] * node_gpus  # every GPU of a node offloads as much
    seconds = result["rank_flops"] / (budget.peak_flops * budget.mfu)
    stage = setup.stage
    return {
        "stage": stage.name, "world_size": setup.world, "sp": stage.sp, "ulysses": stage.ulysses,
        "dp": setup.dims().dp, "seq_len": stage.seq_len, "local_len": stage.seq_len // (stage.sp * stage.ulysses),
        "batch_size": stage.batch_size,
        "grad_accum": result["grad_accum"], "backend": setup.config.model.attention_backend,
        "options": {k: getattr(setup.config.model, k) for k in
                    ("activation_checkpointing", "activation_offloading", "mlp_chunk_size",
                     "norm_chunk_size", "loss_chunk_size", "attention_head_chunks", "offload_prefetch")},
        "offload": setup.config.parallel.offload,
        "num_params": result["num_params"], "memory_bytes": mem, "tracker_bytes": result["raw"],
        "gpu_bytes": gpu_need, "gpu_memory": budget.gpu_memory, "host_bytes": result["host_bytes"],
        "host_node_bytes": host_node, "host_memory": budget.host_memory, "gpus_per_node": node_gpus,
        "fits": gpu_need <= budget.gpu_memory and host_node <= budget.host_memory,
        "flops_per_token": result["flops_per_token"], "step_flops_per_rank": result["rank_flops"],
        "gpu": budget.gpu, "mfu": budget.mfu, "step_seconds": seconds,
        "tokens_per_s_per_gpu": result["rank_tokens"] / seconds, "host_costs": host_costs(setup, result, budget, seconds),
        "assumed": result["assumed"], "plan_seconds": round(result["seconds"], 2),
    }


def max_seq_len(config, index: int, preset, world: int | None, budget: Budget, backend=None, *,
                granule: int | None = None, log=None, sp: int | None = None,
                start: int | None = None, ulysses: int | None = None) -> tuple[int, dict | None]:
    """The longest seq_len (a multiple of 2 x sp x granule: 1024 tokens per rank by default) whose step fits
    ``budget``, by secant steps over fake runs. Returns (length, its record), (0, None) when even the smallest
    does not fit. ``start``: the first length probed (default the stage's)."""
    planned = make_setup(config, index, preset, world, None, backend, sp=sp, ulysses=ulysses).stage
    sp, ulysses = planned.sp, planned.ulysses
    unit = 2 * sp * ulysses * (granule or 512)
    cache: dict[int, dict] = {}

    def fits(units: int) -> bool:
        if units not in cache:
            setup = make_setup(config, index, preset, world, units * unit, backend, sp=sp, ulysses=ulysses)
            cache[units] = summarize(setup, plan_step(setup), budget)
            if log:
                r = cache[units]
                log(f"  try seq_len {fmt_tokens(r['seq_len'])} ({fmt_tokens(r['local_len'])}/GPU): "
                    f"{fmt_bytes(r['gpu_bytes'])} {'fits' if r['fits'] else 'does not fit'}")
        return cache[units]["fits"]

    # Peak memory is close to affine in the length (activations and buffers grow linearly, parameters and
    # optimizer state do not): two probes give a secant, each further probe refines it; the answer is the
    # longest probed length that fits with the next granule up probed and not fitting.
    need = lambda u: cache[u]["gpu_bytes"]  # noqa: E731
    a = max(1, (start or config.stages[index].seq_len) // unit)
    fits(a)
    b = a * 2 if cache[a]["fits"] else max(1, a // 2)
    if b == a:
        return (0, None) if not cache[a]["fits"] else (a * unit, cache[a])
    fits(b)
    for _ in range(12):
        good = [u for u in cache if cache[u]["fits"]]
        bad = [u for u in cache if not cache[u]["fits"]]
        best = max(good, default=0)
        if bad and min(bad) == best + 1:
            break
        lo_u, hi_u = sorted(cache, key=lambda u: abs(need(u) - budget.gpu_memory))[:2]
        slope = (need(hi_u) - need(lo_u)) / (hi_u - lo_u) if hi_u != lo_u else 0
        guess = lo_u + (budget.gpu_memory - need(lo_u)) / slope if slope > 0 else 2 * max(cache)
        guess = int(math.floor(guess))
        ceiling = min(bad, default=None)
        guess = max(best + 1, guess if ceiling is None else min(guess, ceiling - 1))
        if guess in cache:  # the secant points at a probed length: close the gap from the side that fits
            guess = best + 1
        if ceiling is not None and guess >= ceiling:
            break
        fits(guess)
    best = max((u for u in cache if cache[u]["fits"]), default=0)
    return (best * unit, cache[best]) if best else (0, None)


def format_table(rec: dict) -> str:
    mem = rec["memory_bytes"]
    lines = [f"stage {rec['stage']!r}: seq_len {fmt_tokens(rec['seq_len'])} ({rec['local_len']} tokens per rank), "
             f"world {rec['world_size']} (sp {rec['sp']}, ulysses {rec['ulysses']}, dp {rec['dp']}), batch {rec['batch_size']} x accum "
             f"{rec['grad_accum']}, backend {rec['backend']}, {rec['num_params'] / 1e9:.2f}B parameters",
             f"  options: {', '.join(f'{k}={v}' for k, v in rec['options'].items())}",
             "  peak memory per rank (at the step's highest total):"]
    for name in CATEGORIES:
        lines.append(f"    {name:<14}{fmt_bytes(mem[name]):>14}")
    lines.append(f"    {'total':<14}{fmt_bytes(mem['total']):>14}")
    lines.append(f"    {'+ overhead':<14}{fmt_bytes(rec['gpu_bytes'] - mem['total']):>14}   (CUDA context, NCCL, "
                 "fragmentation)")
    verdict = "fits" if rec["fits"] else "DOES NOT FIT"
    what = "activations" + (", parameters, gradients, optimizer state" if rec.get("offload") == "params" else "")
    lines.append(f"  GPU: {fmt_bytes(rec['gpu_bytes'])} of {fmt_bytes(rec['gpu_memory'])}; host (offloaded "
                 f"{what}): {fmt_bytes(rec['host_bytes'])} per GPU, {fmt_bytes(rec['host_node_bytes'])} per "
                 f"node of {rec['gpus_per_node']} of {fmt_bytes(rec['host_memory'])}: {verdict}")
    lines.append(f"  time: {rec['flops_per_token'] / 1e9:.1f} GFLOP/token, {rec['step_flops_per_rank'] / 1e12:.1f} "
                 f"TFLOP per rank per step -> {rec['step_seconds']:.2f} s/step on {rec['gpu']} at MFU "
                 f"{rec['mfu']:.0%} ({rec['tokens_per_s_per_gpu']:.0f} tokens/s/GPU)")
    cost = rec["host_costs"]
    if cost["to_device_bytes"] or cost["host_adamw_seconds"]:
        lines.append(f"  host: copies {fmt_bytes(cost['to_device_bytes'])} to and {fmt_bytes(cost['to_host_bytes'])} "
                     f"from the GPU, {cost['copy_seconds']:.1f} s at {cost['pcie_bytes_per_s'] / 1e9:.0f} GB/s "
                     f"({cost['exposed_copy_seconds']:.1f} s not overlapped); AdamW on the host "
                     f"{cost['host_adamw_seconds']:.1f} s -> at most {cost['step_seconds_bound']:.1f} s/step")
    if rec["assumed"]:
        lines.append("  assumed (fake run): " + "; ".join(f"{k} x{v}" for k, v in rec["assumed"].items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The real measurement (validation): the same step on gloo processes, the same tracker
# ------------------------------------------------------------------------------------------------


def _rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(rank: int, world: int, setup: StepSetup, warmup: bool = True) -> dict:
    """Body of a gloo process (``ringlwm.distributed.run_local``): the step of ``setup`` for real on CPU with
    the same tracker as the plan, and the process's RSS growth from before the model is built to the peak of
    the step. Returns {"raw": tracker bytes, "memory": categories, "rss_growth": bytes}."""
    torch.manual_seed(rank)
    import gc

    from ringlwm.kernels import register_backend

    # The model attends through its own backend name: the process's "cpu" backend stays what it is.
    register_backend(ONE_DOCUMENT_CPU_BACKEND, _cpu_backend_without_uniform_masks)
    model_config = copy.deepcopy(setup.model_config)
    model_config.ringlwm_options = {**(getattr(model_config, "ringlwm_options", None) or {}),
                                    "attention_backend": ONE_DOCUMENT_CPU_BACKEND}
    setup = dataclasses.replace(setup, model_config=model_config)
    gc.collect()
    base = _rss_bytes("VmRSS")
    marks = {}

    def step_starts():
        gc.collect()
        marks["before_step"] = _rss_bytes("VmRSS")
        marks["reset"] = _reset_peak_rss()

    with ring_settings(skip_unshared_steps=False):  # the real run computes every ring step too, as the plan
        dims, mesh, model, optimizer = build(setup, torch.device("cpu"), init=True)
        stage = setup.stage
        ring, ulysses = mesh["sp"].get_group(), dims.ulysses_group(mesh)
        micro = [synthetic_batch(setup.model_config, stage.batch_size, stage.seq_len // stage.sp, stage.sp,
                                 setup.config.model.vision, torch.device("cpu"), group=ring, documents=1,
                                 ulysses_group=ulysses)]
        prime_optimizer(model, optimizer)
        if warmup:  # the kernels' and libraries' first-call allocations happen here, not in the measured step
            one_step(setup, model, optimizer, micro, ring, ulysses)
        gc.collect()
        raw = tracked_step(setup, model, optimizer, micro, ring, on_start=step_starts, ulysses_group=ulysses)
    if setup.config.parallel.offload == "params":  # host tensors on a CPU run too: the plan's placement
        raw, _ = host_resident(raw)
    peak = _rss_bytes("VmHWM") if marks["reset"] else float("nan")
    return {"raw": raw, "memory": categories(raw), "rss_growth": peak - base,
            "rss_step_growth": peak - marks["before_step"]}


ONE_DOCUMENT_CPU_BACKEND = "cpu_one_document"
"""The validation run's block backend (``_cpu_backend_without_uniform_masks``), registered under its own name."""


def _cpu_backend():
    from ringlwm.kernels import Backend
    from ringlwm.kernels.cpu_flash import cpu_attention_backward, cpu_attention_forward

    return Backend(cpu_attention_forward, cpu_attention_backward)


def _one_document(kwargs: dict) -> dict:
    q_ids, kv_ids = kwargs.get("segment_ids"), kwargs.get("kv_segment_ids")
    if q_ids is not None and kv_ids is not None:
        first = q_ids[:, :1]
        if bool((q_ids == first).all()) and bool((kv_ids == first).all()):
            kwargs = {**kwargs, "segment_ids": None, "kv_segment_ids": None}
    return kwargs


def _cpu_backend_without_uniform_masks():
    """The fused CPU kernel, without the dense (seq_q x seq_k) float mask it builds for segment ids when every
    query and key is of one document (then the ids change nothing): the GPU kernels build no such mask, and
    inside a custom op it is invisible to the tracker, so the real CPU step would hold memory that neither
    the plan nor a GPU has. The validation batches are one document."""
    from ringlwm.kernels import Backend

    base = _cpu_backend()
    return Backend(lambda *a, **kw: base.forward(*a, **_one_document(kw)),
                   lambda *a, **kw: base.backward(*a, **_one_document(kw)))


def validate(setup: StepSetup) -> dict:
    """Plan and measure ``setup``; returns both and the relative differences (rank 0)."""
    from ringlwm.distributed import run_local

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed tensors go back to the OS (RSS = live)
    planned = plan_step(setup, documents=1)
    real = run_local(measure, setup.world, setup)[0]
    diffs = {}
    for name, value in planned["memory"].items():
        ref = real["memory"][name]
        diffs[name] = 0.0 if value == ref else abs(value - ref) / max(ref, 1)
    rss, step_rss = real["rss_growth"], real["rss_step_growth"]
    # A CPU process holds the host side too: the offloaded state (parameters and AdamW state from the start,
    # the gradient shards present at the device's peak; the validation cases keep no offloaded layer inputs).
    host = planned["host_resident_bytes"]
    at_peak = planned["host_grads_at_peak"]
    total = planned["memory"]["total"] + host.get("Sharded Param", 0) + host.get("OptState", 0) + at_peak
    growth = planned["memory"]["step_growth"] + at_peak
    return {"planned": planned["memory"], "real": real["memory"], "rel_diff": diffs,
            "rss_growth": rss, "rss_rel_diff": abs(total - rss) / rss,
            "rss_step_growth": step_rss, "rss_step_rel_diff": abs(growth - step_rss) / step_rss,
            "raw_planned": planned["raw"], "raw_real": real["raw"]}


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ringlwm.plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides (as ringlwm.train)")
    parser.add_argument("--world-size", type=int, default=None, help="GPUs (default: each stage's sp)")
    parser.add_argument("--gpu-memory", default="80GB", help="memory per GPU (80GB = 80e9 bytes; 80GiB)")
    parser.add_argument("--host-memory", default="1TiB", help="host memory per node (for offloaded activations)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs sharing a node's host memory")
    parser.add_argument("--stage", default=None, help="plan this stage only (name)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--seq-len", type=int, default=None, help="plan at this sequence length")
    group.add_argument("--max-seq-len", action="store_true", help="search the longest sequence that fits")
    parser.add_argument("--sp", type=int, default=None, help="ring size (default: the stage's; the whole world "
                        "when --world-size is not a multiple of it)")
    parser.add_argument("--ulysses", type=int, default=None, help="Ulysses degree inside each ring rank (the 2-D "
                        "layout; default: the stage's)")
    parser.add_argument("--model", default=None, choices=sorted(PRESETS),
                        help="architecture preset (default: the recipe's; LWM placeholder checkpoints: llama-2-7b)")
    parser.add_argument("--backend", default=None, help="attention block backend (default: triton if it traces "
                        "on fake tensors, else cpu)")
    parser.add_argument("--gpu", default="H100", choices=sorted(GPU_PEAK_FLOPS), help="peak FLOP/s for the time")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation for the time")
    parser.add_argument("--pcie", default="25GB", help="host<->device bytes per second per GPU, each direction "
                        "(for the copies' time)")
    parser.add_argument("--host-adamw", type=float, default=HOST_ADAMW_SECONDS_PER_PARAM,
                        help="seconds per parameter of the optimizer step on the host (parallel.offload: params)")
    parser.add_argument("--overhead", default="3GiB", help="added to the tracked peak (CUDA context, NCCL, "
                        "allocator fragmentation)")
    parser.add_argument("--json", action="store_true", help="JSON lines only")
    args = parser.parse_intermixed_args(argv)

    budget = Budget(gpu_memory=parse_bytes(args.gpu_memory), host_memory=parse_bytes(args.host_memory),
                    gpus_per_node=args.gpus_per_node,
                    overhead=parse_bytes(args.overhead), gpu=args.gpu, mfu=args.mfu, pcie=parse_bytes(args.pcie),
                    host_adamw=args.host_adamw)
    config, preset = load_recipe(args.recipe, args.overrides, model=args.model)
    names = [s.name for s in config.stages]
    if args.stage is not None and args.stage not in names:
        raise SystemExit(f"no stage {args.stage!r} in {args.recipe}; stages: {names}")
    indices = [names.index(args.stage)] if args.stage else range(len(names))
    log = None if args.json else (lambda msg: print(msg, flush=True))
    if preset and log:
        log(f"architecture: {preset} (preset)")
    for index in indices:
        if args.max_seq_len:
            length, rec = max_seq_len(config, index, preset, args.world_size, budget, args.backend, log=log,
                                      sp=args.sp, ulysses=args.ulysses)
            if rec is None:
                msg = {"stage": names[index], "max_seq_len": 0, "fits": False}
                print(json.dumps(msg) if args.json else f"stage {names[index]!r}: nothing fits", flush=True)
                continue
            rec = {**rec, "max_seq_len": length}
        else:
            setup = make_setup(config, index, preset, args.world_size, args.seq_len, args.backend, sp=args.sp,
                               ulysses=args.ulysses)
            rec = summarize(setup, plan_step(setup), budget)
        if log:
            if args.max_seq_len:
                log(f"longest sequence that fits: {fmt_tokens(rec['max_seq_len'])} tokens "
                    f"({fmt_tokens(rec['local_len'])} per GPU)")
            log(format_table(rec))
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
