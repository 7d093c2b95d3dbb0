"""The machine inventory, read for real: no mocks of NVML or psutil.

Without a GPU (every CI machine) the no-GPU path runs for real; the GPU tests skip and say why. On a machine
with NVIDIA GPUs and their driver it is the other way round.
"""

import json
import subprocess
import sys
from itertools import combinations

import pytest

from llmd.app.inventory import (GpuInfo, Inventory, cpu_devices, device_summary, read_gpu_samples, read_inventory,
                                summary_devices)


def nvml_gpu_count() -> int:
    """Asked of NVML directly, not through the code under test."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver, no library, no device
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


HAS_GPU = nvml_gpu_count() > 0
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU with its driver (NVML)")
requires_no_gpu = pytest.mark.skipif(HAS_GPU, reason="this machine has an NVIDIA GPU; the no-GPU path needs none")


@pytest.fixture(scope="module")
def inv() -> Inventory:
    return read_inventory()


def gpu(index: int, name: str, memory_mb: int) -> GpuInfo:
    return GpuInfo(index=index, name=name, uuid=f"GPU-{index}", memory_total_mb=memory_mb, memory_free_mb=memory_mb,
                   utilization_pct=0, temperature_c=40, power_w=30.0, power_limit_w=450.0, pcie_gen=4, pcie_width=16)


def with_gpus(inv: Inventory, gpus: list[GpuInfo]) -> Inventory:
    return Inventory(host=inv.host, gpus=gpus, links=[], nvml_available=True, note="")


# ---- everywhere ----

def test_host_facts_are_sane(inv):
    h = inv.host
    assert h.hostname
    assert h.cpu_cores >= 1
    assert h.ram_total_mb > 0
    assert 0 <= h.ram_free_mb <= h.ram_total_mb
    for nic in h.nics:
        assert nic.name and nic.name != "lo"
        assert not any(a.startswith("127.") for a in nic.addresses)
        assert nic.speed_mbps is None or nic.speed_mbps > 0


def test_json_round_trip(inv):
    wire = json.dumps(inv.to_dict())
    assert Inventory.from_dict(json.loads(wire)) == inv


def test_from_dict_ignores_fields_it_does_not_know(inv):
    d = inv.to_dict()
    d["host"]["future_field"] = 1
    assert Inventory.from_dict(d).host == inv.host


def test_missing_pynvml_is_a_note_not_a_crash():
    # A real failing import in a child process (the package blocked), not a mock of NVML.
    code = ("import sys, json; sys.modules['pynvml'] = None\n"
            "from llmd.app.inventory import read_inventory, read_gpu_samples\n"
            "print(json.dumps([read_inventory().to_dict(), read_gpu_samples()]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    d, samples = json.loads(p.stdout)
    assert (d["nvml_available"], d["gpus"], d["links"], samples) == (False, [], [], [])
    assert d["note"] == "no NVIDIA GPU found (NVML: nvidia-ml-py is not installed); offering CPU workers"


def test_cpu_devices_share_ram_evenly(inv):
    devices = cpu_devices(3)
    assert [d["index"] for d in devices] == [0, 1, 2]
    assert all(d["kind"] == "cpu" for d in devices)
    # RAM total is fixed, so a fresh read gives the same share.
    assert all(d["memory_mb"] == inv.host.ram_total_mb // 3 for d in devices)
    with pytest.raises(ValueError):
        cpu_devices(0)


def test_device_summary_without_gpus(inv):
    no_gpu = Inventory(host=inv.host, gpus=[], links=[], nvml_available=False, note="")
    assert device_summary(no_gpu, 2) == "cpu:2 (no GPU)"


def test_device_summary_groups_identical_gpus(inv):
    gpus = [gpu(0, "NVIDIA GeForce RTX 4090", 24564), gpu(1, "NVIDIA GeForce RTX 4090", 24564),
            gpu(2, "NVIDIA H100 80GB HBM3", 81559)]
    assert device_summary(with_gpus(inv, gpus), 0) == "2x RTX 4090 24GB, 1x H100 80GB HBM3 80GB"
    assert device_summary(with_gpus(inv, gpus[:1]), 0) == "1x RTX 4090 24GB"


def test_device_summary_fits_a_txt_record(inv):
    gpus = [gpu(i, f"NVIDIA Ünusual GPU model number {i}", 8192 * (i + 1)) for i in range(16)]
    s = device_summary(with_gpus(inv, gpus), 0)
    assert len(s.encode()) <= 200
    assert s.startswith("1x Ünusual GPU model number 0 8GB")


# ---- no GPU here ----

@requires_no_gpu
def test_no_gpu_path(inv):
    assert inv.nvml_available is False
    assert inv.gpus == [] and inv.links == []
    assert inv.note.startswith("no NVIDIA GPU found (NVML: ")
    assert inv.note.endswith("offering CPU workers")


@requires_no_gpu
def test_no_gpu_samples():
    assert read_gpu_samples() == []


# ---- GPU machines ----

@requires_gpu
def test_gpu_fields(inv):
    assert inv.nvml_available and inv.gpus
    assert [g.index for g in inv.gpus] == list(range(len(inv.gpus)))
    for g in inv.gpus:
        assert g.name
        assert g.uuid.startswith("GPU-")
        assert g.memory_total_mb > g.memory_free_mb >= 0
        assert g.utilization_pct is None or 0 <= g.utilization_pct <= 100
        assert g.power_w is None or g.power_w >= 0
        assert g.pcie_width is None or g.pcie_width >= 1


@requires_gpu
def test_links_cover_every_pair(inv):
    indices = [g.index for g in inv.gpus]
    assert sorted((link.a, link.b) for link in inv.links) == list(combinations(indices, 2))
    assert all(isinstance(link.nvlink, bool) and isinstance(link.p2p, bool) for link in inv.links)


@requires_gpu
def test_gpu_samples(inv):
    samples = read_gpu_samples()
    assert [s["index"] for s in samples] == [g.index for g in inv.gpus]
    assert [s["uuid"] for s in samples] == [g.uuid for g in inv.gpus]
    for s, g in zip(samples, inv.gpus):
        assert 0 <= s["memory_used_mb"] <= g.memory_total_mb


@requires_gpu
def test_device_summary_names_the_gpus(inv):
    s = device_summary(inv, 0)
    assert s.startswith(f"{sum(g.name == inv.gpus[0].name for g in inv.gpus)}x ")
    assert s.endswith("GB") and len(s.encode()) <= 200


def test_a_device_summary_reads_back_as_its_devices():
    assert summary_devices("cpu:3 (no GPU)") == [("cpu", "")] * 3
    assert summary_devices("2x RTX 4090 24GB, 1x A100-SXM4-80GB 80GB") == [("cuda", "RTX 4090 24GB")] * 2 + [
        ("cuda", "A100-SXM4-80GB 80GB")]
    assert summary_devices("2x RTX 40") == [("cuda", "RTX 40")] * 2
    assert summary_devices("garbled") == [] and summary_devices("") == []
