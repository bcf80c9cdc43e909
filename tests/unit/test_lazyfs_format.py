"""eStargz format: write -> read -> identical tree; plain tar tools read the same blob;
structure per the spec (footer, TOC last, gzip member per payload, landmarks, digests)."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from lazyfs import TOC, FileBlobSource, extract, open_estargz, write_layer
from lazyfs.errors import FormatError, UnsafeEntryError
from lazyfs.estargz import FOOTER_SIZE, footer_bytes, order_entries, parse_footer
from lazyfs.reader import blob_info
from lazyfs.testing import IS_ROOT, make_layer, oci_form, snapshot
from lazyfs.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOCEntry

CHUNK = 64 * 1024


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    return make_layer(tmp_path / "layer")


@pytest.fixture
def blob(layer: Path, tmp_path: Path):
    return write_layer(layer, tmp_path / "layer.esgz", chunk_size=CHUNK,
                       prioritized=["usr/lib/python3/text.py", "etc/hello.txt", "nope/missing"])


def _open(b):
    return open_estargz(FileBlobSource(b.path), b.toc_digest)


def test_round_trip_is_identical(layer: Path, blob, tmp_path: Path):
    out = tmp_path / "out"
    n = extract(_open(blob), out)
    assert n == len(snapshot(layer))
    assert snapshot(out) == snapshot(layer)


@pytest.mark.skipif(not IS_ROOT, reason="whiteouts, opaque dirs and foreign owners need root")
def test_round_trip_keeps_overlay_metadata(layer: Path, blob, tmp_path: Path):
    out = tmp_path / "out"
    extract(_open(blob), out)
    st = os.lstat(out / "etc/removed")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and stat.S_IMODE(st.st_mode) == 0
    assert os.getxattr(out / "var/cache", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(out / "bin/tool", "security.capability")[:4] == bytes.fromhex("01000002")
    assert os.stat(out / "bin/tool").st_mode & 0o7777 == 0o4755
    assert (os.stat(out / "etc/secret").st_uid, os.stat(out / "etc/secret").st_gid) == (1234, 5678)
    assert os.stat(out / "etc/hello.txt").st_ino == os.stat(out / "usr/lib/hello-link").st_ino


def test_python_tarfile_extracts_the_same_files(layer: Path, blob, tmp_path: Path):
    out = tmp_path / "tar-py"
    with tarfile.open(blob.path, "r:gz") as tar:
        tar.extractall(out, filter="fully_trusted", numeric_owner=True)
    extra = {"stargz.index.json", PREFETCH_LANDMARK}
    assert extra <= set(os.listdir(out))
    assert (out / PREFETCH_LANDMARK).read_bytes() == b"\x0f"
    toc = json.loads((out / "stargz.index.json").read_bytes())
    assert toc["version"] == 1
    for name in extra:
        os.unlink(out / name)
    assert snapshot(out, xattrs=False, mtimes=False) == oci_form(
        snapshot(layer, mtimes=False), xattrs=False)


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed")
def test_gnu_tar_extracts_the_same_files(layer: Path, blob, tmp_path: Path):
    out = tmp_path / "tar-gnu"
    out.mkdir()
    r = subprocess.run(["tar", "-xzf", str(blob.path), "-C", str(out), "--numeric-owner",
                        "--xattrs", "--xattrs-include=*", "--same-permissions"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    os.unlink(out / "stargz.index.json")
    os.unlink(out / PREFETCH_LANDMARK)
    assert snapshot(out, mtimes=False) == oci_form(snapshot(layer, mtimes=False))


def test_blob_structure_follows_the_spec(blob):
    data = blob.path.read_bytes()
    assert blob.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert blob.size == len(data)
    raw = gzip.decompress(data)                    # one valid multi-member gzip stream
    assert blob.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert blob.uncompressed_size == len(raw)
    footer = data[-FOOTER_SIZE:]
    toc_offset = parse_footer(footer)
    assert footer == footer_bytes(toc_offset) and len(footer) == 51
    assert footer[16:38] == b"%016xSTARGZ" % toc_offset
    assert data[toc_offset:toc_offset + 2] == b"\x1f\x8b"
    e = _open(blob)
    assert e.toc_digest == blob.toc_digest
    names = [x.name for x in e.toc.entries]
    assert names[:5] == ["usr/", "usr/lib/", "usr/lib/python3/", "usr/lib/python3/text.py",
                         "etc/"]
    assert names[5:7] == ["etc/hello.txt", PREFETCH_LANDMARK]
    assert "stargz.index.json" not in names
    big = [x for x in e.toc.entries if x.name == "usr/lib/python3/big.bin" or (
        x.type == "chunk" and x.name == "usr/lib/python3/big.bin")]
    assert [x.type for x in big] == ["reg"] + ["chunk"] * (len(big) - 1)
    assert len(big) == -(-300_000 // CHUNK)
    assert big[0].size == 300_000 and big[0].chunk_size == CHUNK and big[-1].chunk_size == 0
    for x in e.toc.entries:
        if x.type == "chunk" or (x.type == "reg" and x.size):
            assert x.chunk_digest.startswith("sha256:")
            assert data[x.offset:x.offset + 2] == b"\x1f\x8b", x.name   # own gzip member
    landmark = next(x for x in e.toc.entries if x.name == PREFETCH_LANDMARK)
    assert e.tree.prefetch_end == landmark.offset
    assert e.tree.prioritized == ("usr/lib/python3/text.py", "etc/hello.txt")
    assert blob.prioritized == ("usr/lib/python3/text.py", "etc/hello.txt")
    assert blob.missing == ("nope/missing",)
    assert e.verify_all() == sum(n.size for n in e.tree.nodes.values())


def test_no_prioritized_files_puts_the_no_prefetch_landmark_first(layer: Path, tmp_path: Path):
    b = write_layer(layer, tmp_path / "plain.esgz")
    e = _open(b)
    assert e.toc.entries[0].name == NO_PREFETCH_LANDMARK
    assert e.tree.prefetch_end == 0 and e.tree.prioritized == ()


def test_writing_is_deterministic_and_blob_info_agrees(layer: Path, blob, tmp_path: Path):
    again = write_layer(layer, tmp_path / "again.esgz", chunk_size=CHUNK,
                        prioritized=["usr/lib/python3/text.py", "etc/hello.txt"])
    assert again.digest == blob.digest and again.toc_digest == blob.toc_digest
    info = blob_info(blob.path)
    assert (info.digest, info.diff_id, info.toc_digest, info.size) == (
        blob.digest, blob.diff_id, blob.toc_digest, blob.size)


def test_toc_json_round_trip_and_go_field_names():
    e = TOCEntry(name="a/b", type="reg", size=3, mode=0o644, uid=1, gid=2, offset=10,
                 xattrs={"user.x": b"\x00\xff"}, chunk_digest="sha256:" + "0" * 64)
    obj = e.to_json()
    assert obj["xattrs"] == {"user.x": "AP8="} and obj["chunkDigest"].startswith("sha256:")
    assert "linkName" not in obj and "devMajor" not in obj        # omitempty
    toc = TOC(entries=(e,))
    assert TOC.parse(toc.to_json_bytes()) == toc


def test_order_entries_puts_parents_first_and_reports_missing():
    names = ["a", "a/b", "a/b/c", "d", "d/e", "f"]
    order, n_first, found, missing = order_entries(names, ["d/e", "a/b/c", "zz", "../x"])
    assert [names[i] for i in order] == ["d", "d/e", "a", "a/b", "a/b/c", "f"]
    assert n_first == 5 and found == ["d/e", "a/b/c"] and missing == ["zz", "../x"]


def test_source_names_that_oci_cannot_hold_are_refused(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / ".wh.sneaky").write_text("x")
    with pytest.raises(UnsafeEntryError, match="wh"):
        write_layer(src, tmp_path / "x.esgz")
    assert not (tmp_path / "x.esgz").exists()


@pytest.mark.skipif(not IS_ROOT, reason="mknod of a real device node needs root")
def test_device_nodes_are_refused_on_write(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with pytest.raises(UnsafeEntryError, match="device"):
        write_layer(src, tmp_path / "x.esgz")


def test_footer_parser_rejects_garbage():
    with pytest.raises(FormatError):
        parse_footer(b"\0" * FOOTER_SIZE)
    bad = bytearray(footer_bytes(1234))
    bad[20] = ord("g")                              # inside the hex offset
    with pytest.raises(FormatError, match="hex"):
        parse_footer(bytes(bad))
    with pytest.raises(FormatError, match="STARGZ"):
        parse_footer(footer_bytes(1234).replace(b"STARGZ", b"STARGY"))
