"""pack_documents: every token once and in order, segments, positions, shifted labels, loss weights.

The invariants are checked by rebuilding every document from the packed sequences, on random documents
of lengths from 1 token to several sequences (so whole, exactly-fitting and split documents all occur).
"""

from __future__ import annotations

import numpy as np
import pytest

from ringlwm.data import IGNORE_INDEX, KEYS, PAD_SEGMENT, pack_documents


def random_examples(num, max_len, seed, vocab=50, float_mask=False):
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(num):
        n = int(rng.integers(1, max_len + 1))
        ids = rng.integers(0, vocab, n).tolist()
        mask = (rng.random(n) * 2).round(1).tolist() if float_mask else (rng.random(n) < 0.7).tolist()
        examples.append((ids, mask))
    return examples


def expected_labels(ids, mask):
    """LWM convention: position i is trained to predict token i+1 when mask[i+1] is set."""
    labels = [ids[i + 1] if mask[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)]
    return labels + [IGNORE_INDEX]


def split_segments(seq):
    """[(segment id, start, end)] of the contiguous runs of segment ids, padding included."""
    seg = seq["segment_ids"]
    cuts = [0] + [i for i in range(1, len(seg)) if seg[i] != seg[i - 1]] + [len(seg)]
    return [(int(seg[a]), a, b) for a, b in zip(cuts[:-1], cuts[1:])]


def check_packing(examples, seqs, seq_len, continuation_labels=True, split="long"):
    """Rebuild the documents from ``seqs`` and check every invariant of the packing."""
    docs = iter(examples)
    doc, done = None, 0  # the document being rebuilt and how many of its tokens are seen
    prev_pad = 0
    for k, seq in enumerate(seqs):
        assert set(seq) == set(KEYS)
        for key in KEYS:
            assert seq[key].shape == (seq_len,), key
        assert seq["loss_weights"].dtype == np.float32
        assert all(seq[key].dtype == np.int64 for key in KEYS if key != "loss_weights")
        runs = split_segments(seq)
        num_pad = 0
        if runs[-1][0] == PAD_SEGMENT:
            runs, (_, pad_start, _) = runs[:-1], runs[-1]
            num_pad = seq_len - pad_start
            assert (seq["labels"][pad_start:] == IGNORE_INDEX).all()
            assert (seq["loss_weights"][pad_start:] == 0).all()
        assert runs, f"sequence {k} holds no document"
        assert [s for s, _, _ in runs] == list(range(len(runs)))  # distinct, and padding only at the end
        for j, (_, a, b) in enumerate(runs):
            if doc is None or done == len(doc[0]):
                doc, done = next(docs), 0
                if j == 0 and prev_pad:  # greedy: padding only when the next document did not fit
                    assert split == "long" and len(doc[0]) > prev_pad
            else:
                # a continuation: only at the start of a sequence, after a piece that filled the last one
                assert j == 0 and prev_pad == 0, f"sequence {k}: a document continues mid-sequence"
            ids, mask = doc
            n = b - a
            assert n <= len(ids) - done
            if done + n < len(ids):  # a piece that does not end its document fills its sequence
                assert b == seq_len and j == len(runs) - 1
            np.testing.assert_array_equal(seq["input_ids"][a:b], ids[done:done + n])
            np.testing.assert_array_equal(seq["position_ids"][a:b], np.arange(n))
            labels = expected_labels(ids, mask)[done:done + n]
            if not continuation_labels and done + n < len(ids):
                labels[-1] = IGNORE_INDEX
            np.testing.assert_array_equal(seq["labels"][a:b], labels)
            done += n
        prev_pad = num_pad
        assert (seq["position_ids"] < seq_len).all()
        trained = seq["labels"] != IGNORE_INDEX
        assert ((seq["loss_weights"] > 0) == trained).all()
    assert doc is None or done == len(doc[0]), "the last document was not finished"
    assert next(docs, None) is None, "documents were dropped"


@pytest.mark.parametrize("split", ["long", "always"])
@pytest.mark.parametrize("seq_len", [1, 7, 16, 64])
@pytest.mark.parametrize("max_len", [5, 40, 150])
def test_every_token_once_in_order(seq_len, max_len, split):
    examples = random_examples(60, max_len, seed=seq_len * 1000 + max_len)
    seqs = list(pack_documents(examples, seq_len, split=split))
    check_packing(examples, seqs, seq_len, split=split)
    if split == "always":  # padding only in the last sequence
        assert all((s["segment_ids"] != PAD_SEGMENT).all() for s in seqs[:-1])
    total = sum(len(ids) for ids, _ in examples)
    assert sum(int((s["segment_ids"] != PAD_SEGMENT).sum()) for s in seqs) == total


def test_placement_rules():
    """Whole documents in order; one that does not fit starts the next sequence; a long one is cut."""
    ex = [([1] * 3, [True] * 3), ([2] * 4, [True] * 4), ([3] * 2, [True] * 2), ([4] * 19, [True] * 19), ([5] * 1, [True])]
    seqs = list(pack_documents(ex, 8))
    got = [s["input_ids"].tolist() for s in seqs]
    assert got == [
        [1, 1, 1, 2, 2, 2, 2, 0],  # doc 3 (2 tokens) does not fit in the 1 token left
        [3, 3, 0, 0, 0, 0, 0, 0],  # doc 4 is longer than seq_len: it starts a fresh sequence
        [4] * 8,
        [4] * 8,
        [4, 4, 4, 5, 0, 0, 0, 0],  # its last piece is followed by the next document
    ]
    assert [s["segment_ids"].tolist() for s in seqs][4] == [0, 0, 0, 1, -1, -1, -1, -1]
    # the last token of a non-final piece predicts the continuation's first token
    assert seqs[2]["labels"][-1] == 4 and seqs[3]["labels"][-1] == 4
    assert seqs[4]["labels"][2] == IGNORE_INDEX  # end of document 4

    always = [s["input_ids"].tolist() for s in pack_documents(ex, 8, split="always")]
    assert always == [[1, 1, 1, 2, 2, 2, 2, 3], [3, 4, 4, 4, 4, 4, 4, 4], [4] * 8, [4] * 4 + [5, 0, 0, 0]]


def test_no_continuation_labels():
    examples = random_examples(30, 60, seed=3)
    seqs = list(pack_documents(examples, 16, continuation_labels=False))
    check_packing(examples, seqs, 16, continuation_labels=False)


def test_loss_mask_marks_targets():
    # mask[i] says token i is a trained target: labels sit one position earlier
    ids, mask = [10, 11, 12, 13, 14], [False, False, True, True, False]
    seq = next(pack_documents([(ids, mask)], 8))
    assert seq["labels"].tolist()[:5] == [IGNORE_INDEX, 12, 13, IGNORE_INDEX, IGNORE_INDEX]
    assert seq["loss_weights"].tolist()[:5] == [0, 1, 1, 0, 0]


def test_example_weighting_gives_each_piece_one_unit():
    examples = random_examples(40, 30, seed=5)
    token = list(pack_documents(examples, 32))
    example = list(pack_documents(examples, 32, loss_weighting="example"))
    for t, e in zip(token, example):
        np.testing.assert_array_equal(t["labels"], e["labels"])
        for seg, a, b in split_segments(e):
            w = e["loss_weights"][a:b]
            if seg != PAD_SEGMENT and t["loss_weights"][a:b].sum() > 0:
                assert w.sum() == pytest.approx(1.0, rel=1e-5)
                assert np.allclose(w[w > 0], w[w > 0][0])  # equal within the piece
            else:
                assert w.sum() == 0


def test_float_mask_passes_through_as_weights():
    examples = random_examples(20, 20, seed=7, float_mask=True)
    seqs = list(pack_documents(examples, 24))
    flat_w = np.concatenate([s["loss_weights"][s["segment_ids"] != PAD_SEGMENT] for s in seqs])
    expected = np.concatenate([np.append(np.asarray(m[1:], np.float32), 0.0) for _, m in examples])
    np.testing.assert_allclose(flat_w, expected)


def test_stats():
    examples = random_examples(50, 40, seed=11)
    it = pack_documents(examples, 20)
    seqs = list(it)
    s = it.stats
    assert s.sequences == len(seqs) and s.documents == len(examples)
    assert s.tokens == sum(len(i) for i, _ in examples)
    assert s.tokens + s.pad_tokens == 20 * len(seqs)
    assert s.split_documents == sum(len(i) > 20 for i, _ in examples)
    assert s.loss_tokens == sum(int((q["labels"] != IGNORE_INDEX).sum()) for q in seqs)
    assert 0 < s.pad_fraction < 1


@pytest.mark.parametrize(
    "examples, match",
    [
        ([([], [])], "empty"),
        ([([1, 2], [True])], "one length"),
        ([([1, -2], [True, True])], "non-negative integers"),
        ([([1.5, 2], [True, True])], "non-negative integers"),
        ([([1, 2], [True, -1.0])], "loss_mask"),
        ([[1, 2, 3]], "pair"),
    ],
)
def test_bad_examples_raise(examples, match):
    with pytest.raises(ValueError, match=match):
        list(pack_documents(examples, 8))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents([], 0)
    with pytest.raises(ValueError, match="loss_weighting"):
        pack_documents([], 8, loss_weighting="doc")
    with pytest.raises(ValueError, match="pad_id"):
        pack_documents([], 8, pad_id=-1)
    with pytest.raises(ValueError, match="split"):
        pack_documents([], 8, split="never")


def test_plain_iterator_packing_cannot_be_saved():
    it = pack_documents(iter(random_examples(3, 5, seed=0)), 8)
    next(it)
    with pytest.raises(TypeError, match="cannot be saved"):
        it.state_dict()


def test_ignore_index_matches_the_model_loss():
    from ringlwm.models.loss import IGNORE_INDEX as MODEL_IGNORE_INDEX

    assert IGNORE_INDEX == MODEL_IGNORE_INDEX
