"""How a measured call is made to start: one row per strategy.

A strategy names the function *variant* it calls (the same workload registered with
different options: `plain`, `snap` for snapshot=True, ...), a `setup` run once per
workload before the first round (unmeasured), a `prepare` run before every measured
call (unmeasured), an `after` run right after it (unmeasured: what it reads joins the
sample), and the tiers a valid measured call reports. Adding a strategy is adding a
row; a row with `implemented=False` yields a "not_implemented" record.

Peer rows (`on_peer`, restore_peer) need a second node: the harness attaches one (node
B, runtime.peer_node) and then pins every call: those rows' calls to B, all others to
the runtime's own node A (`Ctx.home`), so no other row's calls drift to B.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sdk import Function

from .runtime import Runtime, empty_snapshot_store, submit_on

VARIANTS: dict[str, dict] = {
    "plain": {},
    "snap": {"snapshot": True, "restore_mode": "eager"},
    "snap_lazy": {"snapshot": True, "restore_mode": "lazy"},
    "fork": {"fork": True},
}


@dataclass
class Ctx:
    rt: Runtime
    settle_s: float = 0.2
    warmup: int = 1
    log: Callable[[str], None] = print
    interruptions: list = field(default_factory=list)   # runtime restarts seen
    home: str | None = None       # with a peer attached: the node every other call is pinned to
    peer: str | None = None       # the attached peer node (None: not attached)
    peer_error: str | None = None         # why no peer could be attached
    taken: dict = field(default_factory=dict)   # function id -> snapshot this run took
    deployed: list = field(default_factory=list)  # every Function of the run (all variants)

    def note_interruption(self, e: BaseException) -> None:
        self.interruptions.append({"t": time.time(), "error": str(e)[:200]})
        self.log(f"runtime unreachable ({str(e)[:80]}); waiting for it to come back")


@dataclass
class Call:
    """One .remote() as the client saw it."""
    total_ms: float
    tier: str | None
    spans: dict
    info: dict
    value: Any = None
    error: str | None = None


FINISHED = ("succeeded", "failed", "cancelled")


def timed_call(fn: Function, args: tuple, node_id: str | None = None) -> Call:
    """`fn.remote(*args)` timed from submission until its result is at the client; with
    `node_id` the same request pinned to that node."""
    fn.last_call = None                 # a call that fails before submitting leaves no info
    total = None
    t = time.perf_counter()
    try:
        if node_id is None:
            value = fn.remote(*args)
        else:
            fc = fn.last_call = submit_on(fn, args, node_id)
            if (fc.last_state or {}).get("status") in FINISHED:
                # the result is here: stop the clock; .get() only asks for it again
                total = (time.perf_counter() - t) * 1000
            value = fc.get()
        err = None
    except Exception as e:  # noqa: BLE001 - a failed sample is recorded, not fatal
        value, err = None, f"{type(e).__name__}: {e}"[:500]
    if total is None:
        total = (time.perf_counter() - t) * 1000
    info = {}
    if fn.last_call is not None:
        try:
            info = fn.last_call.info
        except Exception:  # noqa: BLE001
            info = {}
    return Call(total, info.get("tier"), dict(info.get("spans") or {}), info, value, err)


# -- steps ----------------------------------------------------------------------------------
def drain(ctx: Ctx, fn: Function, args: tuple) -> dict:
    ctx.rt.retrying(ctx.rt.drain, fn.object_id, ctx.settle_s, on_retry=ctx.note_interruption)
    return {}


def prime(ctx: Ctx, fn: Function, args: tuple) -> dict:
    """A call right before the measured one, so it finds this container idle."""
    c = timed_call(fn, args, ctx.home)
    return {"prime_tier": c.tier, "prime_ms": round(c.total_ms, 3)}


def warmup_cold(ctx: Ctx, fn: Function, args: tuple) -> dict:
    """Unmeasured cold starts: page cache and layer cache warm (steady state)."""
    out = []
    for _ in range(ctx.warmup):
        drain(ctx, fn, args)
        c = timed_call(fn, args, ctx.home)
        out.append({"tier": c.tier, "total_ms": round(c.total_ms, 3), "error": c.error})
    return {"warmup": out}


def take_snapshot(ctx: Ctx, fn: Function, args: tuple) -> dict:
    """Start from no snapshot, make the snapshot-taking cold start (excluded from the
    samples; its checkpoint span and the snapshot's sizes are recorded), then warm up."""
    removed = ctx.rt.retrying(ctx.rt.delete_snapshots, fn.object_id,
                              on_retry=ctx.note_interruption)
    drain(ctx, fn, args)
    c = timed_call(fn, args, ctx.home)
    snaps = ctx.rt.retrying(ctx.rt.snapshots, fn.object_id, on_retry=ctx.note_interruption)
    s = snaps[0] if snaps else {}
    info = {"removed_old_snapshots": removed, "snapshot_call_ms": round(c.total_ms, 3),
            "snapshot_call_tier": c.tier, "snapshot_note": c.info.get("snapshot"),
            "checkpoint_ms": c.spans.get("checkpoint"), "snapshot_call_spans": c.spans,
            "snapshot_id": s.get("snapshot_id"), "snapshot_raw_bytes": s.get("raw_size"),
            "snapshot_stored_bytes": s.get("stored_size"),
            "snapshot_meta": {k: v for k, v in (s.get("meta") or {}).items()
                              if k.endswith("_ms")}}
    if c.error:
        info["error"] = c.error
    elif not snaps:
        info["error"] = f"no snapshot was taken: {c.info.get('snapshot')}"
    else:
        ctx.taken[fn.object_id] = s["snapshot_id"]
        info.update(warmup_cold(ctx, fn, args))
    return info


def take_snapshot_lazy(ctx: Ctx, fn: Function, args: tuple) -> dict:
    """take_snapshot, then the lazy restores whose page faults the node records as the
    snapshot's working set (runtimed.snapshots.WS_RECORDINGS): the measured samples are
    the steady state, restores that copy the recorded working set in first."""
    from runtimed.snapshots import WS_RECORDINGS
    info = take_snapshot(ctx, fn, args)
    if "error" in info:
        return info
    rec = []
    for _ in range(WS_RECORDINGS):
        drain(ctx, fn, args)
        c = timed_call(fn, args, ctx.home)
        rec.append({"tier": c.tier, "total_ms": round(c.total_ms, 3), "error": c.error})
    info["working_set_recording"] = rec
    time.sleep(0.5)            # the recorder runs when the last lazy-pages daemon exits
    snaps = ctx.rt.retrying(ctx.rt.snapshots, fn.object_id, on_retry=ctx.note_interruption)
    info["working_set_pages"] = (snaps[0] if snaps else {}).get("working_set_pages")
    return info


def peer_setup(ctx: Ctx, fn: Function, args: tuple) -> dict:
    """The snapshot on node A (the one this run's `restore` cell took there, else taken
    now), the dispatcher seeing A hold it (it names A as the peer to pull from); then
    unmeasured calls on node B, which pull the image's layers fully (lazy images off on
    B) and the snapshot, so the samples start from warm caches as the other cells do."""
    if not ctx.peer or not ctx.home:
        return {"error": f"no peer node: {ctx.peer_error or 'not attached'}"}
    assert fn.object_id is not None
    info: dict = {"home_node": ctx.home, "peer_node": ctx.peer}
    sid = ctx.taken.get(fn.object_id)
    on_home = {s["snapshot_id"] for s in ctx.rt.snapshots(fn.object_id)
               if s["node_id"] == ctx.home}
    if sid in on_home:
        info["peer_snapshot_id"] = sid
    else:
        info.update(take_snapshot(ctx, fn, args))
        if info.get("error"):
            return info
        info["peer_snapshot_id"] = info.get("snapshot_id")
    ctx.rt.wait_holder(fn.object_id, ctx.home)
    ctx.rt.node_client(ctx.peer).json("POST", "/v1/config", {"lazy_images": False})
    warm = []
    for _ in range(max(1, ctx.warmup)):
        prep = peer_prepare(ctx, fn, args)
        c = timed_call(fn, args, ctx.peer)
        warm.append({"tier": c.tier, "total_ms": round(c.total_ms, 3), "error": c.error,
                     **peer_pulled(ctx, fn, prep)})
    info["peer_warmup"] = warm
    return info


def peer_prepare(ctx: Ctx, fn: Function, args: tuple) -> dict:
    """Before each call on B: no idle container of the function anywhere, B's snapshot
    store empty (B is the benchmark's own node: every chunk of the snapshot must cross),
    and A still reported as holding the snapshot."""
    assert ctx.peer is not None and fn.object_id is not None
    drain(ctx, fn, args)
    before = empty_snapshot_store(ctx.rt.node_client(ctx.peer))
    holders = ctx.rt.holders(fn.object_id)
    if ctx.home not in holders:
        raise RuntimeError(f"{ctx.home} no longer reports the snapshot (holders: "
                           f"{sorted(holders)})")
    return {"peer_store_before": before}


def peer_pulled(ctx: Ctx, fn: Function, prep: dict) -> dict:
    """What B's store gained with the call: the chunks it fetched from A and their bytes
    as sent (stored zstd chunks travel as they are)."""
    assert ctx.peer is not None
    after = ctx.rt.node_client(ctx.peer).json("GET", "/v1/snapshots")["stats"]
    before = prep.get("peer_store_before") or {"chunks": 0, "stored_bytes": 0}
    return {"pulled_chunks": after["chunks"] - before["chunks"],
            "pulled_bytes": after["stored_bytes"] - before["stored_bytes"]}


def _layer_keys(fn: Function) -> list[str]:
    return [st["key"] for st in fn.image.spec()["steps"] if st["kind"] in ("run", "files")]


def _empty_image_cache(ctx: Ctx, fn: Function, args: tuple, lazy: bool,
                       prefetch: bool = False, workset: str = "nowait") -> dict:
    keys = _layer_keys(fn)
    # Every idle container on these layers must go (other strategies' variants of this
    # workload keep some): a node refuses to forget a layer a container still uses.
    users = [f for f in ctx.deployed if set(_layer_keys(f)) & set(keys)] or [fn]
    for f in users:
        ctx.rt.drain(f.object_id)
    if ctx.settle_s:
        time.sleep(ctx.settle_s)
    ctx.rt.evict_layers(keys, lazy_images=lazy, only=[ctx.home] if ctx.home else None,
                        lazy_prefetch=prefetch, lazy_workset=workset)
    return {"evicted_layers": len(keys)}


def empty_cache_lazy(ctx: Ctx, fn: Function, args: tuple) -> dict:
    return _empty_image_cache(ctx, fn, args, True)


def empty_cache_lazy_prefetch(ctx: Ctx, fn: Function, args: tuple) -> dict:
    return _empty_image_cache(ctx, fn, args, True, prefetch=True)


def empty_cache_lazy_prefetch_wait(ctx: Ctx, fn: Function, args: tuple) -> dict:
    return _empty_image_cache(ctx, fn, args, True, prefetch=True, workset="wait")


def empty_cache_lazy_prefetch_fuse(ctx: Ctx, fn: Function, args: tuple) -> dict:
    return _empty_image_cache(ctx, fn, args, True, prefetch=True, workset="off")


def _published(ctx: Ctx, keys: list[str]) -> dict[str, int]:
    """Layer key -> files in its served eStargz's prefetch area (0: none yet)."""
    out = {}
    for r in ctx.rt.client.json("GET", "/v1/images")["layers"]:
        out[r["key"]] = int(r.get("prefetch_files") or 0)
    return {k: out.get(k, 0) for k in keys}


def record_working_set(ctx: Ctx, fn: Function, args: tuple, timeout: float = 300.0) -> dict:
    """One lazy start on an empty image cache: its mount records the files the call
    opens, and the node, once the layer is local, republishes the layer's eStargz with
    them first. Waits until the dispatcher serves that blob."""
    keys = _layer_keys(fn)
    t = time.perf_counter()
    info: dict = {}
    if not all(_published(ctx, keys).values()):
        empty_cache_lazy_prefetch(ctx, fn, args)
        c = timed_call(fn, args)
        info = {"record_call_ms": round(c.total_ms, 3), "record_call_error": c.error}
        while not all(_published(ctx, keys).values()):
            if time.perf_counter() - t > timeout:
                return {**info, "error": f"no recorded prefetch published in {timeout:.0f} s"}
            time.sleep(1.0)
    return {**info, "prefetch_files": _published(ctx, keys),
            "publish_wait_s": round(time.perf_counter() - t, 1)}


def lazy_fetched(ctx: Ctx, fn: Function, prep: dict) -> dict:
    """What the lazy mounts of the function's layers fetched for this start (range reads
    on demand + the prefetch), as the node reports it."""
    keys = {k[:16] for k in _layer_keys(fn)}
    time.sleep(0.6)                       # mounts write their status twice a second
    out = {"lazy_bytes_fetched": 0, "lazy_fetched_chunks": 0, "lazy_prefetched_chunks": 0}
    for _node, nc in ctx.rt.node_clients([ctx.home] if ctx.home else None):
        for li in nc.json("GET", "/v1/status").get("layers", []):
            if li["key"] in keys and li.get("was_lazy"):
                out["lazy_bytes_fetched"] += li.get("bytes_fetched") or 0
                out["lazy_fetched_chunks"] += li.get("fetched_chunks") or 0
                out["lazy_prefetched_chunks"] += li.get("prefetched_chunks") or 0
                ws = li.get("workset") or {}
                if ws.get("state") == "done":
                    out["workset_files"] = out.get("workset_files", 0) + ws["files"]
                    out["workset_bytes"] = out.get("workset_bytes", 0) + ws["bytes"]
                    out["workset_write_s"] = out.get("workset_write_s", 0) + ws["seconds"]
                elif ws:
                    out["workset_state"] = ws.get("state")
    return out


def empty_cache_full(ctx: Ctx, fn: Function, args: tuple) -> dict:
    return _empty_image_cache(ctx, fn, args, False)


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    variant: str | None = None
    expect: tuple[str, ...] = ()
    setup: Callable[[Ctx, Function, tuple], dict] | None = None
    prepare: Callable[[Ctx, Function, tuple], dict] | None = None
    after: Callable[[Ctx, Function, dict], dict] | None = None   # given prepare's record
    on_peer: bool = False               # its calls go to the attached peer node
    implemented: bool = True
    needs: str = ""                     # for planned strategies: what is missing
    extra: dict = field(default_factory=dict)
    # "image" cells empty the node's image cache: they run after all the others (setup
    # and rounds), so no cold/warm/restore cell lands on a half-pulled lazy layer.
    group: str = "runtime"


STRATEGIES: dict[str, Strategy] = {s.name: s for s in [
    Strategy("cold", "new container, no snapshot (idle containers drained before each call)",
             variant="plain", expect=("cold",), setup=warmup_cold, prepare=drain),
    Strategy("warm", "idle container of the function, right after a call on it",
             variant="plain", expect=("warm",), prepare=prime),
    Strategy("restore", "new container restored eagerly from the function's CRIU snapshot "
             "(snapshot=True, restore_mode='eager'; drained before each call)",
             variant="snap", expect=("restore",), setup=take_snapshot, prepare=drain),
    Strategy("fork", "fork of the function's warm zygote (fork=True): a forked child per call",
             variant="fork", expect=("fork",), prepare=prime),
    Strategy("restore_lazy", "CRIU lazy-pages restore (userfaultfd): the working set recorded "
             "by earlier lazy restores is copied in first, other pages served on first touch "
             "from the node's hot copy (restore_mode='lazy'; drained before each call)",
             variant="snap_lazy", expect=("restore_lazy",), setup=take_snapshot_lazy,
             prepare=drain),
    Strategy("restore_peer", "restore on a node (B) that first pulls the snapshot from the "
             "peer (A) that took it; B's snapshot store is emptied before each call, so every "
             "chunk crosses (restore_mode='eager'; drained before each call; call pinned to B)",
             variant="snap", expect=("restore_peer",), setup=peer_setup, prepare=peer_prepare,
             after=peer_pulled, on_peer=True),
    Strategy("full_pull", "cold start on a node with an empty image cache: pull and unpack "
             "every layer first", variant="plain", expect=("cold",), prepare=empty_cache_full,
             group="image"),
    Strategy("lazy_image", "cold start on a node with an empty image cache: eStargz layers "
             "mounted lazily over FUSE, fetched by range on first read (no prefetch)",
             variant="plain", expect=("cold",), prepare=empty_cache_lazy, after=lazy_fetched,
             group="image"),
    Strategy("lazy_prefetch", "lazy_image, with the layer's eStargz republished after an "
             "earlier lazy start with the files it opened first: the mount prefetches that "
             "working set in large range reads and writes each file whole into the view's "
             "data dir while the container starts (lazy_workset=nowait, the default)",
             variant="plain", expect=("cold",), setup=record_working_set,
             prepare=empty_cache_lazy_prefetch, after=lazy_fetched,
             group="image"),
    Strategy("lazy_prefetch_wait", "lazy_prefetch, but the container starts once the whole "
             "working set is written (lazy_workset=wait)",
             variant="plain", expect=("cold",), setup=record_working_set,
             prepare=empty_cache_lazy_prefetch_wait, after=lazy_fetched,
             group="image"),
    Strategy("lazy_prefetch_fuse", "lazy_prefetch with all file data read through the FUSE "
             "server, metadata from the view (lazy_workset=off)",
             variant="plain", expect=("cold",), setup=record_working_set,
             prepare=empty_cache_lazy_prefetch_fuse, after=lazy_fetched,
             group="image"),
]}


# The lazy_prefetch* variants compare ways of serving a recorded image working set (issue
# 5: bench/results/lazy_image.md); each needs a lazy start and a republished layer in its
# setup, so they run only when named (--strategies lazy_prefetch ...).
DEFAULT_STRATEGIES = [n for n in STRATEGIES if not n.startswith("lazy_prefetch")]
