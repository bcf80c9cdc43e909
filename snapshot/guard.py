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


def _inet_sockets(pid: int, inodes: set[str]) -> tuple[str, ...]:
    """The process's own inet sockets (matched by inode in its netns's tables)."""
    out = []
    for name in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = open(f"/proc/{pid}/net/{name}").read().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            parts = ln.split()
            if len(parts) > 9 and parts[9] in inodes:
                lip, lport = parts[1].split(":")
                ip = _hex_ip4(lip) if len(lip) == 8 else lip
                state = _TCP_STATES.get(parts[3], parts[3]) if name.startswith("tcp") else ""
                out.append(f"{name} {ip}:{int(lport, 16)} {state}".strip())
    return tuple(out)


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
        inodes = {fd[len("socket:["):-1] for fd in fds if fd.startswith("socket:[")}
        views.append(ProcView(pid, tuple(fds), tuple(sorted(maps)), _tcp_established(pid),
                              _inet_sockets(pid, inodes) if inodes else ()))
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
