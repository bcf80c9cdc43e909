"""Writing eStargz blobs from an overlay upper dir (the node's on-disk layer form).

Blob layout (docs/estargz.md of containerd/stargz-snapshotter):

    [gzip: tar headers ...][gzip: payload of file 1 (+ padding, next headers)] ...
    [gzip: tar header + stargz.index.json + tar EOF]          <- TOC, at toc_offset
    [51-byte footer: empty gzip member, extra field 'SG' + "%016xSTARGZ" % toc_offset]

Each non-empty regular file (or each `chunk_size` piece of a large one) starts a new gzip
member, so it can be fetched by one HTTP range and verified by its `chunkDigest`. The
concatenation is one valid tar.gz: any tar tool extracts it (plus the TOC and the landmark
files). Prioritized files (and their parent directories) come first, then
`.prefetch.landmark`; without prioritized files `.no.prefetch.landmark` comes first.

Overlay form -> OCI form on write: a whiteout (0/0 char device) `d/x` becomes an empty
regular file `d/.wh.x`; a dir with `trusted.overlay.opaque=y` gets a `d/.wh..wh..opq`
entry. Other `trusted.overlay.*` xattrs are overlay-internal and dropped.
"""
from __future__ import annotations

import hashlib
import os
import stat
import struct
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from msgspec.structs import replace

from .errors import FormatError, UnsafeEntryError
from .toc import (
    LANDMARK_CONTENT,
    NO_PREFETCH_LANDMARK,
    PARTIAL_PREFETCH_KEY,
    PREFETCH_LANDMARK,
    TOC,
    TOC_NAME,
    TOCEntry,
    clean_name,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FOOTER_SIZE",
    "OPAQUE_WHITEOUT",
    "OPAQUE_XATTR",
    "WHITEOUT_PREFIX",
    "LayerBlob",
    "footer_bytes",
    "parse_footer",
    "plan_partial",
    "write_layer",
]

FOOTER_SIZE = 51
DEFAULT_CHUNK_SIZE = 4 << 20
PARTIAL_MIN_SIZE = 4 << 20           # a file prefetched in part is at least this large ...
PARTIAL_MAX_FRACTION = 0.5           # ... and its recorded chunks hold at most this of it
MEMBER_DIGEST_MIN = 64 << 10         # chunks this large get a member digest (TOCEntry)
OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_XATTR_PREFIX = "trusted.overlay."
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
RESERVED_TOP = frozenset({TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
_BLOCK = 512


def footer_bytes(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer: an empty gzip member whose extra field holds the offset."""
    subfield = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(subfield)) + subfield
    header = b"\x1f\x8b\x08\x04" + b"\x00\x00\x00\x00" + b"\x00\xff"
    buf = header + struct.pack("<H", len(extra)) + extra + b"\x01\x00\x00\xff\xff" + b"\x00" * 8
    assert len(buf) == FOOTER_SIZE
    return buf


def parse_footer(buf: bytes) -> int:
    """Return the TOC offset from a 51-byte footer; FormatError if it is not an eStargz footer."""
    if len(buf) != FOOTER_SIZE:
        raise FormatError(f"footer is {len(buf)} bytes, want {FOOTER_SIZE}")
    if buf[:4] != b"\x1f\x8b\x08\x04":
        raise FormatError("no eStargz footer: the blob does not end in a gzip member with "
                          "an extra field (not eStargz, or truncated)")
    (xlen,) = struct.unpack("<H", buf[10:12])
    extra = buf[12:12 + xlen]
    if xlen != 26 or extra[:2] != b"SG" or struct.unpack("<H", extra[2:4])[0] != 22:
        raise FormatError("footer extra field is not the eStargz 'SG' subfield")
    if extra[20:26] != b"STARGZ":
        raise FormatError("footer lacks the STARGZ magic")
    try:
        offset = int(extra[4:20].decode("ascii"), 16)
    except (UnicodeDecodeError, ValueError):
        raise FormatError("footer TOC offset is not hex") from None
    if buf[38:] != b"\x01\x00\x00\xff\xff" + b"\x00" * 8:
        raise FormatError("footer is not an empty gzip member")
    return offset


@dataclass(frozen=True)
class LayerBlob:
    """What write_layer produced: enough for an OCI layer descriptor and config diff_id."""

    path: Path
    digest: str             # sha256:... of the blob (the layer descriptor digest)
    size: int               # blob bytes
    diff_id: str            # sha256:... of the uncompressed tar (OCI config rootfs.diff_ids)
    toc_digest: str         # sha256:... of stargz.index.json (annotation toc.digest)
    uncompressed_size: int
    entries: int            # TOC entries
    prioritized: tuple[str, ...] = ()   # prioritized names found, in blob order
    missing: tuple[str, ...] = ()       # prioritized names not in the layer
    skipped: tuple[str, ...] = ()       # device nodes left out (skip_devices=True)
    partial: tuple[str, ...] = ()       # prioritized files prefetched in part (plan_partial)


class _GzipMembers:
    """Writes concatenated gzip members to `f`, hashing compressed and uncompressed bytes."""

    def __init__(self, f: BinaryIO, level: int):
        self.f, self.level = f, level
        self.z: zlib._Compress | None = None
        self.pos = 0
        self.blob_hash, self.raw_hash, self.raw_n = hashlib.sha256(), hashlib.sha256(), 0
        self.member_start, self.member_hash = 0, hashlib.sha256()
        self.member_digests: dict[int, str] = {}     # member start -> sha256 of its bytes

    def _emit(self, data: bytes) -> None:
        if data:
            self.f.write(data)
            self.blob_hash.update(data)
            self.member_hash.update(data)
            self.pos += len(data)

    def write(self, data: bytes) -> None:
        if self.z is None:
            self.z = zlib.compressobj(self.level, zlib.DEFLATED, 31)
        self.raw_hash.update(data)
        self.raw_n += len(data)
        self._emit(self.z.compress(data))

    def close_member(self) -> None:
        if self.z is not None:
            self._emit(self.z.flush(zlib.Z_FINISH))
            self.z = None

    def new_member(self) -> int:
        """Close the open member; the next write starts a member at the returned offset."""
        self.close_member()
        if self.pos > self.member_start:
            self.member_digests[self.member_start] = "sha256:" + self.member_hash.hexdigest()
        self.member_start, self.member_hash = self.pos, hashlib.sha256()
        return self.pos

    def write_raw(self, data: bytes) -> None:
        self.close_member()
        self._emit(data)


@dataclass(frozen=True)
class _Src:
    name: str               # relative path in the layer, '/'-separated (OCI form)
    path: str               # where it is on disk
    st: os.stat_result
    kind: str               # dir | reg | symlink | fifo | whiteout | opaque
    xattrs: tuple[tuple[str, bytes], ...] = ()


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for n in sorted(names):
        try:
            out.append((n, os.getxattr(path, n, follow_symlinks=False)))
        except OSError:
            pass
    return tuple(out)


def _scan(src: Path, skipped: list[str] | None = None) -> list[_Src]:
    """Walk an overlay upper dir in sorted order (parents first) into OCI-form entries.

    Device nodes other than whiteouts raise UnsafeEntryError, or are left out and listed
    in `skipped` when the caller passes a list (a base rootfs's /dev: runc mounts its own).
    """
    out: list[_Src] = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        rel_root = os.path.relpath(root, src)
        for name in sorted(dirs) + sorted(files):
            full = os.path.join(root, name)
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if name.startswith(WHITEOUT_PREFIX):
                raise UnsafeEntryError(rel, "names starting with '.wh.' cannot be stored in "
                                       "an OCI layer (they mean whiteouts)")
            if rel in RESERVED_TOP:
                raise UnsafeEntryError(rel, "reserved eStargz name at the layer root")
            st = os.lstat(full)
            x = _xattrs(full)
            keep = tuple((k, v) for k, v in x if not k.startswith(OVERLAY_XATTR_PREFIX))
            if stat.S_ISDIR(st.st_mode):
                out.append(_Src(rel, full, st, "dir", keep))
                if dict(x).get(OPAQUE_XATTR) == b"y":
                    out.append(_Src(f"{rel}/{OPAQUE_WHITEOUT}", full, st, "opaque"))
            elif stat.S_ISREG(st.st_mode):
                out.append(_Src(rel, full, st, "reg", keep))
            elif stat.S_ISLNK(st.st_mode):
                out.append(_Src(rel, full, st, "symlink", keep))
            elif stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                parent = rel.rpartition("/")[0]
                wh = f"{parent}/{WHITEOUT_PREFIX}{name}" if parent else WHITEOUT_PREFIX + name
                out.append(_Src(wh, full, st, "whiteout"))
            elif stat.S_ISFIFO(st.st_mode):
                out.append(_Src(rel, full, st, "fifo", keep))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                if skipped is None:
                    raise UnsafeEntryError(rel, "device nodes other than whiteouts are not "
                                           "allowed in layers (skip_devices=True leaves "
                                           "them out)")
                skipped.append(rel)
            # sockets cannot be stored in tar; like GNU tar, skip them
    return out


def order_entries(names: Sequence[str], prioritized: Sequence[str]
                  ) -> tuple[list[int], int, list[str], list[str]]:
    """Pure planning of the blob order.

    Returns (indices of `names` in blob order, how many of them are prioritized,
    prioritized names found, prioritized names missing). Prioritized names come first in
    the given order, each preceded by its parent directories; the rest keep their order.
    """
    index = {n: i for i, n in enumerate(names)}
    first: list[int] = []
    picked: set[str] = set()
    found, missing = [], []

    def pick(name: str) -> None:
        if name in picked or name not in index:
            return
        parent = name.rpartition("/")[0]
        if parent:
            pick(parent)
        picked.add(name)
        first.append(index[name])

    for raw in prioritized:
        try:
            name = clean_name(raw)
        except FormatError:
            missing.append(raw)
            continue
        if name in index and name not in found and not name.rpartition("/")[2].startswith(
                WHITEOUT_PREFIX):
            pick(name)
            found.append(name)
        elif name not in found:
            missing.append(raw)
    rest = [i for i, n in enumerate(names) if n not in picked]
    return first + rest, len(first), found, missing


def _modtime(mtime: float) -> str:
    if int(mtime) <= 0:
        return ""
    return datetime.fromtimestamp(int(mtime), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tarinfo(name: str, kind: str, st: os.stat_result | None,
             xattrs: tuple[tuple[str, bytes], ...]) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = {"dir": tarfile.DIRTYPE, "reg": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE,
               "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
    if st is not None:
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.uid, ti.gid = st.st_uid, st.st_gid
        ti.mtime = max(0, int(st.st_mtime))
    ti.uname = ti.gname = ""
    ti.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                      for k, v in xattrs}
    return ti


def plan_partial(entries: Sequence[TOCEntry], read_ranges: Mapping[str, Sequence[tuple[int, int]]],
                 *, min_size: int | None = None, max_fraction: float | None = None
                 ) -> dict[str, list[int]]:
    """Pure: the prioritized files (entries before the prefetch landmark) to prefetch in
    part: at least `min_size` bytes, of which the recorded `read_ranges` touch chunks
    holding at most `max_fraction` of the file. Returns {name: file offsets of those
    chunks} for the TOC's PARTIAL_PREFETCH_KEY. A run that mmaps a large library touches
    little of it (OpenBLAS: ~1.7 of 35 MB at import). Defaults: PARTIAL_MIN_SIZE,
    PARTIAL_MAX_FRACTION."""
    min_size = PARTIAL_MIN_SIZE if min_size is None else min_size
    max_fraction = PARTIAL_MAX_FRACTION if max_fraction is None else max_fraction
    out: dict[str, list[int]] = {}
    pieces: dict[str, list[tuple[int, int]]] = {}      # name -> (file offset, size) of chunks
    sizes: dict[str, int] = {}
    for e, n in _payload(entries):
        if e.name == PREFETCH_LANDMARK:
            break
        if e.type == "reg":
            sizes[e.name] = e.size
        pieces.setdefault(e.name, []).append((e.chunk_offset, n))
    for name, chunks in pieces.items():
        ranges = read_ranges.get(name)
        if not ranges or sizes[name] < min_size or len(chunks) < 2:
            continue
        need = [(off, n) for off, n in chunks
                if any(lo < off + n and off < hi for lo, hi in ranges)]
        if need and sum(n for _, n in need) <= max_fraction * sizes[name]:
            out[name] = [off for off, _ in need]
    return out


def write_layer(src: Path, out: Path, *, prioritized: Iterable[str] = (),
                read_ranges: Mapping[str, Sequence[tuple[int, int]]] | None = None,
                chunk_size: int = DEFAULT_CHUNK_SIZE, level: int = 6,
                skip_devices: bool = False) -> LayerBlob:
    """Write the overlay upper dir `src` as an eStargz blob at `out` (atomically).

    `prioritized` names files to put first (the prefetch area), e.g. from a mount's
    recorder; names not in the layer are reported in `missing`, not an error. With the
    recorder's `read_ranges`, large prioritized files of which little was read are marked
    to be prefetched in part (plan_partial; our TOC extension, other readers prefetch
    them whole). Raises
    UnsafeEntryError for what cannot go into an OCI layer (device nodes unless
    `skip_devices`, '.wh.' names). The layer must not change while it is written.
    """
    if chunk_size < _BLOCK:
        raise ValueError("chunk_size must be at least 512 bytes")
    skipped: list[str] | None = [] if skip_devices else None
    scanned = _scan(Path(src), skipped)
    order, n_first, found, missing = order_entries([e.name for e in scanned],
                                                   list(prioritized))
    landmark_at = n_first if found else 0
    landmark = PREFETCH_LANDMARK if found else NO_PREFETCH_LANDMARK
    tmp = Path(f"{out}.tmp-{os.getpid()}")
    toc_entries: list[TOCEntry] = []
    primary: dict[tuple[int, int], str] = {}
    try:
        with open(tmp, "wb") as f:
            gz = _GzipMembers(f, level)
            for pos, i in enumerate(order):
                if pos == landmark_at:
                    _write_landmark(gz, landmark, toc_entries)
                _write_entry(gz, scanned[i], chunk_size, primary, toc_entries)
            if landmark_at >= len(order):
                _write_landmark(gz, landmark, toc_entries)
            partial = plan_partial(toc_entries, read_ranges or {}) if found else {}
            toc_offset = gz.new_member()          # closes the last payload member
            toc_entries = _with_member_digests(toc_entries, gz.member_digests)
            toc_json = TOC(entries=tuple(toc_entries),
                           extra={PARTIAL_PREFETCH_KEY: partial} if partial else {}
                           ).to_json_bytes()
            ti = tarfile.TarInfo(TOC_NAME)
            ti.size, ti.mode = len(toc_json), 0o644
            gz.write(ti.tobuf(tarfile.USTAR_FORMAT))
            gz.write(toc_json + b"\0" * (-len(toc_json) % _BLOCK) + b"\0" * (2 * _BLOCK))
            gz.write_raw(footer_bytes(toc_offset))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return LayerBlob(path=Path(out), digest="sha256:" + gz.blob_hash.hexdigest(), size=gz.pos,
                     diff_id="sha256:" + gz.raw_hash.hexdigest(),
                     toc_digest="sha256:" + hashlib.sha256(toc_json).hexdigest(),
                     uncompressed_size=gz.raw_n, entries=len(toc_entries),
                     prioritized=tuple(found), missing=tuple(missing),
                     skipped=tuple(skipped or ()), partial=tuple(partial))


def _with_member_digests(entries: list[TOCEntry], digests: dict[int, str]) -> list[TOCEntry]:
    """The entries with the compressed member's digest on each chunk of at least
    MEMBER_DIGEST_MIN bytes (readers then hash the member, not the ~3x larger inflated
    bytes; small chunks are not worth the TOC bytes)."""
    sized = {id(e): n for e, n in _payload(entries)}
    return [replace(e, member_digest=digests[e.offset])
            if sized.get(id(e), 0) >= MEMBER_DIGEST_MIN and e.offset in digests else e
            for e in entries]


def _payload(entries: Sequence[TOCEntry]) -> Iterator[tuple[TOCEntry, int]]:
    """Pure: the entries holding file data as written ('reg' with data = its first chunk,
    then its 'chunk' entries), each with its uncompressed size."""
    sizes: dict[str, int] = {}
    for e in entries:
        if e.type == "reg" and e.size:
            sizes[e.name] = e.size
        if e.type in ("reg", "chunk") and e.name in sizes:
            yield e, e.chunk_size or sizes[e.name] - e.chunk_offset


def _write_landmark(gz: _GzipMembers, name: str, toc: list[TOCEntry]) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode = len(LANDMARK_CONTENT), 0o644
    gz.write(ti.tobuf(tarfile.PAX_FORMAT))
    off = gz.new_member()
    gz.write(LANDMARK_CONTENT + b"\0" * (_BLOCK - len(LANDMARK_CONTENT)))
    d = "sha256:" + hashlib.sha256(LANDMARK_CONTENT).hexdigest()
    toc.append(TOCEntry(name=name, type="reg", size=1, mode=0o644, offset=off, digest=d,
                        chunk_digest=d))


def _write_entry(gz: _GzipMembers, e: _Src, chunk_size: int,
                 primary: dict[tuple[int, int], str], toc: list[TOCEntry]) -> None:
    st = e.st
    meta = TOCEntry(name=e.name, type="reg", mode=stat.S_IMODE(st.st_mode), uid=st.st_uid,
                    gid=st.st_gid, modtime=_modtime(st.st_mtime))
    if e.kind == "opaque":          # marker entry: no metadata of its own
        gz.write(_tarinfo(e.name, "reg", None, ()).tobuf(tarfile.PAX_FORMAT))
        toc.append(TOCEntry(name=e.name, type="reg"))
        return
    if e.kind == "whiteout":        # keeps the whiteout's owner and mode for the way back
        gz.write(_tarinfo(e.name, "reg", st, ()).tobuf(tarfile.PAX_FORMAT))
        toc.append(meta)
        return
    kind = e.kind
    if kind == "reg" and st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        if key in primary:
            kind = "hardlink"
        else:
            primary[key] = e.name
    ti = _tarinfo(e.name, kind, st, e.xattrs)
    if kind == "symlink":
        ti.linkname = os.readlink(e.path)
    elif kind == "hardlink":
        ti.linkname = primary[(st.st_dev, st.st_ino)]
    elif kind == "reg":
        ti.size = st.st_size
    gz.write(ti.tobuf(tarfile.PAX_FORMAT))
    entry = replace(meta, name=e.name + "/" if kind == "dir" else e.name, type=kind,
                    link_name=ti.linkname, xattrs=dict(e.xattrs))
    if kind != "reg" or ti.size == 0:
        toc.append(entry)
        return
    file_hash = hashlib.sha256()
    chunks: list[TOCEntry] = []
    with open(e.path, "rb") as fh:
        written = 0
        while written < ti.size:
            n = min(chunk_size, ti.size - written)
            data = fh.read(n)
            if len(data) != n:
                raise FormatError(f"{e.path} shrank while it was written into the layer")
            off = gz.new_member()
            gz.write(data)
            file_hash.update(data)
            chunks.append(TOCEntry(name=e.name, type="chunk", offset=off, chunk_offset=written,
                                   chunk_size=n if written + n < ti.size else 0,
                                   chunk_digest="sha256:" + hashlib.sha256(data).hexdigest()))
            written += n
    gz.write(b"\0" * (-ti.size % _BLOCK))
    first = chunks[0]
    toc.append(replace(entry, size=ti.size, digest="sha256:" + file_hash.hexdigest(),
                       offset=first.offset, chunk_size=first.chunk_size,
                       chunk_digest=first.chunk_digest))
    toc.extend(chunks[1:])
