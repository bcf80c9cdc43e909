"""Parse a function's `gpu=` option, as Modal spells it, into a typed GpuRequest.

    "H100"            one H100 (any memory variant)
    "a100-80gb:2"     two A100 80 GB on one node (case does not matter)
    "A100"            one A100, 40 GB or 80 GB
    "any", "any:4"    any GPU type
    "T4:4"            four T4
    "H100!"           Modal's "do not upgrade" mark: accepted (runtimed never upgrades)
    ["H100", "A100-80GB"]   a preference list: the first type that can run it wins
                            (all entries need the same count)

plus `memory_gib` (GPU memory the job needs on each GPU), `share` (the job may be packed
onto a GPU other shareable jobs use; needs `memory_gib`), and `priority` (higher may
preempt lower; see scheduler). Malformed values raise GpuRequestError (an InvalidError,
HTTP 400) whose message says what to write instead.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import GpuRequestError
from .inventory import KNOWN_GPU_TYPES, GpuInfo

MAX_GPUS_PER_REQUEST = 8          # the most GPUs one node has; jobs never span nodes

_SPEC = re.compile(r"^\s*(?P<family>[A-Za-z0-9]+?)(?:-(?P<mem>\d+)\s*GB)?(?P<bang>!)?"
                   r"(?::(?P<count>[^:]*))?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class GpuType:
    """A GPU family and, optionally, its memory variant. family None: any GPU."""

    family: str | None = None
    memory_gb: int | None = None

    def matches(self, gpu: GpuInfo) -> bool:
        """True if `gpu` is of this type. MIG-mode GPUs never match (not handed out whole)."""
        if gpu.mig_enabled:
            return False
        if self.family is not None and gpu.family != self.family:
            return False
        return self.memory_gb is None or gpu.memory_gb == self.memory_gb

    def __str__(self) -> str:
        if self.family is None:
            return "any"
        return f"{self.family}-{self.memory_gb}GB" if self.memory_gb else self.family


@dataclass(frozen=True)
class GpuRequest:
    """What one container needs: `count` GPUs of one of `types` (in preference order) on
    one node, each with `memory_mib` free (None: the whole GPU). `share`: the job may run
    on a GPU that other shareable jobs use; otherwise it gets idle GPUs to itself."""

    types: tuple[GpuType, ...] = (GpuType(),)
    count: int = 1
    memory_mib: int | None = None
    share: bool = False
    priority: int = 0

    @property
    def exclusive(self) -> bool:
        return not self.share

    def label(self) -> str:
        kinds = "|".join(str(t) for t in self.types)
        mem = f", {self.memory_mib / 1024:g} GiB each" if self.memory_mib else ""
        return f"{kinds}:{self.count}{mem}{', shared' if self.share else ''}"


def _usage(spec: Any) -> str:
    names = ", ".join(sorted(KNOWN_GPU_TYPES))
    return (f"gpu={spec!r} is not a GPU request: write a type ({names}, or 'any'), "
            "optionally with its memory ('A100-80GB') and a count ('H100:2')")


def _parse_one(spec: str) -> tuple[GpuType, int]:
    m = _SPEC.match(spec)
    if not m:
        raise GpuRequestError(_usage(spec))
    family = m.group("family").upper()
    count_s = m.group("count")
    if count_s is None:
        count = 1
    else:
        if not count_s.strip().isdigit():
            raise GpuRequestError(f"gpu={spec!r}: the count after ':' must be a whole number "
                                  f"1..{MAX_GPUS_PER_REQUEST}")
        count = int(count_s)
    if count < 1:
        raise GpuRequestError(f"gpu={spec!r}: the count must be at least 1")
    if count > MAX_GPUS_PER_REQUEST:
        raise GpuRequestError(f"gpu={spec!r}: {count} GPUs is more than one node has "
                              f"(at most {MAX_GPUS_PER_REQUEST}); jobs do not span nodes")
    mem = int(m.group("mem")) if m.group("mem") else None
    if family == "ANY":
        if mem is not None:
            raise GpuRequestError(f"gpu={spec!r}: 'any' takes no memory variant; pass "
                                  "memory_gib= to ask for GPU memory")
        return GpuType(), count
    if family not in KNOWN_GPU_TYPES:
        raise GpuRequestError(_usage(spec))
    variants = KNOWN_GPU_TYPES[family]
    if mem is not None and mem not in variants:
        sizes = " or ".join(f"{family}-{v}GB" for v in variants)
        raise GpuRequestError(f"gpu={spec!r}: {family} comes as {sizes}")
    return GpuType(family, mem), count


def parse_gpu_request(spec: Any, *, memory_gib: float | None = None, share: bool = False,
                      priority: int = 0) -> GpuRequest | None:
    """`spec` is the function's `gpu=` value: None/'' (no GPU: returns None), a string, a
    list of strings (preference order), or a GpuRequest (returned as is)."""
    if isinstance(spec, GpuRequest):
        return spec
    if spec is None or spec == "" or spec is False:
        return None
    if isinstance(spec, str):
        parsed = [_parse_one(spec)]
    elif isinstance(spec, (list, tuple)) and spec and all(isinstance(s, str) for s in spec):
        parsed = [_parse_one(s) for s in spec]
    else:
        raise GpuRequestError(_usage(spec))
    counts = {c for _, c in parsed}
    if len(counts) != 1:
        raise GpuRequestError(f"gpu={spec!r}: every type in the list needs the same count")
    types = tuple(dict.fromkeys(t for t, _ in parsed))          # de-duplicated, in order
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise GpuRequestError(f"gpu priority must be an integer, not {priority!r}")
    memory_mib = None
    if memory_gib is not None:
        if isinstance(memory_gib, bool) or not isinstance(memory_gib, (int, float)) \
                or not math.isfinite(memory_gib) or memory_gib <= 0:
            raise GpuRequestError(f"gpu memory_gib={memory_gib!r} must be a number > 0")
        memory_mib = math.ceil(memory_gib * 1024)
        largest = max(_largest_gb(t) for t in types)
        if memory_gib > largest * 1.0:
            raise GpuRequestError(f"gpu={spec!r} with memory_gib={memory_gib:g}: no such GPU "
                                  f"has more than {largest} GB")
    if share and memory_mib is None:
        raise GpuRequestError("share=True needs memory_gib= (GPU memory per GPU), so jobs "
                              "can be packed onto one GPU without running it out of memory")
    return GpuRequest(types, counts.pop(), memory_mib, bool(share), priority)


def function_gpu_request(fn: Mapping[str, Any]) -> GpuRequest | None:
    """The GpuRequest of a registered function's config (`gpu=`, `priority=`)."""
    return parse_gpu_request(fn.get("gpu"), priority=fn.get("priority") or 0)


def _largest_gb(t: GpuType) -> int:
    if t.memory_gb is not None:
        return t.memory_gb
    if t.family is not None:
        return max(KNOWN_GPU_TYPES[t.family])
    return max(max(v) for v in KNOWN_GPU_TYPES.values())
