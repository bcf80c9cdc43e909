"""`runtimectl`: run the runtime and look inside it.

    up [--detach] | down | status | nodes | ps | images | calls | logs CALL_ID
    run SCRIPT.py[::FUNC] | node (a node daemon alone)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sdk.client import Client
from sdk.exception import Error

from .config import DEFAULT_PORT, Paths
from .preemption import summary as preemption_summary


def _client() -> Client:
    return Client()


def _pidfile() -> Path:
    return Paths.from_env().state / "up.pid"


def _wait_ready(timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            nodes = _client().json("GET", "/v1/nodes", retries=0)["nodes"]
            if any(n["alive"] for n in nodes):
                return True
        except Error:
            pass
        time.sleep(0.2)
    return False


def cmd_up(a) -> int:
    if os.geteuid() != 0:
        print("runtimectl up must run as root (the node daemon drives runc)", file=sys.stderr)
        return 1
    if a.detach:
        pf = _pidfile()
        if pf.exists():
            try:
                os.kill(int(pf.read_text()), 0)
                print(f"already running (pid {pf.read_text().strip()})")
                return 0
            except (OSError, ValueError):
                pf.unlink()
        pf.parent.mkdir(parents=True, exist_ok=True)
        logf = open(pf.parent / "up.log", "ab")
        p = subprocess.Popen([sys.executable, "-m", "runtimed.cli", "up", "--port", str(a.port)]
                             + (["--no-node"] if a.no_node else []) + _backend_argv(a),
                             stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        pf.write_text(str(p.pid))
        if a.no_node or _wait_ready():
            print(f"runtimed is up (pid {p.pid}); logs: {pf.parent / 'up.log'}")
            return 0
        print(f"runtimed did not become ready; see {pf.parent / 'up.log'}", file=sys.stderr)
        return 1
    from .embedded import main
    from .store import BackendConfig
    cfg = BackendConfig.from_env(kind=a.backend, redis_url=a.redis_url, replica=a.replica,
                                 max_pending=a.max_pending,
                                 blob_dir=Path(a.blob_dir) if a.blob_dir else None)
    main("127.0.0.1", a.port, a.port + 1, not a.no_node, cfg=cfg, reuse_port=a.reuse_port)
    return 0


def _backend_argv(a) -> list[str]:
    out = []
    for flag, v in (("--backend", a.backend), ("--redis-url", a.redis_url),
                    ("--replica", a.replica), ("--max-pending", a.max_pending),
                    ("--blob-dir", a.blob_dir)):
        if v is not None:
            out += [flag, str(v)]
    return out + (["--reuse-port"] if a.reuse_port else [])


def cmd_down(a) -> int:
    pf = _pidfile()
    if not pf.exists():
        print("not running")
        return 0
    pid = int(pf.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(300):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pf.unlink(missing_ok=True)
    print("stopped")
    return 0


def _table(rows: list[dict], cols: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


def cmd_status(a) -> int:
    st = _client().json("GET", "/v1/status")
    print(json.dumps(st, indent=2) if a.json else
          f"dispatcher {st.get('replica', '')} ({st.get('backend', 'sqlite')}) up since "
          f"{time.ctime(st['started_at'])}; unfinished calls: {st['pending_calls']}"
          f"/{st.get('max_pending', '?')}; replicas: "
          f"{', '.join(r['name'] for r in st.get('replicas') or []) or '-'}; "
          f"blobs: {st['blob_bytes'] / 2**20:.1f} MiB")
    if not a.json:
        _table(st["nodes"], ["node_id", "url", "alive", "inflight", "seen_s_ago", "reserved_mb"])
    return 0


def cmd_nodes(a) -> int:
    nodes = _client().json("GET", "/v1/nodes")["nodes"]
    if a.json:
        print(json.dumps(nodes, indent=2))
        return 0
    rows = []
    for n in nodes:
        warm = n.get("warm") or {}
        rows.append({
            "node_id": n["node_id"], "url": n["url"], "alive": n["alive"],
            "load": f"{n.get('active') or 0} active, {n.get('inflight') or 0} sent",
            "memory": f"{n.get('reserved_mb') or 0}/{n.get('memory_mb') or 0} MiB",
            "snapshots": _short_list(n.get("snapshots") or []),
            "layers": len(n.get("layers") or []),
            "warm": ", ".join(f"{k[:14]}x{v}" for k, v in warm.items()) or "-",
            "seen_s": n.get("seen_s_ago")})
    _table(rows, ["node_id", "url", "alive", "load", "memory", "snapshots", "layers", "warm",
                  "seen_s"])
    return 0


def _short_list(items: list[str], n: int = 3) -> str:
    if not items:
        return "-"
    shown = ", ".join(i[:14] for i in items[:n])
    return f"{len(items)}: {shown}" + (", ..." if len(items) > n else "")


def _placed(p: dict | None) -> str:
    """Why the call ran where it did (the placement record)."""
    if not p:
        return ""
    out = p.get("reason", "")
    if p.get("preempts"):
        out += " (" + ", ".join(v.get("call_id") or v["alloc_id"] for v in p["preempts"]) + ")"
    if p.get("wait_for"):
        out += f" (best: {p.get('wait_reason')} on {p['wait_for']} was full"
        out += f", waited {p['waited_ms']:.0f} ms)" if p.get("waited_ms") else ")"
    return out


def cmd_ps(a) -> int:
    rows = _client().json("GET", "/v1/containers")["containers"]
    for r in rows:
        r["rss_mb"] = f"{(r.get('rss_bytes') or 0) / 2**20:.0f}"
        r["age_s"] = f"{time.time() - r['created_at']:.0f}"
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        _table(rows, ["id", "node_id", "function", "state", "tier", "calls", "rss_mb", "age_s"])
    return 0


def cmd_images(a) -> int:
    data = _client().json("GET", "/v1/images")
    print("images:")
    for im in data["images"]:
        counts: dict[str, int] = {}
        for s in im["report"]:
            counts[s["status"]] = counts.get(s["status"], 0) + 1
        print(f"  {im['id']}  built {time.ctime(im['built'])}  steps: {counts}")
    print("layers (archives in the blob store):")
    _table([{"key": r["key"][:16], "digest": r["digest"][:16],
             "size_mb": f"{r['size'] / 2**20:.1f}", "raw_mb": f"{r['raw_size'] / 2**20:.1f}"}
            for r in data["layers"]], ["key", "digest", "size_mb", "raw_mb"])
    rows, caches = [], []
    for n in _client().json("GET", "/v1/nodes")["nodes"]:
        if not n.get("alive"):
            continue
        try:
            st = Client(n["url"]).json("GET", "/v1/status", retries=0)
        except Error as e:
            print(f"  (node {n['node_id']}: {e})")
            continue
        cc = st.get("chunk_cache") or {}
        if cc:
            caches.append({"node": n["node_id"], "size_mb": f"{cc['bytes'] / 2**20:.1f}",
                           "chunks": cc["chunks"],
                           "in_use_mb": f"{cc['pinned_bytes'] / 2**20:.1f}",
                           "budget_mb": f"{cc['budget_bytes'] / 2**20:.0f}"})
        for li in st.get("layers", []):
            if li["state"] == "lazy" and li.get("view"):
                ws = (li.get("workset") or {}).get("state")
                meta = (li.get("meta") or {}).get("kind")      # erofs image, published or not
                li["state"] += " (view" + (f", meta: {meta}" if meta else "") + (
                    f", working set {ws}" if ws else "") + ")"
            if li.get("published_prefetch_files"):
                li["state"] += f" (published {li['published_prefetch_files']} prefetch files)"
            fetched = li.get("bytes_fetched")
            rows.append({"node": n["node_id"], "key": li["key"], "state": li["state"] + (
                " (was lazy)" if li.get("was_lazy") and li["state"] == "local" else ""),
                "size_mb": f"{(li.get('size') or 0) / 2**20:.1f}" if li.get("size") else "",
                "fetched_mb": f"{fetched / 2**20:.1f}" if fetched is not None else "",
                "hits": li.get("hits", "")})
    print("layers on nodes (local = unpacked; lazy = eStargz over FUSE, fetched on read, "
          "metadata from a local view when mounted; remote = only in the blob store):")
    on_nodes = {r["key"] for r in rows}
    rows += [{"node": "-", "key": r["key"][:16], "state": "remote"} for r in data["layers"]
             if r["key"][:16] not in on_nodes]
    _table(rows, ["node", "key", "state", "size_mb", "fetched_mb", "hits"])
    if caches:
        print("chunk cache of lazy mounts (least recently used chunks pruned past the budget; "
              "in use = chunks of live mounts, never pruned):")
        _table(caches, ["node", "size_mb", "chunks", "in_use_mb", "budget_mb"])
    return 0


def cmd_calls(a) -> int:
    rows = _client().json("GET", f"/v1/calls?limit={a.limit}")["calls"]
    for r in rows:
        r["ms"] = f"{((r['finished'] or time.time()) - r['created']) * 1000:.0f}"
        r["placed"] = _placed(r.get("placement"))
        r["history"] = preemption_summary(r.get("events") or [])
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    _table(rows, ["id", "function_id", "status", "tier", "attempts", "node_id", "placed", "ms",
                  "history"])
    return 0


def cmd_logs(a) -> int:
    data = _client().json("GET", f"/v1/calls/{a.call_id}/logs")
    for e in data["logs"]:
        (sys.stderr if e["stream"] == "stderr" else sys.stdout).write(e["text"])
    return 0


def _node(a) -> tuple[Client, str]:
    """A client for one node's API (the embedded default has exactly one)."""
    nodes = [n for n in _client().json("GET", "/v1/nodes")["nodes"] if n["alive"]]
    if a.node:
        nodes = [n for n in nodes if n["node_id"] in (a.node, f"node-{a.node}")]
    if not nodes:
        raise Error("no live node" + (f" named {a.node}" if a.node else ""))
    if len(nodes) > 1:
        raise Error("several nodes: choose one with --node " + ", ".join(n["node_id"] for n in nodes))
    return Client(nodes[0]["url"]), nodes[0]["node_id"]


def _resolve_function(name: str) -> dict | None:
    """A function id (fn-…) or a function name registered with the dispatcher."""
    try:
        return _client().json("GET", f"/v1/functions/{name}")
    except Error:
        return None


def cmd_snapshot(a) -> int:
    node, node_id = _node(a)
    if a.action == "ls":
        data = node.json("GET", "/v1/snapshots")
        rows = [{"snapshot_id": s["snapshot_id"], "function": s["meta"].get("function_name") or
                 s["function_id"], "raw_mb": f"{s['raw_size'] / 2**20:.1f}",
                 "new_stored_mb": f"{s['stored_size'] / 2**20:.1f}", "hot": s["hot"],
                 "dump_ms": s["meta"].get("dump_ms", ""),
                 "age_s": f"{time.time() - s['created_at']:.0f}"} for s in data["snapshots"]]
        _table(rows, ["snapshot_id", "function", "raw_mb", "new_stored_mb", "hot", "dump_ms",
                      "age_s"])
        st = data["stats"]
        print(f"store on {node_id}: {st['snapshots']} snapshots, {st['chunks']} chunks, "
              f"{st['stored_bytes'] / 2**20:.1f} MiB stored")
        return 0
    if a.action in ("inspect", "rm", "verify", "export") and not a.id:
        raise Error(f"snapshot {a.action} needs a snapshot id")
    if a.action == "inspect":
        print(json.dumps(node.json("GET", f"/v1/snapshots/{a.id}"), indent=2))
    elif a.action == "rm":
        print(node.json("DELETE", f"/v1/snapshots/{a.id}"))
    elif a.action == "verify":
        res = node.json("POST", f"/v1/snapshots/{a.id}/verify", {})
        print("ok" if res["ok"] else "CORRUPT:\n  " + "\n  ".join(res["problems"]))
        return 0 if res["ok"] else 1
    elif a.action == "gc":
        budget = int(a.budget_mb * 2**20) if a.budget_mb is not None else None
        print(json.dumps(node.json("POST", "/v1/snapshots/gc", {"budget_bytes": budget})))
    elif a.action == "export":
        data = node.request("GET", f"/v1/snapshots/{a.id}/export")
        out = Path(a.file or f"{a.id}.tar")
        out.write_bytes(data)
        print(f"wrote {out} ({len(data) / 2**20:.1f} MiB)")
    elif a.action == "import":
        if not a.id:
            raise Error("snapshot import needs a file")
        data = Path(a.id).read_bytes()
        print(json.dumps(node.json_bytes("POST", "/v1/snapshots/import", data)))
    elif a.action == "create":
        if not a.id:
            raise Error("snapshot create needs a function (name or fn-id) or a container id")
        fn = None if a.id.startswith("ctr-") else _resolve_function(a.id)
        if fn is None and not a.id.startswith("ctr-"):
            raise Error(f"unknown function {a.id}")
        target = a.id if a.id.startswith("ctr-") else fn["id"]
        print(json.dumps(node.json("POST", "/v1/snapshots/create",
                                   {"target": target, "function": fn}), indent=2))
    return 0


def cmd_restore(a) -> int:
    node, _ = _node(a)
    res = node.json("POST", f"/v1/snapshots/{a.snapshot_id}/restore", {"mode": a.mode})
    print(f"restored {res['snapshot_id']} ({res.get('mode', a.mode)}) in {res['total_ms']:.1f} ms")
    for k, v in res["spans"].items():
        print(f"  {k:16s} {v:8.1f} ms")
    return 0


def load_script(path: str):
    p = Path(path).resolve()
    if not p.is_file():
        raise SystemExit(f"no such script: {path}")
    name = p.stem
    sys.path.insert(0, str(p.parent))
    spec = importlib.util.spec_from_file_location(name, p)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def cmd_run(a) -> int:
    from sdk import App
    from sdk.functions import Function
    script, _, func = a.target.partition("::")
    mod = load_script(script)
    apps = [v for v in vars(mod).values() if isinstance(v, App)]
    if len(apps) != 1:
        print(f"{script} must define exactly one App (found {len(apps)})", file=sys.stderr)
        return 2
    app = apps[0]
    if not func:
        if len(app._entrypoints) != 1:
            print("name the entrypoint: SCRIPT::FUNC", file=sys.stderr)
            return 2
        func = next(iter(app._entrypoints))
    target = app._entrypoints.get(func) or getattr(mod, func, None)
    if target is None:
        print(f"{func!r} is not defined in {script}", file=sys.stderr)
        return 2
    with app.run():
        if isinstance(target, Function):
            print(target.remote(*a.args))
        else:
            target(*a.args)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="runtimectl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("up", help="run the dispatcher and one node (embedded default)")
    s.add_argument("--detach", "-d", action="store_true")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--no-node", action="store_true", help="dispatcher only")
    s.add_argument("--backend", choices=["sqlite", "redis"], default=None,
                   help="store: sqlite (embedded default) or redis (replicas, many nodes); "
                        "default $RUNTIMED_BACKEND or sqlite")
    s.add_argument("--redis-url", default=None,
                   help="redis://host:port/db (default $RUNTIMED_REDIS_URL or "
                        "redis://127.0.0.1:6379/0)")
    s.add_argument("--replica", default=None,
                   help="this dispatcher replica's name (default host-port)")
    s.add_argument("--reuse-port", action="store_true",
                   help="share the port with other replicas (SO_REUSEPORT; redis backend)")
    s.add_argument("--max-pending", type=int, default=None,
                   help="unfinished calls before submissions get 429 (default 10000)")
    s.add_argument("--blob-dir", default=None,
                   help="blob directory shared by replicas (default $RUNTIMED_STATE/d/blobs)")
    s.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop a detached `up`").set_defaults(fn=cmd_down)
    s = sub.add_parser("status")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)
    s = sub.add_parser("nodes", help="nodes with their holdings and load")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_nodes)
    s = sub.add_parser("ps", help="containers with state and tier")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_ps)
    sub.add_parser("images", help="images and layers").set_defaults(fn=cmd_images)
    s = sub.add_parser("calls", help="recent calls, with where and why they were placed")
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_calls)
    s = sub.add_parser("logs", help="a call's output")
    s.add_argument("call_id")
    s.set_defaults(fn=cmd_logs)
    s = sub.add_parser("run", help="run SCRIPT.py[::FUNC] against the runtime")
    s.add_argument("target")
    s.add_argument("args", nargs="*")
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("snapshot", help="snapshots on a node: ls|inspect|rm|gc|verify|"
                       "export|import|create")
    s.add_argument("action", choices=["ls", "inspect", "rm", "gc", "verify", "export", "import",
                                      "create"])
    s.add_argument("id", nargs="?", help="snapshot id, function, container id, or file")
    s.add_argument("file", nargs="?", help="export: output file")
    s.add_argument("--budget-mb", type=float, default=None, help="gc: keep the store under this")
    s.add_argument("--node", default=None)
    s.set_defaults(fn=cmd_snapshot)
    s = sub.add_parser("restore", help="restore a snapshot and report its timings")
    s.add_argument("snapshot_id")
    s.add_argument("--mode", choices=("eager", "lazy"), default="eager",
                   help="eager: all pages before resuming; lazy: pages on first touch")
    s.add_argument("--node", default=None)
    s.set_defaults(fn=cmd_restore)
    s = sub.add_parser("node", help="run a node daemon (joins --dispatcher)")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(fn=lambda a: __import__("runtimed.node_api").node_api.main(a.rest) or 0)
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["node"]:             # its own parser: runtimectl node --help
        from .node_api import main as node_main
        node_main(args[1:])
        return 0
    a = p.parse_args(args)
    try:
        return a.fn(a)
    except Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:           # `runtimectl ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
