"""The embedded backend: `Store` over SQLite (metadata.py) and an in-process queue.

One dispatcher process owns the file. The queue is an asyncio queue of claims; the
calls table is its durable copy: at `open`, every call left queued or running by the
previous process is queued again (at-least-once), before anything new. Acknowledging
is a no-op: the row's terminal status is the acknowledgement. The node registry and
the counters live in memory (nodes re-register within a heartbeat after a restart).
"""
from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .metadata import TERMINAL, Metadata
from .store import Claim, NewCall, Overloaded


class SqliteStore:
    kind = "sqlite"
    unavailable_errors: tuple[type[BaseException], ...] = (sqlite3.OperationalError,)

    def __init__(self, path: Path, replica: str = "embedded"):
        self.path, self.replica = path, replica
        self.md: Metadata | None = None
        self._queue: asyncio.Queue[Claim] = asyncio.Queue()
        self._unfinished = 0
        self._log_seq: dict[str, int] = {}
        self._nodes: dict[str, dict] = {}
        self._stats: dict[str, int] = {}
        self._since = time.time()

    @property
    def _md(self) -> Metadata:
        if self.md is None:
            raise RuntimeError("the store is not open")
        return self.md

    async def open(self) -> None:
        self.md = Metadata(self.path)
        md = self.md
        for cid in md.unfinished_calls():
            c = md.get_call(cid)
            if c is not None:
                self._queue.put_nowait(Claim(cid, c["function_id"], c["args"] or b"", c["pin"]))
        self._unfinished = md.count_unfinished()

    async def close(self) -> None:
        if self.md is not None:
            self.md.db.close()
            self.md = None

    def set_callbacks(self, on_change: Callable[[str], None],
                      on_lost: Callable[[str], None]) -> None:
        pass                                   # one process: nothing changes behind our back

    # -- functions, images, layers ---------------------------------------------------------
    async def put_function(self, fid, name, app, blob, image_id, config) -> None:
        self._md.put_function(fid, name, app, blob, image_id, config)

    async def get_function(self, fid):
        return self._md.get_function(fid)

    async def function_by_name(self, name):
        return self._md.function_by_name(name)

    async def put_image(self, iid, spec, report) -> None:
        self._md.put_image(iid, spec, report)

    async def get_image(self, iid):
        return self._md.get_image(iid)

    async def list_images(self):
        return self._md.list_images()

    async def put_layer(self, key, digest, size, raw_size, extra=None) -> None:
        self._md.put_layer(key, digest, size, raw_size, extra)

    async def layer_archives(self, keys):
        return self._md.layer_archives(keys)

    async def layer_infos(self, keys):
        return self._md.layer_infos(keys)

    async def list_layers(self):
        return self._md.list_layers()

    # -- calls -----------------------------------------------------------------------------
    async def submit(self, calls: Sequence[NewCall], bound: int, take: int = 0) -> list[Claim]:
        if self._unfinished > 0 and self._unfinished + len(calls) > bound:
            raise Overloaded(self._unfinished, bound)
        self._md.add_calls([(c.call_id, c.function_id, c.args, c.pin) for c in calls])
        self._unfinished += len(calls)
        for c in calls:
            self._queue.put_nowait(Claim(c.call_id, c.function_id, c.args, c.pin))
        out = []
        while len(out) < take and not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out

    async def get_call(self, cid):
        c = self._md.get_call(cid)
        if c is not None:
            c.pop("args", None)
        return c

    async def set_status(self, cid: str, new: str, **fields) -> None:
        self._md.set_status(cid, new, **fields)
        if new in TERMINAL:
            self._terminal(cid)

    def _terminal(self, cid: str) -> None:
        self._unfinished = max(0, self._unfinished - 1)
        self._log_seq.pop(cid, None)

    async def finish(self, claim: Claim, status: str, **fields) -> bool:
        md = self._md
        cur = md.db.execute("SELECT status FROM calls WHERE id=?", (claim.call_id,)).fetchone()
        if cur is None:
            raise KeyError(claim.call_id)
        if cur[0] in TERMINAL:
            return False
        md.set_status(claim.call_id, status, **fields)
        self._terminal(claim.call_id)
        return True

    async def ack(self, claim: Claim) -> None:
        pass

    async def release(self, claim: Claim) -> None:
        # Nobody else can take it over: queue it again after a pause.
        loop = asyncio.get_running_loop()
        loop.call_later(1.0, self._queue.put_nowait, claim)

    async def start_attempt(self, cid: str, node_id: str, placement: str) -> int:
        return self._md.start_attempt(cid, node_id, placement)

    async def bump_attempts(self, cid: str, delta: int = 1) -> int:
        return self._md.bump_attempts(cid, delta)

    async def unfinished(self) -> int:
        return self._unfinished

    async def list_calls(self, limit: int = 50):
        return self._md.list_calls(limit)

    # -- queue -----------------------------------------------------------------------------
    async def take(self, max_n: int, timeout: float) -> list[Claim]:
        try:
            first = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return []
        out = [first]
        while len(out) < max_n and not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out

    # -- logs ------------------------------------------------------------------------------
    async def append_logs(self, cid: str, entries: Sequence[tuple[str, str]]) -> None:
        md = self._md
        seq = self._log_seq.get(cid)
        if seq is None:
            seq = md.next_log_seq(cid)
        md.append_logs(cid, list(entries), seq)
        self._log_seq[cid] = seq + len(entries)

    async def logs(self, cid: str, after: int = -1):
        return self._md.logs(cid, after)

    # -- nodes -----------------------------------------------------------------------------
    async def put_node(self, info: dict, must_exist: bool = False) -> bool:
        nid = info["node_id"]
        old = self._nodes.get(nid)
        if must_exist and old is None:
            return False
        self._nodes[nid] = dict(info, lost_at=(old or {}).get("lost_at", 0.0))
        return True

    async def list_nodes(self) -> list[dict]:
        return [dict(n) for n in self._nodes.values()]

    async def mark_node_lost(self, node_id: str, at: float) -> None:
        if node_id in self._nodes:
            self._nodes[node_id]["lost_at"] = at

    # -- counters --------------------------------------------------------------------------
    async def incr_stat(self, name: str, n: int = 1) -> None:
        self._stats[name] = self._stats.get(name, 0) + n

    async def stats(self) -> dict[str, int]:
        return dict(self._stats)

    async def replicas(self) -> list[dict]:
        return [{"name": self.replica, "pid": os.getpid(), "since": self._since}]
