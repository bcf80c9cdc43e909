"""Snapshots end to end (issue 4): real runc + CRIU through the SDK, as a user would.

Functions here run remotely; they must not use pytest/sdk (not in the containers).
"""
from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from runtimed.snapshots import WS_RECORDINGS

from sdk import App, Image, enter, method
from snapshot import criu_image
from sdk.exception import NodeUnavailableError

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN = uuid.uuid4().hex[:8]
image = Image.debian_slim().pip_install("numpy==1.26.4")
app = App("snapshot-tests", image=image)
SHORT = dict(scaledown_window=1, memory=512)


@app.function(snapshot=True, **SHORT)
def entropy(tag):
    import random
    import uuid as _uuid

    import numpy as np
    return tag, random.random(), str(_uuid.uuid4()), float(np.random.rand())


@app.cls(enable_memory_snapshot=True, **SHORT)
class Hooks:
    @enter(snap=True)
    def load(self):
        import os
        with open("/tmp/snap-hook-runs", "a") as f:     # persisted in the snapshot's upper dir
            f.write("x")
        self.loaded_pid = os.getpid()

    @enter()
    def connect(self):
        import time as _t
        self.connected_at = _t.time()

    @method()
    def info(self):
        return open("/tmp/snap-hook-runs").read(), self.connected_at


@app.cls(enable_memory_snapshot=True, scaledown_window=1, memory=1024)
class RoundTrip:
    """Threads, an open file, a pipe with data in it, a connected socket pair with data
    in flight and a 200 MB heap, all created before the snapshot, checked after restore.
    (Inet sockets cannot be checkpointed on this kernel: see test_guard_refuses_...)"""

    @enter(snap=True)
    def setup(self):
        import hashlib
        import os
        import socket
        import threading
        self.heap = bytearray(os.urandom(1 << 20)) * 200
        self.digest = hashlib.sha256(self.heap).hexdigest()
        self.ticks = [0]

        def tick():
            import time as _t
            while True:
                self.ticks[0] += 1
                _t.sleep(0.01)
        threading.Thread(target=tick, daemon=True).start()
        self.f = open("/tmp/roundtrip.txt", "w+")
        self.f.write("hello file")
        self.f.flush()
        self.r, self.w = os.pipe()
        os.write(self.w, b"in the pipe" * 2)
        self.a, self.b = socket.socketpair()
        self.a.sendall(b"ping")

    @method()
    def check(self):
        import hashlib
        import os
        import time as _t
        t0 = self.ticks[0]
        _t.sleep(0.2)
        self.f.seek(0)
        got = self.b.recv(4)
        self.a.sendall(b"ping")       # leave data in flight for the next restore
        return {"thread_alive": self.ticks[0] > t0, "file": self.f.read(),
                "pipe": os.read(self.r, 11).decode(), "socket": got.decode(),
                "heap_ok": hashlib.sha256(self.heap).hexdigest() == self.digest,
                "heap_mb": len(self.heap) >> 20}


@app.cls(enable_memory_snapshot=True, **SHORT)
class Guarded:
    @enter(snap=True)
    def touch_gpu(self):
        # Simulate a CUDA device handle being open at the snapshot point.
        self.dev = open("/dev/nvidia0", "w")

    @method()
    def ping(self):
        return "pong"


@app.cls(enable_memory_snapshot=True, **SHORT)
class Listener:
    @enter(snap=True)
    def listen(self):
        import socket
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 7070))
        self.srv.listen(4)

    @method()
    def ping(self):
        return "pong"


@app.function(snapshot=True, **SHORT)
def twin_a(x):
    import numpy  # noqa: F401
    return x + 1


@app.function(snapshot=True, **SHORT)
def twin_b(x):
    import numpy  # noqa: F401
    return x + 2


@app.function(snapshot=True, scaledown_window=1, memory=1024, retries=0)
def big_for_kill(x):
    return x


@app.cls(enable_memory_snapshot=True, restore_mode="lazy", scaledown_window=1, memory=1024)
class LazyHeap:
    """64 MB of state built before the snapshot, restored lazily (working set recorded)."""

    @enter(snap=True)
    def setup(self):
        import hashlib
        import os
        self.heap = bytearray(os.urandom(1 << 20)) * 64
        self.digest = hashlib.sha256(self.heap).hexdigest()

    @method()
    def check(self, i):
        import hashlib
        return self.heap[i], hashlib.sha256(self.heap).hexdigest() == self.digest


@app.function(snapshot=True, scaledown_window=300, memory=512)
def survivor(tag):
    return tag


@app.function(snapshot=True, scaledown_window=1, memory=128, retries=0)
def hungry(mb):
    block = bytearray(mb << 20)
    for i in range(0, len(block), 4096):          # touch it: RSS, not just address space
        block[i] = 1
    return len(block) >> 20


@app.function(snapshot=True, restore_mode="lazy", scaledown_window=1, memory=512,
              max_containers=3)
def lazy_many(i):
    import time as _t
    _t.sleep(0.5)                                  # keep several containers busy at once
    return i * 2, _BIG[i]


_BIG = bytes(range(256)) * 40000                   # ~10 MB in the snapshot, checked per call


@app.function(fork=True, memory=512)
def forked(x):
    import os
    import random
    STATE.append(x)
    return os.getpid(), len(STATE), random.random()


STATE: list = []


def _drain(fn):
    from sdk.client import default_client
    default_client().json("POST", f"/v1/functions/{fn.object_id}/drain", {})


def _cold_call(fn, *args):
    """Make sure no idle container serves the call, then call it."""
    _drain(fn)
    out = fn.remote(*args)
    return out, fn.last_call.info


def _restore_span() -> str:
    """Direct CRIU restore where the host allows it (v1 cgroups, as here), else runc."""
    from runtimed import criu_restore
    return "criu_restore" if criu_restore.available() else "runc_restore"


def _node(runtime):
    from sdk.client import Client
    return Client(f"http://127.0.0.1:{runtime.node_port}", runtime.token)


@pytest.fixture(scope="module")
def deployed(runtime):
    with app.run(show_progress=False):
        yield app


def test_first_call_snapshots_and_later_cold_starts_restore(deployed, runtime):
    out, info = _cold_call(entropy, "a")
    assert info["tier"] == "cold" and "taken" in info.get("snapshot", ""), info
    seen = [out]
    for tag in ("b", "c"):
        out, info = _cold_call(entropy, tag)
        assert info["tier"] in ("restore", "restore_lazy"), info
        assert "restored" in info["snapshot"]
        assert _restore_span() in info["spans"]
        seen.append(out)
    # Restores skip CRIU's network lock (the dump is patched; see criu_image.py).
    hot = runtime.node_dir / "s" / "hot" / info["snapshot"].split()[1]
    prefix, msgs = criu_image.read_messages((hot / criu_image.INVENTORY).read_bytes(), 4)
    assert (11, 0, b"\x58\x02") in criu_image.fields(msgs[0])
    # Two restores of one snapshot must not share random streams or ids.
    assert len({s[1] for s in seen}) == 3
    assert len({s[2] for s in seen}) == 3
    assert len({s[3] for s in seen}) == 3


def test_snap_hook_runs_once_enter_hook_after_every_restore(deployed):
    runs1, t1 = Hooks().info.remote()
    _drain(Hooks().info)
    runs2, t2 = Hooks().info.remote()
    assert Hooks().info.last_call.info["tier"] in ("restore", "restore_lazy")
    assert runs1 == runs2 == "x"          # the snap hook did not run again
    assert t2 > t1                        # @enter() ran again after the restore


def test_round_trip_threads_files_pipe_socket_heap(deployed):
    first = RoundTrip().check.remote()
    assert first["heap_ok"] and first["thread_alive"]
    _drain(RoundTrip().check)
    after = RoundTrip().check.remote()
    assert RoundTrip().check.last_call.info["tier"] in ("restore", "restore_lazy")
    assert after == {"thread_alive": True, "file": "hello file", "pipe": "in the pipe",
                     "socket": "ping", "heap_ok": True, "heap_mb": 200}


def test_guard_refuses_cuda_handles_and_function_runs_on(deployed):
    assert Guarded().ping.remote() == "pong"
    note = Guarded().ping.last_call.info.get("snapshot", "")
    assert "no snapshot" in note and "/dev/nvidia0" in note, note
    _drain(Guarded().ping)
    assert Guarded().ping.remote() == "pong"
    assert Guarded().ping.last_call.info["tier"] == "cold"


def test_guard_refuses_inet_sockets_on_this_kernel(deployed):
    import platform

    from snapshot.guard import inet_sockets_dumpable
    assert Listener().ping.remote() == "pong"
    note = Listener().ping.last_call.info.get("snapshot", "")
    if inet_sockets_dumpable(platform.release(), "4.1.1"):
        assert "taken" in note
    else:
        assert "no snapshot" in note and "tcp 127.0.0.1:7070 LISTEN" in note, note


def test_dedup_across_snapshots_of_one_image(deployed, runtime):
    assert twin_a.remote(1) == 2 and twin_b.remote(1) == 3
    snaps = {s["function_id"]: s for s in _node(runtime).json("GET", "/v1/snapshots")["snapshots"]}
    a, b = snaps[twin_a.object_id], snaps[twin_b.object_id]
    # The second snapshot of the same image stores far less than its raw size.
    assert b["stored_size"] < b["raw_size"] / 2, b
    assert a["stored_size"] + b["stored_size"] < a["raw_size"] + b["raw_size"]


def _store(runtime) -> Path:
    return runtime.node_dir / "s" / "store"


def _snapshot_of(runtime, fn) -> dict:
    for s in _node(runtime).json("GET", "/v1/snapshots")["snapshots"]:
        if s["function_id"] == fn.object_id:
            return s
    raise AssertionError(f"no snapshot of {fn.object_id}")


def test_corrupt_chunk_falls_back_to_cold_and_quarantines(deployed, runtime):
    snap = _snapshot_of(runtime, entropy)
    sid = snap["snapshot_id"]
    manifest = json.loads((_store(runtime) / "manifests" / f"{sid}.json").read_text())
    pages = next(f for f in manifest["files"] if f["path"].startswith("pages-"))
    sha = next(c["sha256"] for c in pages["chunks"] if c["sha256"] != "0" * 64)
    chunk = _store(runtime) / "chunks" / sha[:2] / f"{sha}.zst"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    # Drop the hot copy so the restore must read (and verify) the chunks.
    import shutil
    shutil.rmtree(runtime.node_dir / "s" / "hot" / sid)
    out, info = _cold_call(entropy, "after-corruption")
    assert out[0] == "after-corruption"
    assert info["tier"] == "cold", info
    assert "corrupt" in info.get("snapshot", ""), info
    ids = [s["snapshot_id"] for s in _node(runtime).json("GET", "/v1/snapshots")["snapshots"]]
    assert sid not in ids                                  # quarantined
    assert (_store(runtime) / "quarantine").exists()
    out, info = _cold_call(entropy, "next")               # a fresh snapshot serves again
    assert info["tier"] in ("restore", "restore_lazy"), info


def test_incompatible_fingerprint_falls_back_to_cold(deployed, runtime):
    twin_a.remote(0)
    snap = _snapshot_of(runtime, twin_a)
    path = _store(runtime) / "manifests" / f"{snap['snapshot_id']}.json"
    m = json.loads(path.read_text())
    m["fingerprint"]["kernel"] = "0.0.1-elsewhere"
    path.write_text(json.dumps(m))
    out, info = _cold_call(twin_a, 5)
    assert out == 6
    assert info["tier"] == "cold", info
    assert "kernel" in info.get("snapshot", ""), info


def test_kill_daemon_mid_checkpoint_leaves_no_snapshot(deployed, runtime):
    node = runtime.node_process()
    assert node is not None
    work = runtime.node_dir / "s" / "work"
    call = big_for_kill.spawn(1)
    deadline = time.monotonic() + 120
    while not any(p.name.endswith("-dump") for p in work.glob("*")):
        assert time.monotonic() < deadline, "the checkpoint never started"
        time.sleep(0.005)
    os.kill(node.pid, signal.SIGKILL)
    with pytest.raises(NodeUnavailableError):
        call.get(timeout=120)
    # The supervisor restarts the node; no snapshot of big_for_kill is visible...
    deadline = time.monotonic() + 60
    while True:
        try:
            snaps = _node(runtime).json("GET", "/v1/snapshots")["snapshots"]
            break
        except Exception:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert all(s["function_id"] != big_for_kill.object_id for s in snaps)
    assert not any(p.name.endswith("-dump") for p in work.glob("*"))   # nor its leftovers
    # ...and the next call works (and takes the snapshot this time).
    deadline = time.monotonic() + 60
    while True:
        try:
            assert big_for_kill.remote(2) == 2
            break
        except NodeUnavailableError:
            assert time.monotonic() < deadline
            time.sleep(1)


def test_fork_tier_isolates_calls(deployed):
    first = forked.remote(1)
    outs = [forked.remote(i) for i in range(4)]
    assert forked.last_call.info["tier"] == "fork"
    assert "fork" in forked.last_call.info["spans"]
    assert all(o[1] == 1 for o in [first] + outs)         # no state leaks between calls
    assert len({o[0] for o in outs}) == 4                 # a new process per call
    assert len({o[2] for o in outs}) == 4


def test_runtimectl_snapshot_commands(deployed, runtime, tmp_path):
    entropy.remote("x")
    snap = _snapshot_of(runtime, entropy)
    sid = snap["snapshot_id"]
    r = runtime.cli("snapshot", "ls")
    assert r.returncode == 0 and sid in r.stdout, r.stderr
    r = runtime.cli("snapshot", "inspect", sid)
    assert r.returncode == 0 and json.loads(r.stdout)["snapshot_id"] == sid
    r = runtime.cli("snapshot", "verify", sid)
    assert r.returncode == 0 and "ok" in r.stdout
    r = runtime.cli("restore", sid, timeout=120)
    assert r.returncode == 0 and _restore_span() in r.stdout, r.stdout + r.stderr
    r = runtime.cli("restore", "--mode", "lazy", sid, timeout=120)
    assert r.returncode == 0 and "(lazy)" in r.stdout and "lazy_daemon" in r.stdout, r.stdout
    out = tmp_path / "snap.tar"
    r = runtime.cli("snapshot", "export", sid, str(out))
    assert r.returncode == 0 and out.stat().st_size > 0, r.stderr
    r = runtime.cli("snapshot", "rm", sid)
    assert r.returncode == 0
    assert sid not in runtime.cli("snapshot", "ls").stdout
    r = runtime.cli("snapshot", "import", str(out))
    assert r.returncode == 0 and sid in r.stdout, r.stderr
    r = runtime.cli("snapshot", "gc")
    assert r.returncode == 0
    r = runtime.cli("snapshot", "create", entropy.object_id, timeout=120)
    assert r.returncode == 0 and "snap-" in r.stdout, r.stdout + r.stderr


def test_lazy_restore_records_working_set_and_restores_it_eagerly(deployed, runtime):
    """The first lazy restores record the pages the process faulted in; later lazy restores
    copy those in before resuming. Content must be exact either way."""
    fn = LazyHeap().check
    first = fn.remote(7)                              # cold start, takes the snapshot
    assert first[1] is True
    for i in range(3):                                # recording restores
        _drain(fn)
        assert fn.remote(7) == first                  # same byte, digest intact
        assert fn.last_call.info["tier"] == "restore_lazy", fn.last_call.info
    snap = None
    for _ in range(50):                               # the recorder runs when the daemon exits
        snap = _snapshot_of(runtime, fn)
        if snap["working_set_pages"] > 0:
            break
        time.sleep(0.2)
    assert snap and snap["working_set_pages"] > 0, snap
    _drain(fn)
    assert fn.remote(7) == first
    assert fn.last_call.info["tier"] == "restore_lazy"
    hot = _store(runtime).parent / "hot" / snap["snapshot_id"]
    assert (hot / ".working-set").exists()
    # A spare lazy-pages daemon, started for the snapshot after that restore, serves the
    # next one: nothing to wait for, same bytes. (A restore that still records the
    # working set runs its own daemon at -v4: the last recording is written when that
    # restore's daemon exits, so wait for it first.)
    for _ in range(100):
        if _snapshot_of(runtime, fn)["working_set_recordings"] >= WS_RECORDINGS and \
                snap["snapshot_id"] in _node(runtime).json(
                    "GET", "/v1/status")["lazy_spare_snapshots"]:
            break
        time.sleep(0.2)
    _drain(fn)
    assert fn.remote(7) == first
    info = fn.last_call.info
    assert info["tier"] == "restore_lazy" and "lazy_daemon" not in info["spans"], info


def test_concurrent_lazy_restores_of_one_snapshot(deployed):
    """Several containers restored lazily from one snapshot at the same time (working
    set being recorded and applied meanwhile) all answer correctly."""
    assert lazy_many.remote(1) == (2, 1)            # cold start, takes the snapshot
    for _ in range(3):                              # rounds of up to 3 parallel restores
        _drain(lazy_many)
        assert list(lazy_many.map(range(6))) == [(i * 2, i) for i in range(6)]


def test_restored_container_keeps_its_limits(deployed):
    """A restore that bypasses runc must still apply the cgroup limits: a restored
    container that outgrows memory=128 is OOM-killed and reported as such."""
    from sdk.exception import OOMError
    assert hungry.remote(1) == 1                      # cold start, takes the snapshot
    _drain(hungry)
    assert hungry.remote(2) == 2
    assert hungry.last_call.info["tier"] in ("restore", "restore_lazy")
    _drain(hungry)
    with pytest.raises(OOMError, match="memory"):
        hungry.remote(400)


def test_runc_restore_engine_still_restores(deployed, runtime):
    """Hosts without v1 cgroups restore through `runc restore`: the node's restore_engine
    switch exercises that path here too (a call served by restore, runtimectl restore)."""
    node = _node(runtime)
    assert node.json("POST", "/v1/config", {"restore_engine": "runc"})["restore_engine"] == "runc"
    try:
        out, info = _cold_call(entropy, "via-runc")
        assert out[0] == "via-runc" and info["tier"] in ("restore", "restore_lazy"), info
        assert "runc_restore" in info["spans"], info["spans"]
        sid = _snapshot_of(runtime, entropy)["snapshot_id"]
        r = runtime.cli("restore", sid, timeout=120)
        assert r.returncode == 0 and "runc_restore" in r.stdout, r.stdout + r.stderr
        with pytest.raises(Exception, match="restore_engine must be one of"):
            node.json("POST", "/v1/config", {"restore_engine": "docker"})
    finally:
        node.json("POST", "/v1/config", {"restore_engine": "auto"})
    out, info = _cold_call(entropy, "direct-again")
    assert _restore_span() in info["spans"], info["spans"]


# -- keep last: it kills the node daemon ----------------------------------------------------------
def test_restored_container_is_cleaned_up_after_node_kill(deployed, runtime):
    """A container restored by CRIU directly is unknown to runc: after the node daemon dies
    (kill -9), its successor must still find it (by its cgroup) and remove it."""
    import psutil
    from runtimed import cgroups, criu_restore
    if not criu_restore.available():
        pytest.skip("runc restore on this host: covered by the foundation node-kill test")
    survivor.remote("first")                  # cold start that takes the snapshot
    _drain(survivor)
    survivor.remote("k")                      # restored; stays idle (scaledown 300 s)
    info = survivor.last_call.info
    assert info["tier"] in ("restore", "restore_lazy"), info
    cgroup = f"/runtimed/{info['container_id']}"
    pids = cgroups.pids_in(cgroup)
    assert pids, "the restored container's processes are in its cgroup"
    node = runtime.node_process()
    old_pid = node.pid
    node.kill()
    node.wait(timeout=10)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = runtime.node_process()
        if new is not None and new.pid != old_pid and not cgroups.pids_in(cgroup) \
                and not any(os.path.isdir(d) for d in cgroups.v1_dirs(cgroup)):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"orphaned restored container {cgroup} not cleaned up:\n{runtime.log_tail()}")
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    assert survivor.remote("after") == "after"
