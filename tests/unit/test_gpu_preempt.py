"""cuda_restore.preempt: which holders leave which GPUs (idle ones are free, busy ones
only for a strictly higher priority), and the node's reservation that acts on it."""
from __future__ import annotations

import asyncio

import pytest

from cuda_restore import fake_nvml
from cuda_restore.errors import NoCapacityError
from cuda_restore.inventory import read_inventory
from cuda_restore.preempt import plan_eviction
from cuda_restore.request import function_gpu_request, parse_gpu_request
from cuda_restore.scheduler import Allocation, GpuLedger

A10G = {"n": read_inventory(nvml=fake_nvml.a10g_1x())}
H100 = {"n": read_inventory(nvml=fake_nvml.h100_sxm_8x())}


def held(*allocs: tuple[str, list[int], int]) -> GpuLedger:
    return GpuLedger([Allocation(aid, "n", tuple(gpus), 80_000, True, prio, aid)
                      for aid, gpus, prio in allocs])


def req(spec: str, priority: int = 0):
    return parse_gpu_request(spec, priority=priority)


def test_a_free_gpu_stops_nothing():
    ev = plan_eviction(req("H100", 5), H100, held(("a", [0], 0)))
    assert ev.preempted == ev.reclaimed == () and ev.placement.victims == ()
    assert ev.placement.gpus != (0,)


def test_an_idle_holder_is_reclaimed_whatever_its_priority():
    ledger = held(("idle-hi", [0], 100))
    ev = plan_eviction(req("A10G", 0), A10G, ledger, frozenset({"idle-hi"}))
    assert [a.alloc_id for a in ev.reclaimed] == ["idle-hi"] and ev.preempted == ()
    assert ev.cost == (0, 0, 0)
    alloc, evicted = ledger.allocate("new", ev.placement, owner="new")
    assert [a.alloc_id for a in evicted] == ["idle-hi"] and ledger.allocations == (alloc,)


def test_an_equal_priority_busy_holder_is_never_preempted():
    with pytest.raises(NoCapacityError):
        plan_eviction(req("A10G", 5), A10G, held(("busy", [0], 5)))


def test_a_higher_priority_preempts_the_busy_lower_one():
    ledger = held(("low", [0], 0))
    ev = plan_eviction(req("A10G", 10), A10G, ledger)
    assert [a.alloc_id for a in ev.preempted] == ["low"] and ev.reclaimed == ()
    assert ev.cost == (1, 0, 80_000)
    with pytest.raises(NoCapacityError):
        plan_eviction(req("A10G", 10), A10G, ledger, allow_preemption=False)


def test_idle_holders_go_before_any_busy_one_is_preempted():
    # 8 GPUs: seven busy at priority 0, one idle at priority 50
    ledger = held(*[(f"b{i}", [i], 0) for i in range(7)], ("idle", [7], 50))
    ev = plan_eviction(req("H100", 10), H100, ledger, frozenset({"idle"}))
    assert ev.placement.gpus == (7,) and ev.preempted == ()
    assert [a.alloc_id for a in ev.reclaimed] == ["idle"]


def test_preemption_takes_the_lowest_priority_and_reclaims_idle_ones_on_the_gpus():
    ledger = held(*[(f"b{i}", [i], 1) for i in range(6)], ("b6", [6], 0),
                  ("idle", [7], 0))
    ev = plan_eviction(req("H100:2", 10), H100, ledger, frozenset({"idle"}))
    assert ev.placement.gpus == (6, 7)
    assert [a.alloc_id for a in ev.preempted] == ["b6"]
    assert [a.alloc_id for a in ev.reclaimed] == ["idle"]
    assert {v.alloc_id for v in ev.placement.victims} == {"b6", "idle"}


def test_function_request_carries_the_function_priority():
    assert function_gpu_request({"gpu": "A10G", "priority": 7}).priority == 7
    assert function_gpu_request({"gpu": "A10G"}).priority == 0
    assert function_gpu_request({"priority": 3}) is None


# -- the node's reservation (RUNTIMED_FAKE_GPUS) -----------------------------------------------
def test_node_reservation_preempts_and_reports_what_to_stop(tmp_path, monkeypatch):
    from runtimed.node import NodeGpus
    monkeypatch.setenv("RUNTIMED_FAKE_GPUS", "a10g_1x")
    gpus = NodeGpus(tmp_path)
    gpus.start()
    assert len(gpus.inventory.gpus) == 1 and gpus.fake == "a10g_1x"
    low = {"id": "fn-low", "gpu": "A10G"}
    high = {"id": "fn-high", "gpu": "A10G", "priority": 10}

    async def scenario():
        assert await gpus.reserve({"id": "fn-cpu"}, "ctr-cpu", frozenset) == (None, None)
        assignment, ev = await gpus.reserve(low, "ctr-low", frozenset)
        assert assignment is None and ev.preempted == ()      # fake: nothing to bind
        # the same priority waits (and gives up after its timeout)
        with pytest.raises(NoCapacityError):
            await gpus.reserve(dict(low, id="fn-low2"), "ctr-low2", frozenset, timeout=0.05)
        wire = gpus.allocations_wire(frozenset(), {"ctr-low": "call-low"})
        assert wire[0]["call_id"] == "call-low" and wire[0]["idle"] is False
        _, ev = await gpus.reserve(high, "ctr-high", frozenset)
        assert [a.alloc_id for a in ev.preempted] == ["ctr-low"]
        assert [a.alloc_id for a in gpus.ledger.allocations] == ["ctr-high"]
        await gpus.release("ctr-low")          # the stopped container's own release: no-op
        assert [a.alloc_id for a in gpus.ledger.allocations] == ["ctr-high"]
        # once the high one is idle, a low one may take the GPU (nothing is lost)
        _, ev = await gpus.reserve(low, "ctr-low3", lambda: frozenset({"ctr-high"}))
        assert [a.alloc_id for a in ev.reclaimed] == ["ctr-high"] and ev.preempted == ()
    asyncio.run(scenario())


def test_unknown_fake_gpu_preset_is_refused(tmp_path, monkeypatch):
    from runtimed.node import NodeGpus
    from sdk.exception import InvalidError
    monkeypatch.setenv("RUNTIMED_FAKE_GPUS", "tpu_v5")
    with pytest.raises(InvalidError, match="a10g_1x"):
        NodeGpus(tmp_path)
