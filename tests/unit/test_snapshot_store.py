"""Unit tests for snapshot.manifest, snapshot.fingerprint and snapshot.store.

Pure filesystem: no root, no CRIU. Image dirs are synthetic stand-ins for CRIU
output (a large random pages file, a large zero pages file, small metadata files).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from snapshot.fingerprint import cpu_flags_sha, current_fingerprint
from snapshot.manifest import (
    MANIFEST_VERSION,
    ChunkRef,
    FileEntry,
    Fingerprint,
    ManifestError,
    SnapshotManifest,
    check_rel_path,
)
from snapshot.store import (
    SnapshotCorruptError,
    SnapshotIncompatible,
    SnapshotNotFound,
    SnapshotStore,
)

MiB = 1 << 20
FP = Fingerprint(kernel="6.1.0", criu_version="3.19", cpu_flags_sha="ab" * 8,
                 runc_version="1.1.12", arch="x86_64")
REPO = Path(__file__).resolve().parents[2]


def make_dir(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def chunk_file(store: SnapshotStore, ref: ChunkRef) -> Path:
    return store.root / "chunks" / ref.sha256[:2] / f"{ref.sha256}.zst"


class Clock:
    """A clock that ticks one second per reading, so LRU order is exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    src = make_dir(tmp_path / "img", {
        "pages-1.img": os.urandom(5 * MiB),
        "pages-2.img": bytes(3 * MiB),
        "empty.img": b"",
        "inventory.img": b"criu inventory",
        "sub/core-1.img": os.urandom(1000),
    })
    os.chmod(src / "inventory.img", 0o600)
    os.symlink("inventory.img", src / "link.img")
    return src


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "store")


# ---- round trip and dedup ----

def test_round_trip_is_byte_identical(store: SnapshotStore, image_dir: Path, tmp_path: Path):
    m = store.put(image_dir, "key-1", "img-1", "fn-1", FP, meta={"dump_ms": "12"})
    assert m.snapshot_id.startswith("snap-") and m.version == MANIFEST_VERSION
    assert m.raw_size == 8 * MiB + len(b"criu inventory") + 1000
    assert len(next(f for f in m.files if f.path == "pages-1.img").chunks) == 5
    assert store.get(m.snapshot_id) == m
    assert store.lookup("key-1") == m
    assert store.list() == [m]

    dest = tmp_path / "restore"
    store.materialize(m.snapshot_id, dest)
    assert read_tree(dest) == read_tree(image_dir)
    assert (dest / "inventory.img").stat().st_mode & 0o777 == 0o600
    assert (dest / "link.img").is_symlink()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert store.verify(m.snapshot_id) == []


def test_zero_pages_cost_one_tiny_chunk(store: SnapshotStore, tmp_path: Path):
    m = store.put(make_dir(tmp_path / "z", {"pages.img": bytes(8 * MiB)}), "k", "i", "f", FP)
    assert store.stats().chunks == 1
    assert m.stored_size < 4096
    dest = tmp_path / "out"
    store.materialize(m.snapshot_id, dest)
    assert (dest / "pages.img").read_bytes() == bytes(8 * MiB)


def test_dedup_across_snapshots(store: SnapshotStore, tmp_path: Path):
    shared = os.urandom(4 * MiB)
    a = store.put(make_dir(tmp_path / "a", {"pages.img": shared, "core.img": b"a"}),
                  "ka", "img", "fn", FP)
    b = store.put(make_dir(tmp_path / "b", {"pages.img": shared + os.urandom(MiB),
                                            "core.img": b"b"}), "kb", "img", "fn", FP)
    assert b.stored_size < b.raw_size
    assert b.stored_size < 1.1 * MiB  # only the new MiB and core.img were added
    assert store.stats().stored_bytes < a.raw_size + b.raw_size
    assert store.stats().snapshots == 2


def test_read_chunk_returns_verified_bytes(store: SnapshotStore, tmp_path: Path):
    data = os.urandom(MiB)
    m = store.put(make_dir(tmp_path / "a", {"p.img": data}), "k", "i", "f", FP)
    assert store.read_chunk(m.files[0].chunks[0]) == data


def test_materialize_refuses_non_empty_dest_and_accepts_empty(store, image_dir, tmp_path):
    m = store.put(image_dir, "k", "i", "f", FP)
    full = make_dir(tmp_path / "full", {"x": b"1"})
    with pytest.raises(FileExistsError):
        store.materialize(m.snapshot_id, full)
    empty = tmp_path / "empty"
    empty.mkdir()
    store.materialize(m.snapshot_id, empty)
    assert (empty / "pages-2.img").stat().st_size == 3 * MiB


def test_concurrent_puts_in_threads(store: SnapshotStore, tmp_path: Path):
    shared = os.urandom(3 * MiB)
    dirs = [make_dir(tmp_path / f"d{i}", {"pages.img": shared + os.urandom(MiB)})
            for i in range(4)]
    results: dict[int, SnapshotManifest] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, store.put(dirs[i], f"k{i}", "img", "fn", FP))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.list()) == 4
    for i, m in results.items():
        out = tmp_path / f"out{i}"
        store.materialize(m.snapshot_id, out)
        assert read_tree(out) == read_tree(dirs[i])
    assert store.gc().removed_chunks == 0


# ---- corruption ----

def _random_chunk(m: SnapshotManifest) -> ChunkRef:
    return next(f for f in m.files if f.path == "pages-1.img").chunks[2]


def _assert_quarantined(store: SnapshotStore, m: SnapshotManifest, dest: Path):
    assert store.lookup(m.key) is None
    assert store.list() == []
    with pytest.raises(SnapshotNotFound):
        store.get(m.snapshot_id)
    assert (store.root / "quarantine" / f"{m.snapshot_id}.json").exists()
    assert not dest.exists()
    assert [p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}")] == []


def test_corrupt_chunk_raises_and_quarantines(store, image_dir, tmp_path):
    m = store.put(image_dir, "k", "i", "f", FP)
    ref = _random_chunk(m)
    blob = bytearray(chunk_file(store, ref).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    chunk_file(store, ref).write_bytes(bytes(blob))
    assert any("pages-1.img chunk 2" in p for p in store.verify(m.snapshot_id))

    dest = tmp_path / "restore"
    with pytest.raises(SnapshotCorruptError) as exc:
        store.materialize(m.snapshot_id, dest)
    assert exc.value.path == "pages-1.img" and exc.value.chunk == ref.sha256
    assert "pages-1.img" in str(exc.value) and "chunk 2" in str(exc.value)
    _assert_quarantined(store, m, dest)


def test_corrupt_chunk_is_not_deduplicated_against(store, image_dir, tmp_path):
    m = store.put(image_dir, "k", "i", "f", FP)
    chunk_file(store, _random_chunk(m)).write_bytes(b"garbage")
    with pytest.raises(SnapshotCorruptError):
        store.materialize(m.snapshot_id, tmp_path / "r1")
    again = store.put(image_dir, "k", "i", "f", FP)  # must write a good copy
    store.materialize(again.snapshot_id, tmp_path / "r2")
    assert read_tree(tmp_path / "r2") == read_tree(image_dir)


def test_missing_chunk_raises_and_quarantines(store, image_dir, tmp_path):
    m = store.put(image_dir, "k", "i", "f", FP)
    chunk_file(store, _random_chunk(m)).unlink()
    dest = tmp_path / "restore"
    with pytest.raises(SnapshotCorruptError, match="missing"):
        store.materialize(m.snapshot_id, dest)
    _assert_quarantined(store, m, dest)
    assert store.gc().removed_chunks > 0  # the quarantined snapshot's chunks are freed


# ---- crash safety ----

def test_crash_before_manifest_leaves_no_snapshot(store, image_dir, monkeypatch):
    def boom(self, manifest):
        raise OSError("disk died")

    monkeypatch.setattr(SnapshotStore, "_write_manifest", boom)
    with pytest.raises(OSError, match="disk died"):
        store.put(image_dir, "k", "i", "f", FP)
    monkeypatch.undo()
    assert store.lookup("k") is None
    assert store.list() == []
    orphans = store.stats().chunks
    assert orphans > 0
    report = store.gc()
    assert report.removed_chunks == orphans and report.removed_snapshots == ()
    assert store.stats().chunks == 0 and store.stats().stored_bytes == 0


def test_killed_put_leaves_no_snapshot(tmp_path: Path, image_dir: Path):
    root = tmp_path / "store"
    code = (
        "import os, sys\n"
        "from snapshot.store import SnapshotStore\n"
        "from snapshot.manifest import Fingerprint\n"
        "SnapshotStore._write_manifest = lambda self, m: os._exit(9)\n"
        f"SnapshotStore({str(root)!r}).put({str(image_dir)!r}, 'k', 'i', 'f', "
        "Fingerprint('k', 'c', 'x', 'r', 'a'))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 9
    store = SnapshotStore(root)
    assert store.lookup("k") is None and store.list() == []
    store.gc()
    assert store.stats().chunks == 0 and list((root / "tmp").iterdir()) == []


# ---- gc ----

def test_gc_evicts_least_recently_used(tmp_path: Path):
    store = SnapshotStore(tmp_path / "store", chunk_size=64 << 10, clock=Clock())
    snaps = {name: store.put(make_dir(tmp_path / name, {"p.img": os.urandom(256 << 10)}),
                             name, "img", "fn", FP) for name in ("a", "b", "c")}
    assert store.lookup("a") is not None  # a is now the most recently used
    total = store.stats().stored_bytes
    report = store.gc(budget_bytes=total - snaps["b"].stored_size)
    assert report.removed_snapshots == (snaps["b"].snapshot_id,)
    assert report.freed_bytes == snaps["b"].stored_size
    assert {m.key for m in store.list()} == {"a", "c"}
    assert store.gc(budget_bytes=0).removed_snapshots == (snaps["c"].snapshot_id,
                                                          snaps["a"].snapshot_id)
    assert store.stats().stored_bytes == 0


def test_gc_prefers_snapshots_superseded_under_their_key(tmp_path: Path):
    store = SnapshotStore(tmp_path / "store", budget_bytes=0, clock=Clock())
    old = store.put(make_dir(tmp_path / "o", {"p.img": os.urandom(1000)}), "k", "i", "f", FP)
    other = store.put(make_dir(tmp_path / "x", {"p.img": os.urandom(1000)}), "x", "i", "f", FP)
    new = store.put(make_dir(tmp_path / "n", {"p.img": os.urandom(1000)}), "k", "i", "f", FP)
    store.materialize(old.snapshot_id, tmp_path / "used")  # most recent use, but superseded
    assert store.lookup("k") == new
    removed = store.gc(budget_bytes=store.stats().stored_bytes - 1).removed_snapshots
    assert removed == (old.snapshot_id,)
    assert store.gc().removed_snapshots == (other.snapshot_id, new.snapshot_id)


def test_gc_without_budget_keeps_referenced_chunks(store, image_dir):
    m = store.put(image_dir, "k", "i", "f", FP)
    before = store.stats()
    assert store.gc() == type(store.gc())((), 0, 0)
    assert store.stats() == before and store.lookup("k") == m


def test_remove_then_gc_frees_everything(store, image_dir):
    m = store.put(image_dir, "k", "i", "f", FP)
    store.remove(m.snapshot_id)
    assert store.lookup("k") is None
    with pytest.raises(SnapshotNotFound):
        store.remove(m.snapshot_id)
    assert store.gc().freed_bytes > 0 and store.stats().stored_bytes == 0


# ---- export / import ----

def test_export_import_round_trip(store, image_dir, tmp_path):
    m = store.put(image_dir, "k", "i", "f", FP)
    tar_path = tmp_path / "snap.tar"
    store.export(m.snapshot_id, tar_path)
    other = SnapshotStore(tmp_path / "other")
    imported = other.import_(tar_path)
    assert imported == m
    assert other.lookup("k") == m
    other.materialize(m.snapshot_id, tmp_path / "restore")
    assert read_tree(tmp_path / "restore") == read_tree(image_dir)
    assert other.import_(tar_path) == m  # idempotent
    assert other.stats().chunks == store.stats().chunks


def _tar_with(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


def test_import_refuses_path_traversal(store, image_dir, tmp_path):
    m = store.put(image_dir, "k", "i", "f", FP)
    other = SnapshotStore(tmp_path / "other" / "store")
    for bad in [
        _tar_with(tmp_path / "a.tar", {"manifest.json": m.to_json().encode(),
                                       "../evil": b"x"}),
        _tar_with(tmp_path / "b.tar", {"/abs/evil": b"x"}),
        _tar_with(tmp_path / "c.tar", {"chunks/../../evil.zst": b"x"}),
        _tar_with(tmp_path / "d.tar", {"manifest.json": m.to_json().encode()},
                  symlink=f"chunks/{'0' * 64}.zst"),
    ]:
        with pytest.raises(ManifestError, match="not allowed"):
            other.import_(bad)
    assert not (tmp_path / "other" / "evil").exists() and not (tmp_path / "evil").exists()
    assert other.list() == [] and other.stats().chunks == 0


def test_import_verifies_chunks_before_commit(store, image_dir, tmp_path):
    m = store.put(image_dir, "k", "i", "f", FP)
    ref = _random_chunk(m)
    members = {"manifest.json": m.to_json().encode()}
    for r in m.chunk_refs():
        members[f"chunks/{r.sha256}.zst"] = chunk_file(store, r).read_bytes()
    members[f"chunks/{ref.sha256}.zst"] = chunk_file(store, m.chunk_refs().__next__()).read_bytes()
    other = SnapshotStore(tmp_path / "other")
    with pytest.raises(SnapshotCorruptError):
        other.import_(_tar_with(tmp_path / "t.tar", members))
    del members[f"chunks/{ref.sha256}.zst"]
    with pytest.raises(SnapshotCorruptError, match="neither in the tar"):
        other.import_(_tar_with(tmp_path / "u.tar", members))
    assert other.list() == [] and other.lookup("k") is None


# ---- manifest format ----

def test_manifest_json_round_trip(store, image_dir):
    m = store.put(image_dir, "k", "i", "f", FP, meta={"tier": "restore"})
    assert SnapshotManifest.from_json(m.to_json()) == m


@pytest.mark.parametrize("path", ["../x", "a/../x", "/etc/passwd", "a//b", "./a", "", "a/"])
def test_manifest_rejects_bad_paths(path: str):
    with pytest.raises(ManifestError):
        check_rel_path(path)
    with pytest.raises(ManifestError):
        FileEntry(path, 0o644, 0)


def test_manifest_rejects_unknown_version_and_bad_fields(store, image_dir):
    d = json.loads(store.put(image_dir, "k", "i", "f", FP).to_json())
    with pytest.raises(ManifestError, match="version 2 is not supported"):
        SnapshotManifest.from_json(json.dumps({**d, "version": 2}))
    d["files"][0]["path"] = "../x"
    with pytest.raises(ManifestError, match="'..'"):
        SnapshotManifest.from_json(json.dumps(d))
    for broken in ("not json", "[]", json.dumps({"version": 1})):
        with pytest.raises(ManifestError):
            SnapshotManifest.from_json(broken)


def test_manifest_rejects_entries_below_a_symlink():
    files = (FileEntry("a", 0o777, 0, (), "/etc"), FileEntry("a/passwd", 0o644, 0))
    with pytest.raises(ManifestError, match="below another entry"):
        SnapshotManifest(1, "snap-" + "0" * 16, "k", "i", "f", 0.0, FP, files, 0, 0)


def test_chunk_sizes_must_add_up():
    ref = ChunkRef("0" * 64, "0" * 32, 10, 5)
    with pytest.raises(ManifestError, match="add up"):
        FileEntry("p.img", 0o644, 11, (ref,))


# ---- fingerprint ----

def test_fingerprint_incompatibility_reasons():
    assert FP.incompatibility(FP) is None
    other = Fingerprint("6.18.1", "3.19", "ab" * 8, "1.1.12", "x86_64")
    assert Fingerprint("6.18.1", "3.19", "ab" * 8, "1.1.12", "x86_64").incompatibility(
        FP) == "kernel 6.18.1 != 6.1.0"
    both = Fingerprint("6.1.0", "4.0", "cd" * 8, "1.1.12", "x86_64")
    assert FP.incompatibility(both) == f"criu 3.19 != 4.0; cpu flags {'ab' * 8} != {'cd' * 8}"
    assert other.incompatibility(other) is None


def test_lookup_with_incompatible_host_raises(store, image_dir):
    m = store.put(image_dir, "k", "i", "f", FP)
    here = Fingerprint("6.18.1", "3.19", "ab" * 8, "1.1.12", "x86_64")
    with pytest.raises(SnapshotIncompatible) as exc:
        store.lookup("k", fingerprint=here)
    assert exc.value.reason == "kernel 6.1.0 != 6.18.1" and exc.value.snapshot_id == m.snapshot_id
    assert store.lookup("k", fingerprint=FP) == m


def test_current_fingerprint_reads_flags(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: sse2 avx fpu\n\nprocessor\t: 1\n"
                       "flags\t\t: other\n")
    fp = current_fingerprint("3.19", "1.1.12", cpuinfo_path=cpuinfo)
    assert fp.cpu_flags_sha == cpu_flags_sha("flags : fpu avx sse2") != cpu_flags_sha("")
    assert len(fp.cpu_flags_sha) == 16
    assert fp.criu_version == "3.19" and fp.runc_version == "1.1.12"
    assert fp.kernel == os.uname().release and fp.arch == os.uname().machine
    assert current_fingerprint("3.19", "1.1.12").incompatibility(
        current_fingerprint("3.19", "1.1.12")) is None


# ---- pulling from a peer (snapshot/transfer.py) ----
def test_pull_fetches_missing_chunks_concurrently_and_verifies_them(store, image_dir, tmp_path):
    from snapshot import transfer
    src = store
    m = src.put(image_dir, "key-pull", "img", "fn", FP, {})
    dst = SnapshotStore(tmp_path / "dst")
    seen, lock = [], threading.Lock()

    def fetch(sha):
        with lock:
            seen.append(sha)
        return transfer.chunk_blob(src, sha)

    got, stats = transfer.pull(dst, m.to_json(), fetch, workers=4)
    assert got.snapshot_id == m.snapshot_id and stats.chunks_fetched == len(set(seen)) == len(seen)
    out = tmp_path / "out"
    dst.materialize(m.snapshot_id, out)
    assert (out / "pages-1.img").read_bytes() == (image_dir / "pages-1.img").read_bytes()
    again, stats2 = transfer.pull(dst, m.to_json(), fetch)          # already there
    assert stats2.chunks_fetched == 0


def test_pull_of_a_corrupt_chunk_fails_and_leaves_no_snapshot(store, image_dir, tmp_path):
    from snapshot import transfer
    m = store.put(image_dir, "key-bad", "img", "fn", FP, {})
    dst = SnapshotStore(tmp_path / "dst")
    victim = next(iter(m.chunk_refs())).sha256

    def fetch(sha):
        blob = transfer.chunk_blob(store, sha)
        return blob[:-8] + b"\\0" * 8 if sha == victim else blob

    with pytest.raises(SnapshotCorruptError, match="from the peer is corrupt"):
        transfer.pull(dst, m.to_json(), fetch, workers=4)
    assert dst.list() == []


def test_pull_materializes_in_the_same_pass(store, image_dir, tmp_path):
    """With materialize_to, the files are written from the fetched chunks (and the ones
    the destination already had), identical to a materialize, holes included."""
    from snapshot import transfer
    m = store.put(image_dir, "key-mat", "img", "fn", FP, {})
    dst = SnapshotStore(tmp_path / "dst")
    # the destination already holds one snapshot sharing chunks with it
    dst.put(make_dir(tmp_path / "other", {"pages-1.img": (image_dir / "pages-1.img").read_bytes()}),
            "other", "img", "fn", FP)
    out = tmp_path / "hot" / m.snapshot_id
    got, stats = transfer.pull(dst, m.to_json(), lambda sha: transfer.chunk_blob(store, sha),
                               materialize_to=out)
    assert stats.chunks_reused > 0 and stats.chunks_fetched > 0
    ref = tmp_path / "ref"
    store.materialize(m.snapshot_id, ref)
    for p in ref.rglob("*"):
        q = out / p.relative_to(ref)
        if p.is_symlink():
            assert os.readlink(q) == os.readlink(p)
        elif p.is_file():
            assert q.read_bytes() == p.read_bytes() and q.stat().st_mode == p.stat().st_mode
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]   # no temp left


def test_failed_pull_leaves_no_materialized_dir(store, image_dir, tmp_path):
    from snapshot import transfer
    m = store.put(image_dir, "key-mat2", "img", "fn", FP, {})
    dst = SnapshotStore(tmp_path / "dst")
    out = tmp_path / "hot" / m.snapshot_id

    def fetch(sha):
        raise OSError("peer went away")

    with pytest.raises(OSError):
        transfer.pull(dst, m.to_json(), fetch, materialize_to=out)
    assert not out.exists() and list(out.parent.iterdir()) == []
