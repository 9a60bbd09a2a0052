"""enable_ring on transformers' own Llama 2/3, Mistral, Qwen2 and Qwen3 (tiny random configs): logits and
gradients equal the same weights under eager attention on 1, 2 and 4 gloo ranks (4: marked slow), packed
documents included; the attn_implementation route; padding masks handed to the ring; sliding windows refused
when active; a plain model in a multi-process world without a group refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from ringlwm import shard_sequence, unshard_sequence
from ringlwm.models import enable_ring

VOCAB, SEQ = 61, 32
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0)


def family_configs() -> dict:
    llama3_rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return {
        "llama2": LlamaConfig(**COMMON, tie_word_embeddings=False),
        "llama3": LlamaConfig(**COMMON, tie_word_embeddings=True, rope_parameters=llama3_rope),
        "mistral": MistralConfig(**COMMON, sliding_window=SEQ, tie_word_embeddings=False),
        "qwen2": Qwen2Config(**COMMON, tie_word_embeddings=False),
        "qwen3": Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False),
    }


def _eager(config, seed=0):
    """The family's model on eager attention, its own copy of the config (enable_ring switches a model's
    config, and models built from one config object share it)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager").float()


def _packed(seed):
    """Two rows, documents of uneven length; targets shifted before sharding, -100 at document ends."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    lengths = [[9, 14, SEQ - 23], [SEQ - 5, 5]]
    seg = torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in lengths])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    targets[F.pad(seg[:, 1:], (0, 1), value=-1) != seg] = -100
    return ids, pos, seg, targets


def _compare_families(rank, world_size):
    """Every family: ring logits (unsharded) and summed gradients equal eager on the whole sequence."""
    group = dist.group.WORLD if world_size > 1 else None
    for name, config in family_configs().items():
        ref = _eager(config)
        ring = enable_ring(_eager(config), sp_group=group)
        assert ring.config._attn_implementation == "ringlwm_ring" and ref.config._attn_implementation == "eager"
        ids, pos, seg, targets = _packed(seed=3)
        items = int((targets != -100).sum())
        out_ref = ref(input_ids=ids, position_ids=pos, labels=targets, shift_labels=targets,
                      num_items_in_batch=items, use_cache=False)
        out_ref.loss.backward()
        shards = [shard_sequence(t, 1, group) for t in (ids, pos, seg, targets)]
        out = ring(input_ids=shards[0], position_ids=shards[1], segment_ids=shards[2], labels=shards[3],
                   shift_labels=shards[3], num_items_in_batch=items, use_cache=False)
        out.loss.backward()
        logits = unshard_sequence(out.logits.detach(), 1, group)
        err = (logits - out_ref.logits.detach()).abs().max().item()
        assert err < 1e-5, f"{name}: logits off by {err:.2e}"
        loss = out.loss.item()  # the sequence group's loss, the same on every rank (as RingLlamaForCausalLM's)
        assert abs(loss - out_ref.loss.item()) < 1e-5, (name, loss, out_ref.loss.item())
        ref_grads = dict(ref.named_parameters())
        for pname, p in ring.named_parameters():
            grad = p.grad.clone()
            if group is not None:
                dist.all_reduce(grad)
            expected = ref_grads[pname].grad
            rel = ((grad - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()
            assert rel < 1e-4, f"{name} {pname}: relative gradient error {rel:.2e}"
    if world_size > 1:
        _plain_model_in_a_world()
    return True


def test_families_one_process():
    assert _compare_families(0, 1)


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_families_over_the_ring(world_size):
    assert all(run_distributed(_compare_families, world_size))


def test_attn_implementation_route_with_default_options(tmp_path):
    """from_pretrained(..., attn_implementation="ringlwm_ring") works without ringlwm_options (it used to fail
    on the missing options), for Mistral and Qwen2 as for Llama."""
    ids, pos, _, _ = _packed(seed=4)
    for name in ("mistral", "qwen2"):
        ref = _eager(family_configs()[name])
        ref.save_pretrained(tmp_path / name)
        ring = AutoModelForCausalLM.from_pretrained(tmp_path / name, attn_implementation="ringlwm_ring")
        with torch.no_grad():
            err = (ring(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
        assert err < 1e-5, (name, err)


def test_padding_mask_reaches_the_ring():
    """A plain model on the ring with a left-padded mask: logits of the real tokens equal eager's (the mask was
    dropped before: off by ~0.5)."""
    for name in ("llama2", "qwen3"):
        ref = _eager(family_configs()[name])
        ring = enable_ring(_eager(family_configs()[name]))
        ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
        mask = torch.ones_like(ids)
        mask[0, :7] = 0
        with torch.no_grad():
            want = ref(input_ids=ids, attention_mask=mask).logits
            got = ring(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        assert (got[real] - want[real]).abs().max() < 1e-5, name
        with pytest.raises(ValueError, match="4-D"):
            ring(input_ids=ids, attention_mask=torch.ones(2, 1, 20, 20))


def test_sliding_window_is_exact_or_refused():
    config = family_configs()["mistral"]
    config.sliding_window = 8
    ring = enable_ring(_eager(config))
    ids = torch.randint(0, VOCAB, (1, 16))
    with pytest.raises(ValueError, match="sliding window of 8 tokens"):
        ring(input_ids=ids)
    ref = _eager(config)  # a sequence within the window: the window is inactive, the ring exact
    with torch.no_grad():
        assert (ring(input_ids=ids[:, :8]).logits - ref(input_ids=ids[:, :8]).logits).abs().max() < 1e-5


def test_enable_ring_refusals():
    with pytest.raises(ValueError, match="supports the families"):
        enable_ring(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="attention_backend"):
        enable_ring(_eager(family_configs()["qwen2"]), mlp_chunk_size=4)


def _plain_model_in_a_world():
    """Without enable_ring, a plain model in a world of several processes must not treat the world as one
    sequence (data-parallel ranks hold different ones)."""
    model = _eager(family_configs()["llama2"])
    model.set_attn_implementation("ringlwm_ring")
    with pytest.raises(ValueError, match="enable_ring"):
        model(input_ids=torch.randint(0, VOCAB, (1, 8)))
    with pytest.raises(ValueError, match="needs sp_group"):
        enable_ring(model)
