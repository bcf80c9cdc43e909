"""cuda_restore.inventory over the fake NVML: GPUs, topology, wire format, no-GPU nodes."""
from __future__ import annotations

import json

import pytest

from cuda_restore import fake_nvml
from cuda_restore.errors import GpuInventoryError
from cuda_restore.fake_nvml import FakeGpu, FakeNvml
from cuda_restore.inventory import (GpuProbe, NodeGpuInventory, gpu_family, gpu_memory_gb,
                                    read_inventory)


@pytest.mark.parametrize("name,total,family,gb", [
    ("NVIDIA H100 80GB HBM3", 81559, "H100", 80),
    ("NVIDIA H100 PCIe", 81559, "H100", 80),
    ("NVIDIA H100 NVL", 95830, "H100", 94),
    ("NVIDIA A100-SXM4-80GB", 81920, "A100", 80),
    ("NVIDIA A100-PCIE-40GB", 40960, "A100", 40),
    ("NVIDIA A10G", 23028, "A10G", 24),
    ("NVIDIA A10", 23028, "A10", 24),
    ("Tesla T4", 15360, "T4", 16),
    ("NVIDIA L4", 23034, "L4", 24),
    ("NVIDIA L40S", 46068, "L40S", 48),
    ("NVIDIA H200", 143771, "H200", 141),
    ("NVIDIA GeForce RTX 4090", 24564, "4090", 24),
])
def test_family_and_memory_variant_from_nvml_names(name, total, family, gb):
    assert gpu_family(name) == family
    assert gpu_memory_gb(name, total) == gb


def test_h100_node_with_nvswitch_is_all_to_all():
    inv = read_inventory(fake_nvml.h100_sxm_8x(used_mib={3: 40_000}))
    assert inv.summary() == "8x H100-80GB"
    assert inv.driver_version == "580.65.06" and inv.cuda_version == "13.0"
    assert inv.driver_major == 580
    assert [g.index for g in inv.gpus] == list(range(8))
    assert len({g.uuid for g in inv.gpus}) == 8
    g3 = inv.gpu(3)
    assert (g3.memory_total_mib, g3.memory_used_mib, g3.memory_free_mib) == (81559, 40000, 41559)
    assert g3.compute_capability == (9, 0) and not g3.mig_enabled
    assert len(inv.links) == 28
    assert all(lk.nvlink and lk.nvlinks == 18 for lk in inv.links)
    assert inv.nvlink_peers(0) == (1, 2, 3, 4, 5, 6, 7)
    assert inv.link(0, 1).level == "NODE" and inv.link(0, 7).level == "SYS"


def test_a100_node_has_nvlink_only_within_pairs():
    inv = read_inventory(fake_nvml.a100_80gb_4x_pairs())
    assert inv.summary() == "4x A100-80GB"
    assert inv.nvlink_peers(0) == (1,) and inv.nvlink_peers(3) == (2,)
    assert inv.link(1, 0).nvlinks == 12          # order of the pair does not matter
    assert not inv.link(1, 2).nvlink and inv.link(1, 2).nvlinks == 0


def test_gpu_without_nvlink_support():
    inv = read_inventory(fake_nvml.a10g_1x())
    assert inv.summary() == "1x A10G-24GB"
    assert inv.links == () and inv.nvlink_peers(0) == ()
    assert inv.gpus[0].compute_capability == (8, 6)


def test_mig_gpu_is_reported_as_such():
    inv = read_inventory(fake_nvml.h100_pcie_2x_one_mig())
    assert [g.mig_enabled for g in inv.gpus] == [False, True]
    assert "(MIG)" in inv.summary()


@pytest.mark.parametrize("preset,why", [("no_gpu", "no GPU"), ("no_driver", "Library Not Found")])
def test_nodes_without_gpus_report_an_empty_inventory(preset, why):
    inv = read_inventory(fake_nvml.PRESETS[preset]())
    assert inv.gpus == () and why in inv.note
    assert NodeGpuInventory.from_wire(inv.to_wire()) == inv


def test_this_machine_without_nvml_does_not_raise():
    inv = read_inventory()             # the real pynvml: no driver here, or a real GPU
    assert isinstance(inv, NodeGpuInventory)
    if not inv.gpus:
        assert inv.note


def test_a_lost_gpu_is_left_out_and_named():
    nvml = FakeNvml(gpus=[FakeGpu("NVIDIA A10G", 23028), FakeGpu("NVIDIA A10G", 23028, lost=True)])
    inv = read_inventory(nvml)
    assert [g.index for g in inv.gpus] == [0]
    assert "GPU 1" in inv.note


def test_read_shuts_nvml_down_again():
    nvml = fake_nvml.a10g_1x()
    read_inventory(nvml)
    assert nvml.initialized == 0 and nvml.calls["nvmlShutdown"] == 1


def test_probe_keeps_nvml_open_and_reads_topology_once():
    nvml = fake_nvml.h100_sxm_8x()
    probe = GpuProbe(nvml)
    first = probe.read()
    topo_calls = nvml.calls["nvmlDeviceGetNvLinkState"]
    nvml.gpus[0] = FakeGpu("NVIDIA H100 80GB HBM3", 81559, 20_000, nvlink_slots=18,
                           switch_links=18)
    second = probe.read()
    assert nvml.calls["nvmlInit"] == 1
    assert nvml.calls["nvmlDeviceGetNvLinkState"] == topo_calls      # topology cached
    assert second.gpu(0).memory_used_mib == 20_000                     # memory is fresh
    assert second.links == first.links
    probe.close()
    assert nvml.initialized == 0


def test_probe_without_driver_retries_later():
    nvml = fake_nvml.no_driver()
    probe = GpuProbe(nvml)
    assert probe.read().gpus == ()
    nvml.init_error = None
    nvml.gpus = [FakeGpu("Tesla T4", 15360, compute_capability=(7, 5))]
    assert probe.read().summary() == "1x T4-16GB"


@pytest.mark.parametrize("preset", sorted(fake_nvml.PRESETS))
def test_wire_round_trip_through_json(preset):
    inv = read_inventory(fake_nvml.PRESETS[preset]())
    assert NodeGpuInventory.from_wire(json.loads(json.dumps(inv.to_wire()))) == inv


def test_old_nodes_that_send_nothing_have_no_gpus():
    assert NodeGpuInventory.from_wire(None).gpus == ()
    assert NodeGpuInventory.from_wire({}).gpus == ()


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.update(version=2), "version"),
    (lambda d: d["gpus"][0].update(index="0"), "index"),
    (lambda d: d["gpus"][0].update(memory_total_mib=0), "memory_total_mib"),
    (lambda d: d["gpus"][1].update(index=0), "unique"),
    (lambda d: d["links"][0].update(b=99), "links"),
    (lambda d: d.update(gpus="x"), "gpus"),
    (lambda d: d["gpus"][0].update(compute_capability=[9]), "compute_capability"),
])
def test_malformed_wire_inventories_are_rejected(mutate, field):
    d = read_inventory(fake_nvml.a100_80gb_4x_pairs()).to_wire()
    mutate(d)
    with pytest.raises(GpuInventoryError, match=field):
        NodeGpuInventory.from_wire(d)
    with pytest.raises(ValueError):          # callers may catch it as a ValueError too
        NodeGpuInventory.from_wire(d)
