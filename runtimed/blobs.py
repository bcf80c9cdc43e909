"""Content-addressed blobs (function pickles, layer archives, local files): sha256 → bytes.

`LocalBlobStore` is the dispatcher's store on disk; `HttpBlobSource` is how a
node reads and writes it over the dispatcher API, with a local cache.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol

import aiohttp

from sdk.exception import InvalidError, NotFoundError

from .ids import is_hex_digest


class BlobSource(Protocol):
    """Where a node gets blobs it lacks and puts the layer archives it builds."""

    async def fetch(self, digest: str) -> Path: ...
    async def put_file(self, path: Path, digest: str) -> None: ...
    async def exists(self, digest: str) -> bool: ...


class LocalBlobStore:
    def __init__(self, root: Path):
        self.root = root
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if not is_hex_digest(digest):
            raise InvalidError(f"not a sha256 hex digest: {digest[:80]!r}")
        return self.root / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def put_bytes(self, data: bytes, expected: str | None = None) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if expected and expected != digest:
            raise InvalidError(f"blob digest mismatch: sent {expected}, content is {digest}")
        final = self.path(digest)
        if final.exists():
            return digest
        final.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        return digest

    def adopt_file(self, tmp: Path, digest: str) -> None:
        """Move a fully written, already verified temp file in as `digest`."""
        final = self.path(digest)
        final.parent.mkdir(exist_ok=True)
        os.rename(tmp, final)

    def get_bytes(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"no blob {digest}") from None

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("??/*"))


class HttpBlobSource:
    """A node's view of the dispatcher's blob store, with a local content-addressed cache."""

    def __init__(self, base_url: str, token: str, cache: Path):
        self.base_url, self.cache = base_url.rstrip("/"), LocalBlobStore(cache)
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session: aiohttp.ClientSession | None = None

    def _s(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers,
                                                  timeout=aiohttp.ClientTimeout(total=600))
        return self._session

    async def fetch(self, digest: str) -> Path:
        path = self.cache.path(digest)
        if path.exists():
            return path
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.cache.root / "tmp")
        try:
            async with self._s().get(f"{self.base_url}/v1/blobs/{digest}") as r:
                if r.status == 404:
                    raise NotFoundError(f"blob {digest} is not in the dispatcher's store")
                r.raise_for_status()
                with os.fdopen(fd, "wb") as f:
                    async for chunk in r.content.iter_chunked(1 << 20):
                        h.update(chunk)
                        f.write(chunk)
            if h.hexdigest() != digest:
                raise InvalidError(f"blob {digest} arrived corrupted (sha256 {h.hexdigest()})")
            self.cache.adopt_file(Path(tmp), digest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    async def put_file(self, path: Path, digest: str) -> None:
        with open(path, "rb") as f:
            async with self._s().put(f"{self.base_url}/v1/blobs/{digest}", data=f) as r:
                if r.status >= 400:
                    raise InvalidError(f"blob upload failed: {r.status} {await r.text()}")

    async def exists(self, digest: str) -> bool:
        async with self._s().head(f"{self.base_url}/v1/blobs/{digest}") as r:
            return r.status == 200

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
