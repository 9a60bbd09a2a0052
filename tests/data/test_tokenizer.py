"""Tokenizers: sentencepiece training (function and CLI), load_tokenizer round trips, a local HF folder."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from ringlwm.data import HFTokenizer, SentencePieceTokenizer, encode_example, load_tokenizer, train_sentencepiece

WORDS = "the a cat dog sat ran on under mat sky blue red 12 345 , . ! quick brown fox jumps over lazy".split()


def corpus(num_lines=300, seed=0):
    rng = random.Random(seed)
    return ["  ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) if i % 7 == 0 else
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for i in range(num_lines)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    lines = corpus()
    assert 5_000 < sum(map(len, lines)) < 50_000  # "a few KB"
    return train_sentencepiece(lines, 200, tmp_path_factory.mktemp("sp") / "tok")


def test_train_and_round_trip(sp_model):
    assert sp_model.name == "tok.model" and sp_model.is_file()
    assert sp_model.with_suffix(".vocab").is_file()
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    assert 50 < tok.vocab_size <= 200
    for text in ["the quick brown fox", "sat  on\nthe mat!\n\n", "12 345, red sky.", corpus(5, seed=9)[3]]:
        ids = tok.encode(text)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.bos_id not in ids and tok.eos_id not in ids  # encode adds no special tokens
        assert tok.decode(ids) == text
    # pieces longer than one character were learned
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox") / 2


def test_encode_example_adds_bos_and_eos(sp_model):
    tok = load_tokenizer(sp_model)
    ids, mask = encode_example({"text": "the cat"}, "text", tok)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids[1:-1] == tok.encode("the cat")
    assert mask == [False] + [True] * (len(ids) - 1)


def test_load_folder_with_tokenizer_model(sp_model, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer) and tok.encode("the cat") == load_tokenizer(sp_model).encode("the cat")


def test_train_from_files_and_inputs_checked(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(corpus(200, seed=1)))
    model = train_sentencepiece([text], 120, tmp_path / "out" / "m")
    assert load_tokenizer(model).decode(load_tokenizer(model).encode("red fox")) == "red fox"
    with pytest.raises(ValueError, match="names a file"):
        train_sentencepiece([str(text)], 120, tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        train_sentencepiece([tmp_path / "missing.txt"], 120, tmp_path / "x")


def test_cli(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(corpus(200, seed=2)))
    out = subprocess.run(
        [sys.executable, "-m", "ringlwm.data.tokenizer", "train", "--input", str(text), "--vocab-size", "150",
         "--out", str(tmp_path / "cli" / "sp")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "RuntimeWarning" not in out.stderr
    tok = load_tokenizer(tmp_path / "cli" / "sp.model")
    assert tok.vocab_size <= 150 and tok.decode(tok.encode("lazy dog")) == "lazy dog"
    bad = subprocess.run([sys.executable, "-m", "ringlwm.data.tokenizer", "train", "--input", str(tmp_path / "no.txt"),
                          "--vocab-size", "100", "--out", str(tmp_path / "y")], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "no such file" in bad.stderr


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "none.model")
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        load_tokenizer(tmp_path / "junk.model")


def test_hf_tokenizer_folder(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus(200, seed=3), trainer)
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                                   pad_token="<pad>", unk_token="<unk>")
    wrapped.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.vocab_size == len(wrapped)
    text = "the lazy fox jumps over 12 red dogs!"
    ids = tok.encode(text)
    assert ids == wrapped.encode(text, add_special_tokens=False) and 1 not in ids and 2 not in ids
    assert tok.decode(ids) == text
    ids, mask = encode_example({"q": "sat", "a": "on the mat"}, "[q],a", tok)
    assert ids[0] == 1 and ids[-1] == 2 and not mask[0] and mask[-1]


def test_sentencepiece_from_bytes(sp_model):
    tok = SentencePieceTokenizer(Path(sp_model).read_bytes())
    assert tok.encode("the cat") == load_tokenizer(sp_model).encode("the cat")
