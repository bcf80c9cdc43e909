"""Placement: which node runs a call. Pure over node views; the dispatcher adapts.

Preference, best first (DESIGN.md):
    warm     a node with an idle warm container of the function
    snapshot a node holding the function's snapshot (restore instead of cold start)
    layers   a node holding all the image's layers (no pull)
    least_loaded  any node that fits the request, least loaded first
A GPU call considers only nodes whose GPUs can take it now (GPUs held by idle
containers count as free: the node stops those). When none can, a call of higher
priority goes where it preempts the fewest, lowest-priority GPU calls (reason
"preempt"); the node stops them and the dispatcher requeues them.
Ties are broken by load. A node "fits" when its memory (from its last heartbeat plus
what we sent it since) has room for the request. If the best tier's nodes are all
full, `place` still names the best full node as `wait_for`, so the caller may queue
briefly for it (bounded) instead of going cold elsewhere.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

TIERS = ("warm", "snapshot", "layers", "least_loaded")


@dataclass(frozen=True)
class NodeView:
    node_id: str
    memory_mb: int
    reserved_mb: int                      # reserved on the node + sent since its heartbeat
    inflight: int = 0
    warm: dict = field(default_factory=dict)           # function id -> idle containers
    snapshots: frozenset = frozenset()    # function ids with a snapshot on the node
    layers: frozenset = frozenset()       # layer keys on the node
    gpus: int = 0
    gpu_inventory: dict | None = None     # cuda_restore NodeGpuInventory wire form
    gpu_allocations: tuple = ()           # cuda_restore Allocation wire dicts

    def fits(self, memory_mb: int) -> bool:
        return self.reserved_mb + memory_mb <= self.memory_mb

    def load(self) -> tuple:
        return (self.inflight, self.reserved_mb / max(1, self.memory_mb))


@dataclass(frozen=True)
class Placement:
    node_id: str | None            # where to run now (None: nothing fits anywhere)
    reason: str                    # the tier that chose it, or "random"
    wait_for: str | None = None    # a better node that is full right now
    wait_reason: str | None = None
    candidates: int = 0
    victims: tuple = ()            # reason "preempt": {alloc_id, call_id, priority} to evict

    def to_wire(self) -> dict:
        out: dict = {"node_id": self.node_id, "reason": self.reason,
                     "wait_for": self.wait_for, "wait_reason": self.wait_reason,
                     "candidates": self.candidates}
        if self.victims:
            out["preempts"] = list(self.victims)
        return out


def _tier(n: NodeView, fn_id: str, layer_keys: frozenset) -> int:
    if n.warm.get(fn_id, 0) > 0:
        return 0
    if fn_id in n.snapshots:
        return 1
    if layer_keys and layer_keys <= n.layers:
        return 2
    return 3


@dataclass(frozen=True)
class GpuFit:
    """Where a GPU request fits: `now` (free GPUs, or GPUs held only by idle containers),
    or only by preempting busy holders of lower priority: `preempt`, cheapest first,
    each with the evicted allocations' wire dicts (`call_id`: the call to requeue)."""

    now: list[NodeView]
    preempt: list[tuple[NodeView, tuple[dict, ...]]] = field(default_factory=list)


def gpu_fit(nodes: list[NodeView], gpu_spec, priority: int = 0) -> GpuFit:
    """Which nodes can take `gpu_spec` at `priority` now, and which by preemption.
    Raises cuda_restore's GpuUnsatisfiableError (an InvalidError) when no node ever can."""
    from cuda_restore.errors import GpuUnsatisfiableError, NoCapacityError
    from cuda_restore.inventory import NodeGpuInventory
    from cuda_restore.preempt import plan_eviction
    from cuda_restore.request import parse_gpu_request
    from cuda_restore.scheduler import Allocation, GpuLedger
    req = parse_gpu_request(gpu_spec, priority=priority)
    if req is None:
        return GpuFit(nodes)
    now: list[NodeView] = []
    costed: list[tuple[tuple, NodeView, tuple[dict, ...]]] = []
    ever = False
    unsatisfiable: GpuUnsatisfiableError | None = None
    for n in nodes:
        inv = NodeGpuInventory.from_wire(n.gpu_inventory) if n.gpu_inventory else None
        if inv is None or not inv.gpus:
            continue
        ledger = GpuLedger()
        ledger.replace_node(n.node_id, [Allocation.from_wire(dict(a, node_id=n.node_id))
                                        for a in n.gpu_allocations])
        idle = frozenset(str(a["alloc_id"]) for a in n.gpu_allocations if a.get("idle"))
        try:
            ev = plan_eviction(req, {n.node_id: inv}, ledger, idle)
        except NoCapacityError:
            ever = True
            continue
        except GpuUnsatisfiableError as e:
            unsatisfiable = e
            continue
        ever = True
        if not ev.preempted:
            now.append(n)
        else:
            gone = {a.alloc_id for a in ev.preempted}
            wire = tuple(a for a in n.gpu_allocations if a["alloc_id"] in gone)
            costed.append((ev.cost, n, wire))
    if not ever:
        raise unsatisfiable or GpuUnsatisfiableError(
            f"no node has a GPU for gpu={gpu_spec!r} (nodes: "
            + ", ".join(n.node_id + (" no GPUs" if not n.gpus else "") for n in nodes) + ")")
    costed.sort(key=lambda c: (c[0], c[1].load(), c[1].node_id))
    return GpuFit(now, [(n, wire) for _, n, wire in costed])


def _preempting(fit: GpuFit, memory_mb: int) -> Placement:
    """Nothing fits without preemption: the cheapest preemption on a node with memory."""
    for n, victims in fit.preempt:
        if n.fits(memory_mb):
            return Placement(n.node_id, "preempt", candidates=len(fit.preempt), victims=tuple(
                {"alloc_id": v["alloc_id"], "call_id": v.get("call_id"),
                 "priority": v.get("priority", 0)} for v in victims))
    return Placement(None, "full", wait_reason="gpu")


def place(nodes: list[NodeView], fn_id: str, layer_keys: list[str], memory_mb: int,
          policy: str = "affinity", rng: random.Random | None = None,
          gpu: object = None, priority: int = 0) -> Placement:
    """`priority` (GPU calls only): a call that fits nowhere now may preempt GPU calls of
    strictly lower priority (the placement names them in `victims`)."""
    if not nodes:
        return Placement(None, "no_nodes")
    if gpu:
        gfit = gpu_fit(nodes, gpu, priority)
        nodes = gfit.now
        if not nodes:
            return _preempting(gfit, memory_mb)
    if policy == "random":
        fit = [n for n in nodes if n.fits(memory_mb)] or nodes
        return Placement((rng or random).choice(fit).node_id, "random", candidates=len(fit))
    keys = frozenset(layer_keys)
    ranked = sorted(nodes, key=lambda n: (_tier(n, fn_id, keys), n.load()))
    best_tier = _tier(ranked[0], fn_id, keys)
    # A warm container is idle capacity by definition: it always "fits".
    fitting = [n for n in ranked if _tier(n, fn_id, keys) == 0 or n.fits(memory_mb)]
    if not fitting:
        return Placement(None, "full", wait_for=ranked[0].node_id,
                         wait_reason=TIERS[best_tier], candidates=0)
    chosen = fitting[0]
    t = _tier(chosen, fn_id, keys)
    if t > best_tier:
        return Placement(chosen.node_id, TIERS[t], wait_for=ranked[0].node_id,
                         wait_reason=TIERS[best_tier], candidates=len(fitting))
    return Placement(chosen.node_id, TIERS[t], candidates=len(fitting))
