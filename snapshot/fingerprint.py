"""The compatibility fingerprint of this host.

A CRIU image restores only where the kernel, CRIU, runc, architecture and CPU
features match the host it was dumped on (a restored process may already have
chosen code paths by CPUID, e.g. AVX-512 memcpy). ``Fingerprint.incompatibility``
compares two fingerprints; this module only reads the local one.
"""
from __future__ import annotations

import hashlib
import platform
from pathlib import Path

from snapshot.manifest import Fingerprint

__all__ = ["cpu_flags_sha", "current_fingerprint"]


def cpu_flags_sha(cpuinfo: str) -> str:
    """First 16 hex of sha256 over the sorted feature flags of the first CPU.

    x86 names the line ``flags``, arm64 ``Features``. Empty string hashes when
    neither is present (e.g. a sandbox hiding /proc/cpuinfo): every such host
    then looks alike, which is the best we can say.
    """
    flags: list[str] = []
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in ("flags", "Features"):
            flags = value.split()
            break  # first CPU only: all CPUs of a host report the same flags
    return hashlib.sha256(" ".join(sorted(set(flags))).encode()).hexdigest()[:16]


def current_fingerprint(criu_version: str, runc_version: str, *,
                        cpuinfo_path: Path = Path("/proc/cpuinfo")) -> Fingerprint:
    """This host's fingerprint; CRIU and runc versions come from the caller,
    who already ran the binaries (``criu --version``, ``runc --version``)."""
    try:
        cpuinfo = cpuinfo_path.read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    uname = platform.uname()
    return Fingerprint(kernel=uname.release, criu_version=criu_version,
                       cpu_flags_sha=cpu_flags_sha(cpuinfo), runc_version=runc_version,
                       arch=uname.machine)
