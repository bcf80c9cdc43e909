"""Shared fixtures: `runtime`, an embedded runtimed (dispatcher + one node daemon) of
its own, started once per session in a subprocess with a fresh state dir.

Integration tests (marked `integration`) need root and runc; they are skipped, with
the reason, only where those are missing. CI runs as root with everything installed,
so nothing skips there.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = os.environ.get("RUNTIMED_TEST_PYTHON", "/opt/runtimed/venv/bin/python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable
RUNC_ROOT = "/run/runtimed/runc"          # runtimed.runc.RUNC_ROOT
LEASE_DIR = "/run/runtimed/ip-leases"     # runtimed.netns.LEASE_DIR
STARTUP_TIMEOUT = 90.0

_leftovers: list[str] = []                # what teardown had to clean up (shown in the summary)
_notes: list[str] = []


def integration_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root (runc, overlayfs mounts, network namespaces)"
    if shutil.which("runc") is None:
        return "runc is not installed (run scripts/setup.sh)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = integration_skip_reason()
    if reason is None:
        return
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _leftovers or _notes:
        terminalreporter.section("test runtime teardown")
    if _leftovers:
        terminalreporter.write_line("the test runtime left these behind after SIGTERM; "
                                    "teardown removed them:")
        for line in _leftovers:
            terminalreporter.write_line("  " + line)
    for line in _notes:
        terminalreporter.write_line(line)


# -- helpers (shared with bench/ and the cluster fixture: runtimed/devcluster.py) ------------
from runtimed.devcluster import free_port_pair, mounts_under, runc_list, sdk_pointed_at  # noqa: E402


@dataclass
class Runtime:
    url: str
    token: str
    state: Path
    port: int
    proc: subprocess.Popen
    log_path: Path
    client: object = field(repr=False, default=None)

    @property
    def node_port(self) -> int:
        return self.port + 1

    @property
    def node_dir(self) -> Path:
        return self.state / "n" / "node0"

    def env(self) -> dict[str, str]:
        """Environment for a `runtimectl` subprocess that talks to this runtime."""
        env = dict(os.environ)
        env.update(RUNTIMED_URL=self.url, RUNTIMED_TOKEN=self.token,
                   RUNTIMED_STATE=str(self.state))
        return env

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-m", "runtimed.cli", *args], env=self.env(),
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def node_process(self):
        """The supervised node daemon (a psutil.Process), or None."""
        import psutil
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        for p in children:
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if "runtimed.node_api" in cmd and str(self.node_port) in cmd:
                return p
        return None

    @staticmethod
    def runc_ids() -> set[str]:
        """Ids of every container in the shared runc root (all runtimes on the machine)."""
        return {c["id"] for c in runc_list()}

    def containers(self) -> list[dict]:
        """runc containers of this runtime (their bundles live under its state dir)."""
        return [c for c in runc_list()
                if str(c.get("bundle", "")).startswith(str(self.state) + "/")]


def _wait_ready(rt: Runtime, client) -> None:
    from sdk.exception import Error

    deadline = time.monotonic() + STARTUP_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        if rt.proc.poll() is not None:
            raise RuntimeError(f"`runtimectl up` exited with {rt.proc.returncode}:\n"
                               f"{rt.log_tail()}")
        try:
            nodes = client.json("GET", "/v1/nodes", retries=0)["nodes"]
            if any(n.get("alive") for n in nodes):
                return
            last = f"nodes: {nodes}"
        except Error as e:
            last = str(e)
        time.sleep(0.2)
    raise RuntimeError(f"the test runtime did not get an alive node in {STARTUP_TIMEOUT:.0f} s "
                       f"({last}):\n{rt.log_tail()}")


def _stop(rt: Runtime) -> None:
    """SIGTERM the process group, wait, then remove whatever it left behind."""
    try:
        pgid = os.getpgid(rt.proc.pid)
    except ProcessLookupError:
        pgid = None
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            rt.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _leftovers.append("`runtimectl up` ignored SIGTERM for 30 s: SIGKILL")
            os.killpg(pgid, signal.SIGKILL)
            rt.proc.wait(timeout=10)
        # the node child shares the group; give it a moment, then make sure it is gone
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            _leftovers.append("processes of the runtime's group outlived SIGTERM: SIGKILL")
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # runc containers (ctr-*/bld-*) whose bundles are in our state dir
    for c in rt.containers():
        cid = c["id"]
        if cid.startswith(("ctr-", "bld-")):
            _leftovers.append(f"runc container {cid} ({c.get('status')})")
            subprocess.run(["runc", "--root", RUNC_ROOT, "kill", "--all", cid, "KILL"],
                           capture_output=True)
            subprocess.run(["runc", "--root", RUNC_ROOT, "delete", "--force", cid],
                           capture_output=True)

    # containers restored by CRIU directly (runc does not know them): by their cgroups
    from runtimed import cgroups
    cdir = rt.node_dir / "c"
    for cid in (os.listdir(cdir) if cdir.is_dir() else []):
        if cgroups.pids_in(f"/runtimed/{cid}") or any(
                os.path.isdir(d) for d in cgroups.v1_dirs(f"/runtimed/{cid}")):
            _leftovers.append(f"restored container {cid} (cgroup /runtimed/{cid})")
            cgroups.v1_kill_and_remove(f"/runtimed/{cid}")

    # overlay (or any) mounts under the state dir, deepest first
    for mp in sorted(mounts_under(str(rt.state)), key=len, reverse=True):
        _leftovers.append(f"mount {mp}")
        subprocess.run(["umount", "-l", mp], capture_output=True)

    # network namespaces and address leases of our node (owner = its state dir)
    owner = str(rt.node_dir)
    prefix = "rtd-" + hashlib.sha256(owner.encode()).hexdigest()[:6] + "-"
    netns_dir = "/var/run/netns"
    if os.path.isdir(netns_dir):
        for name in os.listdir(netns_dir):
            if name.startswith(prefix):
                _leftovers.append(f"netns {name}")
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
    if os.path.isdir(LEASE_DIR):
        n = 0
        for lease in os.listdir(LEASE_DIR):
            path = os.path.join(LEASE_DIR, lease)
            try:
                with open(path) as f:
                    mine = f.read().strip().startswith(str(rt.state))
                if mine:
                    os.unlink(path)
                    n += 1
            except OSError:
                pass
        if n:
            _leftovers.append(f"{n} IP lease file(s) in {LEASE_DIR}")

    still = [c["id"] for c in rt.containers()] + mounts_under(str(rt.state))
    if still:
        _notes.append(f"teardown could NOT remove: {still}")
    shutil.rmtree(rt.state, ignore_errors=True)


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def runtime(request):
    """An embedded runtime of our own: `runtimectl up --port P` with a fresh state dir.

    Sets RUNTIMED_URL/RUNTIMED_TOKEN for the session so the SDK's default client uses it.
    """
    reason = integration_skip_reason()
    if reason:
        pytest.skip(reason)
    from sdk.client import Client

    state = Path(tempfile.mkdtemp(prefix="rtd-test-", dir="/var/tmp"))
    port = free_port_pair()
    env = dict(os.environ)
    for k in ("RUNTIMED_URL", "RUNTIMED_TOKEN", "RUNTIMED_TOKEN_FILE"):
        env.pop(k, None)
    env["RUNTIMED_STATE"] = str(state)
    env.setdefault("RUNTIMED_LOG", "INFO")
    log_path = Path(tempfile.mkstemp(prefix="rtd-test-", suffix=".log", dir="/var/tmp")[1])
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([PYTHON, "-m", "runtimed.cli", "up", "--port", str(port)],
                                env=env, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    rt = Runtime(url=url, token="", state=state, port=port, proc=proc, log_path=log_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        token_file = state / "token"
        while not (token_file.exists() and token_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no token file from `runtimectl up`:\n{rt.log_tail()}")
            time.sleep(0.05)
        rt.token = token_file.read_text().strip()
        rt.client = Client(url, rt.token)
        _wait_ready(rt, rt.client)
        with sdk_pointed_at(url, rt.token):
            yield rt
    finally:
        try:
            _stop(rt)
        finally:
            if os.environ.get("RUNTIMED_TEST_KEEP_LOG") or request.session.testsfailed:
                _notes.append(f"the test runtime's log is kept at {log_path}")
            else:
                log_path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def cuda_checkpoint_fake():
    """tests/fakes/cuda_checkpoint.py as a module: `install(dir, python, help=..., fail=...)`
    puts a fake cuda-checkpoint there, `configure(dir, ...)` changes what it does."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "fake_cuda_checkpoint", Path(__file__).resolve().parent / "fakes" / "cuda_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- for modules with their own LocalCluster `cluster` fixture and module-level `app` ---------
@pytest.fixture(scope="module")
def client(cluster):
    from sdk.client import Client
    return Client(cluster.url, cluster.token)


@pytest.fixture(scope="module")
def deployed(request, cluster, client):
    with request.module.app.run(client=client, show_progress=False):
        yield request.module.app
