"""A small synchronous HTTP client for the dispatcher API: keep-alive connection per
thread, bearer token, typed errors, retries on 429 (Retry-After) and on connection
failures of idempotent requests."""
from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.parse
from typing import Iterator

from .exception import AuthError, Error, from_wire

DEFAULT_URL = "http://127.0.0.1:8470"


def _token() -> str | None:
    if os.environ.get("RUNTIMED_TOKEN"):
        return os.environ["RUNTIMED_TOKEN"]
    path = os.environ.get("RUNTIMED_TOKEN_FILE",
                          os.path.join(os.environ.get("RUNTIMED_STATE", "/var/lib/runtimed"), "token"))
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


class Client:
    def __init__(self, url: str | None = None, token: str | None = None):
        self.url = (url or os.environ.get("RUNTIMED_URL") or DEFAULT_URL).rstrip("/")
        u = urllib.parse.urlsplit(self.url)
        if u.scheme != "http" or not u.hostname:
            raise Error(f"RUNTIMED_URL must be http://host:port, got {self.url!r}")
        self.host, self.port = u.hostname, u.port or 80
        self.token = token or _token()
        self._local = threading.local()

    def _conn(self, fresh: bool = False) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None or fresh:
            if c is not None:
                c.close()
            c = http.client.HTTPConnection(self.host, self.port, timeout=120)
            self._local.conn = c
        return c

    def _headers(self, extra: dict | None = None) -> dict:
        if not self.token:
            raise AuthError("no API token: set RUNTIMED_TOKEN or make /var/lib/runtimed/token "
                            "readable (it is created by `runtimectl up`)")
        h = {"Authorization": f"Bearer {self.token}"}
        h.update(extra or {})
        return h

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None, stream: bool = False, retries: int = 5):
        attempt = 0
        while True:
            attempt += 1
            conn = self._conn(fresh=attempt > 1)
            try:
                conn.request(method, path, body=body, headers=self._headers(headers))
                resp = conn.getresponse()
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                conn.close()
                self._local.conn = None
                if attempt <= retries and (method in ("GET", "HEAD", "PUT") or attempt == 1):
                    time.sleep(min(0.05 * 2 ** attempt, 2.0))
                    continue
                raise Error(f"cannot reach the runtimed dispatcher at {self.url}: {e}. "
                            "Is it running? (`runtimectl up`)") from None
            if resp.status == 429 and attempt <= retries:
                resp.read()
                time.sleep(float(resp.getheader("Retry-After") or 1))
                continue
            if resp.status >= 400:
                data = resp.read()
                try:
                    err = json.loads(data)["error"]
                except (ValueError, KeyError, TypeError):
                    err = {"code": "error", "message": f"HTTP {resp.status}: {data[:200]!r}"}
                raise from_wire(err)
            if stream:
                return resp
            data = resp.read()
            return data

    def json(self, method: str, path: str, body: dict | None = None, **kw) -> dict:
        raw = None if body is None else json.dumps(body).encode()
        hdr = {"Content-Type": "application/json"} if raw is not None else {}
        data = self.request(method, path, raw, hdr, **kw)
        return json.loads(data) if data else {}

    def json_bytes(self, method: str, path: str, data: bytes) -> dict:
        return json.loads(self.request(method, path, data,
                                       {"Content-Type": "application/octet-stream"}))

    def ndjson(self, path: str, body: dict) -> Iterator[dict]:
        resp = self.request("POST", path, json.dumps(body).encode(),
                            {"Content-Type": "application/json"}, stream=True)
        try:
            while line := resp.readline():
                yield json.loads(line)
        finally:
            resp.read()

    def blob_exists(self, digest: str) -> bool:
        conn = self._conn()
        try:
            conn.request("HEAD", f"/v1/blobs/{digest}", headers=self._headers())
            resp = conn.getresponse()
            resp.read()
        except (ConnectionError, http.client.HTTPException, OSError):
            self._local.conn = None
            return False
        if resp.status == 401:
            raise AuthError("wrong API token")
        return resp.status == 200

    def put_blob(self, digest: str, data: bytes) -> None:
        if not self.blob_exists(digest):
            self.request("PUT", f"/v1/blobs/{digest}", data,
                         {"Content-Type": "application/octet-stream"})


_default: Client | None = None
_lock = threading.Lock()


def default_client() -> Client:
    global _default
    with _lock:
        if _default is None:
            _default = Client()
        return _default


def reset_default_client() -> None:
    global _default
    with _lock:
        _default = None
