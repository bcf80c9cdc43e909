"""Working-set dirs (lazyfs.workset): what goes in, and hostile trees cannot write outside."""
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


def test_plan_takes_hard_links_symlinks_and_parent_dirs(tmp_path: Path):
    layer = make_layer(tmp_path / "layer")
    blob = write_layer(layer, tmp_path / "l.esgz", prioritized=["etc/hello.txt", "bin/tool"])
    src = FileBlobSource(str(blob.path))
    try:
        plan = plan_workset(open_estargz(src).tree)
    finally:
        src.close()
    assert plan.files == ("bin/tool", "etc/hello.txt", "usr/lib/hello-link")
    assert plan.symlinks == ("usr/abs-link", "usr/rel-link")
    assert plan.dirs == ("bin", "etc", "usr", "usr/lib")


def test_no_prioritized_area_plans_nothing():
    assert plan_workset(_tree({"a": _reg(2, "a")}, ())).empty


@pytest.mark.parametrize("bad", ["../evil", "a/../../evil", "/abs/evil", "./a"])
def test_hostile_names_write_nothing_outside(tmp_path: Path, bad: str):
    tree = _tree({bad: _reg(2, bad)}, (bad,))
    dest = tmp_path / "inner" / "ws"
    dest.parent.mkdir()
    with pytest.raises(UnsafeEntryError):
        write_workset(tree, WorksetPlan(dirs=(), files=(bad,), symlinks=()), _read, dest)
    assert sorted(os.listdir(tmp_path)) == ["inner"]
    assert os.listdir(dest.parent) == []            # temp dir removed, nothing renamed in


def test_a_path_through_a_symlink_is_refused(tmp_path: Path):
    # "d" is a symlink to "/": "d/x" must not be written through it
    tree = _tree({"d": Node(ino=2, name="d", mode=stat.S_IFLNK | 0o777, link_target="/tmp"),
                  "d/x": _reg(3, "d/x")}, ("d/x",))
    with pytest.raises(UnsafeEntryError):
        write_workset(tree, WorksetPlan(dirs=("d",), files=("d/x",), symlinks=()), _read,
                      tmp_path / "ws")
    with pytest.raises(UnsafeEntryError):      # nor when the plan forgets the parent dir
        write_workset(tree, WorksetPlan(dirs=(), files=("d/x",), symlinks=()), _read,
                      tmp_path / "ws")
    assert os.listdir(tmp_path) == []


def test_written_atomically_and_never_over_an_existing_dir(tmp_path: Path):
    tree = _tree({"a": Node(ino=2, name="a", mode=stat.S_IFDIR | 0o750),
                  "a/f": _reg(3, "a/f", b"abc")}, ("a/f",))
    dest = tmp_path / "ws"
    st = write_workset(tree, plan_workset(tree), _read, dest)
    assert (st.files, st.dirs, st.bytes) == (1, 1, 3)
    assert (dest / "a/f").read_bytes() == b"xxx"
    assert stat.S_IMODE(os.stat(dest / "a").st_mode) == 0o750
    assert os.listdir(tmp_path) == ["ws"]
    with pytest.raises(FileExistsError):
        write_workset(tree, plan_workset(tree), _read, dest)


def test_streamed_chunks_are_written_once_and_the_rest_read_at_finish(tmp_path: Path):
    a, b = _reg(2, "a", b"aaaa"), _reg(3, "b", b"bb")
    tree = _tree({"a": a, "b": b}, ("a", "b"))
    w = WorksetWriter(tree, plan_workset(tree), tmp_path / "ws")
    assert not (tmp_path / "ws").exists()                # nothing visible before finish
    w.chunk(a.chunks[0], b"AAAA")
    w.chunk(Chunk(0, 1, 0, 0, 1, "sha256:" + "f" * 64), b"?")   # not in the working set
    asked = []
    st = w.finish(lambda c: asked.append(c.digest) or b"BB")
    assert asked == [b.chunks[0].digest] and st.bytes == 6
    assert (tmp_path / "ws/a").read_bytes() == b"AAAA"
    assert (tmp_path / "ws/b").read_bytes() == b"BB"


def test_layer_store_stacks_a_complete_working_set_above_the_lazy_mount(tmp_path: Path):
    from types import SimpleNamespace

    from runtimed.layers import LayerStore
    store = LayerStore(tmp_path / "l", tmp_path / "base")
    key = "ab" * 32
    store.lazy[key] = SimpleNamespace(mountpoint=str(tmp_path / "mnt"))
    store.workset[key] = ws = tmp_path / "ws"
    assert store.lower_dirs(key) == [tmp_path / "mnt"]          # not complete (not renamed in)
    ws.mkdir()
    assert store.lower_dirs(key) == [tmp_path / "mnt", ws]      # bottom-up: ws above FUSE
    (store.path(key) / "fs").mkdir(parents=True)
    (store.path(key) / ".rtd-complete").touch()
    assert store.lower_dirs(key) == [store.path(key) / "fs"]    # local now: neither


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
    fds_before = len(os.listdir("/proc/self/fd"))
    w = WorksetWriter(tree, plan_workset(tree), tmp_path / "ws")
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
    assert len(os.listdir("/proc/self/fd")) == fds_before     # each file closed when complete
    st = w.finish(lambda c: pytest.fail(f"chunk {c} was not written"))
    assert st.bytes == 40 * size * chunks                      # each place written once
    for n in nodes:
        assert (tmp_path / "ws" / n).read_bytes() == b"".join(
            body(int(n[1:]), k) for k in range(chunks))


def test_a_local_layers_working_set_dir_is_released_when_no_overlay_uses_it(
        tmp_path: Path, monkeypatch):
    from types import SimpleNamespace

    from runtimed.layers import LayerStore
    from runtimed.lazy_layers import LazyLayers
    store = LayerStore(tmp_path / "l", tmp_path / "base")
    lazy = LazyLayers(tmp_path, store, blobs=None)
    key = "cd" * 32
    store.lazy[key] = SimpleNamespace(mountpoint=str(tmp_path / "mnt"))
    store.workset[key] = ws = lazy._ws_dir(key)
    (ws / "f").mkdir(parents=True)
    in_use = {"yes": False}
    monkeypatch.setattr(LazyLayers, "_overlays_using", staticmethod(lambda p: in_use["yes"]))
    assert lazy.release_worksets(grace_s=0) == [] and ws.is_dir()      # still lazy
    (store.path(key) / "fs").mkdir(parents=True)
    (store.path(key) / ".rtd-complete").touch()                        # local now
    assert lazy.release_worksets(grace_s=60) == [] and ws.is_dir()     # within the grace
    in_use["yes"] = True
    assert lazy.release_worksets(grace_s=0) == [] and ws.is_dir()      # an overlay has it
    in_use["yes"] = False
    assert lazy.release_worksets(grace_s=0) == [key]
    assert not ws.exists() and key not in store.workset


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
