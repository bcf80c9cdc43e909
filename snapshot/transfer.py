"""Moving snapshots between stores chunk by chunk: a node that must restore a snapshot
it lacks pulls the manifest from a peer, then only the chunks it does not already hold
(chunks are content-addressed, so dedup across snapshots is dedup across nodes too).
Every fetched chunk is verified (size, sha256, xxh3) before it is stored; the manifest
is committed last, so a failed pull leaves nothing visible.
"""
from __future__ import annotations

import concurrent.futures
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import xxhash

from .manifest import SnapshotManifest
from .store import SnapshotCorruptError, SnapshotStore


@dataclass(frozen=True)
class PullStats:
    chunks_fetched: int
    bytes_fetched: int       # compressed bytes over the wire
    chunks_reused: int       # already in the local store


def missing_chunks(store: SnapshotStore, manifest: SnapshotManifest) -> list:
    return [ref for ref in list(manifest.chunk_refs())
            if not store._chunk_path(ref.sha256).exists()]


def pull(store: SnapshotStore, manifest_json: bytes | str,
         fetch_chunk: Callable[[str], bytes], workers: int = 4,
         materialize_to: Path | None = None) -> tuple[SnapshotManifest, PullStats]:
    """Import the snapshot described by `manifest_json`, fetching missing chunks with
    `fetch_chunk(sha256) -> stored (zstd) bytes` (called from `workers` threads at once:
    round trips overlap, and verification releases the GIL). With `materialize_to`, the
    snapshot's files are also written there in the same pass, from the bytes each
    fetched chunk was verified with (a restore right after the pull then needs no
    second decompression), complete or not at all, like SnapshotStore.materialize."""
    manifest = SnapshotManifest.from_json(manifest_json)
    refs = list(manifest.chunk_refs())
    if store._manifest_path(manifest.snapshot_id).exists():
        if materialize_to is not None:
            store.materialize(manifest.snapshot_id, materialize_to)
        return store.get(manifest.snapshot_id), PullStats(0, 0, len(refs))
    out = _Materializer(store, manifest, materialize_to) if materialize_to else None

    def fetch_one(ref) -> int:
        blob = fetch_chunk(ref.sha256)
        result = store._check_blob(blob, ref)
        if isinstance(result, bytes) and xxhash.xxh3_128_hexdigest(result) != ref.xxh:
            result = "xxh3_128 mismatch"
        if isinstance(result, str):
            raise SnapshotCorruptError(f"chunk {ref.sha256} from the peer is corrupt: "
                                       f"{result}", chunk=ref.sha256)
        dest = store._chunk_path(ref.sha256)
        dest.parent.mkdir(exist_ok=True)
        store._write_atomic(dest, blob, sync_dir=False)
        if out is not None:
            out.write(ref.sha256, result)
        return len(blob)

    with store._flock(exclusive=False):
        try:
            missing = list({r.sha256: r for r in refs
                            if not store._chunk_path(r.sha256).exists()}.values())
            local = list({r.sha256: r for r in refs}.keys() - {r.sha256 for r in missing})
            with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
                sizes = list(pool.map(fetch_one, missing))     # the first failure raises
                if out is not None:                            # chunks this node had
                    list(pool.map(out.write_local, local))
            fetched, nbytes = len(sizes), sum(sizes)
            for d in {store._chunk_path(r.sha256).parent for r in refs}:
                fd = os.open(d, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            store._write_manifest(manifest)
            store._set_key(manifest.key, manifest.snapshot_id)
            store._touch(manifest.snapshot_id)
            if out is not None:
                out.commit()
        finally:
            if out is not None:
                out.abort()                                    # no-op after commit
    return manifest, PullStats(fetched, nbytes, len(refs) - fetched)


class _Materializer:
    """The snapshot's files in a temp dir beside `dest`, filled chunk by chunk from any
    thread (pwrite at each place a chunk occurs), renamed into place at commit."""

    def __init__(self, store: SnapshotStore, manifest: SnapshotManifest, dest: Path):
        self.store, self.dest = store, Path(dest)
        if self.dest.exists() and (not self.dest.is_dir() or any(self.dest.iterdir())):
            raise FileExistsError(f"{self.dest} exists and is not an empty directory")
        self.tmp = self.dest.parent / f".{self.dest.name}.pull-{os.getpid()}-{id(self):x}"
        self.tmp.mkdir(parents=True)
        self.fds: list[int] = []
        self.places: dict[str, list[tuple[int, int]]] = {}     # sha -> [(fd, offset)]
        self.refs = {r.sha256: r for r in manifest.chunk_refs()}
        for entry in manifest.files:
            target = self.tmp / entry.path       # safe: manifests refuse paths below links
            target.parent.mkdir(parents=True, exist_ok=True)
            if entry.link_target is not None:
                os.symlink(entry.link_target, target)
                continue
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self.fds.append(fd)
            os.ftruncate(fd, entry.size)          # zero chunks stay holes
            off = 0
            for ref in entry.chunks:
                if ref.sha256 != store._zero_sha:
                    self.places.setdefault(ref.sha256, []).append((fd, off))
                off += ref.size
            os.fchmod(fd, entry.mode)

    def write(self, sha: str, data: bytes) -> None:
        for fd, off in self.places.get(sha, ()):
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n

    def write_local(self, sha: str) -> None:
        if sha in self.places:                     # a chunk this node already had
            self.write(sha, self.store.read_chunk(self.refs[sha]))

    def commit(self) -> None:
        self._close()
        try:
            os.rename(self.tmp, self.dest)           # replaces an empty dir atomically
        except OSError:
            if not any(self.dest.iterdir()):         # a concurrent pull got there first:
                raise                                # same content, keep theirs


    def abort(self) -> None:
        self._close()
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def chunk_blob(store: SnapshotStore, sha256: str) -> bytes:
    """The stored (compressed) bytes of a chunk, for serving to a peer."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError("not a sha256 hex digest")
    return store._chunk_path(sha256).read_bytes()
