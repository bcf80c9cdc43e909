"""Layer archives: an overlay upper dir as a zstd-compressed tar, and its safe unpacking.

Overlay whiteouts (0/0 character devices) and opaque dirs (the
`trusted.overlay.opaque` xattr, carried as a SCHILY.xattr pax header as GNU tar
does) survive the round trip, so an unpacked layer works directly as an
overlayfs lower dir. Unpacking refuses anything that could write outside the
destination: absolute names, `..`, hard links out of the tree, writes through
symlinks, device nodes other than whiteouts.
"""
from __future__ import annotations

import hashlib
import io
import os
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path

import zstandard

OPAQUE = "trusted.overlay.opaque"
PAX_OPAQUE = "SCHILY.xattr." + OPAQUE


class UnsafeArchiveError(ValueError):
    """The archive tried to write outside its destination or holds forbidden entries."""


@dataclass(frozen=True)
class PackedLayer:
    digest: str     # sha256 of the compressed archive
    size: int       # compressed bytes
    raw_size: int   # bytes of file data in the layer


class _HashingWriter(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)


def pack_layer(src: Path, out: Path, level: int = 3) -> PackedLayer:
    """Write `src` (an overlay upper dir) as tar.zst to `out`; sorted, so deterministic order."""
    raw = 0
    with open(out, "wb") as f:
        hw = _HashingWriter(f)
        cctx = zstandard.ZstdCompressor(level=level, threads=-1)
        with cctx.stream_writer(hw, closefd=False) as zw, \
                tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for root, dirs, files in os.walk(src):
                dirs.sort()
                for name in sorted(dirs) + sorted(files):
                    full = os.path.join(root, name)
                    arc = os.path.relpath(full, src)
                    ti = tar.gettarinfo(full, arcname=arc)
                    if ti.isdir():
                        try:
                            if os.getxattr(full, OPAQUE, follow_symlinks=False) == b"y":
                                ti.pax_headers[PAX_OPAQUE] = "y"
                        except OSError:
                            pass
                    if ti.isreg():
                        raw += ti.size
                        with open(full, "rb") as fh:
                            tar.addfile(ti, fh)
                    else:
                        tar.addfile(ti)
        f.flush()
        os.fsync(f.fileno())
    return PackedLayer(hw.h.hexdigest(), hw.n, raw)


def _check_member(m: tarfile.TarInfo, dest: str) -> None:
    name = m.name
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or not parts:
        raise UnsafeArchiveError(f"refusing archive entry {name!r}: absolute or '..' path")
    # The parent, as it exists on disk now, must resolve inside dest (no writes via symlinks).
    parent = os.path.realpath(os.path.join(dest, *parts[:-1]))
    if parent != dest and not parent.startswith(dest + os.sep):
        raise UnsafeArchiveError(f"refusing archive entry {name!r}: its parent leaves the layer")
    if m.islnk():
        target = posixpath.normpath(m.linkname)
        if target.startswith("/") or target.startswith(".."):
            raise UnsafeArchiveError(f"refusing hard link {name!r} -> {m.linkname!r}")
        # os.link follows symlinks: the target as it resolves on disk must stay inside.
        real = os.path.realpath(os.path.join(dest, target))
        if real != dest and not real.startswith(dest + os.sep):
            raise UnsafeArchiveError(f"refusing hard link {name!r} -> {m.linkname!r}: "
                                     "it resolves outside the layer")
    if m.isdev() or m.isfifo():
        if not (m.ischr() and m.devmajor == 0 and m.devminor == 0):
            raise UnsafeArchiveError(f"refusing device node {name!r} (only whiteouts allowed)")


def _clear_target(path: str) -> None:
    """An entry replaces what an earlier entry left at its name; tarfile would otherwise
    write through a symlink (or into a hard link) placed there by the archive."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        os.unlink(path)


def unpack_layer(archive: Path, dest: Path) -> int:
    """Unpack a tar.zst layer into `dest` (created); returns the number of entries."""
    dest.mkdir(parents=True, exist_ok=True)
    dest_s = os.path.realpath(dest)
    opaque: list[str] = []
    count = 0
    dctx = zstandard.ZstdDecompressor()
    with open(archive, "rb") as f, dctx.stream_reader(f) as zr, \
            tarfile.open(fileobj=zr, mode="r|") as tar:
        for m in tar:
            _check_member(m, dest_s)
            _clear_target(os.path.join(dest_s, m.name))
            if m.pax_headers.get(PAX_OPAQUE) == "y":
                opaque.append(m.name)
            tar.extract(m, dest_s, set_attrs=True, numeric_owner=True, filter="fully_trusted")
            count += 1
    for name in opaque:
        os.setxattr(os.path.join(dest_s, name), OPAQUE, b"y", follow_symlinks=False)
    return count
