"""Vision tokens in LWM's format: records with VQGAN frames -> (token_ids, loss_mask, vision_mask).

    ids, loss_mask, vision_mask = encode_vision_example(record, "[vision],caption", tok)
    examples = encode_vision_source(read_jsonl("vl/*.jsonl"), None, tok)   # each record names its spec
    loader = PackedLoader(examples, seq_len, batch_size, ..., vision=True)  # + vision_mask, label_vision_mask

Token layout (LWM's ``lwm/data.py`` and ``lwm/vision_chat.py``)::

    <vision> c0 ... c255 <eof> c0 ... c255 <eof> ... c0 ... c255 <eov> </vision>

"<vision>" and "</vision>" are *text*: the text tokenizer's tokens of those strings, each tokenized on its
own. Each frame is its 256 VQGAN codes (16 x 16, codebook 8192) then ``<eof>`` = 8192, the last frame
``<eov>`` = 8193 instead: 257 tokens per frame. Codes, <eof> and <eov> are *vision* tokens: ids in the
vision vocabulary (8448 = 8192 codes + 256 special ids), vision_mask True. Every other token is text,
with ids in the text vocabulary. The two id ranges overlap; the vision mask tells them apart, and the
model (``RingLwmForCausalLM``) embeds and predicts each kind with its own table and head.

Field specs are those of ``fields.py`` ("," separates segments, "+" joins fields, "[...]" has no loss)
with vision fields: a field whose name contains "vision" (LWM's rule) holds frames and becomes one
``<vision> ... </vision>`` block; every other field is text. Inside a "+" segment the parts keep the
spec's order; neighbouring text fields are joined by ``subfield_separator`` and tokenized together, a
vision block stands apart. A segment's loss flag covers all its tokens, markers and <eof>/<eov>
included (as in LWM). BOS and EOS as in ``fields.py``: BOS untrained, EOS trained when the last segment
is.

One JSONL format for every kind of example::

    {"vision": [[c0, ..., c255], ...], "caption": "A dog on a beach.", "fields": "[vision],caption"}

    "[vision],caption"                      image -> text, video -> text (1 frame or many)
    "[caption],vision"                      text -> image, text -> video
    "[question+vision+prompt_end],answer"   vision chat; ``chat.vision_chat_record`` builds such records

``vision``: a list of frames, each a list of 256 ints in [0, 8192): the pre-tokenized output of the VQGAN
tokenizer (LWM's flat list of num_frames * 256 codes is accepted too). ``fields``: the record's own
field spec (LWM's ``fields_from_example``), or a list of specs of which one is chosen per record, the
same one every epoch (e.g. ``["[vision],caption", "[caption],vision"]`` trains both directions of a
caption pair over a corpus). A record without ``fields`` uses the source's spec.

Two deliberate differences from LWM's data code. BOS: ringlwm's tokenizers add none inside ``encode``, so
a document has one BOS; LWM calls a Hugging Face Llama tokenizer's ``encode(text)``, which (with the
Llama default add_bos_token) puts a BOS before every segment and each "<vision>"/"</vision>" too. EOS:
LWM always trains it; ringlwm trains it when the last segment is trained (as ``fields.py``).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterable, Mapping

import numpy as np

from ringlwm.data.fields import EncodedSource, FieldSpec, parse_field_spec
from ringlwm.data.sources import DataError, record_field
from ringlwm.data.stream import Stream
from ringlwm.data.tokenizer import Tokenizer

NUM_CODES = 8192  # VQGAN codebook: vision ids 0..8191 are codes
EOF_TOKEN = 8192  # end of frame
EOV_TOKEN = 8193  # end of vision (after the last frame)
CODES_PER_FRAME = 256  # 16 x 16 codes of a 256 x 256 frame
TOKENS_PER_FRAME = CODES_PER_FRAME + 1
VISION_START, VISION_END = "<vision>", "</vision>"
SPEC_FIELD = "fields"


def is_vision_field(name: str) -> bool:
    """LWM's rule: a field whose name contains "vision" holds frames."""
    return "vision" in name


def frames_array(value, name: str = "vision") -> np.ndarray:
    """Validated frames: (num_frames, 256) int64 codes in [0, 8192) from a list of frames (or LWM's flat
    list of num_frames * 256 codes). Raises DataError("bad_vision") saying what is wrong."""
    try:
        arr = np.asarray(value)
    except ValueError:  # ragged lists
        raise DataError(f"field {name!r}: frames of different lengths; each frame is a list of {CODES_PER_FRAME} "
                        "VQGAN codes", "bad_vision") from None
    if arr.size == 0:
        raise DataError(f"field {name!r} holds no frames", "bad_vision")
    if arr.dtype.kind not in "iu":
        raise DataError(f"field {name!r}: frames must hold integer VQGAN codes, got {arr.dtype} values", "bad_vision")
    if arr.ndim == 1 and arr.size % CODES_PER_FRAME == 0:
        arr = arr.reshape(-1, CODES_PER_FRAME)
    if arr.ndim != 2 or arr.shape[1] != CODES_PER_FRAME:
        raise DataError(f"field {name!r}: expected a list of frames of {CODES_PER_FRAME} codes each, got shape "
                        f"{arr.shape}", "bad_vision")
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high >= NUM_CODES:
        raise DataError(f"field {name!r}: VQGAN codes must lie in [0, {NUM_CODES}), got values in [{low}, {high}]",
                        "bad_vision")
    return arr.astype(np.int64, copy=False)


def sample_frame_indices(num_frames: int, max_frames: int) -> list[int]:
    """Uniform sampling as LWM (``max_n_frames``, ``vision_chat.py``): every frame when ``num_frames <=
    max_frames``, else ``max_frames`` indices from ``linspace(0, num_frames - 1)`` rounded down (the first
    and last frames always included). The one frame sampler: of decoded videos and of stored codes."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    if num_frames <= max_frames:
        return list(range(num_frames))
    return np.linspace(0, num_frames - 1, max_frames).astype(int).tolist()


def sample_frames(frames: np.ndarray, max_frames: int | None) -> np.ndarray:
    """frames (num_frames, ...) -> at most ``max_frames`` of them (``sample_frame_indices``); None keeps all."""
    if max_frames is None:
        return frames
    return frames[sample_frame_indices(len(frames), max_frames)]


def frame_tokens(frames) -> np.ndarray:
    """Vision ids (num_frames * 257,) of frames (num_frames, 256): each frame's codes then <eof>, the last
    frame's codes then <eov>. No markers (those are text)."""
    frames = frames_array(frames)
    ends = np.full((len(frames), 1), EOF_TOKEN, dtype=np.int64)
    ends[-1] = EOV_TOKEN
    return np.concatenate([frames, ends], axis=1).reshape(-1)


def record_spec(record: Mapping, default: str | FieldSpec | None, spec_field: str = SPEC_FIELD) -> FieldSpec:
    """The field spec of a record: its own ``spec_field`` (a spec, or a list of specs of which one is chosen
    from the record's text, so the same one every epoch), else ``default``."""
    own = record.get(spec_field)
    if own is None:
        if default is None:
            raise DataError(f"record has no {spec_field!r} field spec and the source has no default spec",
                            "missing_field")
        return parse_field_spec(default)
    if isinstance(own, list) and own and all(isinstance(s, str) for s in own):
        text = "\x00".join(f"{k}={v}" for k, v in sorted(record.items()) if isinstance(v, str))
        own = random.Random(zlib.crc32(text.encode())).choice(own)
    try:
        return parse_field_spec(own)
    except ValueError as e:
        raise DataError(f"record's {spec_field!r}: {e}", "bad_spec") from None


def encode_vision_example(
    record: Mapping,
    spec: str | FieldSpec | None,
    tokenizer: Tokenizer,
    *,
    add_bos: bool = True,
    add_eos: bool = True,
    subfield_separator: str = " ",
    max_frames: int | None = None,
    spec_field: str = SPEC_FIELD,
) -> tuple[list[int], list[bool], list[bool]]:
    """(token_ids, loss_mask, vision_mask) of one record, all of the document's length (see the module
    docstring for the layout). spec: the source's spec, used when the record has no ``spec_field``.
    max_frames: keep at most this many frames per vision field, uniformly spaced (LWM's max_n_frames).

    Errors (DataError, with the reason it is counted under when skipped): "missing_field", "bad_field"
    (text field not a string), "bad_vision" (frames not 256 ints in [0, 8192) each), "bad_spec",
    "empty_document" (no text and no frames).
    """
    if not isinstance(record, Mapping):
        raise DataError(f"expected a dict record, got {type(record).__name__}", "not_an_object")
    spec = record_spec(record, spec, spec_field)
    segments = []  # per segment: [("text", str) | ("vision", frames array)], neighbouring texts joined
    for seg in spec.segments:
        parts: list[list] = []
        for name in seg.fields:
            value = record_field(record, name, f"field spec {spec.text!r}")
            if is_vision_field(name):
                parts.append(["vision", sample_frames(frames_array(value, name), max_frames)])
            elif not isinstance(value, str):
                raise DataError(f"field {name!r} is {type(value).__name__}, not a string (only fields named "
                                "'*vision*' hold frames)", "bad_field")
            elif parts and parts[-1][0] == "text":
                parts[-1][1] += subfield_separator + value
            else:
                parts.append(["text", value])
        segments.append((seg.loss, parts))
    if not any(kind == "vision" or text.strip() for _, parts in segments for kind, text in parts):
        raise DataError(f"empty document: the fields of {spec.text!r} hold no text and no frames", "empty_document")

    ids: list[int] = []
    loss: list[bool] = []
    vision: list[bool] = []

    def extend(tokens, trained: bool, is_vision: bool):
        ids.extend(tokens)
        loss.extend([trained] * len(tokens))
        vision.extend([is_vision] * len(tokens))

    if add_bos and tokenizer.bos_id is not None:
        extend([tokenizer.bos_id], False, False)
    start = end = None
    for trained, parts in segments:
        for kind, value in parts:
            if kind == "text":
                if value:
                    extend(tokenizer.encode(value), trained, False)
                continue
            if start is None:
                start, end = tokenizer.encode(VISION_START), tokenizer.encode(VISION_END)
            extend(start, trained, False)
            extend(frame_tokens(value).tolist(), trained, True)
            extend(end, trained, False)
    if add_eos and tokenizer.eos_id is not None:
        extend([tokenizer.eos_id], spec.segments[-1].loss, False)
    return ids, loss, vision


class VisionEncodedSource(EncodedSource):
    """The (token_ids, loss_mask, vision_mask) examples of a record source; see ``encode_vision_source``."""

    OPTIONS = ("add_bos", "add_eos", "subfield_separator", "max_frames", "spec_field")

    @staticmethod
    def parse_spec(spec):
        return None if spec is None else parse_field_spec(spec)

    def encode(self, record):
        return encode_vision_example(record, self.spec, self.tokenizer, **self.options)

    def __repr__(self) -> str:
        spec = None if self.spec is None else self.spec.text
        return f"VisionEncodedSource({self.source!r}, spec={spec!r})"


def encode_vision_source(source: Stream | Iterable[dict], spec: str | FieldSpec | None, tokenizer: Tokenizer, *,
                         on_error: str | None = None, **options) -> VisionEncodedSource:
    """Examples (token_ids, loss_mask, vision_mask) of every record of ``source``; resumable like the source.

    spec: the default field spec (None: every record must carry its own ``fields``). on_error: as the
    source's by default; "skip" counts bad records by reason in the source's ``stats``. options:
    ``encode_vision_example``'s keywords (add_bos, add_eos, subfield_separator, max_frames, spec_field).
    Text-only records work too (vision mask all False), so text can be mixed into vision-language stages.
    """
    return VisionEncodedSource(source, spec, tokenizer, on_error=on_error, **options)

