"""A fake NVML at the nvidia-ml-py boundary, for tests and for nodes without GPUs.

`FakeNvml` answers the pynvml functions `inventory` calls, with pynvml's constants and
error codes, from a plain description of a node. Presets model real machines:

    h100_sxm_8x()          8x H100 80GB HBM3 behind NVSwitch (NVLink all-to-all)
    a100_80gb_4x_pairs()   4x A100-SXM4-80GB, NVLink only within pairs (0-1, 2-3)
    a10g_1x()              1x A10G 24 GB, no NVLink
    h100_pcie_2x_one_mig() 2x H100 PCIe, GPU 1 in MIG mode
    no_gpu()               driver loaded, zero GPUs
    no_driver()            libnvidia-ml.so.1 missing (nvmlInit fails)

    inv = read_inventory(h100_sxm_8x(used_mib={0: 40_000}))
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from types import SimpleNamespace


class FakeNVMLError(Exception):
    """Like pynvml.NVMLError: carries the NVML return code in `value`."""

    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _ERROR_TEXT.get(self.value, f"NVML error {self.value}")


NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
_ERROR_TEXT = {1: "Uninitialized", 2: "Invalid Argument", 3: "Not Supported",
               9: "Driver Not Loaded", 12: "NVML Shared Library Not Found",
               15: "GPU is lost"}


@dataclass(frozen=True)
class FakeGpu:
    name: str
    memory_total_mib: int
    memory_used_mib: int = 0
    mig: bool = False
    compute_capability: tuple[int, int] = (9, 0)
    nvlink_slots: int = 0            # link slots NVML reports; 0 = NVLink not supported
    switch_links: int = 0            # links that go to an NVSwitch
    lost: bool = False               # every per-device call fails with GPU_IS_LOST


@dataclass
class FakeNvml:
    """pynvml look-alike. `nvlinks[(a, b)] = n`: n direct links between GPUs a and b.
    `numa[i]`: the socket of GPU i (pairs on one socket are NODE, across are SYS)."""

    gpus: list[FakeGpu] = field(default_factory=list)
    driver_version: str = "580.65.06"
    cuda_version: int = 13000
    nvlinks: dict[tuple[int, int], int] = field(default_factory=dict)
    numa: dict[int, int] = field(default_factory=dict)
    init_error: int | None = None
    calls: collections.Counter = field(default_factory=collections.Counter)
    initialized: int = 0

    NVMLError = FakeNVMLError
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_NVLINK_MAX_LINKS = 36
    NVML_NVLINK_DEVICE_TYPE_GPU = 0x00
    NVML_NVLINK_DEVICE_TYPE_SWITCH = 0x02
    NVML_P2P_CAPS_INDEX_NVLINK = 2
    NVML_P2P_STATUS_OK = 0
    NVML_P2P_STATUS_NOT_SUPPORTED = 5
    NVML_DEVICE_MIG_ENABLE = 1

    # -- library -----------------------------------------------------------------------------
    def _count(self, name: str) -> None:
        self.calls[name] += 1
        if name not in ("nvmlInit", "nvmlShutdown") and self.initialized <= 0:
            raise FakeNVMLError(NVML_ERROR_UNINITIALIZED)

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self._count("nvmlShutdown")
        self.initialized = max(0, self.initialized - 1)

    def nvmlSystemGetDriverVersion(self) -> str:
        self._count("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        self._count("nvmlSystemGetCudaDriverVersion_v2")
        return self.cuda_version

    def nvmlDeviceGetCount(self) -> int:
        self._count("nvmlDeviceGetCount")
        return len(self.gpus)

    # -- devices -----------------------------------------------------------------------------
    def _gpu(self, h: int, name: str) -> FakeGpu:
        self._count(name)
        if not isinstance(h, int) or not 0 <= h < len(self.gpus):
            raise FakeNVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if self.gpus[h].lost:
            raise FakeNVMLError(NVML_ERROR_GPU_IS_LOST)
        return self.gpus[h]

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._gpu(index, "nvmlDeviceGetHandleByIndex")
        return index

    def nvmlDeviceGetUUID(self, h: int) -> str:
        self._gpu(h, "nvmlDeviceGetUUID")
        return f"GPU-{h:08x}-fake-4000-8000-{h:012x}"

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self._gpu(h, "nvmlDeviceGetName").name.encode()   # older pynvml: bytes

    def nvmlDeviceGetMinorNumber(self, h: int) -> int:
        self._gpu(h, "nvmlDeviceGetMinorNumber")
        return h

    def nvmlDeviceGetPciInfo(self, h: int) -> SimpleNamespace:
        self._gpu(h, "nvmlDeviceGetPciInfo")
        return SimpleNamespace(busId=self._bus(h).encode())

    @staticmethod
    def _bus(h: int) -> str:
        return f"00000000:{0x18 + 0x10 * h:02X}:00.0"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        g = self._gpu(h, "nvmlDeviceGetMemoryInfo")
        mib = 1024 * 1024
        return SimpleNamespace(total=g.memory_total_mib * mib, used=g.memory_used_mib * mib,
                               free=(g.memory_total_mib - g.memory_used_mib) * mib)

    def nvmlDeviceGetMigMode(self, h: int) -> list[int]:
        g = self._gpu(h, "nvmlDeviceGetMigMode")
        if g.compute_capability < (8, 0):
            raise FakeNVMLError(NVML_ERROR_NOT_SUPPORTED)
        return [int(g.mig), int(g.mig)]

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return self._gpu(h, "nvmlDeviceGetCudaComputeCapability").compute_capability

    # -- NVLink and topology -----------------------------------------------------------------
    def _link_ends(self, h: int) -> list[tuple[int, int]]:
        """(remote type, remote GPU) per link slot, in order: direct links, then switch."""
        ends = []
        for (a, b), n in sorted(self.nvlinks.items()):
            if h in (a, b):
                ends += [(self.NVML_NVLINK_DEVICE_TYPE_GPU, b if h == a else a)] * n
        ends += [(self.NVML_NVLINK_DEVICE_TYPE_SWITCH, -1)] * self.gpus[h].switch_links
        return ends

    def _slot(self, h: int, link: int, name: str) -> tuple[int, int] | None:
        g = self._gpu(h, name)
        if not g.nvlink_slots:
            raise FakeNVMLError(NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= link < g.nvlink_slots:
            raise FakeNVMLError(NVML_ERROR_INVALID_ARGUMENT)
        ends = self._link_ends(h)
        return ends[link] if link < len(ends) else None

    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        return int(self._slot(h, link, "nvmlDeviceGetNvLinkState") is not None)

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, h: int, link: int) -> int:
        end = self._slot(h, link, "nvmlDeviceGetNvLinkRemoteDeviceType")
        if end is None:
            raise FakeNVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return end[0]

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: int, link: int) -> SimpleNamespace:
        end = self._slot(h, link, "nvmlDeviceGetNvLinkRemotePciInfo")
        if end is None or end[1] < 0:
            raise FakeNVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return SimpleNamespace(busId=self._bus(end[1]).lower().encode())

    def nvmlDeviceGetP2PStatus(self, h1: int, h2: int, index: int) -> int:
        a, b = self._gpu(h1, "nvmlDeviceGetP2PStatus"), self._gpu(h2, "nvmlDeviceGetP2PStatus")
        if index != self.NVML_P2P_CAPS_INDEX_NVLINK:
            return self.NVML_P2P_STATUS_OK
        linked = self.nvlinks.get((min(h1, h2), max(h1, h2)), 0) > 0 or (
            a.switch_links > 0 and b.switch_links > 0)
        return self.NVML_P2P_STATUS_OK if linked else self.NVML_P2P_STATUS_NOT_SUPPORTED

    def nvmlDeviceGetTopologyCommonAncestor(self, h1: int, h2: int) -> int:
        self._gpu(h1, "nvmlDeviceGetTopologyCommonAncestor")
        self._gpu(h2, "nvmlDeviceGetTopologyCommonAncestor")
        return 40 if self.numa.get(h1, 0) == self.numa.get(h2, 0) else 50   # NODE / SYS


# -- presets -------------------------------------------------------------------------------------
def _used(n: int, used_mib: dict[int, int] | None, default: int) -> list[int]:
    return [(used_mib or {}).get(i, default) for i in range(n)]


def h100_sxm_8x(used_mib: dict[int, int] | None = None) -> FakeNvml:
    used = _used(8, used_mib, 0)
    return FakeNvml(gpus=[FakeGpu("NVIDIA H100 80GB HBM3", 81559, used[i], nvlink_slots=18,
                                  switch_links=18) for i in range(8)],
                    numa={i: i // 4 for i in range(8)})


def a100_80gb_4x_pairs(used_mib: dict[int, int] | None = None) -> FakeNvml:
    used = _used(4, used_mib, 0)
    return FakeNvml(gpus=[FakeGpu("NVIDIA A100-SXM4-80GB", 81920, used[i],
                                  compute_capability=(8, 0), nvlink_slots=12) for i in range(4)],
                    driver_version="570.124.06", cuda_version=12080,
                    nvlinks={(0, 1): 12, (2, 3): 12}, numa={0: 0, 1: 0, 2: 1, 3: 1})


def a10g_1x(used_mib: dict[int, int] | None = None) -> FakeNvml:
    return FakeNvml(gpus=[FakeGpu("NVIDIA A10G", 23028, _used(1, used_mib, 0)[0],
                                  compute_capability=(8, 6))],
                    driver_version="550.90.07", cuda_version=12040)


def h100_pcie_2x_one_mig() -> FakeNvml:
    return FakeNvml(gpus=[FakeGpu("NVIDIA H100 PCIe", 81559), FakeGpu("NVIDIA H100 PCIe", 81559,
                                                                       mig=True)])


def no_gpu() -> FakeNvml:
    return FakeNvml(gpus=[])


def no_driver() -> FakeNvml:
    return FakeNvml(init_error=NVML_ERROR_LIBRARY_NOT_FOUND)


PRESETS = {"h100_sxm_8x": h100_sxm_8x, "a100_80gb_4x_pairs": a100_80gb_4x_pairs,
           "a10g_1x": a10g_1x, "h100_pcie_2x_one_mig": h100_pcie_2x_one_mig,
           "no_gpu": no_gpu, "no_driver": no_driver}
