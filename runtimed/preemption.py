"""A GPU call preempted by a higher-priority one is queued again, not lost: what the
dispatcher records about it and how it counts. Pure; the dispatcher stores the result.

A call's `events` (JSON text on the call record, a list) keep its history across
attempts; today one kind:

    {"type": "preempted", "at": <wall clock>, "attempt": N, "node_id": ...,
     "by_call": <the call that took the GPUs>, "by_function": ..., "priority": <its
     priority>, "gpus": [indices]}

A preempted attempt does not count against the function's `retries`.
"""
from __future__ import annotations

import json

PREEMPTED_CODE = "gpu_preempted"       # cuda_restore.errors.GpuPreemptedError.code


def is_preempted(outcome: dict) -> bool:
    """The node reported that the call's GPUs were given to a higher-priority call."""
    err = outcome.get("error")
    return isinstance(err, dict) and err.get("code") == PREEMPTED_CODE


def preempted_event(error: dict, node_id: str, attempt: int, at: float) -> dict:
    """The record of one preemption, from the node's error (GpuPreemptedError's wire)."""
    return {"type": "preempted", "at": round(at, 3), "attempt": attempt,
            "node_id": error.get("node_id") or node_id, "by_call": error.get("by_call") or None,
            "by_function": error.get("by_function") or None,
            "priority": error.get("priority"), "gpus": list(error.get("gpus") or ())}


def parse_events(text: str | None) -> list[dict]:
    """A call record's `events` (None or "" for a call without any)."""
    if not text:
        return []
    try:
        events = json.loads(text)
    except ValueError:
        return []
    return [e for e in events if isinstance(e, dict)] if isinstance(events, list) else []


def counted_attempts(attempts: int, events: list[dict]) -> int:
    """Attempts that count against `retries`: all but the preempted ones."""
    return attempts - sum(1 for e in events if e.get("type") == "preempted")


def summary(events: list[dict]) -> str:
    """One line for `runtimectl calls`: "preempted by call-x (node-a)", "preempted x2 ..."."""
    pre = [e for e in events if e.get("type") == "preempted"]
    if not pre:
        return ""
    last = pre[-1]
    times = f" x{len(pre)}" if len(pre) > 1 else ""
    by = last.get("by_call") or last.get("by_function") or "a higher-priority call"
    return f"preempted{times} by {by} ({last.get('node_id')})"
