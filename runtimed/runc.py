"""A thin adapter over the `runc` binary: the only place that spawns it."""
from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

RUNC_ROOT = "/run/runtimed/runc"


class RuncError(RuntimeError):
    pass


@dataclass(frozen=True)
class Runc:
    binary: str = "runc"
    root: str = RUNC_ROOT
    criu: str | None = None
    restore_env: dict | None = None    # see criu_env.restore_env
    dump_env: dict | None = None       # see criu_env.dump_env

    def _base(self) -> list[str]:
        return [self.binary, "--root", self.root]

    async def _run(self, *args: str, log: Path | None = None, **kw) -> str:
        cmd = self._base() + (["--log", str(log)] if log else []) + list(args)
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, **kw)
        out, err = await proc.communicate()
        if proc.returncode != 0:
            detail = err.decode(errors="replace").strip()
            if log and log.exists():
                detail += "\n" + _tail_log(log)
            raise RuncError(f"runc {args[0]} failed ({proc.returncode}): {detail[-2000:]}")
        return out.decode()

    async def run_detached(self, container_id: str, bundle: Path, stdin: int, stdout: int,
                           stderr: int) -> None:
        """Start the container with the given fds as its stdio (pipes, so CRIU can dump them)."""
        os.makedirs(self.root, exist_ok=True)
        log = bundle / "runc.log"
        cmd = self._base() + ["--log", str(log), "run", "-d", "--bundle", str(bundle),
                              "--pid-file", str(bundle / "pid"), container_id]
        proc = await asyncio.create_subprocess_exec(*cmd, stdin=stdin, stdout=stdout,
                                                    stderr=stderr)
        rc = await proc.wait()
        if rc != 0:
            raise RuncError(f"runc run failed ({rc}): {_tail_log(log)}")

    async def checkpoint(self, container_id: str, image_dir: Path, work_dir: Path, *,
                         leave_running: bool = True) -> None:
        """CRIU dump of the running container into image_dir (runc --criu our CRIU 4.x)."""
        work_dir.mkdir(parents=True, exist_ok=True)
        args = ["checkpoint", "--image-path", str(image_dir), "--work-path", str(work_dir)]
        if leave_running:
            args.append("--leave-running")
        try:
            await self._run(*self._criu_flag(), *args, container_id, env=self.dump_env)
        except RuncError as e:
            raise RuncError(f"{e}\n{criu_log_tail(work_dir / 'dump.log')}") from None

    async def restore_detached(self, container_id: str, bundle: Path, image_dir: Path,
                               work_dir: Path, stdin: int, stdout: int, stderr: int,
                               lazy: bool = False) -> None:
        """`runc restore -d`: the restored process gets these fds as its stdio pipes
        (runc passes them to CRIU as inherit-fd for the pipes it recorded at dump)."""
        work_dir.mkdir(parents=True, exist_ok=True)
        log = bundle / "runc.log"
        cmd = self._base() + ["--log", str(log)] + self._criu_flag() + [
            "restore", "-d", *(["--lazy-pages"] if lazy else []),
            "--bundle", str(bundle), "--image-path", str(image_dir),
            "--work-path", str(work_dir), "--pid-file", str(bundle / "pid"), container_id]
        proc = await asyncio.create_subprocess_exec(*cmd, stdin=stdin, stdout=stdout,
                                                    stderr=stderr, env=self.restore_env)
        rc = await proc.wait()
        if rc != 0:
            raise RuncError(f"runc restore failed ({rc}): {_tail_log(log)}\n"
                            f"{criu_log_tail(work_dir / 'restore.log')}")

    def _criu_flag(self) -> list[str]:
        return ["--criu", self.criu] if self.criu else []

    async def kill(self, container_id: str, signal: str = "KILL") -> None:
        try:
            await self._run("kill", "--all", container_id, signal)
        except RuncError:
            pass  # already gone

    async def delete(self, container_id: str) -> None:
        try:
            await self._run("delete", "--force", container_id)
        except RuncError as e:
            if "does not exist" not in str(e):
                raise

    async def state(self, container_id: str) -> dict | None:
        try:
            return json.loads(await self._run("state", container_id))
        except RuncError:
            return None

    async def list_ids(self) -> list[str]:
        try:
            out = await self._run("list", "--format", "json")
        except RuncError:
            return []
        return [c["id"] for c in json.loads(out or "null") or []]


def criu_log_tail(path: Path, n: int = 12) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errs = [ln for ln in lines if "Error" in ln or "err" in ln.lower()][-n:]
    return "criu: " + "\n".join(errs or lines[-n:])


def _tail_log(log: Path, n: int = 8) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return ""
    msgs = []
    for line in lines:
        try:
            msgs.append(json.loads(line).get("msg", line))
        except ValueError:
            msgs.append(line)
    return " | ".join(msgs)
