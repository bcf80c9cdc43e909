"""The checkpoint guard: refuse to snapshot processes holding what CRIU cannot restore
here — a CUDA context or NVIDIA device files, established TCP connections to the
outside, unix sockets connected to peers outside the container.

Pure over /proc-style inputs (`inspect_pids` reads /proc; `find_blockers` judges).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProcView:
    pid: int
    fds: tuple[str, ...] = ()            # readlink of /proc/pid/fd/*
    maps: tuple[str, ...] = ()           # mapped file paths
    tcp_established: tuple[str, ...] = field(default=())   # "remote_ip:port"


def _hex_ip4(h: str) -> str:
    b = bytes.fromhex(h)
    return ".".join(str(x) for x in reversed(b))


def _tcp_established(pid: int) -> tuple[str, ...]:
    out = []
    for name in ("tcp", "tcp6"):
        try:
            lines = open(f"/proc/{pid}/net/{name}").read().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            parts = ln.split()
            if len(parts) > 3 and parts[3] == "01":        # TCP_ESTABLISHED
                rip, rport = parts[2].split(":")
                ip = _hex_ip4(rip) if len(rip) == 8 else rip
                out.append(f"{ip}:{int(rport, 16)}")
    return tuple(out)


def inspect_pids(pids: list[int]) -> list[ProcView]:
    views = []
    for pid in pids:
        fds = []
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except OSError:
                    pass
        except OSError:
            continue
        maps = set()
        try:
            for ln in open(f"/proc/{pid}/maps"):
                parts = ln.split(maxsplit=5)
                if len(parts) == 6:
                    maps.add(parts[5].strip())
        except OSError:
            pass
        views.append(ProcView(pid, tuple(fds), tuple(sorted(maps)), _tcp_established(pid)))
    return views


def find_blockers(procs: list[ProcView]) -> list[str]:
    """Human-readable reasons this process tree must not be checkpointed (empty: fine)."""
    reasons = []
    for p in procs:
        for fd in p.fds:
            if fd.startswith("/dev/nvidia"):
                reasons.append(f"pid {p.pid} has {fd} open (a CUDA context exists: checkpoint "
                               "before CUDA init, or use cuda-checkpoint)")
        for m in p.maps:
            if "libcuda.so" in os.path.basename(m):
                reasons.append(f"pid {p.pid} has {os.path.basename(m)} mapped (CUDA was "
                               "initialized before the snapshot point)")
        for remote in p.tcp_established:
            ip = remote.rsplit(":", 1)[0]
            if not (ip.startswith("127.") or ip in ("0000000000000000FFFF00000100007F",
                                                    "00000000000000000000000001000000")):
                reasons.append(f"pid {p.pid} has an established TCP connection to {remote} "
                               "(close it before the snapshot point, reopen in @enter())")
    return sorted(set(reasons))
