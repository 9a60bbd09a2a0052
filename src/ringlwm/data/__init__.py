"""ringlwm.data: from files on disk to this rank's zigzag shard of packed training sequences.

    tok = load_tokenizer("tokenizer.model")
    books = encode_source(read_text_folder("books/"), "text", tok)
    chat = encode_source(read_jsonl("chat/*.jsonl", on_error="skip"), "[question],answer", tok)
    mix = Mixture({"books": books, "chat": chat}, weights={"books": 3, "chat": 1}, seed=0)
    loader = PackedLoader(mix, seq_len, batch_size, dp_rank, dp_size, sp_rank, sp_size)
    for batch in loader: ...      # input_ids, labels, position_ids, segment_ids, loss_weights
                                  # (batch_size, seq_len // sp_size), zigzag layout

The stages, one file each:
    sources.py    JSONL / Parquet / text-folder records; bad data raises DataError or is counted
    synthetic.py  random-motif documents that need no files and no tokenizer (smoke tests, tiny recipe)
    tokenizer.py  sentencepiece or Hugging Face tokenizers; train a sentencepiece model (also a CLI)
    fields.py     field specs ("[question],answer") -> (token_ids, loss_mask)
    mixture.py    interleave example streams at set ratios, deterministic given the seed
    packing.py    documents -> full-length sequences with shifted labels, positions, segments, weights
    vision_tokens.py  VQGAN frames in LWM's token format: (token_ids, loss_mask, vision_mask) examples
    chat.py       LWM's chat format: text prompts and vision-chat records
    loader.py     dp split, batching, zigzag sharding, state_dict / load_state_dict
    stream.py     the resumable-stream protocol every stage follows

Names are loaded on first use, so ``import ringlwm.data`` is cheap (``datasets`` and ``transformers``
are imported only by the Parquet reader and the Hugging Face tokenizer).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataError": "sources",
    "SourceStats": "sources",
    "read_jsonl": "sources",
    "read_parquet": "sources",
    "read_text_folder": "sources",
    "Tokenizer": "tokenizer",
    "SentencePieceTokenizer": "tokenizer",
    "HFTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "train_sentencepiece": "tokenizer",
    "FieldSpec": "fields",
    "parse_field_spec": "fields",
    "encode_example": "fields",
    "encode_source": "fields",
    "EncodedSource": "fields",
    "Mixture": "mixture",
    "IGNORE_INDEX": "packing",
    "KEYS": "packing",
    "PAD_SEGMENT": "packing",
    "PackedSequences": "packing",
    "VISION_KEYS": "packing",
    "PackingStats": "packing",
    "pack_documents": "packing",
    "PackedLoader": "loader",
    "shard_batch": "loader",
    "VisionEncodedSource": "vision_tokens",
    "encode_vision_example": "vision_tokens",
    "encode_vision_source": "vision_tokens",
    "vision_chat_record": "chat",
    "chat_prompt": "chat",
    "SyntheticMotifs": "synthetic",
    "ListStream": "stream",
    "ReplayStream": "stream",
    "Stream": "stream",
    "as_stream": "stream",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Lazy, so that `python -m ringlwm.data.tokenizer` does not find the module already imported by the
    # package (runpy warns then), and so that importing the package stays cheap.
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"ringlwm.data.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ringlwm.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
