"""A lazy mount's working set as whole local files: the view's first data-only layer.

A layer blob with a recorded working set (the prioritized area before the prefetch
landmark) is prefetched at mount time. Serving those files through the FUSE server costs
a userspace round trip per read, so the mount server also writes each of them, complete,
into a local directory (the "data dir", on the node's tmpfs), under the path its meta-tree
stub redirects to (lazyfs.metatree): in the view

    lowerdir=<meta>::<data>::<FUSE mount>

a stub opened once its file is in the data dir reads from there, in the kernel; one
opened before (a start that did not wait for the working set) reads through FUSE, whose
reads of prefetched chunks wait for the prefetch rather than fetching them again.

Each file is written in a staging dir and renamed into place once complete, so a file in
the data dir is always whole and verified (every chunk was checked against its TOC digest
before it got here). Only data goes there: names, owners, modes, mtimes and xattrs come
from the meta tree. A hard-linked inode is stored once, under its canonical name.

`plan_workset` is pure; `WorksetWriter` (fed by the prefetch as it decodes chunks, from
several threads) and `write_workset` write the files. Every name is checked to be a clean
relative path, parents are created by the writer itself and files with
O_EXCL|O_NOFOLLOW, so nothing is written outside the data dir.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import UnsafeEntryError
from .metatree import canonical_name
from .toc import clean_name
from .tree import Chunk, Tree

__all__ = ["WorksetPlan", "WorksetStats", "WorksetWriter", "plan_workset", "write_workset"]


@dataclass(frozen=True)
class WorksetPlan:
    files: tuple[str, ...]        # canonical names of the non-empty regular files

    @property
    def empty(self) -> bool:
        return not self.files


@dataclass(frozen=True)
class WorksetStats:
    files: int
    bytes: int
    seconds: float


def plan_workset(tree: Tree) -> WorksetPlan:
    """Pure: the files of `tree`'s prioritized area that have data, each inode once, by
    the canonical name its meta-tree stubs redirect to; not the files prefetched in part
    (Tree.partial): a data-dir file must be whole, so those are read through FUSE, their
    prefetched chunks from the chunk cache."""
    partial = {tree.paths[n] for n in tree.partial}
    names = set()
    for name in tree.prioritized:
        ino = tree.paths.get(name)
        node = tree.nodes[ino] if ino is not None else None
        if node is not None and node.is_reg and node.size and ino not in partial:
            names.add(canonical_name(node))
    return WorksetPlan(files=tuple(sorted(names)))


def _checked(name: str) -> str:
    if not name or clean_name(name) != name:
        raise UnsafeEntryError(name, "not a clean relative path inside the layer")
    return name


class WorksetWriter:
    """Writes the files of `plan` into the data dir `dest` (created if missing).

    `chunk(c, data)` writes a verified chunk into every working-set file holding it, as the
    prefetch decodes it (the data is written once, straight from memory; several threads
    may call it at once, each place is written once); a file is renamed into place the
    moment its last chunk is written. `finish` (after the last `chunk` call returned)
    reads the chunks no `chunk` call brought (e.g. already in the chunk cache) and
    completes the rest; `abort` drops the files not complete yet (complete ones stay:
    they are whole and verified).

    Files are not fsynced: the data dir is a cache a node rebuilds at every mount, never
    the only copy of anything.
    """

    def __init__(self, tree: Tree, plan: WorksetPlan, dest: str | os.PathLike):
        self.t0 = time.monotonic()
        self.tree, self.plan, self.dest = tree, plan, Path(dest)
        self.bytes = 0
        self.published = 0
        self.name: dict[int, str] = {}                   # inode -> canonical name
        self.left: dict[int, set[int]] = {}              # inode -> file offsets still missing
        self.by_digest: dict[str, list[tuple[int, Chunk]]] = {}
        self.created: set[int] = set()
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}                   # inode -> fd of a file being written
        self._busy: dict[int, int] = {}                  # inode -> writes under way
        self._ready: dict[int, threading.Event] = {}     # inode -> set once published/aborted
        for name in plan.files:
            node = tree.nodes[tree.paths[_checked(name)]]
            if not node.is_reg:
                raise UnsafeEntryError(name, "only regular files go to a working set")
            self.name[node.ino] = name
            self._ready[node.ino] = threading.Event()
            self.left[node.ino] = {c.file_offset for c in node.chunks}
            for c in node.chunks:
                self.by_digest.setdefault(c.digest, []).append((node.ino, c))
        # names checked first: a hostile plan leaves nothing behind
        os.makedirs(self.dest, 0o700, exist_ok=True)
        self.staging = self.dest / f".staging-{os.getpid()}"
        shutil.rmtree(self.staging, ignore_errors=True)
        os.mkdir(self.staging, 0o700)

    def _take(self, c: Chunk) -> list[tuple[int, Chunk, int]]:
        """Claim the places `c` goes to that no one wrote yet: (inode, chunk there, fd);
        each file is created, exclusively, on its first claim. Under the lock."""
        out = []
        for ino, at in self.by_digest.get(c.digest, ()):
            left = self.left[ino]
            if at.file_offset not in left:
                continue
            fd = self._fds.get(ino)
            if fd is None:
                flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                if ino not in self.created:
                    flags |= os.O_CREAT | os.O_EXCL
                fd = self._fds[ino] = os.open(self.staging / str(ino), flags, 0o600)
                self.created.add(ino)
            left.discard(at.file_offset)
            self._busy[ino] = self._busy.get(ino, 0) + 1
            out.append((ino, at, fd))
        return out

    def _done(self, ino: int, n: int) -> bool:
        """One write to `ino` ended (`n` bytes): True when that completed the file (it is
        closed then and must be published). Under the lock."""
        self.bytes += n
        self._busy[ino] -= 1
        if not self._busy[ino] and not self.left[ino]:
            del self._busy[ino]
            os.close(self._fds.pop(ino))
            return True
        return False

    def _publish(self, ino: int) -> None:
        """Rename a complete file into place (its parents made here, never followed links:
        the data dir holds only what this writer made)."""
        name = self.name[ino]
        parent = name.rpartition("/")[0]
        if parent:
            os.makedirs(self.dest / parent, 0o700, exist_ok=True)
        os.rename(self.staging / str(ino), self.dest / name)
        with self._lock:
            self.published += 1
        self._ready[ino].set()

    def holds(self, ino: int) -> bool:
        return ino in self.name

    def settled(self, ino: int) -> bool:
        """Whether `wait_published(ino)` would return at once."""
        return self._ready[ino].is_set()

    def wait_published(self, ino: int, timeout: float | None = None) -> Path | None:
        """The data file of working-set inode `ino` once it is complete (blocks until then,
        or `timeout`); None if the writer failed or gave up first. For readers that reach
        the file through FUSE before it was written: they read it from here instead of
        fetching its chunks again."""
        if not self._ready[ino].wait(timeout):
            return None
        path = self.dest / self.name[ino]
        return path if not self.left[ino] and path.exists() else None

    def chunk(self, c: Chunk, data: bytes) -> None:
        """Write the verified chunk `c` wherever the working set holds it. Thread-safe:
        the prefetch's decoding threads call it at once (their pwrites run in parallel)."""
        with self._lock:
            places = self._take(c)
        for ino, at, fd in places:
            n, complete = 0, False
            try:
                n = os.pwrite(fd, data, at.file_offset)
                if n != len(data):
                    raise OSError(f"short write to {self.name[ino]}: {n} of {len(data)} bytes")
            finally:
                with self._lock:
                    complete = self._done(ino, n)
            if complete:
                self._publish(ino)

    def finish(self, read_chunk: Callable[[Chunk], bytes]) -> WorksetStats:
        """Complete every file; `read_chunk` returns a missing chunk's verified bytes. On
        failure the incomplete files are removed and the error raised."""
        try:
            for ino in list(self.left):
                for c in self.tree.nodes[ino].chunks:
                    if c.file_offset in self.left[ino]:
                        self.chunk(c, read_chunk(c))
            os.rmdir(self.staging)
        except BaseException:
            self.abort()
            raise
        return WorksetStats(files=self.published, bytes=self.bytes,
                            seconds=round(time.monotonic() - self.t0, 3))

    def _close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
            self._busy.clear()
        for fd in fds:
            os.close(fd)

    def abort(self) -> None:
        self._close()
        shutil.rmtree(self.staging, ignore_errors=True)
        for ev in self._ready.values():         # readers waiting fall back to the chunks
            ev.set()


def write_workset(tree: Tree, plan: WorksetPlan, read_chunk: Callable[[Chunk], bytes],
                  dest: str | os.PathLike) -> WorksetStats:
    """Write the files of `plan` (from `plan_workset(tree)`) into the data dir `dest` at
    once, every chunk from `read_chunk` (verified bytes); see WorksetWriter."""
    return WorksetWriter(tree, plan, dest).finish(read_chunk)
