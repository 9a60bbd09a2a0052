"""Field specs (LWM's format): which fields of a record make the document, and which parts carry loss.

    "text"                       one segment, trained
    "[question],answer"          the question is context only; the answer is trained
    "[system+question],answer"   '+' joins fields into one segment (joined by a space, then tokenized)

Commas separate segments, in order; each segment is tokenized on its own and the token lists are
concatenated. A segment in [brackets] has no loss. A document is
``[BOS] segment tokens... [EOS]``, BOS and EOS as the tokenizer defines them (none when it has none).

The loss mask marks the *target* tokens that are trained (LWM's convention): mask[i] says whether the
model is trained to predict token i from the tokens before it. So BOS is never trained (nothing predicts
it), and EOS takes the flag of the last segment: "[question],answer" learns to stop after the answer,
while "[prompt]" alone trains nothing. ``packing.py`` turns the mask into shifted labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from ringlwm.data.sources import DataError, SourceStats, check_on_error, record_field
from ringlwm.data.stream import Stream, as_stream
from ringlwm.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class Segment:
    fields: tuple[str, ...]
    loss: bool


@dataclass(frozen=True)
class FieldSpec:
    segments: tuple[Segment, ...]
    text: str

    @property
    def fields(self) -> tuple[str, ...]:
        """Every field named, in order of first appearance."""
        return tuple(dict.fromkeys(f for seg in self.segments for f in seg.fields))


def parse_field_spec(spec: str | FieldSpec) -> FieldSpec:
    """Parse "[question],answer"-style specs; a ValueError says what is wrong and where."""
    if isinstance(spec, FieldSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"field spec must be a non-empty string such as 'text' or '[question],answer', got {spec!r}")
    return _parse(spec)


@lru_cache(maxsize=64)
def _parse(spec: str) -> FieldSpec:
    segments = []
    for part in spec.split(","):
        part = part.strip()
        loss = not (part.startswith("[") and part.endswith("]"))
        inner = part if loss else part[1:-1].strip()
        names = tuple(name.strip() for name in inner.split("+"))
        for name in names:
            if not name or any(c in name for c in "[]"):
                raise ValueError(
                    f"field spec {spec!r}: bad segment {part!r} (segments are 'field', '[field]' or 'a+b', "
                    "separated by commas)"
                )
        segments.append(Segment(names, loss))
    return FieldSpec(tuple(segments), spec)


def encode_example(
    record: Mapping,
    spec: str | FieldSpec,
    tokenizer: Tokenizer,
    *,
    add_bos: bool = True,
    add_eos: bool = True,
    subfield_separator: str = " ",
) -> tuple[list[int], list[bool]]:
    """(token_ids, loss_mask) of one record; both lists have the document's length.

    A missing field (or null) raises DataError("missing_field"), a non-string field "bad_field", and a
    record whose spec fields hold only whitespace "empty_document". An empty segment among non-empty ones
    contributes no tokens.
    """
    spec = parse_field_spec(spec)
    if not isinstance(record, Mapping):
        raise DataError(f"expected a dict record, got {type(record).__name__}", "not_an_object")
    texts = []
    for seg in spec.segments:
        parts = []
        for name in seg.fields:
            value = record_field(record, name, f"field spec {spec.text!r}")
            if not isinstance(value, str):
                hint = " (vision frames? see vision_tokens.encode_vision_source)" if isinstance(value, list) else ""
                raise DataError(f"field {name!r} is {type(value).__name__}, not a string{hint}", "bad_field")
            parts.append(value)
        texts.append(subfield_separator.join(parts))
    if not any(t.strip() for t in texts):
        raise DataError(f"empty document: the fields of {spec.text!r} hold no text", "empty_document")
    ids: list[int] = []
    mask: list[bool] = []
    if add_bos and tokenizer.bos_id is not None:
        ids.append(tokenizer.bos_id)
        mask.append(False)
    for seg, text in zip(spec.segments, texts):
        if text:
            tokens = tokenizer.encode(text)
            ids.extend(tokens)
            mask.extend([seg.loss] * len(tokens))
    if add_eos and tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
        mask.append(spec.segments[-1].loss)
    return ids, mask


class _EncodedIterator:
    def __init__(self, stream: EncodedSource, state: dict | None):
        self.stream = stream
        self._records = stream.source.iter_from(state["source"] if state else None)
        if state and state["stats"] is not None:
            stream.stats.load_state_dict(state["stats"])

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        s = self.stream
        return {"source": self._records.state_dict(), "stats": None if s.shares_stats else s.stats.state_dict()}

    def __next__(self) -> tuple[list[int], list[bool]]:
        s = self.stream
        while True:
            record = next(self._records)
            try:
                example = s.encode(record)
            except DataError as e:
                where = getattr(self._records, "location", "")
                if s.on_error == "raise":
                    raise DataError(f"{where}: {e}" if where else str(e), e.reason) from None
                s.stats.count_skip(e.reason)
                if s.shares_stats:
                    s.stats.records -= 1  # the source counted it as a good record; it is not
                continue
            if not s.shares_stats:
                s.stats.records += 1
            return example


class EncodedSource(Stream):
    """The (token_ids, loss_mask) examples of a record source; see ``encode_source``. Subclasses change
    what a record becomes by overriding ``encode`` and ``OPTIONS`` (``vision_tokens.VisionEncodedSource``)."""

    OPTIONS = ("add_bos", "add_eos", "subfield_separator")

    def __init__(self, source, spec: str | FieldSpec, tokenizer: Tokenizer, *, on_error: str | None = None,
                 **options):
        self.source = as_stream(source, "source")
        self.spec = self.parse_spec(spec)
        self.tokenizer = tokenizer
        self.on_error = check_on_error(on_error or getattr(self.source, "on_error", "raise"))
        # Shares the source's counters (and their place in the saved state), so one object holds every
        # skip of this input.
        self.shares_stats = isinstance(getattr(self.source, "stats", None), SourceStats)
        self.stats = self.source.stats if self.shares_stats else SourceStats()
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown options {sorted(unknown)}; known: {list(self.OPTIONS)}")
        self.options = options

    @staticmethod
    def parse_spec(spec):
        return parse_field_spec(spec)

    def encode(self, record):
        """One record -> one example; raises DataError for a bad record."""
        return encode_example(record, self.spec, self.tokenizer, **self.options)

    def iter_from(self, state: dict | None) -> _EncodedIterator:
        return _EncodedIterator(self, state)

    def __repr__(self) -> str:
        return f"EncodedSource({self.source!r}, spec={self.spec.text!r})"


def encode_source(source: Stream | Iterable[dict], spec: str | FieldSpec, tokenizer: Tokenizer, *,
                  on_error: str | None = None, **options) -> EncodedSource:
    """Examples (token_ids, loss_mask) of every record of ``source`` under ``spec``; resumable like the source.

    on_error: as the source's by default; "skip" counts bad records (missing field, empty document) in
    the source's ``stats``. options: ``encode_example``'s keywords (add_bos, add_eos, subfield_separator).
    """
    return EncodedSource(source, spec, tokenizer, on_error=on_error, **options)
