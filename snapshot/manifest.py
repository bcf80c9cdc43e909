"""Snapshot manifest: the typed, versioned description of one stored CRIU image dir.

A manifest names every file of the image directory and, for each regular file,
the ordered list of chunks whose concatenation is the file's bytes. Chunks are
identified by sha256 (identity) and carry an xxh3_128 digest (cheap dedup
prefilter). The manifest is written last when a snapshot is stored: its presence
is what makes a snapshot exist.

JSON format (version 1)::

    {"version": 1, "snapshot_id": "snap-<16 hex>", "key": str, "image_id": str,
     "function_id": str, "created_at": float, "raw_size": int, "stored_size": int,
     "fingerprint": {"kernel", "criu_version", "cpu_flags_sha", "runc_version", "arch"},
     "meta": {str: str},
     "files": [{"path": "pages-1.img", "mode": 420, "size": int, "link_target": null,
                "chunks": [{"sha256": hex64, "xxh": hex32, "size": int,
                            "stored_size": int}, ...]}, ...]}

Every dataclass validates itself on construction with the small ``check_*``
functions below, so a manifest that exists in memory is well formed; manifests
read from disk or from an imported tar are hostile until parsed this way.

Errors: ``SnapshotError`` is the base of every snapshot error and ``ManifestError``
(malformed or unsupported manifest) lives here because validation needs it and
``snapshot.store`` (which re-exports both) imports this module.
"""
from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

MANIFEST_VERSION = 1
# Named limits so a hostile manifest or tar cannot make us allocate without bound.
MAX_MANIFEST_BYTES = 64 << 20
MAX_CHUNK_BYTES = 64 << 20
MAX_FILES = 100_000

_SNAPSHOT_ID = re.compile(r"snap-[0-9a-f]{16}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_XXH128 = re.compile(r"[0-9a-f]{32}")


class SnapshotError(Exception):
    """Base of every error raised by the snapshot store."""


class ManifestError(SnapshotError):
    """A manifest (or snapshot id) is malformed or of an unsupported version."""


def new_snapshot_id() -> str:
    return f"snap-{secrets.token_hex(8)}"


# ---- small check functions (each raises ManifestError with what is wrong) ----

def check_version(version: object) -> None:
    if version != MANIFEST_VERSION:
        raise ManifestError(
            f"manifest version {version!r} is not supported (this runtimed reads "
            f"version {MANIFEST_VERSION}); upgrade runtimed or take a new snapshot")


def check_snapshot_id(snapshot_id: object) -> None:
    if not isinstance(snapshot_id, str) or not _SNAPSHOT_ID.fullmatch(snapshot_id):
        raise ManifestError(f"invalid snapshot id {snapshot_id!r}: expected 'snap-' + 16 hex")


def check_rel_path(path: object) -> None:
    """A path inside the image dir: relative, posix, no '..', '.' or empty parts."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"invalid file path {path!r}: must be a non-empty string")
    if path.startswith("/") or "\0" in path:
        raise ManifestError(f"invalid file path {path!r}: must be relative posix")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise ManifestError(f"invalid file path {path!r}: empty, '.' or '..' component")


def _check_int(name: str, value: object, limit: int | None = None) -> None:
    if type(value) is not int or value < 0 or (limit is not None and value > limit):
        raise ManifestError(f"invalid {name} {value!r}: expected an int in [0, {limit}]")


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise ManifestError(f"invalid {name} {value!r}: expected a string")


def check_tree(files: tuple[FileEntry, ...]) -> None:
    """Paths are unique and no entry lies below another entry.

    The second rule is what keeps a hostile manifest with a symlink ``a -> /etc``
    and a file ``a/passwd`` from writing outside the destination on materialize.
    """
    if len(files) > MAX_FILES:
        raise ManifestError(f"too many files ({len(files)} > {MAX_FILES})")
    paths = {f.path for f in files}
    if len(paths) != len(files):
        raise ManifestError("duplicate file paths in manifest")
    for f in files:
        parts = f.path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in paths:
                raise ManifestError(f"file {f.path!r} lies below another entry {parent!r}")


# ---- the format ----

@dataclass(frozen=True)
class ChunkRef:
    """One chunk: ``size`` raw bytes, stored zstd-compressed in ``stored_size`` bytes.

    ``stored_size`` is informational (what the writer's zstd produced); another
    node may hold the same chunk compressed differently, so reads never check it.
    """
    sha256: str
    xxh: str
    size: int
    stored_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise ManifestError(f"invalid chunk sha256 {self.sha256!r}")
        if not isinstance(self.xxh, str) or not _XXH128.fullmatch(self.xxh):
            raise ManifestError(f"invalid chunk xxh3_128 {self.xxh!r}")
        _check_int("chunk size", self.size, MAX_CHUNK_BYTES)
        _check_int("chunk stored_size", self.stored_size)

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "xxh": self.xxh, "size": self.size,
                "stored_size": self.stored_size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChunkRef:
        return cls(d["sha256"], d["xxh"], d["size"], d["stored_size"])


@dataclass(frozen=True)
class FileEntry:
    """A regular file (``chunks`` concatenate to ``size`` bytes) or, when
    ``link_target`` is set, a symlink (no chunks, size 0). ``mode`` is the
    permission bits (``st_mode & 0o7777``)."""
    path: str
    mode: int
    size: int
    chunks: tuple[ChunkRef, ...] = ()
    link_target: str | None = None

    def __post_init__(self) -> None:
        check_rel_path(self.path)
        _check_int("file mode", self.mode, 0o7777)
        _check_int("file size", self.size)
        object.__setattr__(self, "chunks", tuple(self.chunks))
        if self.link_target is not None:
            if not isinstance(self.link_target, str) or not self.link_target or \
                    "\0" in self.link_target:
                raise ManifestError(f"invalid symlink target {self.link_target!r} for {self.path}")
            if self.chunks or self.size:
                raise ManifestError(f"symlink {self.path} must have no chunks and size 0")
        elif sum(c.size for c in self.chunks) != self.size:
            raise ManifestError(f"file {self.path}: chunk sizes do not add up to {self.size}")

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "mode": self.mode, "size": self.size,
                "link_target": self.link_target,
                "chunks": [c.to_dict() for c in self.chunks]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileEntry:
        return cls(d["path"], d["mode"], d["size"],
                   tuple(ChunkRef.from_dict(c) for c in d["chunks"]), d.get("link_target"))


@dataclass(frozen=True)
class Fingerprint:
    """What a host must match to restore a snapshot taken elsewhere."""
    kernel: str
    criu_version: str
    cpu_flags_sha: str
    runc_version: str
    arch: str

    def __post_init__(self) -> None:
        for name in ("kernel", "criu_version", "cpu_flags_sha", "runc_version", "arch"):
            _check_str(f"fingerprint {name}", getattr(self, name))

    def incompatibility(self, other: Fingerprint) -> str | None:
        """Why a snapshot with fingerprint ``self`` cannot be restored on a host
        with fingerprint ``other`` (e.g. "kernel 6.18.1 != 6.1.0"), or None.
        Every mismatch is listed, most fundamental first, joined by '; '."""
        reasons = [
            f"{label} {mine} != {theirs}"
            for label, mine, theirs in (
                ("arch", self.arch, other.arch),
                ("kernel", self.kernel, other.kernel),
                ("criu", self.criu_version, other.criu_version),
                ("runc", self.runc_version, other.runc_version),
                ("cpu flags", self.cpu_flags_sha, other.cpu_flags_sha),
            ) if mine != theirs]
        return "; ".join(reasons) or None

    def to_dict(self) -> dict[str, str]:
        return {"kernel": self.kernel, "criu_version": self.criu_version,
                "cpu_flags_sha": self.cpu_flags_sha, "runc_version": self.runc_version,
                "arch": self.arch}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fingerprint:
        return cls(d["kernel"], d["criu_version"], d["cpu_flags_sha"], d["runc_version"],
                   d["arch"])


@dataclass(frozen=True)
class SnapshotManifest:
    """One stored snapshot. ``raw_size`` is the sum of file sizes; ``stored_size``
    is the compressed bytes of the chunks this snapshot newly added when it was
    written (0 when everything deduplicated). ``key`` is opaque to the store."""
    version: int
    snapshot_id: str
    key: str
    image_id: str
    function_id: str
    created_at: float
    fingerprint: Fingerprint
    files: tuple[FileEntry, ...]
    raw_size: int
    stored_size: int
    meta: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        check_version(self.version)
        check_snapshot_id(self.snapshot_id)
        for name in ("key", "image_id", "function_id"):
            _check_str(name, getattr(self, name))
        if type(self.created_at) not in (int, float):
            raise ManifestError(f"invalid created_at {self.created_at!r}")
        if not isinstance(self.fingerprint, Fingerprint):
            raise ManifestError("fingerprint must be a Fingerprint")
        object.__setattr__(self, "files", tuple(self.files))
        check_tree(self.files)
        _check_int("raw_size", self.raw_size)
        _check_int("stored_size", self.stored_size)
        if sum(f.size for f in self.files) != self.raw_size:
            raise ManifestError(f"raw_size {self.raw_size} != sum of file sizes")
        if not isinstance(self.meta, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.meta.items()):
            raise ManifestError("meta must map str to str")
        object.__setattr__(self, "meta", dict(self.meta))  # a private copy

    def chunk_refs(self) -> Iterator[ChunkRef]:
        """Each distinct chunk once, in first-use order."""
        seen: set[str] = set()
        for f in self.files:
            for c in f.chunks:
                if c.sha256 not in seen:
                    seen.add(c.sha256)
                    yield c

    def to_json(self) -> str:
        return json.dumps({
            "version": self.version, "snapshot_id": self.snapshot_id, "key": self.key,
            "image_id": self.image_id, "function_id": self.function_id,
            "created_at": self.created_at, "fingerprint": self.fingerprint.to_dict(),
            "files": [f.to_dict() for f in self.files], "raw_size": self.raw_size,
            "stored_size": self.stored_size, "meta": self.meta,
        }, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> SnapshotManifest:
        """Parse and validate; anything malformed raises ManifestError."""
        if len(text) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"manifest is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ManifestError("manifest must be a JSON object")
        check_version(d.get("version"))  # first, so a newer format gets the clear message
        try:
            return cls(
                version=d["version"], snapshot_id=d["snapshot_id"], key=d["key"],
                image_id=d["image_id"], function_id=d["function_id"],
                created_at=d["created_at"],
                fingerprint=Fingerprint.from_dict(d["fingerprint"]),
                files=tuple(FileEntry.from_dict(f) for f in d["files"]),
                raw_size=d["raw_size"], stored_size=d["stored_size"], meta=d["meta"])
        except (KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"manifest is missing or mistypes a field: {e!r}") from None
