"""Dispatcher placement of GPU functions across nodes (fake NVML inventories)."""
import pytest

from cuda_restore import fake_nvml
from cuda_restore.errors import GpuUnsatisfiableError
from cuda_restore.inventory import read_inventory
from runtimed.placement import NodeView, place


def node(nid, preset=None, allocations=(), warm=None, snapshots=()):
    inv = read_inventory(nvml=preset()) if preset else None
    return NodeView(nid, 100_000, 0, warm=warm or {}, snapshots=frozenset(snapshots),
                    gpus=len(inv.gpus) if inv else 0,
                    gpu_inventory=inv.to_wire() if inv else None,
                    gpu_allocations=tuple(allocations))


def test_gpu_function_goes_to_a_node_with_that_gpu():
    nodes = [node("cpu"), node("a10", fake_nvml.a10g_1x), node("h100", fake_nvml.h100_sxm_8x)]
    assert place(nodes, "fn", [], 512, gpu="H100").node_id == "h100"
    assert place(nodes, "fn", [], 512, gpu="A10G").node_id == "a10"
    assert place(nodes, "fn", [], 512, gpu="any").node_id in ("a10", "h100")


def test_cpu_function_ignores_gpus_and_gpu_snapshot_affinity_applies():
    nodes = [node("h1", fake_nvml.h100_sxm_8x), node("h2", fake_nvml.h100_sxm_8x,
                                                      snapshots=("fn",))]
    p = place(nodes, "fn", [], 512, gpu="H100:2")
    assert (p.node_id, p.reason) == ("h2", "snapshot")


def test_impossible_request_is_a_clear_error():
    nodes = [node("cpu"), node("a10", fake_nvml.a10g_1x)]
    with pytest.raises(GpuUnsatisfiableError):
        place(nodes, "fn", [], 512, gpu="H100:8")


def test_busy_gpus_mean_wait_not_error():
    busy = [{"alloc_id": "x", "gpus": [0], "memory_mib": 24_000, "exclusive": True,
             "priority": 0, "owner": "x"}]
    nodes = [node("a10", fake_nvml.a10g_1x, allocations=busy)]
    p = place(nodes, "fn", [], 512, gpu="A10G")
    assert p.node_id is None and p.wait_reason == "gpu"


def busy_alloc(aid, prio, *, idle=False, call_id=None):
    return {"alloc_id": aid, "gpus": [0], "memory_mib": 24_000, "exclusive": True,
            "priority": prio, "owner": aid, "idle": idle, "call_id": call_id}


def test_higher_priority_preempts_the_busy_lower_call_and_names_it():
    nodes = [node("a10", fake_nvml.a10g_1x,
                  allocations=[busy_alloc("ctr-1", 0, call_id="call-low")])]
    p = place(nodes, "fn", [], 512, gpu="A10G", priority=10)
    assert (p.node_id, p.reason) == ("a10", "preempt")
    assert p.victims == ({"alloc_id": "ctr-1", "call_id": "call-low", "priority": 0},)
    assert p.to_wire()["preempts"] == list(p.victims)


def test_equal_priority_waits_instead_of_preempting():
    nodes = [node("a10", fake_nvml.a10g_1x,
                  allocations=[busy_alloc("ctr-1", 10, call_id="call-a")])]
    p = place(nodes, "fn", [], 512, gpu="A10G", priority=10)
    assert p.node_id is None and p.wait_reason == "gpu" and p.victims == ()


def test_idle_holders_count_as_free_gpus():
    nodes = [node("a10", fake_nvml.a10g_1x, allocations=[busy_alloc("ctr-1", 99, idle=True)])]
    p = place(nodes, "fn", [], 512, gpu="A10G")
    assert p.node_id == "a10" and p.reason != "preempt" and not p.victims


def test_preemption_prefers_the_cheapest_node_and_a_free_gpu_beats_any_preemption():
    low = node("a", fake_nvml.a10g_1x, allocations=[busy_alloc("x", 0, call_id="c0")])
    mid = node("b", fake_nvml.a10g_1x, allocations=[busy_alloc("y", 5, call_id="c5")])
    assert place([mid, low], "fn", [], 512, gpu="A10G", priority=10).node_id == "a"
    free = node("c", fake_nvml.a10g_1x)
    assert place([low, free], "fn", [], 512, gpu="A10G", priority=10).node_id == "c"
