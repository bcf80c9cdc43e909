"""Helpers for lazyfs tests (unit and integration): sample layers, tree snapshots, and a
TOC rewriter for building hostile blobs. Not used by the runtime itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

from .estargz import (
    FOOTER_SIZE,
    OPAQUE_WHITEOUT,
    OPAQUE_XATTR,
    WHITEOUT_PREFIX,
    footer_bytes,
    parse_footer,
)
from .reader import _toc_from_member

IS_ROOT = os.geteuid() == 0
MTIME = 1_700_000_000


def fuse_skip_reason(*tools: tuple[str, str]) -> str | None:
    """Why FUSE + overlay tests cannot run here (None: they can); `tools` are further
    (binary, Debian package) pairs a test module needs."""
    import shutil
    if os.geteuid() != 0:
        return "lazyfs FUSE tests need root (mount, allow_other, overlayfs)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    for tool, pkg in (*tools, ("fusermount3", "fuse3")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {pkg})"
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "pyfuse3 is not installed in this venv (pip install pyfuse3)"
    return None


def make_layer(root: Path, *, big: int = 300_000, seed: int = 7) -> Path:
    """An overlay upper dir exercising every entry kind the format must keep.

    Whiteouts, opaque dirs, trusted.* xattrs and foreign owners need root; without root
    those parts are left out (callers that need them skip).
    """
    import random
    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "etc").mkdir()
    (root / "etc/hello.txt").write_text("hello, lazy world\n")
    (root / "etc/empty").write_bytes(b"")
    (root / "usr/lib/python3").mkdir(parents=True)
    (root / "usr/lib/python3/big.bin").write_bytes(rnd.randbytes(big))
    (root / "usr/lib/python3/text.py").write_text("x = 1\n" * 5000)
    os.link(root / "etc/hello.txt", root / "usr/lib/hello-link")
    os.symlink("../etc/hello.txt", root / "usr/rel-link")
    os.symlink("/etc/hello.txt", root / "usr/abs-link")
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"#!/bin/sh\necho tool\n")
    os.chmod(root / "bin/tool", 0o4755)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    secret = root / "etc/secret"
    secret.write_text("s3cret\n")
    os.chmod(secret, 0o600)
    long_dir = root / ("d" * 120)
    long_dir.mkdir()
    (long_dir / ("f" * 150)).write_text("long names need pax headers\n")
    (root / "etc/ünïcode-名前").write_text("utf-8 name\n")
    os.mkfifo(root / "etc/fifo")
    os.setxattr(root / "etc/hello.txt", "user.origin", b"lazyfs-test")
    os.setxattr(root / "usr/lib/python3", "user.dir", b"\x00\xffbinary")
    if IS_ROOT:
        os.chown(secret, 1234, 5678)
        os.chown(root / "usr/rel-link", 42, 43, follow_symlinks=False)
        (root / "var/cache").mkdir(parents=True)
        os.setxattr(root / "var/cache", OPAQUE_XATTR, b"y")
        (root / "var/cache/fresh").write_text("only me\n")
        os.mknod(root / "etc/removed", stat.S_IFCHR | 0o000, 0)
        os.mknod(root / "var/gone", stat.S_IFCHR | 0o644, 0)
        os.setxattr(root / "bin/tool", "security.capability",
                    bytes.fromhex("0100000200200000000000000000000000000000"))
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            os.utime(os.path.join(dirpath, n), (MTIME, MTIME), follow_symlinks=False)
    os.utime(root, (MTIME, MTIME))
    return root


def snapshot(root: Path, *, xattrs: bool = True, mtimes: bool = True) -> dict[str, tuple]:
    """Everything a layer must preserve, per path; hard links by shared first name."""
    out: dict[str, tuple] = {}
    first_of: dict[tuple[int, int], str] = {}
    for dirpath, dirs, files in os.walk(root):
        for n in sorted(dirs + files):
            full = os.path.join(dirpath, n)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            key = (st.st_dev, st.st_ino)
            link_group = first_of.setdefault(key, rel) if not stat.S_ISDIR(st.st_mode) else rel
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(Path(full).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(full)
            else:
                content = ""
            xs: tuple = ()
            if xattrs:
                xs = tuple(sorted((k, os.getxattr(full, k, follow_symlinks=False))
                                  for k in os.listxattr(full, follow_symlinks=False)))
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                        st.st_gid, st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                        st.st_rdev, content, xs, int(st.st_mtime) if mtimes and not
                        stat.S_ISDIR(st.st_mode) else 0, link_group)
    return out


def oci_form(snap: dict[str, tuple], *, xattrs: bool = True) -> dict[str, tuple]:
    """What a plain tar extraction of our blob shows for an overlay-form snapshot (taken
    with xattrs): whiteouts as empty `.wh.NAME` files, opaque dirs with a `.wh..wh..opq`
    file; `xattrs=False` drops xattrs from the result (tools that do not restore them)."""
    out: dict[str, tuple] = {}
    for rel, t in snap.items():
        parent, _, base = rel.rpartition("/")
        if t[0] == stat.S_IFCHR and t[5] == 0:
            name = f"{parent}/{WHITEOUT_PREFIX}{base}" if parent else WHITEOUT_PREFIX + base
            out[name] = (stat.S_IFREG, t[1], t[2], t[3], 0, 0,
                         hashlib.sha256(b"").hexdigest(), (), t[8], name)
            continue
        xs = tuple(x for x in t[7] if xattrs and not x[0].startswith("trusted.overlay."))
        out[rel] = t[:7] + (xs,) + t[8:]
        if dict(t[7]).get(OPAQUE_XATTR) == b"y":
            name = f"{rel}/{OPAQUE_WHITEOUT}"
            out[name] = (stat.S_IFREG, 0o644, 0, 0, 0, 0, hashlib.sha256(b"").hexdigest(),
                         (), 0, name)
    return out


def rewrite_toc(blob: bytes, mutate: Callable[[dict], object]) -> bytes:
    """A copy of `blob` whose TOC JSON went through `mutate(toc_dict)` (in place)."""
    toc_offset = parse_footer(blob[-FOOTER_SIZE:])
    doc = json.loads(_toc_from_member(blob[toc_offset:-FOOTER_SIZE]))
    mutate(doc)
    data = json.dumps(doc).encode()
    ti = tarfile.TarInfo("stargz.index.json")
    ti.size, ti.mode = len(data), 0o644
    raw = ti.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512) + b"\0" * 1024
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    member = z.compress(raw) + z.flush()
    return blob[:toc_offset] + member + footer_bytes(toc_offset)


def toc_digest_of(blob: bytes) -> str:
    toc_offset = parse_footer(blob[-FOOTER_SIZE:])
    return "sha256:" + hashlib.sha256(_toc_from_member(blob[toc_offset:-FOOTER_SIZE])).hexdigest()


def oci_archive(src: Path, out: Path, tag: str = "v1") -> str:
    """Write `src` (in OCI form) as a one-layer OCI image archive (plain tar.gz layer) that
    `ctr images import` accepts; returns the manifest digest."""
    import gzip
    import io

    def digest(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        for dirpath, dirs, files in os.walk(src):
            dirs.sort()
            for n in sorted(dirs) + sorted(files):
                full = os.path.join(dirpath, n)
                t.add(full, arcname=os.path.relpath(full, src), recursive=False)
    layer = gzip.compress(raw.getvalue(), mtime=0)
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": [digest(raw.getvalue())]}}).encode()
    man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                 "digest": digest(cfg), "size": len(cfg)},
                      "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                  "digest": digest(layer), "size": len(layer)}]}).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(man),
         "size": len(man), "annotations": {"org.opencontainers.image.ref.name": tag}}]}).encode()
    with tarfile.open(out, "w") as t:
        for name, data in [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
                           ("index.json", index)] + [
                ("blobs/sha256/" + digest(d)[7:], d) for d in (layer, cfg, man)]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return digest(man)


def read_oci_archive(archive: Path, dest: Path) -> tuple[dict, Path]:
    """Unpack an OCI image archive; returns (manifest, dir of blobs/sha256)."""
    with tarfile.open(archive) as t:
        t.extractall(dest, filter="data")
    blobs = dest / "blobs/sha256"
    index = json.loads((dest / "index.json").read_text())
    desc = index["manifests"][0]
    doc = json.loads((blobs / desc["digest"][7:]).read_text())
    if "manifests" in doc:                     # an image index: take the first manifest
        doc = json.loads((blobs / doc["manifests"][0]["digest"][7:]).read_text())
    return doc, blobs
