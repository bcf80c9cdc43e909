"""runtimed.archive: layer archives (overlay upper dirs as tar.zst) and their safe unpacking."""
from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from runtimed.archive import OPAQUE, PAX_OPAQUE, UnsafeArchiveError, pack_layer, unpack_layer

root_only = pytest.mark.skipif(os.geteuid() != 0,
                               reason="device nodes and trusted.* xattrs need root")


# -- helpers -------------------------------------------------------------------------------------
def tree(root: Path) -> dict[str, tuple]:
    """Everything under root: kind, mode and content/target, for comparisons."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
            elif stat.S_ISCHR(st.st_mode):
                out[rel] = ("chr", os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                out[rel] = ("other", st.st_mode)
    return out


def make_archive(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in entries:
            if data is not None:
                ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
    return path


def reg(name: str, data: bytes = b"data") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def sym(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.SYMTYPE, target
    return ti, None


def hard(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.LNKTYPE, target
    return ti, None


def dev(name: str, kind=tarfile.CHRTYPE, major=0, minor=0) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.devmajor, ti.devminor = kind, major, minor
    return ti, None


def dirent(name: str, mode=0o755) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode = tarfile.DIRTYPE, mode
    return ti, None


@pytest.fixture
def sandbox(tmp_path):
    """dest (where we unpack) next to outside (which must never change)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("original")
    dest = tmp_path / "dest"
    return tmp_path, dest, outside


def assert_outside_untouched(tmp_path: Path, outside: Path, before: dict) -> None:
    assert tree(outside) == before
    assert os.stat(outside / "victim").st_nlink == 1
    # nothing appeared next to dest either
    assert {p.name for p in tmp_path.iterdir()} <= {"outside", "dest", "a.tar.zst"}


# -- round trip ----------------------------------------------------------------------------------
def make_layer(src: Path) -> None:
    (src / "usr" / "bin").mkdir(parents=True)
    (src / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "usr" / "bin" / "tool").chmod(0o755)
    (src / "etc").mkdir()
    (src / "etc" / "secret").write_text("s3cret")
    (src / "etc" / "secret").chmod(0o600)
    (src / "etc" / "private").mkdir(mode=0o700)
    (src / "etc" / "private").chmod(0o700)
    (src / "usr" / "bin" / "tool-link").symlink_to("tool")
    (src / "abs-link").symlink_to("/usr/bin/tool")
    (src / "dangling").symlink_to("does/not/exist")
    os.link(src / "usr" / "bin" / "tool", src / "usr" / "hard-tool")
    (src / "empty").mkdir()
    (src / "big.bin").write_bytes(os.urandom(300_000))


def test_pack_unpack_round_trip(tmp_path):
    src, out, dest = tmp_path / "src", tmp_path / "layer.tar.zst", tmp_path / "dest"
    src.mkdir()
    make_layer(src)
    packed = pack_layer(src, out)
    assert packed.size == out.stat().st_size
    import hashlib
    assert packed.digest == hashlib.sha256(out.read_bytes()).hexdigest()
    # file bytes, the hard link counted once
    assert packed.raw_size == len(b"#!/bin/sh\necho hi\n") + len("s3cret") + 300_000
    n = unpack_layer(out, dest)
    assert n == len(tree(src))
    assert tree(dest) == tree(src)
    a, b = (dest / "usr" / "bin" / "tool").stat(), (dest / "usr" / "hard-tool").stat()
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)         # still one file, two names


def test_pack_is_deterministic(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_layer(src)
    a = pack_layer(src, tmp_path / "a.tar.zst")
    b = pack_layer(src, tmp_path / "b.tar.zst")
    assert a == b


@root_only
def test_whiteouts_and_opaque_dirs_survive(tmp_path):
    src, out, dest = tmp_path / "src", tmp_path / "layer.tar.zst", tmp_path / "dest"
    (src / "opaque").mkdir(parents=True)
    (src / "opaque" / "kept").write_text("k")
    os.setxattr(src / "opaque", OPAQUE, b"y")
    os.mknod(src / "deleted", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    pack_layer(src, out)
    unpack_layer(out, dest)
    st = (dest / "deleted").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert os.getxattr(dest / "opaque", OPAQUE) == b"y"
    assert (dest / "opaque" / "kept").read_text() == "k"


def test_opaque_pax_header_is_written(tmp_path):
    """As non-root too: the pax header is produced from the xattr when it can be read."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    out = tmp_path / "l.tar.zst"
    pack_layer(src, out)
    raw = zstandard.ZstdDecompressor().stream_reader(open(out, "rb")).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert PAX_OPAQUE not in tar.getmember("d").pax_headers


# -- unsafe archives ---------------------------------------------------------------------------------
UNSAFE = {
    "dotdot": [reg("../evil")],
    "dotdot_nested": [dirent("a"), reg("a/../../evil")],
    "absolute": [reg("/tmp/evil-abs-runtimed-test")],
    "symlink_dir_then_write": [sym("d", "{outside}"), reg("d/new")],
    "relative_symlink_dir_then_write": [sym("d", "../outside"), reg("d/new")],
    "symlink_chain_then_write": [sym("a", "."), sym("b", "a/../../outside"), reg("b/new")],
    "hardlink_absolute": [hard("h", "{outside}/victim")],
    "hardlink_dotdot": [hard("h", "../outside/victim")],
    "hardlink_through_symlink": [sym("d", "{outside}"), hard("h", "d/victim"),
                                 reg("h", b"pwned")],
    "hardlink_to_symlink_outside": [sym("s", "{outside}/victim"), hard("h", "s"),
                                    reg("h", b"pwned")],
    "char_device": [dev("null2", tarfile.CHRTYPE, 1, 3)],
    "block_device": [dev("sda", tarfile.BLKTYPE, 8, 0)],
    "fifo": [dev("fifo", tarfile.FIFOTYPE)],
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archives_are_refused(sandbox, case):
    tmp_path, dest, outside = sandbox
    entries = []
    for ti, data in UNSAFE[case]:
        ti.linkname = ti.linkname.replace("{outside}", str(outside))
        entries.append((ti, data))
    before = tree(outside)
    arc = make_archive(tmp_path / "a.tar.zst", entries)
    with pytest.raises(UnsafeArchiveError):
        unpack_layer(arc, dest)
    assert_outside_untouched(tmp_path, outside, before)
    assert not Path("/tmp/evil-abs-runtimed-test").exists()


@pytest.mark.parametrize("entries", [
    # a later entry of the same name replaces a symlink: it must not write through it
    [sym("s", "{outside}/victim"), reg("s", b"pwned")],
    [sym("s", "../outside/victim"), reg("s", b"pwned")],
    # ... nor chmod/chown the directory the symlink points at
    [sym("s", "{outside}"), dirent("s", 0o777)],
], ids=["file-over-abs-symlink", "file-over-rel-symlink", "dir-over-symlink"])
def test_entries_replace_symlinks_instead_of_writing_through(sandbox, entries):
    tmp_path, dest, outside = sandbox
    fixed = []
    for ti, data in entries:
        ti.linkname = ti.linkname.replace("{outside}", str(outside))
        fixed.append((ti, data))
    before = tree(outside)
    outside_mode = stat.S_IMODE(outside.stat().st_mode)
    arc = make_archive(tmp_path / "a.tar.zst", fixed)
    try:
        unpack_layer(arc, dest)
    except UnsafeArchiveError:
        pass                                     # refusing is fine too
    else:
        assert not (dest / "s").is_symlink()     # replaced
    assert_outside_untouched(tmp_path, outside, before)
    assert stat.S_IMODE(outside.stat().st_mode) == outside_mode


def test_safe_links_inside_the_layer_are_fine(sandbox):
    tmp_path, dest, outside = sandbox
    arc = make_archive(tmp_path / "a.tar.zst", [
        dirent("usr"), dirent("usr/bin"), reg("usr/bin/python3.11", b"ELF"),
        sym("usr/bin/python3", "python3.11"), sym("usr/bin/py-abs", "/usr/bin/python3"),
        hard("usr/bin/python-hard", "usr/bin/python3.11"), sym("lib", "usr/lib"),
        sym("to-outside", "/etc/passwd"),     # a symlink may point anywhere: never followed
    ])
    unpack_layer(arc, dest)
    assert (dest / "usr/bin/python-hard").read_bytes() == b"ELF"
    assert os.readlink(dest / "usr/bin/py-abs") == "/usr/bin/python3"
    assert os.readlink(dest / "to-outside") == "/etc/passwd"


@root_only
def test_whiteout_char_device_is_allowed(sandbox):
    tmp_path, dest, outside = sandbox
    arc = make_archive(tmp_path / "a.tar.zst", [dev("gone"), dirent("d"), dev("d/gone-too")])
    assert unpack_layer(arc, dest) == 3
    for p in (dest / "gone", dest / "d" / "gone-too"):
        st = p.lstat()
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
