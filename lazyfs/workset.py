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

`plan_workset` is pure; `write_workset` writes into a temp dir next to the destination and
renames it into place, so the ws dir exists only when complete: a node decides by its
existence whether a new container gets it. It refuses any name that is not a clean
relative path (the TOC's names were already checked by build_tree; the check is repeated
so a hand-made tree cannot escape), creates every parent itself and every file with
O_EXCL|O_NOFOLLOW, so nothing is written outside the destination.
"""
from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import UnsafeEntryError
from .reader import apply_attrs
from .toc import clean_name
from .tree import Node, Tree

__all__ = ["WorksetPlan", "WorksetStats", "plan_workset", "write_workset"]

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


def write_workset(tree: Tree, plan: WorksetPlan, read: Callable[[Node], Iterable[bytes]],
                  dest: str | os.PathLike) -> WorksetStats:
    """Write `plan` (from `plan_workset(tree)`) as the directory `dest`, which must not
    exist; `read(node)` yields a regular file's verified bytes. Atomic: built in a temp dir
    beside `dest`, renamed into place when complete; removed on any failure.

    Files are not fsynced: the ws dir is a cache a node rebuilds at every mount (it deletes
    a leftover before mounting), never the only copy of anything.
    """
    t0 = time.monotonic()
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"working set dir {dest} already exists")
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp, 0o700)
    owner = os.geteuid() == 0
    made: dict[int, str] = {}
    nbytes = 0
    try:
        root = str(tmp)
        created = {""}
        for name in plan.dirs:
            _checked(name)
            if name.rpartition("/")[0] not in created:
                raise UnsafeEntryError(name, "its parent is not a directory of the working set")
            if not tree.nodes[tree.paths[name]].is_dir:
                raise UnsafeEntryError(name, "is not a directory in the layer")
            os.mkdir(os.path.join(root, name), 0o700)
            created.add(name)
        for name in plan.files + plan.symlinks:
            _checked(name)
            if name.rpartition("/")[0] not in created:
                raise UnsafeEntryError(name, "its parent is not a directory of the working set")
            node = tree.nodes[tree.paths[name]]
            path = os.path.join(root, name)
            if node.ino in made:
                os.link(made[node.ino], path, follow_symlinks=False)
                continue
            if stat.S_ISLNK(node.mode):
                os.symlink(node.link_target, path)
            elif node.is_reg:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as f:
                    for piece in read(node):
                        f.write(piece)
                        nbytes += len(piece)
                made[node.ino] = path
            else:
                raise UnsafeEntryError(name, "only regular files and symlinks go to a working set")
            apply_attrs(path, node, owner, overlay_xattrs=False)
        # directories last and deepest first: creating their entries changed their mtimes
        for name in (*reversed(plan.dirs), ""):
            apply_attrs(os.path.join(root, name) if name else root,
                        tree.nodes[tree.paths[name]], owner, overlay_xattrs=False)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return WorksetStats(files=len(plan.files), symlinks=len(plan.symlinks), dirs=len(plan.dirs),
                        bytes=nbytes, seconds=round(time.monotonic() - t0, 3))
