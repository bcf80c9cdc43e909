"""Restore a runc checkpoint by driving CRIU directly, without `runc restore`.

Why: on this kind of host `runc restore` of a small Python container spends 40-65 ms
around CRIU itself (measured with wrappers timing each exec; docs/design.md, "Restore
latency"): Go start-up, a second CRIU process only to read CRIU's version, cgroup setup
through its manager, bind mounts into the rootfs, state bookkeeping after. The restore
proper is one `criu restore` with the options runc would have derived from the bundle's
config.json; this module derives the same ones:

- the container's mounts that runc recorded as external at checkpoint (bind mounts,
  the default device nodes, /dev/null for masked files) map back to host paths;
- the network namespace, recorded as external `extRootNetNS`, is inherited from our
  pre-made netns; the stdio pipes recorded in descriptors.json are inherited from the
  fresh pipes we give CRIU as its own stdio;
- CRIU runs inside the container's cgroups (created from `linux.resources`, v1 hosts
  only), so the restored tree lands there, and `--restore-sibling` makes the restored
  init our child.

The container is then unknown to runc: `kill`/`destroy` go through its cgroup
(cgroups.v1_kill_and_remove). Pure v2 hosts keep `runc restore` (devices there need
eBPF programs, which runc writes).
"""
from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import cgroups, criu_env
from .runc import criu_log_tail

# runc adds these device nodes to every container and records them as external mounts.
DEFAULT_DEVICES = ("/dev/null", "/dev/random", "/dev/full", "/dev/tty", "/dev/zero",
                   "/dev/urandom")
NETNS_KEY = "extRootNetNS"
JOIN_FAILED = 97
JOIN_AND_EXEC = ('for d in $RUNTIMED_CGROUP_DIRS; do echo $$ > "$d/cgroup.procs" || exit 97; done; '
                 'unset RUNTIMED_CGROUP_DIRS; exec "$@"')


class DirectRestoreError(RuntimeError):
    pass


ENGINES = ("auto", "criu", "runc")


def available(engine: str = "auto") -> bool:
    """Whether restores bypass runc: they need v1 cgroups (see the module doc); the node's
    `restore_engine` (or RUNTIMED_RESTORE_ENGINE) "runc" turns it off."""
    if engine == "runc" or os.environ.get("RUNTIMED_RESTORE_ENGINE") == "runc":
        return False
    return bool(cgroups.v1_hierarchies())


@dataclass(frozen=True)
class RestorePlan:
    """Everything `criu restore` needs, derived from config.json + the image dir."""

    image_dir: Path
    work_dir: Path
    rootfs: str
    pidfile: Path
    cgroup_path: str
    resources: dict
    netns_path: str | None
    ext_mounts: tuple[tuple[str, str], ...]     # (cookie recorded at dump, host path)
    stdio: tuple[str, ...]                      # what fds 0, 1, 2 were at dump (pipe:[ino])
    mountpoints: tuple[tuple[str, bool], ...]   # (path in rootfs, is_dir) to create
    lazy: bool = False
    config_file: str | None = None


def plan(config: dict, image_dir: Path, work_dir: Path, pidfile: Path, *,
         lazy: bool = False) -> RestorePlan:
    linux = config.get("linux", {})
    mounts = config.get("mounts", [])
    tmpfs = [m["destination"] for m in mounts if m.get("type") == "tmpfs"]
    binds = [m for m in mounts if m.get("type") == "bind"]
    ext = [(m["destination"], m["source"]) for m in binds]
    if linux.get("maskedPaths"):
        ext.append(("/dev/null", "/dev/null"))
    ext += [(d, d) for d in DEFAULT_DEVICES]
    # CRIU mounts external binds onto existing mountpoints; runc made them at first start,
    # in the upper dir we restored, unless they live on a tmpfs CRIU recreates itself.
    points = tuple((m["destination"], os.path.isdir(m["source"])) for m in binds
                   if not any(m["destination"].startswith(t + "/") for t in tmpfs))
    netns = next((n.get("path") for n in linux.get("namespaces", [])
                  if n.get("type") == "network"), None)
    try:
        stdio = tuple(json.loads((image_dir / "descriptors.json").read_text()))
    except (OSError, ValueError) as e:
        raise DirectRestoreError(f"snapshot has no readable descriptors.json: {e}") from None
    return RestorePlan(
        image_dir=image_dir, work_dir=work_dir, rootfs=config["root"]["path"],
        pidfile=pidfile, cgroup_path=linux.get("cgroupsPath", ""),
        resources=linux.get("resources", {}), netns_path=netns, ext_mounts=tuple(ext),
        stdio=stdio, mountpoints=points, lazy=lazy,
        config_file=config.get("annotations", {}).get("org.criu.config"))


def log_level() -> int:
    """CRIU writes every -v4 line with its own write(2): ~8000 lines for a 80 MB Python
    snapshot, in the restore's critical path. Errors and warnings (-v2) unless asked, or
    unless logs are being kept for profiling (RUNTIMED_KEEP_CRIU_LOGS)."""
    if os.environ.get("RUNTIMED_CRIU_LOG_LEVEL", "").isdigit():
        return int(os.environ["RUNTIMED_CRIU_LOG_LEVEL"])
    return 4 if criu_env.keeping_logs() else 2


def argv(criu: str, p: RestorePlan, netns_fd: int | None) -> list[str]:
    args = [criu, "restore", "--images-dir", str(p.image_dir), "--work-dir", str(p.work_dir),
            "--root", p.rootfs, "--restore-detached", "--restore-sibling",
            "--pidfile", str(p.pidfile), "--manage-cgroups=ignore", "--evasive-devices",
            "--ghost-limit", "1048576", f"-v{log_level()}", "-o", "restore.log"]
    if p.config_file:
        args[1:1] = ["--config", p.config_file]
    for cookie, host in p.ext_mounts:
        args += ["--external", f"mnt[{cookie}]:{host}"]
    if netns_fd is not None:
        args += ["--inherit-fd", f"fd[{netns_fd}]:{NETNS_KEY}", "--empty-ns", "net"]
    for i, name in enumerate(p.stdio[:3]):
        if name.startswith("pipe:"):
            args += ["--inherit-fd", f"fd[{i}]:{name}"]
    if p.lazy:
        args.append("--lazy-pages")
    return args


def _make_mountpoints(p: RestorePlan) -> None:
    root = os.path.realpath(p.rootfs)
    for dest, is_dir in p.mountpoints:
        target = os.path.realpath(os.path.join(root, dest.lstrip("/")))
        if os.path.commonpath([root, target]) != root:
            raise DirectRestoreError(f"mount destination {dest!r} escapes the rootfs")
        if os.path.lexists(target):
            continue
        if is_dir:
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()


def _prepare(p: RestorePlan) -> None:
    _make_mountpoints(p)
    cgroups.v1_create(p.cgroup_path, p.resources)


@dataclass
class Restoring:
    """A restore whose tasks exist (pid known) while CRIU may still be finishing."""

    pid: int
    exited: "asyncio.Task[None]"      # CRIU's exit; raises DirectRestoreError if it failed


async def restore(criu: str, p: RestorePlan, stdin: int, stdout: int, stderr: int, *,
                  env: dict | None = None) -> Restoring:
    """Run `criu restore` and return once the restored tree exists. CRIU writes the pid
    file after restoring every task, then unlocks the network, finalizes and resumes the
    tasks, and exits. The agent answers nothing before it is resumed, so the caller can
    send it the resume frame now instead of also waiting for CRIU's exit and reaping
    (~5-15 ms measured); `exited` reports a late failure. The cgroup is left behind on
    error for the caller's cleanup (it owns the container's lifetime either way)."""
    p.work_dir.mkdir(parents=True, exist_ok=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, _prepare, p)      # one executor hop, not two
    netns_fd = os.open(p.netns_path, os.O_RDONLY | os.O_CLOEXEC) if p.netns_path else None
    # CRIU must already be in the container's cgroups when it forks the restored tree. A
    # preexec_fn would do it in Python, but forces fork() of this large daemon instead of
    # vfork (~25 ms measured); a shell joins them and execs CRIU instead (~1 ms).
    env = dict(env if env is not None else os.environ)
    env["RUNTIMED_CGROUP_DIRS"] = " ".join(cgroups.v1_dirs(p.cgroup_path))
    try:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", JOIN_AND_EXEC, "criu-restore", *argv(criu, p, netns_fd),
            stdin=stdin, stdout=stdout, stderr=stderr,
            pass_fds=(netns_fd,) if netns_fd is not None else (), env=env,
            cwd=str(p.work_dir))
    finally:
        if netns_fd is not None:
            os.close(netns_fd)
    exited = asyncio.create_task(_exit_status(proc, p))
    while True:
        try:
            return Restoring(int(p.pidfile.read_text()), exited)
        except (OSError, ValueError):         # not written yet (or half written)
            pass
        if exited.done():
            exited.result()                    # raises the failure
            raise DirectRestoreError("criu restore exited without writing a pid file")
        await asyncio.sleep(0.0005)


async def _exit_status(proc: asyncio.subprocess.Process, p: RestorePlan) -> None:
    rc = await proc.wait()
    if rc == JOIN_FAILED:
        raise DirectRestoreError(f"could not join the container's cgroups {p.cgroup_path}")
    if rc != 0:
        raise DirectRestoreError(f"criu restore failed ({rc}):\n"
                                 f"{criu_log_tail(p.work_dir / 'restore.log')}")
