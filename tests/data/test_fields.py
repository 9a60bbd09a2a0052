"""Field specs: parsing, (token_ids, loss_mask) of a record, and which labels survive packing."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from byte_tokenizer import ByteTokenizer

from ringlwm.data import (
    IGNORE_INDEX,
    DataError,
    encode_example,
    encode_source,
    pack_documents,
    parse_field_spec,
    read_jsonl,
)


class NoSpecialTokenizer(ByteTokenizer):
    bos_id = eos_id = None


TOK = ByteTokenizer()


def test_parse_segments_and_loss():
    spec = parse_field_spec("[question],answer")
    assert [(s.fields, s.loss) for s in spec.segments] == [(("question",), False), (("answer",), True)]
    spec = parse_field_spec(" [vision + question] , answer ")
    assert [(s.fields, s.loss) for s in spec.segments] == [(("vision", "question"), False), (("answer",), True)]
    assert spec.fields == ("vision", "question", "answer")
    assert parse_field_spec("text").segments[0].loss


@pytest.mark.parametrize("bad", ["", "  ", "[a", "a]", "a,,b", "[a+]", "[]", "a+[b]", None])
def test_parse_errors(bad):
    with pytest.raises(ValueError, match="field spec"):
        parse_field_spec(bad)


def test_question_answer_trains_only_the_answer():
    record = {"question": "Who?", "answer": "Me."}
    ids, mask = encode_example(record, "[question],answer", TOK)
    q, a = TOK.encode("Who?"), TOK.encode("Me.")
    assert ids == [1, *q, *a, 2]
    assert mask == [False] * (1 + len(q)) + [True] * (len(a) + 1)  # EOS follows the last segment
    # after packing: labels exactly on the positions whose target is an answer token or EOS
    seq = next(pack_documents([(ids, mask)], 16))
    labels = seq["labels"]
    trained = [i for i in range(16) if labels[i] != IGNORE_INDEX]
    assert trained == list(range(len(q), len(q) + len(a) + 1))
    assert labels[trained].tolist() == [*a, 2]
    assert TOK.decode(labels[trained][:-1].tolist()) == "Me."


def test_no_loss_spec_trains_nothing_and_eos_follows_last_segment():
    ids, mask = encode_example({"text": "abc"}, "[text]", TOK)
    assert not any(mask)
    _, mask = encode_example({"q": "x", "a": "y"}, "q,[a]", TOK)
    assert mask == [False, True, False, False]


def test_plus_joins_fields_with_separator():
    ids, _ = encode_example({"a": "x", "b": "y"}, "a+b", TOK)
    assert TOK.decode(ids) == "x y"
    ids, _ = encode_example({"a": "x", "b": "y"}, "a+b", TOK, subfield_separator="\n")
    assert TOK.decode(ids) == "x\ny"


def test_bos_eos_as_the_tokenizer_defines():
    ids, mask = encode_example({"text": "hi"}, "text", NoSpecialTokenizer())
    assert ids == TOK.encode("hi") and mask == [True, True]
    ids, _ = encode_example({"text": "hi"}, "text", TOK, add_bos=False, add_eos=False)
    assert ids == TOK.encode("hi")


def test_empty_segment_among_others_is_allowed():
    ids, mask = encode_example({"question": "", "answer": "ok"}, "[question],answer", TOK)
    assert ids == [1, *TOK.encode("ok"), 2] and mask == [False, True, True, True]


@pytest.mark.parametrize(
    "record, reason, words",
    [
        ({"question": "q"}, "missing_field", ["'answer'", "'question'"]),
        ({"question": "q", "answer": None}, "missing_field", ["'answer'"]),
        ({"question": "q", "answer": 3}, "bad_field", ["'answer'", "int"]),
        ({"question": " ", "answer": "\n"}, "empty_document", ["empty"]),
    ],
)
def test_bad_records(record, reason, words):
    with pytest.raises(DataError) as info:
        encode_example(record, "[question],answer", TOK)
    assert info.value.reason == reason
    for w in words:
        assert w in str(info.value)


def test_non_dict_record_and_pickled_error():
    with pytest.raises(DataError, match="expected a dict record, got str") as info:
        encode_example("just text", "text", TOK)
    error = pickle.loads(pickle.dumps(info.value))  # e.g. raised in a worker process
    assert isinstance(error, DataError) and error.reason == "not_an_object" and "dict record" in str(error)


@pytest.fixture
def qa_file(tmp_path):
    lines = [
        {"question": "q1", "answer": "a1"},
        {"question": "q2"},  # line 2: missing answer
        {"question": "q3", "answer": ""},  # line 3: fine (the question is text)
        {"question": "", "answer": "  "},  # line 4: empty document
        {"question": "q5", "answer": "a5"},
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_encode_source_raise_names_the_line(qa_file):
    stream = encode_source(read_jsonl(qa_file), "[question],answer", TOK)
    with pytest.raises(DataError, match=r"qa\.jsonl:2: record has no field 'answer'") as info:
        list(stream)
    assert info.value.reason == "missing_field"


def test_encode_source_skip_counts(qa_file):
    source = read_jsonl(qa_file, on_error="skip")
    examples = list(encode_source(source, "[question],answer", TOK))
    assert [TOK.decode(ids) for ids, _ in examples] == ["q1a1", "q3", "q5a5"]
    assert source.stats.records == 3
    assert source.stats.skipped == {"missing_field": 1, "empty_document": 1}


def test_encode_source_over_plain_records_counts_itself():
    records = [{"text": "a"}, {"txt": "b"}, {"text": "c"}]
    stream = encode_source(records, "text", TOK, on_error="skip")
    assert len(list(stream)) == 2
    assert stream.stats.records == 2 and stream.stats.skipped == {"missing_field": 1}


def test_encode_source_resumes(qa_file):
    stream = encode_source(read_jsonl(qa_file, on_error="skip"), "[question],answer", TOK)
    it = iter(stream)
    first = next(it)
    state = it.state_dict()
    rest = list(it)
    again = list(stream.iter_from(state))
    assert len(rest) == 2 and all(np.array_equal(a[0], b[0]) for a, b in zip(rest, again))
    assert first[0][1:3] == TOK.encode("q1")
