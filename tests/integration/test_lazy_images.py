"""Lazy images on the node (issue 5): a node that lacks an image layer mounts its eStargz
blob lazily over FUSE, starts the container at once, and pulls the full layer behind it."""
from __future__ import annotations

import os
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


def _layer_info(key: str) -> dict:
    import json

    from sdk.client import default_client
    info = {r["key"]: r for r in default_client().json("GET", "/v1/images")["layers"]}[key]
    extra = info.get("extra") or {}
    return {**info, **(json.loads(extra) if isinstance(extra, str) else extra)}


def _lazy_entry(runtime, key: str, want) -> dict:
    deadline = time.monotonic() + 15      # the mount writes its status twice a second
    while True:
        entry = {e["key"]: e for e in _node_status(runtime)["layers"]}.get(key[:16], {})
        if want(entry) or time.monotonic() > deadline:
            return entry
        time.sleep(0.2)


def test_recorded_prefetch_is_published_and_prefetched_by_later_mounts(runtime):
    """After a lazy start, the node rewrites the layer's eStargz with the files the call
    opened first and the dispatcher serves that blob for the layer from then on; a later
    lazy mount (on a node without the layer or its chunks) prefetches exactly them."""
    from sdk.client import Client, default_client
    node = Client(f"http://127.0.0.1:{runtime.node_port}", runtime.token)
    with app.run(show_progress=False):
        assert read_small.remote() == f"small-{RUN}"
        key = image.spec()["steps"][-1]["key"]
        before = _layer_info(key)
        if not before.get("prefetch_files"):
            default_client().json("POST", f"/v1/functions/{read_small.object_id}/drain", {})
            node.json("POST", f"/v1/layers/{key}/evict", {})
            assert read_small.remote() == f"small-{RUN}"    # lazy; records, pulls, publishes
            deadline = time.monotonic() + 90
            while not _layer_info(key).get("prefetch_files"):
                assert time.monotonic() < deadline, f"never published: {runtime.log_tail()}"
                time.sleep(0.5)
        after = _layer_info(key)
        assert after["digest"] == before["digest"]              # same layer, same archive
        # the meta image: published by the building node, made anew by the dispatcher for
        # the republished blob (the same files: the same image)
        assert before.get("meta_digest", "").startswith("sha256:"), before
        assert after.get("meta_digest") == before["meta_digest"], (before, after)
        assert after["estargz_digest"] != before["estargz_digest"] or before.get(
            "prefetch_files")
        import lazyfs
        hexd = after["estargz_digest"].split(":")[-1]
        blob = lazyfs.open_estargz(lazyfs.FileBlobSource(
            str(runtime.state / "d" / "blobs" / hexd[:2] / hexd)), after["toc_digest"])
        assert "data/small.txt" in blob.tree.prioritized
        assert "data/big.bin" not in blob.tree.prioritized
        # a node that never saw the layer: no local copy, no cached chunks
        default_client().json("POST", f"/v1/functions/{read_small.object_id}/drain", {})
        node.json("POST", f"/v1/layers/{key}/evict", {})
        assert read_small.remote() == f"small-{RUN}"
        entry = _lazy_entry(runtime, key, lambda e: e.get("prefetch") == "done"
                            and (e.get("workset") or {}).get("state"))
        logs = "".join(f.read_text()[-600:] for f in
                       (runtime.node_dir / "lazy-cache" / "logs").glob("*.log"))
        assert entry.get("prefetch") == "done" and entry["prefetched_chunks"] >= 1, (entry, logs)
        assert entry["bytes_fetched"] < 10_000_000, entry       # not the 20 MB file
        # the small file came with the prefetch, not by its own range read
        assert entry["fetched_chunks"] <= entry["prefetched_chunks"], entry
        # ... and was written whole to the view's data dir (while the container started:
        # lazy_workset=nowait); the container's lower dir was the view (meta tree + data
        # dir + FUSE), mounted by the node
        assert (entry.get("workset") or {}).get("state") == "done", entry
        assert entry.get("view") and (entry.get("meta") or {}).get("state") == "done", entry
        vd = runtime.node_dir / "lz" / "ws" / key[:16]
        assert (vd / "data/data/small.txt").read_text() == f"small-{RUN}\n"
        # a metacopy stub (metadata only): in the meta tree's EROFS image, made by the
        # dispatcher for the republished blob, fetched and mounted by the mount server
        # (a chunk-based inode whose one chunk is a hole)
        info = runtime.client.json("GET", "/v1/images")
        layer = next(r for r in info["layers"] if r["key"] == key)
        assert entry["meta"]["kind"] == "published erofs image", entry["meta"]
        assert layer.get("meta_digest", "").startswith("sha256:"), layer
        assert os.path.ismount(vd / "meta")
        stub = vd / "meta/data/big.bin"
        assert os.stat(stub).st_size == 20_000_000
        assert os.getxattr(stub, "trusted.overlay.redirect") == b"/data/big.bin"
        with open(stub, "rb") as f:
            assert f.read(1 << 16) == bytes(1 << 16)
        assert not (vd / "data/data/big.bin").exists()
        assert os.path.ismount(vd.parent)                      # on the node's ws tmpfs
        assert os.path.ismount(runtime.node_dir / "lz" / f"{key[:16]}.view")


def test_dispatcher_refuses_an_estargz_with_other_files(runtime, tmp_path):
    import hashlib

    import lazyfs
    from sdk.client import default_client
    from sdk.exception import InvalidError
    with app.run(show_progress=False):
        key = image.spec()["steps"][-1]["key"]
        (tmp_path / "l/data").mkdir(parents=True)
        (tmp_path / "l/data/small.txt").write_text("something else\n")
        b = lazyfs.write_layer(tmp_path / "l", tmp_path / "x.esgz",
                               prioritized=["data/small.txt"])
        data = b.path.read_bytes()
        c = default_client()
        c.put_blob(hashlib.sha256(data).hexdigest(), data)
        with pytest.raises(InvalidError, match="other files"):
            c.json("POST", f"/v1/layers/{key}/estargz",
                   {"estargz_digest": b.digest, "toc_digest": b.toc_digest})


def test_chunk_cache_budget_is_kept_and_shown(runtime):
    """The node's chunk cache is pruned to its budget, least recently used first, but a
    mounted layer's chunks stay; node status and `runtimectl images` show its size."""
    from sdk.client import Client, default_client
    node = Client(f"http://127.0.0.1:{runtime.node_port}", runtime.token)
    with app.run(show_progress=False):
        key = image.spec()["steps"][-1]["key"]
        default_client().json("POST", f"/v1/functions/{read_small.object_id}/drain", {})
        node.json("POST", f"/v1/layers/{key}/evict", {})
        # reads through FUSE and the chunk cache (a working-set dir would keep the
        # recorded files, once published, out of the cache)
        node.json("POST", "/v1/config", {"lazy_pull": "now", "lazy_workset": "off"})
        try:
            assert read_small.remote() == f"small-{RUN}"        # mounted lazily, in use
            # a budget of 0 prunes at once; the mount writes its chunks to the disk cache
            # once its reads are quiet (0.5 s), so ask until they are there
            deadline = time.monotonic() + 10
            while True:
                node.json("POST", "/v1/config", {"lazy_cache_mb": 0})
                usage = _node_status(runtime).get("chunk_cache") or {}
                if usage.get("budget_bytes") == 0 and usage.get("bytes"):
                    break
                assert time.monotonic() < deadline, usage
                time.sleep(0.3)
            # everything left is pinned by the live mount; nothing it serves was dropped
            assert usage["bytes"] == usage["pinned_bytes"] > 0, usage
            out = runtime.cli("images").stdout
            assert "chunk cache" in out, out
        finally:
            node.json("POST", "/v1/config", {"lazy_cache_mb": 4096, "lazy_pull": "defer",
                                             "lazy_workset": "nowait"})


@app.function(snapshot=True, scaledown_window=1)
def read_small_snap():
    return open("/data/small.txt").read().strip()


def test_a_container_on_a_lazy_layers_view_is_snapshotted_and_restored(runtime):
    """The snapshot is taken while the container's lower dir is the layer's view (overlay
    over the meta tree, the data dir and the FUSE mount); its restore gives the same
    answer, from the view or from the layer pulled since."""
    from sdk.client import Client, default_client
    node = Client(f"http://127.0.0.1:{runtime.node_port}", runtime.token)
    with app.run(show_progress=False):
        key = image.spec()["steps"][-1]["key"]
        default_client().json("POST", f"/v1/functions/{read_small.object_id}/drain", {})
        node.json("POST", f"/v1/layers/{key}/evict", {})
        assert read_small_snap.remote() == f"small-{RUN}"       # cold, lazy, snapshotted
        entry = _lazy_entry(runtime, key, lambda e: e.get("was_lazy"))
        from runtimed.lazy_layers import view_supported
        assert entry.get("was_lazy") and entry.get("view") == view_supported(), entry
        deadline = time.monotonic() + 30
        while not [s for s in node.json("GET", "/v1/snapshots")["snapshots"]
                   if s["function_id"] == read_small_snap.object_id]:
            assert time.monotonic() < deadline, "no snapshot was taken"
            time.sleep(0.2)
        default_client().json("POST", f"/v1/functions/{read_small_snap.object_id}/drain", {})
        time.sleep(0.5)
        assert read_small_snap.remote() == f"small-{RUN}"
        assert read_small_snap.last_call.info["tier"].startswith("restore"), \
            read_small_snap.last_call.info
