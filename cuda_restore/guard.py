"""Was CUDA touched before the snapshot point? The checks, pure over /proc-style views.

    inspect_cuda(pids) -> [CudaProcView]          reads /proc (fds, maps, thread names, environ)
    find_cuda_blockers(views) -> [reason, ...]    empty: safe to checkpoint without a GPU
    cuda_pids(views) -> [pid, ...]                who has a /dev/nvidia* file open
    cuda_context_pids(views) -> [pid, ...]        who shows any sign of a CUDA context (the
                                                  processes cuda-checkpoint must suspend)
    cuda_notes(views) -> [note, ...]              harmless observations worth logging

What gives CUDA away, most certain first:
1. An open /dev/nvidia* fd (nvidiactl, nvidia-uvm, nvidia<N>): a CUDA context or an NVML
   session is live. CRIU cannot dump these.
2. A mapping of /dev/nvidia*: GPU memory or driver state is mapped into the process.
3. A mapped driver library: libcuda.so.* (cuInit ran: torch.cuda.is_available(),
   torch.cuda.device_count(), tensor.cuda(), ...), libnvidia-ml.so.* (NVML was
   initialized), libnvidia-ptxjitcompiler.so.* (a kernel was JIT-compiled). Driver
   libraries come from the host and match its driver version; once loaded, CUDA has also
   already read CUDA_VISIBLE_DEVICES, so the GPU binding is fixed before the agent could
   set it after restore.
4. CUDA's helper threads ('cuda-EvtHandlr', 'cuda0000…' names): a context exists.
Not blockers (see cuda_notes): libcudart/libtorch_cuda/libcublas mapped (user-space CUDA
libraries loaded by `import torch`; they touch no GPU until first use), and
CUDA_VISIBLE_DEVICES in the initial environment (the agent sets it again after restore).

Other ways CUDA gets consumed early that only show up as the above: NCCL/TensorRT init,
`torch.cuda.get_device_name()`, `torch.backends.cudnn` queries, `jax.devices()`,
`cupy.cuda.runtime.getDeviceCount()`, and `import tensorflow` (it probes GPUs on import).

`find_cuda_blockers` also accepts snapshot.guard.ProcView (anything with pid, fds, maps).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

# Host driver libraries (they follow the kernel module's version). A process that mapped
# one has used the driver.
DRIVER_LIBRARIES = {
    "libcuda.so": "CUDA was initialized (cuInit) before the snapshot point (no GPU is "
                  "visible there, so frameworks would cache 'no CUDA' and stay on the CPU "
                  "after restore)",
    "libnvidia-ml.so": "NVML was initialized (pynvml.nvmlInit, or torch's NVML-based "
                       "device checks) before the snapshot point",
    "libnvidia-ptxjitcompiler.so": "a CUDA kernel was JIT-compiled before the snapshot point",
    "libnvidia-nvvm.so": "CUDA's NVVM compiler was loaded before the snapshot point",
    "libnvidia-gpucomp.so": "CUDA's GPU compiler was loaded before the snapshot point",
    "libcudadebugger.so": "the CUDA debugger library was loaded before the snapshot point",
}
# User-space CUDA libraries from the image: loading them is harmless.
USER_CUDA_LIBRARIES = ("libcudart.so", "libtorch_cuda.so", "libcublas.so", "libcudnn.so",
                       "libnccl.so", "libc10_cuda.so")
CUDA_THREAD_PREFIXES = ("cuda-EvtHandlr", "cuda0", "cuda-")

USER_GUIDE = """\
GPU functions and snapshots

runtimed snapshots a container before CUDA initializes, and gives it its GPU after every
restore. So:
- Do not touch CUDA at import time or in @enter(snap=True): no torch.cuda.is_available(),
  torch.cuda.device_count(), .cuda()/.to("cuda"), torch.zeros(..., device="cuda"),
  no pynvml/nvidia-smi calls. Load weights to CPU memory there (the snapshot keeps them).
- Move the model to the GPU in @enter() (no snap): it runs after the restore, with the
  container's GPU assigned.
- CUDA_VISIBLE_DEVICES (GPU UUIDs) is set by the agent before your @enter() runs; do not
  set it yourself, and do not rely on GPU indices from before the snapshot.

    @app.cls(gpu="A100-80GB", enable_memory_snapshot=True)
    class Model:
        @enter(snap=True)
        def load(self):
            self.model = load_weights(device="cpu")     # in the snapshot
        @enter()
        def to_gpu(self):
            self.model = self.model.to("cuda")          # after every restore

If the snapshot is refused, the error names the cause (an open /dev/nvidia* file, a
mapped libcuda.so, CUDA's helper threads) and the process that has it.
"""


class ProcLike(Protocol):
    pid: int
    fds: tuple[str, ...]
    maps: tuple[str, ...]


@dataclass(frozen=True)
class CudaProcView:
    """What the guard needs to know about one process."""

    pid: int
    fds: tuple[str, ...] = ()            # readlink of /proc/pid/fd/*
    maps: tuple[str, ...] = ()           # mapped paths from /proc/pid/maps
    threads: tuple[str, ...] = ()        # /proc/pid/task/*/comm
    environ: tuple[tuple[str, str], ...] = ()   # the initial environment (/proc/pid/environ)


def _driver_lib(path: str) -> str | None:
    base = os.path.basename(path)
    for prefix in DRIVER_LIBRARIES:
        if base == prefix or base.startswith(prefix + "."):
            return prefix
    return None


def cuda_blockers(p: ProcLike, *, cuda_suspended: bool = False) -> list[str]:
    """Reasons one process must not be checkpointed as-is. With `cuda_suspended` (the
    process went through cuda-checkpoint), loaded driver libraries and CUDA threads are
    expected; only live device files still block (the suspend did not release them)."""
    out = []
    for fd in p.fds:
        if fd.startswith("/dev/nvidia"):
            out.append(f"pid {p.pid} has {fd} open: a CUDA context or NVML session is live "
                       "(initialize CUDA in @enter(), not at import or in @enter(snap=True))"
                       + ("; cuda-checkpoint did not release it" if cuda_suspended else ""))
    for m in p.maps:
        if m.startswith("/dev/nvidia"):
            out.append(f"pid {p.pid} maps {m}: GPU memory or driver state is mapped")
    if not cuda_suspended:
        seen = set()
        for m in p.maps:
            lib = _driver_lib(m)
            if lib and lib not in seen:
                seen.add(lib)
                out.append(f"pid {p.pid} has {os.path.basename(m)} mapped: "
                           f"{DRIVER_LIBRARIES[lib]}")
        for t in getattr(p, "threads", ()):
            if t.startswith(CUDA_THREAD_PREFIXES):
                out.append(f"pid {p.pid} runs CUDA's thread {t!r}: a CUDA context exists")
                break
    return out


def find_cuda_blockers(procs: Iterable[ProcLike], *, cuda_suspended: bool = False) -> list[str]:
    """Every reason, over a process tree, sorted and without duplicates (empty: fine)."""
    return sorted({r for p in procs for r in cuda_blockers(p, cuda_suspended=cuda_suspended)})


def cuda_pids(procs: Iterable[ProcLike]) -> list[int]:
    """Processes holding a live CUDA context or NVML session (an open /dev/nvidia* fd):
    the ones cuda-checkpoint must suspend before CRIU dumps the tree."""
    return sorted({p.pid for p in procs if any(fd.startswith("/dev/nvidia") for fd in p.fds)})


def _has_cuda_context(p: ProcLike) -> bool:
    if any(fd.startswith("/dev/nvidia") for fd in p.fds):
        return True
    if any(_driver_lib(m) == "libcuda.so" for m in p.maps):
        return True
    return any(t.startswith(CUDA_THREAD_PREFIXES) for t in getattr(p, "threads", ()))


def cuda_context_pids(procs: Iterable[ProcLike]) -> list[int]:
    """Processes that show a CUDA context: a /dev/nvidia* file open, libcuda.so mapped
    (cuInit ran) or CUDA's helper threads. These are suspended with cuda-checkpoint before
    a dump; one that only initialized NVML has no CUDA context to suspend (cuda-checkpoint
    fails on it, and the guard still refuses its open device file)."""
    return sorted({p.pid for p in procs if _has_cuda_context(p)})


def cuda_notes(procs: Iterable[ProcLike]) -> list[str]:
    """Harmless facts worth a log line (not blockers)."""
    out = set()
    for p in procs:
        for m in p.maps:
            base = os.path.basename(m)
            if any(base == lib or base.startswith(lib + ".") for lib in USER_CUDA_LIBRARIES):
                out.add(f"pid {p.pid} has {base} loaded (CUDA user-space library; fine "
                        "until first GPU use)")
        for k, v in getattr(p, "environ", ()):
            if k in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
                out.add(f"pid {p.pid} started with {k}={v} (the agent sets it again after "
                        "restore, before CUDA initializes)")
    return sorted(out)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def inspect_cuda(pids: Iterable[int], proc_root: str = "/proc") -> list[CudaProcView]:
    """Read what the guard needs from /proc for each pid (gone pids are skipped)."""
    views = []
    for pid in pids:
        base = f"{proc_root}/{pid}"
        try:
            names = os.listdir(f"{base}/fd")
        except OSError:
            continue
        fds = []
        for fd in names:
            try:
                fds.append(os.readlink(f"{base}/fd/{fd}"))
            except OSError:
                pass
        maps = set()
        raw = _read(f"{base}/maps") or b""
        for ln in raw.decode(errors="replace").splitlines():
            parts = ln.split(maxsplit=5)
            if len(parts) == 6:
                maps.add(parts[5].strip())
        threads = []
        try:
            for tid in sorted(os.listdir(f"{base}/task")):
                comm = _read(f"{base}/task/{tid}/comm")
                if comm is not None:
                    threads.append(comm.decode(errors="replace").strip())
        except OSError:
            pass
        env = []
        for item in (_read(f"{base}/environ") or b"").split(b"\0"):
            k, sep, v = item.decode(errors="replace").partition("=")
            if sep and ("CUDA" in k or "NVIDIA" in k):
                env.append((k, v))
        views.append(CudaProcView(pid, tuple(fds), tuple(sorted(maps)), tuple(threads),
                                  tuple(env)))
    return views
