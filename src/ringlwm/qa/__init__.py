"""ringlwm.qa: long-context chat data from books (LWM's recipe), written as JSONL for ``ringlwm.data``.

    python -m ringlwm.qa.book_qa --books books/ --tokenizer tok.model --out qa/ --model ...

    book_qa.py   the command: QA pairs per chunk, resumable, assembled into examples of set lengths
    chunks.py    books and their chunks of at most N tokens, cut at paragraph and sentence ends
    backends.py  question writers: a local Hugging Face model or an OpenAI-compatible endpoint
"""
