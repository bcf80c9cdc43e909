"""One conformance suite for every `Store` (runtimed/store.py): SQLite and Redis.

The Redis store runs against a real redis-server (Debian's, from scripts/setup.sh)
started here on a free port with a temporary dir; each test gets its own key prefix.
"""
from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from runtimed.redis_local import LocalRedis, redis_server_binary
from runtimed.store import TERMINAL, Claim, InvalidCallTransition, NewCall, Overloaded

BACKENDS = ["sqlite", "redis"]


@pytest.fixture(scope="session")
def redis_url():
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs it)")
    try:
        import redis  # noqa: F401
    except ImportError:
        pytest.skip("the redis Python client is not installed (pip install redis)")
    with LocalRedis() as server:
        yield server.url


@pytest.fixture(params=BACKENDS)
def make_store(request, tmp_path):
    """make_store(replica="r1", **kw) -> an unopened store; all share one database."""
    prefix = f"t{uuid.uuid4().hex[:8]}"

    def make(replica: str = "r1", **kw):
        if request.param == "sqlite":
            from runtimed.backend_sqlite import SqliteStore
            return SqliteStore(tmp_path / "meta.db", replica)
        from runtimed.backend_redis import RedisStore
        url = request.getfixturevalue("redis_url")
        return RedisStore(url, replica, prefix=prefix, **kw)
    make.kind = request.param
    return make


def run(make, body, **kw):
    """Open a store, run `await body(store)`, close it: one event loop per test."""
    async def main():
        store = make(**kw)
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()
    return asyncio.run(main())


def calls(*ids, fid="fn-1"):
    return [NewCall(c, fid, f"args-{c}".encode()) for c in ids]


async def take_all(store, n, timeout=2.0):
    out = []
    while len(out) < n:
        got = await store.take(n - len(out), timeout)
        if not got:
            break
        out += got
    return out


# -- registry records ---------------------------------------------------------------------------
def test_functions_images_layers(make_store):
    async def body(s):
        await s.put_function("fn-1", "square", "app", "blob1", "img-1", {"cpu": 1})
        await s.put_function("fn-2", "square", "app", "blob2", "img-1", {"cpu": 2})
        assert (await s.get_function("fn-1"))["config"] == {"cpu": 1}
        assert (await s.get_function("fn-1"))["image_id"] == "img-1"
        assert await s.get_function("fn-x") is None
        assert (await s.function_by_name("square"))["id"] == "fn-2"      # latest wins
        assert await s.function_by_name("nope") is None
        await s.put_image("img-1", {"steps": [{"key": "k"}]}, [{"status": "built"}])
        assert await s.get_image("img-1") == {"steps": [{"key": "k"}]}
        assert await s.get_image("img-2") is None
        images = await s.list_images()
        assert images[0]["id"] == "img-1" and images[0]["report"] == [{"status": "built"}]
        await s.put_layer("k1", "d1", 10, 20)
        await s.put_layer("k2", "d2", 11, 21)
        assert await s.layer_archives(["k1", "k3"]) == {"k1": "d1"}
        assert await s.layer_archives([]) == {}
        layers = await s.list_layers()
        assert [(x["key"], x["digest"], x["size"], x["raw_size"]) for x in layers] == [
            ("k1", "d1", 10, 20), ("k2", "d2", 11, 21)]
        await s.put_layer("k3", "d3", 5, 6, {"estargz_digest": "sha256:e", "toc_digest": "t"})
        assert await s.layer_infos(["k3", "k1", "nope"]) == {
            "k3": {"digest": "d3", "size": 5, "raw_size": 6, "estargz_digest": "sha256:e",
                   "toc_digest": "t"},
            "k1": {"digest": "d1", "size": 10, "raw_size": 20}}
        assert await s.layer_infos([]) == {}
    run(make_store, body)


# -- calls and the queue ------------------------------------------------------------------------
def test_submit_take_finish(make_store):
    async def body(s):
        assert await s.submit(calls("c1", "c2"), bound=100) == []
        assert await s.unfinished() == 2
        c = await s.get_call("c1")
        assert c["status"] == "queued" and c["attempts"] == 0 and c["function_id"] == "fn-1"
        assert c["pin"] is None and c["created"] > 0 and c["started"] is None
        got = await take_all(s, 2)
        assert sorted(x.call_id for x in got) == ["c1", "c2"]
        claim = next(x for x in got if x.call_id == "c1")
        assert claim.args == b"args-c1" and claim.function_id == "fn-1"
        assert await s.take(5, 0.05) == []                       # nothing more
        assert await s.bump_attempts("c1") == 1
        await s.set_status("c1", "running", node_id="node-a", placement=json.dumps({"r": 1}))
        c = await s.get_call("c1")
        assert c["status"] == "running" and c["node_id"] == "node-a" and c["started"]
        assert json.loads(c["placement"]) == {"r": 1}
        assert await s.finish(claim, "succeeded", result=json.dumps({"ok": True}),
                              result_payload=b"\x80\x00pickle", tier="warm") is True
        c = await s.get_call("c1")
        assert c["status"] == "succeeded" and c["finished"] >= c["started"]
        assert c["result_payload"] == b"\x80\x00pickle" and c["tier"] == "warm"
        assert json.loads(c["result"]) == {"ok": True}
        assert await s.unfinished() == 1
        listed = await s.list_calls(10)
        assert [x["id"] for x in listed][:2] in (["c2", "c1"], ["c1", "c2"])
        assert {"args", "result", "result_payload"}.isdisjoint(listed[0])
        assert next(x for x in listed if x["id"] == "c1")["status"] == "succeeded"
    run(make_store, body)


def test_submit_can_hand_calls_over_at_once(make_store):
    async def body(s):
        got = await s.submit(calls("a", "b"), bound=100, take=2)
        assert [c.call_id for c in got] == ["a", "b"] and got[0].args == b"args-a"
        assert await s.take(5, 0.05) == []                 # handed over: not queued again
        assert await s.submit(calls("c"), bound=100, take=0) == []
        (c,) = await s.submit(calls("d"), bound=100, take=1)
        assert c.call_id == "c"                            # oldest first
        assert [x.call_id for x in await take_all(s, 1)] == ["d"]
        await s.set_status("a", "running")
        assert await s.finish(got[0], "succeeded", result="{}") is True
        assert await s.unfinished() == 3
    run(make_store, body)


def test_pinned_call_keeps_its_pin(make_store):
    async def body(s):
        await s.submit([NewCall("c", "fn", b"", pin="node-b")], bound=10)
        assert (await s.get_call("c"))["pin"] == "node-b"
        (claim,) = await take_all(s, 1)
        assert claim.pin == "node-b"
    run(make_store, body)


@pytest.mark.parametrize("path, bad", [
    ([], "succeeded"), ([], "queued"), (["running"], "running"),
    (["running", "succeeded"], "failed"), (["running", "succeeded"], "queued"),
    (["cancelled"], "running"), ([], "bogus"),
])
def test_invalid_transitions_raise_and_change_nothing(make_store, path, bad):
    async def body(s):
        await s.submit(calls("c"), bound=10)
        for st in path:
            await s.set_status("c", st)
        before = await s.get_call("c")
        with pytest.raises(InvalidCallTransition):
            await s.set_status("c", bad)
        assert await s.get_call("c") == before
        with pytest.raises(KeyError):
            await s.set_status("nope", "running")
    run(make_store, body)


def test_a_preempted_call_is_requeued_with_its_events(make_store):
    async def body(s):
        await s.submit(calls("c"), bound=10)
        assert (await s.get_call("c"))["events"] is None
        assert await s.start_attempt("c", "node-a", "{}") == 1
        events = json.dumps([{"type": "preempted", "by_call": "call-hi", "attempt": 1}])
        await s.set_status("c", "queued", events=events)     # in the same transition
        c = await s.get_call("c")
        assert c["status"] == "queued" and json.loads(c["events"])[0]["by_call"] == "call-hi"
        assert await s.start_attempt("c", "node-a", "{}") == 2
        listed = next(x for x in await s.list_calls(10) if x["id"] == "c")
        assert json.loads(listed["events"]) == json.loads(events)
    run(make_store, body)


def test_retry_path_and_attempts(make_store):
    async def body(s):
        await s.submit(calls("c"), bound=10)
        await s.set_status("c", "running")
        await s.set_status("c", "queued")              # node lost: at-least-once
        assert await s.unfinished() == 1
        assert await s.bump_attempts("c") == 1
        assert await s.bump_attempts("c") == 2
        assert await s.bump_attempts("c", -1) == 1
        await s.set_status("c", "running")
        await s.set_status("c", "failed", result=json.dumps({"error": {"code": "oom"}}))
        assert (await s.get_call("c"))["status"] == "failed"
        assert await s.unfinished() == 0
    run(make_store, body)


def test_start_attempt(make_store):
    async def body(s):
        await s.submit(calls("c"), bound=10)
        assert await s.start_attempt("c", "node-a", json.dumps({"reason": "warm"})) == 1
        c = await s.get_call("c")
        assert c["status"] == "running" and c["node_id"] == "node-a" and c["started"]
        assert json.loads(c["placement"]) == {"reason": "warm"}
        # taken over from a dispatcher that stopped while it ran: running -> running
        assert await s.start_attempt("c", "node-b", "{}") == 2
        assert (await s.get_call("c"))["node_id"] == "node-b"
        await s.set_status("c", "queued")                       # a retry
        assert await s.start_attempt("c", "node-c", "{}") == 3
        await s.set_status("c", "cancelled")
        with pytest.raises(InvalidCallTransition):
            await s.start_attempt("c", "node-a", "{}")
        assert (await s.get_call("c"))["attempts"] == 3
        with pytest.raises(KeyError):
            await s.start_attempt("nope", "node-a", "{}")
    run(make_store, body)


def test_finish_of_a_terminal_call_only_acknowledges(make_store):
    async def body(s):
        await s.submit(calls("c"), bound=10)
        (claim,) = await take_all(s, 1)
        await s.set_status("c", "running")
        await s.set_status("c", "cancelled", result=json.dumps({"error": {"code": "x"}}))
        assert await s.finish(claim, "succeeded", result="{}") is False
        c = await s.get_call("c")
        assert c["status"] == "cancelled" and json.loads(c["result"])["error"]["code"] == "x"
        # at-least-once: a second driver's result is refused the same way
        assert await s.finish(claim, "failed", result="{}") is False
        assert await s.unfinished() == 0
    run(make_store, body)


def test_backpressure_bound(make_store):
    async def body(s):
        await s.submit(calls("a", "b", "c"), bound=3)
        with pytest.raises(Overloaded) as e:
            await s.submit(calls("d"), bound=3)
        assert e.value.unfinished == 3 and e.value.bound == 3
        assert await s.get_call("d") is None                 # nothing stored
        (a, *_rest) = await take_all(s, 3)
        await s.set_status(a.call_id, "running")
        await s.finish(a, "succeeded", result="{}")
        assert await s.unfinished() == 2
        with pytest.raises(Overloaded):                      # all or nothing
            await s.submit(calls("e", "f"), bound=3)
        assert await s.get_call("e") is None
        await s.submit(calls("g"), bound=3)
        assert await s.unfinished() == 3
    run(make_store, body)


def test_empty_system_admits_a_batch_larger_than_the_bound(make_store):
    async def body(s):
        await s.submit(calls(*[f"c{i}" for i in range(5)]), bound=2)
        assert await s.unfinished() == 5
        with pytest.raises(Overloaded):
            await s.submit(calls("x"), bound=2)
    run(make_store, body)


def test_unfinished_calls_come_back_after_a_restart(make_store):
    """A dispatcher that stops with calls taken but not finished gets them again."""
    async def first(s):
        await s.submit(calls("done", "taken", "waiting"), bound=10)
        got = {c.call_id: c for c in await take_all(s, 3)}
        await s.set_status("done", "running")
        await s.finish(got["done"], "succeeded", result="{}")
        await s.set_status("taken", "running")             # ... and the process dies
    run(make_store, first)

    async def second(s):
        back = await take_all(s, 3, timeout=1.0)
        assert sorted(c.call_id for c in back) == ["taken", "waiting"]
        assert next(c for c in back if c.call_id == "taken").args == b"args-taken"
        assert (await s.get_call("taken"))["status"] == "running"    # the dispatcher requeues
        assert await s.unfinished() == 2
    run(make_store, second)


def test_take_waits_then_returns_empty(make_store):
    async def body(s):
        t = asyncio.get_running_loop().time()
        assert await s.take(10, 0.2) == []
        assert asyncio.get_running_loop().time() - t >= 0.15
    run(make_store, body)


def test_take_wakes_on_submit(make_store):
    async def body(s):
        waiter = asyncio.create_task(s.take(10, 5.0))
        await asyncio.sleep(0.1)
        await s.submit(calls("c"), bound=10)
        got = await asyncio.wait_for(waiter, 3.0)
        assert [c.call_id for c in got] == ["c"]
    run(make_store, body)


# -- logs ------------------------------------------------------------------------------------------
def test_logs_in_order_and_after(make_store):
    async def body(s):
        await s.submit(calls("c"), bound=10)
        assert await s.logs("c") == []
        await s.append_logs("c", [("stdout", "a\n"), ("stderr", "b\n")])
        await s.append_logs("c", [("stdout", "c\n")])
        await s.append_logs("c", [])
        logs = await s.logs("c")
        assert [(e["seq"], e["stream"], e["text"]) for e in logs] == [
            (0, "stdout", "a\n"), (1, "stderr", "b\n"), (2, "stdout", "c\n")]
        assert [e["seq"] for e in await s.logs("c", after=0)] == [1, 2]
        assert await s.logs("c", after=2) == []
        assert await s.logs("other") == []
    run(make_store, body)


# -- nodes and counters ------------------------------------------------------------------------------
def test_node_registry(make_store):
    async def body(s):
        info = {"node_id": "node-a", "url": "http://a", "seen": 100.0, "snapshots": ["fn-1"]}
        assert await s.put_node(dict(info, node_id="node-b"), must_exist=True) is False
        assert await s.put_node(info) is True
        assert await s.put_node(dict(info, seen=101.0), must_exist=True) is True
        (n,) = await s.list_nodes()
        assert n["node_id"] == "node-a" and n["seen"] == 101.0 and n["snapshots"] == ["fn-1"]
        assert n["lost_at"] == 0.0
        await s.mark_node_lost("node-a", 102.0)
        (n,) = await s.list_nodes()
        assert n["lost_at"] == 102.0
        await s.incr_stat("overloaded")
        await s.incr_stat("overloaded", 2)
        assert (await s.stats())["overloaded"] == 3
        assert [r["name"] for r in await s.replicas()] == [s.replica]
    run(make_store, body)


def test_terminal_states_match_the_state_machine():
    from runtimed.metadata import TRANSITIONS
    for st in TERMINAL:
        assert TRANSITIONS[st] == set()
    assert isinstance(Claim("c", "f", b""), Claim)
