"""Talking to the runtime the benchmark measures: the dispatcher (through the SDK's
client), its node(s), and optionally a private runtime started for the run."""
from __future__ import annotations

import base64
import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Iterator

from runtimed.devcluster import LocalCluster, free_port_pair, mounts_under, sdk_pointed_at
from sdk import Function, FunctionCall
from sdk.client import Client, default_client
from sdk.exception import Error, NodeUnavailableError
from sdk.functions import LONG_POLL
from sdk.serialization import dumps_args

TRANSIENT_MARKS = ("cannot reach the runtimed dispatcher", "closed the build stream",
                   "the node running the call was lost")


def transient(e: BaseException) -> bool:
    """The runtime went away or restarted under us (other people share it)."""
    return isinstance(e, NodeUnavailableError) or (
        isinstance(e, Error) and any(m in str(e) for m in TRANSIENT_MARKS))

REPO = Path(__file__).resolve().parents[1]
CRIU = os.environ.get("RUNTIMED_CRIU", "/opt/runtimed/criu/criu")


class Runtime:
    """The dispatcher and its node(s) as the benchmark needs them."""

    def __init__(self, client: Client | None = None):
        self.client = client or default_client()

    @property
    def url(self) -> str:
        return self.client.url

    def wait_ready(self, timeout: float = 120.0) -> bool:
        """Until the dispatcher answers with a live node (after a restart of the runtime)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.nodes():
                    return True
            except Error:
                pass
            time.sleep(0.5)
        return False

    def retrying(self, f, *args, attempts: int = 3, on_retry=None):
        """f(*args), retried after the runtime comes back if it was unreachable."""
        for i in range(attempts):
            try:
                return f(*args)
            except Exception as e:  # noqa: BLE001
                if i == attempts - 1 or not transient(e):
                    raise
                if on_retry:
                    on_retry(e)
                self.wait_ready()

    def nodes(self) -> list[dict]:
        return [n for n in self.client.json("GET", "/v1/nodes")["nodes"] if n.get("alive")]

    def node_clients(self, only: list[str] | None = None) -> list[tuple[str, Client]]:
        """(node id, its admin client) for every live node, or for the ones in `only`."""
        return [(n["node_id"], Client(n["url"], self.client.token)) for n in self.nodes()
                if only is None or n["node_id"] in only]

    def node_client(self, node_id: str) -> Client:
        for nid, nc in self.node_clients([node_id]):
            return nc
        raise NodeUnavailableError(f"node {node_id} is not alive")

    def holders(self, function_id: str) -> set[str]:
        """Nodes the dispatcher believes hold the function's snapshot (their heartbeats)."""
        return {n["node_id"] for n in self.nodes() if function_id in (n.get("snapshots") or ())}

    def wait_holder(self, function_id: str, node_id: str, timeout: float = 20.0) -> None:
        """Until the dispatcher sees `node_id` holding the snapshot (so it names that node
        as a peer to the others): heartbeats come every 2 s."""
        deadline = time.monotonic() + timeout
        while node_id not in self.holders(function_id):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node_id} does not report the snapshot of {function_id} "
                                   f"after {timeout:.0f} s")
            time.sleep(0.2)

    def drain(self, function_id: str, settle_s: float = 0.0) -> int:
        """Stop the function's idle containers, so its next call starts a container."""
        n = int(self.client.json("POST", f"/v1/functions/{function_id}/drain", {})
                .get("stopped", 0))
        if settle_s > 0:
            time.sleep(settle_s)       # let the evicted container's teardown finish
        return n

    def containers(self) -> list[dict]:
        return self.client.json("GET", "/v1/containers")["containers"]

    def rss_bytes(self, container_id: str | None) -> int | None:
        if not container_id:
            return None
        for c in self.containers():
            if c.get("id") == container_id:
                return c.get("rss_bytes")
        return None

    def snapshots(self, function_id: str | None = None) -> list[dict]:
        """Snapshots on every live node (GET /v1/snapshots), newest first."""
        out = []
        for node_id, nc in self.node_clients():
            try:
                snaps = nc.json("GET", "/v1/snapshots")["snapshots"]
            except Error:
                continue
            out += [dict(s, node_id=node_id) for s in snaps
                    if function_id is None or s.get("function_id") == function_id]
        return sorted(out, key=lambda s: s.get("created_at", 0), reverse=True)

    def evict_layers(self, keys: list[str], lazy_images: bool,
                     only: list[str] | None = None, lazy_prefetch: bool = True,
                     lazy_workset: str = "nowait") -> None:
        """Make every node (or those in `only`) forget these layers and their cached
        chunks (a node with an empty image cache) and choose lazy mounts (prefetching the
        blob's recorded working set or not; `lazy_workset`: whether that working set is
        also written whole into the view's data dir, waited for or not) or full pulls for
        the next start."""
        for _node, nc in self.node_clients(only):
            nc.json("POST", "/v1/config", {"lazy_images": lazy_images,
                                           "lazy_prefetch": lazy_prefetch,
                                           "lazy_workset": lazy_workset})
            for k in keys:
                nc.json("POST", f"/v1/layers/{k}/evict", {})

    def delete_snapshots(self, function_id: str) -> list[str]:
        """Remove the function's snapshots (only ever called for the bench's own)."""
        removed = []
        for _node, nc in self.node_clients():
            try:
                snaps = nc.json("GET", "/v1/snapshots")["snapshots"]
            except Error:
                continue
            for s in snaps:
                if s.get("function_id") == function_id:
                    try:
                        nc.json("DELETE", f"/v1/snapshots/{s['snapshot_id']}")
                        removed.append(s["snapshot_id"])
                    except Error:
                        pass
        return removed


def empty_snapshot_store(nc: Client) -> dict:
    """Delete every snapshot on the node behind `nc` and collect all their chunks (only
    for nodes the benchmark owns); returns the store's stats afterwards."""
    for s in nc.json("GET", "/v1/snapshots")["snapshots"]:
        nc.json("DELETE", f"/v1/snapshots/{s['snapshot_id']}")
    nc.json("POST", "/v1/snapshots/gc", {"budget_bytes": 0})
    return nc.json("GET", "/v1/snapshots")["stats"]


def submit_on(fn: Function, args: tuple, node_id: str,
              client: Client | None = None) -> FunctionCall:
    """What `fn.remote(*args)` sends, plus `node_id` (POST /v1/calls with node_id: the
    admin and benchmark pin; placement is skipped). Like `.remote()` it waits up to the
    long poll; the call's state as answered is in `.last_state` (finished or not)."""
    client = client or default_client()
    blob = dumps_args(args, {}, getattr(fn, "_method", None))
    st = client.json("POST", "/v1/calls", {
        "function_id": fn.object_id, "node_id": node_id, "wait": LONG_POLL,
        "args_b64": base64.b64encode(blob).decode()})
    fc = FunctionCall(st["call_id"], client)
    fc.last_state = st
    return fc


@contextlib.contextmanager
def peer_node(rt: Runtime, timeout: float = 120.0) -> Iterator[str]:
    """A second node daemon (`runtimectl node`) joined to the runtime's dispatcher, with a
    state dir of its own: a runtimed.devcluster.LocalCluster without a dispatcher of its
    own, given the runtime's token. Yields its node id; stopped at the end, and what it
    left behind (containers, mounts, netns) cleaned up. The runtime must be on this
    machine. While it is up it is a real node: placement may send it other calls too."""
    u = urllib.parse.urlsplit(rt.url)
    if u.hostname not in ("127.0.0.1", "localhost") or not u.port:
        raise RuntimeError(f"a peer node needs the runtime on this machine, not {rt.url}")
    cl = LocalCluster(nodes=0, port=u.port)
    token = cl.state / "token"
    token.touch(mode=0o600)
    token.write_text(f"{rt.client.token}\n")
    name = f"bp{os.getpid() % 100000}"       # short: overlayfs mount options are a page
    node_id = f"node-{name}"
    try:
        cl.start_node(name)
        cl.wait_nodes(1, timeout, names=[name])
        yield node_id
    finally:
        left = cl.stop()
        if left:
            print(f"[bench] peer node {name} left {left}; cleaned up", file=sys.stderr)
        # Leave the runtime as we found it: the dispatcher drops the node once its
        # heartbeats stop (registry.NODE_DEAD_AFTER, 6 s); until then it could place calls there.
        deadline = time.monotonic() + 15
        with contextlib.suppress(Error):
            while node_id in {n["node_id"] for n in rt.nodes()} and time.monotonic() < deadline:
                time.sleep(0.3)


def _run(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (p.stdout or p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e.__class__.__name__})"


def gpu_present() -> tuple[bool, str]:
    devs = sorted(str(p) for p in Path("/dev").glob("nvidia[0-9]*"))
    if devs and shutil.which("nvidia-smi"):
        return True, _run(["nvidia-smi", "--query-gpu=name,driver_version",
                           "--format=csv,noheader"])
    return False, "no NVIDIA GPU on this machine (no /dev/nvidia* or nvidia-smi)"


def environment(rt: Runtime | None = None) -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = None
    has_gpu, gpu = gpu_present()
    env = {"kernel": platform.release(), "cpu_model": cpu, "nproc": os.cpu_count(),
           "memory_bytes": mem, "python": platform.python_version(),
           "criu": _run([CRIU, "--version"]).splitlines()[0] if os.path.exists(CRIU)
           else "not installed",
           "runc": _run(["runc", "--version"]).splitlines()[0],
           "git_commit": _run(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
           "gpu": gpu if has_gpu else None,
           "loadavg": [round(x, 2) for x in os.getloadavg()],
           "hostname": socket.gethostname(),
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if rt is not None:
        env["runtime_url"] = rt.url
        try:
            env["nodes"] = [{k: n.get(k) for k in ("node_id", "cpu", "memory_mb")}
                            for n in rt.nodes()]
        except Error as e:
            env["nodes"] = f"unavailable: {e}"
    return env


@contextlib.contextmanager
def private_runtime(port: int | None = None, startup_timeout: float = 120.0) -> Iterator[str]:
    """`python -m runtimed.cli up --port P` with a fresh RUNTIMED_STATE; the SDK's default
    client points at it inside the block; SIGTERM (then SIGKILL) to its process group
    (its own session, started here) at the end. Image layers are rebuilt in a fresh state
    dir, so the first builds are slow. BENCH_KEEP_STATE=1 keeps that dir (node and mount
    server logs) for a look afterwards."""
    state = Path(tempfile.mkdtemp(prefix="bench-runtimed-"))
    port = port or free_port_pair()
    env = dict(os.environ, RUNTIMED_STATE=str(state))
    env.pop("RUNTIMED_TOKEN", None)
    env.pop("RUNTIMED_URL", None)
    logf = open(state / "bench-up.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "runtimed.cli", "up", "--port", str(port)],
                            cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        token_file = state / "token"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the private runtime exited ({proc.returncode}); "
                                   f"see {state / 'bench-up.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the private runtime did not get a live node in "
                                   f"{startup_timeout:.0f} s; see {state / 'bench-up.log'}")
            if token_file.exists():
                try:
                    c = Client(url, token_file.read_text().strip())
                    if any(n.get("alive") for n in c.json("GET", "/v1/nodes", retries=0)["nodes"]):
                        break
                except Error:
                    pass
            time.sleep(0.3)
        print(f"[bench] private runtime on {url} (state {state})", file=sys.stderr)
        with sdk_pointed_at(url, token_file.read_text().strip()):
            yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=40)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        logf.close()
        left = mounts_under(str(state))
        if os.environ.get("BENCH_KEEP_STATE") == "1":
            print(f"[bench] state dir kept (BENCH_KEEP_STATE=1): {state}", file=sys.stderr)
        elif left:
            print(f"[bench] the private runtime left {len(left)} mounts under {state}; "
                  "state dir kept", file=sys.stderr)
        else:
            shutil.rmtree(state, ignore_errors=True)
