"""Moving snapshots between stores chunk by chunk: a node that must restore a snapshot
it lacks pulls the manifest from a peer, then only the chunks it does not already hold
(chunks are content-addressed, so dedup across snapshots is dedup across nodes too).
Every fetched chunk is verified (size, sha256, xxh3) before it is stored; the manifest
is committed last, so a failed pull leaves nothing visible.
"""
from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass
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
         fetch_chunk: Callable[[str], bytes], workers: int = 4) -> tuple[SnapshotManifest, PullStats]:
    """Import the snapshot described by `manifest_json`, fetching missing chunks with
    `fetch_chunk(sha256) -> stored (zstd) bytes` (called from `workers` threads at once:
    round trips overlap, and verification releases the GIL)."""
    manifest = SnapshotManifest.from_json(manifest_json)
    refs = list(manifest.chunk_refs())
    if store._manifest_path(manifest.snapshot_id).exists():
        return store.get(manifest.snapshot_id), PullStats(0, 0, len(refs))

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
        return len(blob)

    with store._flock(exclusive=False):
        missing = list({r.sha256: r for r in refs
                        if not store._chunk_path(r.sha256).exists()}.values())
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            sizes = list(pool.map(fetch_one, missing))     # the first failure raises
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
    return manifest, PullStats(fetched, nbytes, len(refs) - fetched)


def chunk_blob(store: SnapshotStore, sha256: str) -> bytes:
    """The stored (compressed) bytes of a chunk, for serving to a peer."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError("not a sha256 hex digest")
    return store._chunk_path(sha256).read_bytes()
