"""Percentiles and summaries of latency samples (pure; no numpy needed)."""
from __future__ import annotations

from typing import Iterable


def pct(values: Iterable[float], p: float) -> float | None:
    """The p-th percentile (0..100) with linear interpolation, as numpy's default."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(values: Iterable[float], ps: tuple[int, ...] = (50, 90)) -> dict:
    xs = [float(v) for v in values]
    if not xs:
        return {"n": 0}
    out = {"n": len(xs), "min": round(min(xs), 3), "max": round(max(xs), 3),
           "mean": round(sum(xs) / len(xs), 3)}
    for p in ps:
        out[f"p{p}"] = round(pct(xs, p), 3)
    return out


def r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
