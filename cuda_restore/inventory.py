"""GPU inventory of one node, read through NVML (nvidia-ml-py), as typed wire data.

    read_inventory(nvml=None) -> NodeGpuInventory    one read (init, read, shutdown)
    GpuProbe(nvml=None).read()                        the node daemon's reader: keeps NVML
                                                      open, reads topology once
    NodeGpuInventory.to_wire() / from_wire(d)         the `gpu` field of register/heartbeat

Contract: reading never raises. A node without the NVIDIA driver, without libnvidia-ml,
or without GPUs reports an empty inventory whose `note` says why. A GPU that fails to
answer is left out and named in `note`.

`nvml` is anything with pynvml's function names and constants (the `pynvml` module
itself, or `cuda_restore.fake_nvml.FakeNvml` in tests): the boundary is NVML's API.
"""
from __future__ import annotations

import itertools
import re
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .errors import GpuInventoryError

WIRE_VERSION = 1

# Known GPU families and the memory variants (GB, as marketed) each comes in. Requests
# are validated against this table; an unknown family on a node still works (its name's
# first model-like token is its family) but cannot be requested by a typo.
KNOWN_GPU_TYPES: dict[str, tuple[int, ...]] = {
    "T4": (16,), "L4": (24,), "A10": (24,), "A10G": (24,), "A100": (40, 80),
    "L40": (48,), "L40S": (48,), "H100": (80, 94), "H200": (141,), "GH200": (96, 144),
    "B200": (180, 192),
}

# nvidia-smi topo's names for NVML_TOPOLOGY_* (0 internal ... 50 system): closer is smaller.
TOPOLOGY_LEVELS = {0: "SELF", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}
_LEVEL_RANK = {"SELF": 0, "PIX": 1, "PXB": 2, "PHB": 3, "NODE": 4, "SYS": 5, "?": 6}


def gpu_family(name: str) -> str:
    """'NVIDIA A100-SXM4-80GB' -> 'A100'; 'Tesla T4' -> 'T4'; 'NVIDIA H100 80GB HBM3' -> 'H100'."""
    tokens = [t for t in re.split(r"[\s\-_/]+", name.upper()) if t]
    for t in tokens:
        if t in KNOWN_GPU_TYPES:
            return t
    for t in tokens:
        brand = t in ("NVIDIA", "TESLA", "GEFORCE", "RTX", "QUADRO")
        if not brand and any(c.isdigit() for c in t) and not re.fullmatch(r"\d+GB", t):
            return t
    return tokens[-1] if tokens else "UNKNOWN"


def gpu_memory_gb(name: str, total_mib: int) -> int:
    """The marketed memory size in GB: from the name ('80GB') if it says, else the total
    rounded to the nearest known variant of its family (an H100 reports 79.6 GiB)."""
    m = re.search(r"(\d+)\s*GB", name.upper())
    if m:
        return int(m.group(1))
    gib = total_mib / 1024
    variants = KNOWN_GPU_TYPES.get(gpu_family(name), ())
    best = min(variants, key=lambda v: abs(v - gib), default=None)
    if best is not None and abs(best - gib) <= 0.12 * best:
        return best
    return max(1, round(gib))


@dataclass(frozen=True)
class GpuInfo:
    """One GPU. Memory in MiB as NVML reports it (used includes driver-reserved memory)."""

    index: int                       # NVML index (PCI bus order)
    uuid: str                        # 'GPU-…': what CUDA_VISIBLE_DEVICES should name
    name: str
    memory_total_mib: int
    memory_used_mib: int = 0
    memory_free_mib: int = 0
    minor: int = -1                  # /dev/nvidia<minor>; -1: unknown (use index)
    pci_bus_id: str = ""
    mig_enabled: bool = False        # a MIG GPU is never handed out whole
    compute_capability: tuple[int, int] | None = None

    @property
    def family(self) -> str:
        return gpu_family(self.name)

    @property
    def memory_gb(self) -> int:
        return gpu_memory_gb(self.name, self.memory_total_mib)

    @property
    def type_label(self) -> str:
        """'H100-80GB': family and memory variant, the form requests use."""
        return f"{self.family}-{self.memory_gb}GB"

    @property
    def device_minor(self) -> int:
        return self.minor if self.minor >= 0 else self.index


@dataclass(frozen=True)
class GpuLink:
    """How two GPUs (a < b) are connected: NVLink (direct or through NVSwitch, with the
    number of links) or only PCIe, at a topology level (PIX … SYS, as in nvidia-smi topo)."""

    a: int
    b: int
    nvlink: bool = False
    nvlinks: int = 0
    level: str = "?"


@dataclass(frozen=True)
class NodeGpuInventory:
    driver_version: str = ""         # '580.65.06'; '' without a driver
    cuda_version: str = ""           # the driver's CUDA version, '12.8'
    gpus: tuple[GpuInfo, ...] = ()
    links: tuple[GpuLink, ...] = ()
    note: str = ""                   # why it is empty or partial

    @staticmethod
    def empty(note: str) -> NodeGpuInventory:
        return NodeGpuInventory(note=note)

    def gpu(self, index: int) -> GpuInfo:
        for g in self.gpus:
            if g.index == index:
                return g
        raise KeyError(f"no GPU {index} on this node")

    @cached_property
    def topology_key(self) -> int:
        """Equal for equal topologies (a cache key; not stable across processes)."""
        return hash(self.links)

    @cached_property
    def _links_by_pair(self) -> dict[tuple[int, int], GpuLink]:
        return {(lk.a, lk.b): lk for lk in self.links}

    def link(self, a: int, b: int) -> GpuLink:
        """How GPUs a and b connect (either order); unknown pairs: no NVLink, level '?'."""
        a, b = min(a, b), max(a, b)
        return self._links_by_pair.get((a, b)) or GpuLink(a, b)

    @cached_property
    def _peers(self) -> dict[int, tuple[int, ...]]:
        peers: dict[int, list[int]] = {}
        for lk in self.links:
            if lk.nvlink:
                peers.setdefault(lk.a, []).append(lk.b)
                peers.setdefault(lk.b, []).append(lk.a)
        return {k: tuple(sorted(v)) for k, v in peers.items()}

    def nvlink_peers(self, index: int) -> tuple[int, ...]:
        return self._peers.get(index, ())

    @property
    def driver_major(self) -> int | None:
        m = re.match(r"(\d+)", self.driver_version)
        return int(m.group(1)) if m else None

    def summary(self) -> str:
        """'8x H100-80GB' or '2x A100-80GB, 1x T4' or 'no GPU (why)'."""
        if not self.gpus:
            return f"no GPU ({self.note})" if self.note else "no GPU"
        counts: dict[str, int] = {}
        for g in self.gpus:
            label = g.type_label + (" (MIG)" if g.mig_enabled else "")
            counts[label] = counts.get(label, 0) + 1
        return ", ".join(f"{n}x {label}" for label, n in counts.items())

    # -- wire ------------------------------------------------------------------------------
    def to_wire(self) -> dict:
        return {
            "version": WIRE_VERSION, "driver_version": self.driver_version,
            "cuda_version": self.cuda_version, "note": self.note,
            "gpus": [{"index": g.index, "uuid": g.uuid, "name": g.name,
                      "memory_total_mib": g.memory_total_mib,
                      "memory_used_mib": g.memory_used_mib,
                      "memory_free_mib": g.memory_free_mib, "minor": g.minor,
                      "pci_bus_id": g.pci_bus_id, "mig_enabled": g.mig_enabled,
                      "compute_capability": list(g.compute_capability)
                      if g.compute_capability else None} for g in self.gpus],
            "links": [{"a": lk.a, "b": lk.b, "nvlink": lk.nvlink, "nvlinks": lk.nvlinks,
                       "level": lk.level} for lk in self.links],
        }

    @staticmethod
    def from_wire(d: Any) -> NodeGpuInventory:
        """Parse and validate; raises GpuInventoryError naming the first bad field.
        None or {} (an old node that sends nothing) is an empty inventory."""
        if not d:
            return NodeGpuInventory.empty("the node reported no GPU inventory")
        if not isinstance(d, dict):
            raise GpuInventoryError("gpu inventory must be an object")
        if d.get("version", WIRE_VERSION) != WIRE_VERSION:
            raise GpuInventoryError(f"gpu inventory version {d.get('version')!r} is not "
                                    f"{WIRE_VERSION}")
        try:
            gpus = tuple(GpuInfo(
                index=_int(g, "index"), uuid=_str(g, "uuid"), name=_str(g, "name"),
                memory_total_mib=_int(g, "memory_total_mib"),
                memory_used_mib=_int(g, "memory_used_mib", 0),
                memory_free_mib=_int(g, "memory_free_mib", 0), minor=_int(g, "minor", -1),
                pci_bus_id=_str(g, "pci_bus_id", ""), mig_enabled=bool(g.get("mig_enabled")),
                compute_capability=_cc(g.get("compute_capability")))
                for g in _list(d, "gpus"))
            links = tuple(GpuLink(_int(lk, "a"), _int(lk, "b"), bool(lk.get("nvlink")),
                                  _int(lk, "nvlinks", 0), _str(lk, "level", "?"))
                          for lk in _list(d, "links"))
        except (TypeError, AttributeError) as e:
            raise GpuInventoryError(f"malformed gpu inventory: {e}") from None
        indices = [g.index for g in gpus]
        if len(set(indices)) != len(indices) or any(i < 0 for i in indices):
            raise GpuInventoryError("gpu indices must be unique and >= 0")
        if any(g.memory_total_mib <= 0 for g in gpus):
            raise GpuInventoryError("gpu memory_total_mib must be > 0")
        if any(lk.a not in indices or lk.b not in indices or lk.a >= lk.b for lk in links):
            raise GpuInventoryError("gpu links must name two known GPUs, a < b")
        return NodeGpuInventory(_str(d, "driver_version", ""), _str(d, "cuda_version", ""),
                                gpus, links, _str(d, "note", ""))


def _int(d: dict, k: str, default: int | None = None) -> int:
    v = d.get(k, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise GpuInventoryError(f"gpu inventory field {k!r} must be an integer, not {v!r}")
    return v


def _str(d: dict, k: str, default: str | None = None) -> str:
    v = d.get(k, default)
    if not isinstance(v, str):
        raise GpuInventoryError(f"gpu inventory field {k!r} must be a string, not {v!r}")
    return v


def _list(d: dict, k: str) -> list:
    v = d.get(k, [])
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise GpuInventoryError(f"gpu inventory field {k!r} must be a list of objects")
    return v


def _cc(v: Any) -> tuple[int, int] | None:
    if v is None:
        return None
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return (v[0], v[1])
    raise GpuInventoryError(f"compute_capability must be [major, minor], not {v!r}")


# -- reading NVML -------------------------------------------------------------------------------
def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _bus(v: Any) -> str:
    return _text(getattr(v, "busId", v)).strip().lower()


def _cuda_version(nvml: Any) -> str:
    for fn in ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"):
        try:
            v = int(getattr(nvml, fn)())
        except Exception:  # noqa: BLE001 - older libraries lack _v2
            continue
        return f"{v // 1000}.{(v % 1000) // 10}"
    return ""


def _read_gpu(nvml: Any, index: int) -> tuple[GpuInfo, Any]:
    h = nvml.nvmlDeviceGetHandleByIndex(index)
    mem = nvml.nvmlDeviceGetMemoryInfo(h)
    mib = 1024 * 1024
    try:
        mig = int(nvml.nvmlDeviceGetMigMode(h)[0]) == int(nvml.NVML_DEVICE_MIG_ENABLE)
    except nvml.NVMLError:
        mig = False                 # NOT_SUPPORTED: pre-Ampere or consumer GPUs
    try:
        minor = int(nvml.nvmlDeviceGetMinorNumber(h))
    except nvml.NVMLError:
        minor = -1
    try:
        cc = tuple(int(x) for x in nvml.nvmlDeviceGetCudaComputeCapability(h))
        ccap: tuple[int, int] | None = (cc[0], cc[1])
    except nvml.NVMLError:
        ccap = None
    try:
        bus = _bus(nvml.nvmlDeviceGetPciInfo(h))
    except nvml.NVMLError:
        bus = ""
    return GpuInfo(index=index, uuid=_text(nvml.nvmlDeviceGetUUID(h)),
                   name=_text(nvml.nvmlDeviceGetName(h)),
                   memory_total_mib=int(mem.total) // mib, memory_used_mib=int(mem.used) // mib,
                   memory_free_mib=int(mem.free) // mib, minor=minor, pci_bus_id=bus,
                   mig_enabled=mig, compute_capability=ccap), h


def _nvlink_ends(nvml: Any, h: Any) -> list[tuple[str, str]]:
    """('gpu', remote bus id) or ('switch', '') for each active NVLink of one GPU."""
    ends = []
    for link in range(int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))):
        try:
            if not nvml.nvmlDeviceGetNvLinkState(h, link):
                continue
        except nvml.NVMLError:
            break                   # NOT_SUPPORTED (no NVLink) or past the last link
        try:
            kind = nvml.nvmlDeviceGetNvLinkRemoteDeviceType(h, link)
        except nvml.NVMLError:
            kind = nvml.NVML_NVLINK_DEVICE_TYPE_GPU
        if kind == nvml.NVML_NVLINK_DEVICE_TYPE_SWITCH:
            ends.append(("switch", ""))
        else:
            try:
                ends.append(("gpu", _bus(nvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link))))
            except nvml.NVMLError:
                continue
    return ends


def _read_links(nvml: Any, gpus: list[tuple[GpuInfo, Any]]) -> tuple[GpuLink, ...]:
    by_bus = {g.pci_bus_id: g.index for g, _ in gpus if g.pci_bus_id}
    direct: dict[tuple[int, int], int] = {}
    switch: dict[int, int] = {}
    for g, h in gpus:
        for kind, bus in _nvlink_ends(nvml, h):
            if kind == "switch":
                switch[g.index] = switch.get(g.index, 0) + 1
            elif bus in by_bus and by_bus[bus] != g.index:
                pair = (min(g.index, by_bus[bus]), max(g.index, by_bus[bus]))
                direct[pair] = direct.get(pair, 0) + 1
    links = []
    for (ga, ha), (gb, hb) in itertools.combinations(gpus, 2):
        pair = (min(ga.index, gb.index), max(ga.index, gb.index))
        # each direct link is seen from both ends
        n = direct.get(pair, 0) // 2 or direct.get(pair, 0)
        if not n and switch.get(ga.index) and switch.get(gb.index):
            n = min(switch[ga.index], switch[gb.index])
        try:
            p2p = nvml.nvmlDeviceGetP2PStatus(ha, hb, nvml.NVML_P2P_CAPS_INDEX_NVLINK)
            nvlink = p2p == nvml.NVML_P2P_STATUS_OK
        except nvml.NVMLError:
            nvlink = n > 0
        try:
            level = TOPOLOGY_LEVELS.get(int(nvml.nvmlDeviceGetTopologyCommonAncestor(ha, hb)), "?")
        except nvml.NVMLError:
            level = "?"
        links.append(GpuLink(pair[0], pair[1], nvlink, n if nvlink else 0, level))
    return tuple(links)


def _read(nvml: Any, topology: tuple[GpuLink, ...] | None,
          topology_key: tuple[str, ...] | None) -> NodeGpuInventory:
    driver = _text(nvml.nvmlSystemGetDriverVersion())
    cuda = _cuda_version(nvml)
    gpus: list[tuple[GpuInfo, Any]] = []
    bad = []
    for i in range(int(nvml.nvmlDeviceGetCount())):
        try:
            gpus.append(_read_gpu(nvml, i))
        except nvml.NVMLError as e:
            bad.append(f"GPU {i} did not answer ({e})")
    key = tuple(g.uuid for g, _ in gpus)
    links = topology if topology is not None and topology_key == key else _read_links(nvml, gpus)
    note = "; ".join(bad) if bad else ("" if gpus else "NVML reports no GPU")
    return NodeGpuInventory(driver, cuda, tuple(g for g, _ in gpus), links, note)


def _load_pynvml() -> Any:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def read_inventory(nvml: Any = None) -> NodeGpuInventory:
    """Init NVML, read everything, shut it down. Never raises (see the module contract)."""
    nvml = nvml if nvml is not None else _load_pynvml()
    if nvml is None:
        return NodeGpuInventory.empty("nvidia-ml-py is not installed")
    try:
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - NVMLError (no library, no driver) or OSError
        return NodeGpuInventory.empty(f"NVML unavailable: {e}")
    try:
        return _read(nvml, None, None)
    except Exception as e:  # noqa: BLE001 - a driver in a bad state must not stop the node
        return NodeGpuInventory.empty(f"NVML failed: {e}")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


@dataclass
class GpuProbe:
    """The node daemon's reader: NVML stays initialized between reads and the topology
    (static) is read once per set of GPUs; memory is fresh on every `read()`.

    Thread-safe (the daemon calls `read` from an executor). Never raises.
    """

    nvml: Any = None
    _inited: bool = field(default=False, init=False, repr=False)
    _topology: tuple[GpuLink, ...] | None = field(default=None, init=False, repr=False)
    _topology_key: tuple[str, ...] | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def read(self) -> NodeGpuInventory:
        with self._lock:
            if self.nvml is None:
                self.nvml = _load_pynvml()
                if self.nvml is None:
                    return NodeGpuInventory.empty("nvidia-ml-py is not installed")
            if not self._inited:
                try:
                    self.nvml.nvmlInit()
                except Exception as e:  # noqa: BLE001
                    return NodeGpuInventory.empty(f"NVML unavailable: {e}")
                self._inited = True
            try:
                inv = _read(self.nvml, self._topology, self._topology_key)
            except Exception as e:  # noqa: BLE001
                self._close_locked()    # re-init next time (driver reloaded, GPU reset)
                return NodeGpuInventory.empty(f"NVML failed: {e}")
            self._topology, self._topology_key = inv.links, tuple(g.uuid for g in inv.gpus)
            return inv

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._inited:
            try:
                self.nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
        self._inited = False
        self._topology = self._topology_key = None


def level_rank(level: str) -> int:
    """0 (same board) … 5 (across sockets), 6 unknown: for 'closer is better' ordering."""
    return _LEVEL_RANK.get(level, 6)
