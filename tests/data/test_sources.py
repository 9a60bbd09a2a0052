"""Sources: JSONL, Parquet, text folders; every bad-data case both raising and counted as a skip; resume."""

from __future__ import annotations

import json

import pytest

from ringlwm.data import DataError, read_jsonl, read_parquet, read_text_folder


def write_jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8")
    return path


def raises_reason(reason, match, fn):
    with pytest.raises(DataError, match=match) as info:
        fn()
    assert info.value.reason == reason


# --- JSONL -------------------------------------------------------------------------------------------


def test_jsonl_reads_files_in_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "3"}, {"text": "4"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "1"}, "", "   ", {"text": "2"}])  # blank lines are not records
    for path in (tmp_path, str(tmp_path / "*.jsonl"), [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]):
        src = read_jsonl(path)
        assert [r["text"] for r in src] == ["1", "2", "3", "4"]
        assert src.stats.records == 4 and src.stats.num_skipped == 0


BAD_JSONL = [
    {"text": "good 1"},
    '{"text": "broken',  # line 2
    "[1, 2]",  # line 3: not an object
    {"title": "no text"},  # line 4
    {"text": "   "},  # line 5: empty document
    {"text": 7},  # line 6
    {"text": "good 2"},
]


@pytest.mark.parametrize(
    "line, reason, match",
    [
        (2, "malformed_json", r"bad\.jsonl:2: malformed JSON"),
        (3, "not_an_object", r"bad\.jsonl:3: expected a JSON object, got list"),
        (4, "missing_field", r"bad\.jsonl:4: record has no field 'text'"),
        (5, "empty_document", r"bad\.jsonl:5: empty document"),
        (6, "bad_field", r"bad\.jsonl:6: field 'text' is int"),
    ],
)
def test_jsonl_each_bad_line_raises(tmp_path, line, reason, match):
    # only the line under test is bad: the error must point at it
    lines = [BAD_JSONL[0], BAD_JSONL[line - 1], BAD_JSONL[-1]]
    path = write_jsonl(tmp_path / "bad.jsonl", [lines[0]] * (line - 2) + lines)
    raises_reason(reason, match, lambda: list(read_jsonl(path, fields=["text"])))


def test_jsonl_skip_counts_every_case(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_JSONL)
    src = read_jsonl(path, on_error="skip", fields=["text"])
    assert [r["text"] for r in src] == ["good 1", "good 2"]
    assert src.stats.records == 2
    assert src.stats.skipped == {"malformed_json": 1, "not_an_object": 1, "missing_field": 1, "empty_document": 1,
                                 "bad_field": 1}


def test_jsonl_invalid_utf8_is_malformed(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    raises_reason("malformed_json", r"bin\.jsonl:2", lambda: list(read_jsonl(path)))
    assert len(list(read_jsonl(path, on_error="skip"))) == 1


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    raises_reason("missing_file", "no such file: .*nope.jsonl", lambda: read_jsonl(missing))
    raises_reason("missing_file", "no file matches", lambda: read_jsonl(str(tmp_path / "*.jsonl")))
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "x"}])
    src = read_jsonl([missing, good], on_error="skip")
    assert list(src) == [{"text": "x"}]
    assert src.stats.skipped == {"missing_file": 1}


def test_bad_on_error():
    with pytest.raises(ValueError, match="on_error"):
        read_jsonl("x.jsonl", on_error="ignore")


def test_jsonl_resume_from_any_point(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(5)] + ["{oops"])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "é" * i + f"b{i}"} for i in range(1, 6)])  # multi-byte offsets
    everything = list(read_jsonl(tmp_path, on_error="skip"))
    assert len(everything) == 10
    for k in range(len(everything) + 1):
        it = iter(read_jsonl(tmp_path, on_error="skip"))
        for _ in range(k):
            next(it)
        state = it.state_dict()
        # a fresh source (as in a restarted job) continues, and ends with the counts of one full pass
        fresh = read_jsonl(tmp_path, on_error="skip")
        assert list(fresh.iter_from(state)) == everything[k:]
        assert fresh.stats.records == 10 and fresh.stats.skipped == {"malformed_json": 1}


# --- text folders ------------------------------------------------------------------------------------


def test_text_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second\nline two\n")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "ignored.md").write_text("not a .txt")
    src = read_text_folder(tmp_path)
    records = list(src)
    assert [r["text"] for r in records] == ["first", "second\nline two\n", "third"]
    assert records[0]["path"].endswith("a.txt")
    it = iter(src)
    next(it)
    assert [r["text"] for r in src.iter_from(it.state_dict())] == ["second\nline two\n", "third"]


def test_text_folder_bad_data(tmp_path):
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.txt").write_text("  \n")
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe bytes")
    raises_reason("empty_document", r"b\.txt: empty document", lambda: list(read_text_folder(tmp_path)))
    (tmp_path / "b.txt").unlink()
    raises_reason("unreadable_file", r"c\.txt: not UTF-8", lambda: list(read_text_folder(tmp_path)))
    (tmp_path / "b.txt").write_text("")
    src = read_text_folder(tmp_path, on_error="skip")
    assert [r["text"] for r in src] == ["fine"]
    assert src.stats.skipped == {"empty_document": 1, "unreadable_file": 1}


def test_text_folder_missing(tmp_path):
    raises_reason("missing_file", "no such file", lambda: read_text_folder(tmp_path / "none"))
    raises_reason("missing_file", r"no \*\.txt file in folder", lambda: read_text_folder(tmp_path))
    assert read_text_folder(tmp_path / "none", on_error="skip").stats.skipped == {"missing_file": 1}


# --- Parquet -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path_factory.mktemp("parquet")
    rows = [{"question": f"q{i}", "answer": f"a{i}" if i != 7 else None, "n": i} for i in range(23)]
    # two files, small row groups: a restore must land inside a row group of the second file
    pq.write_table(pa.Table.from_pylist(rows[:10]), folder / "part-0.parquet", row_group_size=4)
    pq.write_table(pa.Table.from_pylist(rows[10:]), folder / "part-1.parquet", row_group_size=5)
    return folder


def test_parquet_reads_and_resumes(parquet_dir):
    src = read_parquet(parquet_dir, on_error="skip", fields=["question", "answer"])
    everything = list(src)
    assert [r["n"] for r in everything] == [i for i in range(23) if i != 7]
    assert src.stats.skipped == {"missing_field": 1}
    it = iter(read_parquet(parquet_dir, on_error="skip", fields=["question", "answer"]))
    for _ in range(14):  # into file 1, mid row group
        next(it)
    state = it.state_dict()
    fresh = read_parquet(parquet_dir, on_error="skip", fields=["question", "answer"])
    assert [r["n"] for r in fresh.iter_from(state)] == [r["n"] for r in everything[14:]]
    assert fresh.stats.records == 22 and fresh.stats.skipped == {"missing_field": 1}


def test_parquet_errors(parquet_dir, tmp_path):
    raises_reason("missing_field", r"part-0\.parquet row 7: record has no field 'answer'",
                  lambda: list(read_parquet(parquet_dir, fields=["question", "answer"])))
    bogus = tmp_path / "bogus.parquet"
    bogus.write_text("not parquet at all")
    raises_reason("unreadable_file", r"bogus\.parquet: cannot read as Parquet", lambda: read_parquet(bogus))
    raises_reason("missing_file", "no such file", lambda: read_parquet(tmp_path / "none.parquet"))
    src = read_parquet([bogus, parquet_dir / "part-0.parquet", tmp_path / "none.parquet"], on_error="skip",
                       columns=["question"])
    assert [set(r) for r in src] == [{"question"}] * 10
    assert src.stats.skipped == {"unreadable_file": 1, "missing_file": 1}
