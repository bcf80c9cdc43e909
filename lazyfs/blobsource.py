"""Where blob bytes come from: the BlobSource protocol and its implementations.

* FileBlobSource: a local file (tests, `inspect`, a blob already on the node);
* RegistryBlobSource: an OCI distribution registry, GET /v2/NAME/blobs/DIGEST with Range;
* DispatcherBlobSource: the runtimed dispatcher's blob store, GET /v1/blobs/HEX with a
  bearer token (aiohttp's FileResponse honours Range).

Sources return raw bytes; the eStargz reader verifies every chunk against its TOC digest,
so a source never has to be trusted. HTTP sources reuse keep-alive connections, retry
5xx/timeouts/connection errors a bounded number of times, then raise
SourceUnavailableError, so a read never hangs. They are thread-safe.
"""
from __future__ import annotations

import os
import threading
from typing import Protocol, runtime_checkable

from ._http import HttpClient, RetryPolicy, check_content_range
from .errors import BlobNotFoundError, SourceError
from .toc import check_digest

__all__ = [
    "BlobSource",
    "DispatcherBlobSource",
    "FileBlobSource",
    "RegistryBlobSource",
    "RetryPolicy",
]


@runtime_checkable
class BlobSource(Protocol):
    """Random access to one immutable blob.

    Contract: `read(offset, length)` returns exactly `length` bytes starting at `offset`
    (0 <= offset, offset + length <= size()) or raises a SourceError subclass within a
    bounded time; it may be called from many threads at once. `stats()` reports at least
    `requests` and `bytes_received` (bytes that crossed the wire or the disk).
    """

    def size(self) -> int: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def describe(self) -> str: ...
    def stats(self) -> dict: ...
    def close(self) -> None: ...


def _check_range(offset: int, length: int, size: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"range [{offset}, +{length}) outside blob of {size} bytes")


class FileBlobSource:
    """A blob in a local file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobNotFoundError(f"no blob file {self.path}") from None
        self._size = os.fstat(self._fd).st_size
        self._lock = threading.Lock()
        self._requests = self._bytes = 0

    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        _check_range(offset, length, self._size)
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise SourceError(f"{self.path}: short read at {offset} (file changed?)")
        with self._lock:
            self._requests += 1
            self._bytes += length
        return data

    def describe(self) -> str:
        return f"file {self.path}"

    def stats(self) -> dict:
        with self._lock:
            return {"requests": self._requests, "bytes_received": self._bytes}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _HttpRangeSource:
    """A blob at one URL path on an HTTP server that honours Range."""

    def __init__(self, base_url: str, path: str, *, headers: dict[str, str],
                 size: int | None, retry: RetryPolicy | None, label: str):
        self.client = HttpClient(base_url, headers=headers, retry=retry)
        self.path, self.label = path, label
        self._size = size

    def describe(self) -> str:
        return self.label

    def size(self) -> int:
        if self._size is None:
            r = self.client.request("HEAD", self.path, what=f"HEAD {self.label}")
            self._raise_for(r.status, r.body)
            try:
                self._size = int(r.headers["content-length"])
            except (KeyError, ValueError):
                raise SourceError(f"{self.label}: HEAD gave no Content-Length") from None
        return self._size

    def _raise_for(self, status: int, body: bytes) -> None:
        if status == 404:
            raise BlobNotFoundError(f"{self.label}: not found (404)")
        if status >= 400:
            raise SourceError(f"{self.label}: HTTP {status} {body[:200]!r}")

    def read(self, offset: int, length: int) -> bytes:
        _check_range(offset, length, self.size())
        if length == 0:
            return b""
        r = self.client.request("GET", self.path,
                                headers={"Range": f"bytes={offset}-{offset + length - 1}"},
                                what=f"GET {self.label} bytes {offset}+{length}")
        self._raise_for(r.status, r.body)
        if r.status == 206:
            try:
                check_content_range(r, offset, length)
            except ValueError as e:
                raise SourceError(f"{self.label}: {e}") from None
        elif not (r.status == 200 and offset == 0 and length == self.size()):
            raise SourceError(f"{self.label}: server ignored Range (HTTP {r.status})")
        if len(r.body) != length:
            raise SourceError(f"{self.label}: got {len(r.body)} bytes for a {length}-byte range")
        return r.body

    def stats(self) -> dict:
        return self.client.stats.as_dict()

    def close(self) -> None:
        self.client.close()


class RegistryBlobSource(_HttpRangeSource):
    """GET {registry}/v2/{name}/blobs/{digest} with Range (OCI distribution spec)."""

    def __init__(self, registry_url: str, name: str, digest: str, *, token: str = "",
                 size: int | None = None, retry: RetryPolicy | None = None):
        check_digest(digest, "layer digest")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        super().__init__(registry_url, f"/v2/{name}/blobs/{digest}", headers=headers,
                         size=size, retry=retry,
                         label=f"registry {registry_url.rstrip('/')}/{name}@{digest[:19]}")


class DispatcherBlobSource(_HttpRangeSource):
    """GET {dispatcher}/v1/blobs/{sha256 hex} with a bearer token."""

    def __init__(self, dispatcher_url: str, digest: str, token: str, *,
                 size: int | None = None, retry: RetryPolicy | None = None):
        hexd = digest.removeprefix("sha256:")
        check_digest("sha256:" + hexd, "blob digest")
        super().__init__(dispatcher_url, f"/v1/blobs/{hexd}",
                         headers={"Authorization": f"Bearer {token}"}, size=size, retry=retry,
                         label=f"dispatcher {dispatcher_url.rstrip('/')} blob {hexd[:12]}")
