"""PackedLoader: the batch contract, zigzag shards that reassemble, dp splits, exact save/restore."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from byte_tokenizer import ByteTokenizer

from ringlwm.data import (
    IGNORE_INDEX,
    KEYS,
    PAD_SEGMENT,
    DataError,
    Mixture,
    PackedLoader,
    PackedSequences,
    encode_source,
    read_jsonl,
    read_parquet,
    shard_batch,
)

SEQ_LEN = 48  # a multiple of 2 * sp_size for sp_size 1, 2, 3, 4


TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Books (some longer than SEQ_LEN, so documents get split) and chat lines with bad records."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    books = [{"text": " ".join(rng.choice(words, int(rng.integers(2, 30))))} for _ in range(40)]
    (root / "books.jsonl").write_text("".join(json.dumps(b) + "\n" for b in books))
    chat = []
    for i in range(60):
        if i % 17 == 5:
            chat.append('{"question": broken')
        elif i % 13 == 4:
            chat.append(json.dumps({"question": "no answer here"}))
        else:
            chat.append(json.dumps({"question": f"q{i}?", "answer": " ".join(rng.choice(words, int(rng.integers(1, 6))))}))
    (root / "chat.jsonl").write_text("\n".join(chat) + "\n")
    return root


def make_mixture(root, seed=0, on_exhausted="stop"):
    """Fresh source objects each time, as a restarted job would build them."""
    books = encode_source(read_jsonl(root / "books.jsonl"), "text", TOK)
    chat = encode_source(read_jsonl(root / "chat.jsonl", on_error="skip"), "[question],answer", TOK)
    return Mixture({"books": books, "chat": chat}, weights={"books": 1, "chat": 2}, seed=seed,
                   on_exhausted=on_exhausted)


def reassemble(shards):
    """Undo the zigzag layout: rank r holds chunks r and 2W-1-r of the 2W chunks, in that order."""
    world_size = len(shards)
    chunks = [None] * (2 * world_size)
    for r, shard in enumerate(shards):
        chunks[r], chunks[2 * world_size - 1 - r] = shard.chunk(2, dim=1)
    return torch.cat(chunks, dim=1)


def test_batch_contract(corpus):
    batches = list(PackedLoader(make_mixture(corpus), SEQ_LEN, 2, device="cpu"))
    assert len(batches) > 5
    for b in batches:
        assert set(b) == set(KEYS)
        for key in KEYS:
            assert b[key].shape == (2, SEQ_LEN) and b[key].device.type == "cpu"
            assert b[key].dtype == (torch.float32 if key == "loss_weights" else torch.int64)
        no_loss = b["labels"] == IGNORE_INDEX
        assert (b["loss_weights"][no_loss] == 0).all() and (b["loss_weights"][~no_loss] > 0).all()
        assert (b["position_ids"] >= 0).all() and (b["position_ids"] < SEQ_LEN).all()
        pad = b["segment_ids"] == PAD_SEGMENT
        assert (b["labels"][pad] == IGNORE_INDEX).all()
        assert ((b["input_ids"] >= 0) & (b["input_ids"] < TOK.vocab_size)).all()
    # the chat spec trains answers only: no label is a "?" (the end of every question)
    qmark = TOK.encode("?")[0]
    assert not any((b["labels"] == qmark).any() for b in batches)


@pytest.mark.parametrize("sp_size", [2, 3, 4])
def test_sp_shards_reassemble(corpus, sp_size):
    full = list(PackedLoader(make_mixture(corpus), SEQ_LEN, 2))
    per_rank = [list(PackedLoader(make_mixture(corpus), SEQ_LEN, 2, sp_rank=r, sp_size=sp_size))
                for r in range(sp_size)]
    assert all(len(batches) == len(full) for batches in per_rank)
    for i, ref in enumerate(full):
        for key in KEYS:
            shards = [per_rank[r][i][key] for r in range(sp_size)]
            assert all(s.shape == (2, SEQ_LEN // sp_size) for s in shards)
            torch.testing.assert_close(reassemble(shards), ref[key], rtol=0, atol=0)


def test_shard_batch_layout():
    x = torch.arange(16).reshape(1, 16)
    assert shard_batch({"x": x}, 0, 2)["x"].tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert shard_batch({"x": x}, 1, 2)["x"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert shard_batch({"x": x.numpy()}, 0, 1)["x"].tolist() == x.tolist()
    with pytest.raises(ValueError, match="2 \\* world_size"):
        shard_batch({"x": torch.zeros(1, 10)}, 0, 3)
    with pytest.raises(ValueError, match="sp_rank"):
        shard_batch({"x": x}, 2, 2)


def test_dp_ranks_get_disjoint_interleaved_sequences(corpus):
    dp_size, batch_size = 3, 2
    ref = list(PackedLoader(make_mixture(corpus), SEQ_LEN, batch_size * dp_size))
    ranks = [list(PackedLoader(make_mixture(corpus), SEQ_LEN, batch_size, dp_rank=r, dp_size=dp_size))
             for r in range(dp_size)]
    assert all(len(batches) == len(ref) for batches in ranks)
    for step, global_batch in enumerate(ref):
        for j in range(batch_size * dp_size):  # global sequence j of the step goes to rank j % dp_size
            got = ranks[j % dp_size][step]
            for key in KEYS:
                assert torch.equal(got[key][j // dp_size], global_batch[key][j])


def test_partial_global_batch_is_dropped(corpus):
    num_sequences = sum(1 for _ in PackedSequences(make_mixture(corpus), SEQ_LEN))
    for batch_size, dp_size in [(1, 1), (2, 2), (3, 2), (5, 1)]:
        loader = PackedLoader(make_mixture(corpus), SEQ_LEN, batch_size, dp_size=dp_size)
        assert sum(1 for _ in loader) == num_sequences // (batch_size * dp_size)
        assert next(loader, None) is None


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in KEYS:
            assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("split", ["long", "always"])
def test_restore_gives_identical_batches(corpus, split):
    kw = dict(dp_rank=1, dp_size=2, sp_rank=1, sp_size=2, split=split)
    reference = PackedLoader(make_mixture(corpus), SEQ_LEN, 2, **kw)
    full = list(reference)
    assert len(full) > 4
    offsets = []
    for n in range(len(full) + 1):
        first = PackedLoader(make_mixture(corpus), SEQ_LEN, 2, **kw)
        for _ in range(n):
            next(first)
        state = pickle.loads(pickle.dumps(first.state_dict()))
        assert len(pickle.dumps(state)) < 2000  # offsets and counters, no token data
        offsets.append(state["packer"]["offset"])
        resumed = PackedLoader(make_mixture(corpus), SEQ_LEN, 2, **kw)
        resumed.load_state_dict(state)
        assert_same_batches(list(resumed), full[n:])
        # the counts (packing and skipped records) match the uninterrupted run's
        assert resumed.stats["packing"] == reference.stats["packing"]
        assert resumed.stats["stream"]["chat"]["source"] == reference.stats["stream"]["chat"]["source"]
        assert resumed.stats["sequences"] == reference.stats["sequences"]
    assert any(offsets), "no save point fell inside a split document"
    skipped = reference.stats["stream"]["chat"]["source"].skipped
    assert skipped["malformed_json"] > 0 and skipped["missing_field"] > 0


def test_restore_with_epochs(corpus):
    make = lambda: make_mixture(corpus, seed=5, on_exhausted="restart")  # noqa: E731
    full = PackedLoader(make(), SEQ_LEN, 3)
    batches = [next(full) for _ in range(100)]  # several epochs of both sources
    assert full.stats["stream"]["chat"]["epochs"] >= 2 and full.stats["stream"]["books"]["epochs"] >= 2
    first = PackedLoader(make(), SEQ_LEN, 3)
    for _ in range(57):
        next(first)
    resumed = PackedLoader(make(), SEQ_LEN, 3)
    resumed.load_state_dict(first.state_dict())
    assert_same_batches([next(resumed) for _ in range(43)], batches[57:])
    assert resumed.stats["stream"]["chat"]["epochs"] == full.stats["stream"]["chat"]["epochs"]


def test_factory_with_seed(corpus):
    def factory(seed):  # a generator: not resumable, restored by replay
        def gen():
            yield from make_mixture(corpus, seed=seed)
        return gen()

    full = list(PackedLoader(factory, SEQ_LEN, 2, seed=4))
    first = PackedLoader(factory, SEQ_LEN, 2, seed=4)
    next(first), next(first)
    state = first.state_dict()
    assert "consumed" in state["packer"]["examples"]
    resumed = PackedLoader(factory, SEQ_LEN, 2, seed=4)
    resumed.load_state_dict(state)
    assert_same_batches(list(resumed), full[2:])
    # a factory returning a stream (seeded by the loader) restores from offsets, and the seed matters
    via_stream = list(PackedLoader(lambda seed: make_mixture(corpus, seed=seed), SEQ_LEN, 2, seed=4))
    assert_same_batches(via_stream, full)
    other = list(PackedLoader(lambda seed: make_mixture(corpus, seed=seed), SEQ_LEN, 2, seed=5))
    assert len(other) != len(full) or any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(other, full))


def test_restore_with_another_dp_size(corpus):
    ref = list(PackedLoader(make_mixture(corpus), SEQ_LEN, 2))
    first = PackedLoader(make_mixture(corpus), SEQ_LEN, 2)
    for _ in range(3):
        next(first)
    state = first.state_dict()
    ranks = []
    for r in range(2):
        loader = PackedLoader(make_mixture(corpus), SEQ_LEN, 1, dp_rank=r, dp_size=2)
        loader.load_state_dict(state)
        ranks.append(list(loader))
    for step, batch in enumerate(ref[3:]):
        for r in range(2):
            assert torch.equal(ranks[r][step]["input_ids"][0], batch["input_ids"][r])


def test_state_checks(corpus):
    state = PackedLoader(make_mixture(corpus), SEQ_LEN, 2).state_dict()
    with pytest.raises(ValueError, match="seq_len=48"):
        PackedLoader(make_mixture(corpus), 24, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0"):
        PackedLoader(make_mixture(corpus), SEQ_LEN, 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="split='long'"):
        PackedLoader(make_mixture(corpus), SEQ_LEN, 2, split="always").load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        PackedLoader(make_mixture(corpus), SEQ_LEN, 2).load_state_dict({**state, "version": 99})


def test_argument_errors(corpus):
    with pytest.raises(ValueError, match="seq_len 50 cannot be split"):
        PackedLoader([], 50, 1, sp_size=4)
    with pytest.raises(ValueError, match="dp_rank"):
        PackedLoader([], SEQ_LEN, 1, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="sp_rank"):
        PackedLoader([], SEQ_LEN, 1, sp_rank=-1, sp_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        PackedLoader([], SEQ_LEN, 0)
    with pytest.raises(TypeError, match="one-shot"):
        PackedLoader(iter([([1, 2], [True, True])]), SEQ_LEN, 1)


def test_bad_data_raises_through_the_loader(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    loader = PackedLoader(encode_source(read_jsonl(tmp_path / "a.jsonl"), "text", TOK), 8, 1)
    with pytest.raises(DataError, match=r"a\.jsonl:2: malformed JSON"):
        list(loader)


def test_parquet_through_the_loader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"text": "word " * (i % 11 + 1)} for i in range(60)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet", row_group_size=8)

    def stream():
        return encode_source(read_parquet(tmp_path / "t.parquet"), "text", TOK)

    full = list(PackedLoader(stream(), 32, 2))
    first = PackedLoader(stream(), 32, 2)
    for _ in range(5):
        next(first)
    resumed = PackedLoader(stream(), 32, 2)
    resumed.load_state_dict(pickle.loads(pickle.dumps(first.state_dict())))
    assert_same_batches(list(resumed), full[5:])
    text = "".join(TOK.decode(b["input_ids"][b["segment_ids"] >= 0].tolist()) for b in full)
    assert text.count("word") <= sum(r["text"].count("word") for r in rows)
