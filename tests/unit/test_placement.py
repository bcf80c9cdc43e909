"""runtimed.placement: warm > snapshot > layers > least loaded; ties by load; a full best
node is named as `wait_for` (the caller may queue briefly for it)."""
from __future__ import annotations

import random

from runtimed.placement import NodeView, place

FN = "fn-1"
KEYS = ["base", "numpy"]


def node(nid, *, mem=1000, reserved=0, inflight=0, warm=0, snap=False, layers=(), gpus=0):
    return NodeView(nid, mem, reserved, inflight, {FN: warm} if warm else {},
                    frozenset([FN]) if snap else frozenset(), frozenset(layers), gpus)


def test_no_nodes():
    p = place([], FN, KEYS, 128)
    assert p.node_id is None and p.reason == "no_nodes"


def test_tier_order():
    a = node("a", layers=KEYS)
    b = node("b", snap=True)
    c = node("c", warm=1)
    d = node("d")
    assert place([a, b, c, d], FN, KEYS, 128).to_wire()["reason"] == "warm"
    assert place([a, b, c, d], FN, KEYS, 128).node_id == "c"
    assert place([a, b, d], FN, KEYS, 128).node_id == "b"
    assert place([a, b, d], FN, KEYS, 128).reason == "snapshot"
    assert place([a, d], FN, KEYS, 128).reason == "layers"
    assert place([d], FN, KEYS, 128).reason == "least_loaded"


def test_partial_layers_do_not_count():
    a = node("a", layers=["base"], inflight=0)
    b = node("b", inflight=1)
    assert place([a, b], FN, KEYS, 128).reason == "least_loaded"


def test_ties_broken_by_load():
    busy = node("busy", snap=True, inflight=3)
    idle = node("idle", snap=True, inflight=1)
    assert place([busy, idle], FN, KEYS, 128).node_id == "idle"
    heavy = node("heavy", reserved=900)
    light = node("light", reserved=100)
    assert place([heavy, light], FN, KEYS, 50).node_id == "light"


def test_full_best_node_is_named_to_wait_for():
    full = node("a", snap=True, reserved=950)
    other = node("b")
    p = place([full, other], FN, KEYS, 128)
    assert p.node_id == "b" and p.reason == "least_loaded"
    assert p.wait_for == "a" and p.wait_reason == "snapshot"


def test_nothing_fits():
    p = place([node("a", reserved=990), node("b", reserved=995)], FN, KEYS, 128)
    assert p.node_id is None and p.reason == "full" and p.wait_for == "a"


def test_a_warm_container_fits_a_full_node():
    p = place([node("a", warm=1, reserved=1000), node("b")], FN, KEYS, 128)
    assert p.node_id == "a" and p.reason == "warm" and p.wait_for is None


def test_random_policy_ignores_affinity():
    nodes = [node("a", snap=True), node("b"), node("c")]
    rng = random.Random(0)
    chosen = {place(nodes, FN, KEYS, 128, "random", rng).node_id for _ in range(60)}
    assert chosen == {"a", "b", "c"}
    assert place(nodes, FN, KEYS, 128, "random", rng).reason == "random"


def test_record_is_json_ready():
    import json
    rec = place([node("a", snap=True)], FN, KEYS, 128).to_wire()
    assert json.loads(json.dumps(rec)) == rec
    assert set(rec) == {"node_id", "reason", "wait_for", "wait_reason", "candidates"}
