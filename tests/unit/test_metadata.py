"""runtimed.metadata: the dispatcher's SQLite store, especially the call state machine."""
from __future__ import annotations

import json

import pytest

from runtimed.metadata import TERMINAL, TRANSITIONS, InvalidCallTransition, Metadata


@pytest.fixture
def md(tmp_path):
    return Metadata(tmp_path / "d" / "meta.db")


def test_happy_path(md):
    md.add_call("call-1", "fn-1", b"args")
    c = md.get_call("call-1")
    assert c["status"] == "queued" and c["args"] == b"args" and c["attempts"] == 0
    assert md.bump_attempts("call-1") == 1
    md.set_status("call-1", "running", node_id="node-a")
    c = md.get_call("call-1")
    assert c["status"] == "running" and c["started"] and c["node_id"] == "node-a"
    assert c["finished"] is None
    md.set_status("call-1", "succeeded", result=json.dumps({"ok": True}),
                  result_payload=b"\x80pickle", tier="warm")
    c = md.get_call("call-1")
    assert c["status"] == "succeeded" and c["finished"] >= c["started"]
    assert c["result_payload"] == b"\x80pickle" and c["tier"] == "warm"
    assert md.unfinished_calls() == []


def test_retry_and_node_loss_requeue(md):
    md.add_call("c", "fn", b"")
    md.set_status("c", "running")
    md.set_status("c", "queued")            # node lost / retry: at-least-once
    assert md.unfinished_calls() == ["c"]
    md.set_status("c", "running")
    md.set_status("c", "failed", result=json.dumps({"error": {"code": "oom"}}))
    assert md.get_call("c")["status"] == "failed"


@pytest.mark.parametrize("path", [["cancelled"], ["failed"], ["running", "cancelled"],
                                  ["running", "failed"], ["running", "succeeded"]])
def test_valid_paths(md, path):
    md.add_call("c", "fn", b"")
    for s in path:
        md.set_status("c", s)
    assert md.get_call("c")["status"] == path[-1]


@pytest.mark.parametrize("path, bad", [
    ([], "succeeded"),                      # must run first
    ([], "queued"),
    (["running"], "running"),
    (["running", "succeeded"], "failed"),
    (["running", "succeeded"], "queued"),
    (["running", "succeeded"], "cancelled"),
    (["running", "failed"], "running"),
    (["cancelled"], "running"),
    (["cancelled"], "succeeded"),
    ([], "bogus"),
])
def test_invalid_transitions_raise(md, path, bad):
    md.add_call("c", "fn", b"")
    for s in path:
        md.set_status("c", s)
    before = md.get_call("c")
    with pytest.raises(InvalidCallTransition):
        md.set_status("c", bad)
    assert md.get_call("c") == before          # nothing written


def test_unknown_call(md):
    assert md.get_call("nope") is None
    with pytest.raises(KeyError):
        md.set_status("nope", "running")


def test_terminal_states_are_final():
    for s in TERMINAL:
        assert TRANSITIONS[s] == set()
    assert set(TRANSITIONS) == {"queued", "running", *TERMINAL}


def test_unfinished_and_listing_order(md):
    for i in range(3):
        md.add_call(f"c{i}", "fn", b"")
    md.set_status("c1", "running")
    md.set_status("c1", "succeeded")
    assert md.unfinished_calls() == ["c0", "c2"]
    assert [c["id"] for c in md.list_calls(2)] == ["c2", "c1"]
    assert "args" not in md.list_calls()[0]


def test_logs_in_order_and_after(md):
    md.add_call("c", "fn", b"")
    assert md.next_log_seq("c") == 0
    for i, text in enumerate(["a\n", "b\n", "c\n"]):
        md.add_log("c", i, "stdout" if i != 1 else "stderr", text)
    assert md.next_log_seq("c") == 3
    assert [e["text"] for e in md.logs("c")] == ["a\n", "b\n", "c\n"]
    assert [e["seq"] for e in md.logs("c", after=0)] == [1, 2]
    assert md.logs("c", after=0)[0]["stream"] == "stderr"
    assert md.logs("other") == []


def test_functions_images_layers(md, tmp_path):
    md.put_function("fn-1", "square", "app", "blob", "img-1", {"cpu": 1})
    assert md.get_function("fn-1")["config"] == {"cpu": 1}
    assert md.get_function("fn-2") is None
    md.put_image("img-1", {"steps": [{"key": "k"}]}, [{"status": "built"}])
    assert md.get_image("img-1") == {"steps": [{"key": "k"}]}
    assert md.list_images()[0]["report"] == [{"status": "built"}]
    md.put_layer("k1", "d1", 10, 20)
    md.put_layer("k2", "d2", 10, 20)
    assert md.layer_archives(["k1", "k3"]) == {"k1": "d1"}
    assert md.layer_archives([]) == {}
    # the store survives a reopen
    again = Metadata(tmp_path / "d" / "meta.db")
    assert again.get_function("fn-1")["name"] == "square"
