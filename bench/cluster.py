"""`python -m bench cluster [--quick] [--out DIR]`: many nodes (issue 6).

Starts its own cluster on this machine (runtimed.devcluster): one dispatcher and three
node daemons with their own ports and state dirs, and a private redis-server.

1. Cold start with vs without snapshot affinity, same nodes, same run. A function
   with `snapshot=True` is called once on node A (cold start, snapshot taken), so its
   snapshot lives on A only. Then, for each sample: its idle containers are drained
   everywhere and the call is timed end to end (`.remote()`, client side):
   - affinity (the default placement): the call goes to A and restores there;
   - random (dispatcher restarted with RUNTIMED_PLACEMENT=random): 2/3 of the calls
     land on a node without the snapshot, which pulls it from A (all chunks: after
     each such sample the copy is deleted and the node's store emptied, so the
     snapshot keeps living on A only) and restores it;
   - random, no transfer (also RUNTIMED_SNAPSHOT_PEERS=0): those nodes cold start
     (and take a snapshot of their own, deleted after the sample).
   Random placement is random: the share of samples that landed off A is reported.
2. Warm no-op calls/s through one dispatcher, per backend (sqlite, then the same
   nodes with the dispatcher restarted on Redis): T client threads x N calls each,
   after a warm-up, several rounds (median reported).

Writes DIR/cluster.json: affinity_p50_ms, random_p50_ms, random_no_transfer_p50_ms,
warm_calls_per_s {sqlite, redis}, the samples, and the environment.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from sdk import App
from sdk.exception import Error

from .runtime import empty_snapshot_store, submit_on
from .stats import summary
from .workloads import WORKLOADS

DEFAULT_OUT = str(Path(__file__).resolve().parent / "results")


def _log(msg: str) -> None:
    print(f"[bench cluster] {msg}", file=sys.stderr, flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="numpy workload, 9 cold samples per policy, 2 warm rounds")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output dir (default {DEFAULT_OUT})")
    p.add_argument("--workload", default=None,
                   help="cold-start workload from bench.workloads (default heavy; quick numpy)")
    p.add_argument("--samples", type=int, default=None, help="cold starts per policy (30)")
    p.add_argument("--threads", type=int, default=8, help="warm: client threads")
    p.add_argument("--calls", type=int, default=None, help="warm: calls per thread per round")
    p.add_argument("--rounds", type=int, default=None, help="warm: rounds per backend (3)")
    p.add_argument("--keep-state", action="store_true", help="keep the cluster's state dir")
    return p


# -- measurements ---------------------------------------------------------------------------------
def _remote_ms(fn, *args) -> tuple[float, dict]:
    t = time.perf_counter()
    fn.remote(*args)
    ms = (time.perf_counter() - t) * 1000
    st = fn.last_call.last_state or {}
    res = st.get("result") or {}
    return ms, {"ms": round(ms, 2), "node_id": res.get("node_id"), "tier": res.get("tier"),
                "placement": (st.get("placement") or {}).get("reason"),
                "snapshot": res.get("snapshot", "")}


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (got := pred()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return got


def _empty_snapshot_stores(cl, node_ids: list[str]) -> None:
    """Delete every snapshot on these nodes and collect their chunks."""
    for nid in node_ids:
        empty_snapshot_store(cl.node_client(nid))


def _held_by(cl, fid: str) -> set[str]:
    return {n["node_id"] for n in cl.nodes_view() if fid in n["snapshots"]}


def cold_samples(cl, fn, holder: str, n: int, policy: str) -> list[dict]:
    others = sorted(x["node_id"] for x in cl.nodes_view() if x["node_id"] != holder)
    out = []
    for i in range(n):
        cl.drain(fn.object_id)
        _, rec = _remote_ms(fn, i)
        out.append(rec)
        if rec["node_id"] != holder:        # keep "the snapshot lives on A only" true
            _empty_snapshot_stores(cl, others)
            _wait(lambda: _held_by(cl, fn.object_id) <= {holder}, 15,
                  "the copies to disappear from the heartbeats")
        _log(f"  {policy} #{i}: {rec['ms']:.0f} ms on {rec['node_id']} "
             f"({rec['tier']}, placed: {rec['placement']})")
    return out


def warm_rate(fn, threads: int, calls: int, rounds: int) -> dict:
    for _ in range(3 * threads):               # containers on every node
        fn.remote(0)
    rates = []
    for _ in range(rounds):
        errors: list[BaseException] = []

        def worker(errors=errors):
            try:
                for i in range(calls):
                    fn.remote(i)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
        ths = [threading.Thread(target=worker) for _ in range(threads)]
        t = time.perf_counter()
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        el = time.perf_counter() - t
        if errors:
            raise errors[0]
        rates.append(round(threads * calls / el, 1))
    return {"calls_per_s": statistics.median(rates), "rounds": rates, "threads": threads,
            "calls_per_thread": calls}


def _p50(samples: list[dict]) -> float:
    return round(statistics.median(s["ms"] for s in samples), 2)


# -- the run -----------------------------------------------------------------------------------------
def run(args) -> dict:
    from runtimed.devcluster import LocalCluster
    from runtimed.redis_local import LocalRedis

    quick = args.quick
    wname = args.workload or ("numpy" if quick else "heavy")
    samples = args.samples or (9 if quick else 30)
    calls = args.calls or (60 if quick else 150)
    rounds = args.rounds or (2 if quick else 3)
    t0 = time.perf_counter()
    cl = LocalCluster(backend="sqlite", nodes=3)
    res: dict = {"kind": "cluster", "quick": quick, "workload": wname, "nodes": 3}
    try:
        _log(f"starting 3 nodes and a dispatcher (state {cl.state})")
        cl.start()
        client = cl.client()
        app = App("bench-cluster")
        snap = WORKLOADS[wname].register(app, snapshot=True, scaledown_window=900)
        noop = WORKLOADS["noop"].register(app)
        res["environment"] = _environment()
        with app.run(client=client, show_progress=False):
            _log("warm calls/s, sqlite")
            res["warm"] = {"sqlite": warm_rate(noop, args.threads, calls, rounds)}

            holder = "node-n1"
            _log(f"first call of {wname} on {holder}: cold start, snapshot taken")
            _, first = _remote_ms(_pinned(client, snap, holder), 0)
            res["first_call"] = first
            _wait(lambda: holder in _held_by(cl, snap.object_id), 20, "the snapshot")
            res["cold"] = {"affinity": cold_samples(cl, snap, holder, samples, "affinity")}

            for policy, env in (("random", {"RUNTIMED_PLACEMENT": "random"}),
                                ("random_no_transfer", {"RUNTIMED_PLACEMENT": "random",
                                                        "RUNTIMED_SNAPSHOT_PEERS": "0"})):
                cl.restart_dispatcher("d1", env=env)
                if policy == "random_no_transfer":
                    # nodes remember the peers a call once named: forget them
                    for name in ("n2", "n3"):
                        cl.node_procs[name].stop()
                        cl.start_node(name)
                cl.wait_nodes(3, 60, names=["n1", "n2", "n3"])
                res["cold"][policy] = cold_samples(cl, snap, holder, samples, policy)
            cl.restart_dispatcher("d1", env={})
            cl.wait_nodes(3, 60)

        _log("warm calls/s, redis (same nodes, dispatcher restarted on Redis)")
        cl.redis = LocalRedis(workdir=cl.state / "redis")
        cl.redis.start()
        cl.backend = "redis"
        cl.restart_dispatcher("d1")
        cl.wait_nodes(3, 60)
        with app.run(client=client, show_progress=False):     # a fresh store: deploy again
            res["warm"]["redis"] = warm_rate(noop, args.threads, calls, rounds)
    finally:
        left = cl.stop(keep_state=args.keep_state)
        if left:
            _log(f"teardown cleaned up: {left}")

    cold = res["cold"]
    res["affinity_p50_ms"] = _p50(cold["affinity"])
    res["random_p50_ms"] = _p50(cold["random"])
    res["random_no_transfer_p50_ms"] = _p50(cold["random_no_transfer"])
    res["random_over_affinity"] = round(res["random_p50_ms"] / res["affinity_p50_ms"], 2)
    res["random_share_off_holder"] = {
        k: round(sum(s["node_id"] != "node-n1" for s in cold[k]) / len(cold[k]), 2)
        for k in ("random", "random_no_transfer")}
    res["cold_summary_ms"] = {k: summary([s["ms"] for s in v], (50, 90)) for k, v in cold.items()}
    res["warm_calls_per_s"] = {k: v["calls_per_s"] for k, v in res["warm"].items()}
    res["timing_s"] = round(time.perf_counter() - t0, 1)
    return res


def _environment() -> dict:
    import os
    import platform
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f
                        if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"kernel": platform.release(), "cpu_model": cpu, "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _pinned(client, fn, node_id: str):
    """`fn` with its next call pinned to `node_id` (POST /v1/calls with node_id)."""
    class Pinned:
        last_call = None

        def remote(self, *args):
            fc = submit_on(fn, args, node_id, client)
            if fc.last_state["status"] not in ("succeeded", "failed", "cancelled"):
                fc.get(timeout=600)
            self.last_call = fc
    return Pinned()


def table(res: dict) -> str:
    off = res["random_share_off_holder"]
    lines = [
        (f"cluster bench ({'quick' if res['quick'] else 'full'}, workload {res['workload']}, "
         f"{res['nodes']} nodes, {res['timing_s']} s)"),
        "  cold start p50, snapshot on one node only:",
        f"    affinity routing            {res['affinity_p50_ms']:9.1f} ms",
        (f"    random placement            {res['random_p50_ms']:9.1f} ms  "
         f"({res['random_over_affinity']}x; {off['random']:.0%} on nodes that pull it "
         "from A)"),
        (f"    random, no peer transfer    {res['random_no_transfer_p50_ms']:9.1f} ms  "
         f"({off['random_no_transfer']:.0%} on nodes that cold start)"),
        "  warm no-op calls/s through one dispatcher:"]
    for k, v in res["warm"].items():
        lines.append(f"    {k:8s} {v['calls_per_s']:8.1f}  (rounds {v['rounds']}, "
                     f"{v['threads']} threads x {v['calls_per_thread']} calls)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
    try:
        res = run(args)
    except Error as e:
        print(f"bench cluster failed: {e}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(table(res))
    print(f"wrote {out / 'cluster.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
