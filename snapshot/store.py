"""Content-addressed store for CRIU image directories.

Layout under ``root``::

    chunks/<sha[:2]>/<sha>.zst  one zstd frame per chunk; written once, never rewritten
    manifests/<id>.json         the commit point: a snapshot exists iff its manifest does
    keys/<sha256(key)>          id of the snapshot last stored under ``key`` (O(1) lookup)
    atime/<id>                  mtime = last use (put, lookup hit, materialize): LRU for gc
    quarantine/<id>.json        manifests of snapshots found corrupt (+ <id>.reason)
    quarantine/chunks/          chunk files found corrupt, kept for inspection
    tmp/                        temp files of writers holding the shared lock
    lock                        flock: writers and readers shared, gc exclusive

Files are cut into fixed-size chunks (CRIU ``pages-*.img`` are large and page
aligned, so identical pages across snapshots land in identical chunks). A chunk's
identity is its sha256; its xxh3_128 is recorded for cheap comparisons by later
readers (the lazy-pages server) but never decides identity: chunks hold tenant
memory and XXH3 is not collision resistant against chosen input, so dedup trusts
only sha256, and the sha256-named chunk file itself is the dedup index (it
survives crashes and other processes' gc, and needs no state of its own).
The all-zero chunk, the most common one in page dumps, is recognised by
comparison: no hashing on put, and a hole instead of a read and a write on
materialize.

Errors (one closed set, callers test by class)::

    SnapshotError
    ├── ManifestError         malformed or unsupported manifest, bad snapshot id
    ├── SnapshotNotFound      no such snapshot
    ├── SnapshotCorruptError  a chunk is missing or corrupt; the snapshot is quarantined
    └── SnapshotIncompatible  taken on a host this one cannot restore (``.reason``)
"""
from __future__ import annotations

import builtins
import collections
import concurrent.futures
import contextlib
import fcntl
import hashlib
import io
import os
import re
import secrets
import shutil
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash
import zstandard

from snapshot.manifest import (
    MANIFEST_VERSION,
    MAX_CHUNK_BYTES,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    ChunkRef,
    FileEntry,
    Fingerprint,
    ManifestError,
    SnapshotError,
    SnapshotManifest,
    check_snapshot_id,
    new_snapshot_id,
)

__all__ = [
    "SnapshotStore", "GcReport", "StoreStats", "SnapshotError", "SnapshotNotFound",
    "SnapshotCorruptError", "SnapshotIncompatible", "ManifestError",
]

ZSTD_LEVEL = 3
_MAX_STORED_CHUNK = MAX_CHUNK_BYTES + (1 << 20)  # zstd worst case stays well inside
_MAX_TAR_MEMBERS = MAX_FILES * 4
_CHUNK_MEMBER = re.compile(r"chunks/([0-9a-f]{64})\.zst")


class SnapshotNotFound(SnapshotError):
    def __init__(self, message: str, *, snapshot_id: str | None = None) -> None:
        super().__init__(message)
        self.snapshot_id = snapshot_id


class SnapshotCorruptError(SnapshotError):
    """A chunk is missing or does not match its digest or size. ``path`` and
    ``chunk`` (sha256) name what was bad where known."""

    def __init__(self, message: str, *, snapshot_id: str | None = None,
                 path: str | None = None, chunk: str | None = None) -> None:
        super().__init__(message)
        self.snapshot_id, self.path, self.chunk = snapshot_id, path, chunk


class SnapshotIncompatible(SnapshotError):
    def __init__(self, message: str, *, snapshot_id: str | None = None,
                 reason: str = "") -> None:
        super().__init__(message)
        self.snapshot_id, self.reason = snapshot_id, reason


@dataclass(frozen=True)
class GcReport:
    removed_snapshots: tuple[str, ...]
    removed_chunks: int
    freed_bytes: int


@dataclass(frozen=True)
class StoreStats:
    stored_bytes: int
    chunks: int
    snapshots: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _PutTxn:
    """Per-put state: zstd contexts are not thread-safe, so each put owns one."""

    def __init__(self) -> None:
        self.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self.new_bytes = 0
        self.dirs: set[Path] = set()


class SnapshotStore:
    """Content-addressed snapshot store rooted at ``root`` (created if absent).

    Safe for concurrent use by threads and by processes sharing ``root``: put,
    materialize, import_ and export hold a shared flock, gc an exclusive one, so
    gc never deletes a chunk that an unfinished put is about to reference.
    ``read_chunk`` takes no lock (it is the lazy-pages hot path): do not gc a
    snapshot away while a lazy restore of it is still reading.
    """

    def __init__(self, root: Path, chunk_size: int = 1 << 20, budget_bytes: int | None = None,
                 *, clock: Callable[[], float] = time.time) -> None:
        if not 0 < chunk_size <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_size must be in (0, {MAX_CHUNK_BYTES}]")
        self.root = Path(root)
        self.chunk_size = chunk_size
        self.budget_bytes = budget_bytes
        self._clock = clock
        self._chunks, self._manifests = self.root / "chunks", self.root / "manifests"
        self._keys, self._atime = self.root / "keys", self.root / "atime"
        self._quarantine_dir, self._tmp = self.root / "quarantine", self.root / "tmp"
        for d in (self._chunks, self._manifests, self._keys, self._atime,
                  self._quarantine_dir / "chunks", self._tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._zero = bytes(chunk_size)
        self._zero_sha = hashlib.sha256(self._zero).hexdigest()
        self._zero_xxh = xxhash.xxh3_128_hexdigest(self._zero)
        self._tls = threading.local()

    # ---- writing ----

    def put(self, src_dir: Path, key: str, image_id: str, function_id: str,
            fingerprint: Fingerprint, meta: dict[str, str] | None = None,
            snapshot_id: str | None = None) -> SnapshotManifest:
        """Store every regular file and symlink below ``src_dir`` as a new snapshot
        and point ``key`` at it. Chunks go first, the manifest last (temp, fsync,
        rename, fsync dir): until that rename nothing is visible, and a crash
        leaves only unreferenced chunks, which gc deletes."""
        src_dir = Path(src_dir)
        with self._flock(exclusive=False):
            txn = _PutTxn()
            files = [self._put_entry(src_dir, rel, txn) for rel in _walk(src_dir)]
            for d in txn.dirs:  # chunk renames durable before the manifest names them
                _fsync_dir(d)
            manifest = SnapshotManifest(
                version=MANIFEST_VERSION, snapshot_id=snapshot_id or new_snapshot_id(), key=key,
                image_id=image_id, function_id=function_id, created_at=self._clock(),
                fingerprint=fingerprint, files=tuple(files),
                raw_size=sum(f.size for f in files), stored_size=txn.new_bytes,
                meta=dict(meta or {}))
            self._write_manifest(manifest)
            self._set_key(key, manifest.snapshot_id)
            self._touch(manifest.snapshot_id)
        return manifest

    def _put_entry(self, src_dir: Path, rel: str, txn: _PutTxn) -> FileEntry:
        path = src_dir / rel
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            return FileEntry(rel, 0o777, 0, (), os.readlink(path))
        chunks = []
        with open(path, "rb") as f:
            while data := f.read(self.chunk_size):
                chunks.append(self._put_chunk(data, txn))
        return FileEntry(rel, stat.S_IMODE(st.st_mode), sum(c.size for c in chunks), tuple(chunks))

    def _put_chunk(self, data: bytes, txn: _PutTxn) -> ChunkRef:
        if data == self._zero:  # memcmp is far cheaper than two hashes
            sha, xxh = self._zero_sha, self._zero_xxh
        else:
            sha, xxh = hashlib.sha256(data).hexdigest(), xxhash.xxh3_128_hexdigest(data)
        path = self._chunk_path(sha)
        try:  # already stored (by any snapshot, a crashed put, an import): reuse as is
            return ChunkRef(sha, xxh, len(data), path.stat().st_size)
        except FileNotFoundError:
            pass
        blob = txn.cctx.compress(data)
        if not path.parent.is_dir():
            path.parent.mkdir(exist_ok=True)
            txn.dirs.add(self._chunks)
        # Two puts racing on one new chunk both rename identical bytes: harmless.
        self._write_atomic(path, blob, sync_dir=False)
        txn.dirs.add(path.parent)
        txn.new_bytes += len(blob)
        return ChunkRef(sha, xxh, len(data), len(blob))

    def _write_manifest(self, manifest: SnapshotManifest) -> None:
        """The commit point of put and import_."""
        self._write_atomic(self._manifest_path(manifest.snapshot_id),
                           manifest.to_json().encode(), sync_dir=True)

    def _set_key(self, key: str, snapshot_id: str) -> None:
        # No dir fsync: a key pointer lost in a power cut costs one cold start.
        self._write_atomic(self._key_path(key), snapshot_id.encode(), sync_dir=False)

    def _write_atomic(self, dest: Path, data: bytes, *, sync_dir: bool) -> None:
        tmp = self._tmp / f"{secrets.token_hex(8)}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if sync_dir:
            _fsync_dir(dest.parent)

    # ---- reading ----

    def get(self, snapshot_id: str) -> SnapshotManifest:
        """The manifest of ``snapshot_id``; SnapshotNotFound if absent (or
        quarantined), ManifestError if the id or the stored manifest is malformed."""
        check_snapshot_id(snapshot_id)
        try:
            text = self._manifest_path(snapshot_id).read_bytes()
        except FileNotFoundError:
            raise SnapshotNotFound(f"snapshot {snapshot_id} not found in {self.root}",
                                   snapshot_id=snapshot_id) from None
        manifest = SnapshotManifest.from_json(text)
        if manifest.snapshot_id != snapshot_id:
            raise ManifestError(f"manifest {snapshot_id}.json names {manifest.snapshot_id}")
        return manifest

    def lookup(self, key: str, fingerprint: Fingerprint | None = None) -> SnapshotManifest | None:
        """The snapshot last stored under ``key``, or None. With ``fingerprint``
        (this host's), raises SnapshotIncompatible when it cannot restore here.
        A hit counts as a use for LRU."""
        snapshot_id = self._key_target(key)
        if snapshot_id is None:
            return None
        try:
            manifest = self.get(snapshot_id)
        except SnapshotNotFound:
            return None
        except ManifestError as e:  # unreadable: move aside, the caller cold-starts
            self._quarantine(snapshot_id, str(e))
            return None
        if manifest.key != key:
            return None
        if fingerprint is not None:
            reason = manifest.fingerprint.incompatibility(fingerprint)
            if reason:
                raise SnapshotIncompatible(
                    f"snapshot {snapshot_id} cannot be restored on this host ({reason}); "
                    "cold start here and take a new snapshot", snapshot_id=snapshot_id,
                    reason=reason)
        self._touch(snapshot_id)
        return manifest

    def list(self) -> list[SnapshotManifest]:
        """All visible snapshots, oldest first. Unreadable manifests are quarantined."""
        out = []
        for path in self._manifests.glob("snap-*.json"):
            if not _is_snapshot_id(path.stem):
                continue  # a stray file, not ours
            try:
                out.append(self.get(path.stem))
            except SnapshotNotFound:
                continue  # removed while we listed
            except ManifestError as e:
                self._quarantine(path.stem, str(e))
        return sorted(out, key=lambda m: (m.created_at, m.snapshot_id))

    def read_chunk(self, ref: ChunkRef) -> bytes:
        """The raw bytes of ``ref``, verified (size and sha256). A missing or
        corrupt chunk raises SnapshotCorruptError; a corrupt file is moved to
        quarantine so that no later put deduplicates against it."""
        path = self._chunk_path(ref.sha256)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise SnapshotCorruptError(f"chunk {ref.sha256} is missing",
                                       chunk=ref.sha256) from None
        problem = self._check_blob(blob, ref)
        if isinstance(problem, str):
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, self._quarantine_dir / "chunks" / path.name)
            raise SnapshotCorruptError(f"chunk {ref.sha256} is corrupt: {problem}",
                                       chunk=ref.sha256)
        return problem

    def _check_blob(self, blob: bytes, ref: ChunkRef) -> bytes | str:
        """Decompressed bytes if ``blob`` holds ``ref``, else what is wrong."""
        try:
            declared = zstandard.frame_content_size(blob)
            if declared not in (-1, ref.size):  # refuse before allocating a hostile size
                return f"frame declares {declared} bytes, expected {ref.size}"
            dctx = getattr(self._tls, "dctx", None)
            if dctx is None:  # one per thread: zstd contexts are not thread-safe
                dctx = self._tls.dctx = zstandard.ZstdDecompressor()
            data = dctx.decompress(blob, max_output_size=ref.size)
        except zstandard.ZstdError as e:
            return f"does not decompress ({e})"
        if len(data) != ref.size:
            return f"{len(data)} bytes, expected {ref.size}"
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            return "sha256 mismatch"
        return data

    def materialize(self, snapshot_id: str, dest_dir: Path) -> None:
        """Write the snapshot's files to ``dest_dir`` (absent or an empty dir),
        built in a sibling temp dir and renamed into place, so ``dest_dir`` is
        either complete or untouched. On a missing or corrupt chunk, raises
        SnapshotCorruptError naming file and chunk and quarantines the snapshot.
        Files are not fsynced: a crash only means restoring again."""
        manifest = self.get(snapshot_id)
        dest_dir = Path(dest_dir)
        if dest_dir.exists() and (not dest_dir.is_dir() or any(dest_dir.iterdir())):
            raise FileExistsError(f"{dest_dir} exists and is not an empty directory")
        tmp = dest_dir.parent / f".{dest_dir.name}.tmp-{secrets.token_hex(4)}"
        with self._flock(exclusive=False):
            tmp.mkdir(parents=True)
            try:
                # zstd and sha256 release the GIL: read (decompress, verify) chunks on
                # all cores, a bounded window ahead of the writes, in order.
                with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
                    for entry in manifest.files:
                        self._write_entry(manifest, entry, tmp, pool)
                os.rename(tmp, dest_dir)  # replaces an empty dir atomically
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self._touch(snapshot_id)

    def _write_entry(self, manifest: SnapshotManifest, entry: FileEntry, root: Path,
                     pool: concurrent.futures.Executor | None = None) -> None:
        target = root / entry.path  # safe: check_tree forbids paths below a symlink entry
        target.parent.mkdir(parents=True, exist_ok=True)
        if entry.link_target is not None:
            os.symlink(entry.link_target, target)
            return
        todo = iter([ref for ref in entry.chunks if ref.sha256 != self._zero_sha])
        inflight: collections.deque = collections.deque()

        def fill() -> None:                      # keep up to 8 chunk reads in flight
            while pool is not None and len(inflight) < 8:
                ref = next(todo, None)
                if ref is None:
                    return
                inflight.append(pool.submit(self.read_chunk, ref))

        fill()
        with open(target, "xb") as f:
            for i, ref in enumerate(entry.chunks):
                if ref.sha256 == self._zero_sha:  # known content: leave a hole, read nothing
                    f.seek(ref.size, os.SEEK_CUR)
                    continue
                try:
                    if inflight:
                        data = inflight.popleft().result()
                        fill()
                    else:
                        data = self.read_chunk(ref)
                    f.write(data)
                except SnapshotCorruptError as e:
                    self._quarantine(manifest.snapshot_id, f"{entry.path} chunk {i}: {e}")
                    raise SnapshotCorruptError(
                        f"snapshot {manifest.snapshot_id}: file {entry.path} chunk {i}: {e}; "
                        "the snapshot was quarantined, cold start and take a new one",
                        snapshot_id=manifest.snapshot_id, path=entry.path,
                        chunk=ref.sha256) from None
            f.truncate(entry.size)  # materialises trailing holes
        os.chmod(target, entry.mode)

    def verify(self, snapshot_id: str) -> builtins.list[str]:
        """Read and check every chunk of the snapshot; return the problems found
        (empty when fine). Corrupt chunk files are moved to quarantine, the
        manifest is left alone: the caller decides (usually ``remove``)."""
        manifest = self.get(snapshot_id)
        problems: builtins.list[str] = []
        bad: dict[str, str | None] = {}
        for entry in manifest.files:
            for i, ref in enumerate(entry.chunks):
                if ref.sha256 not in bad:
                    try:
                        self.read_chunk(ref)
                        bad[ref.sha256] = None
                    except SnapshotCorruptError as e:
                        bad[ref.sha256] = str(e)
                if bad[ref.sha256]:
                    problems.append(f"{entry.path} chunk {i}: {bad[ref.sha256]}")
        return problems

    # ---- removal and gc ----

    def remove(self, snapshot_id: str) -> None:
        """Make the snapshot invisible; its chunks are freed by the next gc."""
        manifest = self.get(snapshot_id)
        self._drop(manifest.snapshot_id, manifest.key)

    def _drop(self, snapshot_id: str, key: str | None) -> None:
        self._manifest_path(snapshot_id).unlink(missing_ok=True)
        if key is not None and self._key_target(key) == snapshot_id:
            self._key_path(key).unlink(missing_ok=True)
        (self._atime / snapshot_id).unlink(missing_ok=True)

    def _quarantine(self, snapshot_id: str, reason: str) -> None:
        """Move the manifest aside (kept for inspection) so nothing finds it."""
        if not _is_snapshot_id(snapshot_id):
            return
        key = None
        with contextlib.suppress(SnapshotError, OSError):
            key = self.get(snapshot_id).key
        with contextlib.suppress(FileNotFoundError):
            os.replace(self._manifest_path(snapshot_id),
                       self._quarantine_dir / f"{snapshot_id}.json")
            (self._quarantine_dir / f"{snapshot_id}.reason").write_text(reason + "\n")
        self._drop(snapshot_id, key)

    def gc(self, budget_bytes: int | None = None) -> GcReport:
        """Delete unreferenced chunks (crashed puts, removed or quarantined
        snapshots) and stale temp files; then, while stored bytes exceed the
        budget (``budget_bytes`` or the store's), remove snapshots least
        recently used first (those whose key now points elsewhere before all
        others) and the chunks only they referenced."""
        budget = self.budget_bytes if budget_bytes is None else budget_bytes
        with self._flock(exclusive=True):
            for p in self._tmp.iterdir():  # exclusive lock: no writer is mid-way
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            manifests = self.list()
            self._sweep_pointers({m.snapshot_id for m in manifests})
            refs: dict[str, int] = {}
            for m in manifests:
                for ref in m.chunk_refs():
                    refs[ref.sha256] = refs.get(ref.sha256, 0) + 1
            sizes = dict(self._iter_chunks())
            doomed = [sha for sha in sizes if sha not in refs]
            total = sum(sizes.values()) - sum(sizes[sha] for sha in doomed)
            removed: builtins.list[str] = []
            # Superseded snapshots (their key points elsewhere) go first, then LRU.
            order = sorted(manifests, key=lambda m: (
                self._key_target(m.key) == m.snapshot_id, self._last_used(m)))
            for m in order:
                if budget is None or total <= budget:
                    break
                self._drop(m.snapshot_id, m.key)
                removed.append(m.snapshot_id)
                for ref in m.chunk_refs():
                    refs[ref.sha256] -= 1
                    if refs[ref.sha256] == 0 and ref.sha256 in sizes:
                        doomed.append(ref.sha256)
                        total -= sizes[ref.sha256]
            for sha in doomed:
                self._chunk_path(sha).unlink(missing_ok=True)
            freed = sum(sizes[sha] for sha in doomed)
        return GcReport(tuple(removed), len(doomed), freed)

    def _sweep_pointers(self, live: set[str]) -> None:
        """Drop last-use marks and key pointers of snapshots that are gone
        (a lookup racing a removal can leave either behind)."""
        for p in self._atime.iterdir():
            if p.name not in live:
                p.unlink(missing_ok=True)
        for p in self._keys.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if p.read_text().strip() not in live:
                    p.unlink(missing_ok=True)

    def stats(self) -> StoreStats:
        sizes = [size for _, size in self._iter_chunks()]
        return StoreStats(stored_bytes=sum(sizes), chunks=len(sizes),
                          snapshots=sum(1 for _ in self._manifests.glob("snap-*.json")))

    # ---- transfer ----

    def export(self, snapshot_id: str, out_file: Path) -> None:
        """Write one uncompressed tar: ``manifest.json`` then ``chunks/<sha>.zst``
        for each distinct chunk, stored bytes as they are. Written to a temp file
        and renamed, so ``out_file`` is complete or absent."""
        manifest = self.get(snapshot_id)
        out_file = Path(out_file)
        tmp = out_file.parent / f".{out_file.name}.tmp-{secrets.token_hex(4)}"
        try:
            with self._flock(exclusive=False), tarfile.open(tmp, "w") as tar:
                _add_member(tar, "manifest.json", manifest.to_json().encode(), manifest)
                for ref in manifest.chunk_refs():
                    try:
                        blob = self._chunk_path(ref.sha256).read_bytes()
                    except FileNotFoundError:
                        self._quarantine(snapshot_id, f"chunk {ref.sha256} missing on export")
                        raise SnapshotCorruptError(
                            f"snapshot {snapshot_id}: chunk {ref.sha256} is missing; "
                            "quarantined", snapshot_id=snapshot_id, chunk=ref.sha256) from None
                    _add_member(tar, f"chunks/{ref.sha256}.zst", blob, manifest)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.rename(tmp, out_file)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(out_file.parent)

    def import_(self, in_file: Path) -> SnapshotManifest:
        """Read a tar written by ``export``. Members must be exactly
        ``manifest.json`` or ``chunks/<sha256>.zst`` regular files within size
        limits (anything else raises ManifestError: no traversal, links or
        devices). Every chunk the manifest references must be in the tar or
        already here, and each one from the tar is verified (size, sha256, xxh)
        before anything becomes visible; the manifest is committed last.
        Importing a snapshot already present returns it unchanged."""
        with self._flock(exclusive=False):
            staging = self._tmp / f"import-{secrets.token_hex(8)}"
            staging.mkdir()
            try:
                manifest = self._import_staged(Path(in_file), staging)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return manifest

    def _import_staged(self, in_file: Path, staging: Path) -> SnapshotManifest:
        manifest_bytes = None
        with tarfile.open(in_file, "r:") as tar:  # "r:": no decompression bombs
            for n, member in enumerate(tar):
                match = _CHUNK_MEMBER.fullmatch(member.name)
                if n >= _MAX_TAR_MEMBERS or not member.isreg() or not (
                        member.name == "manifest.json" or match):
                    raise ManifestError(
                        f"refusing {in_file}: member {member.name!r} is not allowed (only "
                        "regular files manifest.json and chunks/<sha256>.zst)")
                limit = MAX_MANIFEST_BYTES if match is None else _MAX_STORED_CHUNK
                if member.size > limit:
                    raise ManifestError(f"refusing {in_file}: {member.name} exceeds {limit} bytes")
                src = tar.extractfile(member)
                assert src is not None  # isreg() above
                if match is None:
                    manifest_bytes = src.read()
                else:
                    with open(staging / f"{match.group(1)}.zst", "wb") as out:
                        shutil.copyfileobj(src, out)
        if manifest_bytes is None:
            raise ManifestError(f"{in_file} has no manifest.json")
        manifest = SnapshotManifest.from_json(manifest_bytes)
        if self._manifest_path(manifest.snapshot_id).exists():
            return self.get(manifest.snapshot_id)
        verified = []
        for ref in manifest.chunk_refs():
            staged = staging / f"{ref.sha256}.zst"
            if staged.exists():
                result = self._check_blob(staged.read_bytes(), ref)
                if isinstance(result, bytes) and xxhash.xxh3_128_hexdigest(result) != ref.xxh:
                    result = "xxh3_128 mismatch"
                if isinstance(result, str):
                    raise SnapshotCorruptError(f"{in_file}: chunk {ref.sha256} is corrupt: "
                                               f"{result}", chunk=ref.sha256)
                verified.append(staged)
            elif not self._chunk_path(ref.sha256).exists():
                raise SnapshotCorruptError(f"{in_file}: chunk {ref.sha256} is neither in the "
                                           "tar nor in this store", chunk=ref.sha256)
        dirs: set[Path] = set()
        for staged in verified:
            dest = self._chunk_path(staged.stem)
            if dest.exists():
                continue  # never rewrite a stored chunk
            with open(staged, "rb") as f:
                os.fsync(f.fileno())
            dest.parent.mkdir(exist_ok=True)
            os.rename(staged, dest)
            dirs.update((dest.parent, self._chunks))
        for d in dirs:
            _fsync_dir(d)
        self._write_manifest(manifest)
        self._set_key(manifest.key, manifest.snapshot_id)
        self._touch(manifest.snapshot_id)
        return manifest

    # ---- small helpers ----

    def _chunk_path(self, sha: str) -> Path:
        return self._chunks / sha[:2] / f"{sha}.zst"

    def _manifest_path(self, snapshot_id: str) -> Path:
        return self._manifests / f"{snapshot_id}.json"

    def _key_path(self, key: str) -> Path:
        return self._keys / hashlib.sha256(key.encode()).hexdigest()

    def _key_target(self, key: str) -> str | None:
        """The snapshot id ``key`` points at, None if none (or garbage)."""
        try:
            target = self._key_path(key).read_text().strip()
        except FileNotFoundError:
            return None
        return target if _is_snapshot_id(target) else None

    def _touch(self, snapshot_id: str) -> None:
        # Not through tmp/: lookups run without the lock and gc sweeps tmp/.
        path, now = self._atime / snapshot_id, self._clock()
        path.touch()
        os.utime(path, (now, now))

    def _last_used(self, manifest: SnapshotManifest) -> float:
        try:
            return (self._atime / manifest.snapshot_id).stat().st_mtime
        except FileNotFoundError:
            return manifest.created_at

    def _iter_chunks(self) -> Iterator[tuple[str, int]]:
        for sub in self._chunks.iterdir():
            for p in sub.glob("*.zst"):
                with contextlib.suppress(FileNotFoundError):
                    yield p.stem, p.stat().st_size

    @contextlib.contextmanager
    def _flock(self, *, exclusive: bool) -> Iterator[None]:
        # One open() per holder: flock locks belong to the open file description,
        # so threads of one process exclude each other just like processes do.
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)


def _is_snapshot_id(value: str) -> bool:
    try:
        check_snapshot_id(value)
    except ManifestError:
        return False
    return True


def _walk(root: Path, prefix: str = "") -> Iterator[str]:
    """Relative posix paths of regular files and symlinks below ``root``, sorted,
    not following symlinks. Anything else (fifo, socket, device) is refused."""
    with os.scandir(root / prefix if prefix else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        rel = prefix + e.name
        if e.is_symlink() or e.is_file(follow_symlinks=False):
            yield rel
        elif e.is_dir(follow_symlinks=False):
            yield from _walk(root, rel + "/")
        else:
            raise SnapshotError(f"{root / rel}: not a regular file, directory or symlink; "
                                "a CRIU image dir holds none of those")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes,
                manifest: SnapshotManifest) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, int(manifest.created_at)
    tar.addfile(info, io.BytesIO(data))
