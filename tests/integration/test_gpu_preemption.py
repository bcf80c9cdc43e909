"""GPU priorities with preemption (issue 8), end to end without a GPU: a dispatcher and
one node daemon whose NVML is the fake one-A10G machine (RUNTIMED_FAKE_GPUS=a10g_1x), so
its single GPU is scheduled, reserved and preempted as a real one would be while the
functions run on the CPU.

A low-priority call holds the only GPU; a high-priority call arrives: the node kills the
low call's container, the dispatcher requeues the low call (not a retry: it has
retries=0), the high call completes, then the low one runs again and returns its own
result, with a record of who preempted it. A call of equal priority waits instead.
Functions here run remotely: they must not use pytest or sdk.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from runtimed.devcluster import LocalCluster, running, wait_for
from sdk import App, Image

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PYTHON = os.environ.get("RUNTIMED_TEST_PYTHON", "/opt/runtimed/venv/bin/python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable

app = App("gpu-preemption-tests", image=Image.debian_slim())


@app.function(gpu="A10G", retries=0, timeout=120, scaledown_window=2)
def low(x):
    import time as _t
    print("low started", flush=True)
    _t.sleep(6)
    return x * 2


@app.function(gpu="A10G", priority=10, timeout=60, scaledown_window=2)
def high(x):
    import time as _t
    _t.sleep(1)
    return f"high {x}"


@app.function(gpu="A10G", timeout=60, scaledown_window=2)
def peer(x):
    return x + 1


@pytest.fixture(scope="module")
def cluster():
    cl = LocalCluster(backend="sqlite", nodes=1, python=PYTHON,
                      node_env={"RUNTIMED_FAKE_GPUS": "a10g_1x"})
    with running(cl):
        yield cl



def record(client, cid) -> dict:
    return next(c for c in client.json("GET", "/v1/calls?limit=200")["calls"] if c["id"] == cid)


def logged(client, cid, text) -> bool:
    return any(text in e["text"] for e in client.json("GET", f"/v1/calls/{cid}/logs")["logs"])


def gpu_holders(client) -> list[dict]:
    return [a for n in client.json("GET", "/v1/nodes")["nodes"] if n["alive"]
            for a in n["gpu_allocations"]]


def holds_gpu(client, cid) -> bool:
    """The dispatcher has heard from the node that `cid` runs on its GPU."""
    return any(a.get("call_id") == cid and not a["idle"] for a in gpu_holders(client))


def gpu_free(client) -> bool:
    """No call runs on a GPU (idle containers holding one count as free)."""
    return all(a["idle"] for a in gpu_holders(client))


def test_the_fake_gpu_node_offers_one_a10g(cluster, client):
    nodes = [n for n in client.json("GET", "/v1/nodes")["nodes"] if n["alive"]]
    assert len(nodes) == 1 and nodes[0]["gpus"] == 1


def test_high_priority_preempts_low_which_is_requeued_and_completes(cluster, client,
                                                                    deployed):
    lo = low.spawn(21)
    wait_for(lambda: logged(client, lo.object_id, "low started"), 90, "the low call to run")
    wait_for(lambda: holds_gpu(client, lo.object_id), 10, "a heartbeat naming the low call")
    hi = high.spawn("now")
    assert hi.get(timeout=90) == "high now"
    assert lo.get(timeout=120) == 42                         # its own result, not lost

    hi_rec, lo_rec = record(client, hi.object_id), record(client, lo.object_id)
    assert hi_rec["status"] == lo_rec["status"] == "succeeded"
    assert hi_rec["placement"]["reason"] == "preempt", hi_rec["placement"]
    assert [v["call_id"] for v in hi_rec["placement"]["preempts"]] == [lo.object_id]
    # the low call ran twice (retries=0: the preempted attempt did not count) ...
    assert lo_rec["attempts"] == 2
    (ev,) = lo_rec["events"]
    assert ev["type"] == "preempted" and ev["by_call"] == hi.object_id
    assert ev["node_id"] == "node-n1" and ev["attempt"] == 1 and ev["priority"] == 10
    # ... and finished after the high call, which ran in the GPU it freed
    assert lo_rec["finished"] > hi_rec["finished"]
    st = client.json("GET", f"/v1/calls/{lo.object_id}?wait=0")
    assert st["events"][0]["by_call"] == hi.object_id
    env = dict(os.environ, RUNTIMED_URL=cluster.url, RUNTIMED_TOKEN=cluster.token,
               RUNTIMED_STATE=str(cluster.state))
    out = subprocess.run([PYTHON, "-m", "runtimed.cli", "calls", "--limit", "20"], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith(lo.object_id))
    assert f"preempted by {hi.object_id} (node-n1)" in line, out


def test_equal_priority_waits_instead_of_preempting(cluster, client, deployed):
    wait_for(lambda: gpu_free(client), 60, "the GPU to be free")
    lo = low.spawn(5)
    wait_for(lambda: logged(client, lo.object_id, "low started"), 90, "the low call to run")
    wait_for(lambda: holds_gpu(client, lo.object_id), 10, "a heartbeat naming the low call")
    same = peer.spawn(1)
    assert same.get(timeout=120) == 2
    assert lo.get(timeout=120) == 10
    lo_rec, same_rec = record(client, lo.object_id), record(client, same.object_id)
    assert lo_rec["attempts"] == 1 and not lo_rec["events"]
    assert same_rec["placement"]["reason"] != "preempt"
    assert same_rec["started"] >= lo_rec["finished"] - 0.5    # it got the GPU afterwards
