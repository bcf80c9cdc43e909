"""What a lazy mount serves, without FUSE: inode lookups, verified reads through the node's
chunk cache, background prefetch of the prioritized area, and the access recorder.

All methods are thread-safe. Reads block, except `read(..., block=False)`, which serves
what is already in memory or on local disk and raises WouldBlock for the rest: the FUSE
adapter answers those reads in its event loop and hands only the others to worker threads
(the hand-off and the wake-up after it cost ~0.15 ms of a read, more than decoding a small
file's member). A read either returns verified bytes or raises a LazyFSError in bounded
time (the source's retry policy bounds each fetch); it never returns unverified data.
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .cache import ChunkCache, lowest_thread_priority
from .errors import FormatError, LazyFSError
from .reader import INFLATE, EStargz, decode_chunk
from .tree import Chunk, Node

log = logging.getLogger("lazyfs")
MAX_PREFETCH_REQUEST = 32 << 20      # one range request of the prefetch covers at most this
FIRST_PREFETCH_REQUEST = 1 << 20     # ... and its first one this (then twice the last)
MAX_PREFETCH_GAP = 256 << 10         # ... and skips no more than this (skipped chunks)
PREFETCH_WORKERS = 4                 # at most this many threads inflate and verify chunks
WORKSET_READ_WAIT_S = 30.0           # a read waits this long for its working-set file
READAHEAD_BYTES = 1 << 20            # an on-demand fetch also brings the members up to this
READAHEAD_MEMBER = 64 << 10          # ... as long as each is at most this (small files)
RAW_CACHE_BYTES = 64 << 20           # ... kept compressed, decoded only when read

__all__ = ["LayerView", "Recorder", "WouldBlock", "load_recorded", "load_recorded_ranges",
           "merge_ranges"]


class WouldBlock(Exception):
    """A `read(..., block=False)` that would wait for the network or another thread."""


class Recorder:
    """Files opened and read through a mount, in first-access order, and the byte ranges
    read of each (merged), saved as JSON:

        {"version": 1, "layer": "...", "opened": [...], "read": [...],
         "ranges": {"name": [[start, end], ...], ...}}

    `opened` is what a later build passes as `prioritized` to `write_layer`, `ranges` its
    `read_ranges` (a large file of which little was read is prefetched in part).
    """

    def __init__(self, path: str | os.PathLike, layer: str):
        self.path, self.layer = Path(path), layer
        self._opened: dict[str, None] = {}
        self._read: dict[str, None] = {}
        self._ranges: dict[str, list[tuple[int, int]]] = {}
        self._dirty = False
        self._lock = threading.Lock()

    def note(self, name: str) -> None:
        """`name` was opened."""
        if name in self._opened:
            return
        with self._lock:
            if name not in self._opened:
                self._opened[name] = None
                self._dirty = True

    def note_read(self, name: str, start: int, end: int) -> None:
        """[start, end) of `name` was read (an empty range: a read at its end)."""
        with self._lock:
            if name not in self._read:
                self._read[name] = None
                self._dirty = True
            if start < end:
                self._ranges.setdefault(name, []).append((start, end))
                self._dirty = True

    def flush(self) -> bool:
        """Write the file atomically if anything changed; returns whether it wrote."""
        with self._lock:
            if not self._dirty:
                return False
            for name, rs in self._ranges.items():
                self._ranges[name] = merge_ranges(rs)
            doc = {"version": 1, "layer": self.layer, "opened": list(self._opened),
                   "read": list(self._read),
                   "ranges": {n: [list(r) for r in rs] for n, rs in self._ranges.items()}}
            self._dirty = False
        tmp = self.path.with_name(self.path.name +
                                  f".tmp-{os.getpid()}-{threading.get_native_id()}")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.path)
        return True


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Pure: sorted, overlapping or touching [start, end) ranges joined."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _load_record(path: str | os.PathLike) -> dict:
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise ValueError(f"{path}: not a lazyfs access record")
    return doc


def load_recorded(path: str | os.PathLike) -> list[str]:
    """The `opened` list of a recorder file: the prioritized files for the next build."""
    return [str(n) for n in _load_record(path).get("opened", [])]


def load_recorded_ranges(path: str | os.PathLike) -> dict[str, list[tuple[int, int]]]:
    """The `ranges` of a recorder file ({} from one written before they were recorded);
    raises ValueError when they are malformed."""
    raw = _load_record(path).get("ranges", {})
    try:
        return {str(n): [(int(lo), int(hi)) for lo, hi in rs] for n, rs in raw.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{path}: malformed read ranges") from None


@dataclass
class _Counters:
    cache_hits: int = 0
    fetched_chunks: int = 0
    prefetched_chunks: int = 0
    read_errors: int = 0
    last_error: str = ""
    prefetch_state: str = "idle"
    workset: dict | None = None
    meta: dict | None = None


class LayerView:
    def __init__(self, blob: EStargz, cache: ChunkCache, recorder: Recorder | None = None):
        self.blob, self.tree, self.cache, self.recorder = blob, blob.tree, cache, recorder
        self._inflight: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.counters = _Counters()
        self.workset = None          # prefetch_workset's writer: reads of its files use it
        # read-ahead: gzip members fetched along with a missed chunk, still compressed
        # (member offset -> bytes; decoded and verified only if a read needs them)
        self._members = sorted({(c.offset, c.end) for c in self.tree.chunks_in_order})
        self._member_starts = [o for o, _ in self._members]
        self._raw: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._raw_bytes = 0
        self._windows: list[tuple[int, int, threading.Event]] = []   # fetches under way

    # -- metadata ------------------------------------------------------------------------
    def node(self, ino: int) -> Node | None:
        return self.tree.nodes.get(ino)

    def lookup(self, parent: int, name: str) -> Node | None:
        node = self.tree.nodes.get(parent)
        if node is None or not node.is_dir:
            return None
        i = bisect.bisect_left(node.children, (name, 0))
        if i < len(node.children) and node.children[i][0] == name:
            return self.tree.nodes[node.children[i][1]]
        return None

    def opened(self, ino: int) -> None:
        if self.recorder is not None:
            self.recorder.note(self.tree.nodes[ino].name)

    # -- data ----------------------------------------------------------------------------
    def read(self, ino: int, offset: int, size: int, *, block: bool = True,
             record: bool = True) -> bytes:
        """Bytes [offset, offset+size) of a regular file (short at EOF). With `block` False,
        raises WouldBlock unless every piece is in memory or on local disk; `record` False:
        not noted by the recorder (a retry of a read that was)."""
        node = self.tree.nodes[ino]
        end = min(node.size, offset + size)
        if self.recorder is not None and record:
            self.recorder.note_read(node.name, offset, max(offset, end))
        if offset >= end:
            return b""
        ws = self.workset
        if ws is not None and ws.holds(ino):
            # a working-set file read before the view found it in the data dir: its chunks
            # are being decoded into that file (and not into the cache), so wait for it
            if not block and not ws.settled(ino):
                raise WouldBlock
            path = ws.wait_published(ino, WORKSET_READ_WAIT_S)
            if path is not None:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    return os.pread(fd, end - offset, offset)
                finally:
                    os.close(fd)
        starts = [c.file_offset for c in node.chunks]
        i = bisect.bisect_right(starts, offset) - 1
        out = []
        try:
            while offset < end:
                c = node.chunks[i]
                lo, hi = offset - c.file_offset, min(end, c.file_offset + c.size) - c.file_offset
                out.append(self._chunk_range(c, lo, hi, block))
                offset = c.file_offset + hi
                i += 1
        except LazyFSError as e:
            with self._lock:
                self.counters.read_errors += 1
                self.counters.last_error = f"read {node.name!r}: {e}"
            raise
        return b"".join(out)

    def file_chunks(self, node: Node):
        """A regular file's verified bytes, chunk by chunk, through the cache (not recorded
        as an access: the working-set writer reads with this)."""
        for c in node.chunks:
            yield self._chunk_range(c, 0, c.size)

    def _chunk_range(self, c: Chunk, lo: int, hi: int, block: bool = True) -> bytes:
        data = self.cache.read(c.digest, lo, hi - lo)
        if data is not None and len(data) == hi - lo:
            with self._lock:
                self.counters.cache_hits += 1
            return data
        return self._fetch(c, block)[lo:hi]

    def _fetch(self, c: Chunk, block: bool = True) -> bytes:
        """Fetch, verify and cache one chunk; concurrent callers share one fetch. Without
        `block`, only a small member already read ahead is decoded, else WouldBlock."""
        while True:
            with self._lock:
                ev = self._inflight.get(c.digest)
                if ev is None and not block and (c.offset not in self._raw or
                                                 c.end - c.offset > READAHEAD_MEMBER):
                    raise WouldBlock
                if ev is None:
                    mine = self._inflight[c.digest] = threading.Event()
                    break
            if not block:
                raise WouldBlock
            ev.wait()
            data = self.cache.read(c.digest)
            if data is not None:
                return data
            # the leader failed: try ourselves (bounded by the source's retry policy)
        try:
            try:
                data = decode_chunk(c, self._member(c, block))
            except LazyFSError:
                with self._lock:           # a bad member is fetched again next time
                    raw = self._raw.pop(c.offset, None)
                    self._raw_bytes -= len(raw) if raw is not None else 0
                raise
            self.cache.put_behind(c.digest, data)
            with self._lock:
                self.counters.fetched_chunks += 1
            return data
        finally:
            with self._lock:
                self._inflight.pop(c.digest, None)
            mine.set()

    def _member(self, c: Chunk, block: bool = True) -> bytes:
        """The compressed gzip member holding `c`: from the read-ahead, or fetched with the
        small members after it, up to READAHEAD_BYTES in one range request (imports read
        the small files of a package one after another, and they lie together in the
        blob: one request instead of one per file; a large file's chunk, often read at
        random, comes alone)."""
        while True:
            with self._lock:
                raw = self._raw.get(c.offset)
                if raw is not None:
                    self._raw.move_to_end(c.offset)
                    return raw
                if not block:             # evicted since _fetch looked
                    raise WouldBlock
                pending = next((ev for lo, hi, ev in self._windows if lo <= c.offset < hi),
                               None)
                if pending is None:
                    i = bisect.bisect_left(self._member_starts, c.offset)
                    j = i + 1
                    limit = c.offset + READAHEAD_BYTES
                    while j < len(self._members) and self._members[j][1] <= limit and \
                            self._members[j][1] - self._members[j][0] <= READAHEAD_MEMBER:
                        j += 1
                    start, end = c.offset, max(c.end, self._members[j - 1][1])
                    mine = threading.Event()
                    self._windows.append((start, end, mine))
                    break
            pending.wait()                 # another reader's window covers it
        try:
            buf = self.blob.source.read(start, end - start)
            if len(buf) != end - start:
                raise FormatError(f"range [{start}, {end}) of the blob came back short: "
                                  f"{len(buf)} bytes")
            with self._lock:
                for o, e in self._members[i:j]:
                    if o not in self._raw:
                        self._raw[o] = bytes(buf[o - start:e - start])
                        self._raw_bytes += e - o
                while self._raw_bytes > RAW_CACHE_BYTES and self._raw:
                    _, old = self._raw.popitem(last=False)
                    self._raw_bytes -= len(old)
            return buf[: c.end - start] if j > i + 1 else buf
        finally:
            with self._lock:
                self._windows = [w for w in self._windows if w[2] is not mine]
            mine.set()

    def _claim(self, digests: list[str]) -> dict[str, threading.Event]:
        """Mark chunks as being fetched (those no one fetches yet); see _fetch."""
        with self._lock:
            mine = {d: threading.Event() for d in dict.fromkeys(digests)
                    if d not in self._inflight}
            self._inflight.update(mine)
        return mine

    def _release(self, claimed: dict[str, threading.Event]) -> None:
        with self._lock:
            for d in claimed:
                self._inflight.pop(d, None)
        for ev in claimed.values():
            ev.set()

    # -- prefetch ------------------------------------------------------------------------
    def _prefetch_ranges(self, everything: bool) -> tuple[list[tuple[list[Chunk], int, int]], int]:
        """Pure planning: the chunks to prefetch (not cached yet) grouped into range
        requests, first FIRST_PREFETCH_REQUEST bytes, each next twice as large up to
        MAX_PREFETCH_REQUEST (a gap of skipped chunks over MAX_PREFETCH_GAP ends a
        request: the chunks of partially prefetched files, Tree.partial); returns (ranges
        as (chunks, start, end), chunk count)."""
        limit = self.blob.toc_offset if everything else self.tree.prefetch_end
        skip = frozenset() if everything else self.tree.prefetch_skip
        todo = [c for c in self.tree.chunks_in_order
                if c.offset < limit and c not in skip and not self.cache.has(c.digest)]
        todo.sort(key=lambda c: (c.offset, c.inner_offset))
        ranges, i, size = [], 0, FIRST_PREFETCH_REQUEST
        while i < len(todo):
            j, start = i, todo[i].offset
            while j < len(todo) and todo[j].end - start <= size and (
                    j == i or todo[j].offset - todo[j - 1].end <= MAX_PREFETCH_GAP):
                j += 1
            j = max(j, i + 1)
            ranges.append((todo[i:j], start, max(c.end for c in todo[i:j])))
            i, size = j, min(size * 2, MAX_PREFETCH_REQUEST)
        return ranges, len(todo)

    def prefetch(self, stop: threading.Event | None = None, *, everything: bool = False,
                 on_progress: Callable[[], None] | None = None,
                 on_chunk: Callable[[Chunk, bytes], object] | None = None,
                 cache_skip: Callable[[Chunk], bool] | None = None,
                 workers: int | None = None) -> int:
        """Fetch the prioritized area (all chunks if `everything`) in few large ranges.

        The first range is small (FIRST_PREFETCH_REQUEST) and each next one twice as large,
        up to MAX_PREFETCH_REQUEST, so the files needed first arrive first; the next range
        is downloaded while the current one is decoded. Each range's chunks are inflated,
        verified and stored by `workers` threads at once (default: one per CPU; zlib,
        hashlib and file writes release the GIL), each chunk handed to the readers waiting
        for it as soon as it is stored. Returns the number of chunks stored;
        `on_chunk(chunk, data)` is given each one as it is stored (from those threads, so it
        must be thread-safe), and chunks for which `cache_skip(chunk)` is true go to
        `on_chunk` only, not into the cache. Errors end the prefetch (reads still fetch on
        demand) and are logged; this never raises LazyFSError.
        """
        ranges, total = self._prefetch_ranges(everything)
        workers = max(1, workers or min(PREFETCH_WORKERS, os.cpu_count() or 1))
        self.counters.prefetch_state = "running"
        stored, t0 = 0, time.monotonic()

        def download(k: int):
            chunks, start, end = ranges[k]
            # readers of these chunks wait for this range instead of fetching them again
            claimed = self._claim([c.digest for c in chunks])
            try:
                return claimed, self.blob.source.read(start, end - start)
            except BaseException:
                self._release(claimed)
                raise

        def store(group: list[tuple[Chunk, threading.Event | None]], buf: memoryview,
                  start: int) -> int:
            """Inflate, verify and store `group` (one task); releases every claim in it."""
            done = 0
            try:
                for c, ev in group:
                    try:
                        data = decode_chunk(c, buf[c.offset - start: c.end - start])
                        if cache_skip is None or not cache_skip(c):
                            self.cache.put_behind(c.digest, data)
                        if on_chunk is not None:
                            on_chunk(c, data)
                        done += 1
                    finally:
                        if ev is not None:
                            self._release({c.digest: ev})
            finally:                  # after a failure: the claims of the rest go too
                rest = {c.digest: e for c, e in group[done + 1:] if e is not None}
                if rest:
                    self._release(rest)
            return done

        def groups(chunks: list[Chunk], claimed: dict[str, threading.Event]):
            """The range's chunks in about 2 * workers tasks of similar decoded size."""
            target = max(1, sum(c.size for c in chunks) // (2 * workers))
            group: list[tuple[Chunk, threading.Event | None]] = []
            size = 0
            for c in chunks:
                group.append((c, claimed.pop(c.digest, None)))
                size += c.size
                if size >= target:
                    yield group
                    group, size = [], 0
            if group:
                yield group

        fetcher = ThreadPoolExecutor(1, thread_name_prefix="lazyfs-prefetch")
        decoders = ThreadPoolExecutor(workers, thread_name_prefix="lazyfs-decode",
                                      # (no measured effect on a container beside them:
                                      # containers are in their own cgroups)
                                      initializer=lowest_thread_priority)
        tasks: list[Future] = []
        ahead = fetcher.submit(download, 0) if ranges else None
        try:
            for k, (chunks, start, _) in enumerate(ranges):
                assert ahead is not None
                claimed, buf = ahead.result()
                ahead = None
                if k + 1 < len(ranges) and not (stop is not None and stop.is_set()):
                    ahead = fetcher.submit(download, k + 1)
                behind = len(tasks)
                try:
                    view = memoryview(buf)
                    for group in groups(chunks, claimed):
                        tasks.append(decoders.submit(store, group, view, start))
                finally:
                    self._release(claimed)       # none left unless two chunks share a digest
                # at most two ranges' chunks are decoded at once (bounds the memory):
                # wait for the one before this
                for f in tasks[:behind]:
                    stored += f.result()
                del tasks[:behind]
                with self._lock:
                    self.counters.prefetched_chunks += len(chunks)
                if on_progress is not None:
                    on_progress()
                if ahead is None:
                    break
            for f in tasks:
                stored += f.result()
            tasks.clear()
            self.counters.prefetch_state = "done" if stored == total else "stopped"
            log.info("prefetch: %d chunks in %d ranges in %.2fs (%d decoding threads, %s)",
                     stored, len(ranges), time.monotonic() - t0, workers, INFLATE)
        except (LazyFSError, OSError) as e:
            self.counters.prefetch_state = f"failed: {e}"
            log.warning("prefetch stopped after %d chunks: %s", stored, e)
        finally:
            decoders.shutdown(wait=True)  # every claim handed to a task is released
            if ahead is not None:         # stopped or failed with a download under way
                # a failed download released its claim itself
                with contextlib.suppress(Exception):
                    self._release(ahead.result()[0])
            fetcher.shutdown(wait=False)
        return stored

    def prefetch_workset(self, dest: str | os.PathLike, stop: threading.Event | None = None,
                         *, only: bool = False) -> dict:
        """`prefetch`, writing each prioritized file whole into the data dir `dest` as it
        arrives (lazyfs.workset). With `only`, their chunks go to that dir alone, not into
        the chunk cache: for a node whose containers wait for the working set, so they
        never read those files through FUSE (one who does, e.g. when the writing failed,
        fetches them on demand). Returns (and keeps for the status) what happened; never
        raises."""
        from .workset import WorksetWriter, plan_workset
        plan = plan_workset(self.tree)
        out: dict[str, object]
        writer = None
        if not plan.empty:
            try:
                writer = WorksetWriter(self.tree, plan, dest)
            except (LazyFSError, OSError) as e:
                log.warning("working set dir %s not written: %s", dest, e)
                out = {"state": f"failed: {type(e).__name__}: {e}"}
        failed: list[BaseException] = []

        def write(c: Chunk, data: bytes) -> None:
            if failed or writer is None:
                return
            try:
                writer.chunk(c, data)        # in the decoding threads: the writer is thread-safe
            except OSError as e:
                failed.append(e)
        in_dir = set(writer.by_digest) if writer is not None and only else set()
        self.workset = writer
        self.prefetch(stop, on_chunk=None if writer is None else write,
                      cache_skip=(lambda c: c.digest in in_dir) if in_dir else None)
        if plan.empty:
            out = {"state": "none"}
        elif writer is None:
            pass
        elif failed or self.counters.prefetch_state != "done":
            writer.abort()
            out = {"state": f"failed: {failed[0]}" if failed else "skipped",
                   "reason": f"prefetch {self.counters.prefetch_state}"}
        else:
            try:
                st = writer.finish(lambda c: self._chunk_range(c, 0, c.size))
                out = {"state": "done", "dir": str(dest), "files": st.files,
                       "bytes": st.bytes, "seconds": st.seconds}
                log.info("working set: %d files (%.1f MiB) written to %s, %.2fs after the "
                         "prefetch started", st.files, st.bytes / 2**20, dest, st.seconds)
            except (LazyFSError, OSError) as e:
                out = {"state": f"failed: {type(e).__name__}: {e}"}
                log.warning("working set dir %s not written: %s", dest, e)
        with self._lock:
            self.counters.workset = out
        return out

    def prefetch_result(self, state: str, chunks: int, workset: dict) -> None:
        """Record a prefetch done by another process (lazyfs.early) as this view's own."""
        with self._lock:
            self.counters.prefetch_state = state
            self.counters.prefetched_chunks = chunks
            self.counters.workset = workset

    def status(self) -> dict:
        with self._lock:
            c = self.counters
            out = {"cache_hits": c.cache_hits, "fetched_chunks": c.fetched_chunks,
                   "prefetched_chunks": c.prefetched_chunks, "read_errors": c.read_errors,
                   "last_error": c.last_error, "prefetch": c.prefetch_state}
            if c.workset is not None:
                out["workset"] = dict(c.workset)
            if c.meta is not None:
                out["meta"] = dict(c.meta)
        out["source"] = {"describe": self.blob.source.describe(), **self.blob.source.stats()}
        return out
