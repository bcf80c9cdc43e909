"""A lazy mount's working set as a local dir stacked above the FUSE mount (root, /dev/fuse,
overlayfs): the union equals the layer, working-set reads never reach the FUSE server,
other files still read through it."""
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
               "index=off,xino=off,redirect_dir=off,metacopy=off")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
                   check=True)
    cleanup.append(merged)
    return merged


@pytest.fixture
def mounts():
    done: list = []
    yield done
    for m in reversed(done):
        if hasattr(m, "unmount"):
            m.unmount()
        else:
            subprocess.run(["umount", "-l", str(m)], capture_output=True, check=False)


def test_working_set_dir_above_fuse_is_the_layer(tmp_path: Path, mounts):
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

    mp, ws, status = tmp_path / "mnt", tmp_path / "layer.ws", tmp_path / "status.json"
    mp.mkdir()
    h = mount(MountSpec(source=SourceSpec("file", str(blob.path)), mountpoint=str(mp),
                        toc_digest=blob.toc_digest, cache_dir=str(tmp_path / "cache"),
                        record_path=str(tmp_path / "record.json"), status_path=str(status),
                        workset_dir=str(ws)))
    mounts.append(h)
    ws_state = _wait(lambda: status.exists() and _status(status).get("workset"), "workset")
    assert ws_state["state"] == "done", ws_state
    assert ws.is_dir() and not list(tmp_path.glob(".tmp-*"))
    # only working-set files, their other names, symlinks to them and their directories
    in_ws = sorted(str(p.relative_to(ws)) for p in ws.rglob("*") if not p.is_dir())
    assert in_ws == sorted(WORKING_SET + ["usr/lib/hello-link", "usr/rel-link", "usr/abs-link"])
    assert not os.listxattr(ws / "var/cache")          # never opaque: FUSE's entries show

    stacked = _overlay(tmp_path, "ws", [ws, mp, base], mounts)
    # first, on a fresh mount (no page cache on the FUSE side): working-set reads are
    # served by the local dir, the FUSE server sees none of them
    time.sleep(1.2)                                    # the status is written twice a second
    before = _status(status)
    opened_before = set(json.loads((tmp_path / "record.json").read_text())["opened"]) \
        if (tmp_path / "record.json").exists() else set()
    for name in WORKING_SET:
        assert (stacked / name).read_bytes() == (local / name).read_bytes()
    assert (stacked / "usr/rel-link").read_text() == "hello, lazy world\n"
    time.sleep(1.2)
    after = _status(status)
    for k in ("cache_hits", "fetched_chunks"):
        assert after[k] == before[k], (k, before, after)
    assert after["source"]["bytes_received"] == before["source"]["bytes_received"]
    if (tmp_path / "record.json").exists():
        opened = set(json.loads((tmp_path / "record.json").read_text())["opened"])
        assert not (opened - opened_before) & set(WORKING_SET)

    # a file outside the working set still reads through FUSE, fetched on demand
    big = (local / "usr/lib/python3/big.bin").read_bytes()
    assert (stacked / "usr/lib/python3/big.bin").read_bytes() == big
    time.sleep(1.2)
    assert _status(status)["fetched_chunks"] > after["fetched_chunks"]

    # the union equals the layer (and the FUSE-only overlay)
    reference = _overlay(tmp_path, "local", [local, base], mounts)
    fuse_only = _overlay(tmp_path, "fuse", [mp, base], mounts)
    want = snapshot(reference)
    assert snapshot(stacked) == want
    assert snapshot(fuse_only) == want
    assert os.listdir(stacked / "var/cache") == ["fresh"]
    for d in ("etc", "usr", "usr/lib", "var/cache", "tmp"):   # dirs: mode, owner, mtime
        a, b = os.lstat(stacked / d), os.lstat(reference / d)
        assert (a.st_mode, a.st_uid, a.st_gid, a.st_mtime) == \
            (b.st_mode, b.st_uid, b.st_gid, b.st_mtime), d


def test_no_working_set_dir_without_a_prioritized_area(tmp_path: Path, mounts):
    layer = make_layer(tmp_path / "layer")
    blob = write_layer(layer, tmp_path / "layer.esgz")
    mp, ws, status = tmp_path / "mnt", tmp_path / "layer.ws", tmp_path / "status.json"
    mp.mkdir()
    mounts.append(mount(MountSpec(source=SourceSpec("file", str(blob.path)),
                                  mountpoint=str(mp), cache_dir=str(tmp_path / "cache"),
                                  status_path=str(status), workset_dir=str(ws))))
    state = _wait(lambda: status.exists() and _status(status).get("workset"), "workset")
    assert state == {"state": "none"} and not ws.exists()
    assert not (mp / "no-such-file").exists()          # negative entries are cached, still absent
    assert (mp / "etc/hello.txt").read_text() == "hello, lazy world\n"


def test_workset_only_keeps_the_working_set_out_of_the_chunk_cache(tmp_path: Path, mounts):
    layer = make_layer(tmp_path / "layer", big=2_000_000)
    blob = write_layer(layer, tmp_path / "layer.esgz", chunk_size=256 * 1024,
                       prioritized=WORKING_SET)
    mp, ws, status = tmp_path / "mnt", tmp_path / "layer.ws", tmp_path / "status.json"
    mp.mkdir()
    mounts.append(mount(MountSpec(source=SourceSpec("file", str(blob.path)),
                                  mountpoint=str(mp), cache_dir=str(tmp_path / "cache"),
                                  status_path=str(status), workset_dir=str(ws),
                                  workset_only=True)))
    state = _wait(lambda: status.exists() and _status(status).get("workset"), "workset")
    assert state["state"] == "done", state
    assert (ws / "usr/lib/python3/text.py").read_text() == "x = 1\n" * 5000
    time.sleep(0.6)
    before = _status(status)
    assert before["prefetched_chunks"] >= 1 and before["fetched_chunks"] == 0
    # a reader that bypasses the dir (FUSE only) still gets the file, fetched on demand
    assert (mp / "usr/lib/python3/text.py").read_text() == "x = 1\n" * 5000
    time.sleep(1.2)
    assert _status(status)["fetched_chunks"] > 0


def test_a_spare_server_serves_a_mount_and_logs_to_its_log(tmp_path: Path, mounts):
    from lazyfs.mount import spawn_server
    layer = make_layer(tmp_path / "layer")
    blob = write_layer(layer, tmp_path / "layer.esgz", prioritized=WORKING_SET)
    cache = tmp_path / "cache"
    spare = spawn_server(str(cache))
    mp, ws, status = tmp_path / "mnt", tmp_path / "layer.ws", tmp_path / "status.json"
    mp.mkdir()
    h = mount(MountSpec(source=SourceSpec("file", str(blob.path)), mountpoint=str(mp),
                        cache_dir=str(cache), status_path=str(status), workset_dir=str(ws)),
              server=spare, log_path=str(tmp_path / "mount.log"))
    mounts.append(h)
    assert h.proc is spare
    state = _wait(lambda: status.exists() and _status(status).get("workset"), "workset")
    assert state["state"] == "done", state
    assert (mp / "etc/hello.txt").read_text() == "hello, lazy world\n"
    assert _status(status)["pid"] == spare.pid
    assert "serving file" in (tmp_path / "mount.log").read_text()


def test_an_unused_spare_server_exits_when_its_input_closes(tmp_path: Path):
    from lazyfs.mount import spawn_server
    spare = spawn_server(str(tmp_path / "cache"))
    assert spare.stdin is not None
    spare.stdin.close()
    assert spare.wait(timeout=20) == 0
