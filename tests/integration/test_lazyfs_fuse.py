"""The FUSE mount of an eStargz layer (root, /dev/fuse): the tree equals the layer, it works
as an overlayfs lower dir, the TOC is verified before mounting, accesses are recorded."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lazyfs import MountError, MountSpec, SourceSpec, mount, write_layer
from lazyfs.mount import is_mounted
from lazyfs.testing import fuse_skip_reason, make_layer, snapshot

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(fuse_skip_reason() is not None, reason=str(fuse_skip_reason()))]


@pytest.fixture
def unmount_later():
    handles = []
    yield handles.append
    for h in reversed(handles):
        try:
            if hasattr(h, "unmount"):
                h.unmount()
            else:
                subprocess.run(["umount", "-l", str(h)], capture_output=True)
        except Exception:
            subprocess.run(["umount", "-l", h.mountpoint], capture_output=True)


@pytest.fixture
def layer_blob(tmp_path: Path):
    layer = make_layer(tmp_path / "layer", big=2_000_000)
    blob = write_layer(layer, tmp_path / "layer.esgz", chunk_size=256 * 1024,
                       prioritized=["etc/hello.txt"])
    return layer, blob


def _spec(tmp_path: Path, blob, **kw) -> MountSpec:
    mp = tmp_path / "mnt"
    mp.mkdir(exist_ok=True)
    args = {"source": SourceSpec("file", str(blob.path)), "mountpoint": str(mp),
                "toc_digest": blob.toc_digest, "cache_dir": str(tmp_path / "cache"),
                "record_path": str(tmp_path / "record.json"),
                "status_path": str(tmp_path / "status.json")}
    args.update(kw)
    return MountSpec(**args)


def test_mounted_tree_equals_the_layer(tmp_path: Path, layer_blob, unmount_later):
    layer, blob = layer_blob
    h = mount(_spec(tmp_path, blob), log_path=str(tmp_path / "mount.log"))
    unmount_later(h)
    mp = Path(h.mountpoint)
    assert snapshot(mp) == snapshot(layer)
    st = os.lstat(mp / "etc/removed")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0            # overlay whiteout
    assert os.getxattr(mp / "var/cache", "trusted.overlay.opaque") == b"y"
    assert os.stat(mp / "etc/hello.txt").st_nlink == 2
    with pytest.raises(OSError):
        (mp / "etc/new").write_text("read-only")
    h.unmount()
    assert not is_mounted(mp)
    assert h.proc.poll() is not None


def test_works_as_an_overlay_lower_dir(tmp_path: Path, layer_blob, unmount_later):
    layer, blob = layer_blob
    h = mount(_spec(tmp_path, blob))
    unmount_later(h)
    base, up, work, merged = (tmp_path / n for n in ("base", "up", "work", "merged"))
    for d in (base / "etc", base / "var/cache", up, work, merged):
        d.mkdir(parents=True)
    (base / "etc/removed").write_text("whited out by the lazy layer\n")
    (base / "var/cache/stale").write_text("hidden by the opaque dir\n")
    (base / "var/gone").write_text("whited out too\n")
    (base / "etc/from-base").write_text("base\n")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={h.mountpoint}:{base},upperdir={up},workdir={work}",
                    str(merged)], check=True)
    unmount_later(merged)
    assert (merged / "etc/hello.txt").read_text() == "hello, lazy world\n"
    assert (merged / "etc/from-base").read_text() == "base\n"
    assert not (merged / "etc/removed").exists() and not (merged / "var/gone").exists()
    assert os.listdir(merged / "var/cache") == ["fresh"]
    big = (layer / "usr/lib/python3/big.bin").read_bytes()
    assert (merged / "usr/lib/python3/big.bin").read_bytes() == big
    (merged / "etc/hello.txt").write_text("copied up\n")         # copy-up from FUSE lower
    assert (up / "etc/hello.txt").read_text() == "copied up\n"
    r = subprocess.run(["ls", "-l", str(merged / "bin/tool")], capture_output=True, text=True)
    assert r.stdout.startswith("-rwsr-xr-x")
    subprocess.run(["umount", str(merged)], check=True)


def test_wrong_toc_digest_fails_the_mount(tmp_path: Path, layer_blob):
    _, blob = layer_blob
    spec = _spec(tmp_path, blob, toc_digest="sha256:" + "0" * 64)
    with pytest.raises(MountError, match="DigestMismatchError"):
        mount(spec, timeout=30)
    assert not is_mounted(spec.mountpoint)


def test_records_accesses_and_reports_status(tmp_path: Path, layer_blob, unmount_later):
    layer, blob = layer_blob
    h = mount(_spec(tmp_path, blob, prefetch=False))
    unmount_later(h)
    mp = Path(h.mountpoint)
    assert (mp / "usr/lib/python3/text.py").read_text().startswith("x = 1")
    assert (mp / "etc/hello.txt").read_text() == "hello, lazy world\n"
    big = (layer / "usr/lib/python3/big.bin").read_bytes()
    errors = []

    def reader(i: int) -> None:
        with open(mp / "usr/lib/python3/big.bin", "rb") as f:
            f.seek(i * 100_000)
            if f.read(300_000) != big[i * 100_000: i * 100_000 + 300_000]:
                errors.append(i)
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (mp / "usr/lib/python3/big.bin").read_bytes() == big
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rec = json.loads(Path(tmp_path / "record.json").read_text()) if (
            tmp_path / "record.json").exists() else {}
        if len(rec.get("opened", [])) == 3:
            break
        time.sleep(0.1)
    assert rec["opened"] == ["usr/lib/python3/text.py", "etc/hello.txt",
                             "usr/lib/python3/big.bin"]
    status = h.status()
    assert status["read_errors"] == 0 and status["source"]["bytes_received"] > 0
    h.unmount()
    # a second mount of the same layer on the node reads from the shared chunk cache
    h2 = mount(_spec(tmp_path, blob, prefetch=False, record_path=None,
                     status_path=str(tmp_path / "status2.json")))
    unmount_later(h2)
    assert (mp / "usr/lib/python3/big.bin").read_bytes() == big
    time.sleep(0.7)
    s2 = h2.status()
    assert s2["fetched_chunks"] == 0 and s2["cache_hits"] > 0


def test_a_layer_without_xattrs_answers_getxattr_in_the_kernel(tmp_path: Path, unmount_later):
    import errno
    layer = tmp_path / "plain"
    (layer / "d").mkdir(parents=True)
    (layer / "d/f").write_text("no xattrs here\n")
    blob = write_layer(layer, tmp_path / "plain.esgz")
    h = mount(_spec(tmp_path, blob), log_path=str(tmp_path / "mount.log"))
    unmount_later(h)
    mp = Path(h.mountpoint)
    for _ in range(3):
        with pytest.raises(OSError) as e:
            os.getxattr(mp / "d/f", "user.x")
        assert e.value.errno == errno.EOPNOTSUPP
    assert (mp / "d/f").read_text() == "no xattrs here\n"
    time.sleep(1.2)                    # the status is rewritten twice a second
    ops = json.loads((tmp_path / "status.json").read_text())["ops"]
    assert ops.get("getxattr") == 1, ops       # asked once, then answered by the kernel
