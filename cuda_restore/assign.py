"""Bind chosen GPUs into a container: device nodes, driver libraries, environment.

Pure planning, thin effects:
    gpu_device_nodes(minors, stat=os.stat) -> (DeviceNode, ...)    /dev/nvidia<N> + control nodes
    parse_ldconfig(text) -> (LdEntry, ...);  driver_libraries(entries) -> {soname: path}
    plan_driver_dir(libs) -> DriverDirPlan;  stage_driver_dir(plan, root) -> Path (effect)
    plan_assignment(inventory, indices, ...) -> GpuAssignment
    inject_device_nodes(root, devices) (effect: mknod into a running container's /dev)

Why late injection. A CRIU restore brings back the container's /dev tmpfs exactly as it
was dumped, so device nodes made at `runc run` would come back naming the GPUs (and
host-specific majors, nvidia-uvm's is dynamic) of the snapshot, not of this restore.
So GPU containers get (a) the cgroup device rules for their GPUs in config.json, on run
and on restore, (b) the driver directory bind-mounted read-only at DRIVER_DEST (the same
single mount on every node and driver version, as CRIU requires of external mounts), and
(c) their /dev/nvidia* nodes made by `inject_device_nodes` right before the agent lets
user code near CUDA: before `init` (no snapshot), or before `resume` (after a snapshot
point or a restore). The snapshot itself then never contains a GPU device node.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat as stat_mod
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import GpuAssignError
from .inventory import NodeGpuInventory

DRIVER_DEST = "/usr/local/nvidia/lib64"          # where containers see the driver libraries
# (path, required): without nvidiactl and nvidia-uvm, CUDA cannot initialize.
CONTROL_DEVICES = (("/dev/nvidiactl", True), ("/dev/nvidia-uvm", True),
                   ("/dev/nvidia-uvm-tools", False), ("/dev/nvidia-modeset", False))
# Driver libraries a CUDA compute + NVML container needs (nvidia-container-toolkit's
# "compute,utility" set); the first two are required.
DRIVER_LIBS = ("libcuda.so", "libnvidia-ml.so", "libnvidia-ptxjitcompiler.so",
               "libnvidia-nvvm.so", "libnvidia-gpucomp.so", "libcudadebugger.so",
               "libnvidia-cfg.so", "libnvidia-allocator.so", "libnvidia-opencl.so")
REQUIRED_LIBS = ("libcuda.so", "libnvidia-ml.so")

StatFn = Callable[[str], Any]        # os.stat: needs st_mode, st_rdev, st_uid, st_gid


@dataclass(frozen=True)
class DeviceNode:
    path: str
    major: int
    minor: int
    file_mode: int = 0o666
    uid: int = 0
    gid: int = 0

    def to_oci(self) -> dict:
        """An entry of config.json's linux.devices."""
        return {"path": self.path, "type": "c", "major": self.major, "minor": self.minor,
                "fileMode": self.file_mode, "uid": self.uid, "gid": self.gid}

    def cgroup_rule(self) -> dict:
        """An entry of config.json's linux.resources.devices (allow rw + mknod)."""
        return {"allow": True, "type": "c", "major": self.major, "minor": self.minor,
                "access": "rwm"}


def _node(path: str, st: Any) -> DeviceNode:
    if not stat_mod.S_ISCHR(st.st_mode):
        raise GpuAssignError(f"{path} is not a character device")
    return DeviceNode(path, os.major(st.st_rdev), os.minor(st.st_rdev),
                      stat_mod.S_IMODE(st.st_mode), st.st_uid, st.st_gid)


def gpu_device_nodes(minors: Iterable[int], *, stat: StatFn = os.stat) -> tuple[DeviceNode, ...]:
    """The device nodes for GPUs /dev/nvidia<minor> plus the control nodes, with the
    host's major/minor numbers. Raises GpuAssignError when a required one is missing
    (typically nvidia-uvm before `nvidia-modprobe -u -c=0` ran on the host)."""
    out = []
    wanted = [(f"/dev/nvidia{m}", True) for m in sorted(set(minors))] + list(CONTROL_DEVICES)
    for path, required in wanted:
        try:
            st = stat(path)
        except FileNotFoundError:
            if required:
                hint = " (run `nvidia-modprobe -u -c=0` on the host)" if "uvm" in path else ""
                raise GpuAssignError(f"{path} does not exist on this host{hint}") from None
            continue
        out.append(_node(path, st))
    return tuple(out)


# -- driver libraries ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LdEntry:
    soname: str          # 'libcuda.so.1'
    arch: str            # 'libc6,x86-64'
    path: str            # '/lib/x86_64-linux-gnu/libcuda.so.1'


_LD_LINE = re.compile(r"^\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(\S.*?)\s*$")


def parse_ldconfig(text: str) -> tuple[LdEntry, ...]:
    """Entries of `ldconfig -p` output; header and footer lines are ignored."""
    return tuple(LdEntry(m.group(1), m.group(2), m.group(3))
                 for m in (_LD_LINE.match(ln) for ln in text.splitlines()) if m)


def driver_libraries(entries: Iterable[LdEntry], *, arch: str = "x86-64") -> dict[str, str]:
    """{soname: path} of the NVIDIA driver libraries for `arch`. Raises GpuAssignError
    if libcuda or libnvidia-ml is missing."""
    found: dict[str, str] = {}
    for e in entries:
        if arch not in e.arch.split(","):
            continue
        if any(e.soname == lib or e.soname.startswith(lib + ".") for lib in DRIVER_LIBS):
            found.setdefault(e.soname, e.path)
    for lib in REQUIRED_LIBS:
        if not any(s.startswith(lib + ".") for s in found):
            raise GpuAssignError(f"{lib}.* is not in the host's ldconfig cache: is the NVIDIA "
                                 "driver installed (and ldconfig run)?")
    return found


def run_ldconfig() -> str:
    """`ldconfig -p` of the host ('' if it cannot run)."""
    for exe in ("/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig"):
        try:
            return subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=30,
                                  check=False).stdout
        except (OSError, subprocess.SubprocessError):
            continue
    return ""


@dataclass(frozen=True)
class DriverDirPlan:
    files: tuple[tuple[str, str], ...]     # (name in the dir, host source file)
    links: tuple[tuple[str, str], ...]     # (name, relative target) symlinks
    key: str                               # content key: names, sizes, mtimes


def plan_driver_dir(libs: Mapping[str, str], *, realpath: Callable[[str], str] = os.path.realpath,
                    stat: StatFn = os.stat) -> DriverDirPlan:
    """Each soname becomes a symlink to the real file, copied under its own name, plus
    'libcuda.so' (Triton and some loaders ask for the unversioned name)."""
    files: dict[str, str] = {}
    links: dict[str, str] = {}
    for soname, path in sorted(libs.items()):
        real = realpath(path)
        name = os.path.basename(real)
        files[name] = real
        if soname != name:
            links[soname] = name
    cuda = next((n for s, n in links.items() if s.startswith("libcuda.so.")), None)
    if cuda and "libcuda.so" not in links and "libcuda.so" not in files:
        links["libcuda.so"] = cuda
    h = hashlib.sha256()
    for name, src in sorted(files.items()):
        st = stat(src)
        h.update(f"{name}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    for name, target in sorted(links.items()):
        h.update(f"{name}->{target}\n".encode())
    return DriverDirPlan(tuple(sorted(files.items())), tuple(sorted(links.items())),
                         h.hexdigest()[:16])


def stage_driver_dir(plan: DriverDirPlan, root: Path) -> Path:
    """Materialize the plan under root/driver-<key> (hard links where the filesystem
    allows, else copies; then symlinks), atomically; reuse it if it exists."""
    dest = root / f"driver-{plan.key}"
    if (dest / ".complete").exists():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-driver-{plan.key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, src in plan.files:
            try:
                os.link(src, tmp / name)
            except OSError:
                shutil.copy2(src, tmp / name)
        for name, target in plan.links:
            os.symlink(target, tmp / name)
        (tmp / ".complete").touch()
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# -- the assignment ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuAssignment:
    """Everything one container needs to use its GPUs. Built by `plan_assignment`."""

    indices: tuple[int, ...]
    uuids: tuple[str, ...]
    devices: tuple[DeviceNode, ...]
    driver_dir: str | None = None         # host dir bind-mounted read-only at DRIVER_DEST
    driver_version: str = ""

    def binds(self) -> tuple[tuple[str, str, bool], ...]:
        """(source, destination, readonly) bind mounts, the same on run and restore."""
        return ((self.driver_dir, DRIVER_DEST, True),) if self.driver_dir else ()

    def cgroup_rules(self) -> list[dict]:
        return [d.cgroup_rule() for d in self.devices]

    def oci_devices(self) -> list[dict]:
        return [d.to_oci() for d in self.devices]

    def start_env(self, image_ld_library_path: str = "") -> tuple[tuple[str, str], ...]:
        """Env fixed at container start (the dynamic loader reads LD_LIBRARY_PATH once)."""
        ld = DRIVER_DEST + (":" + image_ld_library_path if image_ld_library_path else "")
        return (("LD_LIBRARY_PATH", ld), ("NVIDIA_DRIVER_CAPABILITIES", "compute,utility"))

    def visible_env(self) -> dict[str, str]:
        """Env the agent applies before user code touches CUDA (resume/init frame).
        UUIDs, not indices: they name the same GPUs whatever the container enumerates."""
        ids = ",".join(self.uuids)
        return {"CUDA_VISIBLE_DEVICES": ids, "NVIDIA_VISIBLE_DEVICES": ids,
                "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}

    def to_wire(self) -> dict:
        return {"indices": list(self.indices), "uuids": list(self.uuids),
                "devices": [d.to_oci() for d in self.devices], "driver_dir": self.driver_dir,
                "driver_version": self.driver_version}

    @staticmethod
    def from_wire(d: dict) -> GpuAssignment:
        return GpuAssignment(tuple(d["indices"]), tuple(d["uuids"]), tuple(
            DeviceNode(x["path"], x["major"], x["minor"], x.get("fileMode", 0o666),
                       x.get("uid", 0), x.get("gid", 0)) for x in d["devices"]),
            d.get("driver_dir"), d.get("driver_version", ""))


def plan_assignment(inventory: NodeGpuInventory, indices: Iterable[int], *,
                    driver_dir: str | None, stat: StatFn = os.stat) -> GpuAssignment:
    """The assignment of GPUs `indices` (NVML indices from a Placement) on this host."""
    idx = tuple(indices)
    if not idx:
        raise GpuAssignError("no GPUs to assign")
    try:
        gpus = [inventory.gpu(i) for i in idx]
    except KeyError as e:
        raise GpuAssignError(f"{e.args[0]} (inventory: {inventory.summary()})") from None
    devices = gpu_device_nodes([g.device_minor for g in gpus], stat=stat)
    return GpuAssignment(idx, tuple(g.uuid for g in gpus), devices, driver_dir,
                         inventory.driver_version)


_GPU_NODE = re.compile(r"nvidia\d+")


def inject_device_nodes(root: str, devices: Iterable[DeviceNode], *,
                        remove_stale: bool = True) -> list[str]:
    """Create `devices` under `root`/dev (root: '/proc/<pid>/root' of a running or restored
    container; needs CAP_MKNOD, i.e. the root daemon). A node already there with the right
    numbers is kept; anything else at that name is replaced. With `remove_stale`, GPU nodes
    (/dev/nvidia<N>) not in `devices` are removed: a restore brings back /dev as dumped,
    with the snapshot's GPUs in it. Path components inside the container are never
    followed as symlinks. Returns the paths made."""
    made = []
    devices = list(devices)
    for d in devices:
        if not d.path.startswith("/dev/") or "/" in d.path[len("/dev/"):]:
            raise GpuAssignError(f"refusing to inject {d.path}: not directly under /dev")
    dfd = os.open(os.path.join(root, "dev"), os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        if remove_stale:
            wanted = {d.path[len("/dev/"):] for d in devices}
            with os.scandir(f"/proc/self/fd/{dfd}") as it:
                stale = [e.name for e in it if _GPU_NODE.fullmatch(e.name) and e.name not in wanted]
            for name in stale:
                try:
                    os.unlink(name, dir_fd=dfd)
                except OSError:
                    pass        # not a node (the container made a dir there): no GPU anyway
        for d in devices:
            name = d.path[len("/dev/"):]
            rdev = os.makedev(d.major, d.minor)
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat_mod.S_ISCHR(st.st_mode) and st.st_rdev == rdev:
                    continue
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                pass
            os.mknod(name, stat_mod.S_IFCHR | 0o600, rdev, dir_fd=dfd)
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dfd)
            try:     # chmod/chown through the O_PATH fd: no umask, no race on the name
                os.chmod(f"/proc/self/fd/{fd}", d.file_mode)
                os.chown(f"/proc/self/fd/{fd}", d.uid, d.gid)
            finally:
                os.close(fd)
            made.append(d.path)
    finally:
        os.close(dfd)
    return made
