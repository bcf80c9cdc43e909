"""The working set written by a forked helper (lazyfs.early): what it plans from the TOC
alone, what it writes, and how the server's reads wait for it."""
from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from lazyfs import FileBlobSource, open_estargz, write_layer
from lazyfs.early import DirWorkset, EarlyPrefetch, prioritized_toc, spawn_helper, start_prefetch
from lazyfs.mount import SourceSpec
from lazyfs.errors import FormatError
from lazyfs.reader import read_toc
from lazyfs.testing import make_layer
from lazyfs.toc import PREFETCH_LANDMARK
from lazyfs.workset import plan_workset

CHUNK = 64 * 1024


def test_prioritized_toc_keeps_the_files_before_the_landmark_and_plans_the_same_set(
        tmp_path: Path):
    layer = make_layer(tmp_path / "layer", big=500_000)
    prio = ["usr/lib/python3/big.bin", "etc/hello.txt", "usr/lib/hello-link", "usr/rel-link",
            "etc/empty"]
    b = write_layer(layer, tmp_path / "l.esgz", chunk_size=CHUNK, prioritized=prio)
    raw = read_toc(FileBlobSource(b.path), b.toc_digest)
    toc = prioritized_toc(raw.toc_json)
    assert toc is not None
    assert {e.type for e in toc.entries} == {"reg", "chunk"}     # no dirs, links, fifos
    assert toc.entries[-1].name == PREFETCH_LANDMARK
    assert {e.name for e in toc.entries if e.type == "reg"} == {
        "usr/lib/python3/big.bin", "etc/hello.txt", "etc/empty", PREFETCH_LANDMARK}
    from lazyfs.tree import build_tree
    whole = open_estargz(FileBlobSource(b.path), b.toc_digest).tree
    part = build_tree(toc, raw.toc_offset)
    assert plan_workset(part) == plan_workset(whole)
    assert part.prefetch_end == whole.prefetch_end
    # no landmark: nothing to plan
    nb = write_layer(layer, tmp_path / "n.esgz", chunk_size=CHUNK)
    assert prioritized_toc(read_toc(FileBlobSource(nb.path)).toc_json) is None
    with pytest.raises(FormatError):
        prioritized_toc(b'{"version": 1, "entries": [3]}')


def test_the_helper_writes_the_working_set_and_the_partial_chunks(
        tmp_path: Path, monkeypatch):
    from lazyfs import estargz
    from lazyfs.cache import ChunkCache
    layer = make_layer(tmp_path / "layer", big=1_000_000)
    big = "usr/lib/python3/big.bin"
    monkeypatch.setattr(estargz, "PARTIAL_MIN_SIZE", 4 * CHUNK)
    b = write_layer(layer, tmp_path / "l.esgz", chunk_size=CHUNK,
                    prioritized=["etc/hello.txt", big, "usr/lib/python3/text.py"],
                    read_ranges={big: [(0, 10), (3 * CHUNK, 3 * CHUNK + 5)]})
    assert b.partial == (big,)
    data = tmp_path / "view" / "data"
    helper = spawn_helper()
    early = start_prefetch(helper, read_toc(FileBlobSource(b.path), b.toc_digest),
                           asdict(SourceSpec("file", str(b.path))), str(tmp_path / "cache"),
                           str(data))
    assert early is not None
    res = early.wait(60)
    assert res is not None and helper.returncode == 0
    assert res["state"] == "done" and res["files"] == 2 and res["prefetch"] == "done", res
    for name in ("etc/hello.txt", "usr/lib/python3/text.py"):
        assert (data / name).read_bytes() == (layer / name).read_bytes()
    assert not (data / big).exists()             # in part: its chunks are in the cache
    tree = open_estargz(FileBlobSource(b.path)).tree
    cache = ChunkCache(tmp_path / "cache")
    kept = {c.file_offset: cache.has(c.digest) for c in tree.lookup(big).chunks}
    assert kept[0] and kept[3 * CHUNK] and sum(kept.values()) == 2


def test_a_helper_without_a_landmark_or_with_a_bad_source_says_so(tmp_path: Path):
    layer = make_layer(tmp_path / "layer")
    nb = write_layer(layer, tmp_path / "n.esgz", chunk_size=CHUNK)
    helper = spawn_helper()
    assert start_prefetch(helper, read_toc(FileBlobSource(nb.path)), {}, "c", "d") is None
    assert helper.wait(30) == 0                   # told to go: it exits quietly
    b = write_layer(layer, tmp_path / "l.esgz", chunk_size=CHUNK, prioritized=["etc/hello.txt"])
    helper = spawn_helper()
    early = start_prefetch(helper, read_toc(FileBlobSource(b.path)),
                           asdict(SourceSpec("file", str(tmp_path / "gone.esgz"))),
                           str(tmp_path / "cache"), str(tmp_path / "data"))
    res = early.wait(60)
    assert res["state"].startswith("failed") and "gone.esgz" in res["state"], res
    assert helper.returncode == 1


def test_reads_wait_for_a_file_the_helper_has_not_written_yet(tmp_path: Path):
    layer = make_layer(tmp_path / "layer")
    b = write_layer(layer, tmp_path / "l.esgz", chunk_size=CHUNK, prioritized=["etc/hello.txt"])
    tree = open_estargz(FileBlobSource(b.path)).tree
    early = EarlyPrefetch(proc=subprocess.Popen(["true"]))
    ws = DirWorkset(tree, plan_workset(tree), tmp_path / "data", early)
    ino = tree.paths["etc/hello.txt"]
    assert ws.holds(ino) and not ws.holds(tree.paths["etc/secret"])
    assert not ws.settled(ino)
    got = {}
    reader = threading.Thread(target=lambda: got.setdefault("p", ws.wait_published(ino, 10)))
    reader.start()
    time.sleep(0.1)
    assert reader.is_alive()
    (tmp_path / "data/etc").mkdir(parents=True)
    (tmp_path / "data/etc/hello.txt").write_text("hello, lazy world\n")
    reader.join(5)
    assert got["p"] == tmp_path / "data/etc/hello.txt" and ws.settled(ino)
    # a helper that ended without a file: the reader falls back at once
    (tmp_path / "data/etc/hello.txt").unlink()
    early._done.set()
    t0 = time.monotonic()
    assert ws.wait_published(ino, 10) is None and time.monotonic() - t0 < 1


def test_a_helper_killed_midway_reports_a_failure_and_leaves_only_whole_files(tmp_path: Path):
    layer = make_layer(tmp_path / "layer", big=3_000_000)
    b = write_layer(layer, tmp_path / "l.esgz", chunk_size=CHUNK,
                    prioritized=["usr/lib/python3/big.bin", "etc/hello.txt"])
    helper = spawn_helper()
    data = tmp_path / "view" / "data"
    early = start_prefetch(helper, read_toc(FileBlobSource(b.path)),
                           asdict(SourceSpec("file", str(b.path))), str(tmp_path / "cache"),
                           str(data))
    early.kill()                                   # as the server does when a mount ends
    res = early.wait(10)
    assert early.done and res is not None
    if res["state"] != "done":                     # (a fast helper may have finished)
        assert res["state"].startswith("failed"), res
    for f in data.rglob("*") if data.exists() else ():
        if f.is_file() and ".staging" not in str(f):
            assert f.read_bytes() == (layer / f.relative_to(data)).read_bytes()
