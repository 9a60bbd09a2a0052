"""From a recipe's data section to this rank's PackedLoader (ringlwm.data does the work).

Each source becomes a resumable stream of (token_ids, loss_mask) examples; the sources are interleaved
by ``Mixture`` at their weights (restarting a source when it runs out: epochs), packed to the stage's
length and sharded for this rank's (dp, sp) position. The ``synthetic`` format needs no files and no
tokenizer (``ringlwm.data.synthetic``: a random motif repeated, for smoke tests and the tiny recipe).
"""

from __future__ import annotations

from ringlwm.data import (
    Mixture,
    PackedLoader,
    Stream,
    SyntheticMotifs,
    encode_source,
    encode_vision_source,
    load_tokenizer,
    read_jsonl,
    read_parquet,
    read_text_folder,
)
from ringlwm.train.config import DataConfig, StageConfig


def load_data_tokenizer(cfg: DataConfig):
    return load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None


def _source_stream(source, cfg: DataConfig, tokenizer, vocab_size: int, seed: int) -> Stream:
    if source.format == "synthetic":
        return SyntheticMotifs(vocab_size, source.synthetic_lengths, seed)
    if source.format == "jsonl":
        records = read_jsonl(source.path, on_error=cfg.on_error)
    elif source.format == "parquet":
        records = read_parquet(source.path, on_error=cfg.on_error)
    else:
        records = read_text_folder(source.path, on_error=cfg.on_error)
    if source.vision:
        # A record's own "fields" wins over the source's spec (LWM's fields_from_example).
        options = {} if source.max_frames is None else {"max_frames": source.max_frames}
        return encode_vision_source(records, source.fields, tokenizer, on_error=cfg.on_error, **options)
    return encode_source(records, source.fields, tokenizer, on_error=cfg.on_error)


def build_loader(cfg: DataConfig, stage: StageConfig, *, tokenizer, vocab_size: int, dp_rank: int, dp_size: int,
                 sp_rank: int, sp_size: int, seed: int, device, ulysses_rank: int = 0,
                 ulysses_size: int = 1) -> PackedLoader:
    streams = {f"{i}:{s.format}:{s.path}": _source_stream(s, cfg, tokenizer, vocab_size, cfg.seed + i)
               for i, s in enumerate(cfg.sources)}
    weights = {name: s.weight for name, s in zip(streams, cfg.sources)}
    mixture = Mixture(streams, weights, seed=cfg.seed, on_exhausted="restart")
    pad_id = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
    vision = any(s.vision for s in cfg.sources)
    return PackedLoader(mixture, stage.seq_len, stage.batch_size, dp_rank, dp_size, sp_rank, sp_size, seed=seed,
                        device=device, loss_weighting=cfg.loss_weighting, pad_id=pad_id, vision=vision,
                        ulysses_rank=ulysses_rank, ulysses_size=ulysses_size)
