"""The tests' tiny Llama: one place that says its shape, so that no test file builds its own."""

from __future__ import annotations

from transformers import LlamaConfig

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=512, attention_dropout=0.0, tie_word_embeddings=False)


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A Llama of width 32, 2 layers, 2 heads (overrides change any field, e.g. ``vocab_size=300``)."""
    return LlamaConfig(**{**TINY, **overrides})


CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<a>{% generation %}{{ m['content'] }}</s>{% endgeneration %}"
    "{% else %}<u>{{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)


def tiny_chat_tokenizer():
    """A character-level transformers tokenizer with a chat template that marks assistant turns (``{% generation
    %}``, for TRL's assistant_only_loss), built in memory: 75 tokens (specials <pad> <s> </s> <unk> <u> <a>)."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<u>", "<a>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.ascii_letters + string.digits + " .,?!'-"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=["<u>", "<a>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast
