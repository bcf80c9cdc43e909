"""cuda_restore.request: Modal-style gpu= strings -> GpuRequest, and clear errors."""
from __future__ import annotations

import pytest

from cuda_restore import fake_nvml
from cuda_restore.errors import GpuRequestError
from cuda_restore.inventory import read_inventory
from cuda_restore.request import GpuRequest, GpuType, parse_gpu_request
from sdk.exception import InvalidError


@pytest.mark.parametrize("spec,types,count", [
    ("H100", (GpuType("H100"),), 1),
    ("h100", (GpuType("H100"),), 1),
    ("A100-80GB:2", (GpuType("A100", 80),), 2),
    ("a100-80gb:2", (GpuType("A100", 80),), 2),
    ("A100", (GpuType("A100"),), 1),
    ("A100-40GB", (GpuType("A100", 40),), 1),
    ("any", (GpuType(),), 1),
    ("ANY:4", (GpuType(),), 4),
    ("T4:4", (GpuType("T4"),), 4),
    ("A10G", (GpuType("A10G"),), 1),
    ("L40S:8", (GpuType("L40S"),), 8),
    ("H100!", (GpuType("H100"),), 1),
    (" h100:2 ", (GpuType("H100"),), 2),
    (["H100:2", "a100-80gb:2"], (GpuType("H100"), GpuType("A100", 80)), 2),
])
def test_valid_specs(spec, types, count):
    r = parse_gpu_request(spec)
    assert r == GpuRequest(types, count)
    assert r.exclusive and not r.share and r.memory_mib is None


@pytest.mark.parametrize("spec", [None, ""])
def test_no_gpu(spec):
    assert parse_gpu_request(spec) is None


@pytest.mark.parametrize("spec,match", [
    ("H1000", "not a GPU request"),
    ("V100X", "not a GPU request"),
    ("A100-20GB", "A100-40GB or A100-80GB"),
    ("H100-SXM", "not a GPU request"),
    ("H100:0", "at least 1"),
    ("H100:9", "at most 8"),
    ("T4:16", "at most 8"),
    ("H100:two", "whole number"),
    ("H100:-1", "whole number"),
    ("H100:2:3", "not a GPU request"),
    ("any-80GB", "memory_gib"),
    (["H100:2", "A100"], "same count"),
    ([], "not a GPU request"),
    (3, "not a GPU request"),
    ({"type": "H100"}, "not a GPU request"),
])
def test_malformed_specs_raise_a_clear_error(spec, match):
    with pytest.raises(GpuRequestError, match=match) as ei:
        parse_gpu_request(spec)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, InvalidError)
    assert ei.value.code == "invalid" and ei.value.http_status == 400


def test_memory_share_and_priority():
    r = parse_gpu_request("A100", memory_gib=10.5, share=True, priority=5)
    assert r.memory_mib == 10752 and r.share and r.priority == 5
    assert r.label() == "A100:1, 10.5 GiB each, shared"


@pytest.mark.parametrize("kw,match", [
    (dict(share=True), "needs memory_gib"),
    (dict(memory_gib=0), "> 0"),
    (dict(memory_gib=-3), "> 0"),
    (dict(memory_gib=float("nan")), "> 0"),
    (dict(memory_gib="8"), "> 0"),
    (dict(memory_gib=200), "more than 80 GB"),
    (dict(priority=1.5), "integer"),
])
def test_bad_memory_and_priority(kw, match):
    with pytest.raises(GpuRequestError, match=match):
        parse_gpu_request("A100-80GB", **kw)


def test_a_request_passes_through():
    r = GpuRequest((GpuType("T4"),), 2)
    assert parse_gpu_request(r) is r


def test_types_match_inventory_gpus():
    h100 = read_inventory(fake_nvml.h100_sxm_8x()).gpus[0]
    a100 = read_inventory(fake_nvml.a100_80gb_4x_pairs()).gpus[0]
    mig = read_inventory(fake_nvml.h100_pcie_2x_one_mig()).gpus[1]
    assert GpuType("H100").matches(h100) and GpuType("H100", 80).matches(h100)
    assert not GpuType("H100", 94).matches(h100) and not GpuType("A100").matches(h100)
    assert GpuType("A100").matches(a100) and not GpuType("A100", 40).matches(a100)
    assert GpuType().matches(h100) and GpuType().matches(a100)
    assert not GpuType().matches(mig) and not GpuType("H100").matches(mig)
    assert str(GpuType()) == "any" and str(GpuType("A100", 80)) == "A100-80GB"
