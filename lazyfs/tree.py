"""The validated file tree of an eStargz layer, in overlay form, built from its TOC.

`build_tree` is pure: it checks the TOC against the blob it came from and returns
inode-numbered nodes that the extractor and the FUSE server serve directly:

* every name is normalized; '..', absolute names and paths through non-directories are
  refused (UnsafeEntryError); hard links must name an earlier non-directory entry;
* every payload lies inside the blob, before the TOC (FormatError otherwise); chunks of a
  file are contiguous from 0 to its size and each has a sha256 `chunkDigest`;
* OCI whiteouts become overlay whiteouts: `d/.wh.x` -> char device 0/0 at `d/x`,
  `d/.wh..wh..opq` -> `trusted.overlay.opaque=y` on `d`; landmark files are hidden;
* device nodes other than whiteouts are refused, as the tar.zst unpacker refuses them.
"""
from __future__ import annotations

import functools
import itertools
import stat
from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from .errors import FormatError, UnsafeEntryError
from .toc import (
    NO_PREFETCH_LANDMARK,
    PARTIAL_PREFETCH_KEY,
    PREFETCH_LANDMARK,
    TOC,
    TOCEntry,
    clean_name,
)

OPAQUE_XATTR = "trusted.overlay.opaque"
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
ROOT_INO = 1
DEFLATE_MAX_RATIO = 1032      # deflate cannot expand data more than this
_TYPE_BITS = {"dir": stat.S_IFDIR, "reg": stat.S_IFREG, "symlink": stat.S_IFLNK,
              "char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}


# Chunks and nodes are msgspec Structs (frozen, hashable, untracked by the GC: they hold
# only ints, strings and tuples of them): ~20,000 of them are made on every lazy mount's
# path, several times faster than frozen dataclasses, and never traversed by a collection.
class Chunk(msgspec.Struct, frozen=True, gc=False):
    """One verified-on-read piece of a regular file."""

    offset: int            # blob offset of the gzip member holding it
    end: int               # blob offset where that member's data ends (next member or TOC)
    inner_offset: int      # uncompressed offset of the chunk within the member
    file_offset: int       # offset of the chunk within the file
    size: int              # uncompressed bytes
    digest: str            # sha256:... of the uncompressed bytes
    member_digest: str = ""   # sha256:... of the member's compressed bytes [offset, end)


class Node(msgspec.Struct, frozen=True, gc=False):
    """One inode. Hard links share a Node (nlink counts the names)."""

    ino: int
    name: str                        # first path seen ('' = root)
    mode: int                        # full st_mode (type bits + permissions)
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    nlink: int = 1
    link_target: str = ""            # symlink target, as stored
    xattrs: tuple[tuple[str, bytes], ...] = ()
    chunks: tuple[Chunk, ...] = ()
    children: tuple[tuple[str, int], ...] = ()   # sorted (name, ino) for directories

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


@dataclass(frozen=True)
class Tree:
    nodes: dict[int, Node]
    paths: dict[str, int]
    prefetch_end: int                 # blob offset where the prioritized area ends (0: none)
    prioritized: tuple[str, ...] = ()
    chunks_in_order: tuple[Chunk, ...] = field(default=(), repr=False)
    # prioritized files a recorded run read only a small part of (PARTIAL_PREFETCH_KEY):
    # name -> file offsets of the chunks it read. A prefetch brings those chunks alone and
    # leaves the rest (`prefetch_skip`) to on-demand reads.
    partial: dict[str, frozenset[int]] = field(default_factory=dict, repr=False)
    prefetch_skip: frozenset[Chunk] = field(default=frozenset(), repr=False)

    def lookup(self, path: str) -> Node | None:
        ino = self.paths.get(clean_name(path))
        return None if ino is None else self.nodes[ino]


@functools.lru_cache(maxsize=4096)     # a layer's files share few distinct mtimes
def _mtime_ns(modtime: str) -> int:
    if not modtime:
        return 0
    try:
        return int(datetime.fromisoformat(modtime).timestamp()) * 10**9
    except ValueError:
        return 0


def _file_chunks(name: str, size: int, pieces: list[TOCEntry], toc_offset: int,
                 next_start: dict[int, int]) -> tuple[Chunk, ...]:
    """Check one file's chunk list against its size and the blob's data area."""
    out, expect = [], 0
    for p in pieces:
        if p.chunk_offset != expect:
            raise FormatError(f"{name!r}: chunk at file offset {p.chunk_offset}, want {expect}")
        n = p.chunk_size or size - p.chunk_offset
        if n <= 0 or p.chunk_offset + n > size:
            raise FormatError(f"{name!r}: chunk [{p.chunk_offset}, +{n}) outside size {size}")
        if not 0 <= p.offset < toc_offset:
            raise FormatError(f"{name!r}: chunk offset {p.offset} is outside the blob's data "
                              f"area [0, {toc_offset})")
        member = next_start[p.offset] - p.offset
        if p.inner_offset + n > DEFLATE_MAX_RATIO * member + 1024:
            raise FormatError(f"{name!r}: chunk of {n} bytes cannot come out of a "
                              f"{member}-byte gzip member")
        digest = p.chunk_digest or (p.digest if len(pieces) == 1 else "")
        if not digest:
            raise FormatError(f"{name!r}: chunk at {p.chunk_offset} has no chunkDigest")
        out.append(Chunk(p.offset, next_start[p.offset], p.inner_offset, p.chunk_offset, n,
                         digest, p.member_digest))
        expect += n
    if expect != size:
        raise FormatError(f"{name!r}: chunks cover {expect} of {size} bytes")
    return tuple(out)


class _A:
    """Mutable attributes of one inode while the tree is built (a plain slotted class:
    ~10,000 are made per lazy mount, with a children dict for directories only)."""

    __slots__ = ("mode", "uid", "gid", "size", "mtime_ns", "link_target", "xattrs", "chunks",
                 "children", "names")

    def __init__(self, mode: int, uid: int = 0, gid: int = 0, mtime_ns: int = 0,
                 link_target: str = "", xattrs: dict[str, bytes] | None = None) -> None:
        self.mode, self.uid, self.gid, self.mtime_ns = mode, uid, gid, mtime_ns
        self.size = 0
        self.link_target = link_target
        self.xattrs: dict[str, bytes] = xattrs if xattrs is not None else {}
        self.chunks: tuple[Chunk, ...] = ()
        # base name -> path, for directories
        self.children: dict[str, str] | None = {} if mode & 0o170000 == stat.S_IFDIR else None
        self.names = 1

    @classmethod
    def from_entry(cls, e: TOCEntry, type_bits: int) -> _A:
        return cls(type_bits | (e.mode & 0o7777), e.uid, e.gid, _mtime_ns(e.modtime),
                   e.link_name if e.type == "symlink" else "",
                   dict(e.xattrs) if e.xattrs else None)

    @property
    def is_dir(self) -> bool:
        return self.mode & 0o170000 == stat.S_IFDIR


class _Builder:
    def __init__(self) -> None:
        self.attrs: dict[str, _A] = {"": _A(mode=stat.S_IFDIR | 0o755)}

    def parent(self, name: str) -> _A:
        """The directory `name` goes into; missing parents are created (as tar tools do)."""
        return self._dir_of(name, name.rpartition("/")[0])

    def _dir_of(self, name: str, parent: str) -> _A:
        node = self.attrs.get(parent)
        if node is None:
            node = _A(mode=stat.S_IFDIR | 0o755)
            self.put(parent, node)
        if node.children is None:
            raise UnsafeEntryError(name, f"its parent {parent!r} is not a directory")
        return node

    def put(self, name: str, node: _A) -> None:
        head, _, base = name.rpartition("/")
        parent = self._dir_of(name, head)
        old = self.attrs.get(name)
        if old is not None and old is not node:
            if old.is_dir and node.is_dir:       # a dir entry after its implicit creation
                old.xattrs.update(node.xattrs)
                node.xattrs, node.children = old.xattrs, old.children
            elif old.is_dir and old.children:
                raise UnsafeEntryError(name, "replaces a non-empty directory")
            else:
                old.names -= 1
        self.attrs[name] = node
        parent.children[base] = name        # type: ignore[index]  (a directory: checked)


def build_tree(toc: TOC, toc_offset: int, *, overlay_form: bool = True) -> Tree:
    """Validate `toc` (whose gzip member starts at `toc_offset`) and build the inode tree.

    Raises FormatError (or UnsafeEntryError) on the first problem; never partially succeeds.
    """
    files: list[tuple[str, TOCEntry, list[TOCEntry]]] = []
    for e in toc.entries:
        if e.type == "chunk":
            if not files or files[-1][1].type != "reg" or not files[-1][2]:
                raise FormatError(f"chunk entry {e.name!r} does not follow a regular file")
            if e.name and clean_name(e.name) != files[-1][0]:
                raise FormatError(f"chunk entry {e.name!r} follows file {files[-1][0]!r}")
            files[-1][2].append(e)
            continue
        files.append((clean_name(e.name), e, [e] if e.type == "reg" and e.size > 0 else []))
    starts = sorted({p.offset for _, _, ps in files for p in ps} | {toc_offset})
    next_start = dict(itertools.pairwise(starts))

    b = _Builder()
    order: list[Chunk] = []
    prefetch_end, prioritized, seen_landmark = 0, [], False
    for name, e, pieces in files:
        if name in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
            if name == PREFETCH_LANDMARK and pieces:
                if not 0 <= pieces[0].offset < toc_offset:
                    raise FormatError(f"landmark offset {pieces[0].offset} outside the blob")
                prefetch_end = pieces[0].offset
            seen_landmark = True
            continue
        if not name:
            if e.type != "dir":
                raise UnsafeEntryError(e.name, "the layer root must be a directory")
            root = b.attrs[""]
            root.mode, root.uid, root.gid = stat.S_IFDIR | (e.mode & 0o7777), e.uid, e.gid
            root.mtime_ns = _mtime_ns(e.modtime)
            root.xattrs.update(e.xattrs)
            continue
        base = name.rpartition("/")[2]
        if overlay_form and base.startswith(WHITEOUT_PREFIX):
            parent = b.parent(name)
            if base == OPAQUE_WHITEOUT:
                parent.xattrs[OPAQUE_XATTR] = b"y"
            elif not base.startswith(WHITEOUT_PREFIX * 2):   # skip aufs .wh..wh.plnk & co
                target = name[: -len(base)] + base[len(WHITEOUT_PREFIX):]
                b.put(target, _A(mode=stat.S_IFCHR | (e.mode & 0o7777), uid=e.uid, gid=e.gid,
                                 mtime_ns=_mtime_ns(e.modtime)))
            continue
        if e.type == "hardlink":
            src = clean_name(e.link_name)
            origin = b.attrs.get(src) if src else None
            if origin is None:
                raise UnsafeEntryError(name, f"hard link to {e.link_name!r}, which is not an "
                                       "earlier entry of this layer")
            if origin.is_dir:
                raise UnsafeEntryError(name, "hard link to a directory")
            origin.names += 1
            b.put(name, origin)
            continue
        if e.type in ("char", "block") and not (
                e.type == "char" and e.dev_major == 0 and e.dev_minor == 0):
            raise UnsafeEntryError(name, "device nodes other than whiteouts are not allowed")
        if e.type == "symlink" and not e.link_name:
            raise FormatError(f"symlink {name!r} has no linkName")
        node = _A.from_entry(e, _TYPE_BITS[e.type])
        if e.type == "reg":
            node.size = e.size
            node.chunks = _file_chunks(name, e.size, pieces, toc_offset, next_start)
            order.extend(node.chunks)
            if not seen_landmark:
                prioritized.append(name)
        b.put(name, node)
    if not seen_landmark:
        prioritized = []       # no landmark: nothing is known to be prioritized
    partial, skip = _partial(toc.extra.get(PARTIAL_PREFETCH_KEY), b.attrs, prioritized)
    return _number(b.attrs, prefetch_end, tuple(prioritized), tuple(order), partial, skip)


def _partial(raw: object, attrs: dict[str, _A], prioritized: list[str]
             ) -> tuple[dict[str, frozenset[int]], frozenset[Chunk]]:
    """Check the TOC's partial-prefetch map: every name a prioritized regular file, every
    offset one of its chunks' file offsets. Returns it and the chunks to skip."""
    if raw is None:
        return {}, frozenset()
    if not isinstance(raw, dict):
        raise FormatError(f"{PARTIAL_PREFETCH_KEY} is not an object")
    first = set(prioritized)
    partial: dict[str, frozenset[int]] = {}
    skip: list[Chunk] = []
    for raw_name, offsets in raw.items():
        name = clean_name(raw_name)
        a = attrs.get(name)
        if name not in first or a is None or not stat.S_ISREG(a.mode):
            raise FormatError(f"{PARTIAL_PREFETCH_KEY}: {raw_name!r} is not a prioritized "
                              "regular file")
        if not isinstance(offsets, list) or not all(
                o.__class__ is int for o in offsets):
            raise FormatError(f"{PARTIAL_PREFETCH_KEY}: {raw_name!r} needs a list of integers")
        keep = frozenset(offsets)
        starts = {c.file_offset for c in a.chunks}
        if not keep <= starts:
            raise FormatError(f"{PARTIAL_PREFETCH_KEY}: {raw_name!r} offsets "
                              f"{sorted(keep - starts)[:3]} are not chunk starts")
        partial[name] = keep
        skip.extend(c for c in a.chunks if c.file_offset not in keep)
    # a gzip member holding a chunk someone needs is not skipped (our writer gives every
    # chunk its own member; other writers may share one)
    skipped = frozenset(skip)
    needed = {c.offset for a in attrs.values() for c in a.chunks
              if c not in skipped} if skipped else set()
    return partial, frozenset(c for c in skipped if c.offset not in needed)


def _number(attrs: dict[str, _A], prefetch_end: int, prioritized: tuple[str, ...],
            order: tuple[Chunk, ...], partial: dict[str, frozenset[int]] | None = None,
            skip: frozenset[Chunk] = frozenset()) -> Tree:
    """Give inode numbers (root = 1, then paths in sorted order; hard links share one)."""
    ino_of: dict[int, int] = {}
    paths: dict[str, int] = {}
    names = sorted(attrs)
    for name in names:
        ino = ino_of.setdefault(id(attrs[name]), len(ino_of) + 1)
        paths[name] = ino
    nodes: dict[int, Node] = {}
    for name in names:           # (on every lazy mount's path: ~10,000 names, kept lean)
        a = attrs[name]
        ino = paths[name]
        if ino in nodes:
            continue
        if a.is_dir:
            children = tuple(sorted([(base, paths[child]) for base, child in a.children.items()]))
            nlink = 2 + sum(1 for child in a.children.values() if attrs[child].is_dir)
        else:
            children, nlink = (), max(1, a.names)
        nodes[ino] = Node(ino, name, a.mode, a.uid, a.gid, a.size, a.mtime_ns, 0, nlink,
                          a.link_target,
                          tuple(sorted(a.xattrs.items())) if a.xattrs else (), a.chunks,
                          children)
    return Tree(nodes=nodes, paths=paths, prefetch_end=prefetch_end, prioritized=prioritized,
                chunks_in_order=order, partial=partial or {}, prefetch_skip=skip)


__all__ = ["OPAQUE_XATTR", "ROOT_INO", "Chunk", "Node", "Tree", "build_tree"]
