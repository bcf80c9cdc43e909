"""Container cgroups: read what the kernel recorded (OOM kills, peak memory), and on
v1 hosts create, join and remove them for restores that bypass runc."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

V1_MEMORY = "/sys/fs/cgroup/memory"
V2_ROOT = "/sys/fs/cgroup"


@dataclass(frozen=True)
class MemoryReport:
    oom_kills: int
    peak_bytes: int | None
    limit_bytes: int | None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _kv(text: str | None, key: str) -> int:
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return int(parts[1])
    return 0


def memory_report(cgroup_path: str) -> MemoryReport:
    """`cgroup_path` as in the OCI spec (e.g. /runtimed/ctr-…); works on v1 and v2."""
    v1 = os.path.join(V1_MEMORY, cgroup_path.lstrip("/"))
    if os.path.isdir(v1):
        peak = _read(os.path.join(v1, "memory.max_usage_in_bytes"))
        limit = _read(os.path.join(v1, "memory.limit_in_bytes"))
        return MemoryReport(_kv(_read(os.path.join(v1, "memory.oom_control")), "oom_kill"),
                            int(peak) if peak else None, int(limit) if limit else None)
    v2 = os.path.join(V2_ROOT, cgroup_path.lstrip("/"))
    peak = _read(os.path.join(v2, "memory.peak"))
    limit = _read(os.path.join(v2, "memory.max"))
    return MemoryReport(_kv(_read(os.path.join(v2, "memory.events")), "oom_kill"),
                        int(peak) if peak else None,
                        int(limit) if limit and limit.strip().isdigit() else None)


def memory_rss(cgroup_path: str) -> int | None:
    v1 = os.path.join(V1_MEMORY, cgroup_path.lstrip("/"), "memory.usage_in_bytes")
    v = _read(v1) or _read(os.path.join(V2_ROOT, cgroup_path.lstrip("/"), "memory.current"))
    return int(v) if v else None


# -- the migration lock ------------------------------------------------------------------
FAVOR_ENV = "RUNTIMED_CGROUP_FAVORDYNMODS"


def _cgroup2_entry(mounts: str | None = None) -> tuple[str, list[str]] | None:
    for line in (mounts if mounts is not None else _read("/proc/self/mounts") or "").splitlines():
        f = line.split()
        if len(f) >= 4 and f[2] == "cgroup2":
            return f[1], f[3].split(",")
    return None


def cgroup2_mount(mounts: str | None = None) -> str | None:
    """Where a cgroup2 hierarchy is mounted (the v2 root, or `unified` on hybrid hosts)."""
    entry = _cgroup2_entry(mounts)
    return entry[0] if entry else None


def favor_dynmods(mounts: str | None = None) -> str:
    """Keep the kernel's global cgroup migration lock in its writer-friendly mode.

    Moving a task into a cgroup takes cgroup_threadgroup_rwsem for writing; in the default
    mode the first writer after an idle spell waits an RCU grace period: 25 ms measured
    here for the first write to cgroup.procs of a burst, 0.05 ms for the next ones. Every
    cold start (runc joins the new cgroups) and every restore (CRIU joins them before it
    forks the tree) pays it. The cgroup2 mount option `favordynmods` (Linux >= 6.0) keeps
    the lock in that mode for good (0.1 ms per write, measured), at the price of slightly
    slower fork/exit. The lock is global, so setting it on the hybrid `unified` mount
    covers the v1 hierarchies too. A host setting: off with RUNTIMED_CGROUP_FAVORDYNMODS=0.
    Returns what happened, for the node's log."""
    if os.environ.get(FAVOR_ENV, "1") == "0":
        return f"left as is ({FAVOR_ENV}=0)"
    found = _cgroup2_entry(mounts)
    if found is None:
        return "no cgroup2 mount to set favordynmods on"
    where, opts = found
    if "favordynmods" in opts:
        return f"favordynmods already set on {where}"
    if mounts is not None:           # a dry run on given mount text (tests)
        return f"would set favordynmods on {where}"
    import subprocess
    r = subprocess.run(["mount", "-o", "remount,favordynmods", where],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return f"favordynmods not set on {where}: {r.stderr.strip() or r.returncode}"
    return f"favordynmods set on {where}"


# -- v1 hierarchy management for restores that bypass runc (see criu_restore.py) ---------
V1_ROOT = "/sys/fs/cgroup"


@functools.cache
def v1_hierarchies() -> tuple[str, ...]:
    """Mounted v1 hierarchies (plus the hybrid `unified` one); () on a pure v2 host.
    Read once per process: asked several times on every restore, fixed after boot."""
    if os.path.exists(os.path.join(V2_ROOT, "cgroup.controllers")) or not os.path.isdir(V1_MEMORY):
        return ()
    return tuple(sorted(os.path.join(V1_ROOT, d) for d in os.listdir(V1_ROOT)
                        if os.path.exists(os.path.join(V1_ROOT, d, "cgroup.procs"))))


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _dev_rule(r: dict) -> str:
    num = lambda v: "*" if v is None or v < 0 else str(v)   # noqa: E731
    return f"{r.get('type', 'a')} {num(r.get('major'))}:{num(r.get('minor'))} {r.get('access', 'rwm')}"


def v1_create(cgroup_path: str, resources: dict) -> None:
    """Create `cgroup_path` in every v1 hierarchy and apply the OCI `linux.resources` the
    way runc's fs driver does (the subset our bundles use: memory, cpu, pids, devices)."""
    rel = cgroup_path.strip("/")
    for h in v1_hierarchies():
        d = os.path.join(h, rel)
        os.makedirs(d, exist_ok=True)
        if os.path.basename(h) == "cpuset":      # empty cpus/mems refuse every task
            parts = rel.split("/")
            for i in range(1, len(parts) + 1):
                cur, parent = os.path.join(h, *parts[:i]), os.path.join(h, *parts[:i - 1])
                for f in ("cpuset.cpus", "cpuset.mems"):
                    if not (_read(os.path.join(cur, f)) or "").strip():
                        _write(os.path.join(cur, f), _read(os.path.join(parent, f)) or "")
    mem = resources.get("memory") or {}
    md = os.path.join(V1_MEMORY, rel)
    if mem.get("limit"):
        _write(os.path.join(md, "memory.limit_in_bytes"), str(mem["limit"]))
        if mem.get("swap") and os.path.exists(os.path.join(md, "memory.memsw.limit_in_bytes")):
            _write(os.path.join(md, "memory.memsw.limit_in_bytes"), str(mem["swap"]))
    cpu = resources.get("cpu") or {}
    cd = os.path.join(V1_ROOT, "cpu", rel)
    for key, f in (("shares", "cpu.shares"), ("period", "cpu.cfs_period_us"),
                   ("quota", "cpu.cfs_quota_us")):
        if cpu.get(key):
            _write(os.path.join(cd, f), str(cpu[key]))
    if (resources.get("pids") or {}).get("limit"):
        _write(os.path.join(V1_ROOT, "pids", rel, "pids.max"), str(resources["pids"]["limit"]))
    dd = os.path.join(V1_ROOT, "devices", rel)
    for r in resources.get("devices") or []:
        _write(os.path.join(dd, "devices.allow" if r.get("allow") else "devices.deny"), _dev_rule(r))


def v1_dirs(cgroup_path: str) -> list[str]:
    """`cgroup_path`'s directory in every hierarchy (a process joins by writing its pid
    to each one's cgroup.procs; children it forks follow)."""
    return [os.path.join(h, cgroup_path.strip("/")) for h in v1_hierarchies()]


def pids_in(cgroup_path: str) -> list[int]:
    for base in (os.path.join(V1_ROOT, "pids"), os.path.join(V1_ROOT, "freezer"), V2_ROOT):
        text = _read(os.path.join(base, cgroup_path.strip("/"), "cgroup.procs"))
        if text is not None:
            return [int(p) for p in text.split()]
    return []


def v1_kill_and_remove(cgroup_path: str, timeout: float = 5.0) -> bool:
    """SIGKILL every process in the cgroup, wait for them to go, remove its directories.
    False if processes were still there at the timeout (directories then stay)."""
    import signal
    import time
    deadline = time.monotonic() + timeout
    thaw(cgroup_path)                # frozen tasks do not die of SIGKILL until thawed
    while pids := pids_in(cgroup_path):
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    for h in v1_hierarchies():
        try:
            os.rmdir(os.path.join(h, cgroup_path.strip("/")))
        except FileNotFoundError:
            pass
        except OSError:
            time.sleep(0.01)            # a zombie still being reaped: one retry
            try:
                os.rmdir(os.path.join(h, cgroup_path.strip("/")))
            except OSError:
                pass
    return True


# -- freezing before a dump ----------------------------------------------------------------
def _freezer(cgroup_path: str) -> tuple[str, str, str, str]:
    """(file to write, frozen value, thawed value, file to read) for v1 or v2."""
    rel = cgroup_path.strip("/")
    v1 = os.path.join(V1_ROOT, "freezer", rel, "freezer.state")
    if os.path.exists(v1):
        return v1, "FROZEN", "THAWED", v1
    d = os.path.join(V2_ROOT, rel)
    return os.path.join(d, "cgroup.freeze"), "1", "0", os.path.join(d, "cgroup.events")


def _is_frozen(text: str | None) -> bool:
    if text is None:
        return False
    t = text.strip()
    return t == "FROZEN" or "frozen 1" in t.splitlines()


def freeze(cgroup_path: str, timeout: float = 5.0) -> bool:
    """Freeze every task of the cgroup and wait (polling every 0.5 ms) until it is.

    CRIU freezes the cgroup itself when it is not frozen yet, but polls the freezer
    every 100 ms: its dumps waited 100 ms at FREEZING here (CRIU's log). Found frozen, it
    skips that and thaws the cgroup once it has seized the tasks. False (and thawed
    again) if it did not freeze in time; the caller's dump then freezes as before."""
    import time
    write, frozen, thawed, read = _freezer(cgroup_path)
    try:
        _write(write, frozen)
    except OSError:
        return False
    deadline = time.monotonic() + timeout
    while not _is_frozen(_read(read)):
        if time.monotonic() > deadline:
            thaw(cgroup_path)
            return False
        time.sleep(0.0005)
    return True


def thaw(cgroup_path: str) -> None:
    write, _, thawed, _ = _freezer(cgroup_path)
    try:
        _write(write, thawed)
    except OSError:
        pass                  # the cgroup is gone (container died): nothing to thaw
