"""book_qa: chunking, QA parsing, assembly lengths and loss masks, resume, the local-model and HTTP backends."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tiny_models import tiny_llama_config

from ringlwm.data import encode_example, load_tokenizer, train_sentencepiece
from ringlwm.data.chat import CHAT_PREFIX
from ringlwm.qa.book_qa import (
    BackendError,
    Book,
    GenerationError,
    OpenAIGenerator,
    QAStore,
    chunk_text,
    load_books,
    main,
    parse_lengths,
    parse_qa,
    run_book_qa,
)

WORDS = ("the a old river city house garden road forest window letter story voice water fire stone paper music "
         "morning winter friend teacher doctor sailor child mother king queen walked looked found kept made gave "
         "took opened heard said told asked wrote quiet bright dark young long small warm cold green blue slowly "
         "quickly again never always together").split()


def sentence(rng: random.Random, num_words: tuple[int, int] = (5, 14)) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(*num_words))]
    return " ".join(words).capitalize() + rng.choice(".!?.")


def book_text(seed: int, num_paragraphs: int, sentences: tuple[int, int] = (1, 6)) -> str:
    rng = random.Random(seed)
    return "\n\n".join(" ".join(sentence(rng) for _ in range(rng.randint(*sentences))) for _ in range(num_paragraphs))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = book_text(0, 60)
    assert 2_000 < len(corpus) < 50_000  # a few KB
    return load_tokenizer(train_sentencepiece([corpus], 300, tmp_path_factory.mktemp("sp") / "tok"))


def count(tok, text: str) -> int:
    return len(tok.encode(text))


def pieces_sum(tok, text: str) -> int:
    """Tokens of ``text`` counted sentence by sentence, as the chunker estimates them."""
    from ringlwm.qa.chunks import _PARAGRAPH_END, _SENTENCE_END, _split_after

    return sum(count(tok, s) for p in _split_after(text, _PARAGRAPH_END) for s in _split_after(p, _SENTENCE_END))


# --- chunking ----------------------------------------------------------------------------------------


def test_chunks_tile_the_text_fit_and_end_at_sentences(tok):
    text = book_text(1, 40)
    chunks = chunk_text(text, tok, 100, book="b")
    assert len(chunks) > 5
    assert "".join(text[c.start:c.end] for c in chunks) == text
    assert [c.index for c in chunks] == list(range(len(chunks))) and {c.book for c in chunks} == {"b"}
    for c in chunks:
        assert c.num_tokens == count(tok, text[c.start:c.end]) <= 100
        assert c.text == text[c.start:c.end].strip() and c.text[-1] in ".!?"  # never mid-sentence
    for c in chunks[:-1]:  # about full: at least half, by the sentence-by-sentence count
        assert pieces_sum(tok, text[c.start:c.end]) >= 50
    assert chunk_text(text, tok, 100, book="b") == chunks  # deterministic


def test_chunks_prefer_paragraph_ends(tok):
    # Paragraphs of under half a chunk: there is always a paragraph end in a chunk's second half.
    text = book_text(2, 60, sentences=(1, 2))
    paragraphs = text.split("\n\n")
    assert max(pieces_sum(tok, p + "\n\n") for p in paragraphs) < 60
    chunks = chunk_text(text, tok, 120)
    assert len(chunks) > 4
    for c in chunks[:-1]:
        assert text[c.end - 2:c.end] == "\n\n", repr(text[c.start:c.end][-40:])
    # the same text cut freely by sentences would often end mid-paragraph
    flat = chunk_text(text.replace("\n\n", " "), tok, 120)
    assert sum(c.text[-1] in ".!?" for c in flat) == len(flat)


def test_long_sentence_is_cut_at_words_and_long_word_at_characters(tok):
    rng = random.Random(3)
    long_sentence = " ".join(rng.choice(WORDS) for _ in range(350)) + "."  # several chunks long, no sentence end
    long_word = "".join(rng.choice(WORDS) for _ in range(150))  # no space in it
    text = (" ".join(sentence(rng) for _ in range(6)) + "\n\n" + long_sentence + "\n\n"
            + " ".join(sentence(rng) for _ in range(6)) + " " + long_word + " " + sentence(rng))
    assert count(tok, long_sentence) > 300 and count(tok, long_word) > 100
    chunks = chunk_text(text, tok, 100)
    assert "".join(text[c.start:c.end] for c in chunks) == text
    assert all(c.num_tokens <= 100 for c in chunks)
    inside = [c for c in chunks if text.index(long_sentence) < c.end < text.index(long_sentence) + len(long_sentence)]
    assert len(inside) >= 3
    assert all(text[c.end - 1] == " " for c in inside)  # cut between words, not inside one
    word_start = text.index(long_word)
    cut_in_word = [c for c in chunks if word_start < c.end < word_start + len(long_word)]
    assert cut_in_word  # a word of more than a chunk is cut by characters
    rest = [c for c in chunks if c not in inside and c not in cut_in_word]
    # the rest end at sentence ends, or just before the long word
    assert all(c.text[-1] in ".!?" or c.end == word_start for c in rest)


def test_chunk_size_checked(tok):
    with pytest.raises(ValueError, match="at least 16"):
        chunk_text("Some text.", tok, 8)


def test_load_books_ids_and_duplicates(tmp_path):
    (tmp_path / "lib" / "sub").mkdir(parents=True)
    (tmp_path / "lib" / "a.txt").write_text("Book a.", encoding="utf-8")
    (tmp_path / "lib" / "sub" / "b.txt").write_text("Book b.", encoding="utf-8")
    (tmp_path / "single.txt").write_text("Book c.", encoding="utf-8")
    lines = [{"text": "Book d.", "id": "d"}, {"text": "Book e.", "id": "e"}]
    (tmp_path / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    books = load_books([tmp_path / "lib", tmp_path / "single.txt", tmp_path / "more.jsonl"])
    assert [(b.id, b.text) for b in books] == [("lib/a.txt", "Book a."), ("lib/sub/b.txt", "Book b."),
                                               ("single.txt", "Book c."), ("more.jsonl:1", "Book d."),
                                               ("more.jsonl:2", "Book e.")]
    assert [b.id for b in load_books(tmp_path / "more.jsonl", id_field="id")] == ["d", "e"]
    with pytest.raises(ValueError, match="two books have the id 'lib/a.txt'"):
        load_books([tmp_path / "lib", tmp_path / "lib"])


# --- parsing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("output, questions, dropped", [
    ("Q: Who opened the window?\nA: The sailor.\nQ: What was cold?\nA: The river.",
     ["Who opened the window?", "What was cold?"], {}),
    ("Here are the pairs:\n\n1. **Q:** Who wrote the letter?\n   **A:** The queen,\n   in winter.\n\n"
     "Question 2: Where? Answer: In the garden.", ["Who wrote the letter?", "Where?"], {}),
    ("Q: Who came?\nQ: Who left?\nA: The king.", ["Who left?"], {"missing_answer": 1}),
    ("Q: Who came?\nA: Ann.\nQ: And then?", ["Who came?"], {"missing_answer": 1}),
    ("A: An answer without a question.\nQ: Why?\nA: Because.", ["Why?"], {"missing_question": 1}),
    ("Q: Why?\nA:\nQ:\nA: Something.\nQ: Who?\nA: Ann.", ["Who?"], {"empty_pair": 2}),
    ("Q: Who came?\nA: Ann.\nQ: who CAME\nA: Bob.\nQ: Who came!\nA: Cy.", ["Who came?"], {"duplicate": 2}),
    ("", [], {"empty_output": 1}),
    ("  \n\t\n", [], {"empty_output": 1}),
    ("garbage garbage river stone . . the the", [], {"unparseable_output": 1}),
    ("Quiet: not a tag. Answers: none. Qa: no", [], {"unparseable_output": 1}),
])
def test_parse_qa(output, questions, dropped):
    pairs, counts = parse_qa(output)
    assert [p["question"] for p in pairs] == questions
    assert all(p["answer"].strip() for p in pairs)
    assert counts == Counter(dropped)


def test_parse_qa_joins_continued_answers():
    pairs, _ = parse_qa("**Q1:** Who wrote the letter?\n**A1:** The queen,\nin winter.\n\nstray line")
    assert pairs == [{"question": "Who wrote the letter?", "answer": "The queen, in winter."}]


def test_parse_lengths():
    assert parse_lengths("32k,131072, 1m") == [32768, 131072, 1048576]
    with pytest.raises(ValueError, match="bad length"):
        parse_lengths("32k,lots")


# --- assembly ----------------------------------------------------------------------------------------


class FakeGenerator:
    """Deterministic outputs from each prompt's hash: two good pairs, a duplicate and a lone question.
    ``fail_after``: raise on that call (an interrupted run)."""

    def __init__(self, batch_size: int = 4, fail_after: int | None = None):
        self.batch_size, self.fail_after = batch_size, fail_after
        self.calls, self.prompts = 0, []

    def generate(self, prompts, seeds):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls += 1
        self.prompts += prompts
        out = []
        for p in prompts:
            h = hashlib.sha1(p.encode()).hexdigest()
            out.append(f"Q: What is fact {h[:6]}?\nA: Fact {h[:6]} is {h[6:12]}.\nQ: Who saw {h[12:16]}?\n"
                       f"A: The sailor.\nQ: what is FACT {h[:6]}\nA: again\nQ: Unanswered?")
        return out


LENGTHS = [400, 800, 1600]


def books():
    return [Book("long", book_text(10, 160)), Book("short", book_text(11, 2))]


def test_assembly_lengths_and_loss_masks(tok, tmp_path):
    bks = books()
    summary = run_book_qa(bks, tok, tmp_path, FakeGenerator(), chunk_tokens=64, lengths=LENGTHS, max_pair_tokens=40,
                          seed=0, progress=False)
    chunks = {b.id: chunk_text(b.text, tok, 64, book=b.id) for b in bks}
    num_chunks = sum(map(len, chunks.values()))
    assert summary.chunks == summary.chunks_generated == num_chunks and summary.chunks_pending == 0
    assert summary.pairs_kept == 2 * num_chunks
    assert summary.pairs_dropped == {"duplicate": num_chunks, "missing_answer": num_chunks}
    tolerance = 64 + 40 + 32
    for length in LENGTHS:
        records = [json.loads(line) for line in (tmp_path / f"examples_{length}.jsonl").read_text().splitlines()]
        assert len(records) == summary.examples[length] > 0
        assert summary.skipped[length].get("book_too_short") == 1  # the short book
        assert {r["book"] for r in records} == {"long"}
        last = -1
        for r in records:
            ids, mask = encode_example(r, "[prompt],answer", tok)
            assert r["num_tokens"] == len(ids) and length - tolerance <= len(ids) <= length
            assert r["target_length"] == length
            # loss on the answer and EOS only
            assert [i for i, m in zip(ids, mask) if m] == tok.encode(r["answer"]) + [tok.eos_id]
            assert mask[:len(ids) - len(tok.encode(r["answer"])) - 1] == [False] * (len(ids) - len(tok.encode(r["answer"])) - 1)
            # the context: consecutive chunks, windows do not overlap; the question is about one of them
            c = chunks["long"]
            assert last < r["first_chunk"] <= r["question_chunk"] <= r["last_chunk"] < len(c)
            last = r["last_chunk"]
            context = bks[0].text[c[r["first_chunk"]].start:c[r["last_chunk"]].end].strip()
            assert r["prompt"] == f"{CHAT_PREFIX}{context} {r['question']} ASSISTANT: "
            assert c[r["question_chunk"]].text in context
        # deterministic choice of questions, spread over the windows
        assert len({r["question_chunk"] - r["first_chunk"] for r in records}) > 1 or len(records) < 3
    assert json.loads((tmp_path / "summary.json").read_text())["examples"] == {str(n): summary.examples[n]
                                                                               for n in LENGTHS}


def test_assembly_trims_windows_when_the_estimate_is_low(tok):
    from dataclasses import replace

    from ringlwm.qa.book_qa import assemble_examples

    book = books()[0]
    # Chunk counts that understate the truth by 30%: windows come out too long and must lose chunks.
    chunks = [replace(c, num_tokens=int(c.num_tokens * 0.7)) for c in chunk_text(book.text, tok, 64)]
    pairs = {c.index: [{"question": f"Where is {c.index}?", "answer": "Here."}] for c in chunks}
    for length in (400, 1600):
        records, skipped = assemble_examples(book, chunks, pairs, tok, length, chunk_tokens=64, max_pair_tokens=40)
        assert records
        for r in records:
            n = len(encode_example(r, "[prompt],answer", tok)[0])
            assert n == r["num_tokens"] and length - 64 - 40 - 32 <= n <= length
            assert r["first_chunk"] <= r["question_chunk"] <= r["last_chunk"]
            assert r["question"] == f"Where is {r['question_chunk']}?"
        assert all(a["last_chunk"] < b["first_chunk"] for a, b in zip(records, records[1:]))
        assert set(skipped) <= {"too_short", "tail_too_short"}  # a window trimmed below L - tolerance


def test_max_examples_per_book_draws_windows(tok):
    from ringlwm.qa.book_qa import assemble_examples

    book = books()[0]
    chunks = chunk_text(book.text, tok, 64)
    pairs = {c.index: [{"question": f"Q{c.index}-{j}?", "answer": "Yes."} for j in range(3)] for c in chunks}
    options = dict(chunk_tokens=64, max_pair_tokens=40, seed=1)
    every, _ = assemble_examples(book, chunks, pairs, tok, 400, **options)
    some, skipped = assemble_examples(book, chunks, pairs, tok, 400, max_examples=3, **options)
    assert len(every) > 6 and len(some) == 3 and skipped["over_max_examples"] == len(every) - 3
    assert all(r in every for r in some)  # the same window gets the same question, capped or not
    assert [r["first_chunk"] for r in some] != [r["first_chunk"] for r in every[:3]]  # not just the first ones


def test_length_too_small_for_chunks(tok, tmp_path):
    with pytest.raises(ValueError, match="too short for chunks"):
        run_book_qa(books(), tok, tmp_path, FakeGenerator(), chunk_tokens=200, lengths=[240], max_pair_tokens=40,
                    progress=False)


# --- resume ------------------------------------------------------------------------------------------


def qa_keys(path):
    return Counter((r["book"], r["chunk"]) for r in map(json.loads, path.read_text().splitlines()))


def test_resume_after_interruption_matches_an_uninterrupted_run(tok, tmp_path):
    options = dict(chunk_tokens=64, lengths=LENGTHS, max_pair_tokens=40, seed=5, progress=False)
    full = run_book_qa(books(), tok, tmp_path / "full", FakeGenerator(), **options)

    with pytest.raises(RuntimeError, match="interrupted"):
        run_book_qa(books(), tok, tmp_path / "cut", FakeGenerator(batch_size=4, fail_after=3), **options)
    qa = tmp_path / "cut" / "qa.jsonl"
    assert sum(qa_keys(qa).values()) == 12 and not (tmp_path / "cut" / "summary.json").exists()
    with open(qa, "a", encoding="utf-8") as f:
        f.write('{"book": "long", "chunk": 12, "sha1": "ab')  # a line cut short by a kill

    gen = FakeGenerator(batch_size=5)
    resumed = run_book_qa(books(), tok, tmp_path / "cut", gen, **options)
    assert len(gen.prompts) == full.chunks - 12  # nothing asked twice
    assert resumed.chunks_resumed == 12 and resumed.chunks_generated == full.chunks - 12
    keys = qa_keys(qa)
    assert set(keys.values()) == {1} and keys == qa_keys(tmp_path / "full" / "qa.jsonl")
    for length in LENGTHS:
        name = f"examples_{length}.jsonl"
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    assert (resumed.pairs_kept, resumed.pairs_dropped, resumed.examples) == (full.pairs_kept, full.pairs_dropped,
                                                                            full.examples)
    # a third run has nothing to generate
    again = FakeGenerator()
    assert run_book_qa(books(), tok, tmp_path / "cut", again, **options).chunks_resumed == full.chunks
    assert again.calls == 0
    # another seed picks other questions
    other = run_book_qa(books(), tok, tmp_path / "other", FakeGenerator(), **{**options, "seed": 6})
    name = f"examples_{LENGTHS[0]}.jsonl"
    assert other.examples == full.examples
    assert (tmp_path / "other" / name).read_bytes() != (tmp_path / "full" / name).read_bytes()


def test_resume_refuses_changed_chunks(tok, tmp_path):
    run_book_qa(books(), tok, tmp_path, FakeGenerator(), chunk_tokens=64, lengths=[600], max_pair_tokens=40,
                progress=False)
    with pytest.raises(ValueError, match="use a fresh --out"):
        run_book_qa(books(), tok, tmp_path, FakeGenerator(), chunk_tokens=80, lengths=[600], max_pair_tokens=40,
                    progress=False)
    # a bad line that is not the last one is an error, not silently dropped
    qa = tmp_path / "qa.jsonl"
    lines = qa.read_text().splitlines()
    qa.write_text("\n".join([lines[0], "{broken", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="qa.jsonl:2: not JSON"):
        QAStore(qa)


def test_a_first_batch_that_fails_entirely_stops_the_run(tok, tmp_path):
    class Down:
        batch_size = 4

        def generate(self, prompts, seeds):
            return [GenerationError("connection refused", "connection") for _ in prompts]

    with pytest.raises(BackendError, match="every request of the first batch"):
        run_book_qa(books(), tok, tmp_path, Down(), chunk_tokens=64, lengths=[800], progress=False)
    assert not (tmp_path / "qa.jsonl").exists() or (tmp_path / "qa.jsonl").read_text() == ""


# --- local Hugging Face model ------------------------------------------------------------------------


def tiny_hf_model(path, words):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["[UNK]", "[PAD]", "<s>", "</s>", *sorted(set(words))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                                  bos_token="<s>", eos_token="</s>")
    hf_tok.save_pretrained(path)
    transformers.set_seed(0)
    config = tiny_llama_config(vocab_size=len(vocab), num_hidden_layers=1, num_key_value_heads=1,
                               max_position_embeddings=1024, bos_token_id=2, eos_token_id=3, pad_token_id=1)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def test_hf_backend_batches_left_padded_and_counts_garbage(tok, tmp_path):
    from ringlwm.qa.book_qa import HFGenerator

    # Lowercase book words and "." only: the model can never write "Q:" or "A:", so every output is dropped.
    tiny_hf_model(tmp_path / "model", [w.lower() for w in WORDS] + [".", "!", "?"])
    gen = HFGenerator(tmp_path / "model", batch_size=3, max_new_tokens=6)
    calls = []
    original = gen.model.generate

    def spy(**kwargs):
        calls.append(kwargs["attention_mask"].clone())
        return original(**kwargs)

    gen.model.generate = spy
    book = Book("b", book_text(20, 8))
    chunks = chunk_text(book.text, tok, 64)
    assert 4 <= len(chunks) <= 9
    summary = run_book_qa([book], tok, tmp_path / "out", gen, chunk_tokens=64, lengths=[300], progress=False)
    assert [m.shape[0] for m in calls] == [min(3, len(chunks) - i) for i in range(0, len(chunks), 3)]
    for mask in calls:  # left padding: each row is zeros, then ones
        assert (mask[:, 1:] >= mask[:, :-1]).all() and mask[:, -1].all()
    assert any((m == 0).any() for m in calls)  # prompts of different lengths were padded
    assert summary.chunks_generated == len(chunks) and summary.pairs_kept == 0
    dropped = summary.pairs_dropped
    assert set(dropped) <= {"unparseable_output", "empty_output"} and sum(dropped.values()) == len(chunks)
    stored = [json.loads(line) for line in (tmp_path / "out" / "qa.jsonl").read_text().splitlines()]
    assert all(isinstance(r["raw"], str) and r["pairs"] == [] for r in stored)
    assert any(r["raw"].strip() for r in stored)  # it did generate
    assert summary.examples == {300: 0} and summary.skipped[300]["no_question"] >= 1
    # greedy decoding: the same batch gives the same outputs
    prompts = ["the river", "a long story about the old king"]
    assert gen.generate(prompts, [0, 1]) == gen.generate(prompts, [0, 1])
    # the prompt goes in LWM's format, or the tokenizer's chat template when it has one
    assert gen.format("hi") == "You are a helpful assistant. USER: hi ASSISTANT: "
    gen.tokenizer.chat_template = "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    gen.chat_template = True
    assert gen.format("hi") == "<s>[user] hi"
    assert len(gen.generate(prompts, [0, 1])) == 2


# --- OpenAI-compatible endpoint ----------------------------------------------------------------------


class CannedServer(ThreadingHTTPServer):
    """/v1/chat/completions on 127.0.0.1; the user message picks the behaviour: "SLOW" (first attempt
    answers after 1.5 s), "FLAKY" (first attempt HTTP 500), "BROKEN" (HTTP 500 until ``healed``),
    "DENIED" (HTTP 401); anything else gets a canned QA pair."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), CannedHandler)
        self.attempts: Counter = Counter()
        self.bodies: list[dict] = []
        self.auth: set = set()
        self.healed = False
        self.lock = threading.Lock()

    def handle_error(self, request, client_address):  # the slow answer meets a closed socket: expected
        pass


class CannedHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        server: CannedServer = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with server.lock:
            server.attempts[prompt] += 1
            attempt = server.attempts[prompt]
            server.bodies.append(body)
            server.auth.add(self.headers.get("Authorization"))
        if self.path != "/v1/chat/completions":
            return self.reply(404, {"error": "no such route"})
        if "DENIED" in prompt:
            return self.reply(401, {"error": "bad key"})
        if ("BROKEN" in prompt and not server.healed) or ("FLAKY" in prompt and attempt == 1):
            return self.reply(500, {"error": "overloaded"})
        if "SLOW" in prompt and attempt == 1:
            time.sleep(1.5)
        h = hashlib.sha1(prompt.encode()).hexdigest()[:8]
        content = f"Q: What is item {h}?\nA: Item {h} is in the story."
        self.reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": "stop"}]})

    def reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    srv = CannedServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url_of(server) -> str:
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"
    return f"http://{host}:{port}/v1"


def test_openai_backend_timeout_retry_and_failures(server, monkeypatch):
    monkeypatch.setenv("BOOK_QA_TEST_KEY", "sekrit")
    gen = OpenAIGenerator(url_of(server), "tiny", api_key_env="BOOK_QA_TEST_KEY", concurrency=4, timeout=0.5,
                          max_retries=2, backoff=0.01)
    prompts = ["ok one", "SLOW two", "FLAKY three", "BROKEN four"]
    start = time.monotonic()
    out = gen.generate(prompts, [1, 2, 3, 4])
    assert time.monotonic() - start < 5
    assert all(isinstance(o, str) and o.startswith("Q: What is item") for o in out[:3])
    assert isinstance(out[3], GenerationError) and out[3].kind == "HTTP 500" and "3 attempts" in str(out[3])
    assert server.attempts == Counter({"ok one": 1, "SLOW two": 2, "FLAKY three": 2, "BROKEN four": 3})
    assert gen.num_requests == 8 and gen.num_retries == 4
    assert server.auth == {"Bearer sekrit"}
    assert {(b["model"], b["seed"], b["temperature"]) for b in server.bodies if b["messages"][-1]["content"] ==
            "ok one"} == {("tiny", 1, 0.0)}
    with pytest.raises(BackendError, match="HTTP 401"):
        gen.generate(["DENIED"], [0])
    # nothing listens: a connection error, counted per prompt
    dead = OpenAIGenerator("http://127.0.0.1:9/v1", "tiny", max_retries=1, backoff=0.01, timeout=0.5)
    failed = dead.complete("ok")
    assert isinstance(failed, GenerationError) and failed.kind == "connection"


def test_cli_with_endpoint_counts_a_failed_chunk_and_retries_it_next_run(server, tok, tmp_path, capsys):
    folder = tmp_path / "books"
    folder.mkdir()
    text = book_text(30, 40)
    paragraphs = text.split("\n\n")
    paragraphs[5] = "The BROKEN " + paragraphs[5]  # this chunk's requests fail until the server heals
    (folder / "one.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    (folder / "two.txt").write_text(book_text(31, 40), encoding="utf-8")
    sp_model = tok.path
    argv = ["--books", str(folder), "--tokenizer", sp_model, "--out", str(tmp_path / "out"), "--backend", "openai",
            "--base-url", url_of(server), "--model", "tiny", "--retries", "1", "--backoff", "0.01",
            "--timeout", "5", "--concurrency", "3", "--chunk-tokens", "64", "--lengths", "512,1k", "--no-progress"]
    first = main(argv)
    chunks = sum(len(chunk_text(b.text, tok, 64)) for b in load_books(folder))
    assert first.chunks == chunks and first.chunks_failed == {"HTTP 500": 1} and first.chunks_pending == 1
    assert first.chunks_generated == chunks - 1 and first.pairs_kept == chunks - 1
    assert first.examples[512] > 0 and first.examples[1024] > 0
    assert "failed this run: 1" in capsys.readouterr().out
    broken = [p for p in server.attempts if "BROKEN" in p]
    assert len(broken) == 1 and server.attempts[broken[0]] == 2

    server.healed = True
    server.attempts.clear()
    second = main(argv)
    assert list(server.attempts.values()) == [1] and "BROKEN" in next(iter(server.attempts))
    assert second.chunks_resumed == chunks - 1 and second.chunks_generated == 1 and second.chunks_pending == 0
    assert second.chunks_failed == {} and second.pairs_kept == chunks
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["pairs_kept"] == chunks and summary["chunks_pending"] == 0


# --- provenance: a resumed run never mixes in pairs of another question writer or other settings ----------------


def test_cli_resumes_only_the_same_writer_and_overwrite_starts_fresh(server, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_QA_TEST_KEY", "sekrit")
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "one.txt").write_text(book_text(40, 30), encoding="utf-8")
    (folder / "two.txt").write_text(book_text(41, 30), encoding="utf-8")
    out = tmp_path / "out"
    books_args = ["--books", str(folder), "--tokenizer", tok.path, "--out", str(out), "--chunk-tokens", "64",
                  "--no-progress"]
    writer = ["--backend", "openai", "--base-url", url_of(server), "--model", "tiny", "--api-key-env",
              "BOOK_QA_TEST_KEY", "--retries", "0", "--timeout", "5"]
    first = main([*books_args, *writer, "--lengths", "512"])
    chunks = sum(len(chunk_text(b.text, tok, 64)) for b in load_books(folder))
    assert first.chunks_generated == chunks == sum(server.attempts.values())
    record = (out / "provenance.json").read_text()
    assert "sekrit" not in record
    assert json.loads(record)["generation"]["writer"] == {
        "backend": "openai", "url": url_of(server) + "/chat/completions", "model": "tiny", "max_tokens": 512,
        "temperature": 0.0, "top_p": None, "system_prompt": None}
    qa = (out / "qa.jsonl").read_bytes()
    server.attempts.clear()

    host, port = server.server_address[:2]
    for change, key in [(["--model", "other"], "generation.writer.model"),
                        (["--base-url", f"http://localhost:{port}/v1"], "generation.writer.url"),
                        (["--temperature", "0.7"], "generation.writer.temperature"),
                        (["--max-new-tokens", "64"], "generation.writer.max_tokens"),
                        (["--seed", "1"], "generation.seed"),
                        (["--pairs-per-chunk", "2"], "generation.pairs_per_chunk")]:
        with pytest.raises(SystemExit) as refused:
            main([*books_args, *writer, "--lengths", "512", *change])
        message = str(refused.value.code)
        assert f"different settings ({key}:" in message and "--overwrite" in message, message
    assert not server.attempts and (out / "qa.jsonl").read_bytes() == qa  # nothing asked, nothing written

    # The same writer and settings resume with nothing to ask; assembling only needs no writer at all.
    assert main([*books_args, *writer, "--lengths", "512"]).chunks_resumed == chunks
    assembled = main([*books_args, "--lengths", "1k"])
    assert assembled.chunks_resumed == chunks and assembled.examples[1024] > 0
    assert not server.attempts and (out / "provenance.json").read_text() == record
    with pytest.raises(SystemExit) as refused:  # --overwrite with nothing to write the pairs again
        main([*books_args, "--lengths", "1k", "--overwrite"])
    assert refused.value.code == 2 and (out / "qa.jsonl").read_bytes() == qa

    # --overwrite: every chunk asked again, of the other model; old outputs gone.
    fresh = main([*books_args, *writer, "--lengths", "512", "--model", "other", "--overwrite"])
    assert fresh.chunks_resumed == 0 and fresh.chunks_generated == chunks == sum(server.attempts.values())
    assert {b["model"] for b in server.bodies[-chunks:]} == {"other"}
    assert sum(qa_keys(out / "qa.jsonl").values()) == chunks
    assert not (out / "examples_1024.jsonl").exists() and (out / "examples_512.jsonl").exists()
    assert json.loads((out / "provenance.json").read_text())["generation"]["writer"]["model"] == "other"


def test_pairs_without_provenance_or_of_another_writer_are_refused(tok, tmp_path):
    options = dict(chunk_tokens=64, lengths=[800], max_pair_tokens=40, progress=False)
    first = run_book_qa(books(), tok, tmp_path, FakeGenerator(), **options)
    record = json.loads((tmp_path / "provenance.json").read_text())
    assert record["generation"]["writer"] == {"class": f"{FakeGenerator.__module__}.FakeGenerator"}
    assert record["generation"]["pairs_per_chunk"] == 3 and record["chunking"]["chunk_tokens"] == 64

    class OtherWriter(FakeGenerator):
        def provenance(self):
            return {"backend": "stub", "name": "other"}

    other = OtherWriter()
    with pytest.raises(ValueError, match=r"different settings \(generation\.writer\.backend"):
        run_book_qa(books(), tok, tmp_path, other, **options)
    assert other.calls == 0

    # qa.jsonl from before provenance.json existed: unknown writer, refused for generating, fine to assemble
    (tmp_path / "provenance.json").unlink()
    gen = FakeGenerator()
    with pytest.raises(ValueError, match="do not record what produced them; pass --overwrite"):
        run_book_qa(books(), tok, tmp_path, gen, **options)
    assert gen.calls == 0 and not (tmp_path / "provenance.json").exists()
    assert run_book_qa(books(), tok, tmp_path, None, **options).examples == first.examples
    with pytest.raises(ValueError, match="--overwrite would delete"):
        run_book_qa(books(), tok, tmp_path, None, overwrite=True, **options)
    redone = run_book_qa(books(), tok, tmp_path, other, overwrite=True, **options)
    assert redone.chunks_resumed == 0 and len(other.prompts) == first.chunks
    assert json.loads((tmp_path / "provenance.json").read_text())["generation"]["writer"]["name"] == "other"


def test_another_tokenizer_is_refused_even_when_the_chunks_read_the_same(tok, tmp_path):
    from byte_tokenizer import ByteTokenizer

    short = [Book("short", book_text(12, 2, sentences=(2, 3)))]
    options = dict(chunk_tokens=1000, lengths=[2000], max_pair_tokens=40, progress=False)
    assert len(short[0].text.encode()) < 1000  # one chunk, of the same text, with either tokenizer
    assert [c.text for c in chunk_text(short[0].text, tok, 1000)] == [c.text for c in
                                                                       chunk_text(short[0].text, ByteTokenizer(), 1000)]
    run_book_qa(short, tok, tmp_path, FakeGenerator(), **options)
    gen = FakeGenerator()
    with pytest.raises(ValueError, match=r"different settings \(chunking\.tokenizer\."):
        run_book_qa(short, ByteTokenizer(), tmp_path, gen, **options)
    with pytest.raises(ValueError, match=r"chunking\.tokenizer\."):  # assembling only compares the chunking too
        run_book_qa(short, ByteTokenizer(), tmp_path, None, **options)
    assert gen.calls == 0
    assert run_book_qa(short, tok, tmp_path, None, **options).chunks_resumed == 1


def test_hf_writer_provenance_tells_models_and_settings_apart(tok, tmp_path):
    from ringlwm.qa.book_qa import HFGenerator
    from ringlwm.runtime import model_fingerprint

    path = tmp_path / "model"
    tiny_hf_model(path, [w.lower() for w in WORDS] + [".", "!", "?"])
    book = [Book("b", book_text(21, 4))]
    options = dict(chunk_tokens=64, lengths=[300], progress=False)
    out = tmp_path / "out"
    first = run_book_qa(book, tok, out, HFGenerator(path, batch_size=4, max_new_tokens=4), **options)
    assert first.chunks_generated == first.chunks >= 2
    writer = json.loads((out / "provenance.json").read_text())["generation"]["writer"]
    assert writer["model"] == model_fingerprint(path) and writer["max_new_tokens"] == 4
    assert writer["backend"] == "hf" and writer["dtype"] == "float32"
    # top_p does not change greedy outputs: resumed
    same = run_book_qa(book, tok, out, HFGenerator(path, batch_size=2, max_new_tokens=4, top_p=0.5), **options)
    assert same.chunks_resumed == first.chunks and same.chunks_generated == 0
    with pytest.raises(ValueError, match=r"generation\.writer\.max_new_tokens"):
        run_book_qa(book, tok, out, HFGenerator(path, max_new_tokens=5), **options)
    templated = HFGenerator(path, max_new_tokens=4)
    templated.tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    templated.chat_template = True
    with pytest.raises(ValueError, match=r"generation\.writer\.prompt_format"):
        run_book_qa(book, tok, out, templated, **options)
    # the folder retrained in place: the weights tell it apart
    import torch

    model = templated.model
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    model.save_pretrained(path)
    with pytest.raises(ValueError, match=r"generation\.writer\.model\.weights"):
        run_book_qa(book, tok, out, HFGenerator(path, max_new_tokens=4), **options)
