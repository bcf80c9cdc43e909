"""Placement: which node runs a call. Pure over node views; the dispatcher adapts.

Preference, best first (DESIGN.md):
    warm     a node with an idle warm container of the function
    snapshot a node holding the function's snapshot (restore instead of cold start)
    layers   a node holding all the image's layers (no pull)
    least_loaded  any node that fits the request, least loaded first
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

    def to_wire(self) -> dict:
        return {"node_id": self.node_id, "reason": self.reason, "wait_for": self.wait_for,
                "wait_reason": self.wait_reason, "candidates": self.candidates}


def _tier(n: NodeView, fn_id: str, layer_keys: frozenset) -> int:
    if n.warm.get(fn_id, 0) > 0:
        return 0
    if fn_id in n.snapshots:
        return 1
    if layer_keys and layer_keys <= n.layers:
        return 2
    return 3


def gpu_capable(nodes: list[NodeView], gpu_spec) -> tuple[list[NodeView], bool]:
    """Nodes whose GPUs can take `gpu_spec` now, and whether any node could ever take it.
    Raises cuda_restore's GpuUnsatisfiableError (an InvalidError) when no node ever can."""
    from cuda_restore.errors import GpuUnsatisfiableError, NoCapacityError
    from cuda_restore.inventory import NodeGpuInventory
    from cuda_restore.request import parse_gpu_request
    from cuda_restore.scheduler import Allocation, GpuLedger
    from cuda_restore.scheduler import place as gpu_place
    req = parse_gpu_request(gpu_spec)
    if req is None:
        return nodes, True
    now, ever = [], False
    unsatisfiable: GpuUnsatisfiableError | None = None
    for n in nodes:
        inv = NodeGpuInventory.from_wire(n.gpu_inventory) if n.gpu_inventory else None
        if inv is None or not inv.gpus:
            continue
        ledger = GpuLedger()
        ledger.replace_node(n.node_id, [Allocation.from_wire(dict(a, node_id=n.node_id))
                                        for a in n.gpu_allocations])
        try:
            gpu_place(req, {n.node_id: inv}, ledger, allow_preemption=False)
            now.append(n)
            ever = True
        except NoCapacityError:
            ever = True
        except GpuUnsatisfiableError as e:
            unsatisfiable = e
    if not ever:
        raise unsatisfiable or GpuUnsatisfiableError(
            f"no node has a GPU for gpu={gpu_spec!r} (nodes: "
            + ", ".join(n.node_id + (" no GPUs" if not n.gpus else "") for n in nodes) + ")")
    return now, ever


def place(nodes: list[NodeView], fn_id: str, layer_keys: list[str], memory_mb: int,
          policy: str = "affinity", rng: random.Random | None = None,
          gpu: object = None) -> Placement:
    if not nodes:
        return Placement(None, "no_nodes")
    if gpu:
        nodes, _ = gpu_capable(nodes, gpu)
        if not nodes:
            return Placement(None, "full", wait_reason="gpu")
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
