"""Vision tokens in LWM's format: 257 tokens a frame, text markers, loss masks from field specs, and the
vision masks through packing and zigzag sharding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from byte_tokenizer import ByteTokenizer

from ringlwm.data import IGNORE_INDEX, DataError, PackedLoader, encode_source, pack_documents, read_jsonl
from ringlwm.data.chat import vision_chat_record
from ringlwm.data.packing import KEYS, VISION_KEYS
from ringlwm.data.vision_tokens import (
    EOF_TOKEN,
    EOV_TOKEN,
    VISION_END,
    VISION_START,
    encode_vision_example,
    encode_vision_source,
    frame_tokens,
    sample_frame_indices,
    sample_frames,
)

TOK = ByteTokenizer()
START, END = TOK.encode(VISION_START), TOK.encode(VISION_END)


def frames(num, seed=0):
    return np.random.default_rng(seed).integers(0, 8192, (num, 256)).tolist()


def test_frames_tokenize_to_257_tokens_each_with_eof_and_eov():
    f = frames(3)
    tokens = frame_tokens(f)
    assert tokens.shape == (3 * 257,)
    for j in range(3):
        assert tokens[j * 257:j * 257 + 256].tolist() == f[j]
    assert tokens[256] == tokens[513] == EOF_TOKEN == 8192 and tokens[-1] == EOV_TOKEN == 8193
    assert frame_tokens(frames(1))[-1] == EOV_TOKEN  # a single image ends with <eov> only
    # LWM's flat list of num_frames * 256 codes is the same thing
    assert (frame_tokens(sum(f, [])) == tokens).all()


def test_vision_block_layout_and_masks():
    f = frames(2)
    ids, loss, vision = encode_vision_example({"vision": f, "caption": "a cat"}, "[vision],caption", TOK)
    block = START + frame_tokens(f).tolist() + END
    caption = TOK.encode("a cat")
    assert ids == [TOK.bos_id, *block, *caption, TOK.eos_id]
    assert len(ids) == len(loss) == len(vision)
    # vision: exactly the codes and <eof>/<eov>; the markers are text
    start = 1 + len(START)
    assert vision == [False] * start + [True] * 514 + [False] * (len(END) + len(caption) + 1)
    # "[vision],caption": the whole vision segment (markers included) untrained, caption and EOS trained
    assert loss == [False] * (1 + len(block)) + [True] * (len(caption) + 1)


@pytest.mark.parametrize("kind, spec, num_frames", [
    ("image-text", "[vision],caption", 1),
    ("video-text", "[vision],caption", 4),
    ("text-image", "[caption],vision", 1),
    ("text-video", "[caption],vision", 3),
    ("both trained", "caption,vision", 2),
])
def test_loss_masks_from_field_specs(kind, spec, num_frames):
    record = {"vision": frames(num_frames, seed=num_frames), "caption": "hello there", "fields": spec}
    ids, loss, vision = encode_vision_example(record, None, TOK)  # the record's own spec
    caption_trained = not spec.startswith("[caption]")
    vision_trained = not spec.startswith("[vision]")
    n_vis = num_frames * 257
    assert sum(vision) == n_vis
    for i, (is_vision, trained) in enumerate(zip(vision, loss)):
        if i == 0:
            assert not trained  # BOS
        elif is_vision:
            assert trained == vision_trained, (kind, i)
    caption = TOK.encode("hello there")
    at = next(i for i in range(len(ids)) if ids[i:i + len(caption)] == caption)
    assert all(m == caption_trained for m in loss[at:at + len(caption)])
    first = vision.index(True)
    assert all(m == vision_trained for m in loss[first - len(START):first + n_vis + len(END)])  # markers too
    assert loss[-1] == (not spec.split(",")[-1].startswith("["))  # EOS follows the last segment
    # vision comes where the spec puts it
    assert (first < at) == spec.replace("[", "").startswith("vision")


def test_vision_chat_record():
    f = frames(2)
    record = vision_chat_record(f, "What is shown?", "A dog.")
    ids, loss, vision = encode_vision_example(record, None, TOK)
    question = TOK.encode("You are a helpful assistant. USER: What is shown?\n")
    prompt = [TOK.bos_id, *question, *START, *frame_tokens(f).tolist(), *END, *TOK.encode(" ASSISTANT:")]
    answer = TOK.encode("A dog.")
    assert ids == prompt + answer + [TOK.eos_id]
    assert loss == [False] * len(prompt) + [True] * (len(answer) + 1)
    text = TOK.decode([i for i, v in zip(ids, vision) if not v])
    assert text == "You are a helpful assistant. USER: What is shown?\n<vision></vision> ASSISTANT:A dog."


def test_plus_keeps_order_and_joins_text():
    f = frames(1)
    ids, _, vision = encode_vision_example({"vision": f, "a": "x", "b": "y"}, "a+b+vision", TOK, add_bos=False,
                                           add_eos=False)
    assert ids == TOK.encode("x y") + START + frame_tokens(f).tolist() + END
    assert vision == [False] * 3 + [False] * len(START) + [True] * 257 + [False] * len(END)


def test_spec_lists_choose_per_record_and_stay_fixed():
    chosen = set()
    for i in range(20):
        record = {"vision": frames(1), "caption": f"caption {i}", "fields": ["[vision],caption", "[caption],vision"]}
        first = encode_vision_example(record, None, TOK)
        assert encode_vision_example(record, None, TOK) == first  # the same record, the same choice
        chosen.add(first[2][1 + len(START)])  # is the first token after BOS+<vision> a vision token?
    assert chosen == {True, False}
    # no spec anywhere: a clear error
    with pytest.raises(DataError, match="field spec") as e:
        encode_vision_example({"vision": frames(1)}, None, TOK)
    assert e.value.reason == "missing_field"


def test_sample_frame_indices():
    assert sample_frame_indices(10, 4) == [0, 3, 6, 9]
    assert sample_frame_indices(3, 8) == [0, 1, 2]
    assert sample_frame_indices(100, 8) == np.linspace(0, 99, 8, dtype=int).tolist()  # LWM's vision_chat
    assert sample_frame_indices(1, 1) == [0]
    with pytest.raises(ValueError, match="at least 1"):
        sample_frame_indices(10, 0)


def test_max_frames_samples_uniformly():
    f = np.arange(10)[:, None].repeat(256, 1)  # frame j holds code j
    assert sample_frames(f, 4)[:, 0].tolist() == [0, 3, 6, 9]
    ids, _, vision = encode_vision_example({"vision": f.tolist()}, "vision", TOK, max_frames=4)
    assert sum(vision) == 4 * 257


@pytest.mark.parametrize("value, reason, match", [
    ([[1] * 255], "bad_vision", "256 codes"),
    ([[8192] * 256], "bad_vision", r"\[0, 8192\)"),
    ([[0.5] * 256], "bad_vision", "integer"),
    ([], "bad_vision", "no frames"),
    ([[1] * 256, [1] * 3], "bad_vision", "different lengths"),
])
def test_bad_frames(value, reason, match):
    with pytest.raises(DataError, match=match) as e:
        encode_vision_example({"vision": value, "caption": "x"}, "[vision],caption", TOK)
    assert e.value.reason == reason


def test_bad_records_are_counted_when_skipped(tmp_path):
    lines = [
        {"vision": frames(1), "caption": "ok", "fields": "[vision],caption"},
        {"vision": [[1] * 10], "caption": "short frame", "fields": "[vision],caption"},
        {"caption": "no vision", "fields": "[vision],caption"},
        {"vision": frames(1), "caption": ["not", "text"], "fields": "[vision],caption"},
        {"vision": frames(1), "caption": "bad spec", "fields": "[vision,caption"},
        {"text": "plain text in the same file"},
    ]
    path = tmp_path / "vl.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    source = encode_vision_source(read_jsonl(path, on_error="skip"), "text", TOK)
    examples = list(source)
    assert len(examples) == 2 and not any(examples[1][2])  # the text record: all text
    assert source.stats.skipped == {"bad_vision": 1, "missing_field": 1, "bad_field": 1, "bad_spec": 1}
    with pytest.raises(DataError, match="vl.jsonl:2"):
        list(encode_vision_source(read_jsonl(path), "text", TOK))
    # the text-only encoder names the way out
    with pytest.raises(DataError, match="vision_tokens"):
        list(encode_source(read_jsonl(path), "[vision],caption", TOK))


def _examples():
    """Vision examples longer and shorter than a sequence, and a text pair among them."""
    out = []
    for i in range(6):
        record = {"vision": frames(1 + i % 3, seed=i), "caption": "cap" * (i + 1)}
        out.append(encode_vision_example(record, "[caption],vision" if i % 2 else "[vision],caption", TOK))
        if i == 2:
            out.append(([1, 50, 51, 52, 2], [False, True, True, True, True]))
    return out


def test_packing_carries_vision_masks_through_splits():
    examples = _examples()
    seqs = list(pack_documents(examples, 300, vision=True))
    for s in seqs:
        assert set(s) == set(KEYS + VISION_KEYS)
        assert s["vision_mask"].dtype == bool and s["label_vision_mask"].dtype == bool
        pad = s["segment_ids"] < 0
        assert not s["vision_mask"][pad].any() and not s["label_vision_mask"][pad].any()
    # rebuild the documents: masks in order, and label i's modality is that of token i + 1
    tokens = np.concatenate([s["input_ids"][s["segment_ids"] >= 0] for s in seqs])
    vision = np.concatenate([s["vision_mask"][s["segment_ids"] >= 0] for s in seqs])
    label_vision = np.concatenate([s["label_vision_mask"][s["segment_ids"] >= 0] for s in seqs])
    labels = np.concatenate([s["labels"][s["segment_ids"] >= 0] for s in seqs])
    assert tokens.tolist() == sum((list(e[0]) for e in examples), [])
    assert vision.tolist() == sum((list(e[2]) if len(e) == 3 else [False] * len(e[0]) for e in examples), [])
    start = 0
    for e in examples:
        n = len(e[0])
        doc_vision = np.asarray(e[2] if len(e) == 3 else [False] * n)
        assert label_vision[start:start + n - 1].tolist() == doc_vision[1:].tolist()
        assert not label_vision[start + n - 1]
        trained = labels[start:start + n] != IGNORE_INDEX
        assert (labels[start:start + n][trained] == np.asarray(e[0])[1:][trained[:-1]]).all()
        start += n


def test_packing_without_vision_flag():
    ids, loss, vision = _examples()[0]
    with pytest.raises(ValueError, match="vision=True"):
        list(pack_documents([(ids, loss, vision)], 64))
    seq = next(pack_documents([(ids[:5], loss[:5], [False] * 5)], 8))  # an all-text triple is fine
    assert set(seq) == set(KEYS)


def test_loader_shards_vision_masks_and_checks_state():
    def make(sp_rank, sp_size):
        return PackedLoader(_examples(), 320, 2, sp_rank=sp_rank, sp_size=sp_size, vision=True)

    full = next(make(0, 1))
    assert set(full) == set(KEYS + VISION_KEYS) and full["vision_mask"].dtype == torch.bool
    assert full["vision_mask"].any() and full["label_vision_mask"].any()
    shards = [next(make(r, 2)) for r in range(2)]
    for key in full:
        chunks = [None] * 4
        for r, shard in enumerate(shards):
            chunks[r], chunks[3 - r] = shard[key].chunk(2, dim=1)
        assert torch.equal(torch.cat(chunks, dim=1), full[key]), key
    loader = make(0, 1)
    next(loader)
    state = loader.state_dict()
    assert state["vision"] is True
    text_loader = PackedLoader(_examples()[3:4], 320, 1)
    with pytest.raises(ValueError, match="vision=True"):
        text_loader.load_state_dict(state)
