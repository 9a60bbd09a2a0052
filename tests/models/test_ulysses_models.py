"""Models on the 2-D layout (Ulysses x ring) on 4 gloo processes: RingLlamaForCausalLM and a transformers
Qwen2 put on the ring by ``enable_ring``, against the same model on one process (HF eager attention, the
whole sequence): loss, logits and summed gradients, packed documents whose boundaries fall inside the
Ulysses pieces."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import grid_groups, run_distributed
from tiny_models import tiny_llama_config
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Qwen2Config

from ringlwm import shard_sequence, unshard_sequence
from ringlwm.models import RingLlamaForCausalLM, enable_ring

VOCAB, SEQ = 61, 48


def _packed(seed):
    """Two rows of documents of uneven length (boundaries at 5, 17, 30 and 7, 29: inside the 6-token pieces
    of a (2, 2) layout of 48 tokens); targets shifted before sharding, -100 at document ends."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    lengths = [[5, 12, 13, SEQ - 30], [7, 22, SEQ - 29]]
    seg = torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in lengths])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    targets[F.pad(seg[:, 1:], (0, 1), value=-1) != seg] = -100
    return ids, pos, seg, targets


def _compare(ref, model, ring, uly, *, ring_model: bool):
    """Loss, logits and world-summed gradients of ``model`` on the 2-D layout against ``ref`` on one process."""
    ids, pos, seg, targets = _packed(seed=3)
    items = int((targets != -100).sum())
    out_ref = ref(input_ids=ids, position_ids=pos, labels=targets, shift_labels=targets, num_items_in_batch=items,
                  use_cache=False)
    out_ref.loss.backward()
    parts = [shard_sequence(t, 1, ring, uly) for t in (ids, pos, seg, targets)]
    kwargs = dict(input_ids=parts[0], position_ids=parts[1], segment_ids=parts[2], shift_labels=parts[3],
                  num_items_in_batch=items)
    if ring_model:
        out = model(**kwargs, sp_group=ring, ulysses_group=uly, return_logits=True)
    else:
        out = model(**kwargs, labels=parts[3], use_cache=False)
    out.loss.backward()
    assert abs(out.loss.item() - out_ref.loss.item()) < 1e-5, (out.loss.item(), out_ref.loss.item())
    logits = unshard_sequence(out.logits.detach(), 1, ring, uly)
    assert (logits - out_ref.logits.detach()).abs().max() < 1e-5
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        expected = ref_grads[name].grad
        rel = ((grad - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()
        assert rel < 1e-4, f"{name}: relative gradient error {rel:.2e}"


def _models_on_the_2d_layout(rank, world_size, sp, ulysses):
    ring, uly = grid_groups(sp, ulysses)
    # RingLlamaForCausalLM, GQA 4/2, against transformers' Llama on the same weights
    config = tiny_llama_config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                               num_key_value_heads=2)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(copy.deepcopy(config)).float()
    ref.config._attn_implementation = "eager"
    model = RingLlamaForCausalLM(copy.deepcopy(config))
    model.load_state_dict(ref.state_dict())
    _compare(ref, model, ring, uly, ring_model=True)

    # a non-Llama family (Qwen2: q/k/v biases), K/V heads repeated when ulysses exceeds them
    qwen = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1 if ulysses > 1 else 2,
                       max_position_embeddings=128, attention_dropout=0.0, tie_word_embeddings=False)
    torch.manual_seed(1)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(qwen), attn_implementation="eager").float()
    model = copy.deepcopy(ref)
    enable_ring(model, sp_group=ring, ulysses_group=uly)
    _compare(ref, model, ring, uly, ring_model=False)

    # positions that restart inside a piece without segment ids: refused, not attended as one document
    ids, pos, _, targets = _packed(seed=4)
    with pytest.raises(ValueError, match="segment_ids"):
        model(input_ids=shard_sequence(ids, 1, ring, uly), position_ids=shard_sequence(pos, 1, ring, uly),
              shift_labels=shard_sequence(targets, 1, ring, uly), labels=shard_sequence(targets, 1, ring, uly),
              use_cache=False)
    return True


@pytest.mark.parametrize("sp,ulysses", [(2, 2), pytest.param(1, 4, marks=pytest.mark.slow)])
def test_models_on_the_2d_layout_equal_one_process(sp, ulysses):
    assert all(run_distributed(_models_on_the_2d_layout, sp * ulysses, sp, ulysses))


def _heads_refused(rank, world_size):
    _, uly = grid_groups(1, 2)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=3, num_key_value_heads=3, attention_dropout=0.0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with pytest.raises(ValueError, match=r"ulysses = 2 .* degrees that work: \[1, 3\]"):
        enable_ring(model, sp_group=None, ulysses_group=uly)
    return True


def test_enable_ring_refuses_heads_that_do_not_fit_ulysses():
    assert all(run_distributed(_heads_refused, 2))
