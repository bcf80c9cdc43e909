"""Spare `criu lazy-pages` daemons, started ahead of the lazy restores that will use them.

A lazy restore needs its lazy-pages daemon listening before `criu restore` starts (CRIU
connects to it first thing), and the daemon takes 7-10 ms to get there (dynamic loading,
kerndat, pstree: measured by polling for its socket). The sandbox setup hides part of
that; the rest showed as the `lazy_daemon` span of restores (1-10 ms). The daemon reads
nothing that depends on the restore before a restored task connects (pagemaps are read
per task, when its userfaultfd arrives), so one can be started for a snapshot before
the call that needs it: the node keeps one spare per recently lazily restored snapshot
and starts the next a little after a restore took it (a start competing for the CPU
with the restore that just began would slow exactly what it is for).

A restore uses a spare by linking its container's socket path to the spare's socket:
connect(2) follows the link, and the daemon's log and state stay in its own dir.
Spares are never used for restores that record a working set (those need a -v4 log).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SOCKET = "lazy-pages.socket"
MAX_SPARES = 8               # snapshots with a spare (LRU): each is an idle ~3 MB process
REFILL_DELAY_S = 1.0


@dataclass
class Spare:
    proc: asyncio.subprocess.Process
    work: Path

    @property
    def ready(self) -> bool:
        return self.proc.returncode is None and (self.work / SOCKET).exists()


class SpareLazyDaemons:
    def __init__(self, root: Path, start, max_spares: int = MAX_SPARES,
                 refill_delay: float = REFILL_DELAY_S):
        """`start(image_dir, work_dir)` starts a daemon and returns once it listens."""
        self.root = root
        self._start = start
        self.max_spares = max_spares
        self.refill_delay = refill_delay
        self._spares: OrderedDict[str, Spare] = OrderedDict()
        self._pending: dict[str, asyncio.Task] = {}
        self._n = 0
        self._closed = False

    def __len__(self) -> int:
        return len(self._spares)

    def snapshots(self) -> list[str]:
        """The snapshots (their image dirs' names) that have a spare now."""
        return [Path(k).name for k in self._spares]

    def take(self, image_dir: Path) -> Spare | None:
        """The ready spare for `image_dir`, now owned by the caller (None: start one)."""
        spare = self._spares.pop(str(image_dir), None)
        if spare is not None and not spare.ready:
            self._discard(spare)
            spare = None
        return spare

    def link(self, spare: Spare, work: Path) -> None:
        """Point `work`'s lazy-pages socket (where `criu restore --work-dir work` connects)
        at the spare's."""
        work.mkdir(parents=True, exist_ok=True)
        sock = work / SOCKET
        sock.unlink(missing_ok=True)
        sock.symlink_to(spare.work / SOCKET)

    def refill(self, image_dir: Path) -> None:
        """Start a spare for `image_dir` a little later (no-op if one exists or is coming)."""
        key = str(image_dir)
        if self._closed or key in self._spares or key in self._pending:
            return
        self._pending[key] = asyncio.get_running_loop().create_task(self._refill(image_dir))

    async def _refill(self, image_dir: Path) -> None:
        key = str(image_dir)
        try:
            await asyncio.sleep(self.refill_delay)
            if self._closed or not image_dir.is_dir():
                return
            self._n += 1
            work = self.root / f"{os.getpid()}-{self._n}"
            shutil.rmtree(work, ignore_errors=True)
            t = time.perf_counter()
            proc = await self._start(image_dir, work)
            if self._closed:
                self._discard(Spare(proc, work))
                return
            self._spares[key] = Spare(proc, work)
            log.debug("spare lazy-pages daemon for %s ready in %.1f ms", image_dir,
                      (time.perf_counter() - t) * 1000)
            self._prune()
        except asyncio.CancelledError:
            raise
        except Exception as e:       # a spare is an optimization: the restore starts its own
            log.warning("spare lazy-pages daemon for %s: %s", image_dir, e)
        finally:
            self._pending.pop(key, None)

    def _prune(self) -> None:
        """Drop spares of snapshots that are gone, then the least recently made over the cap."""
        for key in [k for k, s in self._spares.items() if not Path(k).is_dir() or not s.ready]:
            self._discard(self._spares.pop(key))
        while len(self._spares) > self.max_spares:
            self._discard(self._spares.popitem(last=False)[1])

    def drop(self, image_dir: Path) -> None:
        spare = self._spares.pop(str(image_dir), None)
        if spare is not None:
            self._discard(spare)

    @staticmethod
    def _discard(spare: Spare) -> None:
        if spare.proc.returncode is None:
            spare.proc.kill()
        # The daemon is reaped by its asyncio child watcher; its dir can go now.
        shutil.rmtree(spare.work, ignore_errors=True)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._pending.values()):
            task.cancel()
        for spare in self._spares.values():
            if spare.proc.returncode is None:
                spare.proc.kill()
            await spare.proc.wait()
            shutil.rmtree(spare.work, ignore_errors=True)
        self._spares.clear()
