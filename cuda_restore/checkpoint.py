"""cuda-checkpoint: suspend a process's CUDA state to host memory so CRIU can dump it, and
resume it after a restore. Plus the decision which GPU snapshot path to take.

    find_tool(path=None) -> CudaCheckpointTool | None   that path, else PATH, /usr/bin,
                                                        /usr/local/bin; --help parsed
    get_state(tool, pid) -> CudaState              running | locked | checkpointed | failed
    suspend(tool, pid)                              running -> checkpointed
    resume(tool, pid)                               checkpointed -> running
    plan_gpu_snapshot(has_cuda_context, tool, driver_version) -> ("pre_cuda"|"cuda_checkpoint", why)
    snapshot_gpu_meta(...) / restore_incompatibility(meta, ...)   what a GPU snapshot needs back

Driver support: 550 has `--toggle` (suspend/resume in one step); 570 adds `--action
lock|checkpoint|restore|unlock` with a lock timeout (no deadlock on a busy process) and
CRIU 4 integration. We use --action when `--help` lists it, else --toggle.

Order for the cuda_checkpoint path (node side): agent idle at the snapshot point ->
suspend(pid) for each process holding a CUDA context -> guard with cuda_suspended=True
(no /dev/nvidia* left open) -> CRIU dump -> resume(pid) if the container keeps running.
Restore: CRIU restore -> inject the /dev/nvidia* nodes -> resume(pid) -> agent resumes.
A suspended process must restore onto a GPU of the same model with the same driver;
cuda-checkpoint (570) cannot move it to another GPU, so record the UUIDs and driver in
the snapshot's metadata and fall back to a cold start elsewhere.

Every failure is typed (errors.py): CudaCheckpointUnavailable, CudaCheckpointTimeout,
CudaCheckpointError (exit status and output). The caller falls back to the pre-CUDA
path with `fallback(plan, exc)`, which records why.
"""
from __future__ import annotations

import enum
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from .errors import CudaCheckpointError, CudaCheckpointTimeout, CudaCheckpointUnavailable

TOOL_NAME = "cuda-checkpoint"
SEARCH_PATHS = ("/usr/bin/cuda-checkpoint", "/usr/local/bin/cuda-checkpoint")
MIN_DRIVER = 550                # cuda-checkpoint --toggle
ACTION_DRIVER = 570             # --action lock/checkpoint/restore/unlock, CRIU 4 integration

# (argv, timeout s) -> (exit status, stdout+stderr). Raises subprocess.TimeoutExpired or OSError.
Runner = Callable[[list[str], float], tuple[int, str]]


def _subprocess_run(argv: list[str], timeout: float) -> tuple[int, str]:
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout, check=False)
    return p.returncode, p.stdout or ""


class CudaState(enum.Enum):
    RUNNING = "running"
    LOCKED = "locked"
    CHECKPOINTED = "checkpointed"
    FAILED = "failed"


@dataclass(frozen=True)
class CudaCheckpointTool:
    path: str
    version: str = ""               # the tool's "Version 570.86.10"
    has_action: bool = False        # --action lock|checkpoint|restore|unlock
    has_toggle: bool = True
    has_lock_timeout: bool = False
    has_device_map: bool = False    # restore onto other GPUs (newer drivers)


def parse_help(path: str, text: str) -> CudaCheckpointTool:
    """What this cuda-checkpoint can do, from its --help text."""
    m = re.search(r"Version\s+([0-9][0-9.]*[0-9])", text)
    has_action = "--action" in text
    return CudaCheckpointTool(path=path, version=m.group(1) if m else "",
                              has_action=has_action, has_toggle="--toggle" in text,
                              has_lock_timeout=has_action and "--timeout" in text,
                              has_device_map="--device-map" in text)


def find_tool(path: str | None = None, *, which: Callable[[str], str | None] = shutil.which,
              is_executable: Callable[[str], bool] = lambda p: os.access(p, os.X_OK),
              run: Runner = _subprocess_run, timeout: float = 10.0) -> CudaCheckpointTool | None:
    """The installed cuda-checkpoint and its features, or None if there is none (or it
    does not answer --help like cuda-checkpoint). With `path` (a node's configured tool),
    only that file is considered: a configured tool that is missing means none."""
    candidates = [path] if path else [p for p in (which(TOOL_NAME), *SEARCH_PATHS) if p]
    for exe in dict.fromkeys(candidates):
        if not is_executable(exe):
            continue
        try:
            _, out = run([exe, "--help"], timeout)
        except (OSError, subprocess.SubprocessError):
            continue
        if "--toggle" in out or "--action" in out:
            return parse_help(exe, out)
    return None


def _driver_major(driver_version: str | None) -> int | None:
    m = re.match(r"\s*(\d+)", driver_version or "")
    return int(m.group(1)) if m else None


def _call(tool: CudaCheckpointTool, args: list[str], pid: int, timeout: float,
          run: Runner) -> str:
    argv = [tool.path, *args, "--pid", str(pid)]
    what = " ".join(args)
    try:
        rc, out = run(argv, timeout)
    except subprocess.TimeoutExpired as e:
        out = e.output.decode(errors="replace") if isinstance(e.output, bytes) else (e.output or "")
        raise CudaCheckpointTimeout(f"cuda-checkpoint {what} on pid {pid} took more than "
                                    f"{timeout:g} s", pid=pid, output=out) from None
    except OSError as e:
        raise CudaCheckpointUnavailable(f"cannot run {tool.path}: {e}", pid=pid) from None
    if rc != 0:
        tail = " ".join(out.strip().splitlines()[-3:])
        raise CudaCheckpointError(f"cuda-checkpoint {what} on pid {pid} failed (exit {rc}): "
                                  f"{tail or 'no output'}", pid=pid, returncode=rc, output=out)
    return out


def parse_state(text: str) -> CudaState:
    words = re.findall(r"[a-z]+", text.lower())
    for state in CudaState:
        if state.value in words:
            return state
    raise CudaCheckpointError(f"cuda-checkpoint printed no state: {text.strip()[:200]!r}",
                              output=text)


def get_state(tool: CudaCheckpointTool, pid: int, *, timeout: float = 10.0,
              run: Runner = _subprocess_run) -> CudaState:
    return parse_state(_call(tool, ["--get-state"], pid, timeout, run))


def _expect(tool: CudaCheckpointTool, pid: int, want: CudaState, step: str, timeout: float,
            run: Runner) -> None:
    got = get_state(tool, pid, timeout=timeout, run=run)
    if got is not want:
        raise CudaCheckpointError(f"after {step}, pid {pid} is {got.value}, not {want.value}",
                                  pid=pid)


def suspend(tool: CudaCheckpointTool, pid: int, *, lock_timeout_s: float = 30.0,
            timeout: float = 300.0, run: Runner = _subprocess_run) -> None:
    """running -> checkpointed: CUDA calls are locked, pending work finishes, device memory
    moves to host memory, GPU resources are released. On a failed checkpoint after a
    successful lock, the process is unlocked again (best effort) before raising."""
    state = get_state(tool, pid, run=run)
    if state is CudaState.CHECKPOINTED:
        return
    if state is not CudaState.RUNNING:
        raise CudaCheckpointError(f"pid {pid} is {state.value}; only a running CUDA process "
                                  "can be suspended", pid=pid)
    if tool.has_action:
        lock = ["--action", "lock"]
        if tool.has_lock_timeout:
            lock += ["--timeout", str(int(lock_timeout_s * 1000))]
        _call(tool, lock, pid, lock_timeout_s + timeout, run)
        try:
            _call(tool, ["--action", "checkpoint"], pid, timeout, run)
        except CudaCheckpointError:
            try:
                _call(tool, ["--action", "unlock"], pid, 30.0, run)
            except CudaCheckpointError:
                pass
            raise
    else:
        _call(tool, ["--toggle"], pid, timeout, run)
    _expect(tool, pid, CudaState.CHECKPOINTED, "suspend", 10.0, run)


def resume(tool: CudaCheckpointTool, pid: int, *, timeout: float = 300.0,
           device_map: dict[str, str] | None = None, run: Runner = _subprocess_run) -> None:
    """checkpointed -> running: GPUs are re-acquired (their /dev nodes must exist in the
    process's mount namespace), memory is copied back, CUDA calls unlock. `device_map`
    (old UUID -> new UUID) needs a tool that lists --device-map."""
    state = get_state(tool, pid, run=run)
    if state is CudaState.RUNNING:
        return
    if state is CudaState.FAILED:
        raise CudaCheckpointError(f"pid {pid}'s CUDA state is failed; it cannot be resumed",
                                  pid=pid)
    if device_map and not tool.has_device_map:
        raise CudaCheckpointUnavailable("this cuda-checkpoint cannot restore onto other GPUs "
                                        "(no --device-map)", pid=pid)
    if tool.has_action:
        if state is CudaState.CHECKPOINTED:
            args = ["--action", "restore"]
            if device_map:
                args += ["--device-map", ",".join(f"{a}={b}" for a, b in device_map.items())]
            _call(tool, args, pid, timeout, run)
        _call(tool, ["--action", "unlock"], pid, 60.0, run)
    else:
        if state is not CudaState.CHECKPOINTED:
            raise CudaCheckpointError(f"pid {pid} is {state.value}; --toggle can only resume "
                                      "a checkpointed process", pid=pid)
        _call(tool, ["--toggle"], pid, timeout, run)
    _expect(tool, pid, CudaState.RUNNING, "resume", 10.0, run)


# -- the decision ------------------------------------------------------------------------------
PathName = Literal["pre_cuda", "cuda_checkpoint"]


class GpuSnapshotPlan(NamedTuple):
    path: PathName
    reason: str


def plan_gpu_snapshot(has_cuda_context: bool, tool_available: bool | CudaCheckpointTool | None,
                      driver_version: str | None) -> GpuSnapshotPlan:
    """How to snapshot a GPU container at its snapshot point.

    pre_cuda: the snapshot holds no CUDA state; the GPU is assigned and CUDA initializes
    after each restore. It is the path whenever no CUDA context exists (the usual case),
    and the fallback when one exists but cuda-checkpoint cannot be used: the guard then
    refuses that snapshot (the function runs on without one) and the reason says why.
    cuda_checkpoint: suspend CUDA with cuda-checkpoint, then dump with CRIU.
    """
    if not has_cuda_context:
        return GpuSnapshotPlan("pre_cuda", "no CUDA context at the snapshot point: the GPU "
                               "is assigned and CUDA initializes after restore")
    major = _driver_major(driver_version)
    if major is None:
        return GpuSnapshotPlan("pre_cuda", "a CUDA context exists but the driver version is "
                               "unknown: cannot use cuda-checkpoint; initialize CUDA in @enter()")
    if major < MIN_DRIVER:
        return GpuSnapshotPlan("pre_cuda", f"a CUDA context exists but driver {driver_version} "
                               f"is older than {MIN_DRIVER}, which cuda-checkpoint needs; "
                               "initialize CUDA in @enter()")
    if not tool_available:
        return GpuSnapshotPlan("pre_cuda", "a CUDA context exists but cuda-checkpoint is not "
                               "installed (PATH, /usr/bin, /usr/local/bin); initialize CUDA "
                               "in @enter()")
    how = "lock/checkpoint actions, CRIU 4 integration" if major >= ACTION_DRIVER else "--toggle"
    if isinstance(tool_available, CudaCheckpointTool):
        how = "lock/checkpoint actions" if tool_available.has_action else "--toggle"
    return GpuSnapshotPlan("cuda_checkpoint", f"a CUDA context exists and driver "
                           f"{driver_version} has cuda-checkpoint ({how})")


def snapshot_gpu_meta(plan: GpuSnapshotPlan, driver_version: str, gpu_names: list[str],
                      gpu_uuids: list[str], suspended: Sequence[int] = ()) -> dict[str, str]:
    """Snapshot metadata (manifest meta, str -> str) that `restore_incompatibility` checks.
    `suspended`: the pids (as seen inside the container's pid namespace, which CRIU
    restores unchanged) that went through cuda-checkpoint and must be resumed."""
    meta = {"gpu_snapshot_path": plan.path, "gpu_snapshot_reason": plan.reason,
            "gpu_driver": driver_version, "gpu_models": ",".join(gpu_names),
            "gpu_uuids": ",".join(gpu_uuids)}
    if suspended:
        meta["cuda_suspended_pids"] = ",".join(str(p) for p in sorted(suspended))
    return meta


def suspended_pids(meta: dict[str, str]) -> list[int]:
    """The namespace pids a cuda_checkpoint snapshot must resume after restore. Raises
    CudaCheckpointError on a malformed value (a hostile or damaged manifest)."""
    raw = meta.get("cuda_suspended_pids", "")
    if not raw:
        return []
    try:
        pids = [int(x) for x in raw.split(",")]
    except ValueError:
        raise CudaCheckpointError(f"snapshot meta cuda_suspended_pids={raw[:80]!r} is not a "
                                  "list of pids") from None
    if any(p <= 0 for p in pids) or len(pids) > 4096:
        raise CudaCheckpointError(f"snapshot meta cuda_suspended_pids={raw[:80]!r} is out of "
                                  "range")
    return pids


def restore_incompatibility(meta: dict[str, str], driver_version: str, gpu_names: list[str],
                            gpu_uuids: list[str],
                            tool: CudaCheckpointTool | None) -> str | None:
    """Why a snapshot cannot be restored onto these GPUs here (None: it can). Pre-CUDA
    snapshots restore anywhere; cuda_checkpoint ones need the tool, the same driver (its
    libraries are mapped) and GPU models, and the same GPUs unless the tool can remap."""
    if meta.get("gpu_snapshot_path") != "cuda_checkpoint":
        return None
    if tool is None:
        return "the snapshot holds CUDA state and cuda-checkpoint is not installed here"
    if meta.get("gpu_driver") != driver_version:
        return (f"the snapshot holds CUDA state of driver {meta.get('gpu_driver')}, this "
                f"node runs {driver_version}")
    if meta.get("gpu_models", "") != ",".join(gpu_names):
        return (f"the snapshot holds CUDA state of {meta.get('gpu_models')}, the GPUs "
                f"assigned here are {','.join(gpu_names)}")
    if meta.get("gpu_uuids", "") != ",".join(gpu_uuids) and not tool.has_device_map:
        return "the snapshot's CUDA state is bound to other GPUs and this cuda-checkpoint " \
               "cannot move it (no --device-map)"
    return None


def fallback(plan: GpuSnapshotPlan, error: BaseException) -> GpuSnapshotPlan:
    """The cuda_checkpoint path failed: fall back to pre_cuda, keeping both reasons."""
    return GpuSnapshotPlan("pre_cuda", f"cuda-checkpoint failed ({error}); was: {plan.reason}; "
                           "the snapshot is skipped, initialize CUDA in @enter()")
