"""A model behind an OpenAI-compatible chat-completions endpoint: the client of `eval.py --endpoint`
and of the judge model.

    ep = Endpoint("http://localhost:8000/v1", "my-model", cache_dir="runs/eval/cache")
    ep.check()                                                       # reachable? (before any work)
    texts = ep.complete([(item name, messages, sampling), ...])      # one reply text per request

`url` is the API base (it ends in /v1 for OpenAI, vLLM, SGLang and `transformers serve`); each
request is POSTed to `url/chat/completions` with `messages` in the OpenAI chat format (images as
data URLs: `prompting.chat_messages`) and `sampling` ({"temperature", "max_tokens", "seed", ...})
merged into the body. What it assumes and guarantees:
- The API key comes from the environment variable named `api_key_env` (when it is set) and is sent
  as a Bearer header to `url`'s host only: a redirect is never followed (it would carry the key
  elsewhere; the error names the new address), and the key is in no cache key, file, log line or
  error message (a reply that echoes it has it replaced by "[API key]").
- Each request is bounded as a whole: `timeout` seconds from connecting to the last byte of the
  reply (a watchdog closes the connection at the deadline, so a server dripping a byte at a time
  cannot hold it), and `max_reply_bytes` in size (a larger reply is an error, read no further).
- Up to `concurrency` requests are in flight at once (threads: the work is waiting on the network).
- A 429, a 5xx, a refused, dropped or cut-off connection, a reply that is not HTTP and a timeout are
  retried up to `retries` times, waiting `backoff * 2**k` seconds (a 429's Retry-After when it
  says longer; at most 60 s); each retry is counted in `stats`. Other failures (another 4xx, a
  redirect, a reply that is not JSON or has no text in `choices[0].message.content`, one too
  large) are not retried.
- A request that still fails raises one `EndpointError` naming the item, the endpoint and why.
  Replies that arrived before it are already in the cache, so a re-run asks only for the rest.
  Ctrl-C stops at once: nothing more is sent, connections in flight are closed, and the
  KeyboardInterrupt goes on to the caller (eval.py: exit 130, one line).
- The cache (`cache_dir`, optional; a folder of ours, checked writable when the client is made)
  keeps one small JSON file per reply, named by the SHA-256 of (endpoint URL, model, messages
  (image bytes included, as data URLs), sampling settings), written atomically as each reply
  arrives: a second identical run sends no request (`stats["requests"] == 0`, `stats["cached"]`
  counts the answers taken from it); another server under the same model name is asked anew; a
  damaged entry is asked again. Identical requests in one call are sent once.
- A reply's text with lone UTF-16 surrogates (invalid Unicode, e.g. "\\ud800") has them replaced
  by U+FFFD, so it can be written and scored.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import socket
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from ..files import own_dir, write_atomic

RETRIED_STATUS = {429, 500, 502, 503, 504}
MAX_REPLY_BYTES = 16 << 20           # a chat completion is kilobytes; 16 MiB leaves room for long ones


class EndpointError(RuntimeError):
    """A request that failed for good; the message names the item and the endpoint."""


class _Retry(Exception):
    """A failure worth another attempt: why, and the least wait before it (a 429's Retry-After)."""

    def __init__(self, why: str, wait_s: float = 0.0):
        super().__init__(why)
        self.why, self.wait_s = why, wait_s


def check_url(url: str, flag: str = "--endpoint") -> str:
    """`url` without a trailing slash; a ValueError unless it is a well-formed http(s) address."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{flag} {url!r} is not an http:// or https:// address (e.g. http://localhost:8000/v1)")
    try:
        parts = urlsplit(url)
        parts.port                                   # noqa: B018  (raises on a port that is not a number)
    except ValueError as e:
        raise ValueError(f"{flag} {url!r} is not a well-formed address ({e})") from None
    if not parts.hostname:
        raise ValueError(f"{flag} {url!r} names no host")
    return url.rstrip("/")


def _clean(text: str) -> str:
    """text with each lone surrogate (invalid Unicode; JSON joins valid pairs) replaced by U+FFFD."""
    return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)


class Endpoint:
    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 timeout: float = 120.0, retries: int = 4, backoff: float = 1.0, cache_dir: str | Path | None = None,
                 max_reply_bytes: int = MAX_REPLY_BYTES):
        if not model:
            raise ValueError(f"endpoint {url}: name the model it serves (--model / --judge-model)")
        if concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError(f"endpoint {url}: concurrency >= 1, retries >= 0, timeout > 0 and backoff >= 0 "
                             f"(got {concurrency}, {retries}, {timeout}, {backoff})")
        self.url, self.model = check_url(url), model
        parts = urlsplit(self.url)
        self._host, self._port, self._https = parts.hostname, parts.port, parts.scheme == "https"
        self._path = parts.path.rstrip("/")
        self._key = os.environ.get(api_key_env) if api_key_env else None
        self.concurrency, self.timeout, self.retries, self.backoff = concurrency, timeout, retries, backoff
        self.max_reply_bytes = max_reply_bytes
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir is not None:               # found now, not after paying for the first reply
            try:
                own_dir(self.cache_dir)
                with tempfile.NamedTemporaryFile(dir=self.cache_dir, prefix=".probe-"):
                    pass
            except OSError as e:
                raise ValueError(f"endpoint cache {self.cache_dir} cannot be written ({e})") from None
        self.stats = {"requests": 0, "retries": 0, "cached": 0}
        self._lock, self._stop, self._live = threading.Lock(), threading.Event(), set()

    def describe(self) -> dict:
        """What eval.json records of this endpoint (never the key)."""
        return {"url": self.url, "model": self.model, "api_key": "set" if self._key else "none", **self.stats}

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[API key]") if self._key else text

    # ------------------------------------------------------------------ cache
    def key(self, messages: list, sampling: dict) -> str:
        blob = json.dumps({"url": self.url, "model": self.model, "messages": messages, "sampling": sampling},
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()

    def _cache_file(self, key: str) -> Path | None:
        return self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir else None

    def _cached(self, key: str) -> str | None:
        f = self._cache_file(key)
        if f is None or not f.is_file():
            return None
        try:
            content = json.loads(f.read_text(encoding="utf-8"))["content"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return content if isinstance(content, str) else None     # a damaged entry is asked again, not trusted

    # ------------------------------------------------------------------ requests
    def check(self) -> None:
        """Whether the server answers at all (GET url/models, any HTTP status will do), retried as
        a request is: an EndpointError now, before any completion is made for nothing."""
        for attempt in range(self.retries + 1):
            try:
                self._http("GET", "/models", None, {})
                return
            except _Retry as e:
                if attempt == self.retries:
                    raise EndpointError(f"endpoint {self.url} (model {self.model}) does not answer: {e.why}; "
                                        f"gave up after {self.retries + 1} attempt(s)") from None
                time.sleep(min(self.backoff * 2 ** attempt, 60.0))

    def complete(self, requests: list[tuple[str, list, dict]], desc: str = "") -> list[str]:
        """The reply text of each (item name, messages, sampling), in order (see the module docstring)."""
        self._stop.clear()
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
            pool = ThreadPoolExecutor(self.concurrency)
            try:
                futures = {pool.submit(self._one, *requests[i], k): k for k, i in todo.items()}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    bar.update(len(done))
                    failed = next((f for f in done if f.exception() is not None), None)
                    if failed is not None:            # stop asking; what finished is in the cache
                        raise failed.exception()
                    for f in done:
                        replies[futures[f]] = f.result()
            except KeyboardInterrupt:                 # Ctrl-C: nothing more is sent, nothing waited for
                self._stop.set()
                with self._lock:
                    for conn in list(self._live):
                        _abort(conn)
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            except BaseException:                     # a request failed for good: no new request; the
                self._stop.set()                      # ones in flight finish and are cached
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            finally:
                bar.close()
            pool.shutdown(wait=True)
        return [replies[k] for k in keys]

    def _one(self, item: str, messages: list, sampling: dict, key: str) -> str:
        body = json.dumps({"model": self.model, "messages": messages, **sampling}).encode("utf-8", "surrogatepass")
        headers = {"Content-Type": "application/json"}
        where = f"{item}: endpoint {self.url} (model {self.model})"
        for attempt in range(self.retries + 1):
            if self._stop.is_set():
                raise EndpointError(f"{where}: stopped")
            with self._lock:
                self.stats["requests"] += 1
            try:
                status, head, raw = self._http("POST", "/chat/completions", body, headers)
            except _Retry as e:
                why, wait_s = e.why, self.backoff * 2 ** attempt
            else:
                if 200 <= status < 300:
                    break
                if 300 <= status < 400:
                    raise EndpointError(f"{where}: HTTP {status} redirects to {self._redact(head.get('Location', '?'))}; "
                                        "not followed (the API key would go along): give that address instead") from None
                why = f"HTTP {status}: {self._redact(raw[:300].decode('utf-8', 'replace'))}"
                if status not in RETRIED_STATUS:
                    raise EndpointError(f"{where}: {why}") from None
                wait_s = self.backoff * 2 ** attempt
                after = head.get("Retry-After", "") or ""
                if after.replace(".", "", 1).isdigit():
                    wait_s = max(wait_s, float(after))
            if attempt == self.retries:
                raise EndpointError(f"{where}: {why}; gave up after {self.retries + 1} attempt(s)") from None
            with self._lock:
                self.stats["retries"] += 1
            if self._stop.wait(min(wait_s, 60.0) * (1 + 0.1 * random.random())):
                raise EndpointError(f"{where}: stopped")
        content = _clean(_content(raw, where, self._redact))
        f = self._cache_file(key)
        if f is not None:
            with self._lock:                 # a folder of ours, listed in the cache's marker (files.py)
                own_dir(f.parent)
            write_atomic(f, json.dumps({"item": item, "url": self.url, "model": self.model, "content": content}))
        return content

    def _http(self, method: str, path: str, body: bytes | None, headers: dict):
        """One request to this endpoint's host: (status, headers, body bytes), bounded as a whole
        by `timeout` and in size by `max_reply_bytes` (EndpointError); a connection-level failure
        or a timeout raises _Retry."""
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout)
        fired = threading.Event()
        timer = threading.Timer(self.timeout, lambda: (fired.set(), _abort(conn)))
        with self._lock:
            self._live.add(conn)
        timer.start()
        try:
            if self._key:
                headers = {**headers, "Authorization": f"Bearer {self._key}"}
            conn.request(method, self._path + path, body=body, headers=headers)
            resp = conn.getresponse()
            chunks, size = [], 0
            while chunk := resp.read1(1 << 16):
                size += len(chunk)
                if size > self.max_reply_bytes:
                    raise EndpointError(f"endpoint {self.url}: the reply is larger than {self.max_reply_bytes} bytes; "
                                        "not read further")
                chunks.append(chunk)
            if resp.length:                  # the connection ended before Content-Length bytes came
                raise http.client.IncompleteRead(b"".join(chunks), resp.length)
            if fired.is_set():
                raise TimeoutError
            return resp.status, resp.headers, b"".join(chunks)
        except (OSError, http.client.HTTPException) as e:
            if fired.is_set() or isinstance(e, (socket.timeout, TimeoutError)):
                raise _Retry(f"no reply within {self.timeout:g} s") from None
            if isinstance(e, http.client.IncompleteRead):
                raise _Retry("the reply was cut off mid-body") from None
            if isinstance(e, http.client.BadStatusLine) and not isinstance(e, http.client.RemoteDisconnected):
                raise _Retry(f"the reply is not HTTP ({self._redact(repr(e.args[0] if e.args else e))[:80]})") from None
            raise _Retry(f"connection failed ({self._redact(str(e))})") from None
        finally:
            timer.cancel()
            conn.close()
            with self._lock:
                self._live.discard(conn)


def _abort(conn) -> None:
    """Close a connection under a thread blocked in it (its recv returns at once)."""
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _content(raw: bytes, where: str, redact=lambda t: t) -> str:
    """choices[0].message.content of a chat-completions reply; an EndpointError naming `where` otherwise."""
    try:
        reply = json.loads(raw)
        content = reply["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise EndpointError(f"{where}: the reply is not a chat completion with choices[0].message.content: "
                            f"{redact(raw[:300].decode('utf-8', 'replace'))!r}") from None
    if not isinstance(content, str):      # null content (e.g. only a refusal field or tool calls)
        raise EndpointError(f"{where}: the reply's message content is {content!r}, not text")
    return content
