"""The node's content-addressed chunk cache, shared by every lazy mount on the node.

Layout: ROOT/sha256/ab/abcdef... holds the uncompressed bytes of one verified chunk, named
by its chunkDigest; ROOT/tmp/ holds writes in progress. A chunk file appears only by
rename after its digest was checked, so a reader never sees a partial or unverified chunk,
and several mount processes may fill the cache at once (the same digest means the same
bytes: the last rename wins harmlessly). Files are trusted on read: the directory is
root-owned like the layer store next to it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .errors import DigestMismatchError
from .toc import check_digest

__all__ = ["ChunkCache"]


class ChunkCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        hexd = check_digest(digest, "chunk digest")[len("sha256:"):]
        return self.root / "sha256" / hexd[:2] / hexd

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def read(self, digest: str, offset: int = 0, length: int = -1) -> bytes | None:
        """Bytes [offset, offset+length) of a cached chunk (all when length < 0), or None."""
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            if length < 0:
                length = os.fstat(fd).st_size - offset
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def put(self, digest: str, data: bytes, *, verified: bool = False) -> Path:
        """Store `data` as chunk `digest` (checked here unless the caller just did)."""
        final = self.path(digest)
        if final.exists():
            return final
        if not verified:
            actual = "sha256:" + hashlib.sha256(data).hexdigest()
            if actual != digest:
                raise DigestMismatchError("chunk put into the cache", digest, actual)
        final.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.rename(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return final

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("sha256/??/*"))

    def prune(self, max_bytes: int) -> int:
        """Delete least recently modified chunks until at most `max_bytes` remain.

        Safe while mounts run: a mount that needs a pruned chunk fetches it again.
        Returns the number of bytes freed.
        """
        files = []
        for p in self.root.glob("sha256/??/*"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(s for _, s, _ in files)
        freed = 0
        for _, size, p in sorted(files, key=lambda t: t[0]):
            if total - freed <= max_bytes:
                break
            p.unlink(missing_ok=True)
            freed += size
        return freed
