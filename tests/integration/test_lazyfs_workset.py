"""A lazy mount's view (root, /dev/fuse, overlayfs): the meta tree with the working-set data
dir and the FUSE mount as data-only layers. Stacked as a container's lower dir it equals
the layer; metadata and working-set reads never reach the FUSE server, other files' data
still reads through it; the container's upper dir gets whole copies, never stubs."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from lazyfs import (
    FileBlobSource,
    MountSpec,
    SourceSpec,
    extract,
    mount,
    open_estargz,
    write_layer,
)
from lazyfs.metatree import view_options
from lazyfs.testing import fuse_skip_reason, make_layer, snapshot

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(fuse_skip_reason() is not None, reason=str(fuse_skip_reason()))]

WORKING_SET = ["etc/hello.txt", "usr/lib/python3/text.py", "bin/tool", "etc/secret",
               "var/cache/fresh", "d" * 120 + "/" + "f" * 150]


def _status(path: Path) -> dict:
    return json.loads(path.read_text())


def _wait(pred, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return v


def _overlay(tmp_path: Path, name: str, lower: list[Path], cleanup) -> Path:
    up, work, merged = (tmp_path / f"{name}-{n}" for n in ("up", "work", "merged"))
    for d in (up, work, merged):
        d.mkdir()
    options = (f"lowerdir={':'.join(map(str, lower))},upperdir={up},workdir={work},"
               "index=off,xino=off,redirect_dir=off,metacopy=off")   # as runtimed/rootfs.py
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
                   check=True)
    cleanup.append(merged)
    return merged


def _view(tmp_path: Path, view_dir: Path, mp: Path, cleanup, *, data: bool = True) -> Path:
    """Mount the view as the node does (runtimed/lazy_layers.py)."""
    target = tmp_path / "view"
    target.mkdir()
    layers = [view_dir / "data", mp] if data else [mp]
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "ro," + view_options(
        view_dir / "meta", layers), str(target)], check=True)
    cleanup.append(target)
    return target


@pytest.fixture
def mounts():
    done: list = []
    yield done
    for m in reversed(done):
        if hasattr(m, "unmount"):
            m.unmount()
        else:
            subprocess.run(["umount", "-l", str(m)], capture_output=True, check=False)


def test_the_view_over_fuse_is_the_layer(tmp_path: Path, mounts):
    layer = make_layer(tmp_path / "layer", big=2_000_000)
    blob = write_layer(layer, tmp_path / "layer.esgz", chunk_size=256 * 1024,
                       prioritized=WORKING_SET)
    base = tmp_path / "base"                       # what the layer hides must stay hidden
    for d in (base / "etc", base / "var/cache"):
        d.mkdir(parents=True)
    (base / "etc/removed").write_text("whited out by the lazy layer\n")
    (base / "var/cache/stale").write_text("hidden by the opaque dir\n")
    (base / "var/gone").write_text("whited out too\n")
    (base / "etc/from-base").write_text("base\n")
    local = tmp_path / "local"
    src = FileBlobSource(str(blob.path))
    try:
        extract(open_estargz(src, blob.toc_digest), local)
    finally:
        src.close()

    mp, vd, status = tmp_path / "mnt", tmp_path / "vd", tmp_path / "status.json"
    mp.mkdir()
    vd.mkdir()
    h = mount(MountSpec(source=SourceSpec("file", str(blob.path)), mountpoint=str(mp),
                        toc_digest=blob.toc_digest, cache_dir=str(tmp_path / "cache"),
                        record_path=str(tmp_path / "record.json"), status_path=str(status),
                        view_dir=str(vd), workset_only=True))
    mounts.append(h)
    assert (vd / "meta").is_dir()                  # complete before the mount appeared
    ws_state = _wait(lambda: status.exists() and _status(status).get("workset"), "workset")
    assert ws_state["state"] == "done", ws_state
    assert ws_state["helper"] != h.proc.pid       # written by the early helper (early.py)
    assert _status(status)["meta"]["state"] == "done"
    # the data dir: working-set files whole, each inode once, nothing else
    in_data = sorted(str(p.relative_to(vd / "data")) for p in (vd / "data").rglob("*")
                     if not p.is_dir())
    assert in_data == sorted(WORKING_SET)
    for name in WORKING_SET:
        assert (vd / "data" / name).read_bytes() == (local / name).read_bytes()

    view = _view(tmp_path, vd, mp, mounts)
    stacked = _overlay(tmp_path, "ws", [view, base], mounts)
    time.sleep(1.2)                                    # the status is written twice a second
    before = _status(status)
    # metadata from the meta tree: listing and stat-ing everything reaches no FUSE request
    for dirpath, dirs, files in os.walk(stacked):
        for n in dirs + files:
            os.lstat(os.path.join(dirpath, n))
    assert not (stacked / "no-such-file").exists()
    for name in WORKING_SET:                           # and working-set data from the data dir
        assert (stacked / name).read_bytes() == (local / name).read_bytes()
    assert (stacked / "usr/rel-link").read_text() == "hello, lazy world\n"
    time.sleep(1.2)
    after = _status(status)
    assert after["ops"] == before["ops"], (before["ops"], after["ops"])
    for k in ("cache_hits", "fetched_chunks"):
        assert after[k] == before[k] == 0, (k, before, after)

    # a file outside the working set reads through FUSE, fetched on demand
    big = (local / "usr/lib/python3/big.bin").read_bytes()
    assert (stacked / "usr/lib/python3/big.bin").read_bytes() == big
    time.sleep(1.2)
    assert _status(status)["fetched_chunks"] > after["fetched_chunks"]

    # the container's view equals the layer over its base (and the FUSE-only overlay)
    reference = _overlay(tmp_path, "local", [local, base], mounts)
    fuse_only = _overlay(tmp_path, "fuse", [mp, base], mounts)
    want = snapshot(reference)
    assert snapshot(stacked) == want
    assert snapshot(fuse_only) == want
    assert os.listdir(stacked / "var/cache") == ["fresh"]       # opaque: base's entry hidden
    assert not (stacked / "etc/removed").exists() and not (stacked / "var/gone").exists()
    for d in ("etc", "usr", "usr/lib", "var/cache", "tmp"):   # dirs: mode, owner, mtime
        a, b = os.lstat(stacked / d), os.lstat(reference / d)
        assert (a.st_mode, a.st_uid, a.st_gid, a.st_mtime) == \
            (b.st_mode, b.st_uid, b.st_gid, b.st_mtime), d

    # changing a file's metadata in the container copies it up whole: the upper dir (which
    # becomes a layer or a snapshot's archive) never holds a stub
    os.chmod(stacked / "usr/lib/python3/big.bin", 0o600)
    up = tmp_path / "ws-up" / "usr/lib/python3/big.bin"
    assert up.read_bytes() == big
    assert not [x for x in os.listxattr(up) if x.endswith(("metacopy", "redirect"))]


def test_no_working_set_without_a_prioritized_area(tmp_path: Path, mounts):
    layer = make_layer(tmp_path / "layer")
    blob = write_layer(layer, tmp_path / "layer.esgz")
    mp, vd, status = tmp_path / "mnt", tmp_path / "vd", tmp_path / "status.json"
    mp.mkdir()
    vd.mkdir()
    mounts.append(mount(MountSpec(source=SourceSpec("file", str(blob.path)),
                                  mountpoint=str(mp), cache_dir=str(tmp_path / "cache"),
                                  status_path=str(status), view_dir=str(vd))))
    state = _wait(lambda: status.exists() and _status(status).get("workset"), "workset")
    assert state == {"state": "none"} and not (vd / "data").exists()
    assert not (mp / "no-such-file").exists()          # negative entries are cached, still absent
    assert (mp / "etc/hello.txt").read_text() == "hello, lazy world\n"
    view = _view(tmp_path, vd, mp, mounts, data=False)   # metadata local, all data via FUSE
    assert (view / "etc/hello.txt").read_text() == "hello, lazy world\n"
    assert (view / "usr/lib/hello-link").read_text() == "hello, lazy world\n"


def test_fuse_reads_of_working_set_files_come_from_the_data_dir(tmp_path: Path, mounts):
    layer = make_layer(tmp_path / "layer", big=2_000_000)
    blob = write_layer(layer, tmp_path / "layer.esgz", chunk_size=256 * 1024,
                       prioritized=WORKING_SET)
    mp, vd, status = tmp_path / "mnt", tmp_path / "vd", tmp_path / "status.json"
    mp.mkdir()
    vd.mkdir()
    mounts.append(mount(MountSpec(source=SourceSpec("file", str(blob.path)),
                                  mountpoint=str(mp), cache_dir=str(tmp_path / "cache"),
                                  status_path=str(status), view_dir=str(vd),
                                  workset_only=True)))
    state = _wait(lambda: status.exists() and _status(status).get("workset"), "workset")
    assert state["state"] == "done", state
    assert (vd / "data/usr/lib/python3/text.py").read_text() == "x = 1\n" * 5000
    time.sleep(0.6)
    before = _status(status)
    assert before["prefetched_chunks"] >= 1 and before["fetched_chunks"] == 0
    # a reader that reached the file through FUSE (a start that did not wait for the
    # working set) gets it from the data dir: the chunks are not in the cache, and are
    # not fetched again
    assert (mp / "usr/lib/python3/text.py").read_text() == "x = 1\n" * 5000
    time.sleep(1.2)
    after = _status(status)
    assert after["fetched_chunks"] == 0 and after["cache_hits"] == 0
    assert after["source"]["bytes_received"] == before["source"]["bytes_received"]


def test_a_spare_server_serves_a_mount_and_logs_to_its_log(tmp_path: Path, mounts):
    from lazyfs.mount import spawn_server
    layer = make_layer(tmp_path / "layer")
    blob = write_layer(layer, tmp_path / "layer.esgz", prioritized=WORKING_SET)
    cache = tmp_path / "cache"
    spare = spawn_server(str(cache))
    mp, vd, status = tmp_path / "mnt", tmp_path / "vd", tmp_path / "status.json"
    mp.mkdir()
    vd.mkdir()
    h = mount(MountSpec(source=SourceSpec("file", str(blob.path)), mountpoint=str(mp),
                        cache_dir=str(cache), status_path=str(status), view_dir=str(vd)),
              server=spare, log_path=str(tmp_path / "mount.log"))
    mounts.append(h)
    assert h.proc is spare
    state = _wait(lambda: status.exists() and _status(status).get("workset"), "workset")
    assert state["state"] == "done", state
    assert (mp / "etc/hello.txt").read_text() == "hello, lazy world\n"
    assert _status(status)["pid"] == spare.pid
    log = (tmp_path / "mount.log").read_text()
    assert "serving file" in log and "early prefetch: helper" in log   # its helper too


def test_an_unused_spare_server_exits_when_its_input_closes(tmp_path: Path):
    from lazyfs.mount import spawn_server
    spare = spawn_server(str(tmp_path / "cache"))
    assert spare.stdin is not None
    spare.stdin.close()
    assert spare.wait(timeout=20) == 0
