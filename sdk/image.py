"""`Image`: a chain of build steps. Each step's key hashes its parent's key and its own
content (file contents for add_local_*), so only changed steps and their descendants
rebuild. Metadata steps (env, workdir) change keys below them but add no layer.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import zstandard

from .exception import InvalidError

BASE_KEY = "base-bookworm-py311"
SUPPORTED_PYTHON = "3.11"


@dataclass(frozen=True)
class _Step:
    kind: str                       # base | run | files | meta
    desc: str
    commands: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    files_blob: bytes | None = field(default=None, repr=False, compare=False)
    files_digest: str = ""
    force: bool = False


def _key(parent: str, step: _Step) -> str:
    body = json.dumps({"parent": parent, "kind": step.kind, "commands": step.commands,
                       "env": step.env, "workdir": step.workdir, "files": step.files_digest},
                      sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def _check_remote_path(p: str) -> str:
    pp = PurePosixPath(p)
    if not pp.is_absolute() or ".." in pp.parts:
        raise InvalidError(f"image paths must be absolute and free of '..': {p!r}")
    return str(pp)


def _files_archive(entries: list[tuple[Path, str]]) -> bytes:
    """Deterministic tar.zst of (local file, remote path) pairs: same bytes for same content."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for local, remote in sorted(entries, key=lambda e: e[1]):
            parts = PurePosixPath(remote).parts[1:]
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
                    tar.addfile(ti)
            ti = tarfile.TarInfo("/".join(parts))
            data = local.read_bytes()
            ti.size, ti.mode, ti.mtime = len(data), os.stat(local).st_mode & 0o777, 0
            tar.addfile(ti, io.BytesIO(data))
    return zstandard.ZstdCompressor(level=3).compress(raw.getvalue())


class Image:
    """An immutable image definition; every method returns a new Image (as in Modal)."""

    def __init__(self, steps: tuple[_Step, ...]):
        self._steps = steps
        self.last_build: list[dict] = []     # per step: desc, status (cached|pulled|built)
        self.image_id: str | None = None

    # -- constructors ------------------------------------------------------------------------
    @staticmethod
    def debian_slim(python_version: str | None = None) -> "Image":
        if python_version not in (None, SUPPORTED_PYTHON):
            raise InvalidError(f"only Python {SUPPORTED_PYTHON} images are available "
                               f"(the host's and the base image's must match for cloudpickle)")
        return Image((_Step("base", "debian_slim (bookworm, python 3.11)"),))

    # -- steps --------------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        return dict(self._steps[-1].env)

    def _workdir(self) -> str:
        return self._steps[-1].workdir

    def _add(self, kind: str, desc: str, **kw) -> "Image":
        kw.setdefault("env", self._steps[-1].env)
        kw.setdefault("workdir", self._steps[-1].workdir)
        return Image(self._steps + (_Step(kind, desc, **kw),))

    def run_commands(self, *commands: str | list[str], force_build: bool = False) -> "Image":
        flat: list[str] = []
        for c in commands:
            flat.extend([c] if isinstance(c, str) else list(c))
        if not flat or not all(isinstance(c, str) and c.strip() for c in flat):
            raise InvalidError("run_commands needs at least one non-empty command string")
        return self._add("run", "run_commands " + "; ".join(flat)[:80],
                         commands=tuple(flat), force=force_build)

    def pip_install(self, *packages: str | list[str], index_url: str | None = None,
                    extra_index_url: str | None = None, pre: bool = False,
                    extra_options: str = "", force_build: bool = False) -> "Image":
        pkgs: list[str] = []
        for p in packages:
            pkgs.extend([p] if isinstance(p, str) else list(p))
        if not pkgs:
            return self
        args = ["python3", "-m", "pip", "install", "--no-cache-dir", "--root-user-action=ignore"]
        if index_url:
            args += ["--index-url", index_url]
        if extra_index_url:
            args += ["--extra-index-url", extra_index_url]
        if pre:
            args.append("--pre")
        cmd = shlex.join(args + sorted(pkgs)) + (f" {extra_options}" if extra_options else "")
        return self._add("run", "pip_install " + " ".join(sorted(pkgs)), commands=(cmd,),
                         force=force_build)

    def apt_install(self, *packages: str | list[str], force_build: bool = False) -> "Image":
        pkgs: list[str] = []
        for p in packages:
            pkgs.extend([p] if isinstance(p, str) else list(p))
        if not pkgs:
            return self
        cmds = ("apt-get update -qq",
                "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
                + shlex.join(sorted(pkgs)),
                "rm -rf /var/lib/apt/lists/*")
        return self._add("run", "apt_install " + " ".join(sorted(pkgs)), commands=cmds,
                         force=force_build)

    def env(self, vars: dict[str, str]) -> "Image":
        if not all(isinstance(k, str) and k and "=" not in k and isinstance(v, str)
                   for k, v in vars.items()):
            raise InvalidError("env() takes a dict of str -> str, names without '='")
        merged = dict(self._env())
        merged.update(vars)
        return self._add("meta", "env " + " ".join(sorted(vars)), env=tuple(sorted(merged.items())))

    def workdir(self, path: str) -> "Image":
        return self._add("meta", f"workdir {path}", workdir=_check_remote_path(path))

    def add_local_file(self, local_path: str | Path, remote_path: str,
                       force_build: bool = False) -> "Image":
        local = Path(local_path)
        if not local.is_file():
            raise InvalidError(f"add_local_file: {local} is not a file")
        remote = _check_remote_path(remote_path)
        if remote_path.endswith("/"):
            remote = f"{remote}/{local.name}"
        return self._files([(local, remote)], f"add_local_file {local.name} -> {remote}",
                           force_build)

    def add_local_dir(self, local_path: str | Path, remote_path: str,
                      ignore: list[str] | None = None, force_build: bool = False) -> "Image":
        local = Path(local_path)
        if not local.is_dir():
            raise InvalidError(f"add_local_dir: {local} is not a directory")
        remote = _check_remote_path(remote_path)
        skip = set(ignore or ()) | {"__pycache__", ".git"}
        entries = []
        for root, dirs, files in os.walk(local):
            dirs[:] = sorted(d for d in dirs if d not in skip)
            for f in sorted(files):
                if f in skip or f.endswith(".pyc"):
                    continue
                p = Path(root) / f
                if p.is_file():
                    entries.append((p, f"{remote}/{p.relative_to(local).as_posix()}"))
        return self._files(entries, f"add_local_dir {local.name} -> {remote}", force_build)

    def _files(self, entries: list[tuple[Path, str]], desc: str, force: bool) -> "Image":
        blob = _files_archive(entries)
        return self._add("files", desc, files_blob=blob,
                         files_digest=hashlib.sha256(blob).hexdigest(), force=force)

    # -- wire ----------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        keys, parent = [], ""
        for s in self._steps:
            k = BASE_KEY if s.kind == "base" else _key(parent, s)
            keys.append(k)
            parent = k
        return keys

    def spec(self) -> dict:
        steps = []
        for key, s in zip(self.keys(), self._steps):
            steps.append({"key": key, "kind": s.kind, "desc": s.desc, "commands": list(s.commands),
                          "env": dict(s.env), "workdir": s.workdir, "blob": s.files_digest,
                          "force": s.force})
        return {"steps": steps, "env": self._env(), "workdir": self._workdir()}

    def file_blobs(self) -> list[tuple[str, bytes]]:
        return [(s.files_digest, s.files_blob) for s in self._steps
                if s.kind == "files" and s.files_blob is not None]

    def with_force(self) -> "Image":  # pragma: no cover - convenience
        return Image(tuple(replace(s, force=True) for s in self._steps))

    def __repr__(self) -> str:
        return "Image(" + " -> ".join(s.desc.split(" ")[0] for s in self._steps) + ")"
