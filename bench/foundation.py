"""`python -m bench foundation`: the foundation issue's numbers.

- warm round trip: `.remote()` of a no-op on a warm container, p50/p99 over N calls
  after a warm-up;
- its overhead over `.local()` (difference of the p50s);
- cold start of a fresh container for a numpy-importing function (drained before each);
- image build time, cold (a unique step first, so no step below it is cached) vs the
  same image again (every step a layer-cache hit).
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from collections import Counter

from sdk import App, Image

from .phases import PHASES, phases_of
from .runtime import Runtime, environment
from .stats import pct, r3, summary
from .strategies import timed_call
from .workloads import BASE, WORKLOADS, noop

SMALL_PKG = "six==1.17.0"


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _deploy(app: App) -> tuple[float, dict]:
    t = time.perf_counter()
    app.deploy(show_progress=False)
    ms = (time.perf_counter() - t) * 1000
    fn = next(iter(app.registered_functions.values()))
    return ms, dict(Counter(s.get("status") for s in fn.image.last_build))


def run(args) -> dict:
    t0 = time.perf_counter()
    rt = Runtime()
    res: dict = {"kind": "foundation", "environment": environment(rt)}

    app = App("bench-foundation-noop")
    fn = WORKLOADS["noop"].register(app)
    app_np = App("bench-foundation-numpy")
    fn_np = WORKLOADS["numpy"].register(app_np)
    _deploy(app)
    _deploy(app_np)

    # 1. warm round trip
    for _ in range(args.warmup):
        fn.remote(1)
    times, tiers = [], Counter()
    for i in range(args.calls):
        t = time.perf_counter()
        fn.remote(i)
        times.append((time.perf_counter() - t) * 1000)
        tiers[fn.last_call.info.get("tier")] += 1
    spans = fn.last_call.info.get("spans", {})
    res["warm_roundtrip_ms"] = dict(summary(times, (50, 90, 99)), tiers=dict(tiers),
                                    last_spans=spans)
    _log(f"warm round trip: p50 {pct(times, 50):.2f} ms, p99 {pct(times, 99):.2f} ms "
         f"over {len(times)} calls (tiers {dict(tiers)})")

    # 2. overhead over .local()
    local_us = []
    for i in range(args.calls):
        t = time.perf_counter()
        fn.local(i)
        local_us.append((time.perf_counter() - t) * 1e6)
    res["local_us"] = summary(local_us, (50, 99))
    res["remote_overhead_p50_ms"] = r3(pct(times, 50) - pct(local_us, 50) / 1000)

    # 3. cold start of a numpy-importing function
    cold, warmups = [], []
    for _ in range(args.cold_warmup):      # steady state: page cache warm, as in coldstart
        rt.drain(fn_np.object_id, args.settle_s)
        c = timed_call(fn_np, (1,))
        warmups.append({"total_ms": round(c.total_ms, 3), "tier": c.tier, "error": c.error})
    for _ in range(args.cold_repeats):
        rt.drain(fn_np.object_id, args.settle_s)
        c = timed_call(fn_np, (1,))
        cold.append({"total_ms": round(c.total_ms, 3), "tier": c.tier, "spans": c.spans,
                     "phases": phases_of(c.spans, c.total_ms), "error": c.error})
        _log(f"numpy cold start: {c.total_ms:.0f} ms (tier {c.tier})")
    good = [c for c in cold if c["tier"] == "cold" and not c["error"]]
    res["cold_numpy_ms"] = dict(summary([c["total_ms"] for c in good], (50, 90)),
                                phases_p50={p: r3(pct([c["phases"][p] for c in good], 50))
                                            for p in PHASES} if good else None,
                                samples=cold, unmeasured_warmup=warmups)
    rt.drain(fn_np.object_id)

    # 4. image build: cold vs layer cache
    tag = uuid.uuid4().hex[:12]

    def image() -> Image:
        return Image.debian_slim().run_commands(f"echo bench-build-{tag}").pip_install(SMALL_PKG)
    builds = {}
    for label in ("cold", "cached"):
        a = App(f"bench-build-{label}")
        a.function(image=image(), **dict(BASE, memory=128))(noop)
        ms, steps = _deploy(a)
        builds[label] = {"ms": round(ms, 1), "steps": steps}
        _log(f"image build {label}: {ms / 1000:.2f} s (steps {steps})")
    res["image_build"] = dict(builds, image=f"debian_slim -> run_commands(echo <unique>) -> "
                              f"pip_install({SMALL_PKG})",
                              note="deploy wall time: build stream + function registration")
    rt.drain(fn.object_id)
    res["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return res


def table(res: dict) -> str:
    w, loc, c, b = (res["warm_roundtrip_ms"], res["local_us"], res["cold_numpy_ms"],
                    res["image_build"])
    rows = [
        ("warm .remote() no-op, p50", f"{w['p50']:.2f} ms", f"n={w['n']}, tiers {w['tiers']}"),
        ("warm .remote() no-op, p99", f"{w['p99']:.2f} ms", ""),
        (".local() no-op, p50", f"{loc['p50']:.2f} µs", ""),
        ("remote overhead over .local() (p50 diff)", f"{res['remote_overhead_p50_ms']:.2f} ms",
         ""),
        ("cold start, numpy function, p50", f"{c.get('p50', float('nan')):.0f} ms",
         f"min {c.get('min', float('nan')):.0f} / max {c.get('max', float('nan')):.0f}, "
         f"n={c['n']}"),
        ("image build, cold", f"{b['cold']['ms'] / 1000:.2f} s", str(b["cold"]["steps"])),
        ("image build, layer cache", f"{b['cached']['ms'] / 1000:.3f} s",
         str(b["cached"]["steps"])),
    ]
    if c.get("phases_p50"):
        rows.append(("  cold phases p50 (ms)", "", ", ".join(
            f"{k} {v:.0f}" for k, v in c["phases_p50"].items() if v)))
    wid = max(len(r[0]) for r in rows)
    return "\n".join(f"{a.ljust(wid)}  {b_:>12}  {c_}" for a, b_, c_ in rows)
