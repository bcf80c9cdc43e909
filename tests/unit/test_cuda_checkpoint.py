"""cuda_restore.checkpoint against fake cuda-checkpoint binaries (550 --toggle style and
570 --action style, failing and hanging ones), plus the GPU snapshot plan."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cuda_restore.checkpoint import (CudaCheckpointTool, CudaState, fallback, find_tool, get_state,
                                     parse_help, parse_state, plan_gpu_snapshot,
                                     restore_incompatibility, resume, snapshot_gpu_meta, suspend)
from cuda_restore.errors import (CudaCheckpointError, CudaCheckpointTimeout,
                                 CudaCheckpointUnavailable)
from sdk.exception import SnapshotError

HELP_570 = """\
CUDA checkpoint and restore utility.
Version 570.86.10. Copyright (C) 2025 NVIDIA Corporation. All rights reserved.

Operations:
--get-state --pid <pid>
        Prints the current checkpoint state of the process specified by <pid>
--action lock | checkpoint | restore | unlock --pid <pid> [--timeout <ms>]
        Performs the specified action on <pid>.
--toggle --pid <pid>
        Toggles the CUDA state in the specified process between the running and checkpointed states
--get-restore-tid --pid <pid>
Options:
--pid|-p <pid>
--timeout|-t <timeout>
--help|-h
"""
HELP_550 = """\
CUDA checkpoint and restore utility.
Version 550.54.14. Copyright (C) 2024 NVIDIA Corporation. All rights reserved.

    --toggle --pid <value>
        Toggle the state of CUDA in the specified process.
    --get-restore-tid --pid <value>
    --get-state --pid <value>
    --help
"""

# A stand-in for cuda-checkpoint (tests/fakes/cuda_checkpoint.py): follows the real tool's
# state machine with a state file per pid; fake.json says which help text to print, which
# action fails, which one hangs.
FAKES = Path(__file__).resolve().parents[1] / "fakes"


def load_fake():
    spec = importlib.util.spec_from_file_location("fake_cuda_checkpoint",
                                                  FAKES / "cuda_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_tool(tmp_path: Path, help_text: str = HELP_570, **cfg) -> tuple[CudaCheckpointTool, Path]:
    d = tmp_path / "bin"
    exe = load_fake().install(str(d), sys.executable, help=help_text, **cfg)
    tool = find_tool(which=lambda name: exe if name == "cuda-checkpoint" else None)
    assert tool is not None
    return tool, d


def calls(d: Path) -> list[str]:
    return (d / "calls.log").read_text().splitlines()


def set_state(d: Path, pid: int, state: str) -> None:
    (d / f"state-{pid}").write_text(state)


# -- detection -----------------------------------------------------------------------------------
def test_parse_help_570_and_550():
    t = parse_help("/usr/bin/cuda-checkpoint", HELP_570)
    assert (t.version, t.has_action, t.has_toggle, t.has_lock_timeout, t.has_device_map) == \
        ("570.86.10", True, True, True, False)
    t = parse_help("/x", HELP_550)
    assert (t.version, t.has_action, t.has_lock_timeout) == ("550.54.14", False, False)
    assert parse_help("/x", HELP_570 + "--device-map <old=new>").has_device_map


def test_find_tool_on_path_and_in_fixed_places(tmp_path):
    tool, d = fake_tool(tmp_path)
    assert tool.path == str(d / "cuda-checkpoint") and tool.has_action
    assert find_tool(which=lambda n: None, is_executable=lambda p: False) is None
    # a binary that is not cuda-checkpoint is ignored
    other = tmp_path / "cuda-checkpoint"
    other.write_text("#!/bin/sh\necho hello\n")
    other.chmod(0o755)
    assert find_tool(which=lambda n: str(other), is_executable=lambda p: p == str(other)) is None


def test_this_machine_has_no_tool_or_a_real_one():
    tool = find_tool()
    assert tool is None or os.path.basename(tool.path) == "cuda-checkpoint"


@pytest.mark.parametrize("text,state", [("running\n", CudaState.RUNNING),
                                        ("checkpointed", CudaState.CHECKPOINTED),
                                        ("State: locked\n", CudaState.LOCKED),
                                        ("failed", CudaState.FAILED)])
def test_parse_state(text, state):
    assert parse_state(text) is state


def test_parse_state_rejects_noise():
    with pytest.raises(CudaCheckpointError, match="no state"):
        parse_state("Segmentation fault")


# -- suspend / resume ----------------------------------------------------------------------------
def test_round_trip_with_actions(tmp_path):
    tool, d = fake_tool(tmp_path)
    assert get_state(tool, 123) is CudaState.RUNNING
    suspend(tool, 123, lock_timeout_s=2.5)
    assert get_state(tool, 123) is CudaState.CHECKPOINTED
    resume(tool, 123)
    assert get_state(tool, 123) is CudaState.RUNNING
    ops = [c for c in calls(d) if "--get-state" not in c and "--help" not in c]
    assert ops == ["--action lock --timeout 2500 --pid 123", "--action checkpoint --pid 123",
                   "--action restore --pid 123", "--action unlock --pid 123"]


def test_round_trip_with_toggle_on_550(tmp_path):
    tool, d = fake_tool(tmp_path, HELP_550)
    suspend(tool, 7)
    assert get_state(tool, 7) is CudaState.CHECKPOINTED
    resume(tool, 7)
    assert get_state(tool, 7) is CudaState.RUNNING
    assert [c for c in calls(d) if "--toggle" in c] == ["--toggle --pid 7"] * 2


def test_suspend_and_resume_are_idempotent(tmp_path):
    tool, d = fake_tool(tmp_path)
    set_state(d, 5, "checkpointed")
    suspend(tool, 5)
    set_state(d, 5, "running")
    resume(tool, 5)
    assert not [c for c in calls(d) if "--action" in c]


def test_a_failed_checkpoint_unlocks_and_raises_with_the_output(tmp_path):
    tool, d = fake_tool(tmp_path, fail="checkpoint")
    with pytest.raises(CudaCheckpointError) as ei:
        suspend(tool, 9)
    e = ei.value
    assert e.pid == 9 and e.returncode == 1 and "CUDA_ERROR_NOT_SUPPORTED" in str(e)
    assert isinstance(e, SnapshotError)
    assert get_state(tool, 9) is CudaState.RUNNING          # unlocked again
    assert "--action unlock --pid 9" in calls(d)


def test_a_hanging_tool_times_out(tmp_path):
    tool, _ = fake_tool(tmp_path, hang="lock")
    with pytest.raises(CudaCheckpointTimeout, match="took more than"):
        suspend(tool, 11, lock_timeout_s=0.2, timeout=0.3)


def test_a_missing_binary_is_unavailable(tmp_path):
    tool = CudaCheckpointTool(path=str(tmp_path / "gone"), has_action=True)
    with pytest.raises(CudaCheckpointUnavailable):
        get_state(tool, 1)


def test_wrong_states_are_typed_errors(tmp_path):
    tool, d = fake_tool(tmp_path)
    set_state(d, 3, "locked")
    with pytest.raises(CudaCheckpointError, match="only a running"):
        suspend(tool, 3)
    set_state(d, 4, "failed")
    with pytest.raises(CudaCheckpointError, match="failed"):
        resume(tool, 4)
    tool550, d550 = fake_tool(tmp_path / "old", HELP_550)
    set_state(d550, 6, "locked")
    with pytest.raises(CudaCheckpointError, match="--toggle can only resume"):
        resume(tool550, 6)


def test_resume_of_a_locked_process_only_unlocks(tmp_path):
    tool, d = fake_tool(tmp_path)
    set_state(d, 8, "locked")
    resume(tool, 8)
    assert get_state(tool, 8) is CudaState.RUNNING
    assert [c for c in calls(d) if "--action" in c] == ["--action unlock --pid 8"]


def test_device_map_needs_a_tool_that_has_it(tmp_path):
    tool, d = fake_tool(tmp_path)
    set_state(d, 2, "checkpointed")
    with pytest.raises(CudaCheckpointUnavailable, match="device-map"):
        resume(tool, 2, device_map={"GPU-a": "GPU-b"})


def test_a_state_that_does_not_change_is_detected():
    def run(argv, timeout):           # accepts everything, changes nothing
        return 0, "running\n" if "--get-state" in argv else ""
    tool = CudaCheckpointTool("/fake", has_action=True)
    with pytest.raises(CudaCheckpointError, match="after suspend, pid 1 is running"):
        suspend(tool, 1, run=run)


def test_default_runner_uses_a_real_subprocess(tmp_path):
    tool, _ = fake_tool(tmp_path)
    out = subprocess.run([tool.path, "--get-state", "--pid", "1"], capture_output=True, text=True)
    assert out.stdout.strip() == "running"


# -- the plan ------------------------------------------------------------------------------------
@pytest.mark.parametrize("ctx,tool,driver,path,words", [
    (False, None, None, "pre_cuda", "no CUDA context"),
    (False, True, "580.65.06", "pre_cuda", "no CUDA context"),
    (True, True, None, "pre_cuda", "unknown"),
    (True, True, "535.104.05", "pre_cuda", "older than 550"),
    (True, False, "580.65.06", "pre_cuda", "not installed"),
    (True, None, "570.124.06", "pre_cuda", "not installed"),
    (True, True, "550.90.07", "cuda_checkpoint", "--toggle"),
    (True, True, "570.124.06", "cuda_checkpoint", "CRIU 4"),
    (True, CudaCheckpointTool("/x", has_action=True), "580.65.06", "cuda_checkpoint", "lock"),
    (True, CudaCheckpointTool("/x"), "580.65.06", "cuda_checkpoint", "--toggle"),
])
def test_plan_gpu_snapshot(ctx, tool, driver, path, words):
    plan = plan_gpu_snapshot(ctx, tool, driver)
    assert plan.path == path and words in plan.reason
    p, reason = plan                                  # it is a (path, reason) tuple
    assert (p, reason) == (plan.path, plan.reason)


def test_fallback_records_both_reasons():
    plan = plan_gpu_snapshot(True, True, "580.65.06")
    fb = fallback(plan, CudaCheckpointError("cuda-checkpoint --action lock failed (exit 1)"))
    assert fb.path == "pre_cuda"
    assert "lock failed" in fb.reason and plan.reason in fb.reason


def test_gpu_snapshot_meta_and_where_it_can_be_restored():
    tool = CudaCheckpointTool("/x", has_action=True)
    h100 = ["NVIDIA H100 80GB HBM3"]
    pre = snapshot_gpu_meta(plan_gpu_snapshot(False, tool, "580.65.06"), "580.65.06", h100,
                            ["GPU-a"])
    assert pre["gpu_snapshot_path"] == "pre_cuda"
    assert restore_incompatibility(pre, "570.1", ["Tesla T4"], ["GPU-z"], None) is None
    cc = snapshot_gpu_meta(plan_gpu_snapshot(True, tool, "580.65.06"), "580.65.06", h100,
                           ["GPU-a"])
    assert all(isinstance(v, str) for v in cc.values())
    assert restore_incompatibility(cc, "580.65.06", h100, ["GPU-a"], tool) is None
    assert "not installed" in restore_incompatibility(cc, "580.65.06", h100, ["GPU-a"], None)
    assert "driver 580.65.06" in restore_incompatibility(cc, "580.76.05", h100, ["GPU-a"], tool)
    assert "Tesla T4" in restore_incompatibility(cc, "580.65.06", ["Tesla T4"], ["GPU-a"], tool)
    assert "other GPUs" in restore_incompatibility(cc, "580.65.06", h100, ["GPU-b"], tool)
    remap = CudaCheckpointTool("/x", has_action=True, has_device_map=True)
    assert restore_incompatibility(cc, "580.65.06", h100, ["GPU-b"], remap) is None
