"""Snapshots of processes that already hold a CUDA context (issue 8), end to end without a
GPU: one node with the fake one-A10G machine (RUNTIMED_FAKE_GPUS=a10g_1x, driver 550) and a
fake cuda-checkpoint (tests/fakes/cuda_checkpoint.py, RUNTIMED_CUDA_CHECKPOINT) that logs
each invocation with the host pid, the pid inside the container and the libcuda it maps.
The functions' @enter(snap=True) maps a file named libcuda.so.1, which is how the guard
sees a CUDA context (cuInit maps the driver's libcuda).

- the first call snapshots through cuda-checkpoint: the process is suspended before the
  dump and resumed after it (the container serves the call), the snapshot's meta says so;
- a later cold start restores it and resumes CUDA in the restored process;
- a cuda-checkpoint that fails to suspend: no snapshot, the note says why, the call works;
- no cuda-checkpoint: the guard refuses as without this path.
Functions here run remotely: they must not use pytest or sdk.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from runtimed.devcluster import LocalCluster, running
from sdk import App, Image, enter, method
from sdk.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PYTHON = os.environ.get("RUNTIMED_TEST_PYTHON", "/opt/runtimed/venv/bin/python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable
HELP_550 = ("CUDA checkpoint and restore utility.\nVersion 550.90.07. Copyright (C) 2024 "
            "NVIDIA Corporation.\n    --toggle --pid <value>\n    --get-state --pid <value>\n"
            "    --help\n")

app = App("gpu-snapshot-tests", image=Image.debian_slim())


def _map_fake_libcuda(tag: str):
    """What cuInit leaves behind for the guard: the driver's libcuda mapped."""
    import mmap
    import os as _os
    d = f"/tmp/fake-cuda-{tag}"
    _os.makedirs(d, exist_ok=True)
    with open(f"{d}/libcuda.so.1", "wb") as f:
        f.write(b"\0" * 4096)
    with open(f"{d}/libcuda.so.1", "rb") as f:
        return mmap.mmap(f.fileno(), 4096, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)


@app.cls(gpu="A10G", enable_memory_snapshot=True, scaledown_window=2, memory=256)
class OnGpu:
    @enter(snap=True)
    def load(self):
        import os as _os
        self.weights = [i * 0.5 for i in range(1000)]      # "moved to the GPU" here
        self.cuda = _map_fake_libcuda("ongpu")
        self.snap_pid = _os.getpid()

    @method()
    def infer(self, x):
        import os as _os
        return {"y": sum(self.weights) * x, "pid": _os.getpid(), "snap_pid": self.snap_pid}


@app.cls(gpu="A10G", enable_memory_snapshot=True, scaledown_window=2, memory=256)
class SuspendFails:
    @enter(snap=True)
    def load(self):
        self.cuda = _map_fake_libcuda("fails")

    @method()
    def ping(self):
        return "pong"


@app.cls(gpu="A10G", enable_memory_snapshot=True, scaledown_window=2, memory=256)
class NoTool:
    @enter(snap=True)
    def load(self):
        self.cuda = _map_fake_libcuda("notool")

    @method()
    def ping(self):
        return "pong"


@pytest.fixture(scope="module")
def fake_tool(tmp_path_factory, cuda_checkpoint_fake):
    d = tmp_path_factory.mktemp("cuda-checkpoint")
    return d, cuda_checkpoint_fake.install(str(d), PYTHON, help=HELP_550)


@pytest.fixture(scope="module")
def cluster(fake_tool):
    cl = LocalCluster(backend="sqlite", nodes=1, python=PYTHON,
                      node_env={"RUNTIMED_FAKE_GPUS": "a10g_1x",
                                "RUNTIMED_CUDA_CHECKPOINT": fake_tool[1]})
    with running(cl):
        yield cl



def _node(cluster):
    (_name, port), = cluster.node_ports.items()
    return Client(f"http://127.0.0.1:{port}", cluster.token)


def _procs(d: Path, tag: str) -> list[dict]:
    log = d / "procs.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [e for e in map(json.loads, lines) if f"fake-cuda-{tag}/" in e.get("libcuda", "")]


def _cold_call(client, fn, *args):
    client.json("POST", f"/v1/functions/{fn.object_id}/drain", {})
    return fn.remote(*args), fn.last_call.info


def test_snapshot_through_cuda_checkpoint_then_restore_resumes_cuda(deployed, client, cluster,
                                                                     fake_tool):
    d, _ = fake_tool
    out, info = _cold_call(client, OnGpu().infer, 2)
    assert out["y"] == sum(i * 0.5 for i in range(1000)) * 2
    assert info["tier"] == "cold" and "taken" in info.get("snapshot", ""), info
    first = _procs(d, "ongpu")
    toggles = [e for e in first if e["op"] == "toggle"]
    # suspended before the dump, resumed after it: the process that ran the snap hook
    assert len(toggles) == 2 and toggles[0]["pid"] == toggles[1]["pid"], first
    assert toggles[0]["nspid"] == out["snap_pid"] == out["pid"]
    assert (d / f"state-{toggles[0]['pid']}").read_text() == "running"
    snap = next(s for s in _node(cluster).json("GET", "/v1/snapshots")["snapshots"]
                if s["function_id"] == OnGpu().infer.object_id)
    meta = snap["meta"]
    assert meta["gpu_snapshot_path"] == "cuda_checkpoint", meta
    assert meta["gpu_models"] == "NVIDIA A10G" and meta["gpu_driver"] == "550.90.07"
    assert meta["cuda_suspended_pids"] == str(out["snap_pid"])
    assert float(meta["cuda_suspend_ms"]) > 0 and float(meta["cuda_resume_ms"]) > 0

    out2, info2 = _cold_call(client, OnGpu().infer, 3)
    assert info2["tier"] in ("restore", "restore_lazy"), info2
    assert "cuda_resume" in info2["spans"], info2
    assert out2["y"] == sum(i * 0.5 for i in range(1000)) * 3
    assert out2["snap_pid"] == out["snap_pid"]            # the snapshot's state came back
    later = _procs(d, "ongpu")[len(first):]
    resumed = [e for e in later if e["op"] == "toggle"]
    assert len(resumed) == 1, later
    assert resumed[0]["pid"] != toggles[0]["pid"] and resumed[0]["nspid"] == out["snap_pid"]
    assert (d / f"state-{resumed[0]['pid']}").read_text() == "running"


def test_a_failing_suspend_means_no_snapshot_and_the_call_still_works(deployed, client,
                                                                       fake_tool,
                                                                       cuda_checkpoint_fake):
    d, _ = fake_tool
    fake = cuda_checkpoint_fake
    fake.configure(d, help=HELP_550, fail="toggle")
    try:
        out, info = _cold_call(client, SuspendFails().ping)
    finally:
        fake.configure(d, help=HELP_550)
    assert out == "pong" and info["tier"] == "cold"
    note = info.get("snapshot", "")
    assert "no snapshot" in note and "cuda-checkpoint failed" in note, note
    assert "CUDA_ERROR_NOT_SUPPORTED" in note, note
    out, info = _cold_call(client, SuspendFails().ping)     # no snapshot: cold again
    assert out == "pong" and info["tier"] == "cold", info


def test_without_cuda_checkpoint_the_guard_refuses_as_before(deployed, client, cluster,
                                                             fake_tool):
    node = _node(cluster)
    node.json("POST", "/v1/config", {"cuda_checkpoint": "/nonexistent/cuda-checkpoint"})
    try:
        out, info = _cold_call(client, NoTool().ping)
    finally:
        node.json("POST", "/v1/config", {"cuda_checkpoint": fake_tool[1]})
    assert out == "pong" and info["tier"] == "cold"
    note = info.get("snapshot", "")
    assert "no snapshot" in note and "refusing to snapshot" in note, note
    assert "libcuda.so.1 mapped" in note and "cuda-checkpoint is not installed" in note, note
