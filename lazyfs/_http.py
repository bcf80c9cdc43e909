"""A small thread-safe HTTP/1.1 client: keep-alive connection pools, bounded retries.

Used by the blob sources (called from FUSE worker threads) and the registry client. Every
request finishes in bounded time: each attempt has a socket timeout, and attempts are
limited, with exponential backoff between them. 5xx, 429, timeouts and connection errors
are retried; other statuses are returned to the caller.
"""
from __future__ import annotations

import http.client
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO
from urllib.parse import urljoin, urlsplit

from .errors import SourceUnavailableError

REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class RetryPolicy:
    """At most `attempts` tries; sleeps base_delay * 2**n (capped, jittered) in between."""

    attempts: int = 4
    base_delay: float = 0.1
    max_delay: float = 2.0
    timeout: float = 5.0           # per attempt: connect, and each socket read

    def delay(self, attempt: int) -> float:
        d = min(self.max_delay, self.base_delay * (2 ** attempt))
        return d * (0.75 + random.random() / 2)

    @property
    def worst_case_s(self) -> float:
        """Upper bound on the time one request can take (used for 'reads never hang')."""
        sleeps = sum(min(self.max_delay, self.base_delay * 2 ** i) * 1.25
                     for i in range(self.attempts - 1))
        return self.attempts * 2 * self.timeout + sleeps


@dataclass
class Stats:
    requests: int = 0
    bytes_received: int = 0
    retries: int = 0
    failures: int = 0
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "bytes_received": self.bytes_received,
                    "retries": self.retries, "failures": self.failures,
                    "last_error": self.last_error}


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]          # lower-case names
    body: bytes
    url: str


class _Retryable(Exception):
    pass


class HttpClient:
    """Requests against one base URL (and whatever it redirects to), pooled per host."""

    def __init__(self, base_url: str, *, headers: dict[str, str] | None = None,
                 retry: RetryPolicy | None = None, max_idle: int = 8,
                 unavailable: type[Exception] = SourceUnavailableError):
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.headers = dict(headers or {})
        self.retry = retry or RetryPolicy()
        self.max_idle, self.unavailable = max_idle, unavailable
        self.stats = Stats()
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    # -- connections ---------------------------------------------------------------------
    def _key(self, url: str) -> tuple[str, str, int]:
        p = urlsplit(url)
        port = p.port or (443 if p.scheme == "https" else 80)
        return p.scheme, p.hostname or "", port

    def _get_conn(self, key: tuple[str, str, int]) -> http.client.HTTPConnection:
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop()
        scheme, host, port = key
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        return cls(host, port, timeout=self.retry.timeout)

    def _put_conn(self, key: tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.max_idle:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.close()

    # -- requests ------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return path if "://" in path else self.base_url + path

    def _once(self, method: str, url: str, headers: dict[str, str],
              body: bytes | Callable[[], IO[bytes]] | None) -> Response:
        key = self._key(url)
        p = urlsplit(url)
        target = (p.path or "/") + (f"?{p.query}" if p.query else "")
        conn = self._get_conn(key)
        try:
            data = body() if callable(body) else body
            try:
                conn.request(method, target, body=data, headers=headers)
            finally:
                if data is not None and not isinstance(data, bytes):
                    data.close()
            r = conn.getresponse()
            payload = r.read()
            resp = Response(r.status, {k.lower(): v for k, v in r.getheaders()}, payload, url)
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise _Retryable(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from e
        if r.will_close:
            conn.close()
        else:
            self._put_conn(key, conn)
        with self.stats.lock:
            self.stats.requests += 1
            self.stats.bytes_received += len(payload)
        return resp

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                body: bytes | Callable[[], IO[bytes]] | None = None,
                what: str = "") -> Response:
        """Send with retries; returns the final non-retryable response.

        `body` is bytes or a callable opening a fresh file per attempt. Raises
        `self.unavailable` when every attempt failed with a retryable error.
        """
        hdrs = {**self.headers, **(headers or {})}
        url = self.url(path)
        last = ""
        for attempt in range(self.retry.attempts):
            if attempt:
                with self.stats.lock:
                    self.stats.retries += 1
                time.sleep(self.retry.delay(attempt - 1))
            try:
                resp = self._follow(method, url, hdrs, body)
            except _Retryable as e:
                last = str(e)
                continue
            if resp.status >= 500 or resp.status == 429:
                last = f"HTTP {resp.status} {resp.body[:200]!r}"
                continue
            return resp
        msg = (f"{what or method + ' ' + url}: {self.base_url} failed {self.retry.attempts} "
               f"times, last: {last}")
        with self.stats.lock:
            self.stats.failures += 1
            self.stats.last_error = msg
        raise self.unavailable(msg)

    def _follow(self, method: str, url: str, hdrs: dict[str, str],
                body: bytes | Callable[[], IO[bytes]] | None) -> Response:
        origin = self._key(url)
        for _ in range(5):
            resp = self._once(method, url, hdrs, body)
            if resp.status not in REDIRECTS or "location" not in resp.headers:
                return resp
            url = urljoin(url, resp.headers["location"])
            if self._key(url) != origin:          # never send our token to another host
                hdrs = {k: v for k, v in hdrs.items() if k.lower() != "authorization"}
        raise _Retryable(f"too many redirects from {url}")


def check_content_range(resp: Response, offset: int, length: int) -> None:
    """A 206 must carry exactly the requested range; raise ValueError otherwise."""
    cr = resp.headers.get("content-range", "")
    try:
        unit, _, rest = cr.partition(" ")
        span = rest.split("/")[0]
        start, end = (int(x) for x in span.split("-"))
    except ValueError:
        raise ValueError(f"bad Content-Range {cr!r}") from None
    if unit != "bytes" or start != offset or end != offset + length - 1:
        raise ValueError(f"asked for bytes {offset}-{offset + length - 1}, got {cr!r}")
