"""A lazy layer's metadata as a local tree, so the kernel answers every lookup and readdir.

A container's overlay merges each directory across its lower layers, so with the FUSE
mount as a lower dir every name a Python import probes (and every directory it lists)
became a request to the userspace server (~1,400 for the heavy stack, 100-200 us each).
Instead, the mount server writes the whole layer's metadata, from the TOC, as a directory
on a tmpfs (the "meta tree"), and the node mounts a read-only overlay (the "view"):

    lowerdir=<meta>::<data>::<FUSE mount>,metacopy=on

The meta tree holds every directory, symlink and fifo as it is in the layer, and every
non-empty regular file as an overlay *metacopy* stub: a sparse file with the right size,
owner, mode, mtime and xattrs, whose `trusted.overlay.redirect` names the file's path in
the data-only layers below. `::` makes `<data>` (the working-set files, written whole as
the prefetch decodes them, lazyfs.workset) and the FUSE mount data-only layers: never
merged into the view's directories, looked up only when a stub is opened (kernel >= 6.5
looks data up lazily, at open), `<data>` first. So metadata never reaches FUSE; data does
only for files outside the working set.

The view is itself a lower dir of the container's overlay (overlays stack two deep), and
the container's overlay keeps metacopy off: its upper dir never gets stubs. The layer's
overlay markers must reach that outer overlay, so they are written escaped
(`trusted.overlay.overlay.*`, which the view shows as `trusted.overlay.*`, kernel >= 6.7):
opaque dirs as `opaque=y`, and whiteouts (0/0 char devices in the layer) as empty files
with `whiteout` in a directory marked `opaque=x`; a real 0/0 device in the meta tree would
be the view's own whiteout and hide the entry from the container.

`write_metatree` is atomic (temp dir, then rename): a node mounts the view only over a
complete tree. Names are checked again (the TOC's were checked by build_tree), every
entry is created exclusively without following links, so nothing lands outside `dest`.
"""
from __future__ import annotations

import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UnsafeEntryError
from .reader import apply_attrs
from .toc import clean_name
from .tree import OPAQUE_XATTR, Node, Tree

__all__ = ["MetaTreeStats", "canonical_name", "dir_markers", "is_whiteout", "stub_xattrs",
           "view_options", "write_metatree"]

OVERLAY_PREFIX = "trusted.overlay."
ESCAPED_PREFIX = "trusted.overlay.overlay."
METACOPY_XATTR = "trusted.overlay.metacopy"
REDIRECT_XATTR = "trusted.overlay.redirect"
XWHITEOUT_XATTR = ESCAPED_PREFIX + "whiteout"
XOPAQUE_XATTR = ESCAPED_PREFIX + "opaque"


@dataclass(frozen=True)
class MetaTreeStats:
    entries: int
    stubs: int
    whiteouts: int
    seconds: float


def canonical_name(node: Node) -> str:
    """The path a regular file's data is found at in the data-only layers: its first name
    (hard links redirect there too; the working-set writer stores data under it)."""
    return node.name


def is_whiteout(node: Node) -> bool:
    return stat.S_ISCHR(node.mode) and node.rdev == 0


def escaped(key: str) -> str:
    """A layer xattr as the meta tree stores it: overlay markers escaped for the outer overlay."""
    return ESCAPED_PREFIX + key[len(OVERLAY_PREFIX):] if key.startswith(OVERLAY_PREFIX) else key


def stub_xattrs(node: Node) -> dict[str, bytes]:
    """The overlay markers of a regular file's metacopy stub."""
    return {METACOPY_XATTR: b"", REDIRECT_XATTR: os.fsencode("/" + canonical_name(node))}


def dir_markers(node: Node, holds_whiteouts: bool) -> dict[str, bytes]:
    """The escaped marker of a directory holding whiteouts ("x": not opaque, look for
    them), unless the layer made it opaque already."""
    if holds_whiteouts and dict(node.xattrs).get(OPAQUE_XATTR) != b"y":
        return {XOPAQUE_XATTR: b"x"}
    return {}


def view_options(meta: str | os.PathLike, data: list[str | os.PathLike]) -> str:
    """Mount options of the view: `meta` the only merged layer, `data` (top first: the
    working-set dir, then the FUSE mount) data-only layers."""
    for p in (meta, *data):
        if any(c in str(p) for c in ":,\\"):
            raise ValueError(f"overlay layer path {p!r} has a character overlayfs treats "
                             "as a separator")
    return "lowerdir=" + "::".join(map(str, (meta, *data))) + ",metacopy=on"


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def write_metatree(tree: Tree, dest: str | os.PathLike) -> MetaTreeStats:
    """Write `tree`'s metadata as the new directory `dest` (see the module doc). Needs root
    for owners and trusted.* xattrs; on failure nothing is left and the error is raised."""
    t0 = time.monotonic()
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"meta tree {dest} already exists")
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp, 0o700)
    # as few system calls as it can (10,000 entries per mount): an owner only when not
    # the creator's, a mode only when creating could not set it (umask, special bits)
    me, umask = (os.geteuid(), os.getegid()), _umask()

    def apply(target: int | str, node: Node, extra: dict[str, bytes] | None = None,
              created: int | None = None) -> None:
        apply_attrs(target, node, me[0] == 0 and (node.uid, node.gid) != me,
                    xattr_name=escaped, extra=extra,
                    created_mode=None if created is None else created & ~umask)
    root = str(tmp)
    first: dict[int, str] = {}             # inode -> the path its first name was created at
    dirs: list[tuple[str, Node]] = []
    stubs = whiteouts = 0
    with_whiteouts: set[str] = set()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    nodes, prefix = tree.nodes, root + "/"
    open_, ftruncate, setxattr = os.open, os.ftruncate, os.setxattr
    utime, close = os.utime, os.close
    try:
        # tree.paths is in sorted order: a directory comes before everything in it
        for name, ino in tree.paths.items():
            node = nodes[ino]
            if not name:
                dirs.append(("", node))
                continue
            if clean_name(name) != name:
                raise UnsafeEntryError(name, "not a clean relative path inside the layer")
            path = prefix + name
            if ino in first:                               # another name of a hard link
                os.link(first[ino], path, follow_symlinks=False)
                continue
            mode = node.mode
            first[ino] = path
            perm = mode & 0o7777
            if (mode & 0o170000 == stat.S_IFREG and node.size and not node.xattrs
                    and perm & ~umask == perm and (node.uid, node.gid) == me):
                # the common stub (~90 % of the entries), in the fewest calls: what
                # apply() would do for it, without its checks (~40 ms of ~100 per layer)
                fd = open_(path, flags, perm)
                try:
                    ftruncate(fd, node.size)
                    setxattr(fd, METACOPY_XATTR, b"")
                    setxattr(fd, REDIRECT_XATTR, os.fsencode("/" + canonical_name(node)))
                    if node.mtime_ns:
                        utime(fd, ns=(node.mtime_ns, node.mtime_ns))
                finally:
                    close(fd)
                stubs += 1
                continue
            if stat.S_ISDIR(mode):
                os.mkdir(path, 0o700)                      # its attributes come last
                dirs.append((name, node))
            elif stat.S_ISREG(mode) or is_whiteout(node):
                created = 0o600 if is_whiteout(node) else stat.S_IMODE(node.mode) & 0o777
                fd = os.open(path, flags, created)
                try:
                    extra: dict[str, bytes] = {}
                    if is_whiteout(node):
                        extra = {XWHITEOUT_XATTR: b""}
                        with_whiteouts.add(name.rpartition("/")[0])
                        whiteouts += 1
                    elif node.size:
                        os.ftruncate(fd, node.size)
                        extra = stub_xattrs(node)
                        stubs += 1
                    apply(fd, node, extra, created)
                finally:
                    os.close(fd)
            elif stat.S_ISLNK(mode):
                os.symlink(node.link_target, path)
                apply(path, node)
            elif stat.S_ISFIFO(mode):
                os.mkfifo(path, 0o600)
                apply(path, node)
            else:
                raise UnsafeEntryError(name, f"unsupported file type {stat.filemode(mode)}")
        # directories last and deepest first: creating their entries changed their mtimes
        for name, node in reversed(dirs):
            apply(os.path.join(root, name) if name else root, node,
                  dir_markers(node, name in with_whiteouts))
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MetaTreeStats(entries=len(tree.paths), stubs=stubs, whiteouts=whiteouts,
                         seconds=round(time.monotonic() - t0, 3))
