"""The node's local layer store: unpacked layers by key, ready to be overlay lower dirs."""
from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import archive

BASE_KEY = "base-bookworm-py311"


@dataclass(frozen=True)
class LayerInfo:
    key: str
    path: Path
    size: int
    source: str        # built | pulled | base
    hits: int


class LayerStore:
    def __init__(self, root: Path, base_rootfs: Path):
        self.root, self.base_rootfs = root, base_rootfs
        root.mkdir(parents=True, exist_ok=True)
        self._hits: dict[str, int] = {}
        self._full_key: dict[str, str] = {}
        self.lazy: dict = {}            # layer key -> lazyfs MountHandle
        self.views: dict[str, Path] = {}     # layer key -> its lazy mount's view (lazyfs.metatree)
        for d in root.iterdir():
            if (d / "key").exists():
                self._full_key[d.name] = (d / "key").read_text().strip()

    def path(self, key: str) -> Path:
        if key == BASE_KEY:
            return self.base_rootfs
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"bad layer key {key!r}")
        return self.root / key[:16]

    def has(self, key: str) -> bool:
        if key == BASE_KEY:
            return (self.base_rootfs / ".runtimed-complete").exists()
        return (self.path(key) / ".rtd-complete").exists()

    def hit(self, key: str) -> None:
        self._hits[key[:16]] = self._hits.get(key[:16], 0) + 1

    def fs(self, key: str) -> Path:
        """The directory to use as an overlay lower dir: the local copy when complete, else
        while the full pull is under way the layer's lazy mount: its view (the kernel
        answers metadata, working-set files are local) or, without one, the FUSE mount."""
        if key == BASE_KEY:
            return self.base_rootfs
        if key in self.lazy and not self.has(key):
            return self.views.get(key) or Path(self.lazy[key].mountpoint)
        return self.path(key) / "fs"

    def lower_dirs(self, key: str) -> list[Path]:
        """The overlay lower dirs for layer `key`, bottom-up."""
        return [self.fs(key)]

    def adopt_dir(self, key: str, upper: Path, source: str = "built") -> Path:
        """Move a finished build's upper dir in as layer `key` (atomic rename)."""
        final = self.path(key)
        tmp = self.root / f".tmp-{key[:16]}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        os.rename(upper, tmp / "fs")
        (tmp / "source").write_text(source)
        (tmp / "key").write_text(key)
        self._full_key[key[:16]] = key
        (tmp / ".rtd-complete").touch()
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        return final / "fs"

    def adopt_archive(self, key: str, archive_path: Path, *,
                      wanted: Callable[[], bool] | None = None) -> Path:
        """Unpack a layer archive (safely) as layer `key`.

        With `wanted` (a background pull behind a lazy mount) the unpacked layer is
        dropped instead of adopted when `wanted()` is false by then, or when the layer
        became complete meanwhile: a complete layer may be a running container's lower
        dir and is never replaced under it."""
        tmp = self.root / f".tmp-{key[:16]}-{os.getpid()}-{threading.get_native_id()}-u"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            archive.unpack_layer(archive_path, tmp)
            if wanted is not None and (not wanted() or self.has(key)):
                return self.path(key) / "fs"
            return self.adopt_dir(key, tmp, "pulled")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _size(d: Path) -> int:
        """Bytes of file data in a layer: walked once, then remembered next to it (a
        layer never changes, and `ps`/`images` ask for every layer on every call)."""
        cached = d / "size"
        try:
            return int(cached.read_text())
        except (OSError, ValueError):
            pass
        size = sum(f.stat().st_size for f in (d / "fs").rglob("*")
                   if f.is_file() and not f.is_symlink())
        try:
            cached.write_text(str(size))
        except OSError:
            pass
        return size

    def list_keys(self) -> list[LayerInfo]:
        """Complete layers, without sizes (cheap: called for every heartbeat)."""
        out = []
        for d in self.root.iterdir():
            if not d.name.startswith(".") and (d / ".rtd-complete").exists():
                out.append(LayerInfo(self._full_key.get(d.name, d.name), d / "fs", 0, "", 0))
        return out

    def list(self) -> list[LayerInfo]:
        out = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not (d / ".rtd-complete").exists():
                continue
            size = self._size(d)
            src = (d / "source").read_text() if (d / "source").exists() else "?"
            out.append(LayerInfo(d.name, d / "fs", size, src, self._hits.get(d.name, 0)))
        return out

    def cleanup_tmp(self) -> None:
        for d in self.root.glob(".tmp-*"):
            shutil.rmtree(d, ignore_errors=True)
