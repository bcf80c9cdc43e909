"""runtimed.gpu_snapshot: the decisions of the cuda-checkpoint snapshot path (which refusal,
which plan), namespace pids, and suspending/resuming a container's processes against the
fake cuda-checkpoint (tests/fakes/cuda_checkpoint.py)."""
from __future__ import annotations

import asyncio
import sys

import pytest

from cuda_restore.checkpoint import (CudaCheckpointTool, find_tool, plan_gpu_snapshot,
                                     snapshot_gpu_meta, suspended_pids)
from cuda_restore.errors import CudaCheckpointError
from cuda_restore.guard import CudaProcView, cuda_context_pids, find_cuda_blockers
from runtimed.gpu_snapshot import (CudaSuspension, GpuTarget, host_pids_for, ns_pids,
                                   parse_ns_pid, plan_take)
from sdk.exception import SnapshotError

HELP_550 = "CUDA checkpoint and restore utility.\nVersion 550.90.07.\n" \
           "  --toggle --pid <value>\n  --get-state --pid <value>\n  --help\n"
A10G = GpuTarget("550.90.07", ("NVIDIA A10G",), ("GPU-a10g-0",))
TOOL = CudaCheckpointTool(path="/x/cuda-checkpoint")
LIBCUDA = CudaProcView(7, maps=("/usr/lib/libcuda.so.1",))


# -- which processes hold a context ------------------------------------------------------------
def test_context_pids_are_libcuda_device_files_or_cuda_threads():
    views = [CudaProcView(1, fds=("/dev/nvidiactl",)), LIBCUDA,
             CudaProcView(9, threads=("cuda-EvtHandlr",)),
             CudaProcView(4, maps=("/usr/lib/libnvidia-ml.so.1", "/opt/libcudart.so.12")),
             CudaProcView(5)]
    assert cuda_context_pids(views) == [1, 7, 9]


# -- plan_take -----------------------------------------------------------------------------------
def test_nothing_blocks_no_plan():
    assert plan_take([], [], [], A10G, TOOL) is None


def test_cuda_context_with_a_tool_and_driver_550_plans_cuda_checkpoint():
    reasons = find_cuda_blockers([LIBCUDA])
    plan = plan_take(reasons, reasons, [7], A10G, TOOL)
    assert plan is not None and plan.path == "cuda_checkpoint" and "550.90.07" in plan.reason


@pytest.mark.parametrize("gpu,tool,words", [
    (A10G, None, "cuda-checkpoint is not installed"),
    (GpuTarget("535.104.05", ("NVIDIA A10G",), ("GPU-0",)), TOOL, "older than 550"),
    (None, TOOL, ""),                         # not a GPU container: the guard as before
])
def test_without_a_usable_tool_the_guard_refuses_and_says_why(gpu, tool, words):
    reasons = find_cuda_blockers([LIBCUDA])
    with pytest.raises(SnapshotError) as ei:
        plan_take(reasons, reasons, [7], gpu, tool)
    msg = str(ei.value)
    assert msg.startswith("refusing to snapshot: pid 7 has libcuda.so.1 mapped") and words in msg


def test_other_blockers_are_not_suspended_away():
    reasons = find_cuda_blockers([LIBCUDA])
    tcp = "pid 7 has an established TCP connection to 1.2.3.4:443"
    with pytest.raises(SnapshotError, match="TCP connection"):
        plan_take(sorted(reasons + [tcp]), reasons, [7], A10G, TOOL)


def test_blockers_without_a_context_pid_are_refused():
    with pytest.raises(SnapshotError, match="refusing"):
        plan_take(["pid 3 maps /dev/nvidia0"], ["pid 3 maps /dev/nvidia0"], [], A10G, TOOL)


# -- namespace pids and the snapshot meta ----------------------------------------------------------
def test_parse_ns_pid_takes_the_innermost():
    assert parse_ns_pid("Name:\tpython\nNSpid:\t41234\t1\n") == 1
    assert parse_ns_pid("NSpid:\t812\n") == 812
    assert parse_ns_pid("Name: x\n") is None


def test_ns_pids_of_this_process_and_a_gone_one():
    import os
    assert ns_pids([os.getpid(), 2**22 + 7]) == {os.getpid(): os.getpid()}   # no pid ns here


def test_host_pids_for_recorded_namespace_pids():
    assert host_pids_for([1, 12], {5001: 1, 5002: 7, 5013: 12}) == [5001, 5013]
    with pytest.raises(SnapshotError, match=r"no process \[12\]"):
        host_pids_for([1, 12], {5001: 1})


def test_meta_records_the_suspended_pids_and_reads_them_back():
    plan = plan_gpu_snapshot(True, TOOL, "550.90.07")
    meta = snapshot_gpu_meta(plan, "550.90.07", ["NVIDIA A10G"], ["GPU-0"], [12, 1])
    assert meta["gpu_snapshot_path"] == "cuda_checkpoint" and meta["cuda_suspended_pids"] == "1,12"
    assert suspended_pids(meta) == [1, 12]
    assert suspended_pids({}) == []
    for bad in ("1,x", "0", "-3"):
        with pytest.raises(CudaCheckpointError):
            suspended_pids({"cuda_suspended_pids": bad})


# -- the configured tool ---------------------------------------------------------------------------
def test_a_configured_path_is_the_only_candidate(tmp_path, cuda_checkpoint_fake):
    exe = cuda_checkpoint_fake.install(str(tmp_path / "bin"), sys.executable, help=HELP_550)
    assert find_tool(exe).path == exe
    assert find_tool(str(tmp_path / "absent"), which=lambda n: exe) is None
    assert GpuTarget("550", (), (), exe).find_tool().path == exe


# -- suspend / resume a container's processes --------------------------------------------------------
def test_a_failed_suspend_resumes_the_ones_already_suspended(tmp_path, cuda_checkpoint_fake):
    d = tmp_path / "bin"
    tool = find_tool(cuda_checkpoint_fake.install(str(d), sys.executable, help=HELP_550))
    (d / "state-202").write_text("locked")          # the second process cannot be toggled
    cuda = CudaSuspension(tool)
    with pytest.raises(CudaCheckpointError, match="pid 202 is locked"):
        asyncio.run(cuda.suspend_all([101, 202]))
    assert (d / "state-101").read_text() == "running" and cuda.suspended == []
    toggles = [ln for ln in (d / "calls.log").read_text().splitlines() if "--toggle" in ln]
    assert toggles == ["--toggle --pid 101"] * 2


def test_suspend_then_resume_all(tmp_path, cuda_checkpoint_fake):
    d = tmp_path / "bin"
    tool = find_tool(cuda_checkpoint_fake.install(str(d), sys.executable, help=HELP_550))
    cuda = CudaSuspension(tool)
    asyncio.run(cuda.suspend_all([101, 102]))
    assert cuda.suspended == [101, 102] and (d / "state-102").read_text() == "checkpointed"
    asyncio.run(cuda.resume_all())
    assert (d / "state-101").read_text() == (d / "state-102").read_text() == "running"


def test_a_failed_resume_names_the_pid(tmp_path, cuda_checkpoint_fake):
    d = tmp_path / "bin"
    fake = cuda_checkpoint_fake
    tool = find_tool(fake.install(str(d), sys.executable, help=HELP_550))
    cuda = CudaSuspension(tool)
    asyncio.run(cuda.suspend_all([101]))
    fake.configure(d, help=HELP_550, fail="toggle")
    with pytest.raises(SnapshotError, match="could not resume CUDA after the snapshot.*101"):
        asyncio.run(cuda.resume_all())
