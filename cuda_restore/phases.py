"""GPU phase timings inside the container: "cuda_init" and "weights_to_gpu" spans.

Standard library only: the agent dir (/.runtimed) can carry this file as is.

    from phases import gpu_phase, cuda_init, PHASES   # (module name as the agent ships it)
    cuda_init()                                  # cuInit + device count, timed as "cuda_init"
    with gpu_phase("weights_to_gpu"):
        model.to("cuda"); torch.cuda.synchronize()
    PHASES.items()   -> {"cuda_init": 812.4, "weights_to_gpu": 2310.9}   (ms)

Contract: spans are wall-clock ms rounded to 0.001; a span name recorded twice adds up
(e.g. several models moved to the GPU); a span whose body raises is still recorded.
"""
from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Iterator


class Phases:
    """Named durations in ms, in first-recorded order. Thread-safe."""

    def __init__(self) -> None:
        self._items: dict[str, float] = {}
        self._lock = threading.Lock()

    def record(self, name: str, ms: float) -> None:
        with self._lock:
            self._items[name] = round(self._items.get(name, 0.0) + ms, 3)

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, (time.perf_counter() - t0) * 1000)

    def items(self) -> dict[str, float]:
        with self._lock:
            return dict(self._items)

    def reset(self) -> dict[str, float]:
        """Return the spans so far and start over (after each restore)."""
        with self._lock:
            out, self._items = self._items, {}
            return out


PHASES = Phases()


def gpu_phase(name: str) -> contextlib.AbstractContextManager[None]:
    """`with gpu_phase("weights_to_gpu"): ...` records into PHASES."""
    return PHASES.span(name)


class CudaInitError(RuntimeError):
    pass


def cuda_init(lib: str = "libcuda.so.1", phases: Phases | None = None) -> int:
    """Initialize the CUDA driver (cuInit(0)) and count the visible devices, timed as
    "cuda_init". Returns the device count. Reads CUDA_VISIBLE_DEVICES as it is now, so
    call it after the agent applied the GPU assignment. Raises CudaInitError (with the
    CUresult) when the driver is missing or refuses."""
    p = phases if phases is not None else PHASES
    with p.span("cuda_init"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError as e:
            raise CudaInitError(f"cannot load {lib}: {e} (is the driver directory mounted "
                                "and on LD_LIBRARY_PATH?)") from None
        rc = cuda.cuInit(0)
        if rc != 0:
            raise CudaInitError(f"cuInit failed with CUresult {rc} (100: no device visible; "
                                "check CUDA_VISIBLE_DEVICES and the /dev/nvidia* nodes)")
        n = ctypes.c_int(0)
        rc = cuda.cuDeviceGetCount(ctypes.byref(n))
        if rc != 0:
            raise CudaInitError(f"cuDeviceGetCount failed with CUresult {rc}")
    return n.value
