"""cuda_restore on a real NVIDIA GPU: inventory vs nvidia-smi, the host's device nodes and
driver libraries, the guard on a process holding a CUDA context, CUDA_VISIBLE_DEVICES by
UUID, and a cuda-checkpoint round trip of device memory.

CUDA is driven through ctypes on the host's libcuda.so.1 (no torch needed); the torch
variant runs only where torch with CUDA is importable. Everything skips, with the reason,
on machines without a GPU.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cuda_restore.assign import (driver_libraries, gpu_device_nodes, parse_ldconfig,
                                 plan_assignment, plan_driver_dir, run_ldconfig, stage_driver_dir)
from cuda_restore.checkpoint import (CudaState, find_tool, get_state, plan_gpu_snapshot, resume,
                                     suspend)
from cuda_restore.guard import find_cuda_blockers, inspect_cuda
from cuda_restore.inventory import GpuProbe, NodeGpuInventory, read_inventory


def _skip_reason() -> str | None:
    if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidiactl"):
        return "no NVIDIA GPU here (no nvidia-smi, no /dev/nvidiactl)"
    inv = read_inventory()
    if not inv.gpus:
        return f"NVML sees no GPU: {inv.note}"
    return None


_REASON = _skip_reason()
REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.requires_gpu,
              pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

# A process that holds a CUDA context and 64 MiB of device memory filled with 0x5A. It
# prints "ready", then on each stdin line copies the memory back and prints ok/bad.
CUDA_CHILD = textwrap.dedent("""
    import ctypes, sys
    cuda = ctypes.CDLL("libcuda.so.1")
    def ck(rc, what):
        if rc != 0:
            print(f"error {what} {rc}", flush=True); sys.exit(1)
    ck(cuda.cuInit(0), "cuInit")
    dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
    ck(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    ck(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    ck(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    size = 64 << 20
    ck(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(size)), "cuMemAlloc")
    ck(cuda.cuMemsetD8_v2(ptr, ctypes.c_ubyte(0x5A), ctypes.c_size_t(size)), "cuMemsetD8")
    ck(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
    print("ready", flush=True)
    for _ in sys.stdin:
        buf = (ctypes.c_ubyte * size)()
        ck(cuda.cuMemcpyDtoH_v2(buf, ptr, ctypes.c_size_t(size)), "cuMemcpyDtoH")
        print("ok" if bytes(buf) == b"\\x5a" * size else "bad", flush=True)
""")


@pytest.fixture
def cuda_child():
    procs = []

    def start(env: dict | None = None) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", CUDA_CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, **(env or {})))
        procs.append(p)
        line = p.stdout.readline().strip()
        assert line == "ready", f"the CUDA child said {line!r}"
        return p
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def _smi(query: str) -> list[list[str]]:
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [[c.strip() for c in ln.split(",")] for ln in out.strip().splitlines()]


def test_inventory_matches_nvidia_smi():
    inv = read_inventory()
    rows = _smi("index,uuid,name,memory.total,driver_version")
    assert [(g.index, g.uuid, g.name) for g in inv.gpus] == \
        [(int(r[0]), r[1], r[2]) for r in rows]
    assert inv.driver_version == rows[0][4]
    for g, r in zip(inv.gpus, rows, strict=True):
        assert abs(g.memory_total_mib - int(r[3])) <= 1
        assert g.memory_free_mib <= g.memory_total_mib and g.family != "UNKNOWN"
    assert NodeGpuInventory.from_wire(inv.to_wire()) == inv
    probe = GpuProbe()
    try:
        assert [g.uuid for g in probe.read().gpus] == [g.uuid for g in inv.gpus]
        assert probe.read().links == inv.links
    finally:
        probe.close()


def _host_nodes(minors):
    if not os.path.exists("/dev/nvidia-uvm") and shutil.which("nvidia-modprobe"):
        subprocess.run(["nvidia-modprobe", "-u", "-c=0"], check=False)
    if not os.path.exists("/dev/nvidia-uvm"):
        pytest.skip("/dev/nvidia-uvm does not exist and nvidia-modprobe could not make it")
    return gpu_device_nodes(minors)


def test_host_device_nodes_driver_libraries_and_assignment(tmp_path):
    inv = read_inventory()
    nodes = _host_nodes([inv.gpus[0].device_minor])
    assert nodes[0].path == f"/dev/nvidia{inv.gpus[0].device_minor}" and nodes[0].major == 195
    libs = driver_libraries(parse_ldconfig(run_ldconfig()))
    plan = plan_driver_dir(libs)
    staged = stage_driver_dir(plan, tmp_path)
    assert (staged / "libcuda.so.1").exists() and (staged / "libnvidia-ml.so.1").exists()
    assert inv.driver_version in " ".join(name for name, _ in plan.files)
    a = plan_assignment(inv, [inv.gpus[0].index], driver_dir=str(staged))
    assert a.uuids == (inv.gpus[0].uuid,) and a.driver_version == inv.driver_version


def test_cuda_visible_devices_by_uuid_selects_the_gpu(tmp_path):
    inv = read_inventory()
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from cuda_restore.phases import PHASES, CudaInitError, cuda_init
        try:
            print(cuda_init(), PHASES.items()["cuda_init"])
        except CudaInitError as e:
            print("error", e)
    """)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=inv.gpus[0].uuid)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120).stdout.split()
    assert out[0] == "1" and float(out[1]) > 0
    env["CUDA_VISIBLE_DEVICES"] = "GPU-00000000-0000-0000-0000-000000000000"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120).stdout
    assert out.startswith("error") and "100" in out


def test_guard_names_a_process_holding_a_cuda_context(cuda_child):
    p = cuda_child()
    reasons = find_cuda_blockers(inspect_cuda([p.pid]))
    assert any("/dev/nvidiactl open" in r for r in reasons), reasons
    assert any("libcuda.so" in r and "mapped" in r for r in reasons), reasons
    plan = plan_gpu_snapshot(True, find_tool(), read_inventory().driver_version)
    assert plan.path in ("pre_cuda", "cuda_checkpoint") and plan.reason


def test_cuda_checkpoint_round_trip_keeps_device_memory(cuda_child):
    tool = find_tool()
    if tool is None:
        pytest.skip("cuda-checkpoint is not installed (PATH, /usr/bin, /usr/local/bin)")
    inv = read_inventory()
    if (inv.driver_major or 0) < 550:
        pytest.skip(f"driver {inv.driver_version} is older than 550")
    p = cuda_child()
    assert get_state(tool, p.pid) is CudaState.RUNNING
    suspend(tool, p.pid)
    assert get_state(tool, p.pid) is CudaState.CHECKPOINTED
    # suspended: no device file is open any more, so CRIU could dump it now
    assert find_cuda_blockers(inspect_cuda([p.pid]), cuda_suspended=True) == []
    resume(tool, p.pid)
    assert get_state(tool, p.pid) is CudaState.RUNNING
    p.stdin.write("check\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "ok"


def test_cuda_checkpoint_round_trip_of_a_torch_tensor():
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    tool = find_tool()
    if tool is None:
        pytest.skip("cuda-checkpoint is not installed")
    code = textwrap.dedent("""
        import sys, torch
        t = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
        torch.cuda.synchronize()
        print("ready", flush=True)
        sys.stdin.readline()
        ok = bool((t == torch.arange(1 << 20, device="cuda", dtype=torch.float32)).all())
        print("ok" if ok else "bad", flush=True)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        suspend(tool, p.pid)
        assert get_state(tool, p.pid) is CudaState.CHECKPOINTED
        resume(tool, p.pid)
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "ok"
    finally:
        p.kill()
        p.wait(timeout=30)


def test_node_cuda_suspension_steps_on_a_real_cuda_process(cuda_child):
    """The node's take-side steps (runtimed.gpu_snapshot) on a real context: found by the
    guard, suspended, passes the cuda_suspended guard, resumed with memory intact."""
    import asyncio

    from cuda_restore.guard import cuda_context_pids
    from runtimed.gpu_snapshot import CudaSuspension, ns_pids
    tool = find_tool(os.environ.get("RUNTIMED_CUDA_CHECKPOINT") or None)
    if tool is None:
        pytest.skip("cuda-checkpoint is not installed (or RUNTIMED_CUDA_CHECKPOINT is wrong)")
    p = cuda_child()
    assert cuda_context_pids(inspect_cuda([p.pid])) == [p.pid]
    cuda = CudaSuspension(tool)
    asyncio.run(cuda.suspend_all([p.pid]))
    try:
        assert find_cuda_blockers(inspect_cuda([p.pid]), cuda_suspended=True) == []
        assert ns_pids([p.pid]) == {p.pid: p.pid}
    finally:
        asyncio.run(cuda.resume_all())
    p.stdin.write("check\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "ok"
