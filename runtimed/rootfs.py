"""Overlay root filesystems: read-only layers below, one writable upper dir per container."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
MNT_DETACH = 2
MS_RDONLY = 1
MAX_OPTIONS = 4000  # overlayfs takes its options in one page


class MountError(OSError):
    pass


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode(), flags,
                     data.encode() if data is not None else None)
    if rc != 0:
        e = ctypes.get_errno()
        raise MountError(e, f"mount {fstype} on {target}: {os.strerror(e)}")


def umount(target: str, lazy: bool = True) -> None:
    rc = _libc.umount2(target.encode(), MNT_DETACH if lazy else 0)
    if rc != 0:
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOENT):   # not mounted: nothing to do
            raise MountError(e, f"umount {target}: {os.strerror(e)}")


@dataclass(frozen=True)
class OverlayPlan:
    lower: tuple[str, ...]     # top-most first, as overlayfs wants them
    upper: str
    work: str
    merged: str

    def options(self) -> str:
        opts = f"lowerdir={':'.join(self.lower)},upperdir={self.upper},workdir={self.work}"
        # index=off/xino=off: upper dirs are moved around as layers and restored by CRIU.
        opts += ",index=off,xino=off,redirect_dir=off,metacopy=off"
        if len(opts) > MAX_OPTIONS:
            raise MountError(errno.E2BIG, f"too many layers for one overlay ({len(self.lower)})")
        return opts


def plan_overlay(layers_bottom_up: list[Path], container_dir: Path) -> OverlayPlan:
    """Pure: where the overlay of `layers_bottom_up` for one container lives."""
    if not layers_bottom_up:
        raise ValueError("an overlay needs at least one lower layer")
    return OverlayPlan(
        lower=tuple(str(p) for p in reversed(layers_bottom_up)),
        upper=str(container_dir / "upper"),
        work=str(container_dir / "work"),
        merged=str(container_dir / "rootfs"),
    )


def mount_overlay(plan: OverlayPlan) -> None:
    for d in (plan.upper, plan.work, plan.merged):
        os.makedirs(d, exist_ok=True)
    mount("overlay", plan.merged, "overlay", 0, plan.options())


def teardown(container_dir: Path, keep_upper: bool = False) -> None:
    """Unmount the container's rootfs and delete its dir (or all but the upper dir)."""
    merged = container_dir / "rootfs"
    umount(str(merged))
    if keep_upper:
        shutil.rmtree(container_dir / "work", ignore_errors=True)
        shutil.rmtree(merged, ignore_errors=True)
    else:
        shutil.rmtree(container_dir, ignore_errors=True)
