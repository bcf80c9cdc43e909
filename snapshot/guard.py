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
    inet_sockets: tuple[str, ...] = field(default=())      # "tcp 127.0.0.1:7070 LISTEN", ...


def _hex_ip4(h: str) -> str:
    b = bytes.fromhex(h)
    return ".".join(str(x) for x in reversed(b))


_TCP_STATES = {"01": "ESTABLISHED", "0A": "LISTEN", "07": "CLOSE"}


def _net_rows(pid: int, names: tuple[str, ...]):
    """(table, fields) of each socket row in /proc/<pid>/net/<table> (the pid's netns)."""
    for name in names:
        try:
            lines = open(f"/proc/{pid}/net/{name}").read().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            yield name, ln.split()


def _addr(hexaddr: str) -> tuple[str, int]:
    ip, port = hexaddr.split(":")
    return (_hex_ip4(ip) if len(ip) == 8 else ip), int(port, 16)


def _inet_sockets(rows: list, inodes: set[str]) -> tuple[str, ...]:
    """The process's own inet sockets (matched by inode in its netns's tables)."""
    out = []
    for name, parts in rows:
        if len(parts) > 9 and parts[9] in inodes:
            ip, port = _addr(parts[1])
            state = _TCP_STATES.get(parts[3], parts[3]) if name.startswith("tcp") else ""
            out.append(f"{name} {ip}:{port} {state}".strip())
    return tuple(out)


def _tcp_established(rows: list) -> tuple[str, ...]:
    out = []
    for name, parts in rows:
        if name.startswith("tcp") and len(parts) > 3 and parts[3] == "01":   # ESTABLISHED
            ip, port = _addr(parts[2])
            out.append(f"{ip}:{port}")
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
        inodes = {fd[len("socket:["):-1] for fd in fds if fd.startswith("socket:[")}
        rows = list(_net_rows(pid, ("tcp", "tcp6", "udp", "udp6")))   # read once per pid
        views.append(ProcView(pid, tuple(fds), tuple(sorted(maps)), _tcp_established(rows),
                              _inet_sockets(rows, inodes) if inodes else ()))
    return views


def inet_sockets_dumpable(kernel: str, criu_version: str) -> bool:
    """CRIU 4.1 asks every socket for SO_PASSCRED; Linux 6.16+ answers EOPNOTSUPP for
    inet sockets, so CRIU < 4.2 cannot dump any TCP/UDP socket on such kernels."""
    def ver(s: str) -> tuple[int, ...]:
        nums = []
        for part in s.split(".")[:3]:
            digits = "".join(c for c in part if c.isdigit())
            nums.append(int(digits) if digits else 0)
        return tuple(nums)
    return not (ver(kernel) >= (6, 16) and ver(criu_version) < (4, 2))


def find_blockers(procs: list[ProcView], *, inet_ok: bool = True,
                  cuda_suspended: bool = False) -> list[str]:
    """Human-readable reasons this process tree must not be checkpointed (empty: fine).
    `cuda_suspended`: the CUDA processes went through cuda-checkpoint (see
    cuda_restore.guard.cuda_blockers)."""
    reasons = []
    from cuda_restore.guard import cuda_blockers
    for p in procs:
        reasons.extend(cuda_blockers(p, cuda_suspended=cuda_suspended))
        if not inet_ok:
            for sock in p.inet_sockets:
                reasons.append(f"pid {p.pid} holds an inet socket ({sock}): CRIU cannot "
                               "checkpoint TCP/UDP sockets on this host (Linux >= 6.16 with "
                               "CRIU < 4.2); open sockets in @enter() instead of before the "
                               "snapshot")
        for remote in p.tcp_established:
            ip = remote.rsplit(":", 1)[0]
            if not (ip.startswith("127.") or ip in ("0000000000000000FFFF00000100007F",
                                                    "00000000000000000000000001000000")):
                reasons.append(f"pid {p.pid} has an established TCP connection to {remote} "
                               "(close it before the snapshot point, reopen in @enter())")
    return sorted(set(reasons))
