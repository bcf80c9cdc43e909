"""Make CRIU fast on this kind of host, without changing the host for anyone else.

Two measured costs of `runc restore` here (see docs/design.md, "Restore latency"):

1. CRIU caches its kernel feature probe ("kerndat": iptables, ip6tables, mount and
   ptrace checks) in /run/criu.kdat, but only saves it when /run is a tmpfs. On
   these hosts /run is ext4, so every CRIU run re-probes (~30-40 ms). CRIU *loads*
   the cache from any filesystem, so we generate it once per daemon start in a
   private mount namespace with a tmpfs on /run and copy it out.
2. CRIU locks and unlocks the container's network with `iptables-restore` and
   `ip6tables-restore`, each an nf_tables commit that waits for an RCU grace period
   here (6-16 ms each, measured in a fresh netns; ~70 ms per dump in CRIU's log). The
   lock only guards TCP connections being dumped, and the snapshot guard refuses those
   (and all inet sockets where CRIU cannot restore them); restores join a namespace
   the node made fresh, never locked. So CRIU's PATH starts with a dir holding no-op
   `ip(6)tables-restore` for dumps and restores (dumps are also patched to skip the
   lock at restore: snapshot/criu_image.py).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)
KDAT = Path("/run/criu.kdat")


def refresh_kdat_cache(criu: str) -> bool:
    """(Re)generate /run/criu.kdat for this kernel; False if it could not be made."""
    if not os.path.exists(criu):
        return False
    tmp = Path("/dev/shm/runtimed-criu.kdat")
    script = (f"mount -t tmpfs none /run && {criu} check >/dev/null 2>&1; "
              f"cp /run/criu.kdat {tmp}")
    try:
        subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, timeout=60)
        if tmp.exists():
            staged = KDAT.with_name(f".criu.kdat.{os.getpid()}")
            shutil.copyfile(tmp, staged)
            os.replace(staged, KDAT)  # same content for every node on this kernel
            tmp.unlink(missing_ok=True)
            return True
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("could not build the CRIU kerndat cache: %s", e)
    return False


UNTAR_SRC = Path(__file__).resolve().parent.parent / "snapshot" / "native" / "untar.c"


UNTAR_CACHE = Path("/var/cache/runtimed")


def build_untar(bindir: Path = UNTAR_CACHE) -> Path | None:
    """Compile snapshot/native/untar.c (cached by source hash); None without gcc/zlib.
    CRIU refills each tmpfs of a restored container with `tar --extract --gzip`; GNU tar
    costs a fork+exec of gzip on top of its own (~4-6 ms per tmpfs, three per restore)."""
    import hashlib
    try:
        src = UNTAR_SRC.read_bytes()
    except OSError:
        return None
    bindir.mkdir(parents=True, exist_ok=True)
    out = bindir / f"untar-{hashlib.sha256(src).hexdigest()[:12]}"
    if out.exists():
        return out
    tmp = out.with_name(out.name + f".{os.getpid()}")
    cmd = ["gcc", "-O2", "-static", "-o", str(tmp), str(UNTAR_SRC), "-lz"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("untar not built (%s): CRIU restores use GNU tar", e)
        return None
    if r.returncode != 0:
        log.warning("untar not built: CRIU restores use GNU tar\n%s", r.stderr[-1000:])
        return None
    os.replace(tmp, out)
    return out


def restore_env(state_dir: Path) -> dict[str, str]:
    """Environment for CRIU restores: PATH with the no-op network-lock tools and the
    fast tmpfs extractor (build_untar) first."""
    untar = build_untar()
    return _env_with(state_dir / "criu-restore-bin", {"tar": str(untar) if untar else None})


def dump_env(state_dir: Path) -> dict[str, str]:
    """Environment for `runc checkpoint` (CRIU inherits it): the no-op network-lock tools
    first; dumps keep GNU tar (they create archives)."""
    return _env_with(state_dir / "criu-dump-bin", {})


def _env_with(bindir: Path, extra: dict[str, str | None]) -> dict[str, str]:
    """os.environ with `bindir` first on PATH, holding links to `true` for
    ip(6)tables-restore plus `extra` (name -> target; None: no link).
    CRIU writes the rules into a pipe and closes it before it runs the tool (net.c,
    iptables_restore), so the no-op need not read them: a link to `true` (one exec,
    ~1 ms) instead of a shell that drains stdin (sh + cat, ~3 ms)."""
    bindir.mkdir(parents=True, exist_ok=True)
    true = shutil.which("true") or "/bin/true"
    links = {"iptables-restore": true, "ip6tables-restore": true, **extra}
    for name in links:
        p = bindir / name
        want = links.get(name)
        if want is None:
            p.unlink(missing_ok=True)
        elif not (p.is_symlink() and os.readlink(p) == want):
            tmp = bindir / f".{name}.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(want)
            os.replace(tmp, p)
    env = dict(os.environ)
    env["PATH"] = f"{bindir}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    return env


KEEP_LOGS_ENV = "RUNTIMED_KEEP_CRIU_LOGS"      # a dir: CRIU's logs are kept there (profiling)


def keeping_logs() -> bool:
    return bool(os.environ.get(KEEP_LOGS_ENV))


def keep_log(src: Path, name: str, *, move: bool = True) -> bool:
    """Put the CRIU log `src` into $RUNTIMED_KEEP_CRIU_LOGS as `name`; False when logs are
    not being kept or `src` does not exist."""
    keep = os.environ.get(KEEP_LOGS_ENV)
    if not keep or not src.exists():
        return False
    os.makedirs(keep, exist_ok=True)
    (os.replace if move else shutil.copy)(src, os.path.join(keep, name))
    return True
