"""The cuda-checkpoint path of GPU snapshots on a node (issue 8): the steps around the CRIU
dump and restore of a container whose processes already hold a CUDA context.

Take (SnapshotManager.take, at the snapshot point):
    guard finds CUDA -> plan_take (cuda_restore.checkpoint.plan_gpu_snapshot) -> suspend
    each CUDA process -> guard again (cuda_suspended) -> [CRIU dump] -> resume each
Restore (Node._restore):
    restore_incompatibility (before CRIU) -> [CRIU restore] -> attach GPUs -> resume each
    suspended process, found by its pid inside the container's pid namespace (CRIU restores
    those unchanged; host pids differ)

Every failure is a SnapshotError whose message is the reason the caller records (the
snapshot note of the call); whatever was suspended is resumed before it is raised.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from cuda_restore.checkpoint import (CudaCheckpointTool, GpuSnapshotPlan, find_tool,
                                     plan_gpu_snapshot, resume, suspend)
from cuda_restore.errors import CudaCheckpointError
from sdk.exception import SnapshotError

log = logging.getLogger(__name__)
ENV_TOOL = "RUNTIMED_CUDA_CHECKPOINT"      # path of cuda-checkpoint (default: searched)


@dataclass(frozen=True)
class GpuTarget:
    """A container's GPUs as the node's NVML inventory names them, and the node's
    cuda-checkpoint setting (a path, or None to search PATH, /usr/bin, /usr/local/bin)."""

    driver_version: str
    gpu_names: tuple[str, ...]
    gpu_uuids: tuple[str, ...]
    tool_path: str | None = None

    def find_tool(self) -> CudaCheckpointTool | None:
        return find_tool(self.tool_path)


def plan_take(blockers: list[str], cuda_reasons: list[str], context_pids: list[int],
              gpu: GpuTarget | None, tool: CudaCheckpointTool | None) -> GpuSnapshotPlan | None:
    """Decide what to do with a process tree the guard refused (`blockers`, of which
    `cuda_reasons` are about CUDA). Returns the cuda_checkpoint plan when suspending the
    `context_pids` can make the dump possible; raises SnapshotError (the guard's refusal,
    plus why cuda-checkpoint cannot help) otherwise. None: nothing blocks."""
    if not blockers:
        return None
    refusal = "refusing to snapshot: " + "; ".join(blockers)
    if not context_pids or gpu is None:
        raise SnapshotError(refusal)
    if set(blockers) - set(cuda_reasons):
        raise SnapshotError(refusal)     # cuda-checkpoint cannot help with sockets and such
    plan = plan_gpu_snapshot(True, tool, gpu.driver_version)
    if plan.path != "cuda_checkpoint":
        raise SnapshotError(f"{refusal} ({plan.reason})")
    return plan


def parse_ns_pid(status: str) -> int | None:
    """The innermost pid of /proc/<pid>/status (NSpid: host ... innermost)."""
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            fields = line.split()[1:]
            return int(fields[-1]) if fields else None
    return None


def ns_pids(pids: Iterable[int], proc_root: str = "/proc") -> dict[int, int]:
    """host pid -> pid inside its namespace, for the pids that still exist."""
    out = {}
    for pid in pids:
        try:
            with open(f"{proc_root}/{pid}/status") as f:
                ns = parse_ns_pid(f.read())
        except OSError:
            continue
        if ns is not None:
            out[pid] = ns
    return out


def host_pids_for(recorded: list[int], host_to_ns: dict[int, int]) -> list[int]:
    """The host pids of the restored processes whose namespace pids were `recorded` as
    suspended. Raises SnapshotError when one is missing from the restored tree."""
    by_ns = {ns: host for host, ns in host_to_ns.items()}
    missing = [p for p in recorded if p not in by_ns]
    if missing:
        raise SnapshotError(f"the restored container has no process {missing} (pid in its "
                            "namespace) to resume CUDA in")
    return [by_ns[p] for p in recorded]


class CudaSuspension:
    """The processes of one container suspended with cuda-checkpoint, resumed again by
    `resume_all` (always: after a failure too)."""

    def __init__(self, tool: CudaCheckpointTool):
        self.tool = tool
        self.suspended: list[int] = []

    async def suspend_all(self, pids: list[int]) -> None:
        """Suspend each pid in turn. On a failure, the ones done are resumed and the
        error (CudaCheckpointError) is raised."""
        loop = asyncio.get_running_loop()
        for pid in pids:
            try:
                await loop.run_in_executor(None, functools.partial(suspend, self.tool, pid))
            except CudaCheckpointError:
                try:
                    await self.resume_all()
                except SnapshotError as e:     # the suspend's error is the one to report
                    log.error("%s", e)
                raise
            self.suspended.append(pid)

    async def resume_all(self, what: str = "after the snapshot") -> None:
        """Resume every suspended pid (each one is tried); raises SnapshotError naming
        the ones whose CUDA could not be resumed."""
        pids, self.suspended = self.suspended, []
        await resume_pids(self.tool, pids, what)


async def resume_pids(tool: CudaCheckpointTool, pids: list[int], what: str) -> None:
    loop = asyncio.get_running_loop()
    errors = []
    for pid in pids:
        try:
            await loop.run_in_executor(None, functools.partial(resume, tool, pid))
        except CudaCheckpointError as e:
            errors.append(str(e))
    if errors:
        raise SnapshotError(f"cuda-checkpoint could not resume CUDA {what}: "
                            + "; ".join(errors))
