"""What only the Redis store does: several replicas on one queue, reclaiming the calls of
a replica that died, telling the others about results (pub/sub). Against a real
redis-server started by the `redis_url` fixture (test_backend_conformance.py)."""
from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from test_backend_conformance import (
    redis_url,  # noqa: F401 - the shared fixture
    take_all,
)

from runtimed.store import NewCall

pytest.importorskip("redis")


@pytest.fixture
def make(redis_url):  # noqa: F811
    prefix = f"t{uuid.uuid4().hex[:8]}"

    def make(replica: str, **kw):
        from runtimed.backend_redis import RedisStore
        return RedisStore(redis_url, replica, prefix=prefix, **kw)
    return make


def test_replicas_share_the_queue_and_each_call_goes_to_one(make):
    async def main():
        a, b = make("a"), make("b")
        await a.open()
        await b.open()
        try:
            await a.submit([NewCall(f"c{i}", "fn", b"x") for i in range(20)], bound=100)
            got_a, got_b = await asyncio.gather(take_all(a, 10, 0.5), take_all(b, 20, 0.5))
            ids = [c.call_id for c in got_a + got_b]
            assert sorted(ids) == sorted(f"c{i}" for i in range(20))      # each exactly once
            assert {r["name"] for r in await a.replicas()} == {"a", "b"}
        finally:
            await a.close()
            await b.close()
    asyncio.run(main())


def test_calls_of_a_dead_replica_are_reclaimed(make):
    async def main():
        a = make("a", reclaim_idle_s=1)
        await a.open()
        await a.submit([NewCall("c1", "fn", b"args")], bound=10)
        await take_all(a, 1)
        await a.set_status("c1", "running")
        await a.close()                        # dies with the call taken, not finished
        b = make("b", reclaim_idle_s=1)
        await b.open()
        try:
            assert await b.take(5, 0.1) == []            # not idle long enough yet
            await asyncio.sleep(1.2)                      # b's reclaim loop takes it over
            (again,) = await take_all(b, 1, 1.0)
            assert again.call_id == "c1" and again.args == b"args"
            assert await b.finish(again, "succeeded", result="{}") is True
            assert await b.reclaim() == 0                 # acknowledged: gone for good
            assert await b.unfinished() == 0
        finally:
            await b.close()
    asyncio.run(main())


def test_a_live_replica_keeps_its_calls_and_a_stalled_one_loses_them(make):
    async def main():
        lost: list[str] = []
        a = make("a", reclaim_idle_s=1)
        await a.open()
        a.set_callbacks(lambda cid: None, lost.append)
        b = make("b", reclaim_idle_s=1)
        await b.open()
        try:
            await a.submit([NewCall("c1", "fn", b"")], bound=10)
            await take_all(a, 1)
            await asyncio.sleep(1.5)                      # a refreshes every 0.5 s
            assert await b.reclaim() == 0
            assert await b.take(5, 0.1) == []
            for t in a._tasks:                            # a stalls: no more refreshes
                t.cancel()
            await asyncio.sleep(1.2)                      # b's reclaim loop takes it over
            (stolen,) = await take_all(b, 1, 1.0)
            assert stolen.call_id == "c1"
            await a.refresh_claims()                      # a wakes up and finds out
            assert lost == ["c1"]
        finally:
            await a.close()
            await b.close()
    asyncio.run(main())


def test_other_replicas_hear_of_results_and_logs(make):
    async def main():
        heard: list[str] = []
        a, b = make("a"), make("b")
        await a.open()
        await b.open()
        b.set_callbacks(heard.append, lambda cid: None)
        a.set_callbacks(lambda cid: pytest.fail("own events are not echoed"), lambda c: None)
        try:
            await asyncio.sleep(0.3)                      # subscriptions are up
            await a.submit([NewCall("c1", "fn", b"")], bound=10)
            (claim,) = await take_all(a, 1)
            await a.append_logs("c1", [("stdout", "hi\n")])
            await a.set_status("c1", "running")
            await a.finish(claim, "succeeded", result=json.dumps({"ok": True}))
            for _ in range(50):
                if len(heard) >= 2:
                    break
                await asyncio.sleep(0.05)
            assert heard == ["c1", "c1"]                  # the log line, then the result
        finally:
            await a.close()
            await b.close()
    asyncio.run(main())


def test_a_finished_call_expires_and_leaves_the_listing(make):
    async def main():
        s = make("a", result_ttl_s=60)
        await s.open()
        try:
            await s.submit([NewCall("c1", "fn", b"")], bound=10)
            (claim,) = await take_all(s, 1)
            await s.set_status("c1", "running")
            await s.finish(claim, "succeeded", result="{}")
            assert 0 < await s.r.ttl(s.k("call", "c1")) <= 60
            await s.r.delete(s.k("call", "c1"))          # as if it had expired
            assert await s.list_calls() == []
            assert await s.r.zcard(s.k("calls")) == 0
            assert await s.r.xlen(s.k("queue")) == 0      # args live only until the result
        finally:
            await s.close()
    asyncio.run(main())
