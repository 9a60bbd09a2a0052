"""Activation offloading (``ringlwm.models.offload``): exact, and the device keeps no layer input.

References: the same model with plain activation checkpointing and without checkpointing (bitwise equal
losses and gradients: the offloaded copies are the same bits), and the layer inputs' own lifetimes.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from dist_utils import run_distributed
from tiny_models import tiny_llama_config

from ringlwm.models import RingLlamaForCausalLM
from ringlwm.ring import shard_sequence


def _model(seed=0, layers=3, **options):
    torch.manual_seed(seed)
    model = RingLlamaForCausalLM(tiny_llama_config(num_hidden_layers=layers, ringlwm_options=options))
    return model.double().train()


def _batch(seq=24, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (batch, seq), generator=g)
    labels = torch.randint(0, 64, (batch, seq), generator=g)
    labels[:, :3] = -100
    return ids, labels


def _loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(ids, shift_labels=labels, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mlp_chunk", [None, 5])
def test_offloading_is_bitwise_plain_checkpointing(mlp_chunk):
    ids, labels = _batch()
    runs = {}
    offloading = {"activation_checkpointing": True, "activation_offloading": True}
    for name, options in (("plain", {}), ("checkpointing", {"activation_checkpointing": True}),
                          ("offloading", offloading), ("no prefetch", {**offloading, "offload_prefetch": False})):
        runs[name] = _loss_and_grads(_model(mlp_chunk_size=mlp_chunk, **options), ids, labels)
    ref_loss, ref_grads = runs["plain"]
    for name in ("checkpointing", "offloading", "no prefetch"):
        loss, grads = runs[name]
        assert torch.equal(loss, ref_loss), name
        for key in ref_grads:
            assert torch.equal(grads[key], ref_grads[key]), (name, key)


def test_the_device_keeps_no_layer_input_and_the_host_copies_are_counted():
    """After the forward, plain checkpointing keeps every decoder layer's input alive (for the recompute);
    offloading keeps none of them, only host copies (layers x batch x len x hidden x 8 bytes in fp64),
    which the backward releases. The backward recomputes each layer from a copy prefetched by the layer
    above it."""
    ids, labels = _batch()
    for offload in (False, True):
        model = _model(activation_checkpointing=True, activation_offloading=offload)
        inputs = []

        def keep(_module, args, inputs=inputs):
            inputs.append(weakref.ref(args[0]))

        hooks = [layer.register_forward_pre_hook(keep) for layer in model.model.layers]
        loss = model(ids, shift_labels=labels).loss
        gc.collect()
        alive = sum(ref() is not None for ref in inputs)
        for h in hooks:
            h.remove()
        assert len(inputs) == 3
        if not offload:
            assert alive == 3
            loss.backward()
            continue
        assert alive == 0, f"{alive} layer inputs still on the device"
        store = model.offload_store
        assert store.host_bytes == 3 * ids.numel() * 32 * 8
        loss.backward()
        del loss
        gc.collect()
        assert store.host_bytes == 0 and store.peak_host_bytes == 3 * ids.numel() * 32 * 8
        assert store.prefetched == 2  # the top layer loads its own input; each layer below was prefetched


def test_without_prefetch_each_recompute_loads_its_own_input():
    ids, labels = _batch()
    model = _model(activation_checkpointing=True, activation_offloading=True, offload_prefetch=False)
    model(ids, shift_labels=labels).loss.backward()
    assert model.offload_store.prefetched == 0 and model.offload_store.host_bytes == 0


def test_offloading_needs_checkpointing():
    with pytest.raises(ValueError, match="needs activation_checkpointing"):
        _model(activation_offloading=True)


def test_retain_graph_recomputes_twice():
    ids, labels = _batch()
    model = _model(activation_checkpointing=True, activation_offloading=True)
    loss = model(ids, shift_labels=labels).loss
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss.backward()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, first[n]), n


def _sharded(rank, world, offload):
    from ringlwm.parallel import ParallelDims, parallelize_llama

    torch.manual_seed(0)
    model = RingLlamaForCausalLM(tiny_llama_config(num_hidden_layers=3, ringlwm_options={
        "activation_checkpointing": True, "activation_offloading": offload, "attention_backend": "cpu"}))
    _, fsdp_mesh = ParallelDims(1, 1, world, world).build_mesh("cpu")
    parallelize_llama(model, fsdp_mesh, mixed_precision=False)
    group = torch.distributed.group.WORLD
    ids, labels = _batch(seq=32, seed=3)
    pos = torch.arange(32).expand(2, 32)
    out = model(*(shard_sequence(t, 1, group) for t in (ids, pos)), shift_labels=shard_sequence(labels, 1, group),
                sp_group=group)
    out.loss.backward()
    return out.loss.item(), [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                             for p in model.parameters()]


def test_offloading_under_fsdp2_and_the_ring_is_exact():
    """Two ranks, FSDP2 and the ring: offloading on and off give the same loss and gradients, bitwise."""
    off = run_distributed(_sharded, 2, False)[0]
    on = run_distributed(_sharded, 2, True)[0]
    assert on[0] == off[0]
    for a, b in zip(on[1], off[1]):
        assert torch.equal(a, b)


def test_chunked_norm_is_the_norm_bitwise_and_its_weight_gradient_within_rounding():
    """norm_chunk_size: loss and every gradient but the norms' weights bitwise as without it (the norm works
    token by token); the norms' weight gradients, summed chunk by chunk, within fp64 rounding."""
    ids, labels = _batch(seq=30)
    plain_loss, plain = _loss_and_grads(_model(), ids, labels)
    model = _model(norm_chunk_size=7, activation_checkpointing=True, activation_offloading=True)
    assert type(model.model.norm).__name__ == "ChunkedLlamaRMSNorm"
    loss, grads = _loss_and_grads(model, ids, labels)
    assert torch.equal(loss, plain_loss)
    for key, ref in plain.items():
        if "norm" in key:
            assert (grads[key] - ref).abs().max() <= 1e-12 * ref.abs().max(), key
            assert not torch.equal(grads[key], torch.zeros_like(ref))
        else:
            assert torch.equal(grads[key], ref), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream copies run on a CUDA GPU (make gpu-check)")
def test_offloading_on_a_gpu_is_bitwise_plain_checkpointing():
    """On CUDA the copies are asynchronous (a side stream, pinned host memory, prefetch one layer ahead):
    losses and gradients must still be those of plain checkpointing, bit for bit, and the device must hold
    less at the end of the forward."""
    torch.manual_seed(0)
    config = tiny_llama_config(num_hidden_layers=6, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=4096)
    ids = torch.randint(0, 64, (2, 2048), device="cuda")
    results = {}
    for offload in (False, True):
        torch.manual_seed(0)
        model = RingLlamaForCausalLM(config).cuda().train()
        model.apply_options(activation_checkpointing=True, activation_offloading=offload)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(ids, labels=ids).loss
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        results[offload] = (loss.detach(), [p.grad.clone() for p in model.parameters()], held)
    assert torch.equal(results[True][0], results[False][0])
    for a, b in zip(results[True][1], results[False][1]):
        assert torch.equal(a, b)
    layer_inputs = 6 * 2 * 2048 * 256 * 4
    assert results[False][2] - results[True][2] >= 0.9 * layer_inputs, (results[False][2], results[True][2])
