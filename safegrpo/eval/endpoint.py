"""A model behind an OpenAI-compatible chat-completions endpoint: the client of `eval.py --endpoint`
and of the judge model.

    ep = Endpoint("http://localhost:8000/v1", "my-model", cache_dir="runs/eval/cache")
    texts = ep.complete([(item name, messages, sampling), ...])      # one reply text per request

`url` is the API base (it ends in /v1 for OpenAI, vLLM, SGLang and `transformers serve`); each
request is POSTed to `url/chat/completions` with `messages` in the OpenAI chat format (images as
data URLs: `prompting.chat_messages`) and `sampling` ({"temperature", "max_tokens", ...}) merged
into the body. What it assumes and guarantees:
- The API key comes from the environment variable named `api_key_env` (when it is set) and is sent
  as a Bearer token only: it is in no cache key, file, log line or error message.
- Up to `concurrency` requests are in flight at once (threads: the work is waiting on the network).
- A 429, a 5xx, a refused or dropped connection and a timeout (`timeout` seconds per request) are
  retried up to `retries` times, waiting `backoff * 2**k` seconds (a 429's Retry-After when it
  says longer; at most 60 s); each retry is counted in `stats`. Other failures (another 4xx, a reply
  that is not JSON or has no `choices[0].message.content`) are not retried.
- A request that still fails raises one `EndpointError` naming the item, the endpoint and why.
  Replies that arrived before it are already in the cache, so a re-run asks only for the rest.
- The cache (`cache_dir`, optional) keeps one small JSON file per reply, named by the SHA-256 of
  (model, messages (image bytes included, as data URLs), sampling settings), written atomically as
  each reply arrives: a second identical run sends no request (`stats["requests"] == 0`), and a
  crash loses only the replies still in flight. Identical requests in one call are sent once.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from tqdm import tqdm

from ..files import write_atomic

RETRIED_STATUS = {429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """A request that failed for good; the message names the item and the endpoint."""


def check_url(url: str, flag: str = "--endpoint") -> str:
    """`url` without a trailing slash; an error unless it is an http(s) address."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{flag} {url!r} is not an http:// or https:// address (e.g. http://localhost:8000/v1)")
    return url.rstrip("/")


class Endpoint:
    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 timeout: float = 120.0, retries: int = 4, backoff: float = 1.0, cache_dir: str | Path | None = None):
        if not model:
            raise ValueError(f"endpoint {url}: name the model it serves (--model / --judge-model)")
        if concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError(f"endpoint {url}: concurrency >= 1, retries >= 0, timeout > 0 and backoff >= 0 "
                             f"(got {concurrency}, {retries}, {timeout}, {backoff})")
        self.url, self.model = check_url(url), model
        self._key = os.environ.get(api_key_env) if api_key_env else None
        self.concurrency, self.timeout, self.retries, self.backoff = concurrency, timeout, retries, backoff
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.stats = {"requests": 0, "retries": 0, "cached": 0}
        self._lock = threading.Lock()

    def describe(self) -> dict:
        """What eval.json records of this endpoint (never the key)."""
        return {"url": self.url, "model": self.model, "api_key": "set" if self._key else "none", **self.stats}

    # ------------------------------------------------------------------ cache
    def key(self, messages: list, sampling: dict) -> str:
        blob = json.dumps({"model": self.model, "messages": messages, "sampling": sampling},
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _cache_file(self, key: str) -> Path | None:
        return self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir else None

    def _cached(self, key: str) -> str | None:
        f = self._cache_file(key)
        if f is None or not f.is_file():
            return None
        try:
            return json.loads(f.read_text(encoding="utf-8"))["content"]
        except (OSError, ValueError, KeyError):       # a damaged entry is asked again, not trusted
            return None

    # ------------------------------------------------------------------ requests
    def complete(self, requests: list[tuple[str, list, dict]], desc: str = "") -> list[str]:
        """The reply text of each (item name, messages, sampling), in order (see the module docstring)."""
        keys = [self.key(m, s) for _, m, s in requests]
        replies: dict[str, str] = {}
        todo: dict[str, int] = {}                     # key -> index of its first request
        for i, k in enumerate(keys):
            if k in replies or k in todo:
                continue
            hit = self._cached(k)
            if hit is None:
                todo[k] = i
            else:
                replies[k] = hit
                self.stats["cached"] += 1
        if todo:
            bar = tqdm(total=len(todo), desc=desc or self.model, leave=False, disable=len(todo) < 2)
            with ThreadPoolExecutor(self.concurrency) as pool:
                futures = {pool.submit(self._one, *requests[i], k): k for k, i in todo.items()}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    bar.update(len(done))
                    failed = next((f for f in done if f.exception() is not None), None)
                    if failed is not None:            # stop asking; what finished is in the cache
                        for f in pending:
                            f.cancel()
                        wait(pending)
                        bar.close()
                        raise failed.exception()
                    for f in done:
                        replies[futures[f]] = f.result()
            bar.close()
        return [replies[k] for k in keys]

    def _one(self, item: str, messages: list, sampling: dict, key: str) -> str:
        body = json.dumps({"model": self.model, "messages": messages, **sampling}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        where = f"{item}: endpoint {self.url} (model {self.model})"
        for attempt in range(self.retries + 1):
            wait_s, why = self.backoff * 2 ** attempt, None
            try:
                with self._lock:
                    self.stats["requests"] += 1
                req = urllib.request.Request(f"{self.url}/chat/completions", data=body, headers=headers)
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                why = f"HTTP {e.code} {e.reason}: {detail}"
                if e.code not in RETRIED_STATUS:
                    raise EndpointError(f"{where}: {why}") from None
                after = e.headers.get("Retry-After", "") if e.headers else ""
                if after.replace(".", "", 1).isdigit():
                    wait_s = max(wait_s, float(after))
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                why = f"no reply within {self.timeout:g} s" if isinstance(reason, (socket.timeout, TimeoutError)) \
                    else f"connection failed ({reason})"
            if attempt == self.retries:
                raise EndpointError(f"{where}: {why}; gave up after {self.retries + 1} attempt(s)") from None
            with self._lock:
                self.stats["retries"] += 1
            time.sleep(min(wait_s, 60.0) * (1 + 0.1 * random.random()))
        content = _content(raw, where)
        f = self._cache_file(key)
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(f, json.dumps({"item": item, "model": self.model, "content": content}, ensure_ascii=False))
        return content


def _content(raw: bytes, where: str) -> str:
    """choices[0].message.content of a chat-completions reply; an EndpointError naming `where` otherwise."""
    try:
        reply = json.loads(raw)
        content = reply["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise EndpointError(f"{where}: the reply is not a chat completion with choices[0].message.content: "
                            f"{raw[:300].decode('utf-8', 'replace')!r}") from None
    if not isinstance(content, str):      # null content (e.g. only a refusal field or tool calls)
        raise EndpointError(f"{where}: the reply's message content is {content!r}, not text")
    return content
