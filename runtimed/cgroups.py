"""Read what the kernel recorded about a container's cgroup (OOM kills, peak memory)."""
from __future__ import annotations

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
