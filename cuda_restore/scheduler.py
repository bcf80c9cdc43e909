"""GPU placement: which node and which GPUs run a GpuRequest. Pure over node inventories
and a ledger of current allocations; the only state is the ledger.

    place(request, inventories, ledger) -> Placement        decide (no side effect)
    ledger.allocate(alloc_id, placement, owner=...)         commit; returns the evicted
    ledger.release(alloc_id)                                when the container goes away

Rules, in order:
1. Type: a GPU of one of the request's types (preference order), never a MIG-mode GPU.
2. Exclusive requests (share=False) get idle GPUs only (no allocation on them). Shareable
   requests go onto GPUs whose allocations are all shareable, if their memory fits:
   free = total - max(reserved by the ledger, used as NVML last saw it).
3. Multi-GPU requests take all GPUs on one node and prefer NVLink-connected sets: most
   NVLink pairs, then most links, then the closest PCIe topology.
4. Packing: shareable jobs best-fit (the GPU left with the least free memory, so partly
   used GPUs fill before idle ones); exclusive jobs break the fewest idle NVLink pairs and
   go to the node with the fewest idle GPUs left (whole nodes stay free for big jobs).
5. Without a free fit, a request may preempt allocations of strictly lower priority: the
   fewest victims, then the lowest priorities, then the least memory (victims are chosen
   per GPU, lowest priority and largest first, then pruned). The Placement names
   them; `GpuLedger.allocate` removes them and returns them, and the caller MUST requeue
   each victim's `owner` (a preempted call is retried, never dropped).

Errors: GpuUnsatisfiableError when no node has that many GPUs of the type (with enough
total memory) at all: waiting cannot help. NoCapacityError when some node could, but not
now: the caller queues the request and tries again when allocations are released.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from .errors import GpuInventoryError, GpuUnsatisfiableError, NoCapacityError
from .inventory import GpuInfo, NodeGpuInventory, level_rank
from .request import GpuRequest

MAX_SUBSETS = 20_000            # beyond this many GPU sets on one node, choose greedily


@dataclass(frozen=True)
class Allocation:
    """GPUs held by one container (or call). memory_mib is reserved on each of its GPUs."""

    alloc_id: str
    node_id: str
    gpus: tuple[int, ...]
    memory_mib: int
    exclusive: bool = True
    priority: int = 0
    owner: str = ""              # what to requeue if this allocation is preempted

    def to_wire(self) -> dict:
        return {"alloc_id": self.alloc_id, "node_id": self.node_id, "gpus": list(self.gpus),
                "memory_mib": self.memory_mib, "exclusive": self.exclusive,
                "priority": self.priority, "owner": self.owner}

    @staticmethod
    def from_wire(d: dict) -> Allocation:
        try:
            a = Allocation(str(d["alloc_id"]), str(d["node_id"]),
                           tuple(int(g) for g in d["gpus"]), int(d["memory_mib"]),
                           bool(d.get("exclusive", True)), int(d.get("priority", 0)),
                           str(d.get("owner", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise GpuInventoryError(f"malformed GPU allocation {d!r}: {e}") from None
        if not a.gpus or a.memory_mib < 0:
            raise GpuInventoryError(f"GPU allocation {a.alloc_id} has no GPUs or negative memory")
        return a


@dataclass(frozen=True)
class Placement:
    node_id: str
    gpus: tuple[int, ...]
    uuids: tuple[str, ...]
    memory_mib: int                      # to reserve on each GPU
    exclusive: bool
    priority: int
    gpu_total_mib: tuple[int, ...] = ()  # capacity of each chosen GPU (re-checked on commit)
    victims: tuple[Allocation, ...] = ()
    nvlink_pairs: int = 0
    pairs: int = 0
    gpu_type: str = ""

    def describe(self) -> str:
        nv = f", NVLink {self.nvlink_pairs}/{self.pairs} pairs" if self.pairs else ""
        ev = f", preempting {len(self.victims)}" if self.victims else ""
        return f"{self.node_id} GPU {','.join(map(str, self.gpus))} ({self.gpu_type}{nv}{ev})"


class GpuLedger:
    """The allocations in force, by id. Not thread-safe: use it from one event loop."""

    def __init__(self, allocations: tuple[Allocation, ...] | list[Allocation] = ()):
        self._allocs: dict[str, Allocation] = {}
        for a in allocations:
            self._allocs[a.alloc_id] = a

    @property
    def allocations(self) -> tuple[Allocation, ...]:
        return tuple(self._allocs.values())

    def get(self, alloc_id: str) -> Allocation | None:
        return self._allocs.get(alloc_id)

    def on_gpu(self, node_id: str, index: int) -> tuple[Allocation, ...]:
        return tuple(a for a in self._allocs.values() if a.node_id == node_id and index in a.gpus)

    def on_node(self, node_id: str) -> tuple[Allocation, ...]:
        return tuple(a for a in self._allocs.values() if a.node_id == node_id)

    def reserved_mib(self, node_id: str, index: int) -> int:
        return sum(a.memory_mib for a in self.on_gpu(node_id, index))

    def allocate(self, alloc_id: str, placement: Placement, *, owner: str = ""
                 ) -> tuple[Allocation, tuple[Allocation, ...]]:
        """Commit `placement`: remove its victims, add the allocation. Returns it and the
        victims actually removed (requeue each one's owner). Raises NoCapacityError if the
        GPUs were taken since `place` decided (nothing is changed then)."""
        if alloc_id in self._allocs:
            raise ValueError(f"allocation {alloc_id} exists already")
        gone = {v.alloc_id for v in placement.victims}
        for i, idx in enumerate(placement.gpus):
            others = [a for a in self.on_gpu(placement.node_id, idx) if a.alloc_id not in gone]
            total = placement.gpu_total_mib[i] if i < len(placement.gpu_total_mib) else None
            if placement.exclusive and others:
                raise NoCapacityError(f"GPU {idx} on {placement.node_id} was taken meanwhile")
            if any(a.exclusive for a in others):
                raise NoCapacityError(f"GPU {idx} on {placement.node_id} is held exclusively")
            if total is not None and sum(a.memory_mib for a in others) + \
                    placement.memory_mib > total:
                raise NoCapacityError(f"GPU {idx} on {placement.node_id} has no room left "
                                      f"for {placement.memory_mib} MiB")
        evicted = tuple(self._allocs.pop(v) for v in sorted(gone) if v in self._allocs)
        alloc = Allocation(alloc_id, placement.node_id, placement.gpus, placement.memory_mib,
                           placement.exclusive, placement.priority, owner)
        self._allocs[alloc_id] = alloc
        return alloc, evicted

    def release(self, alloc_id: str) -> Allocation | None:
        """Drop an allocation; None if it was not there (released twice, or preempted)."""
        return self._allocs.pop(alloc_id, None)

    def release_node(self, node_id: str) -> tuple[Allocation, ...]:
        """A node died: drop and return all its allocations (their owners need requeueing)."""
        gone = self.on_node(node_id)
        for a in gone:
            del self._allocs[a.alloc_id]
        return gone

    def replace_node(self, node_id: str, allocations: list[Allocation]) -> None:
        """Take a node's own report (heartbeat) as the truth for that node."""
        self.release_node(node_id)
        for a in allocations:
            self._allocs[a.alloc_id] = replace(a, node_id=node_id)

    def to_wire(self, node_id: str | None = None) -> list[dict]:
        allocs = self.on_node(node_id) if node_id else self.allocations
        return [a.to_wire() for a in allocs]


# -- placement -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Gpu:
    info: GpuInfo
    allocs: tuple[Allocation, ...]
    foreign_mib: int             # used memory the ledger does not explain

    def free_without(self, gone: frozenset[str] = frozenset()) -> int:
        reserved = sum(a.memory_mib for a in self.allocs if a.alloc_id not in gone)
        return self.info.memory_total_mib - reserved - self.foreign_mib


@dataclass(frozen=True)
class _Candidate:
    key: tuple
    node_id: str
    gpus: tuple[_Gpu, ...]
    victims: tuple[Allocation, ...]
    nvlink_pairs: int
    pairs: int


@dataclass
class _Node:
    node_id: str
    inv: NodeGpuInventory
    gpus: dict[int, _Gpu] = field(default_factory=dict)


def _nodes(inventories: Mapping[str, NodeGpuInventory], ledger: GpuLedger) -> list[_Node]:
    by_gpu: dict[tuple[str, int], list[Allocation]] = {}
    for a in ledger.allocations:
        for i in a.gpus:
            by_gpu.setdefault((a.node_id, i), []).append(a)
    out = []
    for node_id in sorted(inventories):
        inv = inventories[node_id]
        n = _Node(node_id, inv)
        for g in inv.gpus:
            allocs = tuple(by_gpu.get((node_id, g.index), ()))
            reserved = sum(a.memory_mib for a in allocs)
            n.gpus[g.index] = _Gpu(g, allocs, max(0, g.memory_used_mib - reserved))
        out.append(n)
    return out


def _need(req: GpuRequest, g: GpuInfo) -> int:
    """Memory to reserve on `g`: what the request says, else the whole GPU."""
    return req.memory_mib if req.memory_mib is not None else g.memory_total_mib


def _fit_need(req: GpuRequest, g: GpuInfo) -> int:
    """Free memory `g` must show: an exclusive job without a stated need takes any idle
    GPU (driver-reserved memory never counts against it)."""
    if req.exclusive and req.memory_mib is None:
        return 0
    return _need(req, g)


_CONN_CACHE: dict[tuple[int, tuple[int, ...]], tuple[int, int, int, int]] = {}


def _connectivity(inv: NodeGpuInventory, idx: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(NVLink pairs, NVLinks, summed topology level, pairs) of a GPU set. Cached by
    topology: nodes of one kind, and one node across heartbeats, share the entries."""
    key = (inv.topology_key, idx)
    hit = _CONN_CACHE.get(key)
    if hit is not None:
        return hit
    nv = links = lvl = pairs = 0
    for a, b in itertools.combinations(idx, 2):
        lk = inv.link(a, b)
        pairs += 1
        nv += lk.nvlink
        links += lk.nvlinks
        lvl += level_rank(lk.level)
    if len(_CONN_CACHE) > 200_000:
        _CONN_CACHE.clear()
    _CONN_CACHE[key] = out = (nv, links, lvl, pairs)
    return out


def _subsets(eligible: list[int], n: int, inv: NodeGpuInventory) -> list[tuple[int, ...]]:
    if math.comb(len(eligible), n) <= MAX_SUBSETS:
        return list(itertools.combinations(eligible, n))
    # Greedy: grow from each start by the GPU with the most NVLink ties to the set.
    out = []
    for start in eligible:
        chosen = [start]
        while len(chosen) < n:
            rest = [g for g in eligible if g not in chosen]
            chosen.append(max(rest, key=lambda g: sum(inv.link(g, c).nvlink for c in chosen)))
        out.append(tuple(sorted(chosen)))
    return list(dict.fromkeys(out))


def _gpu_victims(req: GpuRequest, g: _Gpu) -> frozenset[Allocation] | None:
    """What must leave GPU `g` alone for `req` to fit there; None if something of equal
    or higher priority is in the way. Exclusive: everything on it. Shareable: exclusive
    holders, then shareable ones, lowest priority (then largest) first, until it fits."""
    must = list(g.allocs) if req.exclusive else [a for a in g.allocs if a.exclusive]
    if any(a.priority >= req.priority for a in must):
        return None
    gone = {a.alloc_id: a for a in must}
    spare = sorted((a for a in g.allocs if a.alloc_id not in gone and a.priority < req.priority),
                   key=lambda a: (a.priority, -a.memory_mib, a.alloc_id))
    need = _fit_need(req, g.info)
    while g.free_without(frozenset(gone)) < need:
        if not spare:
            return None
        a = spare.pop(0)
        gone[a.alloc_id] = a
    return frozenset(gone.values())


def _trim(req: GpuRequest, node: _Node, idx: tuple[int, ...],
          victims: frozenset[Allocation]) -> tuple[Allocation, ...]:
    """Drop victims that turn out unnecessary (a multi-GPU victim evicted for one chosen
    GPU may already make room on another), most valuable first."""
    keep = set(victims)
    for v in sorted(victims, key=lambda a: (-a.priority, a.memory_mib, a.alloc_id)):
        trial = frozenset(a.alloc_id for a in keep if a is not v)
        ok = all(
            (not req.exclusive or all(a.alloc_id in trial for a in node.gpus[i].allocs))
            and all(a.alloc_id in trial for a in node.gpus[i].allocs if a.exclusive)
            and node.gpus[i].free_without(trial) >= _fit_need(req, node.gpus[i].info)
            for i in idx)
        if ok:
            keep.discard(v)
    return tuple(sorted(keep, key=lambda a: a.alloc_id))


def _best_on_node(req: GpuRequest, node: _Node, type_rank: int,
                  preempt: bool) -> _Candidate | None:
    """The node's best GPU set for `req` by the global key; pruned stage by stage (cost,
    then connectivity, then packing), which is exact because keys compare in that order."""
    t = req.types[type_rank]
    typed = [g for g in node.gpus.values()
             if t.matches(g.info) and g.info.memory_total_mib >= _need(req, g.info)]
    per_gpu: dict[int, frozenset[Allocation]] = {}
    if preempt:
        for g in typed:
            found = _gpu_victims(req, g)
            if found is not None:
                per_gpu[g.info.index] = found
        eligible = sorted(per_gpu)
    elif req.exclusive:
        eligible = sorted(g.info.index for g in typed
                          if not g.allocs and g.free_without() >= _fit_need(req, g.info))
    else:
        eligible = sorted(g.info.index for g in typed if not any(a.exclusive for a in g.allocs)
                          and g.free_without() >= _fit_need(req, g.info))
    if len(eligible) < req.count:
        return None
    sets = _subsets(eligible, req.count, node.inv)
    costs: dict[tuple[int, ...], tuple] = {}
    union: dict[tuple[int, ...], frozenset[Allocation]] = {}
    if preempt:
        for idx in sets:
            u = frozenset().union(*(per_gpu[i] for i in idx))
            if u:
                union[idx] = u
                costs[idx] = (len(u), sum(v.priority for v in u), sum(v.memory_mib for v in u))
        if not costs:
            return None
        best_cost = min(costs.values())
        sets = [i for i in sets if costs.get(i) == best_cost]
    conn = {idx: _connectivity(node.inv, idx) for idx in sets}
    best_conn = min((-c[0], -c[1], c[2]) for c in conn.values())
    sets = [i for i in sets if (-conn[i][0], -conn[i][1], conn[i][2]) == best_conn]
    idle = {i for i, g in node.gpus.items() if not g.allocs}
    best: _Candidate | None = None
    for idx in sets:
        victims = _trim(req, node, idx, union[idx]) if preempt else ()
        gone = frozenset(v.alloc_id for v in victims)
        broken = sum(1 for i in idx for p in node.inv.nvlink_peers(i)
                     if p in idle and p not in idx)
        left = sum(node.gpus[i].free_without(gone) - _fit_need(req, node.gpus[i].info)
                   for i in idx)
        idle_left = len(idle - set(idx))
        pack = (broken, idle_left, left) if req.exclusive else (left, broken, idle_left)
        cost = (len(victims), sum(v.priority for v in victims),
                sum(v.memory_mib for v in victims)) if preempt else ()
        nv, links, lvl, pairs = conn[idx]
        key = (*cost, type_rank, -nv, -links, lvl, *pack, node.node_id, idx)
        if best is None or key < best.key:
            best = _Candidate(key, node.node_id, tuple(node.gpus[i] for i in idx), victims,
                              nv, pairs)
    return best


def _never_fits(req: GpuRequest, nodes: list[_Node]) -> bool:
    for node in nodes:
        for t in req.types:
            fits = [g for g in node.gpus.values()
                    if t.matches(g.info) and g.info.memory_total_mib >= _need(req, g.info)]
            if len(fits) >= req.count:
                return False
    return True


def place(req: GpuRequest, inventories: Mapping[str, NodeGpuInventory], ledger: GpuLedger, *,
          allow_preemption: bool = True) -> Placement:
    """Choose a node and GPUs for `req` (see the module docstring). Does not change the
    ledger: commit with `ledger.allocate`. Raises GpuUnsatisfiableError or NoCapacityError."""
    nodes = _nodes(inventories, ledger)
    if _never_fits(req, nodes):
        have = "; ".join(f"{n.node_id}: {n.inv.summary()}" for n in nodes) or "no nodes"
        raise GpuUnsatisfiableError(f"no node can ever run gpu={req.label()} (nodes have {have})")
    for preempt in ((False, True) if allow_preemption else (False,)):
        cands = [c for n in nodes for rank in range(len(req.types))
                 if (c := _best_on_node(req, n, rank, preempt)) is not None]
        if cands:
            best = min(cands, key=lambda c: c.key)
            g0 = best.gpus[0].info
            mem = req.memory_mib if req.memory_mib is not None else \
                min(g.info.memory_total_mib for g in best.gpus)
            return Placement(best.node_id, tuple(g.info.index for g in best.gpus),
                             tuple(g.info.uuid for g in best.gpus), mem, req.exclusive,
                             req.priority, tuple(g.info.memory_total_mib for g in best.gpus),
                             best.victims, best.nvlink_pairs, best.pairs, g0.type_label)
    able = sorted({n.node_id for n in nodes if not _never_fits(req, [n])})
    busy = sum(len(n.gpus) for n in nodes if n.node_id in able)
    raise NoCapacityError(f"gpu={req.label()}: {len(able)} node(s) could run it "
                          f"({', '.join(able)}), but their {busy} GPU(s) are busy now; "
                          "the call stays queued")
