"""LLM backends that write prompt pairs, and the validation of every answer.

A *completer* is any callable ``complete(messages: list[{"role", "content"}]) -> str | None`` (None: the answer
was unusable). Two are provided: :class:`OpenAIChat` (any OpenAI-compatible chat-completions endpoint: OpenAI,
vLLM, Ollama, llama.cpp server; standard library only) and :class:`LocalLM` (a local causal LM through
transformers). Answers are parsed by :func:`parse_pairs`, which never trusts them: every pair must have a non-empty
unsafe and safe prompt that differ, or it is dropped and counted.
"""

from __future__ import annotations

import collections
import email.utils
import http.client
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from ..errors import SafealignError
from ..utils import logger
from .splits import normalise_prompt
from .taxonomy import Concept

Messages = list[dict[str, str]]
Completer = Callable[[Messages], "str | None"]

MAX_PROMPT_CHARS = 400

SYSTEM = ("You help build a dataset that teaches image generators to avoid harmful content. You write short "
          "image-generation prompts and, for each, a minimally edited safe version. Answer with JSON only.")


def pair_request(concept: Concept, n: int, call: int = 0) -> Messages:
    """The chat messages asking for ``n`` (unsafe, safe) pairs for one concept."""
    swap = (f" by replacing '{concept.name}' with '{concept.counterpart}'" if concept.counterpart else
            " by replacing it with a harmless object of similar size and place")
    user = (f"Category: {concept.category}. Concept: {concept.name}.\n"
            f"Write {n} different prompts for an image generator that each clearly show {concept.name}; vary the "
            f"scene, style and composition; one sentence each. For each prompt also write its safe counterpart: the "
            f"same prompt with the smallest edit that removes the concept{swap}; keep every other word.\n"
            'Answer exactly as JSON: {"pairs": [{"unsafe": "...", "safe": "..."}]}'
            + (f"\n(batch {call + 1}: avoid repeating earlier prompts)" if call else ""))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def _json_payload(text: str):
    """The JSON value in an answer (code fences and chatter around it tolerated), or None."""
    text = re.sub(r"```(?:json)?", "", text)
    pairs = [("{", "}"), ("[", "]")]
    pairs.sort(key=lambda oc: text.find(oc[0]) if oc[0] in text else len(text))  # the outermost value first
    for open_, close in pairs:
        i, j = text.find(open_), text.rfind(close)
        if 0 <= i < j:
            try:
                return json.loads(text[i:j + 1])
            except json.JSONDecodeError:
                continue
    return None


def parse_pairs(text: str | None) -> tuple[list[tuple[str, str]], collections.Counter]:
    """Valid (unsafe, safe) pairs in an answer, and a count of what was dropped and why.

    Reasons: ``malformed_answer`` (no JSON / no list of pairs), ``malformed_pair`` (an item that is not an object
    with an unsafe prompt), ``no_safe`` (no safe counterpart), ``identical`` (safe == unsafe once normalised),
    ``too_long``.
    """
    dropped: collections.Counter = collections.Counter()
    data = _json_payload(text) if isinstance(text, str) else None
    if isinstance(data, dict):
        data = data.get("pairs")
    if not isinstance(data, list):
        dropped["malformed_answer"] += 1
        return [], dropped
    out = []
    for item in data:
        if not isinstance(item, dict):
            dropped["malformed_pair"] += 1
            continue
        u = item.get("unsafe", item.get("unsafe_prompt"))
        s = item.get("safe", item.get("safe_prompt"))
        if not isinstance(u, str) or not u.strip():
            dropped["malformed_pair"] += 1
            continue
        if not isinstance(s, str) or not s.strip():
            dropped["no_safe"] += 1
            continue
        u, s = " ".join(u.split()), " ".join(s.split())
        if normalise_prompt(u) == normalise_prompt(s):
            dropped["identical"] += 1
            continue
        if len(u) > MAX_PROMPT_CHARS or len(s) > MAX_PROMPT_CHARS:
            dropped["too_long"] += 1
            continue
        out.append((u, s))
    return out, dropped


# -- OpenAI-compatible HTTP endpoint ------------------------------------------------------------------------------
def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


#: the largest answer read from an endpoint (a chat completion is a few kB)
MAX_RESPONSE_BYTES = 8 << 20


def _read_body(r, deadline: float) -> bytes:
    """The response body, read as bytes arrive, refused once ``deadline`` (time.monotonic) passes."""
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("the answer did not arrive within --request-timeout")
        b = r.read1(1 << 16)
        if not b:
            if getattr(r, "length", None):  # the server hung up before sending what it announced
                raise http.client.IncompleteRead(b"".join(chunks), r.length)
            return b"".join(chunks)
        size += len(b)
        if size > MAX_RESPONSE_BYTES:
            raise ConnectionError(f"the answer is larger than {MAX_RESPONSE_BYTES >> 20} MB")
        chunks.append(b)


def post_with_deadline(req: urllib.request.Request, timeout: float) -> bytes:
    """Send ``req`` and read the whole answer within ``timeout`` seconds in total -- connecting, headers and body
    together, not per socket read, so a server that drips bytes cannot hold the caller past it.

    The exchange runs in a daemon thread that checks the deadline between reads (each read also times out after
    ``timeout``); the caller stops waiting at the deadline and gets :class:`TimeoutError`."""
    deadline = time.monotonic() + timeout
    box: dict = {}

    def exchange() -> None:
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                box["raw"] = _read_body(r, deadline)
        except BaseException as e:  # noqa: BLE001 - handed to the caller as it is
            box["error"] = e

    worker = threading.Thread(target=exchange, name="safealign-llm-request", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()) + 0.05)
    if worker.is_alive():
        raise TimeoutError(f"no complete answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["raw"]


class OpenAIChat:
    """A chat-completions client with timeouts, retries (timeouts, 429 with Retry-After, 5xx) and a rate limit."""

    def __init__(self, endpoint: str, model: str, *, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 4, max_retry_wait: float = 60.0, requests_per_minute: float = 0.0,
                 temperature: float = 0.8, max_tokens: int = 768, backoff: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep):
        self.url = endpoint.rstrip("/") + "/chat/completions"
        if not self.url.startswith(("http://", "https://")):
            raise SafealignError(f"--endpoint must be an http(s) URL such as http://localhost:8000/v1, got "
                                 f"{endpoint!r}")
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.max_retry_wait, self.backoff = max_retries, max_retry_wait, backoff
        self.min_interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self.temperature, self.max_tokens = temperature, max_tokens
        self.sleep = sleep
        self._last = 0.0
        self.stats: collections.Counter = collections.Counter()

    def _throttle(self) -> None:
        if self.min_interval:
            wait = self._last + self.min_interval - time.monotonic()
            if wait > 0:
                self.sleep(wait)
        self._last = time.monotonic()

    def __call__(self, messages: Messages) -> str | None:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats["retries"] += 1
            self._throttle()
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            wait = self.backoff * 2 ** attempt
            try:
                raw = post_with_deadline(req, self.timeout)
            except urllib.error.HTTPError as e:
                if e.code == 429 or e.code >= 500:
                    self.stats[f"http_{e.code}"] += 1
                    ra = _retry_after(e.headers.get("Retry-After") if e.headers else None)
                    wait = min(ra if ra is not None else wait, self.max_retry_wait)
                    last = f"HTTP {e.code}"
                    if attempt < self.max_retries:
                        logger.debug("endpoint answered %s; retrying in %.1fs", last, wait)
                        self.sleep(wait)
                    continue
                detail = e.read()[:200].decode("utf-8", "replace").strip() if e.fp else ""
                raise SafealignError(f"the endpoint {self.url} refused the request with HTTP {e.code}"
                                     f"{': ' + detail if detail else ''}; check --endpoint, --llm-model and the API "
                                     "key") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                last = "timed out" if isinstance(reason, (TimeoutError, socket.timeout)) else str(reason)
                self.stats["timeouts" if last == "timed out" else "connection_errors"] += 1
                if attempt < self.max_retries:
                    self.sleep(min(wait, self.max_retry_wait))
                continue
            return self._content(raw)
        raise SafealignError(f"the endpoint {self.url} is unreachable or failing after {self.max_retries + 1} "
                             f"tries ({last}); check that the server runs and --endpoint is right")

    def _content(self, raw: bytes) -> str | None:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            self.stats["malformed_responses"] += 1
            return None
        return content if isinstance(content, str) else None


# -- local causal LM (transformers) ------------------------------------------------------------------------------
class LocalLM:
    """A local causal LM folder (``AutoModelForCausalLM``) answering the same chat messages."""

    def __init__(self, path: str, *, temperature: float = 0.8, max_new_tokens: int = 768, seed: int = 0,
                 device: str | None = None):
        from pathlib import Path

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        if not Path(path).is_dir():
            raise SafealignError(f"--llm-model {path} is not a folder; the transformers backend needs a local "
                                 "causal-LM folder (save_pretrained output)")
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        except (OSError, ValueError, KeyError) as e:
            raise SafealignError(f"could not load a causal LM from {path}: {str(e).splitlines()[0]}") from None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.generator_seed = seed
        self.calls = 0

    def _text(self, messages: Messages) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages) + "\n\nJSON:"

    def __call__(self, messages: Messages) -> str | None:
        import torch
        enc = self.tok(self._text(messages), return_tensors="pt")
        ids = enc["input_ids"]
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None)
        new = self.max_new_tokens
        if limit:
            new = max(1, min(new, limit // 2))
            ids = ids[:, -(limit - new):]
        torch.manual_seed(self.generator_seed + self.calls)
        self.calls += 1
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        with torch.no_grad():
            out = self.model.generate(ids.to(self.device), attention_mask=torch.ones_like(ids).to(self.device),
                                      do_sample=self.temperature > 0, temperature=self.temperature or None,
                                      max_new_tokens=new, pad_token_id=pad)
        return self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
