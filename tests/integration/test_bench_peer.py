"""`python -m bench coldstart` with the restore_peer row, end to end against the test
runtime: the harness attaches a second node (B), the snapshot is taken on the runtime's
own node (A), each peer call is pinned to B after B's snapshot store is emptied, and must
come back as tier restore_peer with every chunk pulled from A. No timing asserts."""
from __future__ import annotations

import pytest

from bench import coldstart
from bench.__main__ import parser
from sdk.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_restore_peer_row_measures_a_pull_from_the_peer(runtime, tmp_path):
    args = parser().parse_args(["coldstart", "--workloads", "noop", "--strategies", "restore",
                                "restore_peer", "--repeats", "2", "--out", str(tmp_path)])
    res = coldstart.run(args)
    rows = {r["strategy"]: r for r in res["results"]}
    assert rows["restore"]["status"] == "ok", rows["restore"]
    peer = rows["restore_peer"]
    assert peer["status"] == "ok", peer
    assert peer["tiers"] == {"restore_peer": 2}

    env = res["environment"]
    home, b = env["home_node"], env["peer_node"]
    assert b and home and b != home
    samples = {s["strategy"]: [] for s in res["samples"]}
    for s in res["samples"]:
        samples[s["strategy"]].append(s)
    assert all(s["node_id"] == home for s in samples["restore"])
    snap = peer["setup"]["peer_snapshot_id"]
    assert snap == rows["restore"]["setup"]["snapshot_id"]       # the restore cell's snapshot
    for s in samples["restore_peer"]:
        assert s["node_id"] == b
        assert s["peer_store_before"]["chunks"] == 0             # B had nothing
        assert s["pulled_chunks"] > 0 and s["pulled_bytes"] > 0
        assert f"{s['pulled_chunks']} chunks" in s["snapshot"] and snap in s["snapshot"]
        assert s["phases"]["transfer"] > 0 and "snapshot_pull" in s["spans"]
    assert peer["pulled"]["chunks_p50"] == samples["restore_peer"][0]["pulled_chunks"]

    # B is gone again, and the bench's snapshots with it (asked of A itself: heartbeats lag)
    nodes = runtime.client.json("GET", "/v1/nodes")["nodes"]
    alive = {n["node_id"] for n in nodes if n["alive"]}
    assert b not in alive and home in alive
    fids = {d["function_id"] for d in res["builds"]["noop"].values()}
    a_url = next(n["url"] for n in nodes if n["node_id"] == home)
    snaps = Client(a_url, runtime.token).json("GET", "/v1/snapshots")["snapshots"]
    assert not any(s["function_id"] in fids for s in snaps)
