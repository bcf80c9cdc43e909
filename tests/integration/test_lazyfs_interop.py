"""Interop with the reference eStargz implementation: containerd 1.6 + Debian's `ctr-remote`.

* blobs written by `ctr-remote i convert --estargz --oci` and
  `ctr-remote i optimize --no-optimize --oci` open, verify (TOC digest from the layer
  annotation, every chunkDigest), extract and mount with lazyfs, whiteouts included;
* an image converted by ctr-remote and pushed with `ctr-remote i push --plain-http` mounts
  lazily from the registry;
* containerd pulls and unpacks an image lazyfs pushed (it checks our diff_ids).

containerd runs with its own config, root, state and socket (CRI plugin off).
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
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
from lazyfs.devregistry import LocalRegistry
from lazyfs.registry import RegistryClient
from lazyfs.testing import (
    fuse_skip_reason,
    make_layer,
    oci_archive,
    read_oci_archive,
    snapshot,
)
from lazyfs.toc import TOC_DIGEST_ANNOTATION

SKIP = fuse_skip_reason(("containerd", "containerd"), ("ctr", "containerd"),
                        ("ctr-remote", "stargz-snapshotter"), ("docker-registry", "docker-registry"))
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(SKIP is not None, reason=str(SKIP))]
NS = "lazyfs-test"
CONFIG = """version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{d}/c.sock"
[ttrpc]
  address = "{d}/c.sock.ttrpc"
"""


class Containerd:
    def __init__(self, d: Path):
        self.dir, self.sock = d, d / "c.sock"
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.toml").write_text(CONFIG.format(d=d))
        self.log = open(d / "containerd.log", "wb")
        self.proc = subprocess.Popen(["containerd", "--config", str(d / "config.toml")],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while self.run("ctr", "version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("containerd did not start:\n" +
                                   (d / "containerd.log").read_text()[-3000:])
            time.sleep(0.1)

    def run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([tool, "-a", str(self.sock), "-n", NS, *args], capture_output=True,
                           text=True, timeout=180)
        if check and r.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed ({r.returncode}):\n"
                                 f"{r.stdout}\n{r.stderr}")
        return r

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def work():
    d = Path(tempfile.mkdtemp(prefix="lzctd-", dir="/tmp"))     # short: socket path limit
    yield d
    subprocess.run(["umount", "-R", "-l", str(d)], capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def ctd(work: Path):
    c = Containerd(work / "ctd")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def registry(work: Path):
    reg = LocalRegistry(work / "registry").start()
    yield reg
    reg.stop()


def _oci_form_source(d: Path) -> Path:
    """A small layer in OCI form, as a docker build would produce it."""
    (d / "etc").mkdir(parents=True)
    (d / "etc/hello").write_text("hello from ctr-remote\n")
    os.link(d / "etc/hello", d / "etc/hello-hl")
    (d / "etc/.wh.removed").write_bytes(b"")
    (d / "usr/bin").mkdir(parents=True)
    (d / "usr/bin/big").write_bytes(os.urandom(300_000))
    os.chmod(d / "usr/bin/big", 0o755)
    os.symlink("../etc/hello", d / "usr/hello")
    (d / "opq").mkdir()
    (d / "opq/.wh..wh..opq").write_bytes(b"")
    (d / "opq/kept").write_text("kept\n")
    return d


@pytest.fixture(scope="module")
def reference_images(work: Path, ctd: Containerd):
    src = _oci_form_source(work / "src")
    oci_archive(src, work / "src.tar")
    ctd.run("ctr", "images", "import", "--base-name", "localhost/lazyfs/src", "--no-unpack",
            str(work / "src.tar"))
    ctd.run("ctr-remote", "images", "convert", "--estargz", "--oci", "--estargz-chunk-size",
            "65536", "localhost/lazyfs/src:v1", "localhost/lazyfs/converted:v1")
    ctd.run("ctr-remote", "images", "optimize", "--no-optimize", "--oci",
            "localhost/lazyfs/src:v1", "localhost/lazyfs/optimized:v1")
    return src


def _check_overlay_form(root: Path, src: Path) -> None:
    assert (root / "etc/hello").read_text() == "hello from ctr-remote\n"
    assert os.stat(root / "etc/hello").st_ino == os.stat(root / "etc/hello-hl").st_ino
    st = os.lstat(root / "etc/removed")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert not (root / "etc/.wh.removed").exists()
    assert os.getxattr(root / "opq", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(root / "opq")) == ["kept"]
    assert (root / "usr/bin/big").read_bytes() == (src / "usr/bin/big").read_bytes()
    assert os.stat(root / "usr/bin/big").st_mode & 0o777 == 0o755
    assert os.readlink(root / "usr/hello") == "../etc/hello"
    assert not (root / ".no.prefetch.landmark").exists()


@pytest.mark.parametrize("image", ["converted", "optimized"])
def test_reads_and_mounts_ctr_remote_estargz(work: Path, ctd: Containerd, reference_images,
                                             image: str):
    src = reference_images
    out = work / f"export-{image}"
    ctd.run("ctr", "images", "export", str(work / f"{image}.tar"), f"localhost/lazyfs/{image}:v1")
    manifest, blobs = read_oci_archive(work / f"{image}.tar", out)
    (layer,) = manifest["layers"]
    toc_digest = layer["annotations"][TOC_DIGEST_ANNOTATION]
    path = blobs / layer["digest"][7:]
    blob = open_estargz(FileBlobSource(path), toc_digest)
    if image == "converted":
        assert any(e.type == "chunk" for e in blob.toc.entries)   # 64 KiB chunks
    assert blob.verify_all() == 300_000 + len("hello from ctr-remote\n") + len("kept\n")
    extract(blob, work / f"x-{image}")
    _check_overlay_form(work / f"x-{image}", src)
    mp = work / f"mnt-{image}"
    mp.mkdir()
    h = mount(MountSpec(source=SourceSpec("file", str(path)), mountpoint=str(mp),
                        toc_digest=toc_digest, cache_dir=str(work / "cache")))
    try:
        _check_overlay_form(mp, src)
        assert snapshot(mp) == snapshot(work / f"x-{image}")
    finally:
        h.unmount()


def test_ctr_remote_pushed_image_mounts_lazily(work: Path, ctd: Containerd, reference_images,
                                               registry: LocalRegistry):
    ref = f"{registry.host}/lazyfs/interop:v1"
    ctd.run("ctr", "images", "tag", "localhost/lazyfs/converted:v1", ref)
    ctd.run("ctr-remote", "images", "push", "--plain-http", ref)
    m = RegistryClient(registry.url).get_manifest("lazyfs/interop", "v1")
    (layer,) = m.layers
    mp = work / "mnt-interop"
    mp.mkdir()
    h = mount(MountSpec(source=SourceSpec("registry", registry.url, digest=layer["digest"],
                                          name="lazyfs/interop", size=layer["size"]),
                        mountpoint=str(mp), prefetch=False, cache_dir=str(work / "cache2"),
                        toc_digest=layer["annotations"][TOC_DIGEST_ANNOTATION]))
    try:
        _check_overlay_form(mp, reference_images)
    finally:
        h.unmount()


def test_containerd_pulls_and_unpacks_our_image(work: Path, ctd: Containerd,
                                                registry: LocalRegistry):
    layer = make_layer(work / "ours", big=500_000)
    blob = write_layer(layer, work / "ours.esgz", chunk_size=65536,
                       prioritized=["etc/hello.txt"])
    RegistryClient(registry.url).push_image("lazyfs/ours", "v1", [blob])
    ref = f"{registry.host}/lazyfs/ours:v1"
    r = ctd.run("ctr", "images", "pull", "--plain-http", ref)    # unpack checks diff_ids
    assert "done" in r.stdout or r.returncode == 0
    r = ctd.run("ctr", "images", "check")
    line = next(ln for ln in r.stdout.splitlines() if ref in ln)
    assert "complete" in line
    # and ctr-remote re-converts it (reads our blob as an ordinary tar.gz layer)
    ctd.run("ctr-remote", "images", "convert", "--estargz", "--oci", ref,
            f"{registry.host}/lazyfs/ours:reconverted")
