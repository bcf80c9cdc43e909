"""The errors of cuda_restore, as members of runtimed's one closed hierarchy.

    sdk.exception.Error
    ├── InvalidError                        (HTTP 400, code "invalid")
    │   ├── GpuRequestError (+ ValueError)  a malformed `gpu=` value or an impossible count
    │   │   └── GpuUnsatisfiableError       no registered node can EVER hold the request
    │   └── GpuInventoryError (+ ValueError)  a node sent a malformed GPU inventory
    ├── ExecutionError
    │   ├── NodeUnavailableError            (HTTP 503, code "node_unavailable", retryable)
    │   │   ├── NoCapacityError             some node could hold it, but not now: queue it
    │   │   └── GpuPreemptedError           (code "gpu_preempted") a higher-priority job took
    │   │                                   the GPUs: requeue the call, do not count a retry
    │   └── GpuAssignError                  this host lacks a device node or driver library
    └── SnapshotError                       (code "snapshot_failed")
        └── CudaCheckpointError             cuda-checkpoint failed (exit status, output)
            ├── CudaCheckpointUnavailable   no binary, or a driver older than 550
            └── CudaCheckpointTimeout       it did not answer in time

Each class but GpuPreemptedError keeps its parent's `code`, so the dispatcher's error
mapping and the client's `from_wire` work unchanged; callers tell "impossible ever" from
"not now" by class:
`GpuUnsatisfiableError` fails the call, `NoCapacityError` leaves it queued.
"""
from __future__ import annotations

from sdk.exception import ExecutionError, InvalidError, NodeUnavailableError, SnapshotError


class GpuRequestError(InvalidError, ValueError):
    """The `gpu=` value cannot be understood (unknown type, bad count, bad memory)."""


class GpuUnsatisfiableError(GpuRequestError):
    """No node that exists now has that GPU type in that count (and memory): waiting will
    not help. The message lists what the nodes do have."""


class GpuInventoryError(InvalidError, ValueError):
    """A node's GPU inventory on the wire is malformed."""


class NoCapacityError(NodeUnavailableError):
    """Some node could run the request, but every fitting GPU is busy now: queue and retry."""


class GpuPreemptedError(NodeUnavailableError):
    """The call's GPUs were given to a higher-priority request. The dispatcher requeues the
    call without spending one of its retries; users should never see this error."""

    code = "gpu_preempted"

    def __init__(self, message: str, *, by_call: str | None = None,
                 by_function: str | None = None, priority: int | None = None,
                 node_id: str | None = None, gpus: tuple[int, ...] | None = None):
        super().__init__(message)
        # on the wire next to code and message: who took the GPUs (the call's events)
        given = {"by_call": by_call, "by_function": by_function, "priority": priority,
                 "node_id": node_id, "gpus": list(gpus) if gpus is not None else None}
        self.details = {k: v for k, v in given.items() if v is not None}


class GpuAssignError(ExecutionError):
    """The host cannot bind the chosen GPUs into a container (missing /dev node, no libcuda)."""


class CudaCheckpointError(SnapshotError):
    """A cuda-checkpoint operation failed; `output` holds what the tool printed."""

    def __init__(self, message: str, *, pid: int | None = None, returncode: int | None = None,
                 output: str = ""):
        super().__init__(message)
        self.pid, self.returncode, self.output = pid, returncode, output


class CudaCheckpointUnavailable(CudaCheckpointError):
    """cuda-checkpoint is not installed, or the driver is too old for it."""


class CudaCheckpointTimeout(CudaCheckpointError):
    """cuda-checkpoint did not finish within its timeout (it was killed)."""
