"""Many nodes (issue 6), end to end on one machine: a Redis-backed dispatcher
(`runtimectl up --no-node --backend redis`, own RUNTIMED_STATE, bound of 100
unfinished calls) and three node daemons (`runtimectl node --name nK`), each its own
process with its own port and state dir; a second dispatcher replica joins later on
the same port (SO_REUSEPORT).

Placement is asserted from the placement record every call stores. No timing asserts.
Functions here run remotely: they must not use pytest or sdk.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from runtimed.devcluster import LocalCluster, running, wait_for
from runtimed.redis_local import redis_server_binary
from sdk import App, FunctionCall, Image
from sdk.exception import NodeUnavailableError
from sdk.serialization import dumps_args

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PYTHON = os.environ.get("RUNTIMED_TEST_PYTHON", "/opt/runtimed/venv/bin/python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable
BOUND = 100

base = Image.debian_slim()
app = App("cluster-tests", image=base)


@app.function(snapshot=True, memory=256, scaledown_window=30)
def snap_a(x):
    import decimal
    import json as _json
    return int(decimal.Decimal(x) + 1) if _json else None


@app.function(snapshot=True, memory=256, scaledown_window=30)
def snap_b(x):
    import fractions
    return int(fractions.Fraction(x) * 2)


@app.function(retries=2, timeout=60)
def slow(x):
    import time as _t
    _t.sleep(5)
    return x


@app.function(retries=0, timeout=60)
def slow_once(x):
    import time as _t
    _t.sleep(5)
    return x


@app.function(timeout=60)
def sleepy(x):
    import time as _t
    _t.sleep(2)
    return x


@app.function(retries=1)
def quick(x):
    return x


@app.function()
def noop(x):
    return x


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs it)")
    pytest.importorskip("redis")
    cl = LocalCluster(backend="redis", nodes=3, python=PYTHON,
                      env={"RUNTIMED_MAX_PENDING": str(BOUND), "RUNTIMED_RECLAIM_IDLE_S": "5"})
    with running(cl):
        yield cl



# -- helpers ----------------------------------------------------------------------------------------
def node(client, node_id) -> dict:
    return next(n for n in client.json("GET", "/v1/nodes")["nodes"] if n["node_id"] == node_id)


def holds_snapshot(client, node_id, fid) -> bool:
    return fid in node(client, node_id)["snapshots"]


def call_pinned(client, fn, node_id, *args) -> dict:
    """POST /v1/calls with node_id (the admin/benchmark pin), then wait for the result."""
    state = client.json("POST", "/v1/calls", {
        "function_id": fn.object_id, "node_id": node_id, "wait": 50,
        "args_b64": base64.b64encode(dumps_args(args, {})).decode()})
    fc = FunctionCall(state["call_id"], client)
    if state["status"] not in ("succeeded", "failed", "cancelled"):
        fc.get(timeout=120)
        state = fc.last_state
    assert state["status"] == "succeeded", state
    return state


def pull_counts(note: str) -> tuple[int, int]:
    m = re.search(r"pulled from \S+: (\d+) chunks \([\d.]+ MiB\), (\d+) already here", note)
    assert m, note
    return int(m.group(1)), int(m.group(2))


def cli(cluster, *args) -> str:
    env = dict(os.environ, RUNTIMED_URL=cluster.url, RUNTIMED_TOKEN=cluster.token,
               RUNTIMED_STATE=str(cluster.state))
    out = subprocess.run([PYTHON, "-m", "runtimed.cli", *args], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def other_nodes(client, *exclude) -> list[str]:
    return sorted(n["node_id"] for n in client.json("GET", "/v1/nodes")["nodes"]
                  if n["alive"] and n["node_id"] not in exclude)


# -- tests ------------------------------------------------------------------------------------------
def test_three_nodes_register_with_holdings(cluster, client):
    nodes = client.json("GET", "/v1/nodes")["nodes"]
    assert sorted(n["node_id"] for n in nodes if n["alive"]) == ["node-n1", "node-n2", "node-n3"]
    for n in nodes:
        assert {"snapshots", "layers", "warm", "memory_mb", "reserved_mb", "active"} <= set(n)
    st = client.json("GET", "/v1/status")
    assert st["backend"] == "redis" and st["max_pending"] == BOUND
    assert "node-n2" in cli(cluster, "nodes")


def test_affinity_routes_to_the_node_holding_the_snapshot(cluster, client, deployed):
    fid = snap_a.object_id
    assert snap_a.remote(1) == 2
    first = snap_a.last_call.info
    a = first["node_id"]
    assert first["tier"] == "cold" and "taken" in first.get("snapshot", ""), first
    wait_for(lambda: holds_snapshot(client, a, fid), 15, f"{a} to report the snapshot")
    cluster.drain(fid)                # and a heartbeat from every node after it

    assert snap_a.remote(2) == 3
    state = snap_a.last_call.last_state
    assert state["placement"]["reason"] == "snapshot", state["placement"]
    assert state["placement"]["node_id"] == a
    assert state["result"]["tier"] in ("restore", "restore_lazy"), state["result"]
    # the operator sees the same: where it ran and why
    calls = cli(cluster, "calls", "--limit", "5")
    assert state["call_id"] in calls and "snapshot" in calls
    assert fid[:14] in cli(cluster, "nodes")


def test_transfer_pulls_only_missing_chunks(cluster, client, deployed):
    fid_a = snap_a.object_id
    a = next(n["node_id"] for n in client.json("GET", "/v1/nodes")["nodes"]
             if fid_a in n["snapshots"])
    b = other_nodes(client, a)[0]
    state = call_pinned(client, snap_a, b, 10)
    res = state["result"]
    assert state["placement"] == {"node_id": b, "reason": "pinned"}
    assert res["node_id"] == b and res["tier"] == "restore_peer", res
    fetched_a, _ = pull_counts(res["snapshot"])
    assert fetched_a > 0

    # a second function on the same image: snapshot on A, then B pulls it; the chunks
    # the two snapshots share are already on B
    assert call_pinned(client, snap_b, a, 4)["result"]["tier"] == "cold"
    wait_for(lambda: holds_snapshot(client, a, snap_b.object_id), 15, "the second snapshot")
    res = call_pinned(client, snap_b, b, 5)["result"]
    assert res["tier"] == "restore_peer", res
    fetched_b, reused_b = pull_counts(res["snapshot"])
    assert reused_b > 0 and fetched_b < fetched_b + reused_b, res["snapshot"]
    wait_for(lambda: holds_snapshot(client, b, snap_b.object_id), 15, "b to hold it")


def test_node_killed_mid_call_is_retried_elsewhere(cluster, client, deployed):
    fc = slow.spawn(7)
    st = wait_for(lambda: (s := client.json("GET", f"/v1/calls/{fc.object_id}"))["status"]
                  == "running" and s, 60, "the call to start")
    victim = st["placement"]["node_id"]
    time.sleep(1.5)                                  # inside the function's sleep
    cluster.node_procs[cluster.node_name(victim)].kill()
    assert fc.get(timeout=120) == 7
    state = fc.last_state
    assert state["result"]["node_id"] != victim
    assert state["attempts"] == 2, state

    # without retries the caller gets a clear error
    fc = slow_once.spawn(8)
    st = wait_for(lambda: (s := client.json("GET", f"/v1/calls/{fc.object_id}"))["status"]
                  == "running" and s, 60, "the call to start")
    victim2 = st["placement"]["node_id"]
    time.sleep(1.5)
    cluster.node_procs[cluster.node_name(victim2)].kill()
    with pytest.raises(NodeUnavailableError, match=r"was lost.*no retries left"):
        fc.get(timeout=120)

    for nid in {victim, victim2}:                     # back up: they clean up after themselves
        cluster.start_node(cluster.node_name(nid))
    cluster.wait_nodes(3, 120, names=["n1", "n2", "n3"])


def test_a_frozen_node_does_not_block_the_others(cluster, client, deployed):
    frozen = cluster.node_procs["n3"]
    frozen.signal(signal.SIGSTOP)
    try:
        calls = [quick.spawn(i) for i in range(6)]
        # answered while n3 is still frozen: calls placed there are retried once it
        # misses its heartbeats
        assert [c.get(timeout=60) for c in calls] == list(range(6))
        assert all(c.last_state["result"]["node_id"] != "node-n3" for c in calls)
    finally:
        frozen.signal(signal.SIGCONT)
    cluster.wait_nodes(3, 60, names=["n1", "n2", "n3"])


def test_dispatcher_killed_with_calls_in_flight_loses_none(cluster, client, deployed):
    calls = [sleepy.spawn(i) for i in range(6)]
    wait_for(lambda: sum(client.json("GET", f"/v1/calls/{c.object_id}")["status"] == "running"
                         for c in calls) >= 3, 60, "calls to run")
    cluster.restart_dispatcher("d1", kill=True)       # kill -9, then the same replica again
    wait_for(lambda: _healthy(cluster), 60, "the dispatcher to come back")
    assert [c.get(timeout=120) for c in calls] == list(range(6))
    assert max(c.last_state["attempts"] for c in calls) >= 2     # driven again


def _healthy(cluster) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=2)
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False


def _conn_to(cluster, replica: str) -> http.client.HTTPConnection:
    """A keep-alive connection that the kernel gave to `replica` (SO_REUSEPORT)."""
    for _ in range(200):
        conn = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=60)
        conn.request("GET", "/healthz")
        if json.loads(conn.getresponse().read())["replica"] == replica:
            return conn
        conn.close()
    raise AssertionError(f"no connection reached replica {replica}")


def _req(conn, method, path, body=None, token=""):
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"Authorization": f"Bearer {token}",
                          "Content-Type": "application/json"})
    r = conn.getresponse()
    data = json.loads(r.read())
    assert r.status == 200, data
    return data


def test_two_replicas_behind_one_port(cluster, client, deployed):
    cluster.start_dispatcher("d2")
    wait_for(lambda: len(client.json("GET", "/v1/status")["replicas"]) == 2, 30,
             "the second replica")
    one, two = _conn_to(cluster, "d1"), _conn_to(cluster, "d2")
    tok = cluster.token
    for submit, poll in ((one, two), (two, one)):
        args = base64.b64encode(dumps_args((41,), {})).decode()
        cid = _req(submit, "POST", "/v1/calls", {"function_id": sleepy.object_id,
                                                 "args_b64": args}, tok)["call_id"]
        # a long poll on the other replica returns when the result is stored (pub/sub)
        state = _req(poll, "GET", f"/v1/calls/{cid}?wait=30", None, tok)
        while state["status"] not in ("succeeded", "failed"):
            state = _req(poll, "GET", f"/v1/calls/{cid}?wait=30", None, tok)
        assert state["status"] == "succeeded", state
        assert FunctionCall(cid, client).get(timeout=10) == 41
    one.close()
    two.close()
    # the SDK through the shared address reaches both
    assert list(noop.map(range(50))) == list(range(50))


def test_burst_of_500_with_a_bounded_queue(cluster, client, deployed):
    before = client.json("GET", "/v1/status")["stats"].get("overloaded", 0)
    with ThreadPoolExecutor(16) as ex:
        calls = list(ex.map(noop.spawn, range(500)))
    assert [c.get(timeout=120) for c in calls] == list(range(500))
    after = client.json("GET", "/v1/status")["stats"].get("overloaded", 0)
    assert after > before, "no submission was refused with 429: the bound did not bite"
