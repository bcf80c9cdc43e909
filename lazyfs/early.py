"""The working set written by a helper process from the moment the TOC is verified.

Before a lazy mount is live the mount server builds the whole tree from the TOC (10,483
entries for the heavy stack: ~0.15 s) and writes the meta tree (~0.09 s), in one Python
thread; the prefetch of the recorded working set (~0.5 CPU-s of inflating, verifying and
writing) used to start only then, beside the container. Threads cannot do both at once
(the GIL: the meta tree took 0.36 s with the decoding threads beside it). So a mount
server starts a helper (`python -m lazyfs early-helper`) with itself, which waits with its
imports done; as soon as the TOC is fetched and verified the server hands it the TOC, and
the helper parses only the entries before the prefetch landmark (~1,200, 15 ms), fetches
and decodes them into the data dir on the node's other core, and exits with a JSON
result; the server builds its tree and the meta tree meanwhile.

The helper writes with the same WorksetWriter (whole files, staged, renamed into place),
so the server knows a working-set file is complete when it exists in the data dir
(`DirWorkset`, the view's `workset`): a FUSE read of one not there yet waits for it, as
with the in-process prefetch. Chunks of files prefetched in part go to the chunk cache on
disk, where the server's reads find them. The helper dies with the server (PDEATHSIG)
and is killed when the mount ends; a helper that fails leaves complete files only, and
the server's reads fall back to fetching.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FormatError
from .reader import RawTOC
from .toc import PREFETCH_LANDMARK, TOC, clean_name
from .tree import Tree
from .workset import WorksetPlan

log = logging.getLogger("lazyfs")
POLL_S = 0.002                   # a reader waiting for a working-set file looks this often

__all__ = ["DirWorkset", "EarlyPrefetch", "helper_main", "prioritized_toc", "spawn_helper",
           "start_prefetch"]


def prioritized_toc(toc_json: bytes) -> TOC | None:
    """Pure: the TOC cut to the regular files (and their chunks) before the prefetch
    landmark, the landmark and the TOC's extension keys; None without a landmark. Built
    into a tree, it plans the same working set as the whole TOC (directories, links and
    the rest carry no data; build_tree validates what is left as it would the whole)."""
    toc = TOC.parse(toc_json)
    keep = []
    for e in toc.entries:
        if clean_name(e.name) == PREFETCH_LANDMARK:
            keep.append(e)
            break
        if e.type in ("reg", "chunk"):
            keep.append(e)
    else:
        return None
    return dataclasses.replace(toc, entries=tuple(keep))


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def spawn_helper(python: str = sys.executable) -> subprocess.Popen:
    """Start `python -m lazyfs early-helper` now, to wait (imports done) for a TOC on its
    stdin; a mount server starts it with its own start, so neither the interpreter start
    nor a fork of the server's heap (whose pages the server would then copy on its every
    write: +60 ms before the mount was live, measured) is on the start's path."""
    from .mount import _server_env
    return subprocess.Popen([python, "-m", "lazyfs", "early-helper"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=_server_env(),
                            start_new_session=True)


@dataclass
class EarlyPrefetch:
    """The helper at work, seen from the mount server."""

    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    result: dict | None = None
    on_done: Callable[[dict], None] | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait(self) -> None:
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        code = self.proc.wait()
        try:
            res = json.loads(out.decode().strip().splitlines()[-1])
            if not isinstance(res, dict):
                raise ValueError(res)
        except (ValueError, IndexError, UnicodeDecodeError):
            res = {"state": f"failed: helper exited with {code} and no result"}
        self.result = res
        self._done.set()
        if self.on_done is not None:
            self.on_done(res)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> dict | None:
        self._done.wait(timeout)
        return self.result

    def kill(self) -> None:
        if not self._done.is_set():
            self.proc.kill()
            self._done.wait(5)


def start_prefetch(helper: subprocess.Popen, raw: RawTOC, source: dict, cache_dir: str,
                   data_dir: str, log_path: str | None = None) -> EarlyPrefetch | None:
    """Hand the spawned `helper` the verified TOC `raw` and where to write; None (and the
    helper told to exit) when the blob has no prefetch landmark or the helper is gone.
    `source` is the SourceSpec as a dict (the helper opens its own connection)."""
    # a byte search, not a parse (that would cost this server 15 ms before its mount is
    # live); the helper parses, and says so if there is no landmark after all
    has_landmark = json.dumps(PREFETCH_LANDMARK).encode() in raw.toc_json
    stdin = helper.stdin
    assert stdin is not None
    if not has_landmark or helper.poll() is not None:
        try:
            stdin.close()
        except OSError:
            pass
        return None
    head = {"source": source, "cache_dir": cache_dir, "data_dir": data_dir,
            "log_path": log_path, "size": raw.size, "toc_offset": raw.toc_offset,
            "digest": raw.digest, "toc_bytes": len(raw.toc_json)}

    def send() -> None:
        # 4 MB through a 64 KiB pipe: written beside the server's own work, which must not
        # wait for a helper at nice 19 to read it
        try:
            stdin.write(json.dumps(head).encode() + b"\n" + raw.toc_json)
            stdin.close()
        except OSError as e:          # it died: its result says so
            log.warning("early prefetch: helper %d gone: %s", helper.pid, e)
    threading.Thread(target=send, name="lazyfs-early-send", daemon=True).start()
    early = EarlyPrefetch(proc=helper)
    threading.Thread(target=early._wait, name="lazyfs-early-wait", daemon=True).start()
    return early


def helper_main() -> int:
    """`python -m lazyfs early-helper`: read the header and the TOC from stdin, write the
    working set, print the result as one JSON line. Imports come first (done before the
    TOC arrives); stdin closed without a header: exit quietly."""
    from .cache import ChunkCache
    from .mount import SourceSpec, open_source
    from .reader import EStargz
    from .tree import build_tree
    from .view import LayerView
    _die_with_parent()
    # all its threads below the server's, whose tree and meta tree the start waits for
    # (the decoding threads are at nice 19 anyway; this takes its fetching along)
    os.setpriority(os.PRIO_PROCESS, 0, 19)
    stdin = sys.stdin.buffer
    line = stdin.readline()
    if not line.strip():
        return 0
    t0 = time.monotonic()
    try:
        head = json.loads(line)
        toc_json = stdin.read(int(head["toc_bytes"]))
        if head.get("log_path"):
            fd = os.open(head["log_path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o644)
            os.dup2(fd, 2)
            os.close(fd)
        toc = prioritized_toc(toc_json)
        if toc is None:
            raise FormatError("no prefetch landmark")
        tree = build_tree(toc, int(head["toc_offset"]))
        src = open_source(SourceSpec(**head["source"]))
        blob = EStargz(source=src, size=int(head["size"]), toc_offset=int(head["toc_offset"]),
                       toc=toc, toc_digest=str(head["digest"]), tree=tree)
        view = LayerView(blob, ChunkCache(head["cache_dir"], write_behind=False))
        log.info("early prefetch: helper %d planned %d files in %.3fs", os.getpid(),
                 len(tree.prioritized), time.monotonic() - t0)
        out = dict(view.prefetch_workset(head["data_dir"], only=True))
        out["prefetch"] = view.counters.prefetch_state
        out["chunks"] = view.counters.prefetched_chunks
        code = 0 if out.get("state") in ("done", "none") else 1
    except Exception as e:                   # noqa: BLE001 - reported to the server
        log.warning("early prefetch failed: %s: %s", type(e).__name__, e)
        out, code = {"state": f"failed: {type(e).__name__}: {e}"}, 1
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return code


class DirWorkset:
    """The view's `workset` when the helper writes it: a file is complete once it is in
    the data dir (the writer renames only whole files into place)."""

    def __init__(self, tree: Tree, plan: WorksetPlan, dest: str | os.PathLike,
                 early: EarlyPrefetch):
        self.dest, self.early = Path(dest), early
        # plan.files are canonical names (metatree.canonical_name): the lowest of a hard
        # link's names in this tree; the helper's tree holds only the linked file's own
        # entry, so a prioritized hard-linked file whose other name sorts first is not
        # found here and is read through FUSE (correct, slower; rare in a Python layer)
        self.name = {tree.paths[n]: n for n in plan.files}

    def holds(self, ino: int) -> bool:
        return ino in self.name

    def settled(self, ino: int) -> bool:
        return self.early.done or (self.dest / self.name[ino]).exists()

    def wait_published(self, ino: int, timeout: float | None = None) -> Path | None:
        """The data file of `ino` once the helper wrote it; None if the helper ended
        without it, or after `timeout`."""
        path = self.dest / self.name[ino]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if path.exists():
                return path
            if self.early.done or (deadline is not None and time.monotonic() > deadline):
                return path if path.exists() else None
            time.sleep(POLL_S)
