"""Late GPU device injection into a real runc container, and what a CRIU restore does to
it, with a stand-in device instead of a GPU (no GPU needed: /dev/fuse plays /dev/nvidia0,
/dev/loop-control plays /dev/nvidia1).

It checks the three facts cuda_restore.assign's design rests on:
1. nodes made through /proc/<pid>/root/dev appear in the running container, and the
   device cgroup rules from config.json decide which of them can be opened;
2. a CRIU restore brings the container's /dev tmpfs back as dumped, device nodes
   included (so nodes must be injected after the snapshot point, never before);
3. `runc restore` applies the device rules of the restore-time config.json, so a restored
   container gets the GPUs assigned to it now, not those of the snapshot; injection then
   removes the snapshot's stale GPU nodes.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from cuda_restore.assign import DeviceNode, inject_device_nodes
from runtimed import rootfs
from runtimed.bundle import ContainerSpec, build_config
from runtimed.config import Paths
from runtimed.runc import RUNC_ROOT, Runc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PATHS = Paths.from_env()
GPU_A = DeviceNode("/dev/nvidia0", 10, 229, 0o666)      # really /dev/fuse
GPU_B = DeviceNode("/dev/nvidia1", 10, 237, 0o666)      # really /dev/loop-control


def _skip_reason() -> str | None:
    if not PATHS.base_rootfs.is_dir():
        return f"no base rootfs at {PATHS.base_rootfs} (run scripts/setup.sh)"
    if not os.path.exists(PATHS.criu):
        return f"no CRIU at {PATHS.criu} (run scripts/setup.sh)"
    for dev in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(dev):
            return f"the stand-in device {dev} does not exist on this host"
    return None


def _write_config(cdir: Path, cid: str, merged: str, allow: list[DeviceNode]) -> None:
    spec = ContainerSpec(container_id=cid, rootfs=merged, args=("/bin/sleep", "600"),
                         env=(("PATH", "/usr/bin:/bin"),), memory_mb=64)
    cfg = build_config(spec)
    # what bundle.py will do with GpuAssignment.cgroup_rules()
    cfg["linux"]["resources"]["devices"] += [d.cgroup_rule() for d in allow]
    (cdir / "config.json").write_text(json.dumps(cfg))


def _can_open(cid: str, path: str) -> str:
    out = subprocess.run(["runc", "--root", RUNC_ROOT, "exec", cid, "sh", "-c",
                          f"if [ -c {path} ]; then (exec 3<>{path}) 2>&1 && echo open; "
                          f"else echo missing; fi"], capture_output=True, text=True, timeout=60)
    text = (out.stdout + out.stderr).strip()
    if "open" in text.splitlines()[-1:]:
        return "open"
    if "missing" in text:
        return "missing"
    if "not permitted" in text:
        return "denied"
    return text


async def _scenario(cdir: Path, cid: str) -> dict[str, object]:
    runc = Runc(criu=str(PATHS.criu))
    plan = rootfs.plan_overlay([PATHS.base_rootfs], cdir)
    rootfs.mount_overlay(plan)
    fds: list[int] = []

    async def start(restore_from: Path | None) -> int:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        fds.extend([in_w, out_r, err_r])
        try:
            if restore_from is None:
                await runc.run_detached(cid, cdir, in_r, out_w, err_w)
            else:
                await runc.restore_detached(cid, cdir, restore_from, cdir / "criu-work",
                                            in_r, out_w, err_w)
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        return int((cdir / "pid").read_text())

    seen: dict[str, object] = {}
    try:
        # cold start, assigned "GPU A": its rule is in config.json, its node injected late
        _write_config(cdir, cid, plan.merged, [GPU_A])
        pid = await start(None)
        seen["before_inject"] = _can_open(cid, GPU_A.path)
        seen["made"] = inject_device_nodes(f"/proc/{pid}/root", [GPU_A, GPU_B])
        seen["cold_a"], seen["cold_b"] = _can_open(cid, GPU_A.path), _can_open(cid, GPU_B.path)
        await runc.checkpoint(cid, cdir / "img", cdir / "criu-dump", leave_running=False)
        await runc.delete(cid)
        # restore, now assigned "GPU B" only
        _write_config(cdir, cid, plan.merged, [GPU_B])
        pid = await start(cdir / "img")
        seen["restored_a"] = _can_open(cid, GPU_A.path)
        seen["restored_b"] = _can_open(cid, GPU_B.path)
        seen["reinject"] = inject_device_nodes(f"/proc/{pid}/root", [GPU_B])
        seen["stale_a"] = _can_open(cid, GPU_A.path)
    finally:
        await runc.kill(cid)
        for _ in range(50):
            st = await runc.state(cid)
            if st is None or st.get("status") == "stopped":
                break
            await asyncio.sleep(0.1)
        await runc.delete(cid)
        for fd in fds:
            os.close(fd)
        rootfs.teardown(cdir)
    return seen


def test_late_injection_and_restore_time_device_rules():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    cid = f"gpu-inject-{uuid.uuid4().hex[:8]}"
    cdir = Path(tempfile.mkdtemp(prefix="rtd-gpu-inject-", dir="/var/tmp"))
    try:
        seen = asyncio.run(_scenario(cdir, cid))
    finally:
        shutil.rmtree(cdir, ignore_errors=True)
    assert seen["before_inject"] == "missing"                      # nothing at `runc run`
    assert seen["made"] == [GPU_A.path, GPU_B.path]
    assert (seen["cold_a"], seen["cold_b"]) == ("open", "denied"), seen   # (1)
    assert seen["restored_b"] == "open", seen                      # (2) node back, (3) rule
    assert seen["restored_a"] == "denied", seen                    # (3) old rule is gone
    assert seen["reinject"] == []                                  # (2) it came back as dumped
    assert seen["stale_a"] == "missing"                            # the snapshot's GPU: removed
