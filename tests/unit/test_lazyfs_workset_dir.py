"""Working-set data dirs (lazyfs.workset) and views on a node: what goes in, when files
appear, and hostile trees cannot write outside."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lazyfs import FileBlobSource, UnsafeEntryError, open_estargz, write_layer
from lazyfs.testing import make_layer
from lazyfs.tree import Chunk, Node, Tree
from lazyfs.workset import WorksetPlan, WorksetWriter, plan_workset, write_workset


def _tree(entries: dict[str, Node], prioritized: tuple[str, ...]) -> Tree:
    nodes = {1: Node(ino=1, name="", mode=stat.S_IFDIR | 0o755)}
    paths = {"": 1}
    for name, node in entries.items():
        nodes[node.ino] = node
        paths[name] = node.ino
    return Tree(nodes=nodes, paths=paths, prefetch_end=1, prioritized=prioritized)


def _reg(ino: int, name: str, data: bytes = b"x") -> Node:
    chunk = Chunk(offset=0, end=1, inner_offset=0, file_offset=0, size=len(data),
                  digest=f"sha256:{ino:064x}")
    return Node(ino=ino, name=name, mode=stat.S_IFREG | 0o644, size=len(data), chunks=(chunk,))


def _read(c: Chunk) -> bytes:
    return b"x" * c.size


def test_plan_takes_each_inode_once_by_its_canonical_name(tmp_path: Path):
    layer = make_layer(tmp_path / "layer")
    blob = write_layer(layer, tmp_path / "l.esgz",
                       prioritized=["usr/lib/hello-link", "bin/tool", "etc/empty", "usr/rel-link"])
    src = FileBlobSource(str(blob.path))
    try:
        plan = plan_workset(open_estargz(src).tree)
    finally:
        src.close()
    # the hard link's data goes under its canonical (first) name, which every stub of that
    # inode redirects to; empty files and symlinks have no data to hold
    assert plan.files == ("bin/tool", "etc/hello.txt")


def test_no_prioritized_area_plans_nothing():
    assert plan_workset(_tree({"a": _reg(2, "a")}, ())).empty


@pytest.mark.parametrize("bad", ["../evil", "a/../../evil", "/abs/evil", "./a"])
def test_hostile_names_write_nothing_outside(tmp_path: Path, bad: str):
    tree = _tree({bad: _reg(2, bad)}, (bad,))
    dest = tmp_path / "inner" / "data"
    dest.parent.mkdir()
    with pytest.raises(UnsafeEntryError):
        write_workset(tree, WorksetPlan(files=(bad,)), _read, dest)
    assert sorted(os.listdir(tmp_path)) == ["inner"]
    assert os.listdir(dest.parent) in ([], ["data"])
    assert not dest.exists() or os.listdir(dest) == []


def test_a_file_appears_only_once_complete(tmp_path: Path):
    c0 = Chunk(offset=0, end=1, inner_offset=0, file_offset=0, size=2, digest="sha256:" + "1" * 64)
    c1 = Chunk(offset=1, end=2, inner_offset=0, file_offset=2, size=2, digest="sha256:" + "2" * 64)
    big = Node(ino=3, name="a/big", mode=stat.S_IFREG | 0o644, size=4, chunks=(c0, c1))
    tree = _tree({"a": Node(ino=2, name="a", mode=stat.S_IFDIR | 0o755), "a/big": big,
                  "small": _reg(4, "small", b"ss")}, ("a/big", "small"))
    w = WorksetWriter(tree, plan_workset(tree), tmp_path / "data")
    w.chunk(c0, b"AA")
    assert not (tmp_path / "data/a/big").exists()       # half written: still staged
    assert w.wait_published(3, timeout=0.01) is None
    w.chunk(c1, b"BB")
    assert (tmp_path / "data/a/big").read_bytes() == b"AABB"
    assert w.wait_published(3, timeout=0) == tmp_path / "data/a/big"
    asked = []
    st = w.finish(lambda c: asked.append(c.digest) or b"SS")
    assert asked == [tree.nodes[4].chunks[0].digest]
    assert (st.files, st.bytes) == (2, 6)
    assert (tmp_path / "data/small").read_bytes() == b"SS"
    assert sorted(os.listdir(tmp_path / "data")) == ["a", "small"]   # staging dir gone


def test_readers_waiting_for_a_file_get_it_or_fall_back_when_the_writer_gives_up(tmp_path: Path):
    import threading
    a, b = _reg(2, "a", b"aaaa"), _reg(3, "b", b"bb")
    tree = _tree({"a": a, "b": b}, ("a", "b"))
    w = WorksetWriter(tree, plan_workset(tree), tmp_path / "data")
    got: dict[str, object] = {}
    readers = [threading.Thread(target=lambda n=n, i=i: got.__setitem__(n, w.wait_published(i)))
               for n, i in (("a", 2), ("b", 3))]
    for t in readers:
        t.start()
    w.chunk(a.chunks[0], b"AAAA")
    readers[0].join(timeout=5)
    assert got["a"] == tmp_path / "data/a"
    w.abort()                                            # b never came: its reader goes on
    readers[1].join(timeout=5)
    assert got["b"] is None and not readers[1].is_alive()
    assert (tmp_path / "data/a").read_bytes() == b"AAAA"  # complete files stay


def test_layer_store_serves_a_lazy_layer_through_its_view_when_mounted(tmp_path: Path):
    from types import SimpleNamespace

    from runtimed.layers import LayerStore
    store = LayerStore(tmp_path / "l", tmp_path / "base")
    key = "ab" * 32
    store.lazy[key] = SimpleNamespace(mountpoint=str(tmp_path / "mnt"))
    assert store.lower_dirs(key) == [tmp_path / "mnt"]          # no view: the FUSE mount
    store.views[key] = tmp_path / "mnt.view"
    assert store.lower_dirs(key) == [tmp_path / "mnt.view"]
    (store.path(key) / "fs").mkdir(parents=True)
    (store.path(key) / ".rtd-complete").touch()
    assert store.lower_dirs(key) == [store.path(key) / "fs"]    # local now: neither


def test_view_options_and_kernel_check():
    from lazyfs.metatree import view_options
    from runtimed.lazy_layers import view_supported
    assert view_options("/v/meta", ["/v/data", "/lz/ab"]) == \
        "lowerdir=/v/meta::/v/data::/lz/ab,metacopy=on"
    with pytest.raises(ValueError):
        view_options("/v/me:ta", ["/lz/ab"])                  # ':' separates layers
    assert view_supported("6.18.44-fc-v1045") and view_supported("6.8.0")
    assert not view_supported("6.5.0-generic") and not view_supported("5.15.0")
    assert not view_supported("weird")


def test_chunks_from_many_threads_write_each_place_once_and_close_every_file(tmp_path: Path):
    import hashlib
    import threading
    # 40 files of 3 chunks; files 0-19 and 20-39 have the same content (chunk digests
    # shared between files), so two threads may bring the same bytes for two places
    size, chunks, nodes = 4, 3, {}

    def body(i: int, k: int) -> bytes:
        return bytes([65 + i % 20, 48 + k]) * (size // 2)
    for i in range(40):
        cs = tuple(Chunk(offset=0, end=1, inner_offset=0, file_offset=k * size, size=size,
                         digest="sha256:" + hashlib.sha256(body(i, k)).hexdigest())
                   for k in range(chunks))
        nodes[f"f{i:02}"] = Node(ino=2 + i, name=f"f{i:02}", mode=stat.S_IFREG | 0o644,
                                 size=size * chunks, chunks=cs)
    tree = _tree(nodes, tuple(nodes))

    def open_in(d: Path) -> list[str]:
        """This process's open fds on files under `d` (other tests' fds come and go)."""
        out = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith(str(d)):
                    out.append(fd)
            except OSError:
                pass
        return out
    w = WorksetWriter(tree, plan_workset(tree), tmp_path / "data")
    work = [(c, body(int(n[1:]), c.file_offset // size))
            for n, node in nodes.items() for c in node.chunks]
    start = threading.Barrier(8)

    def run(k: int) -> None:
        start.wait()
        for c, data in work[k::8] + work[(k + 4) % 8::8]:    # every chunk twice
            w.chunk(c, data)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert open_in(tmp_path) == []                        # each file closed when complete
    st = w.finish(lambda c: pytest.fail(f"chunk {c} was not written"))
    assert st.bytes == 40 * size * chunks                      # each place written once
    for n in nodes:
        assert (tmp_path / "data" / n).read_bytes() == b"".join(
            body(int(n[1:]), k) for k in range(chunks))


def test_a_local_layers_view_is_released_when_no_overlay_uses_it(tmp_path: Path, monkeypatch):
    from types import SimpleNamespace

    from runtimed.layers import LayerStore
    from runtimed.lazy_layers import LazyLayers
    store = LayerStore(tmp_path / "l", tmp_path / "base")
    lazy = LazyLayers(tmp_path, store, blobs=None)
    key = "cd" * 32
    store.lazy[key] = SimpleNamespace(mountpoint=str(tmp_path / "mnt"))
    view_dir, mp = lazy._view_paths(key)
    (view_dir / "meta").mkdir(parents=True)
    mp.mkdir()
    store.views[key] = mp
    in_use = {"yes": False}
    monkeypatch.setattr(LazyLayers, "_overlays_using", staticmethod(lambda p: in_use["yes"]))
    assert lazy.release_views(grace_s=0) == [] and view_dir.is_dir()      # still lazy
    (store.path(key) / "fs").mkdir(parents=True)
    (store.path(key) / ".rtd-complete").touch()                          # local now
    assert lazy.release_views(grace_s=60) == [] and view_dir.is_dir()     # within the grace
    in_use["yes"] = True
    assert lazy.release_views(grace_s=0) == [] and view_dir.is_dir()      # an overlay has it
    in_use["yes"] = False
    assert lazy.release_views(grace_s=0) == [key]
    assert not view_dir.exists() and key not in store.views


def test_overlays_using_reads_the_lower_dirs_of_overlay_mounts(tmp_path: Path, monkeypatch):
    import builtins
    import io

    from runtimed.lazy_layers import LazyLayers
    line = ("51 27 0:39 / /x/rootfs rw,relatime - overlay overlay rw,lowerdir=/n/lz/ws/ab:"
            "/n/lz/ab:/base,upperdir=/x/upper,workdir=/x/work,uuid=on\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: io.StringIO(line)
                        if p == "/proc/self/mountinfo" else real_open(p, *a, **k))
    assert LazyLayers._overlays_using(Path("/n/lz/ws/ab"))
    assert not LazyLayers._overlays_using(Path("/n/lz/ws/a"))
    assert not LazyLayers._overlays_using(Path("/x/upper"))


def test_forgetting_a_layer_waits_for_its_background_unpack(tmp_path: Path):
    import asyncio
    import time

    from runtimed.layers import LayerStore
    from runtimed.lazy_layers import LazyLayers
    lazy = LazyLayers(tmp_path, LayerStore(tmp_path / "l", tmp_path / "base"), blobs=None)
    key = "ef" * 32
    job = lazy._unpacks.submit(time.sleep, 0.5)     # an unpack that cannot be stopped
    lazy._unpacking[key] = job

    async def forget() -> float:
        t0 = time.monotonic()
        await lazy.forget(key)
        return time.monotonic() - t0
    assert asyncio.run(forget()) >= 0.3 and job.done()
    assert key not in lazy._unpacking
