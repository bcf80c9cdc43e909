"""A minimal OCI distribution client: push eStargz images, pull manifests.

Push follows what Debian's docker-registry 2.8 accepts (see shared/PLATFORM.md):
POST /v2/NAME/blobs/uploads/ -> 202 + Location (already carrying `?_state=`), then
PUT Location&digest=... with the whole blob -> 201. (A one-shot POST ?digest= answers 202
but stores nothing, so it is not used.) Layer descriptors carry the eStargz annotations
(`containerd.io/snapshot/stargz/toc.digest`, uncompressed size), the config lists the
layers' diff_ids, so skopeo, containerd and stargz-aware pullers all accept the image.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

from ._http import HttpClient, RetryPolicy
from .errors import BlobNotFoundError, DigestMismatchError, RegistryError
from .estargz import LayerBlob
from .toc import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION, check_digest

__all__ = [
    "CONFIG_MEDIA_TYPE",
    "LAYER_MEDIA_TYPE",
    "MANIFEST_MEDIA_TYPE",
    "Manifest",
    "PushedImage",
    "RegistryClient",
    "image_config",
    "layer_descriptor",
]

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
_NAME_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)"
                      r"[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"not an OCI repository name: {name!r}")


def _check_ref(ref: str) -> None:
    if not (_TAG_RE.match(ref) or re.match(r"^sha256:[0-9a-f]{64}$", ref)):
        raise ValueError(f"not a tag or digest: {ref!r}")


@dataclass(frozen=True)
class Manifest:
    raw: bytes
    digest: str
    media_type: str

    @property
    def doc(self) -> dict:
        return json.loads(self.raw)

    @property
    def layers(self) -> list[dict]:
        return list(self.doc.get("layers", []))


@dataclass(frozen=True)
class PushedImage:
    name: str
    tag: str
    manifest_digest: str
    config_digest: str
    layers: tuple[dict, ...]


def layer_descriptor(blob: LayerBlob) -> dict:
    """The OCI descriptor of an eStargz layer, with the annotations lazy pullers need."""
    return {"mediaType": LAYER_MEDIA_TYPE, "digest": blob.digest, "size": blob.size,
            "annotations": {TOC_DIGEST_ANNOTATION: blob.toc_digest,
                            UNCOMPRESSED_SIZE_ANNOTATION: str(blob.uncompressed_size)}}


def image_config(layers: Sequence[LayerBlob], *, env: Sequence[str] = (),
                 cmd: Sequence[str] = ("/bin/sh",), architecture: str = "amd64") -> dict:
    return {"architecture": architecture, "os": "linux",
            "config": {"Env": list(env), "Cmd": list(cmd)},
            "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in layers]}}


class RegistryClient:
    """Talks to one registry (`http://host:port`); thread-safe; retries bounded."""

    def __init__(self, url: str, *, token: str = "", retry: RetryPolicy | None = None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = HttpClient(self.url, headers=headers, retry=retry, unavailable=RegistryError)

    def close(self) -> None:
        self.http.close()

    def _fail(self, what: str, status: int, body: bytes) -> RegistryError:
        return RegistryError(f"{what} at {self.url}: HTTP {status} {body[:300]!r}")

    def ping(self) -> bool:
        try:
            return self.http.request("GET", "/v2/").status == 200
        except RegistryError:
            return False

    def blob_exists(self, name: str, digest: str) -> bool:
        _check_name(name)
        check_digest(digest, "blob digest")
        r = self.http.request("HEAD", f"/v2/{name}/blobs/{digest}")
        return r.status == 200

    def push_blob(self, name: str, digest: str, *, path: Path | None = None,
                  data: bytes | None = None) -> bool:
        """Upload one blob unless the registry has it; returns whether it uploaded."""
        check_digest(digest, "blob digest")
        if (path is None) == (data is None):
            raise ValueError("give exactly one of path or data")
        if self.blob_exists(name, digest):
            return False
        r = self.http.request("POST", f"/v2/{name}/blobs/uploads/", body=b"")
        if r.status != 202 or "location" not in r.headers:
            raise self._fail(f"starting the upload of {digest}", r.status, r.body)
        loc = urljoin(self.url + "/", r.headers["location"])
        loc += ("&" if "?" in loc else "?") + f"digest={digest}"
        size = path.stat().st_size if path is not None else len(data or b"")
        body = (lambda: open(path, "rb")) if path is not None else data
        r = self.http.request("PUT", loc, body=body,
                              headers={"Content-Type": "application/octet-stream",
                                       "Content-Length": str(size)})
        if r.status != 201:
            raise self._fail(f"uploading {digest}", r.status, r.body)
        return True

    def put_manifest(self, name: str, ref: str, manifest: bytes,
                     media_type: str = MANIFEST_MEDIA_TYPE) -> str:
        _check_name(name)
        _check_ref(ref)
        r = self.http.request("PUT", f"/v2/{name}/manifests/{ref}", body=manifest,
                              headers={"Content-Type": media_type})
        if r.status != 201:
            raise self._fail(f"putting manifest {name}:{ref}", r.status, r.body)
        return "sha256:" + hashlib.sha256(manifest).hexdigest()

    def get_manifest(self, name: str, ref: str) -> Manifest:
        """Fetch a manifest; a digest reference is verified against the bytes."""
        _check_name(name)
        _check_ref(ref)
        accept = f"{MANIFEST_MEDIA_TYPE}, {INDEX_MEDIA_TYPE}, {DOCKER_MANIFEST_MEDIA_TYPE}"
        r = self.http.request("GET", f"/v2/{name}/manifests/{ref}", headers={"Accept": accept})
        if r.status == 404:
            raise BlobNotFoundError(f"no manifest {name}:{ref} at {self.url}")
        if r.status != 200:
            raise self._fail(f"getting manifest {name}:{ref}", r.status, r.body)
        digest = "sha256:" + hashlib.sha256(r.body).hexdigest()
        if ref.startswith("sha256:") and digest != ref:
            raise DigestMismatchError(f"manifest {name}@{ref}", ref, digest)
        media = r.headers.get("content-type", "").split(";")[0] or MANIFEST_MEDIA_TYPE
        return Manifest(r.body, digest, media)

    def get_blob(self, name: str, digest: str) -> bytes:
        """A small blob (config) in one GET, verified against its digest."""
        check_digest(digest, "blob digest")
        r = self.http.request("GET", f"/v2/{name}/blobs/{digest}")
        if r.status == 404:
            raise BlobNotFoundError(f"no blob {name}@{digest} at {self.url}")
        if r.status != 200:
            raise self._fail(f"getting blob {digest}", r.status, r.body)
        actual = "sha256:" + hashlib.sha256(r.body).hexdigest()
        if actual != digest:
            raise DigestMismatchError(f"blob {name}@{digest}", digest, actual)
        return r.body

    def push_image(self, name: str, tag: str, layers: Sequence[LayerBlob], *,
                   config: dict | None = None) -> PushedImage:
        """Push layers (from their paths), the config and the manifest; tag it `tag`."""
        _check_name(name)
        _check_ref(tag)
        for b in layers:
            self.push_blob(name, b.digest, path=b.path)
        cfg = json.dumps(config or image_config(layers), sort_keys=True).encode()
        cfg_digest = "sha256:" + hashlib.sha256(cfg).hexdigest()
        self.push_blob(name, cfg_digest, data=cfg)
        descs = tuple(layer_descriptor(b) for b in layers)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
                               "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": cfg_digest,
                                          "size": len(cfg)},
                               "layers": list(descs)}, sort_keys=True).encode()
        digest = self.put_manifest(name, tag, manifest)
        return PushedImage(name, tag, digest, cfg_digest, descs)
