"""Which GPU holders must go for a request: the decision both the dispatcher (which node)
and the node (which containers to stop) make, pure over an inventory and a ledger.

    plan_eviction(request, inventories, ledger, idle) -> Eviction

A holder is a container (its allocation id is the container id). Idle holders serve no
call: stopping one loses nothing but a warm container, so they count as free space for
any request, whatever its priority. Busy holders serve a call: only a request of
strictly higher priority may take their GPUs (scheduler rule 5), and each such call is
requeued by the dispatcher, never dropped.

Order of preference: fit without stopping anything; else fit by stopping idle holders
only; else (with `allow_preemption`) preempt the fewest, lowest-priority busy holders
(the scheduler's cost), stopping idle holders on the chosen GPUs as well.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from .inventory import NodeGpuInventory
from .request import GpuRequest
from .scheduler import Allocation, GpuLedger, Placement, place


@dataclass(frozen=True)
class Eviction:
    """A placement and what must leave its GPUs first. `placement.victims` holds both
    kinds, so `GpuLedger.allocate(placement)` removes them all in one step."""

    placement: Placement
    preempted: tuple[Allocation, ...] = ()     # busy holders: their calls are requeued
    reclaimed: tuple[Allocation, ...] = ()     # idle holders: stopped, nothing is lost

    @property
    def cost(self) -> tuple[int, int, int]:
        """What the preemption destroys, cheapest first (the scheduler's victim order)."""
        v = self.preempted
        return (len(v), sum(a.priority for a in v), sum(a.memory_mib for a in v))


def plan_eviction(req: GpuRequest, inventories: Mapping[str, NodeGpuInventory],
                  ledger: GpuLedger, idle: frozenset[str] = frozenset(), *,
                  allow_preemption: bool = True) -> Eviction:
    """Decide (no side effect). `idle`: allocation ids whose holder serves no call now.
    Raises GpuUnsatisfiableError (never fits) or NoCapacityError (not now)."""
    from .errors import NoCapacityError
    try:
        return Eviction(place(req, inventories, ledger, allow_preemption=False))
    except NoCapacityError:
        if not idle and not allow_preemption:
            raise
    busy_only = GpuLedger([a for a in ledger.allocations if a.alloc_id not in idle])
    p = place(req, inventories, busy_only, allow_preemption=allow_preemption)
    chosen = set(p.gpus)
    reclaimed = tuple(sorted((a for a in ledger.allocations if a.alloc_id in idle
                              and a.node_id == p.node_id and chosen & set(a.gpus)),
                             key=lambda a: a.alloc_id))
    return Eviction(replace(p, victims=p.victims + reclaimed), p.victims, reclaimed)
