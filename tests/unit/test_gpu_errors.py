"""cuda_restore.errors: members of sdk.exception's hierarchy, with the right codes."""
from __future__ import annotations

import pytest

from cuda_restore.errors import (CudaCheckpointError, CudaCheckpointTimeout,
                                 CudaCheckpointUnavailable, GpuAssignError, GpuInventoryError,
                                 GpuPreemptedError, GpuRequestError, GpuUnsatisfiableError,
                                 NoCapacityError)
from sdk.exception import (ExecutionError, InvalidError, NodeUnavailableError, SnapshotError,
                           from_wire)


@pytest.mark.parametrize("cls,base,code,status", [
    (GpuRequestError, InvalidError, "invalid", 400),
    (GpuUnsatisfiableError, GpuRequestError, "invalid", 400),
    (GpuInventoryError, InvalidError, "invalid", 400),
    (NoCapacityError, NodeUnavailableError, "node_unavailable", 503),
    (GpuPreemptedError, NodeUnavailableError, "gpu_preempted", 503),
    (GpuAssignError, ExecutionError, "execution_failed", 500),
    (CudaCheckpointError, SnapshotError, "snapshot_failed", 500),
    (CudaCheckpointUnavailable, CudaCheckpointError, "snapshot_failed", 500),
    (CudaCheckpointTimeout, CudaCheckpointError, "snapshot_failed", 500),
])
def test_hierarchy_and_codes(cls, base, code, status):
    e = cls("boom")
    assert isinstance(e, base) and e.code == code and e.http_status == status
    assert e.to_wire() == {"code": code, "message": "boom"}


def test_not_now_is_not_impossible():
    assert not issubclass(NoCapacityError, GpuRequestError)
    assert not issubclass(GpuUnsatisfiableError, NodeUnavailableError)
    assert issubclass(GpuRequestError, ValueError) and issubclass(GpuInventoryError, ValueError)


def test_clients_rebuild_the_parent_class():
    assert type(from_wire(GpuUnsatisfiableError("no H100").to_wire())) is InvalidError
    assert type(from_wire(NoCapacityError("busy").to_wire())) is NodeUnavailableError


def test_checkpoint_errors_carry_the_tool_output():
    e = CudaCheckpointError("failed", pid=3, returncode=1, output="CUDA_ERROR_X")
    assert (e.pid, e.returncode, e.output) == (3, 1, "CUDA_ERROR_X")
