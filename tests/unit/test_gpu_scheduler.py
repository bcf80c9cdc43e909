"""cuda_restore.scheduler over fake node inventories: type, memory, NVLink sets, bin
packing, exclusivity, preemption with requeue, and impossible-ever vs busy-now."""
from __future__ import annotations

import random

import pytest

from cuda_restore import fake_nvml
from cuda_restore.errors import GpuUnsatisfiableError, NoCapacityError
from cuda_restore.inventory import read_inventory
from cuda_restore.request import parse_gpu_request
from cuda_restore.scheduler import Allocation, GpuLedger, place
from sdk.exception import InvalidError, NodeUnavailableError

GIB = 1024


def inv(preset: str, **kw):
    return read_inventory(fake_nvml.PRESETS[preset](**kw))


def cluster(**nodes):
    return {name: inv(preset) for name, preset in nodes.items()}


def req(spec, **kw):
    return parse_gpu_request(spec, **kw)


def hold(ledger: GpuLedger, node: str, gpus, *, mem=None, exclusive=True, prio=0, aid=None,
         total=81559):
    aid = aid or f"a{len(ledger.allocations)}-{node}-{'-'.join(map(str, gpus))}"
    a = Allocation(aid, node, tuple(gpus), mem if mem is not None else total, exclusive, prio,
                   owner=f"call-{aid}")
    ledger.replace_node(node, list(ledger.on_node(node)) + [a])
    return a


# -- type and memory -----------------------------------------------------------------------------
def test_type_match_picks_the_node_with_that_gpu():
    nodes = cluster(h="h100_sxm_8x", a="a100_80gb_4x_pairs", g="a10g_1x")
    assert place(req("A10G"), nodes, GpuLedger()).node_id == "g"
    assert place(req("a100-80gb:2"), nodes, GpuLedger()).node_id == "a"
    p = place(req("H100"), nodes, GpuLedger())
    assert p.node_id == "h" and p.gpu_type == "H100-80GB" and p.uuids[0].startswith("GPU-")


def test_any_takes_any_type_and_a_preference_list_goes_in_order():
    nodes = cluster(a="a100_80gb_4x_pairs", g="a10g_1x")
    assert place(req("any"), nodes, GpuLedger()).node_id in ("a", "g")
    nodes = cluster(h="h100_sxm_8x", a="a100_80gb_4x_pairs")
    assert place(req(["H100", "A100-80GB"]), nodes, GpuLedger()).node_id == "h"
    ledger = GpuLedger()
    for i in range(8):
        hold(ledger, "h", [i])
    p = place(req(["H100", "A100-80GB"]), nodes, ledger)
    assert p.node_id == "a" and not p.victims       # another type before any preemption


def test_memory_need_is_checked_against_free_memory_nvml_reports():
    nodes = {"g": inv("a10g_1x", used_mib={0: 20_000})}          # a foreign process
    with pytest.raises(NoCapacityError):
        place(req("A10G", memory_gib=8, share=True), nodes, GpuLedger())
    p = place(req("A10G", memory_gib=2, share=True), nodes, GpuLedger())
    assert p.memory_mib == 2 * GIB and not p.exclusive


def test_mig_gpus_are_never_handed_out():
    nodes = cluster(m="h100_pcie_2x_one_mig")
    assert place(req("H100"), nodes, GpuLedger()).gpus == (0,)
    with pytest.raises(GpuUnsatisfiableError):
        place(req("H100:2"), nodes, GpuLedger())


# -- multi-GPU and NVLink ------------------------------------------------------------------------
def test_two_gpus_on_a100_pairs_come_from_one_nvlink_pair():
    nodes = cluster(a="a100_80gb_4x_pairs")
    p = place(req("A100:2"), nodes, GpuLedger())
    assert p.gpus in ((0, 1), (2, 3)) and p.nvlink_pairs == 1 == p.pairs
    ledger = GpuLedger()
    hold(ledger, "a", [0], total=81920)
    assert place(req("A100:2"), nodes, ledger).gpus == (2, 3)     # not 1+2 across pairs


def test_without_an_nvlink_pair_left_it_still_places_across_pcie():
    nodes = cluster(a="a100_80gb_4x_pairs")
    ledger = GpuLedger()
    hold(ledger, "a", [0], total=81920)
    hold(ledger, "a", [2], total=81920)
    p = place(req("A100:2"), nodes, ledger)
    assert p.gpus == (1, 3) and p.nvlink_pairs == 0 and p.pairs == 1


def test_four_h100s_stay_on_one_socket():
    p = place(req("H100:4"), cluster(h="h100_sxm_8x"), GpuLedger())
    assert p.nvlink_pairs == 6 and p.gpus in ((0, 1, 2, 3), (4, 5, 6, 7))
    assert place(req("H100:8"), cluster(h="h100_sxm_8x"), GpuLedger()).gpus == tuple(range(8))


def test_nvlink_beats_packing_across_nodes():
    # node b has an idle NVLink pair; node a only two idle GPUs across pairs
    nodes = cluster(a="a100_80gb_4x_pairs", b="a100_80gb_4x_pairs")
    ledger = GpuLedger()
    hold(ledger, "a", [0], total=81920)
    hold(ledger, "a", [2], total=81920)
    hold(ledger, "b", [0], total=81920)
    p = place(req("A100:2"), nodes, ledger)
    assert (p.node_id, p.gpus) == ("b", (2, 3))


# -- exclusivity and bin packing -----------------------------------------------------------------
def test_single_exclusive_job_keeps_idle_nvlink_pairs_whole():
    nodes = cluster(a="a100_80gb_4x_pairs")
    ledger = GpuLedger()
    hold(ledger, "a", [0], total=81920)
    assert place(req("A100"), nodes, ledger).gpus == (1,)


def test_exclusive_jobs_pack_onto_the_busiest_node():
    nodes = cluster(x="h100_sxm_8x", y="h100_sxm_8x")
    ledger = GpuLedger()
    for i in range(5):
        hold(ledger, "y", [i])
    assert place(req("H100"), nodes, ledger).node_id == "y"


def test_exclusive_jobs_only_get_idle_gpus():
    nodes = cluster(g="a10g_1x")
    ledger = GpuLedger()
    hold(ledger, "g", [0], mem=1 * GIB, exclusive=False)
    with pytest.raises(NoCapacityError):
        place(req("A10G"), nodes, ledger, allow_preemption=False)


def test_shared_jobs_never_join_an_exclusive_gpu():
    nodes = cluster(g="a10g_1x")
    ledger = GpuLedger()
    hold(ledger, "g", [0], total=23028)
    with pytest.raises(NoCapacityError):
        place(req("A10G", memory_gib=1, share=True), nodes, ledger)


def test_shared_jobs_best_fit_onto_partly_used_gpus():
    nodes = cluster(h="h100_sxm_8x")
    ledger = GpuLedger()
    hold(ledger, "h", [5], mem=60 * GIB, exclusive=False)
    hold(ledger, "h", [6], mem=10 * GIB, exclusive=False)
    assert place(req("H100", memory_gib=15, share=True), nodes, ledger).gpus == (5,)
    # too big for GPU 5's remaining ~19.6 GiB: the next tightest is GPU 6
    assert place(req("H100", memory_gib=30, share=True), nodes, ledger).gpus == (6,)


def test_many_small_shared_jobs_fill_one_gpu_before_the_next():
    nodes = cluster(a="a100_80gb_4x_pairs")
    ledger = GpuLedger()
    used = []
    for i in range(10):
        p = place(req("A100", memory_gib=8, share=True), nodes, ledger)
        ledger.allocate(f"s{i}", p)
        used.append(p.gpus[0])
    assert used == [used[0]] * 10           # 10 x 8 GiB fill an 80 GiB A100 exactly
    p = place(req("A100", memory_gib=8, share=True), nodes, ledger)
    assert p.gpus[0] != used[0]             # the eleventh goes elsewhere


# -- preemption ----------------------------------------------------------------------------------
def test_high_priority_preempts_lower_and_the_victims_come_back_for_requeue():
    nodes = cluster(g="a10g_1x")
    ledger = GpuLedger()
    low = hold(ledger, "g", [0], prio=0, total=23028)
    p = place(req("A10G", priority=10), nodes, ledger)
    assert p.victims == (low,)
    alloc, evicted = ledger.allocate("hi", p, owner="call-hi")
    assert evicted == (low,) and evicted[0].owner == low.owner
    assert ledger.allocations == (alloc,) and alloc.priority == 10


def test_equal_or_higher_priority_is_never_preempted():
    nodes = cluster(g="a10g_1x")
    ledger = GpuLedger()
    hold(ledger, "g", [0], prio=10, total=23028)
    with pytest.raises(NoCapacityError):
        place(req("A10G", priority=10), nodes, ledger)


def test_preemption_picks_the_fewest_and_cheapest_victims():
    nodes = cluster(h="h100_sxm_8x")
    ledger = GpuLedger()
    for i in range(8):
        if i == 3:
            continue
        hold(ledger, "h", [i], prio=0)
    # GPU 3: two small shared jobs, so taking it whole would evict two
    hold(ledger, "h", [3], mem=10 * GIB, exclusive=False, prio=0, aid="s1")
    hold(ledger, "h", [3], mem=5 * GIB, exclusive=False, prio=0, aid="s2")
    p = place(req("H100", priority=5), nodes, ledger)
    assert len(p.victims) == 1 and p.gpus != (3,)
    # among single victims, the lowest priority goes first
    ledger2 = GpuLedger()
    for i in range(8):
        hold(ledger2, "h", [i], prio=-3 if i == 6 else 0)
    assert place(req("H100", priority=5), nodes, ledger2).gpus == (6,)


def test_shared_preemption_evicts_only_what_is_needed():
    nodes = cluster(g="a10g_1x")
    ledger = GpuLedger()
    hold(ledger, "g", [0], mem=10 * GIB, exclusive=False, prio=0, aid="big")
    hold(ledger, "g", [0], mem=8 * GIB, exclusive=False, prio=1, aid="mid")
    hold(ledger, "g", [0], mem=2 * GIB, exclusive=False, prio=0, aid="small")
    # 22.4 GiB total, 20 reserved: 6 GiB needs one eviction, lowest priority, largest first
    p = place(req("A10G", memory_gib=6, share=True, priority=3), nodes, ledger)
    assert [v.alloc_id for v in p.victims] == ["big"]


def test_a_multi_gpu_victim_is_evicted_whole():
    nodes = cluster(a="a100_80gb_4x_pairs")
    ledger = GpuLedger()
    big = hold(ledger, "a", [0, 1], prio=0, total=81920)
    hold(ledger, "a", [2, 3], prio=9, total=81920)
    p = place(req("A100", priority=5), nodes, ledger)
    assert p.victims == (big,) and p.gpus[0] in (0, 1)
    _, evicted = ledger.allocate("hi", p)
    assert evicted == (big,)
    assert place(req("A100"), nodes, ledger).gpus[0] in (0, 1)   # its other GPU is free now


def test_a_victim_that_turns_out_unneeded_is_spared():
    # GPU 0: A (40 GiB) + X (30 GiB on both GPUs); GPU 1: X + B (45 GiB, priority 1).
    # Per GPU, A goes first on GPU 0 and X on GPU 1; but evicting X alone frees enough.
    nodes = cluster(a="a100_80gb_4x_pairs")
    ledger = GpuLedger()
    hold(ledger, "a", [0, 1], mem=30 * GIB, exclusive=False, prio=0, aid="X")
    hold(ledger, "a", [0], mem=40 * GIB, exclusive=False, prio=0, aid="A")
    hold(ledger, "a", [1], mem=45 * GIB, exclusive=False, prio=1, aid="B")
    hold(ledger, "a", [2, 3], prio=9, aid="busy", total=81920)
    p = place(req("A100:2", memory_gib=30, share=True, priority=5), nodes, ledger)
    assert p.gpus == (0, 1) and [v.alloc_id for v in p.victims] == ["X"]


# -- impossible ever vs busy now -----------------------------------------------------------------
@pytest.mark.parametrize("spec,kw", [
    ("H100", {}),                                   # no node has that type
    ("A100:8", {}),                                 # no node has that many
    ("A10G", dict(memory_gib=23, share=True)),      # no GPU that big
    ("A100-40GB", {}),                              # only the 80 GB variant exists
])
def test_impossible_ever(spec, kw):
    nodes = cluster(a="a100_80gb_4x_pairs", g="a10g_1x")
    with pytest.raises(GpuUnsatisfiableError) as ei:
        place(req(spec, **kw), nodes, GpuLedger())
    msg = str(ei.value)
    assert "a: 4x A100-80GB" in msg and "g: 1x A10G-24GB" in msg
    assert isinstance(ei.value, InvalidError)


def test_impossible_with_no_nodes_or_gpu_less_nodes():
    with pytest.raises(GpuUnsatisfiableError, match="no nodes"):
        place(req("any"), {}, GpuLedger())
    with pytest.raises(GpuUnsatisfiableError, match="no GPU"):
        place(req("any"), cluster(c="no_gpu"), GpuLedger())


def test_busy_now_is_a_retryable_no_capacity_error():
    nodes = cluster(a="a100_80gb_4x_pairs")
    ledger = GpuLedger()
    hold(ledger, "a", [0, 1, 2, 3], prio=0, total=81920)
    with pytest.raises(NoCapacityError) as ei:
        place(req("A100:2"), nodes, ledger)
    assert isinstance(ei.value, NodeUnavailableError) and ei.value.code == "node_unavailable"
    assert "1 node(s) could run it" in str(ei.value)


# -- the ledger ----------------------------------------------------------------------------------
def test_commit_of_a_stale_placement_fails_and_changes_nothing():
    nodes = cluster(g="a10g_1x")
    ledger = GpuLedger()
    p1 = place(req("A10G"), nodes, ledger)
    p2 = place(req("A10G"), nodes, ledger)          # decided on the same state
    ledger.allocate("one", p1)
    with pytest.raises(NoCapacityError):
        ledger.allocate("two", p2)
    assert [a.alloc_id for a in ledger.allocations] == ["one"]
    with pytest.raises(ValueError):
        ledger.allocate("one", p1)


def test_release_and_node_loss():
    ledger = GpuLedger()
    a = hold(ledger, "n1", [0])
    b = hold(ledger, "n1", [1])
    c = hold(ledger, "n2", [0])
    assert ledger.release(a.alloc_id) == a and ledger.release(a.alloc_id) is None
    assert ledger.release_node("n1") == (b,)
    assert ledger.allocations == (c,)
    ledger.replace_node("n2", [Allocation.from_wire(x) for x in ledger.to_wire("n2")])
    assert ledger.allocations == (c,)


def test_random_workload_keeps_the_invariants_and_loses_no_job():
    rng = random.Random(7)
    nodes = cluster(h="h100_sxm_8x", a="a100_80gb_4x_pairs", g="a10g_1x")
    ledger = GpuLedger()
    live: set[str] = set()
    finished: set[str] = set()
    requeued: list[str] = []
    submitted = 0
    specs = ["H100", "H100:2", "A100:2", "any", "A10G", "H100:4", "A100-80GB"]
    for step in range(600):
        if live and rng.random() < 0.35:
            aid = rng.choice(sorted(live))
            assert ledger.release(aid) is not None
            live.discard(aid)
            finished.add(aid)
            continue
        share = rng.random() < 0.4
        r = req(rng.choice(specs), memory_gib=rng.choice([4, 12, 20]) if share else None,
                share=share, priority=rng.choice([0, 0, 1, 5]))
        try:
            p = place(r, nodes, ledger)
        except NoCapacityError:
            continue
        aid = f"j{step}"
        submitted += 1
        _, evicted = ledger.allocate(aid, p, owner=aid)
        for v in evicted:
            assert v.priority < r.priority
            live.discard(v.owner)
            requeued.append(v.owner)
        live.add(aid)
        # invariants on every GPU
        for node_id, node in nodes.items():
            for g in node.gpus:
                on = ledger.on_gpu(node_id, g.index)
                assert not any(a.exclusive for a in on) or len(on) == 1
                assert sum(a.memory_mib for a in on) <= g.memory_total_mib
    assert {a.alloc_id for a in ledger.allocations} == live
    assert len(live) + len(finished) + len(requeued) == submitted     # nobody lost
    assert requeued                                                    # preemption happened
