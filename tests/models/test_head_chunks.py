"""attention_head_chunks: a layer's attention run for a group of heads at a time gives the loss and every
gradient of all heads at once, bitwise (heads are independent), on one process and on 2 ranks under FSDP2
and the ring, with GQA (groups sharing a K/V head too) and packed documents; bad counts are refused."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed
from tiny_models import tiny_llama_config

from ringlwm import shard_sequence
from ringlwm.models import RingLlamaForCausalLM


def _batch(seq=32, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, seq), generator=g)
    labels = torch.randint(0, 64, (2, seq), generator=g)
    seg = (torch.arange(seq) >= 13).long().expand(2, seq).contiguous()  # two documents
    pos = torch.cat([torch.arange(13), torch.arange(seq - 13)]).expand(2, seq).contiguous()
    return ids, labels, seg, pos


def _run(rank, world, chunks, kv_heads, checkpointing):
    from ringlwm.parallel import ParallelDims, parallelize_llama

    torch.manual_seed(0)
    options = {"attention_head_chunks": chunks, "attention_backend": "cpu",
               "activation_checkpointing": checkpointing}
    model = RingLlamaForCausalLM(tiny_llama_config(num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=kv_heads, ringlwm_options=options))
    group = None
    if world > 1:
        _, fsdp_mesh = ParallelDims(1, 1, world, world).build_mesh("cpu")
        parallelize_llama(model, fsdp_mesh, mixed_precision=False)
        group = torch.distributed.group.WORLD
    ids, labels, seg, pos = (shard_sequence(t, 1, group) if world > 1 else t for t in _batch())
    out = model(ids, pos, shift_labels=labels, segment_ids=seg, sp_group=group)
    out.loss.backward()
    return out.loss.item(), [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                             for p in model.parameters()]


@pytest.mark.parametrize("kv_heads,chunks", [(2, 2), (4, 4), (4, 2)])
def test_head_chunks_are_bitwise_all_heads_at_once(kv_heads, chunks):
    # One thread, as each training process has: on several threads PyTorch's fused CPU kernel splits its work
    # by the number of heads it is given, and for a document whose length is not a multiple of its query block
    # (13 and 19 tokens here) that changes the summation order (~1e-8 with 2 threads; bitwise on one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = _run(0, 1, None, kv_heads, False)
        chunked = _run(0, 1, chunks, kv_heads, True)
    finally:
        torch.set_num_threads(threads)
    assert chunked[0] == whole[0]
    # checkpointing recomputes the same ops: bitwise too
    for a, b in zip(chunked[1], whole[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_groups_sharing_a_kv_head_sum_its_gradient_exactly(kv_heads):
    """4 groups over 1 or 2 K/V heads: groups attend a shared K/V head, whose gradient autograd sums over the
    groups (the kernel sums over the heads in another order): the loss bitwise, gradients within fp32 rounding
    (the fp64 run says how far fp32 is from exact: the chunked run is no farther)."""
    whole, chunked = _run(0, 1, None, kv_heads, False), _run(0, 1, 4, kv_heads, False)
    assert chunked[0] == whole[0]
    torch.set_default_dtype(torch.float64)
    try:
        exact = _run(0, 1, None, kv_heads, False)
    finally:
        torch.set_default_dtype(torch.float32)
    for a, b, e in zip(chunked[1], whole[1], exact[1]):
        scale = e.abs().max()
        assert (a.double() - e).abs().max() <= 2 * (b.double() - e).abs().max() + 1e-7 * scale


def _both(rank, world):
    return _run(rank, world, None, 2, False), _run(rank, world, 2, 2, True)


def test_head_chunks_under_fsdp2_and_the_ring_are_bitwise():
    whole, chunked = run_distributed(_both, 2)[0]
    assert chunked[0] == whole[0]
    for a, b in zip(chunked[1], whole[1]):
        assert torch.equal(a, b)


def test_head_chunks_that_do_not_split_the_heads_are_refused():
    with pytest.raises(ValueError, match=r"attention_head_chunks = 3 .* values that do: \[1, 2, 4\]"):
        _run(0, 1, 3, 2, False)


def test_head_chunks_and_ulysses_are_checked_together():
    """The chunks split the heads first, then Ulysses scatters each group's heads: Llama-3.1-8B's 32/8 heads
    in 8 groups leave 4/1 per group, which 8 Ulysses ranks cannot scatter. Refused before any step (the trainer
    and the planner call this at stage build), naming the chunk counts that fit."""
    from ringlwm.models import check_attention_heads

    check_attention_heads(32, 8, 4, 8)  # 8 heads and 2 K/V heads per group: 1 head per rank, K/V repeated
    check_attention_heads(32, 8, 8, 4)
    with pytest.raises(ValueError, match=r"attention_head_chunks = 8 leaves 4 attention heads and 1 key/value "
                                         r"heads per group.*that fit ulysses = 8: \[1, 2, 4\]"):
        check_attention_heads(32, 8, 8, 8)
    with pytest.raises(ValueError, match=r"ulysses = 3 does not fit 32 attention heads"):
        check_attention_heads(32, 8, None, 3)


def test_the_planner_refuses_head_chunks_ulysses_cannot_scatter():
    from ringlwm.plan import load_recipe, make_setup

    config, preset = load_recipe("recipes/scale/llama3_8b_1gpu.yaml", ["stages.0.ulysses=8"])
    with pytest.raises(ValueError, match="attention_head_chunks = 8 leaves 4 attention heads"):
        make_setup(config, 0, preset, 8, None)


def _ulysses_run(rank, world, chunks, recompute):
    """RingLlama (GQA 4/1: K/V repeated for Ulysses) on Ulysses over ``world`` ranks under FSDP2, layers
    checkpointed, attention in ``chunks`` groups of heads; the loss and the full gradients."""
    from ringlwm.parallel import ParallelDims, parallelize_llama

    torch.manual_seed(0)
    options = {"attention_head_chunks": chunks, "attention_backend": "cpu", "activation_checkpointing": True,
               "ulysses_recompute": recompute}
    model = RingLlamaForCausalLM(tiny_llama_config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                                   ringlwm_options=options))
    dims = ParallelDims(1, 1, 1, world, world)
    mesh, fsdp_mesh = dims.build_mesh("cpu")
    parallelize_llama(model, fsdp_mesh, mixed_precision=False)
    uly = dims.ulysses_group(mesh)
    ids, labels, seg, pos = (shard_sequence(t, 1, None, uly) for t in _batch())
    out = model(ids, pos, shift_labels=labels, segment_ids=seg, sp_group=None, ulysses_group=uly)
    out.loss.backward()
    return out.loss.item(), [p.grad.full_tensor() for p in model.parameters()]


def _with_and_without_recompute(rank, world):
    return [(_ulysses_run(rank, world, chunks, False), _ulysses_run(rank, world, chunks, True))
            for chunks in (None, 2)]


def test_ulysses_recompute_under_fsdp2_and_head_chunks_is_bitwise():
    """``ulysses_recompute`` (Q, K, V kept in the heads layout, their all-to-alls run again in the backward)
    inside checkpointed layers, with and without head chunks: the loss and every gradient bit for bit."""
    for plain, recomputed in run_distributed(_with_and_without_recompute, 2)[0]:
        assert recomputed[0] == plain[0]
        for a, b in zip(recomputed[1], plain[1]):
            assert torch.equal(a, b)
