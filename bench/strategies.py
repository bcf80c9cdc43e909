"""How a measured call is made to start: one row per strategy.

A strategy names the function *variant* it calls (the same workload registered with
different options: `plain`, `snap` for snapshot=True, ...), a `setup` run once per
workload before the first round (unmeasured), a `prepare` run before every measured
call (unmeasured), and the tiers a valid measured call reports. Adding a strategy is
adding a row; a row with `implemented=False` yields a "not_implemented" record.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sdk import Function

from .runtime import Runtime

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


def timed_call(fn: Function, args: tuple) -> Call:
    fn.last_call = None                 # a call that fails before submitting leaves no info
    t = time.perf_counter()
    try:
        value = fn.remote(*args)
        err = None
    except Exception as e:  # noqa: BLE001 - a failed sample is recorded, not fatal
        value, err = None, f"{type(e).__name__}: {e}"[:500]
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
    c = timed_call(fn, args)
    return {"prime_tier": c.tier, "prime_ms": round(c.total_ms, 3)}


def warmup_cold(ctx: Ctx, fn: Function, args: tuple) -> dict:
    """Unmeasured cold starts: page cache and layer cache warm (steady state)."""
    out = []
    for _ in range(ctx.warmup):
        drain(ctx, fn, args)
        c = timed_call(fn, args)
        out.append({"tier": c.tier, "total_ms": round(c.total_ms, 3), "error": c.error})
    return {"warmup": out}


def take_snapshot(ctx: Ctx, fn: Function, args: tuple) -> dict:
    """Start from no snapshot, make the snapshot-taking cold start (excluded from the
    samples; its checkpoint span and the snapshot's sizes are recorded), then warm up."""
    removed = ctx.rt.retrying(ctx.rt.delete_snapshots, fn.object_id,
                              on_retry=ctx.note_interruption)
    drain(ctx, fn, args)
    c = timed_call(fn, args)
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
        info.update(warmup_cold(ctx, fn, args))
    return info


def _empty_image_cache(ctx: Ctx, fn: Function, args: tuple, lazy: bool) -> dict:
    drain(ctx, fn, args)
    keys = [st["key"] for st in fn.image.spec()["steps"] if st["kind"] in ("run", "files")]
    ctx.rt.evict_layers(keys, lazy_images=lazy)
    return {"evicted_layers": len(keys)}


def empty_cache_lazy(ctx: Ctx, fn: Function, args: tuple) -> dict:
    return _empty_image_cache(ctx, fn, args, True)


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
    implemented: bool = True
    needs: str = ""                     # for planned strategies: what is missing
    extra: dict = field(default_factory=dict)


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
    Strategy("restore_lazy", "CRIU lazy-pages restore (userfaultfd): pages served on first "
             "touch from the node's hot copy (restore_mode='lazy'; no working-set prefetch yet)",
             variant="snap_lazy", expect=("restore_lazy",), setup=take_snapshot,
             prepare=drain),
    Strategy("restore_peer", "restore of a snapshot pulled from a peer node",
             implemented=False, needs="multi-node snapshot transfer + placement by snapshot"),
    Strategy("full_pull", "cold start on a node with an empty image cache: pull and unpack "
             "every layer first", variant="plain", expect=("cold",), prepare=empty_cache_full),
    Strategy("lazy_image", "cold start on a node with an empty image cache: eStargz layers "
             "mounted lazily over FUSE, fetched by range on first read",
             variant="plain", expect=("cold",), prepare=empty_cache_lazy),
]}
