"""lazyfs against a real OCI registry (Debian's docker-registry on loopback): push, skopeo
inspect/copy, a lazy FUSE mount that fetches only what is read, and a registry that dies
mid-read (EIO with a clear error) and comes back (reads work again)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from lazyfs import (
    FileBlobSource,
    MountSpec,
    SourceSpec,
    mount,
    open_estargz,
    write_layer,
)
from lazyfs.devregistry import LocalRegistry
from lazyfs.registry import RegistryClient
from lazyfs.testing import fuse_skip_reason, make_layer
from lazyfs.toc import TOC_DIGEST_ANNOTATION

SKIP = fuse_skip_reason(("docker-registry", "docker-registry"), ("skopeo", "skopeo"))
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(SKIP is not None, reason=str(SKIP))]
NAME, TAG = "lazyfs/test", "v1"
CHUNK = 256 * 1024
BIG = 8_000_000


@pytest.fixture(scope="module")
def work():
    d = Path(tempfile.mkdtemp(prefix="lazyfs-reg-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def registry(work: Path):
    reg = LocalRegistry(work / "registry").start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def pushed(work: Path, registry: LocalRegistry):
    layer = make_layer(work / "layer", big=BIG)
    blob = write_layer(layer, work / "layer.esgz", chunk_size=CHUNK)
    client = RegistryClient(registry.url)
    img = client.push_image(NAME, TAG, [blob])
    return layer, blob, img


def test_push_then_pull_manifest(registry: LocalRegistry, pushed):
    _, blob, img = pushed
    client = RegistryClient(registry.url)
    for ref in (TAG, img.manifest_digest):
        m = client.get_manifest(NAME, ref)
        assert m.digest == img.manifest_digest
        (layer,) = m.layers
        assert layer["digest"] == blob.digest and layer["size"] == blob.size
        assert layer["annotations"][TOC_DIGEST_ANNOTATION] == blob.toc_digest
    cfg = json.loads(client.get_blob(NAME, m.doc["config"]["digest"]))
    assert cfg["rootfs"]["diff_ids"] == [blob.diff_id]
    assert client.push_blob(NAME, blob.digest, path=blob.path) is False     # already there


def test_skopeo_inspect_and_copy(work: Path, registry: LocalRegistry, pushed):
    _, blob, img = pushed
    ref = f"docker://{registry.host}/{NAME}:{TAG}"
    r = subprocess.run(["skopeo", "inspect", "--tls-verify=false", ref],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["Digest"] == img.manifest_digest and info["Layers"] == [blob.digest]
    r = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", ref],
                       capture_output=True, text=True, timeout=60)
    assert json.loads(r.stdout)["layers"][0]["annotations"][TOC_DIGEST_ANNOTATION] == \
        blob.toc_digest
    oci = work / "oci-copy"
    r = subprocess.run(["skopeo", "copy", "--src-tls-verify=false", ref, f"oci:{oci}:{TAG}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    copied = oci / "blobs/sha256" / blob.digest[7:]
    assert copied.read_bytes() == blob.path.read_bytes()
    e = open_estargz(FileBlobSource(copied), blob.toc_digest)
    assert e.read_file("etc/hello.txt") == b"hello, lazy world\n"


def _registry_mount(work: Path, registry: LocalRegistry, name: str, **source_kw):
    m = RegistryClient(registry.url).get_manifest(NAME, TAG)
    desc = m.layers[0]
    mp = work / name
    mp.mkdir()
    spec = MountSpec(source=SourceSpec("registry", registry.url, digest=desc["digest"],
                                       name=NAME, size=desc["size"], **source_kw),
                     mountpoint=str(mp), toc_digest=desc["annotations"][TOC_DIGEST_ANNOTATION],
                     cache_dir=str(work / f"cache-{name}"), prefetch=False,
                     status_path=str(work / f"{name}.status.json"))
    return mount(spec, log_path=str(work / f"{name}.log"))


def test_lazy_mount_fetches_only_a_fraction(work: Path, registry: LocalRegistry, pushed):
    layer, blob, _ = pushed
    before = registry.bytes_served()
    h = _registry_mount(work, registry, "lazy")
    try:
        mp = Path(h.mountpoint)
        assert (mp / "etc/hello.txt").read_text() == "hello, lazy world\n"
        assert sorted(os.listdir(mp / "usr/lib/python3")) == ["big.bin", "text.py"]
        assert os.stat(mp / "usr/lib/python3/big.bin").st_size == BIG
        fetched = registry.bytes_served() - before
        assert 0 < fetched < blob.size / 10, (fetched, blob.size)
        with open(mp / "usr/lib/python3/big.bin", "rb") as f:
            f.seek(BIG // 2)
            assert f.read(1000) == (layer / "usr/lib/python3/big.bin").read_bytes()[
                BIG // 2:BIG // 2 + 1000]
        fetched2 = registry.bytes_served() - before
        assert fetched2 - fetched < 3 * CHUNK                # one chunk (+ readahead)
    finally:
        h.unmount()


def test_registry_dies_mid_read_then_comes_back(work: Path, registry: LocalRegistry, pushed):
    layer, _, _ = pushed
    want = (layer / "usr/lib/python3/big.bin").read_bytes()
    h = _registry_mount(work, registry, "flaky", attempts=3, timeout_s=2.0)
    try:
        path = Path(h.mountpoint) / "usr/lib/python3/big.bin"
        with open(path, "rb") as f:
            assert f.read(CHUNK) == want[:CHUNK]
            registry.kill()
            f.seek(BIG - 3 * CHUNK)
            t0 = time.monotonic()
            with pytest.raises(OSError) as ei:
                f.read(4096)
            assert ei.value.errno == errno.EIO
            assert time.monotonic() - t0 < 15                 # bounded retries, no hang
        time.sleep(0.7)
        status = h.status()
        assert status["read_errors"] >= 1
        assert registry.url in status["last_error"] and "failed 3 times" in status["last_error"]
        assert "answering EIO" in h.log_tail()
        registry.start()
        with open(path, "rb") as f:
            f.seek(BIG - 3 * CHUNK)
            assert f.read(4096) == want[BIG - 3 * CHUNK:BIG - 3 * CHUNK + 4096]
        assert path.read_bytes() == want
    finally:
        if registry.proc is None:
            registry.start()
        h.unmount()
