"""bench/ without a runtime: the phase split, one sample's record, a cell's aggregate and
the report, for the restore_peer row (a call pinned to the peer node B, valid only when
the runtime says tier restore_peer) next to the rows pinned to the home node A."""
from __future__ import annotations

import dataclasses
import time

import pytest

from bench import coldstart, report, strategies
from bench.phases import PHASES, phases_of
from bench.strategies import STRATEGIES, Call, Ctx
from bench.workloads import WORKLOADS
from sdk import FunctionCall

# spans of a real restore_peer call (noop workload, 2-core VM)
PEER_SPANS = {"queue": 251.4, "snapshot_pull": 86.3, "materialize": 29.8, "netns": 3.8,
              "upper_restore": 1.0, "rootfs": 1.2, "runc_restore": 125.5, "resume": 2.6,
              "image": 0.2, "execute": 0.0, "call": 1.6}
PULLED_NOTE = ("restored snap-9f8e82dad4912dcd (eager); pulled from http://127.0.0.1:45568: "
               "30 chunks (2.0 MiB), 0 already here")
FALLBACK_NOTE = "snapshot pull failed, cold start used: no peer could provide the snapshot"


class FakeRuntime:
    def rss_bytes(self, container_id):
        return None


def _call(tier: str, note: str = "", spans: dict | None = None, total: float = 259.3) -> Call:
    return Call(total, tier, dict(spans or PEER_SPANS), {"tier": tier, "snapshot": note}, 1)


def _peer_row(**kw) -> strategies.Strategy:
    """restore_peer with its runtime-touching steps replaced by fakes."""
    fakes = {"prepare": lambda ctx, fn, args: {"peer_store_before": {"chunks": 0,
                                                                      "stored_bytes": 0}},
             "after": lambda ctx, fn, prep: {"pulled_chunks": 30, "pulled_bytes": 2_070_905}}
    return dataclasses.replace(STRATEGIES["restore_peer"], **dict(fakes, **kw))


def _sample(monkeypatch, strategy, call: Call) -> tuple[dict, str | None]:
    sent_to = []

    def fake_timed_call(fn, args, node_id=None):
        sent_to.append(node_id)
        return call
    monkeypatch.setattr(coldstart, "timed_call", fake_timed_call)
    ctx = Ctx(FakeRuntime(), home="node-a", peer="node-b")
    rec = coldstart._sample(ctx, WORKLOADS["noop"], strategy, object(), 0)
    return rec, sent_to[-1]


def test_restore_peer_is_a_measured_row():
    s = STRATEGIES["restore_peer"]
    assert s.implemented and s.on_peer and s.expect == ("restore_peer",)
    assert s.variant == STRATEGIES["restore"].variant      # same function as restore
    assert s.setup and s.prepare and s.after


def test_the_snapshot_pull_is_its_own_phase_and_phases_add_up():
    ph = phases_of(PEER_SPANS, 259.3)
    assert ph["transfer"] == 86.3
    start = sum(PEER_SPANS[k] for k in ("image", "snapshot_pull", "materialize", "netns",
                                        "upper_restore", "rootfs", "runc_restore", "resume"))
    assert ph["scheduling"] == pytest.approx(PEER_SPANS["queue"] - start, abs=1e-3)
    assert sum(ph.values()) == pytest.approx(259.3, abs=0.01)
    assert set(ph) == set(PHASES)
    assert phases_of({"queue": 5.0, "execute": 1.0}, 9.0)["transfer"] == 0.0


def test_peer_call_goes_to_the_peer_and_the_others_to_home(monkeypatch):
    rec, node = _sample(monkeypatch, _peer_row(), _call("restore_peer", PULLED_NOTE))
    assert node == "node-b"
    assert rec["valid"] and rec["error"] is None and not rec["wrong_tier"]
    assert rec["pulled_bytes"] == 2_070_905 and rec["pulled_chunks"] == 30
    assert rec["phases"]["transfer"] == 86.3
    _, node = _sample(monkeypatch, dataclasses.replace(STRATEGIES["restore"], prepare=None),
                      _call("restore"))
    assert node == "node-a"


def test_a_peer_call_with_another_tier_is_an_error_with_the_runtimes_reason(monkeypatch):
    rec, _ = _sample(monkeypatch, _peer_row(), _call("cold", FALLBACK_NOTE))
    assert not rec["valid"] and rec["wrong_tier"]
    assert rec["error"].startswith("tier cold, expected restore_peer")
    assert FALLBACK_NOTE in rec["error"]
    agg = coldstart._aggregate("noop", STRATEGIES["restore_peer"], [rec], {})
    assert agg["status"] == "error" and agg["n"] == 0
    assert FALLBACK_NOTE in agg["reason"] and agg["unexpected_tiers"] == ["cold"]


def test_a_failed_prepare_is_named_in_the_error(monkeypatch):
    def prepare(ctx, fn, args):
        raise RuntimeError("node-a no longer reports the snapshot")
    rec, _ = _sample(monkeypatch, _peer_row(prepare=prepare), _call("cold", FALLBACK_NOTE))
    assert "node-a no longer reports the snapshot" in rec["error"]
    assert "prepare_error" in rec


def _result(monkeypatch) -> dict:
    good, _ = _sample(monkeypatch, _peer_row(), _call("restore_peer", PULLED_NOTE))
    bad, _ = _sample(monkeypatch, _peer_row(), _call("cold", FALLBACK_NOTE))
    setup = {"home_node": "node-a", "peer_node": "node-b", "peer_snapshot_id": "snap-x"}
    rows = [coldstart._aggregate("noop", STRATEGIES["restore_peer"], [good, good, bad], setup)]
    env = {"quick": True, "repeats": 3, "runtime_interruptions": []}
    return {"environment": env, "results": rows, "samples": [good, good, bad]}


def test_cell_aggregate_and_report_show_the_transfer(monkeypatch):
    res = _result(monkeypatch)
    row = res["results"][0]
    assert row["status"] == "partial" and row["n"] == 2 and row["n_invalid"] == 1
    assert row["pulled"] == {"bytes_p50": 2_070_905, "chunks_p50": 30, "bytes_max": 2_070_905}
    md = report.markdown(res)
    assert "| xfer |" in md
    assert "Peer pulls" in md and "| noop | node-a -> node-b |" in md
    assert "| 30 | 1.97 | 86.3 |" in md


def test_pinned_timed_call_stops_the_clock_when_the_answer_is_finished(monkeypatch):
    class Answered(FunctionCall):
        def get(self, timeout=None):
            time.sleep(0.3)               # asking again for a finished call: not timed
            return 2.0

    class Fn:
        last_call = None

    def submit_on(fn, args, node_id):
        assert node_id == "node-b"
        fc = Answered("call-1", client=object())
        fc.last_state = {"status": "succeeded",
                         "result": {"tier": "restore_peer", "spans": {"queue": 1.0}}}
        return fc
    monkeypatch.setattr(strategies, "submit_on", submit_on)
    fn = Fn()
    c = strategies.timed_call(fn, (1,), "node-b")
    assert c.value == 2.0 and c.error is None and c.tier == "restore_peer"
    assert c.total_ms < 250 and fn.last_call is not None
