"""Content-addressed blobs (function pickles, layer archives, local files): sha256 → bytes.

`LocalBlobStore` is the dispatcher's store on disk; `HttpBlobSource` is how a
node reads and writes it over the dispatcher API, with a local cache.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import AsyncIterator, Callable, Protocol

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

    async def ingest(self, chunks: AsyncIterator[bytes], digest: str,
                     corrupt: Callable[[str], Exception]) -> Path:
        """Stream `chunks` into the store as `digest`, verifying the sha256 on the way;
        `corrupt(actual)` is raised (and nothing kept) when the content does not match."""
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    h.update(chunk)
                    f.write(chunk)
            if h.hexdigest() != digest:
                raise corrupt(h.hexdigest())
            self.adopt_file(Path(tmp), digest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return self.path(digest)

    def adopt_file(self, tmp: Path, digest: str) -> None:
        """Move a fully written, already verified temp file in as `digest`."""
        final = self.path(digest)
        final.parent.mkdir(exist_ok=True)
        os.rename(tmp, final)

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
        async with self._s().get(f"{self.base_url}/v1/blobs/{digest}") as r:
            if r.status == 404:
                raise NotFoundError(f"blob {digest} is not in the dispatcher's store")
            r.raise_for_status()
            return await self.cache.ingest(
                r.content.iter_chunked(1 << 20), digest,
                lambda got: InvalidError(f"blob {digest} arrived corrupted (sha256 {got})"))

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
