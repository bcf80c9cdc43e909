"""A lazy mount's working set as real files: a local dir stacked above the FUSE mount.

A layer blob with a recorded working set (the prioritized area before the prefetch
landmark) is prefetched at mount time. Serving those files through the FUSE server still
costs a userspace round trip per read, so the mount server also writes them into a plain
local directory (the "ws dir") with the layer's paths, owners, modes, mtimes and xattrs,
and the node stacks that directory ABOVE the FUSE mount as an extra overlay lower dir:

    lowerdir=...:<ws dir>:<FUSE mount>:<layers below>

overlayfs then serves working-set files from the local filesystem in the kernel, and only
misses (files, and the rest of the directories' entries) go to FUSE. The union is the
layer because the ws dir holds only regular files, symlinks and the directories on their
paths, each as in the TOC, and never an overlay whiteout or opaque marker (an opaque dir
in the ws dir would hide the FUSE layer's other entries; the FUSE layer keeps hiding what
it hides below it).

`plan_workset` is pure; `WorksetWriter` (fed by the prefetch as it decodes chunks) and
`write_workset` write into a temp dir next to the destination and rename it into place, so the ws dir exists only when complete: a node decides by its
existence whether a new container gets it. It refuses any name that is not a clean
relative path (the TOC's names were already checked by build_tree; the check is repeated
so a hand-made tree cannot escape), creates every parent itself and every file with
O_EXCL|O_NOFOLLOW, so nothing is written outside the destination.
"""
from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import UnsafeEntryError
from .reader import apply_attrs
from .toc import clean_name
from .tree import Chunk, Tree

__all__ = ["WorksetPlan", "WorksetStats", "WorksetWriter", "plan_workset", "write_workset"]

@dataclass(frozen=True)
class WorksetPlan:
    dirs: tuple[str, ...]         # parents first
    files: tuple[str, ...]        # regular files (every name of a hard-linked inode)
    symlinks: tuple[str, ...]     # symlinks whose target is a file of the working set

    @property
    def empty(self) -> bool:
        return not self.files


@dataclass(frozen=True)
class WorksetStats:
    files: int
    symlinks: int
    dirs: int
    bytes: int
    seconds: float


def _resolve(link: str, target: str) -> str | None:
    """The layer path a symlink at `link` names (lexically, one hop), or None."""
    base = "" if target.startswith("/") else link.rpartition("/")[0]
    parts: list[str] = []
    for p in f"{base}/{target}".split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if parts:
                parts.pop()
            continue
        parts.append(p)
    return "/".join(parts) or None


def plan_workset(tree: Tree) -> WorksetPlan:
    """Pure: what the ws dir holds for `tree`: its prioritized regular files, every other
    name of those inodes (so link counts match the layer), the symlinks pointing at them,
    and the directories on all their paths."""
    wanted = {tree.paths[n] for n in tree.prioritized if n in tree.paths}
    wanted = {i for i in wanted if tree.nodes[i].is_reg}
    files, symlinks = [], []
    for name, ino in tree.paths.items():
        node = tree.nodes[ino]
        if ino in wanted:
            files.append(name)
        elif stat.S_ISLNK(node.mode):
            target = _resolve(name, node.link_target)
            if target is not None and tree.paths.get(target) in wanted:
                symlinks.append(name)
    dirs: set[str] = set()
    for name in files + symlinks:
        parent = name.rpartition("/")[0]
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
    return WorksetPlan(dirs=tuple(sorted(dirs)), files=tuple(sorted(files)),
                       symlinks=tuple(sorted(symlinks)))


def _checked(name: str) -> str:
    if not name or clean_name(name) != name:
        raise UnsafeEntryError(name, "not a clean relative path inside the layer")
    return name


class WorksetWriter:
    """Builds the ws dir for `plan` in a temp dir beside `dest` (which must not exist).

    Construction creates the directories and the symlinks (regular files are created by
    their first write);
    `chunk(c, data)` writes a verified chunk into every working-set file holding it, as the
    prefetch decodes it (so the data is written once, straight from memory; several
    threads may call it at once, each place is written once); `finish` (after the last
    `chunk` call returned) reads the chunks no `chunk` call brought (e.g. already in the
    chunk cache), gives every entry its attributes and renames the dir into place;
    `abort` removes it.

    Files are not fsynced: the ws dir is a cache a node rebuilds at every mount (it deletes
    a leftover before mounting), never the only copy of anything.
    """

    def __init__(self, tree: Tree, plan: WorksetPlan, dest: str | os.PathLike):
        self.t0 = time.monotonic()
        self.tree, self.plan, self.dest = tree, plan, Path(dest)
        if self.dest.exists():
            raise FileExistsError(f"working set dir {self.dest} already exists")
        self.tmp = self.dest.with_name(f".tmp-{self.dest.name}-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.mkdir(self.tmp, 0o700)
        self.owner = os.geteuid() == 0
        self.bytes = 0
        self.first: dict[int, str] = {}                  # inode -> the path written
        self.left: dict[int, set[int]] = {}              # inode -> file offsets still missing
        self.by_digest: dict[str, list[tuple[int, Chunk]]] = {}
        self.created: set[int] = set()
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}                   # inode -> fd of a file being written
        self._busy: dict[int, int] = {}                  # inode -> writes under way
        try:
            self._create()
        except BaseException:
            self.abort()
            raise

    def _create(self) -> None:
        root, tree = str(self.tmp), self.tree
        created = {""}

        def path_of(name: str) -> str:
            _checked(name)
            if name.rpartition("/")[0] not in created:
                raise UnsafeEntryError(name, "its parent is not a directory of the working set")
            return os.path.join(root, name)
        for name in self.plan.dirs:
            path = path_of(name)
            if not tree.nodes[tree.paths[name]].is_dir:
                raise UnsafeEntryError(name, "is not a directory in the layer")
            os.mkdir(path, 0o700)
            created.add(name)
        for name in self.plan.files + self.plan.symlinks:
            path = path_of(name)
            node = tree.nodes[tree.paths[name]]
            if node.ino in self.first:
                continue                                 # other names: linked in finish
            if stat.S_ISLNK(node.mode):
                os.symlink(node.link_target, path)
            elif node.is_reg:              # created by its first write
                self.left[node.ino] = {c.file_offset for c in node.chunks}
                for c in node.chunks:
                    self.by_digest.setdefault(c.digest, []).append((node.ino, c))
            else:
                raise UnsafeEntryError(name, "only regular files and symlinks go to a working set")
            self.first[node.ino] = path

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
                fd = self._fds[ino] = os.open(self.first[ino], flags, 0o600)
                self.created.add(ino)
            left.discard(at.file_offset)
            self._busy[ino] = self._busy.get(ino, 0) + 1
            out.append((ino, at, fd))
        return out

    def _done(self, ino: int, n: int) -> None:
        """One write to `ino` ended (`n` bytes): its file is closed once nothing of it is
        left to write and no write is under way. Under the lock."""
        self.bytes += n
        self._busy[ino] -= 1
        if not self._busy[ino] and not self.left[ino]:
            del self._busy[ino]
            os.close(self._fds.pop(ino))

    def chunk(self, c: Chunk, data: bytes) -> None:
        """Write the verified chunk `c` wherever the working set holds it. Thread-safe:
        the prefetch's decoding threads call it at once (their pwrites run in parallel)."""
        with self._lock:
            places = self._take(c)
        for ino, at, fd in places:
            n = 0
            try:
                n = os.pwrite(fd, data, at.file_offset)
                if n != len(data):
                    raise OSError(f"short write to {self.first[ino]}: {n} of {len(data)} bytes")
            finally:
                with self._lock:
                    self._done(ino, n)

    def finish(self, read_chunk: Callable[[Chunk], bytes]) -> WorksetStats:
        """Complete and publish the dir; `read_chunk` returns a missing chunk's verified
        bytes. On failure the temp dir is removed and the error raised."""
        try:
            tree, root = self.tree, str(self.tmp)
            for ino in list(self.left):
                for c in tree.nodes[ino].chunks:
                    if c.file_offset in self.left[ino]:
                        self.chunk(c, read_chunk(c))
                if ino not in self.created:     # empty files
                    os.close(os.open(self.first[ino], os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                     | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
                    self.created.add(ino)
            self._close()
            for name in self.plan.files + self.plan.symlinks:
                node = tree.nodes[tree.paths[name]]
                path = os.path.join(root, name)
                if self.first[node.ino] != path:
                    os.link(self.first[node.ino], path, follow_symlinks=False)
                else:
                    apply_attrs(path, node, self.owner, overlay_xattrs=False)
            # directories last and deepest first: creating their entries changed their mtimes
            for name in (*reversed(self.plan.dirs), ""):
                apply_attrs(os.path.join(root, name) if name else root,
                            tree.nodes[tree.paths[name]], self.owner, overlay_xattrs=False)
            os.rename(self.tmp, self.dest)
        except BaseException:
            self.abort()
            raise
        return WorksetStats(files=len(self.plan.files), symlinks=len(self.plan.symlinks),
                            dirs=len(self.plan.dirs), bytes=self.bytes,
                            seconds=round(time.monotonic() - self.t0, 3))

    def _close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
            self._busy.clear()
        for fd in fds:
            os.close(fd)

    def abort(self) -> None:
        self._close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_workset(tree: Tree, plan: WorksetPlan, read_chunk: Callable[[Chunk], bytes],
                  dest: str | os.PathLike) -> WorksetStats:
    """Write `plan` (from `plan_workset(tree)`) as the new directory `dest` at once, every
    chunk from `read_chunk` (verified bytes); atomic, see WorksetWriter."""
    return WorksetWriter(tree, plan, dest).finish(read_chunk)
