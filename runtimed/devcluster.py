"""A cluster on one machine, for tests, benchmarks and demos: dispatcher process(es)
(`runtimectl up --no-node`) and N node daemons (`runtimectl node`), each node with its
own port and state dir under one RUNTIMED_STATE (they share its token file), and
optionally a private redis-server. Every process is its own session, so one can be
killed (-9) alone; `stop()` ends them all and removes what killed ones left behind
(runc containers, mounts, network namespaces and address leases under the state dir).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .redis_local import LocalRedis, free_port

REPO = Path(__file__).resolve().parents[1]
RUNC_ROOT = "/run/runtimed/runc"


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        with open(self.log, "ab") as f:
            self.popen = subprocess.Popen(self.argv, env=self.env, cwd=REPO, stdout=f,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            return
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(10)

    def kill(self) -> None:
        """kill -9 of the whole process group (the daemon and its helpers)."""
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(10)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class LocalCluster:
    backend: str = "sqlite"
    nodes: int = 3
    state: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rtd-cluster-",
                                                                      dir="/var/tmp")))
    env: dict[str, str] = field(default_factory=dict)     # extra env for the dispatchers
    node_env: dict[str, str] = field(default_factory=dict)  # extra env for the nodes
    python: str = sys.executable
    port: int = 0
    redis: LocalRedis | None = None
    dispatchers: dict[str, Proc] = field(default_factory=dict)
    node_procs: dict[str, Proc] = field(default_factory=dict)
    node_ports: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return (self.state / "token").read_text().strip()

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for k in ("RUNTIMED_URL", "RUNTIMED_TOKEN", "RUNTIMED_TOKEN_FILE", "RUNTIMED_BACKEND",
                  "RUNTIMED_REDIS_URL", "RUNTIMED_REPLICA", "RUNTIMED_PLACEMENT",
                  "RUNTIMED_MAX_PENDING", "RUNTIMED_BLOB_DIR"):
            env.pop(k, None)
        env["RUNTIMED_STATE"] = str(self.state)
        env.setdefault("RUNTIMED_LOG", "INFO")
        return env

    def client(self):
        from sdk.client import Client
        return Client(self.url, self.token)

    # -- processes -------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> LocalCluster:
        self.state.mkdir(parents=True, exist_ok=True)
        if self.backend == "redis" and self.redis is None:
            self.redis = LocalRedis(workdir=self.state / "redis")
            self.redis.start()
        self.port = self.port or free_port()
        self.start_dispatcher("d1")
        deadline = time.monotonic() + timeout
        while not (self.state / "token").exists():
            if time.monotonic() > deadline or not self.dispatchers["d1"].alive():
                raise RuntimeError(f"the dispatcher did not start:\n"
                                   f"{self.dispatchers['d1'].log_tail()}")
            time.sleep(0.05)
        for i in range(1, self.nodes + 1):
            self.start_node(f"n{i}")
        self.wait_nodes(self.nodes, timeout)
        return self

    def start_dispatcher(self, name: str = "d1", env: dict[str, str] | None = None,
                         reuse_port: bool | None = None) -> Proc:
        reuse = self.backend == "redis" if reuse_port is None else reuse_port
        argv = [self.python, "-m", "runtimed.cli", "up", "--no-node", "--port", str(self.port),
                "--backend", self.backend, "--replica", name]
        if self.backend == "redis":
            assert self.redis is not None
            argv += ["--redis-url", self.redis.url]
        if reuse:
            argv.append("--reuse-port")
        e = dict(self.base_env(), **self.env, **(env or {}))
        p = Proc(name, argv, e, self.state / f"{name}.log").start()
        self.dispatchers[name] = p
        return p

    def restart_dispatcher(self, name: str = "d1", kill: bool = False,
                           env: dict[str, str] | None = None) -> Proc:
        p = self.dispatchers[name]
        p.kill() if kill else p.stop()
        return self.start_dispatcher(name, env)

    def start_node(self, name: str) -> Proc:
        port = self.node_ports.get(name) or free_port()
        self.node_ports[name] = port
        argv = [self.python, "-m", "runtimed.cli", "node", "--name", name, "--port", str(port),
                "--dispatcher", self.url]
        p = Proc(name, argv, dict(self.base_env(), **self.node_env),
                 self.state / f"node-{name}.log").start()
        self.node_procs[name] = p
        return p

    def node_name(self, node_id: str) -> str:
        return node_id.removeprefix("node-")

    def wait_nodes(self, n: int, timeout: float = 120.0, names: list[str] | None = None) -> list:
        """Until `n` nodes (or the named ones) are alive for the dispatcher."""
        from sdk.exception import Error
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for p in list(self.dispatchers.values()) + list(self.node_procs.values()):
                if p.popen is not None and p.popen.poll() not in (None, -9, -15, 0):
                    raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:\n"
                                       f"{p.log_tail()}")
            try:
                nodes = self.client().json("GET", "/v1/nodes", retries=0)["nodes"]
                alive = {x["node_id"] for x in nodes if x["alive"]}
                want = {f"node-{x}" for x in names} if names else None
                if (want and want <= alive) or (not want and len(alive) >= n):
                    return nodes
                last = f"alive: {sorted(alive)}"
            except (Error, OSError) as e:
                last = str(e)
            time.sleep(0.2)
        raise RuntimeError(f"nodes not alive after {timeout:.0f} s ({last})")

    def nodes_view(self) -> list[dict]:
        return self.client().json("GET", "/v1/nodes")["nodes"]

    def drain(self, function_id: str, timeout: float = 15.0) -> None:
        """Stop the function's idle containers everywhere, then wait for a heartbeat from
        every live node sent after that (so placement no longer sees them warm)."""
        c = self.client()
        c.json("POST", f"/v1/functions/{function_id}/drain", {})
        t = time.time()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = [n for n in c.json("GET", "/v1/nodes")["nodes"] if n["alive"]]
            if nodes and all(time.time() - n["seen_s_ago"] > t + 0.1
                             and not n["warm"].get(function_id) for n in nodes):
                return
            time.sleep(0.1)
        raise RuntimeError(f"nodes still report warm containers of {function_id}")

    def node_client(self, node_id: str):
        from sdk.client import Client
        url = next(n["url"] for n in self.nodes_view() if n["node_id"] == node_id)
        return Client(url, self.token)

    # -- teardown --------------------------------------------------------------------------
    def stop(self, keep_state: bool = False) -> list[str]:
        """Stop everything; returns what had to be cleaned up after the processes."""
        for p in list(self.node_procs.values()) + list(self.dispatchers.values()):
            p.stop()
        left = self.cleanup()
        if self.redis is not None:
            self.redis.stop()
        if not keep_state and not mounts_under(str(self.state)):
            shutil.rmtree(self.state, ignore_errors=True)
        return left

    def cleanup(self) -> list[str]:
        left = []
        for c in runc_list():
            if str(c.get("bundle", "")).startswith(str(self.state) + "/"):
                left.append(f"runc container {c['id']}")
                subprocess.run(["runc", "--root", RUNC_ROOT, "kill", "--all", c["id"], "KILL"],
                               capture_output=True, check=False)
                subprocess.run(["runc", "--root", RUNC_ROOT, "delete", "--force", c["id"]],
                               capture_output=True, check=False)
        for mp in sorted(mounts_under(str(self.state)), key=len, reverse=True):
            left.append(f"mount {mp}")
            subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
        try:
            from .netns import NetworkManager
            for name in self.node_procs:
                n = NetworkManager(owner=str(self.state / "n" / name)).cleanup_stale()
                if n:
                    left.append(f"{n} netns of {name}")
        except Exception as e:  # noqa: BLE001 - best effort
            left.append(f"netns cleanup failed: {e}")
        return left


@contextlib.contextmanager
def running(cluster: LocalCluster, keep_state: bool | None = None):
    """Start `cluster`, yield it, stop it (tests' module fixtures): the processes' log
    tails go to stderr if it fails to start, what teardown had to remove after. The
    state dir is kept when asked, or by default with RUNTIMED_TEST_KEEP_LOG set."""
    if keep_state is None:
        keep_state = bool(os.environ.get("RUNTIMED_TEST_KEEP_LOG"))
    try:
        cluster.start()
        yield cluster
    except Exception:
        for p in list(cluster.dispatchers.values()) + list(cluster.node_procs.values()):
            print(f"--- {p.name} ---\n{p.log_tail()}", file=sys.stderr)
        raise
    finally:
        left = cluster.stop(keep_state=keep_state)
        if left:
            print(f"cluster teardown removed: {left}", file=sys.stderr)


@contextlib.contextmanager
def sdk_pointed_at(url: str, token: str):
    """Inside the block the SDK's default client talks to `url` with `token` (the
    RUNTIMED_URL/RUNTIMED_TOKEN environment); both are put back afterwards."""
    from sdk.client import reset_default_client
    saved = {k: os.environ.get(k) for k in ("RUNTIMED_URL", "RUNTIMED_TOKEN")}
    os.environ["RUNTIMED_URL"], os.environ["RUNTIMED_TOKEN"] = url, token
    reset_default_client()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_default_client()


def wait_for(pred, timeout: float = 30.0, what: str = "condition"):
    """Poll `pred` until it returns something true (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def runc_list(root: str = RUNC_ROOT) -> list[dict]:
    """`runc list` as dicts (id, pid, status, bundle); [] when runc has no state there."""
    out = subprocess.run(["runc", "--root", root, "list", "--format", "json"],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        return []
    return json.loads(out.stdout) or []


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below `prefix` (for cleanup of a runtime's state dir)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == prefix or mp.startswith(prefix.rstrip("/") + "/"):
                out.append(mp)
    return out


def free_port_pair() -> int:
    """A port P such that P and P+1 are both free on 127.0.0.1 (`runtimectl up --port P`
    puts the node on P+1)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports")
