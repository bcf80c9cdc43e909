"""cuda_restore.guard: pure checks on fake /proc views, and a real process that maps a
file named libcuda.so.1 and runs a thread named like CUDA's."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from cuda_restore.guard import (USER_GUIDE, CudaProcView, cuda_blockers, cuda_notes, cuda_pids,
                                find_cuda_blockers, inspect_cuda)
from snapshot.guard import ProcView


def test_a_clean_process_has_no_blockers():
    p = CudaProcView(10, fds=("/dev/null", "pipe:[1]", "socket:[2]"),
                     maps=("/usr/lib/x86_64-linux-gnu/libc.so.6", "[heap]"),
                     threads=("python3",))
    assert find_cuda_blockers([p]) == [] and cuda_notes([p]) == []


@pytest.mark.parametrize("fd", ["/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm",
                                "/dev/nvidia-uvm-tools"])
def test_open_nvidia_device_files_block(fd):
    reasons = find_cuda_blockers([CudaProcView(42, fds=("/dev/null", fd))])
    assert len(reasons) == 1
    assert f"pid 42 has {fd} open" in reasons[0] and "@enter()" in reasons[0]


def test_mapped_device_memory_blocks():
    reasons = find_cuda_blockers([CudaProcView(7, maps=("/dev/nvidia0", "/dev/nvidiactl"))])
    assert reasons == ["pid 7 maps /dev/nvidia0: GPU memory or driver state is mapped",
                       "pid 7 maps /dev/nvidiactl: GPU memory or driver state is mapped"]


@pytest.mark.parametrize("path,why", [
    ("/usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06", "cuInit"),
    ("/usr/local/nvidia/lib64/libcuda.so.1", "cuInit"),
    ("/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1", "NVML"),
    ("/usr/lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.580.65.06", "JIT"),
])
def test_mapped_driver_libraries_block(path, why):
    (reason,) = find_cuda_blockers([CudaProcView(3, maps=(path,))])
    assert reason.startswith(f"pid 3 has {path.rsplit('/', 1)[1]} mapped") and why in reason


def test_look_alike_libraries_do_not_block():
    p = CudaProcView(3, maps=("/opt/venv/lib/libcudart.so.12", "/x/libcuda_stub_helper.so",
                              "/x/libtorch_cuda.so", "/x/libcudnn.so.9"))
    assert find_cuda_blockers([p]) == []
    notes = cuda_notes([p])
    assert any("libcudart.so.12" in n for n in notes)
    assert any("libtorch_cuda.so" in n for n in notes)


def test_cuda_helper_threads_block():
    (reason,) = find_cuda_blockers([CudaProcView(5, threads=("python3", "cuda-EvtHandlr",
                                                             "cuda00001400006"))])
    assert "cuda-EvtHandlr" in reason


def test_a_torch_process_after_is_available_is_named_with_every_cause():
    # what a process looks like after `import torch; torch.cuda.is_available()`
    p = CudaProcView(99, fds=("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0"),
                     maps=("/usr/local/nvidia/lib64/libcuda.so.1", "/dev/nvidiactl",
                           "/venv/torch/lib/libtorch_cuda.so"),
                     threads=("python", "cuda-EvtHandlr"))
    reasons = find_cuda_blockers([p, p])
    assert len(reasons) == len(set(reasons)) == 6        # 3 fds, 1 map, 1 lib, 1 thread
    assert all(r.startswith("pid 99 ") for r in reasons)


def test_cuda_pids_are_the_ones_with_device_files_open():
    views = [CudaProcView(1, fds=("/dev/null",), maps=("/lib/libcuda.so.1",)),
             CudaProcView(2, fds=("/dev/nvidiactl", "/dev/nvidia0")),
             CudaProcView(3, fds=("/dev/nvidia-uvm",))]
    assert cuda_pids(views) == [2, 3]


def test_after_cuda_checkpoint_only_live_device_files_block():
    suspended = CudaProcView(8, maps=("/usr/lib/libcuda.so.1",), threads=("cuda-EvtHandlr",))
    assert find_cuda_blockers([suspended], cuda_suspended=True) == []
    still = CudaProcView(8, fds=("/dev/nvidia0",), maps=("/usr/lib/libcuda.so.1",))
    (reason,) = find_cuda_blockers([still], cuda_suspended=True)
    assert "did not release" in reason


def test_initial_cuda_visible_devices_is_a_note_not_a_blocker():
    p = CudaProcView(4, environ=(("CUDA_VISIBLE_DEVICES", "0"),))
    assert find_cuda_blockers([p]) == []
    assert cuda_notes([p]) == ["pid 4 started with CUDA_VISIBLE_DEVICES=0 (the agent sets it "
                               "again after restore, before CUDA initializes)"]


def test_it_accepts_snapshot_guard_proc_views():
    views = [ProcView(1, fds=("/dev/nvidiactl",), maps=("/lib/libcuda.so.1",))]
    assert len(find_cuda_blockers(views)) == 2
    assert cuda_blockers(views[0])[0].startswith("pid 1 has /dev/nvidiactl open")


def test_user_guide_says_what_to_do():
    for phrase in ("@enter(snap=True)", "@enter()", "CUDA_VISIBLE_DEVICES", "torch.cuda"):
        assert phrase in USER_GUIDE


_CHILD = textwrap.dedent("""
    import ctypes, mmap, os, sys, threading
    path = sys.argv[1]
    f = open(path, "rb")
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    f.close()                          # the mapping stays, the fd goes
    ready = threading.Event()
    def worker():
        ctypes.CDLL(None).prctl(15, b"cuda-EvtHandlr", 0, 0, 0)   # PR_SET_NAME
        ready.set()
        threading.Event().wait()
    threading.Thread(target=worker, daemon=True).start()
    ready.wait()
    print("ready", flush=True)
    sys.stdin.readline()
""")


def test_inspecting_a_real_process_finds_a_mapped_libcuda(tmp_path):
    lib = tmp_path / "libcuda.so.1"
    lib.write_bytes(b"\0" * 4096)
    env = {"CUDA_VISIBLE_DEVICES": "GPU-1234", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(lib)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        (view,) = inspect_cuda([proc.pid])
        assert str(lib) in view.maps and "cuda-EvtHandlr" in view.threads
        assert ("CUDA_VISIBLE_DEVICES", "GPU-1234") in view.environ
        reasons = find_cuda_blockers([view])
        assert any(r.startswith(f"pid {proc.pid} has libcuda.so.1 mapped: CUDA was "
                                "initialized (cuInit) before the snapshot point")
                   for r in reasons), reasons
        assert any("cuda-EvtHandlr" in r for r in reasons)
        assert not any("open" in r for r in reasons)        # no /dev/nvidia* fd
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    assert inspect_cuda([proc.pid]) == []                   # gone pids are skipped


def test_inspecting_a_plain_python_process_finds_nothing():
    # a fresh process: this test process may have loaded libnvidia-ml on a GPU machine
    proc = subprocess.Popen([sys.executable, "-c", "import sys; print(1, flush=True); "
                             "sys.stdin.readline()"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        (view,) = inspect_cuda([proc.pid])
        assert view.fds and view.maps and view.threads
        assert find_cuda_blockers([view]) == []
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
