"""Record sources: JSONL files, Parquet files (through Hugging Face ``datasets``), folders of .txt files.

    src = read_jsonl("data/chat-*.jsonl", on_error="skip", fields=["question", "answer"])
    for record in src: ...            # dict records, files in sorted order, lines in order
    src.stats                         # SourceStats(records=..., skipped={"malformed_json": 2, ...})

Bad data never turns silently into a batch. With ``on_error="raise"`` (the default) the first problem
raises a ``DataError`` that names the file, the line (or record) and the problem. With ``on_error="skip"``
the record is dropped and counted in ``stats.skipped`` under its reason:

    missing_file     a path or glob that matches no file (checked once, when the source is made)
    unreadable_file  a file that cannot be read as its format (e.g. not Parquet)
    malformed_json   a JSONL line that is not JSON, or not valid UTF-8
    not_an_object    a JSONL line that is JSON but not an object
    missing_field    a record without one of ``fields`` (or with null there)
    bad_field        a field in ``fields`` that is not a string
    empty_document   the ``fields`` of a record hold only whitespace (an empty .txt file, "text": "")

Blank lines in JSONL are not records and are passed over without a count.

Every source is a resumable stream (``stream.py``): JSONL resumes by seeking to a byte offset, a text
folder by file index, Parquet through ``datasets``' own ``state_dict`` (which re-reads the file up to
the saved row by record batches but never turns them into Python records or tokens). ``stats`` lives
on the source and is part of the saved state, so a fresh source restored from a state ends with the
counts of an uninterrupted run.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ringlwm.data.stream import Stream

ON_ERROR = ("raise", "skip")


class DataError(ValueError):
    """A problem with the data itself; ``reason`` is the key it is counted under when skipped."""

    def __init__(self, message: str, reason: str = "bad_data"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keeps the reason through pickling (e.g. from a worker process)
        return type(self), (str(self), self.reason)


@dataclass
class SourceStats:
    """Records yielded and records (or files) skipped, by reason; counted since the source was made."""

    records: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def count_skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def state_dict(self) -> dict:
        return {"records": self.records, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.records, self.skipped = state["records"], dict(state["skipped"])


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def record_field(record: Mapping, name: str, needed_by: str = ""):
    """The value of field ``name``; a missing (or null) one raises DataError("missing_field") naming the
    record's fields and, when given, what needs the field (e.g. "field spec '[question],answer'")."""
    value = record.get(name)
    if value is None:
        have = ", ".join(map(repr, record)) or "none"
        needed = f" needed by {needed_by}" if needed_by else ""
        raise DataError(f"record has no field {name!r}{needed} (its fields: {have})", "missing_field")
    return value


def check_record(record: dict, fields: Sequence[str]) -> DataError | None:
    """The problem with ``record`` for a reader that needs ``fields`` (as text), or None."""
    for name in fields:
        try:
            value = record_field(record, name)
        except DataError as e:
            return e
        if not isinstance(value, str):
            return DataError(f"field {name!r} is {type(value).__name__}, not a string", "bad_field")
    if fields and not any(record[name].strip() for name in fields):
        return DataError(f"empty document: field(s) {', '.join(map(repr, fields))} hold no text", "empty_document")
    return None


def _expand_paths(paths: str | os.PathLike | Iterable, pattern: str | None = None) -> list[tuple[str, list[str]]]:
    """[(what was asked for, the files it names)]: a file, a folder (files matching ``pattern`` inside it,
    recursively), or a glob; each in sorted order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p) and pattern is not None:
            files = sorted(glob.glob(os.path.join(glob.escape(p), "**", pattern), recursive=True))
        elif glob.has_magic(p):
            files = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
        else:
            files = [p] if os.path.isfile(p) else []
        out.append((p, files))
    return out


class FileSource(Stream):
    """Shared by the file readers: the file list, ``on_error``, ``fields`` and ``stats``."""

    pattern: str | None = None  # the files a folder path stands for
    kind = "file"

    def __init__(self, paths, *, on_error: str = "raise", fields: Sequence[str] | None = None):
        self.on_error = check_on_error(on_error)
        self.fields = tuple(fields or ())
        self.stats = SourceStats()
        self.files: list[str] = []
        for asked, files in _expand_paths(paths, self.pattern):
            if not files:
                problem = "no such file" if not glob.has_magic(asked) else "no file matches"
                if os.path.isdir(asked):
                    problem = f"no {self.pattern} file in folder"
                self.problem(DataError(f"{problem}: {asked}", "missing_file"))
            self.files.extend(files)

    def problem(self, error: DataError, where: str = "") -> None:
        """Raise ``error`` (prefixed with ``where``), or count it as a skip."""
        if self.on_error == "raise":
            raise DataError(f"{where}: {error}" if where else str(error), error.reason) from None
        self.stats.count_skip(error.reason)

    def accept(self, record, where: str) -> bool:
        """Count and return True for a good record; report a bad one and return False."""
        if not isinstance(record, dict):
            self.problem(DataError(f"expected a JSON object, got {type(record).__name__}", "not_an_object"), where)
            return False
        error = check_record(record, self.fields)
        if error is not None:
            self.problem(error, where)
            return False
        self.stats.records += 1
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.files)} {self.kind}s, on_error={self.on_error!r})"


class _JsonlIterator:
    def __init__(self, source: JsonlSource, state: dict | None):
        self.source = source
        self._file, self._offset, self._line = (state["file"], state["offset"], state["line"]) if state else (0, 0, 0)
        if state:
            source.stats.load_state_dict(state["stats"])
        self._fh = None
        self.location = ""

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"file": self._file, "offset": self._offset, "line": self._line,
                "stats": self.source.stats.state_dict()}

    def __next__(self) -> dict:
        files = self.source.files
        while self._file < len(files):
            if self._fh is None:
                self._fh = open(files[self._file], "rb")  # bytes: offsets are exact for seek()
                self._fh.seek(self._offset)
            raw = self._fh.readline()
            if not raw:
                self._fh.close()
                self._fh = None
                self._file, self._offset, self._line = self._file + 1, 0, 0
                continue
            self._offset += len(raw)
            self._line += 1
            if not raw.strip():
                continue
            self.location = f"{files[self._file]}:{self._line}"
            try:
                record = json.loads(raw)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                self.source.problem(DataError(f"malformed JSON ({e})", "malformed_json"), self.location)
                continue
            if self.source.accept(record, self.location):
                return record
        raise StopIteration


class JsonlSource(FileSource):
    """One JSON object per line; see ``read_jsonl``."""

    pattern = "*.jsonl"

    def iter_from(self, state: dict | None) -> _JsonlIterator:
        return _JsonlIterator(self, state)


class _TextFolderIterator:
    def __init__(self, source: TextFolderSource, state: dict | None):
        self.source = source
        self._file = state["file"] if state else 0
        if state:
            source.stats.load_state_dict(state["stats"])
        self.location = ""

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"file": self._file, "stats": self.source.stats.state_dict()}

    def __next__(self) -> dict:
        files = self.source.files
        while self._file < len(files):
            path = files[self._file]
            self._file += 1
            self.location = path
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError as e:
                self.source.problem(DataError(f"not UTF-8 text ({e})", "unreadable_file"), path)
                continue
            record = {"text": text, "path": path}
            if self.source.accept(record, path):
                return record
        raise StopIteration


class TextFolderSource(FileSource):
    """Each .txt file one document; see ``read_text_folder``."""

    pattern = "*.txt"

    def iter_from(self, state: dict | None) -> _TextFolderIterator:
        return _TextFolderIterator(self, state)


class _ParquetIterator:
    def __init__(self, source: ParquetSource, state: dict | None):
        self.source = source
        self._dataset = source.make_dataset()
        self._row = state["row"] if state else 0
        if state:
            self._dataset.load_state_dict(state["datasets"])
            source.stats.load_state_dict(state["stats"])
        self._it = iter(self._dataset) if self._dataset is not None else iter(())
        self.location = ""

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        # datasets' own state (~10 us to take): file index and the row within it, exact per example.
        hf_state = self._dataset.state_dict() if self._dataset is not None else None
        return {"datasets": hf_state, "row": self._row, "stats": self.source.stats.state_dict()}

    def __next__(self) -> dict:
        while True:
            record = next(self._it)
            self.location = self.source.where(self._row)
            self._row += 1
            if self.source.accept(record, self.location):
                return record


class ParquetSource(FileSource):
    """Rows of Parquet files as dicts; see ``read_parquet``."""

    pattern = "*.parquet"

    def __init__(self, paths, *, on_error: str = "raise", fields: Sequence[str] | None = None,
                 columns: Sequence[str] | None = None):
        super().__init__(paths, on_error=on_error, fields=fields)
        import pyarrow.parquet as pq

        self.columns = list(columns) if columns is not None else None
        readable, self.num_rows = [], []
        for path in self.files:
            try:
                # The footer alone: cheap, and it catches a file that is not Parquet before training starts.
                self.num_rows.append(pq.read_metadata(path).num_rows)
                readable.append(path)
            except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
                self.problem(DataError(f"cannot read as Parquet ({e})", "unreadable_file"), path)
        self.files = readable

    def where(self, row: int) -> str:
        """'file.parquet row 12' for the row-th record counted across the files in order."""
        for path, n in zip(self.files, self.num_rows):
            if row < n:
                return f"{path} row {row}"
            row -= n
        return f"{self.files[-1]} row ?"

    def make_dataset(self):
        if not self.files:
            return None
        import datasets

        # Streaming: record batches are read as the iteration needs them, never the whole file, and no
        # Arrow copy is written to the datasets cache.
        return datasets.load_dataset("parquet", data_files={"train": self.files}, split="train", streaming=True,
                                     columns=self.columns)

    def iter_from(self, state: dict | None) -> _ParquetIterator:
        return _ParquetIterator(self, state)


def read_jsonl(path, *, on_error: str = "raise", fields: Sequence[str] | None = None) -> JsonlSource:
    """Records of JSONL files, one JSON object per line.

    path: a file, a folder (its *.jsonl files, recursively), a glob, or a list of these; files are read in
    sorted order. fields: names every record must hold as non-empty text (e.g. those of the field spec),
    checked here so that the error names the line. on_error: "raise" or "skip" (counted in ``stats``).
    """
    return JsonlSource(path, on_error=on_error, fields=fields)


def read_parquet(path, *, on_error: str = "raise", fields: Sequence[str] | None = None,
                 columns: Sequence[str] | None = None) -> ParquetSource:
    """Rows of Parquet files as dicts, streamed through Hugging Face ``datasets`` (record batch by batch).

    path, fields, on_error: as in ``read_jsonl`` (a folder stands for its *.parquet files). columns: read
    only these columns (e.g. skip image bytes a text spec does not use). A file that is not Parquet is
    ``unreadable_file``, found when the source is made.
    """
    return ParquetSource(path, on_error=on_error, fields=fields, columns=columns)


def read_text_folder(path, *, on_error: str = "raise") -> TextFolderSource:
    """Each .txt file under ``path`` (recursively, sorted) as one record {"text": ..., "path": ...}.

    path: a folder, a .txt file, a glob, or a list of these. An empty (or whitespace-only) file is an
    ``empty_document``; a file that is not UTF-8 is ``unreadable_file``.
    """
    return TextFolderSource(path, on_error=on_error, fields=("text",))
