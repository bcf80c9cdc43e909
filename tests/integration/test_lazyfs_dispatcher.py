"""The node daemon's path: an eStargz layer uploaded to the dispatcher's blob store is
mounted lazily with `lazyfs.mount_layer(digest, dispatcher_url, token)` and read by ranges
(the dispatcher's aiohttp FileResponse honours Range)."""
from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import pytest

from lazyfs import DispatcherBlobSource, mount_layer, open_estargz, write_layer
from lazyfs.testing import fuse_skip_reason, make_layer, snapshot
from lazyfs.view import READAHEAD_BYTES

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(fuse_skip_reason() is not None, reason=str(fuse_skip_reason()))]


def _upload(runtime, path: Path, digest: str) -> None:
    req = urllib.request.Request(f"{runtime.url}/v1/blobs/{digest.removeprefix('sha256:')}",
                                 data=path.read_bytes(), method="PUT",
                                 headers={"Authorization": f"Bearer {runtime.token}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status in (200, 201)


def test_mount_layer_from_the_dispatcher(runtime, tmp_path: Path):
    layer = make_layer(tmp_path / "layer", big=6_000_000)
    blob = write_layer(layer, tmp_path / "layer.esgz", chunk_size=512 * 1024)
    _upload(runtime, blob.path, blob.digest)

    src = DispatcherBlobSource(runtime.url, blob.digest, runtime.token)
    assert src.size() == blob.size
    assert open_estargz(src, blob.toc_digest).read_file("etc/hello.txt") == \
        b"hello, lazy world\n"

    mp = tmp_path / "mnt"
    mp.mkdir()
    h = mount_layer(mp, digest=blob.digest, dispatcher_url=runtime.url, token=runtime.token,
                    toc_digest=blob.toc_digest, size=blob.size, cache_dir=str(tmp_path / "cache"),
                    status_path=str(tmp_path / "status.json"), prefetch=False)
    try:
        assert (mp / "etc/hello.txt").read_text() == "hello, lazy world\n"
        time.sleep(0.7)
        fetched = h.status()["source"]["bytes_received"]
        # the TOC, the file's member and the read-ahead after it: a fraction of the blob
        assert 0 < fetched <= READAHEAD_BYTES + 300_000 < blob.size / 4
        assert snapshot(mp) == snapshot(layer)            # everything, verified, on demand
        assert runtime.token not in " ".join(
            open(f"/proc/{h.proc.pid}/cmdline").read().split("\0"))
    finally:
        h.unmount()
    assert not os.path.ismount(mp)
