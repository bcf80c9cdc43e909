"""runtimed.preemption (the requeue record of a preempted call) and the preemption error
on the wire, node -> dispatcher."""
from __future__ import annotations

import json

from cuda_restore.errors import GpuPreemptedError
from runtimed import preemption
from sdk.exception import NodeUnavailableError, from_wire


def node_error() -> dict:
    return GpuPreemptedError("preempted on node-a", by_call="call-hi", by_function="hi",
                             priority=10, node_id="node-a", gpus=(0,)).to_wire()


def test_the_error_keeps_its_code_and_who_preempted_through_the_wire():
    wire = node_error()
    assert wire["code"] == "gpu_preempted" and wire["by_call"] == "call-hi"
    e = from_wire(json.loads(json.dumps(wire)))          # the dispatcher's NodeClient
    assert e.code == "gpu_preempted" and e.to_wire() == wire
    assert preemption.is_preempted({"error": e.to_wire()})
    assert not preemption.is_preempted({"error": NodeUnavailableError("x").to_wire()})
    assert not preemption.is_preempted({"exc_type": "ValueError"})


def test_requeue_record_names_the_preempting_call():
    ev = preemption.preempted_event(node_error(), "node-x", 1, 1000.0)
    assert ev == {"type": "preempted", "at": 1000.0, "attempt": 1, "node_id": "node-a",
                  "by_call": "call-hi", "by_function": "hi", "priority": 10, "gpus": [0]}
    events = preemption.parse_events(json.dumps([ev]))
    assert events == [ev]
    assert preemption.summary(events) == "preempted by call-hi (node-a)"
    assert preemption.summary(events * 2) == "preempted x2 by call-hi (node-a)"
    assert preemption.summary([]) == ""


def test_preempted_attempts_do_not_count_against_retries():
    ev = preemption.preempted_event(node_error(), "node-a", 1, 0.0)
    assert preemption.counted_attempts(3, [ev, ev]) == 1
    assert preemption.counted_attempts(2, []) == 2


def test_events_text_that_is_missing_or_broken_reads_as_none():
    assert preemption.parse_events(None) == preemption.parse_events("") == []
    assert preemption.parse_events("{not json") == preemption.parse_events('{"a": 1}') == []
