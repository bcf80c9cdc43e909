"""cuda_restore: GPUs for runtimed.

    inventory   NVML -> NodeGpuInventory (wire format for register/heartbeat)
    request     gpu="A100-80GB:2" -> GpuRequest
    scheduler   place(request, inventories, ledger) -> Placement; GpuLedger
    guard       was CUDA touched before the snapshot point?
    assign      device nodes, driver libraries, env for the chosen GPUs
    phases      "cuda_init" / "weights_to_gpu" spans inside the container (stdlib only)
    checkpoint  cuda-checkpoint suspend/resume and the GPU snapshot plan
    errors      the typed errors (members of sdk.exception's hierarchy)
    fake_nvml   a fake NVML with preset machines, for tests

Modules are imported on use (`from cuda_restore.scheduler import place`): importing the
package itself loads nothing, so the agent can ship `phases.py` alone.
"""
