"""`python -m bench cost`: GPU-hours per day of serving a GPU function three ways.

The seed's worked example (1000 requests/day, 2 s of GPU each, 30 s cold start, 90 %
warm hit rate) says: no pool 8.9 h; warm pool 1.4 h + 24 h idle; snapshots 0.56 h.
These formulas give exactly those numbers (N requests/day, d s per request, c s cold
start, r s restore, h warm hit rate, P pool size, T s idle before scale-down):

  no_pool    scale to zero, every request starts cold:
               busy = N (d + c)                    = 1000 x 32 s    = 8.89 h  -> 8.9
               idle = N T                          (T = 0 in the seed)
  warm_pool  P containers kept warm all day; misses (1 - h) start cold:
               busy = N (d + (1 - h) c)            = 1000 x 5 s     = 1.39 h  -> 1.4
               idle = 24 h x P                     = 24 h           (seed: "+ 24 h idle")
  snapshots  scale to zero; misses restore a snapshot instead of starting cold:
               busy = N (d + (1 - h) r)            = 1000 x 2.01 s  = 0.558 h -> 0.56
               idle = N (1 - h) T                  (T = 0 in the seed)
             with r = 0.1 s, the seed's restore target ("roughly 100 ms"); any r up to
             ~0.2 s rounds to 0.56 h, so the example barely depends on r.

billed = busy + idle, following the seed (the pool's idle day is on top of the busy
time). cost/day = billed x price. The measured variant replaces c and r with the p50
cold and restore totals of one workload from coldstart.json (CPU workloads here: the
absolute GPU-hours are then illustrative, the ratio between strategies is the point).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

SEED_EXPECTED = {"no_pool": "8.9 h", "warm_pool": "1.4 h + 24.0 h idle", "snapshots": "0.56 h"}


@dataclass(frozen=True)
class Params:
    requests_per_day: float = 1000
    duration_s: float = 2.0
    cold_start_s: float = 30.0
    restore_s: float = 0.1
    warm_hit_rate: float = 0.9
    pool_size: int = 1
    idle_timeout_s: float = 0.0
    price_per_gpu_hour: float = 2.50


def model(p: Params) -> dict[str, dict]:
    n, d, c, r, h = (p.requests_per_day, p.duration_s, p.cold_start_s, p.restore_s,
                     p.warm_hit_rate)
    rows = {
        "no_pool": (n * (d + c), n * p.idle_timeout_s, "N (d + c)", "N T"),
        "warm_pool": (n * (d + (1 - h) * c), 24 * 3600 * p.pool_size,
                      "N (d + (1 - h) c)", "24 h x P"),
        "snapshots": (n * (d + (1 - h) * r), n * (1 - h) * p.idle_timeout_s,
                      "N (d + (1 - h) r)", "N (1 - h) T"),
    }
    out = {}
    for name, (busy_s, idle_s, f_busy, f_idle) in rows.items():
        billed_h = (busy_s + idle_s) / 3600
        out[name] = {"busy_gpu_h": round(busy_s / 3600, 4), "idle_gpu_h": round(idle_s / 3600, 4),
                     "billed_gpu_h": round(billed_h, 4),
                     "cost_per_day": round(billed_h * p.price_per_gpu_hour, 2),
                     "formula_busy": f_busy, "formula_idle": f_idle,
                     "seed_style": _seed_style(busy_s / 3600, idle_s / 3600)}
    return out


def _seed_style(busy_h: float, idle_h: float) -> str:
    b = f"{busy_h:.2f} h" if busy_h < 1 else f"{busy_h:.1f} h"
    return b + (f" + {idle_h:.1f} h idle" if idle_h else "")


def measured_params(p: Params, coldstart: dict, workload: str | None) -> tuple[Params, dict]:
    """c and r from the p50 totals of one workload's cold and restore cells."""
    res = {(r["workload"], r["strategy"]): r for r in coldstart.get("results", [])
           if r.get("total_ms")}
    order = [workload] if workload else ["model", "heavy", "numpy", "noop"]
    for w in order:
        if (w, "cold") in res and (w, "restore") in res:
            c = res[(w, "cold")]["total_ms"]["p50"] / 1000
            r = res[(w, "restore")]["total_ms"]["p50"] / 1000
            src = {"workload": w, "cold_start_s": round(c, 4), "restore_s": round(r, 4),
                   "warm_s": round(res[(w, "warm")]["total_ms"]["p50"] / 1000, 4)
                   if (w, "warm") in res else None,
                   "from": "p50 totals in coldstart.json",
                   "quick": coldstart.get("environment", {}).get("quick")}
            return replace(p, cold_start_s=c, restore_s=r), src
    raise LookupError(f"coldstart.json has no workload with both cold and restore results "
                      f"(tried {order})")


def table(title: str, p: Params, rows: dict[str, dict]) -> str:
    lines = [title,
             f"  N={p.requests_per_day:g}/day d={p.duration_s:g}s c={p.cold_start_s:.3g}s "
             f"r={p.restore_s:.3g}s h={p.warm_hit_rate:g} P={p.pool_size} "
             f"T={p.idle_timeout_s:g}s price=${p.price_per_gpu_hour:g}/GPU-h",
             f"  {'strategy':10s} {'busy GPU-h':>10s} {'idle GPU-h':>10s} {'billed':>8s} "
             f"{'$/day':>8s}  seed-style            formula (busy; idle)"]
    for name, r in rows.items():
        lines.append(f"  {name:10s} {r['busy_gpu_h']:10.3f} {r['idle_gpu_h']:10.3f} "
                     f"{r['billed_gpu_h']:8.3f} {r['cost_per_day']:8.2f}  "
                     f"{r['seed_style']:20s}  {r['formula_busy']}; {r['formula_idle']}")
    return "\n".join(lines)


def run(args) -> tuple[dict, str]:
    p = Params(args.requests_per_day, args.duration_s, args.cold_start_s, args.restore_s,
               args.warm_hit_rate, args.pool_size, args.idle_timeout_s, args.price_per_gpu_hour)
    out: dict = {"kind": "cost", "params": asdict(p), "results": model(p)}
    text = [table("Cost model (flags; defaults = the seed's worked example)", p, out["results"])]
    if p == Params():
        got = {k: v["seed_style"] for k, v in out["results"].items()}
        out["seed_check"] = {"expected": SEED_EXPECTED, "got": got,
                             "reproduced": got == SEED_EXPECTED}
        text.append(f"  seed example reproduced: {out['seed_check']['reproduced']}")
    src = Path(args.coldstart) if args.coldstart else Path(args.out) / "coldstart.json"
    if src.exists():
        try:
            mp, info = measured_params(p, json.loads(src.read_text()), args.workload)
            out["measured"] = {"source": dict(info, path=str(src)), "params": asdict(mp),
                               "results": model(mp)}
            text.append(table(f"With measured cold start / restore ({info['workload']}, "
                              f"{src})", mp, out["measured"]["results"]))
        except (LookupError, ValueError, KeyError) as e:
            out["measured"] = {"error": str(e), "path": str(src)}
            text.append(f"(no measured variant: {e})")
    else:
        out["measured"] = {"error": f"{src} not found; run `python -m bench coldstart` first"}
        text.append(f"(no measured variant: {src} not found)")
    return out, "\n\n".join(text)
