"""The dispatcher's view of the cluster: the nodes, their health and holdings, and where
a call goes (placement.py decides; this module adapts and waits).

A node registers, then heartbeats every 2 s with its holdings (snapshots, layers, warm
containers by function) and load. Heartbeats go to whichever dispatcher replica the
node's connection reaches; every replica records them in the store and reads the
others' every NODE_SYNC_S, so all replicas see the same cluster. A node is alive while
its last heartbeat is younger than NODE_DEAD_AFTER and newer than the last time a
dispatcher lost a connection to it (a killed node is dead at once for every replica,
until it heartbeats again).

Heartbeat times are wall-clock times of the replica that received them: replicas need
synchronized clocks (NTP), as any multi-host deployment has.

Load per node = calls this replica has in flight there, and the memory of calls sent
since its last heartbeat on top of what the node reported reserved.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from sdk.exception import NodeUnavailableError

from .builder import layer_keys
from .node_client import NodeClient
from .placement import NodeView, place
from .store import Store

log = logging.getLogger("runtimed.registry")

NODE_DEAD_AFTER = 6.0          # three missed 2 s heartbeats
NODE_SYNC_S = 0.5              # how often a replica reads the others' heartbeats
AFFINITY_WAIT = 2.0            # how long a call waits for a full node that is a better fit


@dataclass
class NodeEntry:
    node_id: str
    url: str
    client: NodeClient
    info: dict
    seen: float = 0.0                  # wall clock of the last heartbeat (any replica)
    lost_at: float = 0.0               # wall clock when a dispatcher lost the node
    inflight: int = 0                  # calls this replica has running there
    sent_mb: int = 0                   # memory of calls sent since the node's last heartbeat

    def view(self) -> NodeView:
        i = self.info
        return NodeView(self.node_id, int(i.get("memory_mb") or 0),
                        int(i.get("reserved_mb") or 0) + self.sent_mb, self.inflight,
                        dict(i.get("warm") or {}), frozenset(i.get("snapshots") or ()),
                        frozenset(i.get("layers") or ()), len(i.get("gpus") or ()),
                        gpu_inventory=i.get("gpu") or None,
                        gpu_allocations=tuple(i.get("gpu_allocations") or ()))

    @property
    def alive(self) -> bool:
        return self.seen > self.lost_at and time.time() - self.seen < NODE_DEAD_AFTER

    def describe(self) -> dict:
        i = self.info
        return {"node_id": self.node_id, "url": self.url, "alive": self.alive,
                "inflight": self.inflight, "active": i.get("active"),
                "seen_s_ago": round(time.time() - self.seen, 1) if self.seen else None,
                "cpu": i.get("cpu"), "memory_mb": i.get("memory_mb"),
                "reserved_mb": i.get("reserved_mb"), "gpus": len(i.get("gpus") or ()),
                "gpu_allocations": list(i.get("gpu_allocations") or ()),
                "snapshots": list(i.get("snapshots") or ()),
                "layers": list(i.get("layers") or ()),
                "warm": {k: v for k, v in (i.get("warm") or {}).items() if v}}


class NodeRegistry:
    def __init__(self, store: Store, token: str, policy: str = "affinity"):
        self.store, self.token, self.policy = store, token, policy
        self.nodes: dict[str, NodeEntry] = {}
        self._event = asyncio.Event()
        self.stopping = False

    # -- membership ---------------------------------------------------------------------------
    def _merge(self, info: dict) -> NodeEntry:
        nid, url = info["node_id"], info["url"]
        entry = self.nodes.get(nid)
        if entry is None or entry.url != url:
            if entry is not None:
                asyncio.get_running_loop().create_task(entry.client.close())
            entry = NodeEntry(nid, url, NodeClient(nid, url, self.token), info)
            self.nodes[nid] = entry
            log.info("node %s at %s", nid, url)
        seen = float(info.get("seen") or 0)
        if seen > entry.seen:
            entry.info, entry.seen, entry.sent_mb = info, seen, 0
        entry.lost_at = max(entry.lost_at, float(info.get("lost_at") or 0))
        self.wake()
        return entry

    async def register(self, body: dict) -> None:
        info = dict(body, seen=time.time())
        info.pop("lost_at", None)
        await self.store.put_node(info)
        self._merge(info)

    async def heartbeat(self, body: dict) -> bool:
        """False for a node no replica knows (it registers again)."""
        info = dict(body, seen=time.time())
        info.pop("lost_at", None)
        if not await self.store.put_node(info, must_exist=True):
            return False
        self._merge(info)
        return True

    async def sync(self) -> None:
        for info in await self.store.list_nodes():
            if info.get("node_id") and info.get("url"):
                self._merge(info)

    async def sync_loop(self) -> None:
        while not self.stopping:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the store may come back
                log.warning("reading the node registry: %s", e)
            await asyncio.sleep(NODE_SYNC_S)

    async def lost(self, node: NodeEntry) -> None:
        """The connection to `node` broke: dead for every replica until it heartbeats."""
        node.lost_at = time.time()
        self.wake()
        try:
            await self.store.mark_node_lost(node.node_id, node.lost_at)
        except Exception as e:  # noqa: BLE001 - this replica knows; the others learn by heartbeat age
            log.warning("recording the loss of %s: %s", node.node_id, e)

    def forget_warm(self, function_id: str) -> None:
        """After a drain: no node has idle containers of the function (until it says so)."""
        for n in self.nodes.values():
            warm = n.info.get("warm")
            if warm and function_id in warm:
                n.info = dict(n.info, warm={k: v for k, v in warm.items() if k != function_id})

    def alive(self) -> list[NodeEntry]:
        return [n for n in self.nodes.values() if n.alive]

    def wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def _wait_change(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass

    # -- choosing ------------------------------------------------------------------------------
    def least_loaded(self) -> NodeEntry | None:
        alive = self.alive()
        return min(alive, key=lambda n: n.view().load()) if alive else None

    async def wait_any(self, deadline: float) -> NodeEntry:
        """Any live node, least loaded (image builds, prewarm)."""
        while True:
            node = self.least_loaded()
            if node is not None:
                return node
            left = deadline - time.monotonic()
            if left <= 0:
                raise NodeUnavailableError("no node is available (is a node running? "
                                           "`runtimectl nodes` lists them)")
            await self._wait_change(min(left, 1.0))

    async def place(self, fn: dict, deadline: float, queue_timeout: float,
                    pin: str | None = None) -> tuple[NodeEntry, dict]:
        """Choose the node for a call (placement.py); queue briefly (bounded) for a better
        node that is full rather than going cold elsewhere. Returns the node and the
        placement record stored with the call (why it went there)."""
        mem = int(fn.get("memory") or 128)
        keys = layer_keys(fn["image"])
        t0 = time.monotonic()
        while True:
            alive = {n.node_id: n for n in self.alive()}
            if pin:
                if pin in alive:
                    return alive[pin], {"node_id": pin, "reason": "pinned"}
                if time.monotonic() > deadline:
                    raise NodeUnavailableError(f"node {pin} (pinned) is not available")
                await self._wait_change(0.05)
                continue
            p = place([n.view() for n in alive.values()], fn["id"], keys, mem, self.policy,
                      gpu=fn.get("gpu"), priority=int(fn.get("priority") or 0))
            if p.node_id is not None and (p.wait_for is None or
                                          time.monotonic() - t0 >= AFFINITY_WAIT):
                rec = p.to_wire()
                if p.wait_for:
                    rec["waited_ms"] = round((time.monotonic() - t0) * 1000, 1)
                return alive[p.node_id], rec
            left = deadline - time.monotonic()
            if left <= 0:
                if not alive:
                    raise NodeUnavailableError("no node is available to run the call "
                                               f"(waited {queue_timeout:.0f} s); is a node "
                                               "running?")
                if p.wait_reason == "gpu":
                    raise NodeUnavailableError(f"no GPU free for gpu={fn.get('gpu')!r} after "
                                               f"{queue_timeout:.0f} s")
                raise NodeUnavailableError(f"no node has room for the call ({mem} MiB) "
                                           f"after {queue_timeout:.0f} s")
            await self._wait_change(min(left, 0.05))

    def snapshot_peers(self, fn_id: str, exclude: NodeEntry) -> list[str]:
        return [n.url for n in self.alive() if n is not exclude
                and fn_id in (n.info.get("snapshots") or ())]

    def describe(self) -> list[dict]:
        return [n.describe() for n in sorted(self.nodes.values(), key=lambda n: n.node_id)]

    async def close(self) -> None:
        for n in self.nodes.values():
            await n.client.close()
