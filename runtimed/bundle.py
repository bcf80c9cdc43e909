"""Pure construction of the OCI runtime spec (config.json) for one container.

Security defaults: a reduced capability set, no_new_privileges, masked /proc
paths, read-only /sys, its own pid/ipc/uts/mount namespaces and a network
namespace made by netns.py (joined by path, so CRIU treats it as external and a
restored container can join a fresh one), cgroup cpu/memory/pids limits.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field

# Docker's default set minus NET_RAW (no raw sockets/spoofing), MKNOD and
# AUDIT_WRITE. CHOWN/FOWNER/SETUID/SETGID stay: apt and pip need them in builds.
DEFAULT_CAPS = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
)

MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
    "/proc/scsi",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


@dataclass(frozen=True)
class BindMount:
    source: str
    destination: str
    readonly: bool = True


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to write one bundle; validated by `validate`."""

    container_id: str
    rootfs: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = "/"
    hostname: str = "runtimed"
    cpu: float = 0.125            # cores reserved: cgroup cpu shares (a weight, like Modal's request)
    cpu_limit: float = 0.0        # hard cap in cores (CFS quota); 0 = none
    memory_mb: int = 128          # 0 = unlimited
    pids_limit: int = 4096
    netns_path: str | None = None  # None: a private netns with only loopback
    binds: tuple[BindMount, ...] = ()
    cgroup_parent: str = "/runtimed"
    capabilities: tuple[str, ...] = DEFAULT_CAPS
    devices: tuple[str, ...] = ()  # extra host device nodes (GPUs), by path
    annotations: tuple[tuple[str, str], ...] = ()
    device_rules: tuple[dict, ...] = ()   # cgroup allow rules for assigned GPUs
    # Masked *directories* become read-only binds of this empty dir instead of runc's
    # tmpfs: CRIU restores every tmpfs by running tar (~5 ms each), binds are external.
    mask_dir_source: str | None = None
    extra: dict = field(default_factory=dict, compare=False)


class SpecError(ValueError):
    pass


def validate(spec: ContainerSpec) -> None:
    checks = [
        (spec.container_id.isascii() and spec.container_id.replace("-", "").isalnum(),
         "container id must be [A-Za-z0-9-]"),
        (spec.rootfs.startswith("/"), "rootfs must be an absolute path"),
        (len(spec.args) > 0, "args must not be empty"),
        (spec.cwd.startswith("/"), "cwd must be absolute"),
        (spec.cpu >= 0 and spec.cpu_limit >= 0, "cpu must be >= 0"),
        (not spec.cpu_limit or spec.cpu_limit >= spec.cpu, "cpu limit must be >= the request"),
        (spec.memory_mb == 0 or spec.memory_mb >= 16, "memory must be >= 16 MiB"),
        (all(b.destination.startswith("/") and ".." not in b.destination.split("/")
             for b in spec.binds), "bind destinations must be absolute, without '..'"),
        (all("=" not in k and k for k, _ in spec.env), "env names must be non-empty, without '='"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SpecError(msg)


# Never above the daemon's own hard limit: runc cannot raise it.
_NOFILE = min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def _resources(spec: ContainerSpec) -> dict:
    res: dict = {"devices": [{"allow": False, "access": "rwm"}] + [
        {"allow": True, "type": t, "major": ma, "minor": mi, "access": "rwm"}
        for t, ma, mi in _DEFAULT_DEVICES
    ] + list(spec.device_rules), "pids": {"limit": spec.pids_limit}}
    if spec.memory_mb:
        limit = spec.memory_mb * 1024 * 1024
        res["memory"] = {"limit": limit, "swap": limit}
    cpu: dict = {"shares": max(2, int(1024 * spec.cpu))} if spec.cpu else {}
    if spec.cpu_limit:
        cpu.update(quota=max(1000, int(spec.cpu_limit * 100_000)), period=100_000)
    if cpu:
        res["cpu"] = cpu
    return res


# null, zero, full, random, urandom, tty; and /dev/pts
_DEFAULT_DEVICES = [("c", 1, 3), ("c", 1, 5), ("c", 1, 7), ("c", 1, 8), ("c", 1, 9),
                    ("c", 5, 0), ("c", 5, 1), ("c", 5, 2), ("c", 136, -1)]


def _mounts(spec: ContainerSpec) -> list[dict]:
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]
    for d in _masked_dirs(spec):
        mounts.append({"destination": d, "type": "bind", "source": spec.mask_dir_source,
                       "options": ["bind", "nosuid", "nodev", "noexec", "ro"]})
    for b in spec.binds:
        opts = ["rbind", "nosuid", "nodev"] + (["ro"] if b.readonly else ["rw"])
        mounts.append({"destination": b.destination, "type": "bind", "source": b.source,
                       "options": opts})
    return mounts


def _masked_dirs(spec: ContainerSpec) -> list[str]:
    """Masked paths that are directories on this kernel (the container sees the same
    /proc and /sys), when the spec asks for bind masking."""
    if not spec.mask_dir_source:
        return []
    # runc refuses mounts inside /proc other than its own masks: those stay tmpfs.
    return [p for p in MASKED_PATHS if os.path.isdir(p) and not p.startswith("/proc/")]


def build_config(spec: ContainerSpec) -> dict:
    """The OCI config.json for `spec` (runc 1.1, cgroup v1 or v2)."""
    validate(spec)
    caps = list(spec.capabilities)
    net_ns: dict = {"type": "network"}
    if spec.netns_path:
        net_ns["path"] = spec.netns_path
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(spec.args),
            "env": [f"{k}={v}" for k, v in spec.env],
            "cwd": spec.cwd,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": _NOFILE, "soft": _NOFILE}],
            "noNewPrivileges": True,
            "oomScoreAdj": 500,
        },
        "root": {"path": spec.rootfs, "readonly": False},
        "annotations": dict(spec.annotations),
        "hostname": spec.hostname,
        "mounts": _mounts(spec),
        "linux": {
            "cgroupsPath": f"{spec.cgroup_parent}/{spec.container_id}",
            "resources": _resources(spec),
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "mount"}, net_ns],
            "maskedPaths": [p for p in MASKED_PATHS if p not in _masked_dirs(spec)],
            "readonlyPaths": list(READONLY_PATHS),
            "devices": [],
        },
    }
