"""LayerView without FUSE: verified reads through the shared chunk cache, single-flight
fetches, prefetch of the prioritized area, the access recorder feeding the next build."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from lazyfs import FileBlobSource, open_estargz, write_layer
from lazyfs.cache import ChunkCache
from lazyfs.errors import DigestMismatchError, FormatError, SourceUnavailableError
from lazyfs.testing import make_layer
from lazyfs.view import LayerView, Recorder, load_recorded

CHUNK = 64 * 1024


class CountingSource:
    """Wraps a source: counts reads, can fail or slow down on demand."""

    def __init__(self, inner):
        self.inner, self.reads, self.failing, self.delay = inner, [], False, 0.0
        self.lock = threading.Lock()

    def size(self):
        return self.inner.size()

    def read(self, offset, length):
        if self.delay:
            time.sleep(self.delay)
        if self.failing:
            raise SourceUnavailableError("fake source is down")
        with self.lock:
            self.reads.append((offset, length))
        return self.inner.read(offset, length)

    def describe(self):
        return "counting " + self.inner.describe()

    def stats(self):
        return {"requests": len(self.reads), "bytes_received": sum(n for _, n in self.reads)}

    def close(self):
        self.inner.close()


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    return make_layer(tmp_path / "layer", big=1_000_000)


def _view(tmp_path: Path, layer: Path, prioritized=(), record: bool = False):
    b = write_layer(layer, tmp_path / "l.esgz", chunk_size=CHUNK, prioritized=prioritized)
    src = CountingSource(FileBlobSource(b.path))
    blob = open_estargz(src, b.toc_digest)
    src.reads.clear()
    rec = Recorder(tmp_path / "record.json", b.digest) if record else None
    return LayerView(blob, ChunkCache(tmp_path / "cache"), rec), src


def _ino(view: LayerView, path: str) -> int:
    return view.tree.paths[path]


def test_reads_across_chunk_boundaries(tmp_path: Path, layer: Path):
    view, _ = _view(tmp_path, layer)
    want = (layer / "usr/lib/python3/big.bin").read_bytes()
    ino = _ino(view, "usr/lib/python3/big.bin")
    for off, n in [(0, 10), (CHUNK - 5, 10), (3 * CHUNK - 1, 2 * CHUNK + 2), (999_990, 100),
                   (2_000_000, 10)]:
        assert view.read(ino, off, n) == want[off:off + n]
    assert view.read(ino, 0, 10**7) == want


def test_chunks_are_cached_by_digest_and_shared(tmp_path: Path, layer: Path):
    view, src = _view(tmp_path, layer)
    ino = _ino(view, "usr/lib/python3/big.bin")
    view.read(ino, 0, 100)
    first = len(src.reads)
    assert first == 1
    digest = view.tree.nodes[ino].chunks[0].digest
    view.cache.flush()                                 # written behind the read, at low priority
    assert (tmp_path / "cache/sha256" / digest[7:9] / digest[7:]).stat().st_size == CHUNK
    view.read(ino, 50, 1000)
    assert len(src.reads) == first                     # served from the cache
    # a second mount of the same layer on the node uses the same cache dir
    view2 = LayerView(view.blob, ChunkCache(tmp_path / "cache"))
    assert view2.read(ino, 0, 100) == view.read(ino, 0, 100)
    assert len(src.reads) == first


def test_chunks_written_behind_are_served_from_memory_until_on_disk(tmp_path: Path):
    import hashlib
    cache = ChunkCache(tmp_path / "cache")
    gate = threading.Event()
    real_put = cache.put
    cache.put = lambda d, data, verified=False: gate.wait(10) and real_put(d, data, verified=verified)
    data = b"chunk bytes" * 100
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    cache.put_behind(digest, data)
    assert cache.has(digest) and cache.read(digest, 5, 20) == data[5:25]   # from memory
    assert not cache.path(digest).exists()
    gate.set()
    cache.flush()
    assert cache.path(digest).read_bytes() == data and cache.read(digest) == data
    assert not cache._behind and cache._behind_bytes == 0


def test_concurrent_reads_of_one_chunk_fetch_once(tmp_path: Path, layer: Path):
    view, src = _view(tmp_path, layer)
    src.delay = 0.2
    ino = _ino(view, "usr/lib/python3/big.bin")
    results = []
    threads = [threading.Thread(target=lambda: results.append(view.read(ino, 10, 100)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 8
    assert len(src.reads) == 1


def test_source_failure_raises_then_recovers(tmp_path: Path, layer: Path):
    view, src = _view(tmp_path, layer)
    ino = _ino(view, "etc/hello.txt")
    src.failing = True
    with pytest.raises(SourceUnavailableError):
        view.read(ino, 0, 100)
    assert view.status()["read_errors"] == 1 and "down" in view.status()["last_error"]
    src.failing = False
    assert view.read(ino, 0, 100) == b"hello, lazy world\n"


def test_prefetch_fetches_the_prioritized_area_in_one_request(tmp_path: Path, layer: Path):
    view, src = _view(tmp_path, layer, prioritized=["usr/lib/python3/big.bin", "etc/hello.txt"])
    stored = view.prefetch()
    assert stored == len(view.tree.nodes[_ino(view, "usr/lib/python3/big.bin")].chunks) + 1
    assert len(src.reads) == 1 and src.reads[0][0] + src.reads[0][1] <= view.tree.prefetch_end
    view.read(_ino(view, "usr/lib/python3/big.bin"), 0, 10**7)
    view.read(_ino(view, "etc/hello.txt"), 0, 100)
    assert len(src.reads) == 1                         # all from the cache
    view.read(_ino(view, "usr/lib/python3/text.py"), 0, 100)
    assert len(src.reads) == 2                         # not prioritized: on demand


def test_prefetch_failure_is_contained(tmp_path: Path, layer: Path):
    view, src = _view(tmp_path, layer, prioritized=["etc/hello.txt"])
    src.failing = True
    assert view.prefetch() == 0
    assert view.status()["prefetch"].startswith("failed")


def test_recorder_feeds_the_next_build(tmp_path: Path, layer: Path):
    view, _ = _view(tmp_path, layer, record=True)
    for path in ["usr/lib/python3/text.py", "etc/hello.txt", "usr/lib/python3/text.py"]:
        view.opened(_ino(view, path))
        view.read(_ino(view, path), 0, 10)
    assert view.recorder.flush() and not view.recorder.flush()
    doc = json.loads((tmp_path / "record.json").read_text())
    assert doc["opened"] == ["usr/lib/python3/text.py", "etc/hello.txt"]
    prio = load_recorded(tmp_path / "record.json")
    b = write_layer(layer, tmp_path / "next.esgz", prioritized=prio)
    e = open_estargz(FileBlobSource(b.path), b.toc_digest)
    assert e.tree.prioritized == tuple(prio) and e.tree.prefetch_end > 0


def test_cache_refuses_wrong_bytes_and_prunes(tmp_path: Path):
    cache = ChunkCache(tmp_path / "c")
    with pytest.raises(DigestMismatchError):
        cache.put("sha256:" + "0" * 64, b"not that")
    import hashlib
    for i in range(4):
        data = bytes([i]) * 1000
        cache.put("sha256:" + hashlib.sha256(data).hexdigest(), data)
    assert cache.total_bytes() == 4000
    assert cache.prune(2500) == 2000 and cache.total_bytes() == 2000


def _put(cache: ChunkCache, i: int, size: int = 1000) -> str:
    import hashlib
    data = bytes([i]) * size
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    cache.put(digest, data)
    return digest


def test_cache_prunes_least_recently_used_first(tmp_path: Path):
    import os
    cache = ChunkCache(tmp_path / "c")
    digests = [_put(cache, i) for i in range(4)]
    for age, d in enumerate(digests):             # oldest: digests[0]
        os.utime(cache.path(d), (1000 + age, 1000 + age))
    # a read makes a chunk the most recently used one
    assert ChunkCache(tmp_path / "c").read(digests[0]) == bytes([0]) * 1000
    u = cache.prune_usage(2000)
    assert (u.freed_chunks, u.bytes, u.chunks) == (2, 2000, 2)
    assert [cache.has(d) for d in digests] == [True, False, False, True]


def test_cache_never_prunes_chunks_a_live_mount_pins(tmp_path: Path):
    import subprocess
    import sys
    cache = ChunkCache(tmp_path / "c")
    digests = [_put(cache, i) for i in range(4)]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        cache.pin(digests[:2], pid=live.pid)
        cache.pin(digests[2:3], pid=2**22 + 7)       # no such process: a stale pin
        assert cache.pinned() == set(digests[:2])
        assert not (tmp_path / "c/pins" / str(2**22 + 7)).exists()   # cleaned up
        u = cache.prune_usage(0)
        assert (u.bytes, u.pinned_bytes, u.freed_chunks) == (2000, 2000, 2)
        assert cache.has(digests[0]) and cache.has(digests[1])
        assert cache.remove(set(digests)) == 0         # remove() spares them as well
    finally:
        live.kill()
        live.wait()
    assert cache.remove(set(digests)) == 2000 and cache.total_bytes() == 0


def test_reads_wait_for_the_prefetch_instead_of_fetching_again(tmp_path: Path, layer: Path):
    view, src = _view(tmp_path, layer, prioritized=["usr/lib/python3/text.py"])
    src.delay = 0.3
    t = threading.Thread(target=view.prefetch)
    t.start()
    time.sleep(0.1)                                    # the prefetch's range read is under way
    ino = _ino(view, "usr/lib/python3/text.py")
    want = (layer / "usr/lib/python3/text.py").read_bytes()
    assert view.read(ino, 0, len(want)) == want
    t.join()
    assert len(src.reads) == 1 and view.counters.fetched_chunks == 0


def test_prefetch_ranges_start_small_and_grow(tmp_path: Path):
    import os

    import lazyfs.view as view_mod
    d = tmp_path / "big"
    (d / "lib").mkdir(parents=True)
    names = []
    for i in range(12):                       # 12 incompressible 256 KiB files: 3 MiB
        (d / f"lib/m{i:02}.so").write_bytes(os.urandom(256 << 10))
        names.append(f"lib/m{i:02}.so")
    b = write_layer(d, tmp_path / "b.esgz", prioritized=names)
    src = CountingSource(FileBlobSource(b.path))
    blob = open_estargz(src, b.toc_digest)
    src.reads.clear()
    view = LayerView(blob, ChunkCache(tmp_path / "cache"))
    assert view.prefetch() == 12              # the 12 files (the landmark is after them)
    sizes = [n for _, n in src.reads]
    assert sizes[0] <= view_mod.FIRST_PREFETCH_REQUEST and len(sizes) >= 2, sizes
    assert sizes == sorted(sizes[:-1]) + sizes[-1:]   # growing (the last may be a remainder)
    assert view.status()["prefetch"] == "done"


def _many_files(tmp_path: Path, n: int = 40):
    import os
    d = tmp_path / "many"
    (d / "lib").mkdir(parents=True)
    names = []
    for i in range(n):                        # incompressible, some of several chunks
        (d / f"lib/m{i:02}.so").write_bytes(os.urandom((i % 5 + 1) * 40_000))
        names.append(f"lib/m{i:02}.so")
    b = write_layer(d, tmp_path / "m.esgz", chunk_size=CHUNK, prioritized=names)
    src = CountingSource(FileBlobSource(b.path))
    blob = open_estargz(src, b.toc_digest)
    src.reads.clear()
    return d, names, src, LayerView(blob, ChunkCache(tmp_path / "cache"))


def test_prefetch_in_several_threads_writes_the_working_set_dir(tmp_path: Path):
    d, names, _, view = _many_files(tmp_path)
    out = view.prefetch_workset(tmp_path / "ws", only=True)
    assert out["state"] == "done" and out["files"] == len(names)
    for n in names:
        assert (tmp_path / "ws" / n).read_bytes() == (d / n).read_bytes()
    assert view.cache.total_bytes() == 0          # only: the chunks went to the dir alone
    assert view.status()["prefetch"] == "done"
    # a read through FUSE of a working-set file (opened before the view found it in the
    # data dir) is served from that file, not fetched again
    src_reads = len(view.blob.source.reads)
    ino = view.tree.lookup(names[3]).ino
    assert view.read(ino, 5, 70_000) == (d / names[3]).read_bytes()[5:70_005]
    assert len(view.blob.source.reads) == src_reads and view.status()["fetched_chunks"] == 0


def test_a_read_of_a_working_set_file_waits_for_it_during_the_prefetch(tmp_path: Path):
    import threading
    d, names, src, view = _many_files(tmp_path, n=12)
    gate = threading.Event()
    real_read = src.read

    def slow(offset, length):                    # the prefetch's range reads wait for the gate
        gate.wait(10)
        return real_read(offset, length)
    src.read = slow
    t = threading.Thread(target=view.prefetch_workset, args=(tmp_path / "ws",),
                         kwargs={"only": True})
    t.start()
    while view.workset is None:
        pass
    got = {}
    reader = threading.Thread(target=lambda: got.setdefault(
        "data", view.read(view.tree.lookup(names[9]).ino, 0, 1 << 20)))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive()                      # waiting for the file, not fetching it
    gate.set()
    reader.join(10)
    t.join(10)
    assert got["data"] == (d / names[9]).read_bytes()
    assert view.status()["fetched_chunks"] == 0


def test_a_bad_chunk_fails_the_prefetch_and_releases_every_waiting_reader(tmp_path: Path):
    d, names, src, view = _many_files(tmp_path)
    bad = view.tree.lookup(names[7]).chunks[0]
    real_read = src.read

    def corrupting(offset, length):               # flips a byte inside one chunk's member
        data = bytearray(real_read(offset, length))
        if offset <= bad.offset + 20 < offset + length:
            data[bad.offset + 20 - offset] ^= 0xFF
        return bytes(data)
    src.read = corrupting
    stored = view.prefetch(workers=4)
    assert stored < len(view.tree.chunks_in_order) - 1
    assert view.status()["prefetch"].startswith("failed")
    assert not view._inflight                     # no reader can wait for a claim forever
    src.read = real_read
    assert view.read(_ino(view, names[7]), 0, 10) == (d / names[7]).read_bytes()[:10]


@pytest.mark.parametrize("lib", ["zlib", "isal"])
def test_chunks_decode_and_verify_with_either_inflate_library(tmp_path: Path, monkeypatch,
                                                              lib: str):
    import zlib

    from lazyfs import reader
    from lazyfs.errors import FormatError
    if lib == "isal":               # a dependency (pyproject): installed wherever tests run
        from isal import isal_zlib as mod
    else:
        mod = zlib
    monkeypatch.setattr(reader, "_inflate_lib", mod)
    d, names, src, view = _many_files(tmp_path, n=6)
    c = view.tree.lookup(names[3]).chunks[0]
    member = src.read(c.offset, c.end - c.offset)
    assert reader.decode_chunk(c, memoryview(member)) == (d / names[3]).read_bytes()[:c.size]
    with pytest.raises(FormatError):
        reader.decode_chunk(c, member[:len(member) // 2])        # truncated member
    with pytest.raises(DigestMismatchError):
        other = view.tree.lookup(names[4]).chunks[0]
        reader.decode_chunk(other, src.read(c.offset, c.end - c.offset))


def _small_files(tmp_path: Path, n: int = 30):
    import os
    d = tmp_path / "small"
    (d / "pkg").mkdir(parents=True)
    for i in range(n):                            # like a package's .py files: small, together
        (d / f"pkg/mod{i:02}.py").write_bytes(os.urandom(3000))
    (d / "pkg/zbig.so").write_bytes(os.urandom(200_000))   # a large member after them
    b = write_layer(d, tmp_path / "s.esgz", chunk_size=CHUNK)
    src = CountingSource(FileBlobSource(b.path))
    view = LayerView(open_estargz(src, b.toc_digest), ChunkCache(tmp_path / "cache"))
    src.reads.clear()
    return d, src, view


def test_an_on_demand_read_brings_the_small_files_after_it_in_one_request(tmp_path: Path):
    d, src, view = _small_files(tmp_path)
    names = [f"pkg/mod{i:02}.py" for i in range(30)]
    assert view.read(_ino(view, names[0]), 0, 4096) == (d / names[0]).read_bytes()
    assert len(src.reads) == 1
    for n in names[1:]:                           # from the read-ahead, each verified
        assert view.read(_ino(view, n), 0, 4096) == (d / n).read_bytes()
    assert len(src.reads) == 1
    assert view.status()["fetched_chunks"] == 30
    # the large member after them was not part of it: it comes by its own request
    big = view.tree.lookup("pkg/zbig.so").chunks[0]
    assert all(off + length <= big.offset for off, length in src.reads)
    assert view.read(_ino(view, "pkg/zbig.so"), 0, 10) == (d / "pkg/zbig.so").read_bytes()[:10]
    assert len(src.reads) == 2


def test_a_tampered_member_in_the_read_ahead_fails_only_its_own_read(tmp_path: Path):
    d, src, view = _small_files(tmp_path, n=5)
    victim = view.tree.lookup("pkg/mod03.py").chunks[0]
    real_read = src.read

    def corrupting(offset, length):
        data = bytearray(real_read(offset, length))
        if offset <= victim.offset + 20 < offset + length:
            data[victim.offset + 20 - offset] ^= 0xFF
        return bytes(data)
    src.read = corrupting
    assert view.read(_ino(view, "pkg/mod00.py"), 0, 4096) == (d / "pkg/mod00.py").read_bytes()
    with pytest.raises((DigestMismatchError, FormatError)):
        view.read(_ino(view, "pkg/mod03.py"), 0, 4096)
    assert view.read(_ino(view, "pkg/mod04.py"), 0, 4096) == (d / "pkg/mod04.py").read_bytes()
    assert not view.cache.has(victim.digest)      # nothing unverified was kept as data
    src.read = real_read                          # the source is good again: fetched anew
    assert view.read(_ino(view, "pkg/mod03.py"), 0, 4096) == (d / "pkg/mod03.py").read_bytes()


def test_toc_records_are_immutable_and_compare_by_value():
    from lazyfs.toc import TOCEntry
    from lazyfs.tree import Chunk
    kw = {"name": "a/b.py", "type": "reg", "size": 3, "offset": 7}
    e = TOCEntry(**kw)
    assert e == TOCEntry(**kw) and e.xattrs == {} and e.uid == 0
    with pytest.raises(AttributeError):
        e.size = 4
    c = Chunk(1, 2, 0, 0, 5, "sha256:" + "a" * 64)
    assert c == Chunk(offset=1, end=2, inner_offset=0, file_offset=0, size=5,
                      digest="sha256:" + "a" * 64) and c.member_digest == ""
    assert hash(c) == hash(Chunk(1, 2, 0, 0, 5, "sha256:" + "a" * 64))   # prefetch_skip sets
    with pytest.raises(AttributeError):
        c.size = 4


def test_a_nonblocking_read_serves_memory_and_read_ahead_and_never_the_network(tmp_path: Path):
    from lazyfs.view import WouldBlock
    d, src, view = _small_files(tmp_path, n=6)
    first, second = _ino(view, "pkg/mod00.py"), _ino(view, "pkg/mod01.py")
    with pytest.raises(WouldBlock):              # nothing local yet: the FUSE loop hands it off
        view.read(first, 0, 4096, block=False)
    assert src.reads == []
    assert view.read(first, 0, 4096) == (d / "pkg/mod00.py").read_bytes()
    assert len(src.reads) == 1
    # its neighbour came with it, compressed: decoded and verified in the caller's thread
    assert view.read(second, 0, 4096, block=False) == (d / "pkg/mod01.py").read_bytes()
    assert view.read(first, 10, 20, block=False) == (d / "pkg/mod00.py").read_bytes()[10:30]
    with pytest.raises(WouldBlock):              # the large member after them is not local
        view.read(_ino(view, "pkg/zbig.so"), 0, 10, block=False)
    assert len(src.reads) == 1


def test_merge_ranges_joins_overlapping_and_touching_ones():
    from lazyfs.view import merge_ranges
    assert merge_ranges([(50, 60), (0, 10), (10, 20), (15, 18), (30, 40)]) == \
        [(0, 20), (30, 40), (50, 60)]
    assert merge_ranges([]) == []


def test_plan_partial_takes_large_files_of_which_little_was_read():
    from lazyfs.estargz import plan_partial
    from lazyfs.toc import PREFETCH_LANDMARK, TOCEntry

    def file(name, size, chunk):
        out = [TOCEntry(name=name, type="reg", size=size, chunk_size=chunk)]
        out += [TOCEntry(name=name, type="chunk", chunk_offset=o,
                         chunk_size=chunk if o + chunk < size else 0)
                for o in range(chunk, size, chunk)]
        return out
    entries = (file("big.so", 1000, 100) + file("half.so", 1000, 100) + file("small", 50, 100)
               + [TOCEntry(name=PREFETCH_LANDMARK, type="reg", size=1)]
               + file("later.so", 1000, 100))
    ranges = {"big.so": [(0, 10), (350, 420)], "half.so": [(0, 600)], "small": [(0, 50)],
              "later.so": [(0, 10)]}
    assert plan_partial(entries, ranges, min_size=500, max_fraction=0.5) == \
        {"big.so": [0, 300, 400]}                 # half.so: 6 of 10 chunks; later: not first
    assert plan_partial(entries, ranges, min_size=2000, max_fraction=0.5) == {}


def test_a_large_file_little_read_is_prefetched_in_part_and_read_through_the_cache(
        tmp_path: Path, layer: Path, monkeypatch):
    from lazyfs import estargz
    from lazyfs.view import load_recorded_ranges
    big = "usr/lib/python3/big.bin"
    view, _ = _view(tmp_path, layer, record=True)
    for path, off, n in [("etc/hello.txt", 0, 100), (big, 0, 10), (big, 5 * CHUNK + 1, 10),
                         (big, 5 * CHUNK + 5, 10)]:
        view.opened(_ino(view, path))
        view.read(_ino(view, path), off, n)
    view.recorder.flush()
    ranges = load_recorded_ranges(tmp_path / "record.json")
    assert ranges[big] == [(0, 10), (5 * CHUNK + 1, 5 * CHUNK + 15)]
    monkeypatch.setattr(estargz, "PARTIAL_MIN_SIZE", 4 * CHUNK)
    b = write_layer(layer, tmp_path / "next.esgz", chunk_size=CHUNK,
                    prioritized=load_recorded(tmp_path / "record.json"), read_ranges=ranges)
    assert b.partial == (big,)
    src = CountingSource(FileBlobSource(b.path))
    blob = open_estargz(src, b.toc_digest)        # the extension is covered by the TOC digest
    assert blob.tree.partial == {big: frozenset({0, 5 * CHUNK})}
    src.reads.clear()
    nxt = LayerView(blob, ChunkCache(tmp_path / "cache2"))
    out = nxt.prefetch_workset(tmp_path / "ws", only=True)
    assert out["state"] == "done" and out["files"] == 1           # hello.txt; big.bin is not whole
    assert not (tmp_path / "ws" / big).exists()
    node = blob.tree.lookup(big)
    skipped = [c for c in node.chunks if c.file_offset not in (0, 5 * CHUNK)]
    assert all(off + n <= c.offset or c.end <= off for off, n in src.reads for c in skipped)
    n_reads = len(src.reads)
    want = (layer / big).read_bytes()
    assert nxt.read(node.ino, 5 * CHUNK, 100, block=False) == want[5 * CHUNK:5 * CHUNK + 100]
    assert nxt.read(node.ino, 0, 10) == want[:10] and len(src.reads) == n_reads
    assert nxt.read(node.ino, 9 * CHUNK, 10) == want[9 * CHUNK:9 * CHUNK + 10]  # on demand
    assert len(src.reads) == n_reads + 1


def test_a_partial_prefetch_map_naming_what_it_may_not_is_refused(tmp_path: Path, layer: Path):
    from dataclasses import replace

    from lazyfs.toc import PARTIAL_PREFETCH_KEY
    from lazyfs.tree import build_tree
    big = "usr/lib/python3/big.bin"
    b = write_layer(layer, tmp_path / "p.esgz", chunk_size=CHUNK, prioritized=[big])
    e = open_estargz(FileBlobSource(b.path), b.toc_digest)
    ok = build_tree(replace(e.toc, extra={PARTIAL_PREFETCH_KEY: {big: [0, CHUNK]}}),
                    e.toc_offset)
    assert len(ok.prefetch_skip) == len(ok.lookup(big).chunks) - 2
    for bad in [{"etc/hello.txt": [0]},               # not prioritized
                {big: [1]},                           # not a chunk start
                {big: "0"}, [big]]:
        with pytest.raises(FormatError):
            build_tree(replace(e.toc, extra={PARTIAL_PREFETCH_KEY: bad}), e.toc_offset)
