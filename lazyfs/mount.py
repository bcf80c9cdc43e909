"""Mounting a layer lazily: specs, the mount server process, and unmounting.

The node daemon calls `mount_layer(...)` (or `mount(MountSpec)`): it starts
`python -m lazyfs serve` in its own session, hands it the spec (token included) on stdin so
no secret shows in `ps`, and returns once the FUSE mount is visible in /proc/self/mountinfo.
The server opens the source, fetches and verifies the TOC before mounting, so a bad blob
or a wrong TOC digest fails here with the server's error, not later in a container.
`unmount()` runs `fusermount3 -u` (then `umount -l` if the mount is busy past the
timeout) and waits for the server to exit.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .blobsource import (
    BlobSource,
    DispatcherBlobSource,
    FileBlobSource,
    RegistryBlobSource,
    RetryPolicy,
)
from .errors import MountError

__all__ = [
    "MountHandle",
    "MountSpec",
    "SourceSpec",
    "is_mounted",
    "mount",
    "mount_layer",
    "open_source",
    "spawn_server",
    "unmount",
]

DEFAULT_CACHE = "/var/lib/runtimed/lazyfs-cache"


@dataclass(frozen=True)
class SourceSpec:
    """Where the blob is. kind: 'file' (location = path), 'registry' (location = base URL,
    name = repository), 'dispatcher' (location = dispatcher URL, token = bearer token)."""

    kind: str
    location: str
    digest: str = ""                     # sha256:... of the blob (registry, dispatcher)
    name: str = ""
    token: str = field(default="", repr=False)
    size: int | None = None              # from the layer descriptor: saves a HEAD request
    attempts: int = 4
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.kind not in ("file", "registry", "dispatcher"):
            raise ValueError(f"unknown source kind {self.kind!r}")
        if self.kind != "file" and not self.digest:
            raise ValueError(f"a {self.kind} source needs the blob digest")
        if self.kind == "registry" and not self.name:
            raise ValueError("a registry source needs the repository name")


def open_source(spec: SourceSpec) -> BlobSource:
    retry = RetryPolicy(attempts=spec.attempts, timeout=spec.timeout_s)
    if spec.kind == "file":
        return FileBlobSource(spec.location)
    if spec.kind == "registry":
        return RegistryBlobSource(spec.location, spec.name, spec.digest, token=spec.token,
                                  size=spec.size, retry=retry)
    return DispatcherBlobSource(spec.location, spec.digest, spec.token, size=spec.size,
                                retry=retry)


@dataclass(frozen=True)
class MountSpec:
    """One lazy mount. `toc_digest` (the layer descriptor's toc.digest annotation) makes
    the TOC verified; without it the TOC is only checked for consistency."""

    source: SourceSpec
    mountpoint: str
    toc_digest: str | None = None
    cache_dir: str = DEFAULT_CACHE
    record_path: str | None = None       # access record JSON (see view.Recorder)
    status_path: str | None = None       # status JSON, rewritten while serving
    prefetch: bool = True                # prioritized area in the background
    fetch_all: bool = False              # then everything else, too
    view_dir: str | None = None          # meta tree (+ working-set data) for a view, metatree.py
    workset: bool = True                 # with view_dir: write the prefetched files' data
    workset_only: bool = False           # ... and their chunks not in the chunk cache
    allow_other: bool = True
    log_path: str | None = None          # set by mount() for a spare server: its log
    # the layer's meta tree as an EROFS image published beside the blob (same source kind
    # and place, checked against this digest), fetched instead of built (metaimage.py)
    meta_digest: str | None = None
    meta_size: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> MountSpec:
        d = json.loads(text)
        return cls(**{**d, "source": SourceSpec(**d["source"])})


def is_mounted(mountpoint: str | os.PathLike) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].replace("\\040", " ") == target:
                return True
    return False


@dataclass
class MountHandle:
    """A running lazy mount. `status()` reads the server's status file."""

    spec: MountSpec
    proc: subprocess.Popen
    log_path: Path

    @property
    def mountpoint(self) -> str:
        return self.spec.mountpoint

    def status(self) -> dict:
        if not self.spec.status_path:
            return {}
        try:
            return json.loads(Path(self.spec.status_path).read_text())
        except (OSError, ValueError):
            return {}

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def unmount(self, timeout: float = 10.0) -> None:
        unmount(self.mountpoint, timeout=timeout)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(timeout=5)


def _server_env() -> dict[str, str]:
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _start_server(log_path: str, python: str) -> subprocess.Popen:
    with open(log_path, "ab") as logf:
        return subprocess.Popen([python, "-m", "lazyfs", "serve"], stdin=subprocess.PIPE,
                                stdout=logf, stderr=subprocess.STDOUT, env=_server_env(),
                                start_new_session=True)


def spawn_server(cache_dir: str = DEFAULT_CACHE, *, python: str = sys.executable
                 ) -> subprocess.Popen:
    """A spare mount server: `python -m lazyfs serve` started now, which does its imports
    and then waits for a MountSpec on stdin; `mount(spec, server=it)` hands it one and so
    saves the interpreter start and imports (~0.3 s of a mount on a 2-core node). Closing
    its stdin unused makes it exit (so does its owner's death)."""
    logs = Path(cache_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return _start_server(str(logs / "spare.log"), python)


def mount(spec: MountSpec, *, timeout: float = 60.0, log_path: str | None = None,
          python: str = sys.executable, server: subprocess.Popen | None = None
          ) -> MountHandle:
    """Start the mount server for `spec` (or hand it to the spare `server`, see
    spawn_server); return when the FUSE mount is live.

    The server logs to `log_path` (default CACHE_DIR/logs/mount-<hash of mountpoint>.log).

    Raises MountError carrying the server's own error (bad blob, TOC digest mismatch,
    unreachable source) if it exits first, or if the mount does not appear in `timeout`.
    """
    mp = Path(spec.mountpoint)
    if not mp.is_dir():
        raise MountError(f"mountpoint {mp} is not a directory")
    if is_mounted(mp):
        raise MountError(f"{mp} is already a mountpoint")
    if log_path is None:        # default: next to the node's chunk cache, one per mountpoint
        logs = Path(spec.cache_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        tag = hashlib.sha256(str(mp.resolve()).encode()).hexdigest()[:12]
        log_path = str(logs / f"mount-{tag}.log")
    if server is not None and server.poll() is None:
        proc = server
        spec = replace(spec, log_path=log_path)       # it redirects its output there
    else:
        proc = _start_server(log_path, python)
    assert proc.stdin is not None
    try:
        proc.stdin.write(spec.to_json().encode())
        proc.stdin.close()
    except BrokenPipeError:          # the spare died after all: start one as before
        proc = _start_server(log_path, python)
        assert proc.stdin is not None
        proc.stdin.write(replace(spec, log_path=None).to_json().encode())
        proc.stdin.close()
    handle = MountHandle(spec, proc, Path(log_path))
    deadline = time.monotonic() + timeout
    while not is_mounted(mp):
        if proc.poll() is not None:
            raise MountError(f"lazy mount of {spec.source.kind} blob at {mp} failed: "
                             f"{_last_error(handle.log_tail())}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise MountError(f"lazy mount at {mp} did not appear in {timeout:.0f}s:\n"
                             f"{handle.log_tail()}")
        time.sleep(0.005)            # the start waits on this: ~2.5 ms late on average
    return handle


def _last_error(tail: str) -> str:
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower()]
    return (errs or lines or ["(no output)"])[-1]


def mount_layer(mountpoint: str | os.PathLike, *, digest: str, dispatcher_url: str, token: str,
                toc_digest: str | None, cache_dir: str = DEFAULT_CACHE, size: int | None = None,
                record_path: str | None = None, status_path: str | None = None,
                prefetch: bool = True, log_path: str | None = None,
                view_dir: str | None = None, workset: bool = True, workset_only: bool = False,
                server: subprocess.Popen | None = None, meta_digest: str | None = None,
                meta_size: int | None = None) -> MountHandle:
    """Mount the eStargz layer blob `digest` from the dispatcher's blob store, lazily
    (by the spare `server` when one is given, see spawn_server)."""
    spec = MountSpec(source=SourceSpec("dispatcher", dispatcher_url, digest=digest, token=token,
                                       size=size),
                     mountpoint=str(mountpoint), toc_digest=toc_digest, cache_dir=cache_dir,
                     record_path=record_path, status_path=status_path, prefetch=prefetch,
                     view_dir=view_dir, workset=workset, workset_only=workset_only,
                     meta_digest=meta_digest, meta_size=meta_size)
    return mount(spec, log_path=log_path, server=server)


def unmount(mountpoint: str | os.PathLike, *, timeout: float = 10.0) -> None:
    """Unmount a lazy mount: `fusermount3 -u`, retried while busy, then `umount -l`."""
    mp = os.path.realpath(mountpoint)
    deadline = time.monotonic() + timeout
    last = ""
    while is_mounted(mp):
        r = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True,
                           check=False)
        if r.returncode == 0:
            break
        last = r.stderr.strip()
        if time.monotonic() > deadline:
            r = subprocess.run(["umount", "-l", mp], capture_output=True, text=True,
                               check=False)
            if r.returncode != 0 and is_mounted(mp):
                raise MountError(f"cannot unmount {mp}: {last}; umount -l: {r.stderr.strip()}")
            break
        time.sleep(0.1)
