"""Pushing a built image to an OCI registry as an eStargz image (manifest + config + layers).

When a registry is set (RUNTIMED_REGISTRY, e.g. http://127.0.0.1:5000, or the node's
/v1/config {"registry": ...}), every image built through the SDK is pushed after its build
as RUNTIMED_REGISTRY_REPO (default `runtimed/images`) tagged with its image id, so `skopeo inspect docker://HOST:PORT/runtimed/images:img-...` works
and stargz-aware pullers (containerd's stargz snapshotter) can run it lazily.

The layers are the eStargz blobs the builder wrote (one per built step, from the blob
store), below them the base rootfs converted once per node (device nodes left out: runc
mounts its own /dev). The config lists the layers' diff_ids, the image's env and workdir.
Pure planning (`plan_push`) is separate from the registry client that does the work.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .layers import BASE_KEY

__all__ = ["PushPlan", "plan_push", "push_image", "registry_target"]

DEFAULT_REPO = "runtimed/images"


def registry_target(setting: str | None = None) -> tuple[str, str] | None:
    """(registry URL, repository) from `setting` ("URL" or "URL/REPO"; default: the
    environment), or None when no registry is set."""
    value = (os.environ.get("RUNTIMED_REGISTRY", "") if setting is None else setting).strip()
    if not value:
        return None
    if "://" not in value:
        value = "http://" + value
    scheme, rest = value.split("://", 1)
    host, _, repo = rest.partition("/")
    repo = repo.strip("/") or os.environ.get("RUNTIMED_REGISTRY_REPO", DEFAULT_REPO)
    return f"{scheme}://{host}", repo


@dataclass(frozen=True)
class PushPlan:
    tag: str
    layer_keys: tuple[str, ...]          # bottom first; BASE_KEY is the base rootfs
    missing: tuple[str, ...]             # built layers without an eStargz: cannot push
    env: tuple[str, ...]
    workdir: str


def plan_push(image: dict, infos: dict[str, dict]) -> PushPlan:
    """What to push for `image` (a build spec with `id` and `steps`), given the eStargz
    info (`estargz_digest`, ...) of its layers."""
    from .builder import layer_keys
    keys = tuple(layer_keys(image))
    missing = tuple(k for k in keys if k != BASE_KEY and not infos.get(k, {}).get(
        "estargz_digest"))
    env = tuple(f"{k}={v}" for k, v in sorted((image.get("env") or {}).items()))
    return PushPlan(tag=str(image["id"]), layer_keys=keys, missing=missing, env=env,
                    workdir=image.get("workdir") or "/")


def base_layer(base_rootfs: Path, work: Path):
    """The base rootfs as an eStargz LayerBlob, converted once and remembered in `work`."""
    import lazyfs
    from lazyfs.estargz import LayerBlob
    blob, meta = work / "base.estargz", work / "base.estargz.json"
    stamp = str((base_rootfs / ".runtimed-complete").stat().st_mtime_ns)
    try:
        doc = json.loads(meta.read_text())
        if doc.pop("stamp") == stamp and blob.exists():
            return LayerBlob(**{**doc, "path": blob, "prioritized": (), "missing": (),
                                "skipped": ()})
    except (OSError, ValueError, KeyError, TypeError):
        pass
    work.mkdir(parents=True, exist_ok=True)
    b = lazyfs.write_layer(base_rootfs, blob, skip_devices=True)
    meta.write_text(json.dumps({"stamp": stamp, "digest": b.digest, "size": b.size,
                                "diff_id": b.diff_id, "toc_digest": b.toc_digest,
                                "uncompressed_size": b.uncompressed_size,
                                "entries": b.entries}))
    return b


def layer_blob(path: Path, info: dict):
    """A built layer's eStargz (a local copy of the blob) as a LayerBlob; the diff_id is
    computed from the blob when the layer's record lacks it (layers built before)."""
    import lazyfs
    from lazyfs.estargz import LayerBlob
    if info.get("diff_id") and info.get("uncompressed_size") is not None:
        return LayerBlob(path=path, digest=info["estargz_digest"], size=path.stat().st_size,
                         diff_id=info["diff_id"], toc_digest=info["toc_digest"],
                         uncompressed_size=int(info["uncompressed_size"]), entries=0)
    return lazyfs.blob_info(path)


def push_image(url: str, repo: str, plan: PushPlan, blobs: list) -> dict:
    """Push `blobs` (LayerBlobs, bottom first) as `repo:plan.tag`; blocking."""
    from lazyfs.registry import RegistryClient, image_config
    client = RegistryClient(url)
    try:
        cfg = image_config(blobs, env=plan.env, cmd=("python3",))
        cfg["config"]["WorkingDir"] = plan.workdir
        img = client.push_image(repo, plan.tag, blobs, config=cfg)
    finally:
        client.close()
    host = url.split("://", 1)[-1]
    return {"ref": f"{host}/{repo}:{plan.tag}", "manifest_digest": img.manifest_digest,
            "layers": len(img.layers)}
