"""RingLwmForCausalLM: text-only equals RingLlamaForCausalLM, the vision/text loss weighting by hand,
sequence parallel (2 gloo processes) equals one process, and the save/load round trip."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from tiny_models import tiny_llama_config
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ringlwm import shard_sequence, unshard_sequence
from ringlwm.models import RingLlamaForCausalLM, rope_theta, set_context_length
from ringlwm.models.lwm import LwmConfig, RingLwmForCausalLM

VOCAB, VISION_VOCAB = 97, 8448


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              max_position_embeddings=256)
    kw.update(overrides)
    config = tiny_llama_config(**kw)
    set_context_length(config, kw["max_position_embeddings"], rope_theta=5e7)  # LWM's vision-language theta
    return config


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(tiny_config()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def lwm_dir(text_dir, tmp_path_factory):
    """The text checkpoint grown into a vision-language one (vision table and head new, random)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny_lwm")
    RingLwmForCausalLM.from_pretrained(text_dir).save_pretrained(path)
    return str(path)


def vision_batch(seqlen, seed, batch=2):
    """Text, then a <vision>-like run of vision ids ending at <eov>, then text; labels shifted by one."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seqlen), generator=gen)
    vision = torch.zeros(batch, seqlen, dtype=torch.bool)
    vision[0, 5:22] = True
    vision[1, 9:40] = True
    codes = torch.randint(0, 8192, (batch, seqlen), generator=gen)
    ids = torch.where(vision, codes, ids)
    ids[0, 21], ids[1, 39] = 8193, 8193  # <eov>; also ids beyond the text vocabulary on purpose
    labels = torch.roll(ids, -1, dims=1)
    label_vision = torch.roll(vision, -1, dims=1)
    labels[:, -1] = -100
    label_vision[:, -1] = False
    labels[:, 2] = -100
    labels[1, 12] = -100  # an untrained vision target
    weights = torch.rand(batch, seqlen, generator=gen) + 0.5
    return ids, vision, labels, label_vision, weights


def hand_loss(vision_logits, text_logits, labels, label_vision, weights, wv=0.5, wt=0.5):
    """LWM's train.py: each head's weighted mean CE over its own targets, then wv * vision + wt * text."""
    valid = labels != -100
    parts = []
    for logits, mine in ((vision_logits, valid & label_vision), (text_logits, valid & ~label_vision)):
        ce = F.cross_entropy(logits[mine].double(), labels[mine], reduction="none")
        parts.append((ce * weights[mine]).sum() / weights[mine].sum())
    return wv * parts[0] + wt * parts[1], parts[0], parts[1]


def test_without_vision_tokens_equals_ring_llama(text_dir):
    ring = RingLlamaForCausalLM.from_pretrained(text_dir)
    lwm = RingLwmForCausalLM.from_pretrained(text_dir)  # text checkpoint: vision parts initialised fresh
    assert lwm.vision_head.weight.std() > 0 and lwm.config.vision_vocab_size == VISION_VOCAB
    assert rope_theta(lwm.config) == 5e7
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 33), generator=gen)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    weights = torch.rand(2, 33, generator=gen)
    ref = ring(ids, shift_labels=labels, loss_weights=weights, return_logits=True)
    ref.loss.backward()
    no_vision = torch.zeros_like(ids, dtype=torch.bool)
    for kwargs in ({}, {"vision_mask": no_vision, "label_vision_mask": no_vision}):
        lwm.zero_grad()
        out = lwm(ids, shift_labels=labels, loss_weights=weights, return_logits=True, **kwargs)
        assert torch.allclose(out.logits, ref.logits, atol=1e-6, rtol=0)
        # LWM's weighting on a text-only batch: 0.5 * text loss, vision part 0
        assert abs(out.loss.item() - 0.5 * ref.loss.item()) < 1e-6 and out.vision_loss.item() == 0
        assert abs(out.text_loss.item() - ref.loss.item()) < 1e-6
    lwm.config.text_loss_weight = 1.0
    lwm.zero_grad()
    out = lwm(ids, shift_labels=labels, loss_weights=weights)
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) < 1e-6
    ring_grads = dict(ring.named_parameters())
    for name, p in lwm.named_parameters():
        if name.startswith("vision_"):
            assert p.grad is not None and p.grad.abs().max() == 0, name  # a gradient on every rank, zero here
        else:
            assert torch.allclose(p.grad, ring_grads[name].grad, atol=1e-6, rtol=1e-4), name


def test_loss_weighting_by_hand(lwm_dir):
    model = RingLwmForCausalLM.from_pretrained(lwm_dir)
    ids, vision, labels, label_vision, weights = vision_batch(48, seed=4)
    out = model(ids, shift_labels=labels, vision_mask=vision, label_vision_mask=label_vision, loss_weights=weights,
                return_logits=True)
    assert out.logits.shape == (2, 48, VOCAB) and out.vision_logits.shape == (2, 48, VISION_VOCAB)
    loss, vision_loss, text_loss = hand_loss(out.vision_logits, out.logits, labels, label_vision, weights)
    assert abs(out.loss.item() - loss.item()) < 1e-5
    assert abs(out.vision_loss.item() - vision_loss.item()) < 1e-5
    assert abs(out.text_loss.item() - text_loss.item()) < 1e-5
    # configurable weights
    model.config.vision_loss_weight, model.config.text_loss_weight = 0.2, 1.5
    out2 = model(ids, shift_labels=labels, vision_mask=vision, label_vision_mask=label_vision, loss_weights=weights)
    assert abs(out2.loss.item() - (0.2 * vision_loss + 1.5 * text_loss).item()) < 1e-5
    # the vision table embeds vision positions, the text table the others
    embeds = model.embed(ids, vision)
    assert torch.equal(embeds[vision], model.vision_embed_tokens.weight[ids[vision]])
    assert torch.equal(embeds[~vision], model.model.embed_tokens.weight[ids[~vision]])
    # loss_reduction="sum": raw per-head sums and weights; normalised by the batch's weights, the same loss
    totals = model.label_weight_sums(shift_labels=labels, loss_weights=weights, label_vision_mask=label_vision)
    out3 = model(ids, shift_labels=labels, vision_mask=vision, label_vision_mask=label_vision, loss_weights=weights,
                 loss_reduction="sum")
    assert torch.allclose(out3.loss_weight_sums.double(), totals)
    coefficients = torch.tensor(list(model.loss_heads.values()), dtype=torch.float64)
    loss3 = (coefficients * out3.loss_sums.double() / totals).sum()
    assert abs(loss3.item() - out2.loss.item()) < 1e-5
    # and ``loss`` means what it means for RingLlamaForCausalLM: the heads' raw sums with their coefficients
    assert abs(out3.loss.item() - (coefficients * out3.loss_sums.double()).sum().item()) < 1e-4


def _sequence_parallel(rank, world_size, path, ref):
    model = RingLwmForCausalLM.from_pretrained(path)
    model.apply_options(loss_chunk_size=7, mlp_chunk_size=5)
    ids, vision, labels, label_vision, weights = vision_batch(48, seed=5)
    pos = torch.arange(48).expand(2, 48)
    shards = [shard_sequence(t, 1) for t in (ids, pos, labels, vision, label_vision, weights)]
    out = model(shards[0], shards[1], shift_labels=shards[2], vision_mask=shards[3], label_vision_mask=shards[4],
                loss_weights=shards[5], return_logits=True)
    out.loss.backward()
    assert abs(out.loss.item() - ref["loss"]) < 1e-5, (out.loss.item(), ref["loss"])
    assert abs(out.vision_loss.item() - ref["vision_loss"]) < 1e-5
    assert (unshard_sequence(out.vision_logits.detach(), 1) - ref["vision_logits"]).abs().max() < 1e-5
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        err = (grad - ref["grads"][name]).abs().max() / ref["grads"][name].abs().max().clamp(min=1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"
    # the trainer's way: per-rank sums over the global totals add up to the loss
    totals = model.label_weight_sums(shift_labels=shards[2], loss_weights=shards[5], label_vision_mask=shards[4])
    dist.all_reduce(totals)
    sums = model(shards[0], shards[1], shift_labels=shards[2], vision_mask=shards[3], label_vision_mask=shards[4],
                 loss_weights=shards[5], loss_reduction="sum").loss_sums.detach()
    coefficients = torch.tensor(list(model.loss_heads.values()), dtype=torch.float64)
    part = (coefficients * sums.double() / totals).sum()
    dist.all_reduce(part)
    assert abs(part.item() - ref["loss"]) < 1e-5


def test_sequence_parallel_matches_one_process(lwm_dir):
    model = RingLwmForCausalLM.from_pretrained(lwm_dir)
    ids, vision, labels, label_vision, weights = vision_batch(48, seed=5)
    out = model(ids, shift_labels=labels, vision_mask=vision, label_vision_mask=label_vision, loss_weights=weights,
                return_logits=True)
    out.loss.backward()
    ref = {"loss": out.loss.item(), "vision_loss": out.vision_loss.item(), "vision_logits": out.vision_logits.detach(),
           "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    for name in ("vision_head.weight", "vision_embed_tokens.weight"):
        assert ref["grads"][name].abs().max() > 0, name
    run_distributed(_sequence_parallel, 2, lwm_dir, ref)


def test_save_load_round_trip(lwm_dir, tmp_path):
    model = RingLwmForCausalLM.from_pretrained(lwm_dir)
    model.config.vision_loss_weight = 0.25
    with torch.no_grad():
        model.vision_head.weight.mul_(2.0)  # differ from the source checkpoint
    model.save_pretrained(tmp_path)
    for loaded in (RingLwmForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert isinstance(loaded, RingLwmForCausalLM) and isinstance(loaded.config, LwmConfig)
        assert loaded.config.vision_loss_weight == 0.25 and loaded.config.vision_vocab_size == VISION_VOCAB
        ids, vision, labels, label_vision, weights = vision_batch(48, seed=6)
        kwargs = dict(shift_labels=labels, vision_mask=vision, label_vision_mask=label_vision, return_logits=True)
        with torch.no_grad():
            a, b = model(ids, **kwargs), loaded(ids, **kwargs)
        assert torch.equal(a.vision_logits, b.vision_logits) and torch.equal(a.logits, b.logits)
        assert a.loss.item() == b.loss.item()


def test_bad_inputs(lwm_dir):
    model = RingLwmForCausalLM.from_pretrained(lwm_dir)
    ids, vision, labels, label_vision, _ = vision_batch(48, seed=7)
    with pytest.raises(ValueError, match="label_vision_mask is required"):
        model(ids, shift_labels=labels, vision_mask=vision)
    with pytest.raises(ValueError, match="input ids out of range"):
        model(ids, vision_mask=torch.zeros_like(vision))  # vision ids read as text ids
    with pytest.raises(ValueError, match="text labels must lie in"):
        model(ids, shift_labels=labels, vision_mask=vision, label_vision_mask=torch.zeros_like(vision))
    with pytest.raises(ValueError, match="vision_mask must have shape"):
        model(ids, vision_mask=vision[:, :-1])
    with pytest.raises(ValueError, match="loss_reduction must be"):
        model(ids, shift_labels=labels, vision_mask=vision, label_vision_mask=label_vision, loss_reduction="max")
    with pytest.raises(NotImplementedError, match="generation"):
        model(ids, vision_mask=vision, use_cache=True)
    with pytest.raises(ValueError, match="not both 0"):
        LwmConfig(vision_loss_weight=0.0, text_loss_weight=0.0)
