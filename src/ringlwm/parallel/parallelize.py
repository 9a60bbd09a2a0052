"""Turn a model built on the meta device into a sharded, trainable one: an ordered list of steps.

    mesh, fsdp_mesh = dims.build_mesh(device.type)
    parallelize_llama(model, fsdp_mesh, mixed_precision=True)
    materialize(model, device, full_state_dict_on_rank0, broadcast=True)

Activation checkpointing is a model option (``ringlwm_options["activation_checkpointing"]``, set on the
config before the model is built, applied by the model itself): transformers marks each decoder layer to
recompute itself, so it composes with FSDP in either order (a recomputed layer runs FSDP's pre-forward
hook again, which gathers its parameters again). Order matters for the rest:
1. FSDP2 ``fully_shard`` per decoder layer, then the root (embeddings, final norm, head), so each layer's
   parameters are gathered just before it runs and released after (or the whole model as one unit:
   ``parallel.fsdp_units: model``, for tiny models);
2. materialise (``to_empty``) and load weights last, into the sharded parameters, so that no rank ever
   holds the whole model: the full state dict lives on rank 0 only and is broadcast shard by shard.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from ringlwm.constants import FSDP_UNITS


def apply_fsdp(model, shard_mesh: DeviceMesh, mixed_precision: bool, offload: bool = False,
               units: str = "layers") -> None:
    """FSDP2 over the (dp_replicate, dp_shard x sp) mesh (the second mesh of ``ParallelDims.build_mesh``). bf16 compute with fp32
    gradient reduction on GPU; plain fp32 on CPU (gloo). Gradients are averaged over the whole FSDP mesh (the trainer scales its loss
    to make that a sum over sequence shards and the exact token mean over the global batch). ``offload``: the sharded
    parameters and gradients live in host memory (FSDP2's ``CPUOffloadPolicy``, pinned on a GPU machine); each unit's
    parameters come to the device when gathered, and the optimizer steps on the host.

    ``units``: "layers" (one FSDP unit per decoder layer, the input embeddings, the root: the memory of one
    layer's full parameters at a time) or "model" (the whole model one unit: one all-gather and one
    reduce-scatter per step, all parameters held in full through the step; for models so small that
    per-unit overheads dominate a step, as the CPU demo's: 19 % of its stage-1 step). The same sharded
    parameters and checkpoints either way: each parameter is split along dim 0 over the mesh."""
    if units not in FSDP_UNITS:
        raise ValueError(f"FSDP units must be one of {FSDP_UNITS}, got {units!r}")
    kwargs = {"mesh": shard_mesh}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    if units == "model":
        fully_shard(model, **kwargs)
        return
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    # The input embeddings are their own unit: gathered for the forward's first op and for the backward's
    # last, not held through every layer's backward (a 128K x 4096 table is 1 GiB in bf16). Not when tied
    # to the output head, whose weight the loss reads inside the root's forward.
    output = model.get_output_embeddings()
    for table in (model.model.embed_tokens, getattr(model, "vision_embed_tokens", None)):
        if table is not None and (output is None or table.weight is not output.weight):
            fully_shard(table, **kwargs)
    fully_shard(model, **kwargs)


def materialize(model, device: torch.device, full_state_dict: dict | None, *, broadcast: bool,
                offload: bool = False) -> None:
    """Allocate the sharded parameters on ``device`` (on the host with ``offload``, as ``apply_fsdp(...,
    offload=True)`` wants them); with ``broadcast``, fill them from ``full_state_dict`` (given on rank 0, None
    elsewhere), else leave them for a checkpoint load. Non-persistent buffers (RoPE frequencies) are
    recomputed from the config, on ``device``."""
    model.to_empty(device="cpu" if offload else device)  # offloaded shards live on the host
    if broadcast:
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full_state_dict or {}, options=options)
    # Rebuilt rather than patched: its __init__ computes the frequencies from the config, whatever the
    # RoPE type and the transformers version.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config).to(device)


def parallelize_llama(model, fsdp_mesh: DeviceMesh, *, mixed_precision: bool, offload: bool = False,
                      units: str = "layers") -> None:
    apply_fsdp(model, fsdp_mesh, mixed_precision, offload, units)
