"""Per-function pools of containers: idle containers serve the next call; new ones are
started only for calls that would otherwise wait; idle ones are reaped after the
scale-down window, keeping `min_containers` warm.

Each live container runs a worker task that pulls calls from its function's queue,
so a call goes to whichever container frees up first (like Modal's input queue).
"""
from __future__ import annotations

import asyncio
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
                 factory: Callable[[], Awaitable[Container]],
                 on_start_error: Callable[[BaseException], None] | None = None):
        self.key, self.policy, self.factory = key, policy, factory
        self.queue: asyncio.Queue[Work] = asyncio.Queue()
        self.containers: list[Container] = []
        self.starting = 0
        self.idle = 0
        self.last_error: BaseException | None = None
        self._tasks: set[asyncio.Task] = set()
        self._task_of: dict[str, asyncio.Task] = {}
        self._closed = False

    @property
    def live(self) -> int:
        return len(self.containers) + self.starting

    def submit(self, work: Work) -> None:
        self.queue.put_nowait(work)
        self._scale()

    def _scale(self) -> None:
        """Start containers for calls no idle or starting container will take."""
        if self._closed:
            return
        want = self.queue.qsize() - self.idle - self.starting
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
        """A start failed: the calls that were waiting on it fail with the same error,
        unless other containers are still coming or serving."""
        if self.live > 0:
            return
        while not self.queue.empty():
            w = self.queue.get_nowait()
            if not w.future.done():
                w.future.set_exception(exc)

    async def _serve(self, c: Container) -> None:
        while c.alive and not self._closed:
            self.idle += 1
            try:
                work = await asyncio.wait_for(self.queue.get(),
                                              timeout=self.policy.scaledown_window)
            except asyncio.TimeoutError:
                if len(self.containers) > self.policy.min_containers:
                    return
                continue
            finally:
                self.idle -= 1
            if work.future.done():       # cancelled while queued
                continue
            try:
                result = await work.run(c)
                if not work.future.done():
                    work.future.set_result(result)
            except asyncio.CancelledError:
                if not work.future.done():   # evicted or shut down: the call goes back
                    self.queue.put_nowait(work)
                raise
            except BaseException as e:  # noqa: BLE001
                if not work.future.done():
                    work.future.set_exception(e)

    async def evict_idle(self, n: int = 1) -> int:
        """Destroy up to n idle containers (memory pressure from other pools)."""
        done = 0
        for c in list(self.containers):
            if done >= n:
                break
            task = self._task_of.get(c.id)
            if c.state.value == "idle" and task is not None:
                task.cancel()
                done += 1
        return done

    async def close(self) -> None:
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        for c in list(self.containers):
            await c.destroy()
        self.containers.clear()
        while not self.queue.empty():
            w = self.queue.get_nowait()
            if not w.future.done():
                w.future.cancel()
