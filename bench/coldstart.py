"""`python -m bench coldstart`: every workload x strategy cell, interleaved round-robin,
through the real SDK -> dispatcher -> node path; phases from the runtime's spans."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter

from sdk import App

from .phases import PHASES, phases_of
from .runtime import TRANSIENT_MARKS, Runtime, environment, peer_node
from .stats import pct, r3, summary
from .strategies import DEFAULT_STRATEGIES, STRATEGIES, VARIANTS, Ctx, Strategy, timed_call
from .workloads import Workload, selected


def transient_msg(msg: str) -> bool:
    return any(m in msg for m in TRANSIENT_MARKS) or "NodeUnavailableError" in msg


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _deploy(ctx: Ctx, workloads: list[Workload], strategies: list[Strategy],
            skipped: dict[str, str]) -> tuple[dict, dict]:
    """Register each (workload, variant) in an App of its own (the SDK groups functions
    by their raw function, so two variants of one function cannot share an App)."""
    fns, builds = {}, {}
    variants = sorted({s.variant for s in strategies if s.implemented and s.variant})
    for w in workloads:
        if w.name in skipped:
            continue
        builds[w.name] = {}
        for v in variants:
            app = App(f"bench-{w.name}-{v}")
            fn = w.register(app, **VARIANTS[v])
            t = time.perf_counter()
            try:
                ctx.rt.retrying(app.deploy, False, on_retry=ctx.note_interruption)
            except Exception as e:  # noqa: BLE001
                skipped[w.name] = f"deploy failed: {type(e).__name__}: {e}"[:800]
                _log(f"{w.name}: {skipped[w.name]}")
                break
            ms = (time.perf_counter() - t) * 1000
            statuses = Counter(s.get("status") for s in fn.image.last_build)
            builds[w.name][v] = {"deploy_ms": round(ms, 1), "image_id": fn.image.image_id,
                                 "function_id": fn.object_id, "steps": dict(statuses)}
            _log(f"{w.name}/{v}: deployed in {ms / 1000:.1f} s (image steps {dict(statuses)})")
            fns[(w.name, v)] = fn
    return fns, builds


def _attach_peer(ctx: Ctx, stack: contextlib.ExitStack) -> None:
    """Node B for the peer rows, up until the end of the run; from then on every call is
    pinned (strategies.py says why). On failure the peer rows say why; the rest run."""
    try:
        ctx.peer = stack.enter_context(peer_node(ctx.rt))
    except Exception as e:  # noqa: BLE001
        ctx.peer_error = f"{type(e).__name__}: {e}"[:500]
        _log(f"no peer node: {ctx.peer_error}")
        return
    ctx.home = min(n for n, _ in ctx.rt.node_clients() if n != ctx.peer)
    _log(f"peer node {ctx.peer} attached; other calls pinned to {ctx.home}")


def _sample(ctx: Ctx, w: Workload, s: Strategy, fn, rnd: int) -> dict:
    node = ctx.peer if s.on_peer else ctx.home
    for _ in range(2):        # once more if the shared runtime restarted under us
        try:
            prep = s.prepare(ctx, fn, w.args) if s.prepare else {}
        except Exception as e:  # noqa: BLE001
            prep = {"prepare_error": f"{type(e).__name__}: {e}"[:300]}
        c = timed_call(fn, w.args, node)
        if not (c.error and transient_msg(c.error)):
            break
        ctx.note_interruption(RuntimeError(c.error))
        ctx.rt.wait_ready()
        prep["retried_after"] = c.error[:200]
    rec = {"workload": w.name, "strategy": s.name, "round": rnd, "tier": c.tier,
           "total_ms": round(c.total_ms, 3), "spans": c.spans,
           "phases": phases_of(c.spans, c.total_ms), "snapshot": c.info.get("snapshot"),
           "container_id": c.info.get("container_id"), "node_id": c.info.get("node_id"),
           "error": c.error, **prep}
    valid = c.error is None and c.tier in s.expect and not prep.get("prepare_error")
    if c.error is None and prep.get("prepare_error"):    # the start was not what it claims
        rec["error"] = f"prepare failed: {prep['prepare_error']}"
    rec["wrong_tier"] = c.error is None and c.tier not in s.expect
    if rec["wrong_tier"]:         # an error with the runtime's reason, never a silent miss
        why = "; ".join(x for x in (prep.get("prepare_error"), c.info.get("snapshot")) if x)
        rec["error"] = f"tier {c.tier}, expected {'/'.join(s.expect)}" + (
            f" ({why})" if why else "")
    if valid and w.expect is not None and c.value != w.expect:
        valid, rec["error"] = False, f"wrong result {c.value!r} (expected {w.expect!r})"
    rec["valid"] = valid
    if s.after:
        try:
            rec.update(s.after(ctx, fn, prep))
        except Exception as e:  # noqa: BLE001
            rec["after_error"] = f"{type(e).__name__}: {e}"[:300]
    try:
        rec["rss_bytes"] = ctx.rt.rss_bytes(rec["container_id"])
    except Exception:  # noqa: BLE001
        rec["rss_bytes"] = None
    return rec


def _aggregate(w: str, s: Strategy, samples: list[dict], setup: dict) -> dict:
    good = [x for x in samples if x["valid"]]
    rec = {"workload": w, "strategy": s.name, "description": s.description,
           "n": len(good), "n_invalid": len(samples) - len(good)}
    totals = [x["total_ms"] for x in good]
    t = summary(totals)
    rec["total_ms"] = {k: t[k] for k in ("min", "p50", "p90", "mean", "max")} if good else None
    rec["phases_ms"] = {p: r3(pct([x["phases"][p] for x in good], 50)) for p in PHASES} \
        if good else None
    keys = sorted({k for x in good for k in x["spans"]})
    rec["spans_p50_ms"] = {k: r3(pct([x["spans"][k] for x in good if k in x["spans"]], 50))
                           for k in keys}
    rec["tiers"] = dict(Counter(x["tier"] for x in samples))
    if len({x["tier"] for x in good}) > 1:
        rec["by_tier"] = {tier: summary([x["total_ms"] for x in good if x["tier"] == tier])
                          for tier in sorted({x["tier"] for x in good})}
    rss = [x["rss_bytes"] for x in good if x.get("rss_bytes")]
    rec["rss_mb_p50"] = r3(pct(rss, 50) / 2**20) if rss else None
    pulled = [x for x in good if x.get("pulled_bytes") is not None]
    if pulled:
        rec["pulled"] = {"bytes_p50": r3(pct([x["pulled_bytes"] for x in pulled], 50)),
                         "chunks_p50": r3(pct([x["pulled_chunks"] for x in pulled], 50)),
                         "bytes_max": max(x["pulled_bytes"] for x in pulled)}
    rec["setup"] = setup
    errors = [x["error"] for x in samples if x.get("error")]
    if errors:
        rec["errors"] = errors[:3]
    bad_tiers = [x["tier"] for x in samples if x.get("wrong_tier")]
    if bad_tiers:
        rec["unexpected_tiers"] = bad_tiers
    if setup.get("error"):
        rec["status"], rec["reason"] = "error", setup["error"]
    elif not good:
        rec["status"] = "error"
        rec["reason"] = (errors[0] if errors else f"no call had tier {s.expect}: {bad_tiers}")
    else:
        rec["status"] = "ok" if len(good) == len(samples) else "partial"
    return rec


def run(args) -> dict:
    with contextlib.ExitStack() as stack:     # holds the peer node, when one is attached
        return _run(args, stack)


def _run(args, stack: contextlib.ExitStack) -> dict:
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    rt = Runtime()
    quick = bool(args.quick)
    repeats = args.repeats or (2 if quick else 5)
    ctx = Ctx(rt, settle_s=args.settle_s, warmup=args.warmup, log=_log)
    workloads = selected(args.workloads, quick)
    strategies = [STRATEGIES[n] for n in (args.strategies or DEFAULT_STRATEGIES)]
    run_id = f"{int(time.time())}"
    skipped = {w.name: why for w in workloads if (why := w.skip())}
    for name, why in skipped.items():
        _log(f"{name}: skipped: {why}")

    t = time.perf_counter()
    fns, builds = _deploy(ctx, workloads, strategies, skipped)
    ctx.deployed = list(fns.values())
    deploy_s = time.perf_counter() - t

    cells = [(w, s) for w in workloads for s in strategies
             if w.name not in skipped and s.implemented]
    if any(s.on_peer for _, s in cells):    # after deploy: image builds stay on the home node
        _attach_peer(ctx, stack)
    setups: dict[tuple[str, str], dict] = {}
    samples: dict[tuple[str, str], list[dict]] = {(w.name, s.name): [] for w, s in cells}
    setup_s = measure_s = 0.0
    # Cells that empty the image cache run last (setup and rounds), after every other.
    for group in ("runtime", "image"):
        group_cells = [(w, s) for w, s in cells if s.group == group]
        t = time.perf_counter()
        for w, s in group_cells:
            fn = fns[(w.name, s.variant)]
            if s.setup:
                _log(f"setup {w.name}/{s.name} ...")
                try:
                    setups[(w.name, s.name)] = s.setup(ctx, fn, w.args)
                except Exception as e:  # noqa: BLE001
                    setups[(w.name, s.name)] = {"error": f"setup: {type(e).__name__}: {e}"[:500]}
                if "checkpoint_ms" in setups[(w.name, s.name)]:
                    st = setups[(w.name, s.name)]
                    _log(f"  snapshot {st.get('snapshot_id')}: call {st['snapshot_call_ms']:.0f} "
                         f"ms, checkpoint {st.get('checkpoint_ms')} ms, raw "
                         f"{(st.get('snapshot_raw_bytes') or 0) / 2**20:.1f} MiB")
            else:
                setups[(w.name, s.name)] = {}
        setup_s += time.perf_counter() - t
        live = [(w, s) for w, s in group_cells if not setups[(w.name, s.name)].get("error")]
        t = time.perf_counter()
        for rnd in range(repeats):                       # interleaved: round-robin over cells
            for w, s in live:
                rec = _sample(ctx, w, s, fns[(w.name, s.variant)], rnd)
                samples[(w.name, s.name)].append(rec)
                _log(f"round {rnd + 1}/{repeats} {w.name:6s} {s.name:8s} {rec['total_ms']:9.1f} "
                     f"ms tier={rec['tier']}"
                     f"{'' if rec['valid'] else '  INVALID ' + str(rec['error'])}")
        measure_s += time.perf_counter() - t
    if any(s.name in ("full_pull", "lazy_image") for s in strategies):
        for _node, nc in ctx.rt.node_clients():      # back to the default policy
            nc.json("POST", "/v1/config", {"lazy_images": True})

    results = []
    for w in workloads:
        for s in strategies:
            if not s.implemented:
                results.append({"workload": w.name, "strategy": s.name,
                                "description": s.description, "status": "not_implemented",
                                "reason": s.needs, "n": 0, "total_ms": None,
                                "phases_ms": None, "ratio_to_cold": None})
            elif w.name in skipped:
                results.append({"workload": w.name, "strategy": s.name,
                                "description": s.description, "status": "skipped",
                                "reason": skipped[w.name], "n": 0, "total_ms": None,
                                "phases_ms": None, "ratio_to_cold": None})
            else:
                results.append(_aggregate(w.name, s, samples[(w.name, s.name)],
                                          setups[(w.name, s.name)]))
    cold = {r["workload"]: r["total_ms"]["p50"] for r in results
            if r["strategy"] == "cold" and r.get("total_ms")}
    for r in results:
        if r.get("total_ms") and r["workload"] in cold:
            r["ratio_to_cold"] = round(r["total_ms"]["p50"] / cold[r["workload"]], 4)
        else:
            r.setdefault("ratio_to_cold", None)

    # leave the shared runtime as we found it: no idle bench containers, no bench snapshots
    for (wname, v), fn in fns.items():
        try:
            rt.drain(fn.object_id)
            if v == "snap" and not args.keep_snapshots:
                rt.delete_snapshots(fn.object_id)
        except Exception as e:  # noqa: BLE001
            _log(f"cleanup of {wname}/{v}: {e}")

    env = environment(rt)
    env.update(runtime_interruptions=ctx.interruptions,
               loadavg_start=[round(x, 2) for x in load_start],
               loadavg_end=[round(x, 2) for x in env.pop("loadavg")], quick=quick,
               repeats=repeats, warmup_calls=args.warmup, settle_s=args.settle_s,
               run_id=run_id, home_node=ctx.home, peer_node=ctx.peer,
               peer_error=ctx.peer_error, state="steady state: page and layer caches warmed by "
               f"{args.warmup} unmeasured call(s) per cell before round 1")
    return {"kind": "coldstart", "environment": env,
            "workloads": {w.name: {"description": w.description, "options": w.options,
                                   "skipped": skipped.get(w.name)} for w in workloads},
            "strategies": {s.name: {"description": s.description, "variant": s.variant,
                                    "expect_tiers": list(s.expect),
                                    "implemented": s.implemented, "needs": s.needs}
                           for s in strategies},
            "phases": list(PHASES), "builds": builds, "results": results,
            "timing_s": {"deploy": round(deploy_s, 1), "setup": round(setup_s, 1),
                         "measure": round(measure_s, 1),
                         "total": round(time.perf_counter() - t_start, 1)},
            "samples": [x for v in samples.values() for x in v]}
