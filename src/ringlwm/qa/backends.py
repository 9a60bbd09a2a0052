"""Question writers for ``book_qa``: a local Hugging Face causal LM, or an OpenAI-compatible chat endpoint.

    gen = HFGenerator("models/llama-7b-chat", batch_size=8, max_new_tokens=512)          # temperature 0: greedy
    gen = OpenAIGenerator("http://127.0.0.1:8000/v1", "llama-3-8b-instruct", concurrency=16)
    outputs = gen.generate(prompts, seeds)       # [str | GenerationError], one per prompt, in order

``book_qa`` hands ``gen.batch_size`` prompts to one ``generate`` call. A ``GenerationError`` in the
returned list is one prompt that failed (counted, and tried again on the next run); an exception raised
by ``generate`` stops the run (a missing model, a wrong URL or key: nothing would succeed). Any object
with ``batch_size`` and this ``generate`` works as a generator, e.g. a stub in tests.

``gen.provenance()`` is what decides its outputs, recorded in ``OUT/provenance.json`` so that a resumed
run never mixes in pairs of another writer: for a local model its path and the hashes of its config,
weights and tokenizer files, the loaded dtype, the prompt format and the decoding settings; for an
endpoint the URL (without credentials or query), the model name and the request settings; never the API
key. Batch size, concurrency, device, timeouts and retries are not part of it. A generator without
``provenance()`` is recorded by its class name only.

The endpoint client uses only the standard library (``urllib.request`` and a thread pool). A request
that times out (``timeout`` is per socket operation: connect, and each read), is refused, or answers
HTTP 408/409/429/5xx or unreadable JSON is retried up to ``max_retries`` times after
``backoff * 2**attempt`` seconds (plus up to 25% jitter; a ``Retry-After`` header wins, capped at 60 s).
HTTP 401/403/404 raise ``BackendError`` at once; any other 4xx fails that prompt only, unretried.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ringlwm.data.chat import chat_prompt
from ringlwm.runtime import model_fingerprint, text_fingerprint, tokenizer_files_fingerprint


class GenerationError(Exception):
    """One prompt that produced no output; ``kind`` is the key it is counted under ("timeout", "HTTP 500")."""

    def __init__(self, message: str, kind: str = "failed"):
        super().__init__(message)
        self.kind = kind


class BackendError(RuntimeError):
    """A problem no retry can fix (no such model, endpoint or key); stops the run."""


class HFGenerator:
    """Batched ``generate`` of a local causal LM folder (``save_pretrained`` layout), prompts left-padded.

    temperature 0 decodes greedily; above 0 samples (with top_p), seeded from the batch's first seed, so
    a sampled output depends on the batch it was in. Greedy outputs can differ in rare near-ties between
    batchings too (padding changes the float sums). ``chat_template``: None uses the tokenizer's chat
    template when it has one, else LWM's format; True/False force the choice.
    """

    def __init__(self, model_dir: str | os.PathLike, *, batch_size: int = 8, max_new_tokens: int = 512,
                 temperature: float = 0.0, top_p: float = 1.0, device: str | None = None, dtype: str | None = None,
                 chat_template: bool | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"no model folder at {path}: --model takes a local save_pretrained folder")
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be positive")
        self.model_dir = path
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "left"  # generated tokens must follow every prompt directly
        if self.tokenizer.pad_token is None:
            fallback = self.tokenizer.eos_token or self.tokenizer.unk_token
            if fallback is None:
                raise ValueError(f"the tokenizer in {path} has no pad, eos or unk token to pad batches with")
            self.tokenizer.pad_token = fallback
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs).to(self.device).eval()
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise ValueError(f"chat_template=True, but the tokenizer in {path} has no chat template")
        self.chat_template = has_template if chat_template is None else chat_template

    def format(self, prompt: str) -> str:
        if self.chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return chat_prompt(prompt)  # the QA prompt as the user turn of LWM's chat format

    def provenance(self) -> dict:
        """What decides the outputs (see the module docstring); JSON-able."""
        return {"backend": "hf", "model": model_fingerprint(self.model_dir),
                "tokenizer": tokenizer_files_fingerprint(self.model_dir),
                "dtype": str(self.model.dtype).removeprefix("torch."),
                "prompt_format": text_fingerprint(self.format("{prompt}")),
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p if self.temperature > 0 else None}  # greedy decoding does not use it

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[str]:
        import torch

        # A chat template writes BOS itself; the plain format gets the tokenizer's special tokens.
        batch = self.tokenizer([self.format(p) for p in prompts], return_tensors="pt", padding=True,
                               add_special_tokens=not self.chat_template).to(self.device)
        options = dict(max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        if self.temperature > 0:
            torch.manual_seed(seeds[0])
            options.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            options.update(do_sample=False)
        with torch.inference_mode():
            out = self.model.generate(**batch, **options)
        new = out[:, batch["input_ids"].shape[1]:]
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in new]


_RETRY_STATUS = {408, 409, 429}
_FATAL_STATUS = {401: "unauthorized: check the API key", 403: "forbidden: check the API key",
                 404: "not found: check --base-url (e.g. http://host:8000/v1) and --model"}


class OpenAIGenerator:
    """``POST {base_url}/chat/completions``, ``concurrency`` requests at a time, retried with backoff.

    base_url: e.g. ``http://127.0.0.1:8000/v1`` (a URL already ending in /chat/completions is used as
    is). The API key is ``api_key``, else the environment variable ``api_key_env`` (none sent if unset).
    Each prompt's seed goes in the request's ``seed`` (servers that honour it make sampling repeatable).
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8, timeout: float = 120.0,
                 max_retries: int = 4, backoff: float = 1.0, max_tokens: int = 512, temperature: float = 0.0,
                 top_p: float | None = None, system_prompt: str | None = None, batch_size: int | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError(f"need concurrency >= 1, max_retries >= 0 and timeout > 0, got {concurrency}, "
                             f"{max_retries}, {timeout}")
        url = base_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key = model, api_key or os.environ.get(api_key_env) or None
        self.concurrency, self.timeout, self.max_retries, self.backoff = concurrency, timeout, max_retries, backoff
        self.max_tokens, self.temperature, self.top_p, self.system_prompt = max_tokens, temperature, top_p, system_prompt
        # Several requests per worker per call, so that one slow request idles few workers.
        self.batch_size = batch_size or 4 * concurrency
        self.num_requests = self.num_retries = 0
        self._lock = threading.Lock()

    def provenance(self) -> dict:
        """What decides the outputs (see the module docstring); never the API key."""
        return {"backend": "openai", "url": _public_url(self.url), "model": self.model,
                "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "system_prompt": text_fingerprint(self.system_prompt) if self.system_prompt else None}

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[str | GenerationError]:
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(prompts)))) as pool:
            return list(pool.map(self.complete, prompts, seeds))

    def complete(self, prompt: str, seed: int | None = None) -> str | GenerationError:
        """One prompt's completion text, or the GenerationError of its last attempt."""
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        messages.append({"role": "user", "content": prompt})
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature}
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if seed is not None:
            body["seed"] = seed
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        error = GenerationError("no attempt made")
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.num_retries += 1
                delay = getattr(error, "retry_after", None) or self.backoff * 2 ** (attempt - 1)
                time.sleep(delay * (1 + random.random() / 4))
            with self._lock:
                self.num_requests += 1
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return _content(json.loads(response.read()))
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code in _FATAL_STATUS:
                    raise BackendError(f"{self.url} answered HTTP {e.code} ({_FATAL_STATUS[e.code]}): {detail}") from None
                error = GenerationError(f"HTTP {e.code}: {detail}", f"HTTP {e.code}")
                if e.code not in _RETRY_STATUS and e.code < 500:
                    return error  # a bad request stays bad (e.g. a prompt longer than the model's context)
                error.retry_after = _retry_after(e)
            except (TimeoutError, urllib.error.URLError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError):
                    error = GenerationError(f"no answer within {self.timeout} s", "timeout")
                else:
                    error = GenerationError(f"cannot reach {self.url}: {reason}", "connection")
            except (OSError, http.client.HTTPException) as e:  # reset or cut-off connections
                error = GenerationError(f"connection to {self.url} failed: {e!r}", "connection")
            except (ValueError, KeyError, IndexError, TypeError) as e:  # a 200 answer without a completion
                error = GenerationError(f"unreadable answer: {e}", "bad_response")
        return GenerationError(f"{error} (after {self.max_retries + 1} attempts)", error.kind)


def _content(answer: dict) -> str:
    content = answer["choices"][0]["message"]["content"]
    if not isinstance(content, str):
        raise TypeError(f"choices[0].message.content is {type(content).__name__}, not a string")
    return content


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        return e.read(500).decode("utf-8", "replace").strip() or e.reason
    except OSError:
        return str(e.reason)


def _retry_after(e: urllib.error.HTTPError) -> float | None:
    try:
        return min(60.0, float(e.headers.get("Retry-After", "")))
    except (TypeError, ValueError):
        return None


def _public_url(url: str) -> str:
    """``url`` without user:password and without query or fragment (which can carry keys)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
