"""The meta tree as one EROFS image, mounted read-only, instead of ~10,000 files on a tmpfs.

The meta tree (metatree.py) holds a layer's metadata: directories, symlinks, fifos and a
metacopy stub per regular file. Writing it as files costs five system calls per stub
(create, size, two xattrs, mtime; ~80 ms for the heavy layer, all of it before a lazily
started container can start). The same tree fits in one EROFS image built in memory and
mounted from its file (kernel >= 6.12 mounts EROFS from a regular file, no loop device),
as composefs does: every stub is a chunk-based inode whose one chunk is a hole, so the
image holds metadata only (~1.5 MB for the heavy layer). What the overlay sees is the
same as with the directory: owners, modes, mtimes, xattrs (the layer's, escaped as in
metatree.py, and the stubs' `trusted.overlay.metacopy`/`redirect`), hard links as one
inode with several names.

The on-disk format is EROFS's (Linux `fs/erofs/erofs_fs.h`), the subset this needs:
4 KiB blocks, the superblock at 1024, extended (64-byte) inodes addressed by nid (byte
offset / 32), inline xattrs, directories as sorted dirent blocks (tail packed inline when
small), symlink targets inline, chunk-based files with a null block map entry (a hole).
`fsck.erofs` checks images in the tests. Layers with an xattr EROFS cannot name (a prefix
other than user., trusted., security. or the POSIX ACLs) raise UnsupportedError and get
the directory instead.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import stat
import struct
import time
from dataclasses import dataclass

from .metatree import (
    METACOPY_XATTR,
    REDIRECT_XATTR,
    XWHITEOUT_XATTR,
    canonical_name,
    dir_markers,
    escaped,
    is_whiteout,
    stub_xattrs,
)
from .tree import ROOT_INO, Tree

__all__ = ["MetaImageStats", "UnsupportedError", "build_image", "image_digest", "mount_image",
           "mount_image_bytes", "mount_meta", "unmount_image", "write_image_of_blob"]

BLK_BITS = 12
BLK = 1 << BLK_BITS
MAGIC = 0xE0F5E1E2
SUPER_OFFSET = 1024
INCOMPAT_CHUNKED_FILE = 0x4
NULL_ADDR = 0xFFFFFFFF
# data layouts (i_format bits 1-3)
FLAT_PLAIN, FLAT_INLINE, CHUNK_BASED = 0, 2, 4
# dirent file types
_FTYPE = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4,
          stat.S_IFIFO: 5, stat.S_IFSOCK: 6, stat.S_IFLNK: 7}
# xattr name prefixes EROFS stores as an index (longest first where one holds another)
_PREFIXES = (("system.posix_acl_access", 2), ("system.posix_acl_default", 3),
             ("user.", 1), ("trusted.", 4), ("security.", 6))

_INODE = struct.Struct("<HHHHQIIIIQII16x")          # struct erofs_inode_extended
_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23x")
_DIRENT = struct.Struct("<QHBB")
_XATTR_ENTRY = struct.Struct("<BBH")
_XATTR_HEAD = b"\0" * 12                            # name filter, no shared xattrs


class UnsupportedError(ValueError):
    """The tree has something this writer does not put in an image."""


@dataclass(frozen=True)
class MetaImageStats:
    entries: int
    stubs: int | None                  # None: a published image, mounted as it came
    whiteouts: int | None
    bytes: int
    seconds: float


def _xattr_entry(name: str, value: bytes) -> bytes:
    for prefix, index in _PREFIXES:
        if name.startswith(prefix):
            suffix = name[len(prefix):].encode("utf-8", "surrogateescape")
            break
    else:
        raise UnsupportedError(f"xattr {name!r}: no EROFS prefix for it")
    if len(suffix) > 255 or len(value) > 65535:
        raise UnsupportedError(f"xattr {name!r} too large for an inline EROFS xattr")
    raw = _XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
    return raw + b"\0" * (-len(raw) % 4)


def _dir_blocks(names: list[bytes]) -> list[list[bytes]]:
    """Sorted names (with '.' and '..') split into dirent blocks (12 bytes + the name each)."""
    blocks: list[list[bytes]] = [[]]
    used = 0
    for n in names:
        need = _DIRENT.size + len(n)
        if used + need > BLK:
            blocks.append([])
            used = 0
        blocks[-1].append(n)
        used += need
    return blocks


@dataclass(eq=False, slots=True)
class _Later:
    """An inode written once every nid is known (a directory: its dirents name them), or
    with data in blocks of its own (a large directory, a symlink too long to inline)."""

    ino: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    nlink: int
    xattrs: bytes               # inline xattr body (header + entries), b"" for none
    names: list[list[bytes]]    # directories: sorted names (with '.', '..') per dirent block
    kids: dict[bytes, int]      # directories: name -> tree inode
    size: int
    inline: bool
    data: bytes = b""           # a symlink's target
    pos: int = 0


def _inode(layout: int, xattrs: bytes, mode: int, size: int, u: int, ino: int, uid: int,
           gid: int, mtime_ns: int, nlink: int) -> bytes:
    secs, nsec = divmod(mtime_ns, 1_000_000_000)
    return _INODE.pack(1 | (layout << 1), (len(xattrs) - 12) // 4 + 1 if xattrs else 0,
                       mode, 0, size, u, ino & 0xFFFFFFFF, uid, gid, secs, nsec, nlink) + xattrs


def build_image(tree: Tree) -> tuple[bytes, MetaImageStats]:
    """The EROFS image of `tree`'s meta tree (see the module doc). Pure. Raises
    UnsupportedError for what the format cannot hold (an owner beyond 32 bits, an mtime
    before 1970, a file beyond 8 TiB, an xattr without an EROFS prefix)."""
    try:
        return _build_image(tree)
    except struct.error as e:
        raise UnsupportedError(f"a value the EROFS inode cannot hold: {e}") from None


def _build_image(tree: Tree) -> tuple[bytes, MetaImageStats]:
    t0 = time.monotonic()
    nodes, paths = tree.nodes, tree.paths
    stubs = whiteouts = 0
    # the common stub's xattrs: header, metacopy, then the redirect's entry head and name
    stub_head = _XATTR_HEAD + _xattr_entry(METACOPY_XATTR, b"")
    redirect_name = REDIRECT_XATTR[len("trusted."):].encode()
    null_map = struct.pack("<I", NULL_ADDR)
    pack_entry, inode, ipack, blk_bits = _XATTR_ENTRY.pack, _inode, _INODE.pack, BLK_BITS
    stub_format = 1 | (CHUNK_BASED << 1)
    recs: dict[int, bytes | _Later] = {}    # whole records, or what comes later
    pos_of: dict[int, int] = {}
    ftype: dict[int, int] = {}
    data_blocks = 0
    pos = SUPER_OFFSET + _SUPER.size
    # nodes come in path order: the root (inode 1) first, as its nid must fit in 16 bits
    if next(iter(nodes)) != ROOT_INO:
        raise UnsupportedError("the tree's first inode is not its root")
    for ino, node in nodes.items():
        mode = node.mode
        fmt = mode & 0o170000
        size = node.size
        rec: bytes | _Later
        if fmt == stat.S_IFREG and size and not node.xattrs:
            # the common stub (~90 % of the entries), in the fewest steps
            r = ("/" + canonical_name(node)).encode("utf-8", "surrogateescape")
            xb = stub_head + pack_entry(len(redirect_name), 4, len(r)) + redirect_name + r
            xb += b"\0" * (-len(xb) % 4)
            bits = (size - 1).bit_length() - blk_bits
            if bits > 31:
                raise UnsupportedError(f"{node.name!r}: {size} bytes is beyond one chunk")
            secs, nsec = divmod(node.mtime_ns, 1_000_000_000)
            rec = ipack(stub_format, (len(xb) - 12) // 4 + 1, mode, 0, size,
                        bits if bits > 0 else 0, ino & 0xFFFFFFFF, node.uid, node.gid, secs,
                        nsec, node.nlink) + xb + null_map
            stubs += 1
        else:
            extra = [_xattr_entry(escaped(k), v) for k, v in node.xattrs]
            if fmt == stat.S_IFDIR:
                rec = _dir(tree, ino, node, extra)
            elif fmt == stat.S_IFREG and size:
                extra += [_xattr_entry(k, v) for k, v in stub_xattrs(node).items()]
                bits = max(0, (size - 1).bit_length() - blk_bits)
                if bits > 31:
                    raise UnsupportedError(f"{node.name!r}: {size} bytes is beyond one chunk")
                rec = inode(CHUNK_BASED, _xattr_body(node.name, extra), mode, size, bits, ino,
                            node.uid, node.gid, node.mtime_ns, node.nlink) + null_map
                stubs += 1
            elif is_whiteout(node):
                extra.append(_xattr_entry(XWHITEOUT_XATTR, b""))
                mode = stat.S_IFREG | (mode & 0o7777)
                rec = inode(FLAT_PLAIN, _xattr_body(node.name, extra), mode, 0, 0, ino,
                            node.uid, node.gid, node.mtime_ns, node.nlink)
                whiteouts += 1
            elif fmt in (stat.S_IFREG, stat.S_IFIFO):
                rec = inode(FLAT_PLAIN, _xattr_body(node.name, extra), mode, 0, 0, ino,
                            node.uid, node.gid, node.mtime_ns, node.nlink)
            elif fmt == stat.S_IFLNK:
                target = node.link_target.encode("utf-8", "surrogateescape")
                xb = _xattr_body(node.name, extra)
                if _INODE.size + len(xb) + len(target) <= BLK:      # inline, tail packed
                    rec = inode(FLAT_INLINE, xb, mode, len(target), 0, ino, node.uid,
                                node.gid, node.mtime_ns, node.nlink) + target
                else:                  # a data block of its own (PATH_MAX: one block)
                    rec = _Later(ino, mode, node.uid, node.gid, node.mtime_ns, node.nlink, xb,
                                 [], {}, len(target), False, target)
            else:
                raise UnsupportedError(f"{node.name!r}: file type {stat.filemode(mode)}")
        ftype[ino] = _FTYPE[mode & 0o170000]
        n = len(rec) if isinstance(rec, bytes) else (
            _INODE.size + len(rec.xattrs) + (rec.size if rec.inline else 0))
        if n <= BLK and (pos & (BLK - 1)) + n > BLK:
            pos += -pos & (BLK - 1)    # within one block: inline data must not cross one
        pos_of[ino] = pos
        if not isinstance(rec, bytes):
            rec.pos = pos
            if not rec.inline:
                data_blocks += (rec.size + BLK - 1) // BLK
        recs[ino] = rec
        pos += n + (-n & 31)
    if pos_of[ROOT_INO] // 32 > 0xFFFF:
        raise UnsupportedError("root inode beyond a 16-bit nid")

    block = (pos + BLK - 1) // BLK
    img = bytearray((block + data_blocks) * BLK)
    nid = {ino: p >> 5 for ino, p in pos_of.items()}
    for ino, rec in recs.items():
        if isinstance(rec, bytes):
            p = pos_of[ino]
            img[p:p + len(rec)] = rec
            continue
        data = _dir_data(rec, nid, ftype) if rec.names else rec.data
        if rec.inline:
            head = _inode(FLAT_INLINE, rec.xattrs, rec.mode, rec.size, 0, ino, rec.uid,
                          rec.gid, rec.mtime_ns, rec.nlink) + data
        else:
            head = _inode(FLAT_PLAIN, rec.xattrs, rec.mode, rec.size, block, ino, rec.uid,
                          rec.gid, rec.mtime_ns, rec.nlink)
            img[block * BLK:block * BLK + len(data)] = data
            block += (rec.size + BLK - 1) // BLK
        img[rec.pos:rec.pos + len(head)] = head
    _SUPER.pack_into(img, SUPER_OFFSET, MAGIC, 0, 0, BLK_BITS, 0, nid[ROOT_INO], len(recs),
                     0, 0, block, 0, 0, b"\0" * 16, b"lazyfs-meta".ljust(16, b"\0"),
                     INCOMPAT_CHUNKED_FILE, 0, 0, 0, 0, 0, 0, 0, 0)
    return bytes(img), MetaImageStats(entries=len(paths), stubs=stubs, whiteouts=whiteouts,
                                      bytes=len(img), seconds=round(time.monotonic() - t0, 3))


def _xattr_body(name: str, entries: list[bytes]) -> bytes:
    if not entries:
        return b""
    body = _XATTR_HEAD + b"".join(entries)
    if len(body) > 65535:
        raise UnsupportedError(f"{name!r}: xattrs too large")
    return body


def _dir(tree: Tree, ino: int, node, extra: list[bytes]) -> _Later:
    nodes = tree.nodes
    holds = any(nodes[c].mode & 0o170000 == stat.S_IFCHR and not nodes[c].rdev
                for _, c in node.children)
    extra += [_xattr_entry(k, v) for k, v in dir_markers(node, holds).items()]
    parent = tree.paths[node.name.rpartition("/")[0]] if node.name else ino
    kids = {n.encode("utf-8", "surrogateescape"): c for n, c in node.children}
    kids[b"."], kids[b".."] = ino, parent
    names = _dir_blocks(sorted(kids))
    size = (len(names) - 1) * BLK + sum(_DIRENT.size + len(n) for n in names[-1])
    xb = _xattr_body(node.name, extra)
    inline = len(names) == 1 and _INODE.size + len(xb) + size <= BLK
    return _Later(ino, node.mode, node.uid, node.gid, node.mtime_ns, node.nlink, xb, names,
                kids, size, inline)


def _dir_data(d: _Later, nid: dict[int, int], ftype: dict[int, int]) -> bytes:
    """A directory's dirent blocks, the last one unpadded (its i_size ends there)."""
    out: list[bytes] = []
    pack, kids, last = _DIRENT.pack, d.kids, len(d.names) - 1
    for k, names in enumerate(d.names):
        off = _DIRENT.size * len(names)
        heads = []
        for n in names:
            child = kids[n]
            heads.append(pack(nid[child], off, ftype[child], 0))
            off += len(n)
        blk = b"".join(heads) + b"".join(names)
        out.append(blk if k == last else blk.ljust(BLK, b"\0"))
    return b"".join(out)


_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NODEV, MS_NOSUID = 1, 4, 2
MNT_DETACH = 2


def mount_image(image: str | os.PathLike, target: str | os.PathLike) -> None:
    """Mount the image file read-only at `target` (EROFS from a file: kernel >= 6.12).
    Raises OSError (ENODEV, ENOTBLK on older kernels) for the caller to fall back."""
    if _libc.mount(os.fsencode(image), os.fsencode(target), b"erofs",
                   MS_RDONLY | MS_NODEV | MS_NOSUID, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t erofs {image} {target}: {os.strerror(err)}")


def unmount_image(target: str | os.PathLike) -> None:
    """Detach the image's mount (an overlay still using it keeps it until it goes)."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def mount_meta(tree: Tree, dest: str | os.PathLike, scratch: str | os.PathLike
               ) -> MetaImageStats:
    """The meta tree of `tree` mounted at the new directory `dest` as an EROFS image (see
    mount_image_bytes). Raises UnsupportedError or OSError, leaving nothing behind, for
    the caller to write the directory instead."""
    data, st = build_image(tree)
    t0 = time.monotonic()
    mount_image_bytes(data, dest, scratch)
    return dataclasses.replace(st, seconds=round(st.seconds + time.monotonic() - t0, 3))


def mount_image_bytes(data: bytes, dest: str | os.PathLike, scratch: str | os.PathLike
                      ) -> None:
    """Mount the EROFS image `data` at the new directory `dest`: written first under
    `scratch` (a disk filesystem: the kernel mounts EROFS from files whose filesystem can
    read pages into the page cache, not from tmpfs) and unlinked once mounted (the mount
    keeps it open; its space goes with the mount). Raises OSError, leaving nothing."""
    os.makedirs(scratch, exist_ok=True)
    _remove_stale(scratch)
    image = os.path.join(scratch, f"meta-{os.getpid()}-{os.path.basename(dest)}.erofs")
    try:
        with open(os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600),
                  "wb") as f:
            f.write(data)
        os.mkdir(dest, 0o700)
        try:
            mount_image(image, dest)
        except BaseException:
            os.rmdir(dest)
            raise
    finally:
        if os.path.exists(image):
            os.unlink(image)


def _remove_stale(scratch: str | os.PathLike) -> None:
    """Images a server that died between writing and mounting them left behind."""
    for name in os.listdir(scratch):
        pid = name.split("-")[1] if name.startswith("meta-") and name.count("-") >= 2 else ""
        if pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            try:
                os.unlink(os.path.join(scratch, name))
            except OSError:
                pass


def image_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_image_of_blob(estargz: str | os.PathLike, toc_digest: str | None,
                        out: str | os.PathLike) -> tuple[str, int]:
    """The meta image of an eStargz file written to `out`: (its digest, its size). What a
    node that builds a layer publishes beside its eStargz, so that lazy mounts fetch the
    image instead of building it (~35 ms of a 10,000-file layer's mount)."""
    from .blobsource import FileBlobSource
    from .reader import open_estargz
    src = FileBlobSource(estargz)
    try:
        data, _ = build_image(open_estargz(src, toc_digest).tree)
    finally:
        src.close()
    with open(out, "wb") as f:
        f.write(data)
    return image_digest(data), len(data)
