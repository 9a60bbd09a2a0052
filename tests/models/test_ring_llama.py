"""RingLlamaForCausalLM against Hugging Face LlamaForCausalLM (eager attention, fp32) on the same weights.

Distributed cases run on 2 and 4 gloo processes: the loss on every rank, the unsharded logits and the
parameter gradients summed over the ranks must equal the single-process HF model's.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from tiny_models import tiny_llama_config
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from ringlwm import shard_sequence, unshard_sequence
from ringlwm.models import RingLlamaForCausalLM, linear_cross_entropy, rope_theta, set_context_length

VOCAB = 97


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              max_position_embeddings=256)
    kw.update(overrides)
    config = tiny_llama_config(**kw)
    set_context_length(config, kw["max_position_embeddings"], rope_theta=1e6)  # a non-default theta on purpose
    return config


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A tiny random Llama saved by plain transformers."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(tiny_config()).save_pretrained(path)
    return str(path)


def _hf(path):
    return LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)


def _batch(seqlen, seed, batch=2):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seqlen), generator=gen)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    labels[:, 3] = -100  # a masked token in the middle
    return ids, labels


def _packed_batch(seqlen, seed):
    """Two rows of three documents each: per-document positions, labels that never cross a boundary."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, seqlen), generator=gen)
    lengths = [[11, 20, seqlen - 31], [seqlen - 9, 5, 4]]
    seg = torch.cat([torch.cat([torch.full((n,), d) for d, n in enumerate(row)])[None] for row in lengths])
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
    labels = torch.roll(ids, -1, dims=1)
    labels[torch.roll(seg, -1, dims=1) != seg] = -100  # last token of each document
    labels[:, -1] = -100
    return ids, pos, seg, labels, lengths


def _reference_loss_and_grads(hf, ids, labels):
    hf.zero_grad()
    logits = hf(input_ids=ids).logits
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    return loss.detach(), logits.detach(), {n: p.grad.clone() for n, p in hf.named_parameters()}


def _matches_hf(rank, world_size, path):
    hf = _hf(path)
    ring = RingLlamaForCausalLM.from_pretrained(path)
    ids, labels = _batch(48, seed=1)
    ref_loss, ref_logits, ref_grads = _reference_loss_and_grads(hf, ids, labels)

    pos = torch.arange(48).expand(2, 48)
    out = ring(shard_sequence(ids, 1), shard_sequence(pos, 1), shift_labels=shard_sequence(labels, 1), return_logits=True)
    out.loss.backward()
    assert abs(out.loss.item() - ref_loss.item()) < 1e-5, (out.loss.item(), ref_loss.item())
    losses = [torch.zeros(()) for _ in range(world_size)]
    dist.all_gather(losses, out.loss.detach())
    assert len({x.item() for x in losses}) == 1, "the loss must be the same number on every rank"
    assert (unshard_sequence(out.logits.detach(), 1) - ref_logits).abs().max() < 1e-5
    for name, p in ring.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        err = (grad - ref_grads[name]).abs().max() / ref_grads[name].abs().max().clamp(min=1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"

    # Packed documents: exactly the token-weighted mean of each document run alone through HF.
    ids, pos, seg, labels, lengths = _packed_batch(48, seed=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                doc_logits = hf(input_ids=ids[b:b + 1, start:start + n]).logits[0]
                doc_labels = labels[b, start:start + n]
                total += F.cross_entropy(doc_logits, doc_labels, ignore_index=-100, reduction="sum").item()
                count += int((doc_labels != -100).sum())
                start += n
    ring.zero_grad()
    out = ring(shard_sequence(ids, 1), shard_sequence(pos, 1), shift_labels=shard_sequence(labels, 1),
               segment_ids=shard_sequence(seg, 1))
    assert abs(out.loss.item() - total / count) < 1e-5, (out.loss.item(), total / count)

    # The layers share one gather of the segment ids per forward (checkpointed recomputes included), and the
    # result is the one computed with a gather per layer.
    from ringlwm.ring import attention

    gathers = []
    original = attention._gather_segment_ids
    attention._gather_segment_ids = lambda *a: gathers.append(1) or original(*a)
    try:
        ring.apply_options(activation_checkpointing=True)
        ring.train()
        again = ring(shard_sequence(ids, 1), shard_sequence(pos, 1), shift_labels=shard_sequence(labels, 1),
                     segment_ids=shard_sequence(seg, 1))
        again.loss.backward()
        assert len(gathers) == 1, f"{len(gathers)} gathers of the segment ids for one forward and backward"
        assert again.loss.item() == out.loss.item()
    finally:
        attention._gather_segment_ids = original
        ring.apply_options(activation_checkpointing=False)

    with pytest.raises(ValueError, match="position_ids are required"):
        ring(shard_sequence(ids, 1))


@pytest.mark.parametrize("world_size", [2, 4])
def test_sequence_parallel_matches_hf(checkpoint_dir, world_size):
    run_distributed(_matches_hf, world_size, checkpoint_dir)


def _sub_group_and_options(rank, world_size, path):
    """sp groups of 2 inside a world of 4, with chunked MLP, chunked loss and activation checkpointing on."""
    hf = _hf(path)
    ring = RingLlamaForCausalLM.from_pretrained(path)
    ring.apply_options(mlp_chunk_size=5, loss_chunk_size=7, activation_checkpointing=True)
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    ids, labels = _batch(40, seed=10 + rank // 2)
    ref_loss, _, ref_grads = _reference_loss_and_grads(hf, ids, labels)
    pos = torch.arange(40).expand(2, 40)
    out = ring(*(shard_sequence(t, 1, group) for t in (ids, pos)), shift_labels=shard_sequence(labels, 1, group),
               sp_group=group)
    out.loss.backward()
    assert abs(out.loss.item() - ref_loss.item()) < 1e-5
    for name, p in ring.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=group)
        err = (grad - ref_grads[name]).abs().max() / ref_grads[name].abs().max().clamp(min=1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_sub_groups_with_chunking_and_checkpointing(checkpoint_dir):
    run_distributed(_sub_group_and_options, 4, checkpoint_dir)


# ------------------------------------------------------------------------------------------------
# Single process
# ------------------------------------------------------------------------------------------------


def test_single_process_is_an_ordinary_model(checkpoint_dir):
    hf, ring = _hf(checkpoint_dir), RingLlamaForCausalLM.from_pretrained(checkpoint_dir)
    assert rope_theta(ring.config) == 1e6 and ring.config.max_position_embeddings == 256
    ids, labels = _batch(33, seed=3)
    ref_loss, ref_logits, _ = _reference_loss_and_grads(hf, ids, labels)
    out = ring(ids, shift_labels=labels, return_logits=True)
    assert (out.logits - ref_logits).abs().max() < 1e-5
    assert abs(out.loss.item() - ref_loss.item()) < 1e-5
    assert ring(ids, shift_labels=labels).logits is None, "with labels, logits only when asked for"
    assert (ring(ids).logits - ref_logits).abs().max() < 1e-5, "without labels, logits as in transformers"


def test_loss_outputs_are_not_views(checkpoint_dir):
    """FSDP2 hooks a model's outputs for its backward; an in-place op on an output that is a view drops that
    hook. loss_sums and loss_weight_sums used to be views of the loss (loss_sum[None])."""
    ring = RingLlamaForCausalLM.from_pretrained(checkpoint_dir)
    ids, labels = _batch(16, seed=4)
    out = ring(ids, shift_labels=labels, loss_reduction="sum")
    assert not out.loss_sums._is_view() and not out.loss_weight_sums._is_view()


def test_hf_generate_with_and_without_cache_equals_llama(checkpoint_dir):
    """generate(use_cache=False) died on a None logits; both ways must give LlamaForCausalLM's tokens."""
    hf, ring = _hf(checkpoint_dir), RingLlamaForCausalLM.from_pretrained(checkpoint_dir)
    ids = _batch(9, seed=5, batch=1)[0]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = hf.generate(ids, **kwargs)
    assert torch.equal(ring.generate(ids, use_cache=True, **kwargs), expected)
    assert torch.equal(ring.generate(ids, use_cache=False, **kwargs), expected)


def test_saved_checkpoint_loads_in_hf(checkpoint_dir, tmp_path):
    ring = RingLlamaForCausalLM.from_pretrained(checkpoint_dir)
    with torch.no_grad():
        ring.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # make it differ from the source checkpoint
    ring.save_pretrained(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ids, _ = _batch(20, seed=4)
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ring(ids, return_logits=True).logits).abs().max() < 1e-5
    assert (hf.model.layers[0].mlp.up_proj.weight == ring.model.layers[0].mlp.up_proj.weight).all()


def test_chunked_mlp_and_checkpointing_keep_gradients(checkpoint_dir):
    ids, labels = _batch(30, seed=5)
    grads = []
    for options in ({}, {"mlp_chunk_size": 7, "activation_checkpointing": True, "loss_chunk_size": 11}):
        model = RingLlamaForCausalLM.from_pretrained(checkpoint_dir)
        model.apply_options(**options)
        model.train()
        model(ids, shift_labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


def test_bad_inputs(checkpoint_dir):
    ring = RingLlamaForCausalLM.from_pretrained(checkpoint_dir)
    ids, labels = _batch(16, seed=6)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ring(ids, position_ids=torch.arange(250, 266).expand(2, 16))
    with pytest.raises(ValueError, match="labels must have shape"):
        ring(ids, shift_labels=labels[:, :-1])
    with pytest.raises(ValueError, match="2-D padding mask"):
        ring(ids, attention_mask=torch.ones(2, 1, 16, 16))
    with pytest.raises(ValueError, match="labels must lie in"):
        ring(ids, labels=torch.full_like(ids, VOCAB))
    with pytest.raises(ValueError, match="unknown ringlwm_options"):
        ring.apply_options(mlp_chunks=3)


def test_context_extension_changes_rope(checkpoint_dir):
    """A stage with a longer context and a larger theta: the RoPE of the rebuilt model follows the config."""
    config = tiny_config()
    set_context_length(config, 1024, rope_theta=5e7)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    ring = RingLlamaForCausalLM(config).eval()
    ring.load_state_dict(hf.state_dict())
    ids, _ = _batch(20, seed=7)
    pos = torch.arange(900, 920).expand(2, 20)  # beyond the old 256 limit
    with torch.no_grad():
        assert (ring(ids, pos, return_logits=True).logits - hf(input_ids=ids, position_ids=pos).logits).abs().max() < 1e-5
    assert rope_theta(ring.config) == 5e7


# ------------------------------------------------------------------------------------------------
# Blockwise cross-entropy
# ------------------------------------------------------------------------------------------------


def test_linear_cross_entropy_matches_full_logits():
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(3, 50, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (3, 50), generator=gen)
    labels[0, :7] = -100
    weights = torch.rand(3, 50, generator=gen, dtype=torch.float64)
    loss_sum, weight_sum = linear_cross_entropy(hidden, weight, labels, weights, chunk_size=13)
    (loss_sum / weight_sum).backward()
    got = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    ce = F.cross_entropy((hidden @ weight.t()).reshape(-1, 40), labels.reshape(-1), ignore_index=-100,
                         reduction="none")
    valid = (labels.reshape(-1) != -100).double()
    ref = (ce * weights.reshape(-1) * valid).sum() / (weights.reshape(-1) * valid).sum()
    ref.backward()
    assert abs((loss_sum / weight_sum).item() - ref.item()) < 1e-12
    assert torch.allclose(got[0], hidden.grad, atol=1e-12) and torch.allclose(got[1], weight.grad, atol=1e-12)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_blockwise_loss_memory_is_bounded_by_the_chunk():
    """4096 tokens x 1000 vocab: no tensor of the loss's forward or backward exceeds chunk x vocab."""
    tokens, vocab, width, chunk = 4096, 1000, 32, 256
    hidden = torch.randn(tokens, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    with _LargestTensor() as probe:
        loss_sum, weight_sum = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
        (loss_sum / weight_sum).backward()
    assert probe.largest <= chunk * vocab, probe.largest
    assert probe.largest < tokens * vocab // 8


# ------------------------------------------------------------------------------------------------
# Hugging Face conventions (issue 17): unshifted labels, shift_labels, attention_mask, num_items_in_batch,
# the caller's config, attn_implementation
# ------------------------------------------------------------------------------------------------


def test_labels_mean_what_they_mean_in_transformers(checkpoint_dir):
    """model(ids, labels=ids) is LlamaForCausalLM's loss (the model shifts); it used to train on the current
    token. The gradients are the same too."""
    hf, ring = _hf(checkpoint_dir), RingLlamaForCausalLM.from_pretrained(checkpoint_dir)
    ids, _ = _batch(40, seed=11)
    labels = ids.clone()
    labels[0, 7] = -100
    ref = hf(input_ids=ids, labels=labels)
    ref.loss.backward()
    out = ring(ids, labels=labels)
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5, (out.loss.item(), ref.loss.item())
    for (name, p), q in zip(ring.named_parameters(), hf.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name


def test_num_items_in_batch_as_in_transformers(checkpoint_dir):
    """Gradient accumulation: the loss is the micro-batch's sum over num_items_in_batch, as transformers'."""
    hf, ring = _hf(checkpoint_dir), RingLlamaForCausalLM.from_pretrained(checkpoint_dir)
    ids, _ = _batch(24, seed=12)
    for items in (200, torch.tensor(77)):
        ref = hf(input_ids=ids, labels=ids, num_items_in_batch=items).loss
        got = ring(ids, labels=ids, num_items_in_batch=items).loss
        assert abs(got.item() - ref.item()) < 1e-5 * abs(ref.item()), (got.item(), ref.item())
    with pytest.raises(ValueError, match="num_items_in_batch"):
        ring(ids, labels=ids, num_items_in_batch=10, loss_reduction="sum")


def test_left_padding_equals_hf_on_the_real_tokens(checkpoint_dir):
    """A left-padded batch with its 2-D attention_mask: logits of the real tokens equal HF eager's; the loss
    is the mean over the positions whose input and target are real."""
    hf, ring = _hf(checkpoint_dir), RingLlamaForCausalLM.from_pretrained(checkpoint_dir)
    ids, _ = _batch(20, seed=13)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # row 1 is left-padded by 6
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref_logits = hf(input_ids=ids, attention_mask=mask).logits
        out = ring(ids, labels=labels, attention_mask=mask, return_logits=True)
    real = mask.bool()
    assert (out.logits[real] - ref_logits[real]).abs().max() < 1e-5
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).masked_fill(~real, -100)
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
    assert abs(out.loss.item() - ref_loss.item()) < 1e-5
    # all ones (what HF collators send) is the unmasked model
    with torch.no_grad():
        ones = ring(ids, labels=ids, attention_mask=torch.ones_like(ids)).loss
        assert abs(ones.item() - ring(ids, labels=ids).loss.item()) < 1e-6


def test_packed_positions_without_segment_ids_as_in_transformers(checkpoint_dir):
    """On one process, positions that restart mark documents, as transformers' attention reads them in
    training (padding-free batches; transformers looks for them only without a cache: use_cache=False)."""
    hf, ring = _hf(checkpoint_dir), RingLlamaForCausalLM.from_pretrained(checkpoint_dir)
    ids, pos, _, _, _ = _packed_batch(48, seed=14)
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=pos, use_cache=False).logits
        got = ring(ids, pos, return_logits=True).logits
    assert (got - ref).abs().max() < 1e-5


def test_construction_keeps_the_callers_config():
    config = tiny_config()
    before = config.to_dict()
    attn = config._attn_implementation
    RingLlamaForCausalLM(config)
    assert config.to_dict() == before and config._attn_implementation == attn
    assert not hasattr(config, "ringlwm_options")
    assert LlamaForCausalLM(config).config._attn_implementation != "ringlwm_ring"


def test_attn_implementation_is_obeyed_or_refused(checkpoint_dir):
    with pytest.raises(ValueError, match="LlamaForCausalLM.from_pretrained"):
        RingLlamaForCausalLM.from_pretrained(checkpoint_dir, attn_implementation="sdpa")
    model = RingLlamaForCausalLM.from_pretrained(checkpoint_dir, attn_implementation="ringlwm_ring")
    assert model.config._attn_implementation == "ringlwm_ring"
    with pytest.raises(ValueError, match="always attends over the ring"):
        model.set_attn_implementation("eager")


def _shift_labels_sharded(rank, world_size, path):
    """Sequence parallel: shift_labels (shifted before sharding) give LlamaForCausalLM's loss and gradients;
    unshifted labels on a shard are refused."""
    hf = _hf(path)
    ring = RingLlamaForCausalLM.from_pretrained(path)
    ids, _ = _batch(48, seed=15)
    ref = hf(input_ids=ids, labels=ids)
    ref.loss.backward()
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    pos = torch.arange(48).expand(2, 48)
    out = ring(shard_sequence(ids, 1), shard_sequence(pos, 1), shift_labels=shard_sequence(targets, 1))
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5, (out.loss.item(), ref.loss.item())
    for (name, p), q in zip(ring.named_parameters(), hf.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        assert torch.allclose(grad, q.grad, atol=1e-6, rtol=1e-4), name
    # num_items_in_batch over the group: the same value on every rank, gradients summing to HF's
    hf.zero_grad()
    ring.zero_grad()
    hf(input_ids=ids, labels=ids, num_items_in_batch=150).loss.backward()
    out = ring(shard_sequence(ids, 1), shard_sequence(pos, 1), shift_labels=shard_sequence(targets, 1),
               num_items_in_batch=150)
    out.loss.backward()
    ref_loss = hf(input_ids=ids, labels=ids, num_items_in_batch=150).loss
    assert abs(out.loss.item() - ref_loss.item()) < 1e-5
    for (name, p), q in zip(ring.named_parameters(), hf.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        assert torch.allclose(grad, q.grad, atol=1e-6, rtol=1e-4), name
    with pytest.raises(ValueError, match="pass shift_labels"):
        ring(shard_sequence(ids, 1), shard_sequence(pos, 1), labels=shard_sequence(ids, 1))
    return True


def test_shift_labels_under_sharding_equal_hf(checkpoint_dir):
    assert all(run_distributed(_shift_labels_sharded, 2, checkpoint_dir))
