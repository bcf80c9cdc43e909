"""Images built through the SDK are pushed to an OCI registry when one is configured:
manifest + config + eStargz layers (the base rootfs included), readable by skopeo and
mountable lazily from the registry (Debian's docker-registry on loopback)."""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from sdk import App, Image

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("docker-registry") is None or
                                 shutil.which("skopeo") is None,
                                 reason="docker-registry and skopeo are needed "
                                        "(apt-get install docker-registry skopeo)")]

RUN = uuid.uuid4().hex[:8]
image = Image.debian_slim().run_commands(f"mkdir -p /pushed && echo {RUN} > /pushed/id.txt")
app = App("image-push-tests", image=image)


@app.function()
def hello():
    return open("/pushed/id.txt").read().strip()


def _skopeo(ref: str, *flags: str) -> str:
    r = subprocess.run(["skopeo", "inspect", *flags, "--tls-verify=false", ref],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def registry():
    from lazyfs.devregistry import LocalRegistry
    d = Path(tempfile.mkdtemp(prefix="rtd-push-reg-", dir="/var/tmp"))
    reg = LocalRegistry(d).start()
    yield reg
    reg.stop()
    shutil.rmtree(d, ignore_errors=True)


def test_sdk_build_is_pushed_as_an_oci_estargz_image(runtime, registry):
    import lazyfs
    from lazyfs.registry import RegistryClient
    from lazyfs.toc import TOC_DIGEST_ANNOTATION
    from sdk.client import Client
    node = Client(f"http://127.0.0.1:{runtime.node_port}", runtime.token)
    node.json("POST", "/v1/config", {"registry": f"{registry.url}/rtd-test/images"})
    try:
        with app.run(show_progress=False):
            assert hello.remote() == RUN
            image_id = image.image_id
    finally:
        node.json("POST", "/v1/config", {"registry": ""})
    ref = f"docker://{registry.host}/rtd-test/images:{image_id}"
    info = json.loads(_skopeo(ref))
    assert len(info["Layers"]) == 2                   # the base rootfs + the run step
    raw = json.loads(_skopeo(ref, "--raw"))
    descs = raw["layers"]
    assert all(TOC_DIGEST_ANNOTATION in d["annotations"] for d in descs)
    cfg = json.loads(_skopeo(ref, "--config"))
    assert len(cfg["rootfs"]["diff_ids"]) == 2
    # the step's layer, read from the registry through its verified TOC
    top = descs[-1]
    src = lazyfs.RegistryBlobSource(registry.url, "rtd-test/images", top["digest"])
    try:
        blob = lazyfs.open_estargz(src, top["annotations"][TOC_DIGEST_ANNOTATION])
        assert blob.read_file("pushed/id.txt") == f"{RUN}\n".encode()
    finally:
        src.close()
    # the diff_id in the config is the uncompressed tar's digest of that very blob
    client = RegistryClient(registry.url)
    try:
        data = client.get_blob("rtd-test/images", top["digest"])
    finally:
        client.close()
    import gzip
    import hashlib
    assert "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest() == \
        cfg["rootfs"]["diff_ids"][-1]
