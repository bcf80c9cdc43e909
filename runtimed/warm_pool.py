"""Per-function pools of containers: idle containers serve the next call; new ones are
started only for calls that would otherwise wait; idle ones are reaped after the
scale-down window, keeping `min_containers` warm.

Each live container runs a worker task. A call goes to the most recently used idle
container (a stack, like Modal's), so under light load the same few containers stay
busy and the rest reach their scale-down window; calls that find no idle container
wait in a FIFO queue that every freed container drains first.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from .container import Container

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolPolicy:
    min_containers: int = 0
    max_containers: int = 4
    scaledown_window: float = 60.0


@dataclass
class Work:
    """One call waiting for a container."""

    call_id: str
    run: Callable[[Container], Awaitable[dict]]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class FunctionPool:
    def __init__(self, key: str, policy: PoolPolicy,
                 factory: Callable[[], Awaitable[Container]]):
        self.key, self.policy, self.factory = key, policy, factory
        self.queue: collections.deque[Work] = collections.deque()
        self.containers: list[Container] = []
        self.starting = 0
        self.last_error: BaseException | None = None
        self._idle: list[tuple[Container, asyncio.Future]] = []   # a stack: last idle first
        self._tasks: set[asyncio.Task] = set()
        self._task_of: dict[str, asyncio.Task] = {}
        self._closed = False

    @property
    def live(self) -> int:
        return len(self.containers) + self.starting

    @property
    def idle(self) -> int:
        return len(self._idle)

    def submit(self, work: Work) -> None:
        while self._idle:
            _, slot = self._idle.pop()
            if not slot.done():
                slot.set_result(work)
                return
        self.queue.append(work)
        self._scale()

    def _scale(self) -> None:
        """Start containers for calls no idle or starting container will take."""
        if self._closed:
            return
        want = len(self.queue) - self.starting
        while want > 0 and self.live < self.policy.max_containers:
            self._spawn()
            want -= 1
        while self.live < self.policy.min_containers:
            self._spawn()

    def _spawn(self) -> None:
        self.starting += 1
        t = asyncio.create_task(self._container_main())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _container_main(self) -> None:
        try:
            c = await self.factory()
        except BaseException as e:  # noqa: BLE001
            self.starting -= 1
            self.last_error = e
            log.warning("pool %s: container start failed: %s", self.key, e)
            self._fail_waiting(e)
            return
        self.starting -= 1
        c.ready_at = time.perf_counter()
        self.containers.append(c)
        task = asyncio.current_task()
        if task is not None:
            self._task_of[c.id] = task
        try:
            await self._serve(c)
        except asyncio.CancelledError:
            pass
        finally:
            self._task_of.pop(c.id, None)
            if c in self.containers:
                self.containers.remove(c)
            await c.destroy()
            if not self._closed:
                self._scale()

    def _fail_waiting(self, exc: BaseException) -> None:
        """A start failed: the calls waiting for it fail with the same error, unless
        other containers are still coming or serving."""
        if self.live > 0:
            return
        while self.queue:
            w = self.queue.popleft()
            if not w.future.done():
                w.future.set_exception(exc)

    async def _next(self, c: Container) -> Work | None:
        """The next call for `c`: queued work first, else wait idle (None: scale down)."""
        if self.queue:
            return self.queue.popleft()
        slot: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (c, slot)
        self._idle.append(entry)
        try:
            await asyncio.wait({slot}, timeout=self.policy.scaledown_window)
        finally:
            if entry in self._idle:
                self._idle.remove(entry)
            if not slot.done():
                slot.cancel()
            elif asyncio.current_task().cancelling():   # evicted just as work arrived
                self.queue.appendleft(slot.result())
        return slot.result() if slot.done() and not slot.cancelled() else None

    async def _serve(self, c: Container) -> None:
        while c.alive and not self._closed:
            work = await self._next(c)
            if work is None:
                if len(self.containers) > self.policy.min_containers:
                    return
                continue
            if work.future.done():       # cancelled while queued
                continue
            try:
                result = await work.run(c)
                if not work.future.done():
                    work.future.set_result(result)
            except asyncio.CancelledError:
                if not work.future.done():   # shut down mid-call: the call goes back
                    self.queue.appendleft(work)
                raise
            except BaseException as e:  # noqa: BLE001
                if not work.future.done():
                    work.future.set_exception(e)

    async def evict_idle(self, n: int = 1) -> int:
        """Stop up to n idle containers (memory pressure, drain), least recently used first."""
        done = 0
        for c, slot in list(self._idle):
            if done >= n:
                break
            task = self._task_of.get(c.id)
            if task is not None and not slot.done():
                task.cancel()
                done += 1
        return done

    async def stop(self, cid: str) -> bool:
        """Stop container `cid` now (its GPUs were given to a higher-priority call): an
        idle one as `evict_idle` does, a busy one by killing it (its call fails). False
        when it is not this pool's."""
        for c, slot in list(self._idle):
            task = self._task_of.get(c.id)
            if c.id == cid and task is not None and not slot.done():
                task.cancel()
                return True
        for c in self.containers:
            if c.id == cid:
                await c.kill()
                return True
        return False

    async def close(self) -> None:
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        for c in list(self.containers):
            await c.destroy()
        self.containers.clear()
        while self.queue:
            w = self.queue.popleft()
            if not w.future.done():
                w.future.cancel()
