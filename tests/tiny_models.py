"""The tests' tiny Llama: one place that says its shape, so that no test file builds its own."""

from __future__ import annotations

from transformers import LlamaConfig

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=512, attention_dropout=0.0, tie_word_embeddings=False)


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A Llama of width 32, 2 layers, 2 heads (overrides change any field, e.g. ``vocab_size=300``)."""
    return LlamaConfig(**{**TINY, **overrides})
