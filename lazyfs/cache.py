"""The node's content-addressed chunk cache, shared by every lazy mount on the node.

Layout: ROOT/sha256/ab/abcdef... holds the uncompressed bytes of one verified chunk, named
by its chunkDigest; ROOT/tmp/ holds writes in progress; ROOT/pins/PID lists (one hex
digest a line) the chunks of the layer that mount server PID serves. A chunk file appears
only by rename after its digest was checked, so a reader never sees a partial or
unverified chunk, and several mount processes may fill the cache at once (the same digest
means the same bytes: the last rename wins harmlessly). Files are trusted on read: the
directory is root-owned like the layer store next to it.

Eviction is least recently used within a byte budget (`prune`). A chunk's mtime is its
last use: set when it is stored and touched the first time each mount process hits it.
Chunks pinned by a live mount server are never pruned, so a container reading a lazy
layer does not lose its working set under it.

A mount server stores the chunks it fetches on demand with `put_behind`: they are served
from memory at once and written by a background thread at the lowest CPU priority once
no chunk came for WRITE_QUIET_S (or the memory bound is half used), so a read waiting for
a chunk does not also wait for a new file on the node's disk, nor share the CPU and the
GIL with those writes (creating ~1,100 chunk files during an import-heavy start cost
0.65 s of its 3.6 s when written at once, measured with the bench's lazy_image; writing
them beside the start, at nice 19, still cost 0.4 s of a 2.3 s import in
/tmp/prof/lzh.py-style runs: the writer holds the GIL for its Python work).
"""
from __future__ import annotations

import collections
import hashlib
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import DigestMismatchError
from .toc import check_digest

__all__ = ["CacheUsage", "ChunkCache", "lowest_thread_priority"]

BEHIND_BYTES = 512 << 20      # chunks waiting for the background writer, at most
WRITE_QUIET_S = 0.5           # the writer starts once no chunk came for this long


@dataclass(frozen=True)
class CacheUsage:
    bytes: int
    chunks: int
    pinned_bytes: int
    freed_bytes: int = 0          # by the prune that measured this
    freed_chunks: int = 0


def lowest_thread_priority() -> None:
    """Nice 19 for the calling thread only (Linux schedules threads singly): for the mount
    server's background work (the cache writer, the prefetch's decoding threads), which
    yields to its other threads and the node's own work."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ChunkCache:
    def __init__(self, root: str | os.PathLike, *, write_behind: bool = True):
        self.root = Path(root)
        self.write_behind = write_behind     # False: put_behind stores at once (another
        #                                      process reads the chunks from disk)
        for d in ("tmp", "sha256", "pins"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._touched: set[str] = set()
        self._lock = threading.Lock()
        self._behind: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._behind_bytes = 0
        self._queue: queue.Queue[str] | None = None
        self._writer: threading.Thread | None = None
        self._last_put = 0.0
        self._flushing = False

    def path(self, digest: str) -> Path:
        hexd = check_digest(digest, "chunk digest")[len("sha256:"):]
        return self.root / "sha256" / hexd[:2] / hexd

    def has(self, digest: str) -> bool:
        with self._lock:
            if digest in self._behind:
                return True
        return self.path(digest).exists()

    def put_behind(self, digest: str, data: bytes) -> None:
        """Store verified chunk bytes: readable from memory now, on disk soon (see the
        module doc). Past BEHIND_BYTES waiting, stores at once instead."""
        with self._lock:
            self._last_put = time.monotonic()
            if digest in self._behind:
                return
            if self.write_behind and self._behind_bytes + len(data) <= BEHIND_BYTES:
                self._behind[digest] = data
                self._behind_bytes += len(data)
                if self._writer is None:
                    self._queue = queue.Queue()
                    self._writer = threading.Thread(target=self._write_behind, daemon=True,
                                                    name="lazyfs-cache-writer")
                    self._writer.start()
                assert self._queue is not None
                self._queue.put(digest)
                return
        self.put(digest, data, verified=True)

    def _write_behind(self) -> None:
        lowest_thread_priority()
        assert self._queue is not None
        while True:                         # a daemon thread: ends with the process
            digest = self._queue.get()
            self._wait_quiet()
            with self._lock:
                data = self._behind.get(digest)
            try:
                if data is not None:
                    self.put(digest, data, verified=True)
            except OSError:
                pass                        # a cache miss later, fetched again
            finally:
                with self._lock:
                    if self._behind.pop(digest, None) is not None:
                        self._behind_bytes -= len(data or b"")
                self._queue.task_done()

    def _wait_quiet(self) -> None:
        """Until no chunk came for WRITE_QUIET_S, the memory bound is half used or a
        flush wants everything written."""
        while True:
            with self._lock:
                left = self._last_put + WRITE_QUIET_S - time.monotonic()
                if left <= 0 or self._flushing or self._behind_bytes > BEHIND_BYTES // 2:
                    return
            time.sleep(min(left, 0.1))

    def flush(self) -> None:
        """Wait until every chunk given to put_behind is on disk (or failed to be)."""
        if self._queue is not None:
            self._flushing = True
            try:
                self._queue.join()
            finally:
                self._flushing = False

    def read(self, digest: str, offset: int = 0, length: int = -1) -> bytes | None:
        """Bytes [offset, offset+length) of a cached chunk (all when length < 0), or None."""
        with self._lock:
            data = self._behind.get(digest)
        if data is not None:
            return data[offset:] if length < 0 else data[offset:offset + length]
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            if length < 0:
                length = os.fstat(fd).st_size - offset
            if digest not in self._touched:      # LRU: once per process is enough
                self._touched.add(digest)
                os.utime(fd)
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

    # -- pins ------------------------------------------------------------------------------
    def pin(self, digests: list[str], pid: int | None = None) -> Path:
        """Record that process `pid` (default: this one) serves these chunks (digests as
        a parsed TOC gives them: already checked; on a lazy mount's path, 11,000 of them:
        checking each again cost ~5 of its 8 ms; paths are made by path(), which checks)."""
        path = self.root / "pins" / str(pid or os.getpid())
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(d[7:] + "\n" for d in dict.fromkeys(digests)
                               if d.startswith("sha256:")))
        os.replace(tmp, path)
        return path

    def unpin(self, pid: int | None = None) -> None:
        (self.root / "pins" / str(pid or os.getpid())).unlink(missing_ok=True)

    def pinned_by(self, pid: int) -> set[str]:
        """Chunk digests (sha256:...) pinned by `pid` (empty if none)."""
        try:
            text = (self.root / "pins" / str(pid)).read_text()
        except FileNotFoundError:
            return set()
        return {"sha256:" + h for h in text.split()}

    def pinned(self, *, exclude_pid: int | None = None) -> set[str]:
        """Chunks pinned by live mount servers; pin files of dead ones are removed."""
        out: set[str] = set()
        for p in (self.root / "pins").iterdir():
            if not p.name.isdigit():
                continue
            pid = int(p.name)
            if not _alive(pid):
                p.unlink(missing_ok=True)
            elif pid != exclude_pid:
                out |= self.pinned_by(pid)
        return out

    # -- size and eviction -----------------------------------------------------------------
    def _entries(self) -> list[tuple[float, int, str, Path]]:
        out = []
        for p in self.root.glob("sha256/??/*"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, "sha256:" + p.name, p))
        return out

    def total_bytes(self) -> int:
        return sum(size for _, size, _, _ in self._entries())

    def usage(self) -> CacheUsage:
        keep = self.pinned()
        entries = self._entries()
        return CacheUsage(bytes=sum(e[1] for e in entries), chunks=len(entries),
                          pinned_bytes=sum(e[1] for e in entries if e[2] in keep))

    def prune(self, max_bytes: int) -> int:
        """Delete least recently used unpinned chunks until at most `max_bytes` remain
        (or only pinned chunks are left). Returns the number of bytes freed."""
        return self.prune_usage(max_bytes).freed_bytes

    def prune_usage(self, max_bytes: int) -> CacheUsage:
        keep = self.pinned()
        entries = self._entries()
        total = sum(e[1] for e in entries)
        pinned = sum(e[1] for e in entries if e[2] in keep)
        freed = n = 0
        for _, size, digest, p in sorted(entries, key=lambda e: e[0]):
            if total - freed <= max_bytes:
                break
            if digest in keep:
                continue
            p.unlink(missing_ok=True)
            freed += size
            n += 1
        return CacheUsage(bytes=total - freed, chunks=len(entries) - n, pinned_bytes=pinned,
                          freed_bytes=freed, freed_chunks=n)

    def remove(self, digests: set[str]) -> int:
        """Delete these chunks unless a live mount pins them; returns bytes freed."""
        keep = self.pinned()
        freed = 0
        for d in digests - keep:
            p = self.path(d)
            try:
                freed += p.stat().st_size
                p.unlink()
            except FileNotFoundError:
                pass
        return freed
