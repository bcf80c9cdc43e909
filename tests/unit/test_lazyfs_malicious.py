"""Hostile and broken blobs: every one fails with a typed error, and nothing is written
outside the extraction destination."""
from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from lazyfs import FileBlobSource, extract, open_estargz, write_layer
from lazyfs.errors import DigestMismatchError, FormatError, UnsafeEntryError
from lazyfs.estargz import FOOTER_SIZE, footer_bytes, parse_footer
from lazyfs.testing import make_layer, rewrite_toc, toc_digest_of


@pytest.fixture
def good(tmp_path: Path) -> bytes:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a/file").write_bytes(b"payload " * 4000)
    (src / "a/small").write_text("small\n")
    os.symlink("file", src / "a/link")
    return write_layer(src, tmp_path / "good.esgz", chunk_size=8192).path.read_bytes()


def _open_bytes(tmp_path: Path, data: bytes, name: str = "bad.esgz", **kw):
    p = tmp_path / name
    p.write_bytes(data)
    return open_estargz(FileBlobSource(p), **kw)


def _entries(doc: dict, name: str) -> list[dict]:
    return [e for e in doc["entries"] if e["name"].rstrip("/") == name]


def _outside_untouched(tmp_path: Path, blob) -> None:
    """Extract into a fresh dir under a sentinel dir; only that dir may appear."""
    outer = tmp_path / "outer"
    outer.mkdir()
    before = set(os.listdir(tmp_path))
    with pytest.raises(FormatError):
        extract(blob, outer / "dest")
    assert set(os.listdir(outer)) <= {"dest"}
    assert set(os.listdir(tmp_path)) == before


def test_the_good_blob_opens(tmp_path: Path, good: bytes):
    e = _open_bytes(tmp_path, good, toc_digest=toc_digest_of(good))
    assert e.read_file("a/small") == b"small\n"


@pytest.mark.parametrize("cut", [1, FOOTER_SIZE, 500, "half"])
def test_truncated_blob(tmp_path: Path, good: bytes, cut):
    n = len(good) // 2 if cut == "half" else cut
    with pytest.raises(FormatError):
        _open_bytes(tmp_path, good[:-n])


def test_tiny_and_plain_gzip_blobs_are_not_estargz(tmp_path: Path):
    with pytest.raises(FormatError, match="too small"):
        _open_bytes(tmp_path, b"\x1f\x8b", "tiny")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        ti = tarfile.TarInfo("x")
        ti.size = 1000
        t.addfile(ti, io.BytesIO(b"x" * 1000))
    with pytest.raises(FormatError, match="footer"):
        _open_bytes(tmp_path, buf.getvalue() + b"\0" * 100, "plain")


def test_toc_offset_outside_the_blob(tmp_path: Path, good: bytes):
    for offset in (len(good) + 10, len(good) - FOOTER_SIZE, 2**60):
        bad = good[:-FOOTER_SIZE] + footer_bytes(offset)
        with pytest.raises(FormatError, match="outside"):
            _open_bytes(tmp_path, bad)


def test_toc_offset_pointing_at_file_data(tmp_path: Path, good: bytes):
    # a member that is not the TOC: must fail as a format error, never parse as a TOC
    e = _open_bytes(tmp_path, good)
    off = e.tree.lookup("a/file").chunks[0].offset
    with pytest.raises(FormatError):
        _open_bytes(tmp_path, good[:-FOOTER_SIZE] + footer_bytes(off))


def test_toc_digest_mismatch(tmp_path: Path, good: bytes):
    with pytest.raises(DigestMismatchError) as ei:
        _open_bytes(tmp_path, good, toc_digest="sha256:" + "0" * 64)
    assert ei.value.actual == toc_digest_of(good)
    tampered = rewrite_toc(good, lambda d: _entries(d, "a/small")[0].update(mode=0o4777))
    with pytest.raises(DigestMismatchError):
        _open_bytes(tmp_path, tampered, toc_digest=toc_digest_of(good))


def test_wrong_chunk_digest_is_caught_on_read_and_extract(tmp_path: Path, good: bytes):
    bad = rewrite_toc(good, lambda d: _entries(d, "a/small")[0].update(
        chunkDigest="sha256:" + "1" * 64))
    e = _open_bytes(tmp_path, bad)
    with pytest.raises(DigestMismatchError, match="chunk"):
        e.read_file("a/small")
    _outside_untouched(tmp_path, e)


def test_flipped_payload_byte(tmp_path: Path, good: bytes):
    e = _open_bytes(tmp_path, good)
    c = e.tree.lookup("a/file").chunks[1]
    data = bytearray(good)
    data[c.offset + 20] ^= 0x55
    e2 = _open_bytes(tmp_path, bytes(data), "flipped")
    with pytest.raises(FormatError):       # bad deflate data or digest mismatch
        e2.read_file("a/file")


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "a/\x00b"])
def test_hostile_names_are_refused(tmp_path: Path, good: bytes, name: str):
    bad = rewrite_toc(good, lambda d: _entries(d, "a/small")[0].update(name=name))
    with pytest.raises(UnsafeEntryError):
        _open_bytes(tmp_path, bad)


def test_hostile_chunk_name_is_refused(tmp_path: Path, good: bytes):
    def mutate(d):
        next(e for e in d["entries"] if e["type"] == "chunk")["name"] = "../../evil"
    with pytest.raises(UnsafeEntryError):
        _open_bytes(tmp_path, rewrite_toc(good, mutate))


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/passwd", "a/nothere", "a"])
def test_hard_links_out_of_the_tree_are_refused(tmp_path: Path, good: bytes, target: str):
    def mutate(d):
        d["entries"].append({"name": "a/hl", "type": "hardlink", "linkName": target,
                             "mode": 0o644})
    with pytest.raises(UnsafeEntryError):
        _open_bytes(tmp_path, rewrite_toc(good, mutate))


def test_writing_through_a_symlink_is_refused(tmp_path: Path, good: bytes):
    def mutate(d):
        d["entries"] += [{"name": "esc", "type": "symlink", "linkName": str(tmp_path),
                          "mode": 0o777},
                         {"name": "esc/pwned", "type": "reg", "mode": 0o644}]
    with pytest.raises(UnsafeEntryError, match="not a directory"):
        _open_bytes(tmp_path, rewrite_toc(good, mutate))
    assert not (tmp_path / "pwned").exists()


def test_device_nodes_are_refused(tmp_path: Path, good: bytes):
    def mutate(d):
        d["entries"].append({"name": "a/mem", "type": "char", "devMajor": 1, "devMinor": 1,
                             "mode": 0o666})
    with pytest.raises(UnsafeEntryError, match="device"):
        _open_bytes(tmp_path, rewrite_toc(good, mutate))


def test_chunk_offsets_outside_the_data_area(tmp_path: Path, good: bytes):
    toc_offset = parse_footer(good[-FOOTER_SIZE:])
    for off in (toc_offset, len(good) + 100):
        bad = rewrite_toc(good, lambda d, o=off: _entries(d, "a/small")[0].update(offset=o))
        with pytest.raises(FormatError, match="outside"):
            _open_bytes(tmp_path, bad)


@pytest.mark.parametrize("field,value", [("size", 10**9), ("chunkOffset", 5),
                                         ("chunkSize", 10**6)])
def test_inconsistent_chunks(tmp_path: Path, good: bytes, field: str, value: int):
    def mutate(d):
        first = next(e for e in d["entries"] if e["name"] == "a/file")
        first[field] = value
    with pytest.raises(FormatError):
        _open_bytes(tmp_path, rewrite_toc(good, mutate))


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(version=2),
    lambda d: d.update(entries="nope"),
    lambda d: d["entries"].append({"name": "x", "type": "socket"}),
    lambda d: d["entries"].append({"name": "x", "type": "reg", "size": -1}),
    lambda d: d["entries"].append({"name": "x", "type": "reg", "mode": "0644"}),
    lambda d: d["entries"].append({"name": "x", "type": "reg", "xattrs": {"user.a": "!!"}}),
    lambda d: d["entries"].append({"name": "x", "type": "reg", "chunkDigest": "md5:00"}),
    lambda d: d["entries"].insert(0, {"name": "x", "type": "chunk", "offset": 5}),
])
def test_malformed_toc_fields(tmp_path: Path, good: bytes, mutate):
    with pytest.raises(FormatError):
        _open_bytes(tmp_path, rewrite_toc(good, mutate))


def test_garbage_toc_member(tmp_path: Path, good: bytes):
    toc_offset = parse_footer(good[-FOOTER_SIZE:])
    junk = gzip.compress(b"not a tar at all" * 40)
    bad = good[:toc_offset] + junk + footer_bytes(toc_offset)
    with pytest.raises(FormatError, match="TOC"):
        _open_bytes(tmp_path, bad)


@pytest.mark.parametrize("raw,want", [
    ("usr/lib/x.py", "usr/lib/x.py"), (".hidden/x", ".hidden/x"), ("a/.b/c", "a/.b/c"),
    ("a/..b", "a/..b"), ("a./b", "a./b"), ("dir/", "dir"), ("./a/./b", "a/b"), ("", ""),
    ("a//b", "a/b"), ("a/.", "a"),
])
def test_clean_name_keeps_dot_names_and_drops_dot_parts(raw: str, want: str):
    from lazyfs.toc import clean_name
    assert clean_name(raw) == want


@pytest.mark.parametrize("raw", ["../x", "a/../b", "a/..", "/etc/passwd", "a\x00b", ".."])
def test_clean_name_refuses_escapes(raw: str):
    from lazyfs.toc import clean_name
    with pytest.raises(UnsafeEntryError):
        clean_name(raw)


def test_a_republished_estargz_must_keep_the_layers_chunk_digests(tmp_path: Path):
    """A node republishes a layer's eStargz with its working set first; the dispatcher
    takes it only if nodes, which verify each chunk against its chunk digest, would read
    the layer's own bytes: other bytes under the old files' digests are refused."""
    import shutil

    from runtimed.dispatcher import _same_layer_files
    from sdk.exception import InvalidError
    layer = tmp_path / "layer"
    (layer / "pkg").mkdir(parents=True)
    (layer / "pkg/a.py").write_text("print('the real one')\n")
    (layer / "pkg/b.bin").write_bytes(os.urandom(200_000))
    old = write_layer(layer, tmp_path / "old.esgz", chunk_size=64 * 1024)
    ok = write_layer(layer, tmp_path / "ok.esgz", chunk_size=64 * 1024, prioritized=["pkg/a.py"])
    assert _same_layer_files(old.path, ok.path, ok.toc_digest) == 1
    evil = tmp_path / "evil"
    shutil.copytree(layer, evil)
    st = os.stat(layer / "pkg/a.py")
    (evil / "pkg/a.py").write_text("print('the other one')\n")
    os.utime(evil / "pkg/a.py", ns=(st.st_atime_ns, st.st_mtime_ns))
    other = write_layer(evil, tmp_path / "other.esgz", chunk_size=64 * 1024,
                        prioritized=["pkg/a.py"])
    want = {e.name: e.digest for e in open_estargz(FileBlobSource(old.path)).toc.entries
            if e.digest}

    def same_file_digests(doc: dict) -> None:      # the TOC claims the layer's files
        for e in doc["entries"]:
            if e["name"] in want and e.get("digest"):
                e["digest"] = want[e["name"]]
    data = rewrite_toc(other.path.read_bytes(), same_file_digests)
    (tmp_path / "forged.esgz").write_bytes(data)
    with pytest.raises(InvalidError, match="chunks differ"):
        _same_layer_files(old.path, tmp_path / "forged.esgz", toc_digest_of(data))


def test_large_chunks_carry_member_digests_that_readers_check(tmp_path: Path):
    import hashlib

    from lazyfs.estargz import MEMBER_DIGEST_MIN
    from lazyfs.reader import decode_chunk
    layer = make_layer(tmp_path / "layer", big=1_000_000)
    b = write_layer(layer, tmp_path / "l.esgz", chunk_size=256 * 1024)
    blob = open_estargz(FileBlobSource(b.path), b.toc_digest)
    data = b.path.read_bytes()
    big = blob.tree.lookup("usr/lib/python3/big.bin").chunks
    small = blob.tree.lookup("etc/hello.txt").chunks[0]
    assert not small.member_digest                    # small chunks: not worth the TOC bytes
    for c in big:
        assert (c.member_digest != "") == (c.size >= MEMBER_DIGEST_MIN)
        if c.member_digest:
            assert c.member_digest == "sha256:" + hashlib.sha256(data[c.offset:c.end]).hexdigest()
    c = big[0]
    want = (layer / "usr/lib/python3/big.bin").read_bytes()[:c.size]
    assert decode_chunk(c, data[c.offset:c.end]) == want
    bad = bytearray(data[c.offset:c.end])
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(DigestMismatchError, match="gzip member"):
        decode_chunk(c, bytes(bad))
    # the member digest vouches for the bytes; a full check also holds them to the chunk's
    from msgspec.structs import replace
    lying = replace(c, digest="sha256:" + "0" * 64)
    assert decode_chunk(lying, data[c.offset:c.end]) == want
    with pytest.raises(DigestMismatchError):
        decode_chunk(lying, data[c.offset:c.end], full=True)


def test_a_republished_estargz_whose_members_vouch_for_other_bytes_is_refused(tmp_path: Path):
    """Nodes check a large chunk's compressed member against its member digest, not the
    inflated bytes against the chunk digest: the dispatcher checks both, once."""
    import shutil

    from runtimed.dispatcher import _same_layer_files
    from sdk.exception import InvalidError
    layer = tmp_path / "layer"
    (layer / "pkg").mkdir(parents=True)
    (layer / "pkg/lib.so").write_bytes(os.urandom(300_000))
    old = write_layer(layer, tmp_path / "old.esgz")
    evil = tmp_path / "evil"
    shutil.copytree(layer, evil)
    st = os.stat(layer / "pkg/lib.so")
    (evil / "pkg/lib.so").write_bytes(os.urandom(300_000))
    os.utime(evil / "pkg/lib.so", ns=(st.st_atime_ns, st.st_mtime_ns))
    other = write_layer(evil, tmp_path / "other.esgz", prioritized=["pkg/lib.so"])
    orig = {e.name: (e.digest, e.chunk_digest)
            for e in open_estargz(FileBlobSource(old.path)).toc.entries if e.digest}

    def claim_the_layers_digests(doc: dict) -> None:     # member digests left: they match
        for e in doc["entries"]:
            if e["name"] in orig and e.get("digest"):
                e["digest"], e["chunkDigest"] = orig[e["name"]]
    data = rewrite_toc(other.path.read_bytes(), claim_the_layers_digests)
    (tmp_path / "forged.esgz").write_bytes(data)
    forged = open_estargz(FileBlobSource(tmp_path / "forged.esgz"))
    assert forged.tree.lookup("pkg/lib.so").chunks[0].member_digest     # a node would trust it
    with pytest.raises(InvalidError, match="does not match"):
        _same_layer_files(old.path, tmp_path / "forged.esgz", toc_digest_of(data))
