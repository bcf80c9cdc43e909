"""Lazy images on the node (issue 5): a node that lacks an image layer mounts its eStargz
blob lazily over FUSE, starts the container at once, and pulls the full layer behind it."""
from __future__ import annotations

import shutil
import time
import uuid

import pytest

from sdk import App, Image

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN = uuid.uuid4().hex[:8]
# A layer with one big file the function never reads and one small file it does.
image = (Image.debian_slim()
         .run_commands(f"mkdir -p /data && head -c 20000000 /dev/urandom > /data/big.bin "
                       f"&& echo small-{RUN} > /data/small.txt"))
app = App("lazy-image-tests", image=image)


@app.function(scaledown_window=1)
def read_small():
    return open("/data/small.txt").read().strip()


def _node_status(runtime):
    from sdk.client import Client
    return Client(f"http://127.0.0.1:{runtime.node_port}", runtime.token).json("GET", "/v1/status")


def test_missing_layer_is_mounted_lazily_then_pulled(runtime):
    from sdk.client import default_client
    with app.run(show_progress=False):
        assert read_small.remote() == f"small-{RUN}"
        key = image.spec()["steps"][-1]["key"]
        # Make the node forget the layer, as a node that never saw this image.
        default_client().json("POST", f"/v1/functions/{read_small.object_id}/drain", {})
        time.sleep(0.5)
        shutil.rmtree(runtime.node_dir / "l" / key[:16])
        assert read_small.remote() == f"small-{RUN}"
        deadline = time.monotonic() + 10     # the mount writes its status twice a second
        while True:
            layers = {entry["key"]: entry for entry in _node_status(runtime)["layers"]}
            lazy = layers.get(key[:16])
            assert lazy is not None and lazy.get("was_lazy"), layers
            if lazy.get("bytes_fetched") is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        # only what the function touched (plus prefetch) came over, not the 20 MB file
        assert lazy["bytes_fetched"] < 10_000_000, lazy
        deadline = time.monotonic() + 60
        while layers.get(key[:16], {}).get("state") != "local":
            assert time.monotonic() < deadline, "the background full pull never finished"
            time.sleep(0.5)
            layers = {e["key"]: e for e in _node_status(runtime)["layers"]}
        default_client().json("POST", f"/v1/functions/{read_small.object_id}/drain", {})
        assert read_small.remote() == f"small-{RUN}"


def test_rebuild_puts_files_a_lazy_start_opened_first(runtime):
    """The access recorder of a lazy mount feeds the next build of that layer: the files
    the function opened come first in the new eStargz (the prefetch area)."""
    from sdk.client import default_client
    with app.run(show_progress=False):
        key = image.spec()["steps"][-1]["key"]
        default_client().json("POST", f"/v1/functions/{read_small.object_id}/drain", {})
        time.sleep(0.5)
        from sdk.client import Client
        node = Client(f"http://127.0.0.1:{runtime.node_port}", runtime.token)
        node.json("POST", f"/v1/layers/{key}/evict", {})
        assert read_small.remote() == f"small-{RUN}"      # served from a lazy mount
        record = runtime.node_dir / "lz" / f"{key[:16]}.access.json"
        deadline = time.monotonic() + 10
        while "data/small.txt" not in (record.read_text() if record.exists() else ""):
            assert time.monotonic() < deadline, "the recorder never noted the opened file"
            time.sleep(0.2)
    forced = Image.debian_slim().run_commands(
        f"mkdir -p /data && head -c 20000000 /dev/urandom > /data/big.bin "
        f"&& echo small-{RUN} > /data/small.txt", force_build=True)
    app2 = App("lazy-image-rebuild")

    @app2.function(image=forced)
    def noop():
        return 1
    with app2.run(show_progress=False):
        pass
    layers = {r["key"]: r for r in default_client().json("GET", "/v1/images")["layers"]}
    info = layers[key]
    extra = info.get("extra") or {}
    if isinstance(extra, str):
        import json
        extra = json.loads(extra or "{}")
    estargz = info.get("estargz_digest") or extra.get("estargz_digest")
    assert estargz, info
    import lazyfs
    blob = runtime.state / "d" / "blobs" / estargz.split(":")[-1][:2] / estargz.split(":")[-1]
    toc = lazyfs.open_estargz(lazyfs.FileBlobSource(str(blob)), None).toc
    names = [e.name for e in toc.entries if e.type == "reg"]
    assert names.index("data/small.txt") < names.index("data/big.bin"), names[:10]
