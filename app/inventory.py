"""What a workstation agent reports about its machine: GPUs (NVML), links between them, CPU, RAM and NICs.

NVML comes from `nvidia-ml-py` (`import pynvml`). A machine without NVIDIA GPUs, without the driver or
without the package is normal in an office: it yields an inventory with no GPUs and a plain note, never
an exception. Calls that some GPUs do not support (power on some laptops, NVLink on consumer cards,
utilisation under MIG) degrade to None/False one field at a time.
"""

import re
import socket
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from itertools import combinations

import psutil

from llmd.engine.errors import LlmdError

MB = 1024 * 1024
TXT_MAX_BYTES = 200  # room left in an mDNS TXT record (255 bytes per string) after the key
# nvidia-ml-py defines NVML_P2P_CAPS_INDEX_READ as the tuple `(0,)` (a stray comma), which ctypes rejects;
# the C enum value is 0.
P2P_CAPS_INDEX_READ = 0


class NvmlUnavailable(LlmdError): ...


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    memory_total_mb: int
    memory_free_mb: int
    utilization_pct: int | None
    temperature_c: int | None
    power_w: float | None
    power_limit_w: float | None
    pcie_gen: int | None
    pcie_width: int | None


@dataclass(frozen=True)
class GpuLink:
    a: int  # GPU indices, a < b
    b: int
    nvlink: bool
    p2p: bool  # CUDA peer-to-peer reads from a to b are possible (over NVLink or PCIe)


@dataclass(frozen=True)
class NicInfo:
    name: str
    speed_mbps: int | None  # None where the OS does not know (Wi-Fi, virtual interfaces)
    addresses: list[str]  # IPv4 only: the control plane and gloo/NCCL bootstrap use IPv4


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    cpu_cores: int
    ram_total_mb: int
    ram_free_mb: int  # "available" memory: free plus what the OS would reclaim from caches
    nics: list[NicInfo]


@dataclass(frozen=True)
class Inventory:
    host: HostInfo
    gpus: list[GpuInfo]
    links: list[GpuLink]  # one per pair of GPUs
    nvml_available: bool  # NVML answered and found at least one readable GPU
    note: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Inventory":
        host = _build(HostInfo, {**d["host"], "nics": [_build(NicInfo, n) for n in d["host"]["nics"]]})
        return cls(host=host, gpus=[_build(GpuInfo, g) for g in d["gpus"]],
                   links=[_build(GpuLink, link) for link in d["links"]],
                   nvml_available=d["nvml_available"], note=d["note"])


def _build(cls, d: dict):
    # Unknown keys are dropped, so a host can read what a newer agent sends.
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


# ---- host (psutil) ----

def read_host() -> HostInfo:
    vm = psutil.virtual_memory()
    # Physical cores: hyperthreads add little to matmul speed. psutil returns None where it cannot tell.
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count(logical=True) or 1
    return HostInfo(hostname=socket.gethostname(), cpu_cores=cores, ram_total_mb=vm.total // MB,
                    ram_free_mb=vm.available // MB, nics=read_nics())


def read_nics() -> list[NicInfo]:
    stats, addrs = psutil.net_if_stats(), psutil.net_if_addrs()
    nics = []
    for name in sorted(stats):
        st = stats[name]
        ipv4 = [a.address for a in addrs.get(name, []) if a.family == socket.AF_INET]
        if not st.isup:  # a down interface cannot carry engine traffic
            continue
        if "loopback" in getattr(st, "flags", "").split(",") or (ipv4 and all(a.startswith("127.") for a in ipv4)):
            continue
        nics.append(NicInfo(name=name, speed_mbps=st.speed or None, addresses=ipv4))
    return nics


# ---- GPUs (NVML) ----

@contextmanager
def _nvml():
    """The initialised pynvml module; NvmlUnavailable says why there is none."""
    try:
        import pynvml as nv
    except ImportError:
        raise NvmlUnavailable("nvidia-ml-py is not installed") from None
    try:
        nv.nvmlInit()
    except nv.NVMLError as e:
        raise NvmlUnavailable(str(e)) from None
    try:
        yield nv
    finally:
        try:
            nv.nvmlShutdown()
        except nv.NVMLError:
            pass  # nothing to undo; the next nvmlInit starts afresh


def _try(nv, fn, *args):
    """fn(*args), or None where this GPU or driver does not support the call."""
    try:
        return fn(*args)
    except nv.NVMLError:
        return None


def _text(s) -> str:
    # Older pynvml releases return bytes, newer ones str.
    return s.decode() if isinstance(s, bytes) else s


def _watts(nv, fn, handle) -> float | None:
    mw = _try(nv, fn, handle)
    return None if mw is None else round(mw / 1000, 1)


def _read_gpu(nv, index: int):
    """(GpuInfo, handle); name, UUID and memory must read, the rest may be None."""
    h = nv.nvmlDeviceGetHandleByIndex(index)
    mem = nv.nvmlDeviceGetMemoryInfo(h)
    util = _try(nv, nv.nvmlDeviceGetUtilizationRates, h)  # not supported under MIG
    info = GpuInfo(
        index=index, name=_text(nv.nvmlDeviceGetName(h)), uuid=_text(nv.nvmlDeviceGetUUID(h)),
        memory_total_mb=mem.total // MB, memory_free_mb=mem.free // MB,
        utilization_pct=None if util is None else util.gpu,
        temperature_c=_try(nv, nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU),
        power_w=_watts(nv, nv.nvmlDeviceGetPowerUsage, h),
        power_limit_w=_watts(nv, nv.nvmlDeviceGetEnforcedPowerLimit, h),
        pcie_gen=_try(nv, nv.nvmlDeviceGetCurrPcieLinkGeneration, h),
        pcie_width=_try(nv, nv.nvmlDeviceGetCurrPcieLinkWidth, h),
    )
    return info, h


def _read_gpus(nv) -> tuple[list[GpuInfo], list, list[str]]:
    """Readable GPUs, their handles, and one line per GPU that could not be read."""
    try:
        count = nv.nvmlDeviceGetCount()
    except nv.NVMLError as e:
        raise NvmlUnavailable(str(e)) from None
    gpus, handles, problems = [], [], []
    for i in range(count):
        try:
            info, h = _read_gpu(nv, i)
        except nv.NVMLError as e:  # e.g. "GPU is lost": offer the others
            problems.append(f"GPU {i} skipped (NVML: {e})")
            continue
        gpus.append(info)
        handles.append(h)
    return gpus, handles, problems


def _pci_key(pci) -> tuple[int, int, int]:
    # Compare numbers, not bus-id strings: the remote and local strings may use different formats.
    return (pci.domain, pci.bus, pci.device)


def _nvlink_peers(nv, handle) -> set[tuple[int, int, int]]:
    """PCI addresses at the far end of this GPU's active NVLinks (a GPU, or an NVSwitch)."""
    peers = set()
    for link in range(nv.NVML_NVLINK_MAX_LINKS):
        if _try(nv, nv.nvmlDeviceGetNvLinkState, handle, link) != nv.NVML_FEATURE_ENABLED:
            continue  # inactive, or no NVLink at all (consumer cards answer NOT_SUPPORTED)
        remote = _try(nv, nv.nvmlDeviceGetNvLinkRemotePciInfo, handle, link)
        if remote is not None:
            peers.add(_pci_key(remote))
    return peers


def _p2p_ok(nv, h1, h2, caps_index: int) -> bool:
    return _try(nv, nv.nvmlDeviceGetP2PStatus, h1, h2, caps_index) == nv.NVML_P2P_STATUS_OK


def _read_links(nv, gpus: list[GpuInfo], handles: list) -> list[GpuLink]:
    pci = [_try(nv, nv.nvmlDeviceGetPciInfo, h) for h in handles]
    peers = [_nvlink_peers(nv, h) for h in handles]
    links = []
    for i, j in combinations(range(len(handles)), 2):
        direct = any(pci[y] is not None and _pci_key(pci[y]) in peers[x] for x, y in ((i, j), (j, i)))
        # Behind an NVSwitch the far end of each link is the switch, not the peer GPU: ask NVML about the pair.
        nvlink = direct or _p2p_ok(nv, handles[i], handles[j], nv.NVML_P2P_CAPS_INDEX_NVLINK)
        p2p = _p2p_ok(nv, handles[i], handles[j], P2P_CAPS_INDEX_READ)
        links.append(GpuLink(a=gpus[i].index, b=gpus[j].index, nvlink=nvlink, p2p=p2p))
    return links


def _no_gpu_note(reason: str) -> str:
    return f"no NVIDIA GPU found (NVML: {reason}); offering CPU workers"


def read_inventory() -> Inventory:
    host = read_host()
    try:
        with _nvml() as nv:
            gpus, handles, problems = _read_gpus(nv)
            links = _read_links(nv, gpus, handles)
            driver = _try(nv, nv.nvmlSystemGetDriverVersion)
    except NvmlUnavailable as e:
        return Inventory(host=host, gpus=[], links=[], nvml_available=False, note=_no_gpu_note(str(e)))
    if not gpus:
        reason = "; ".join(problems) or "the driver reports 0 GPUs"
        return Inventory(host=host, gpus=[], links=[], nvml_available=False, note=_no_gpu_note(reason))
    note = "; ".join([f"{len(gpus)} NVIDIA GPU(s) via NVML, driver {_text(driver) or 'unknown'}", *problems])
    return Inventory(host=host, gpus=gpus, links=links, nvml_available=True, note=note)


def read_gpu_samples() -> list[dict]:
    """Live metrics per GPU for polling: only the cheap calls. [] without NVML."""
    try:
        with _nvml() as nv:
            count = _try(nv, nv.nvmlDeviceGetCount) or 0
            handles = [(i, _try(nv, nv.nvmlDeviceGetHandleByIndex, i)) for i in range(count)]
            return [_sample(nv, i, h) for i, h in handles if h is not None]  # a lost GPU has no handle
    except NvmlUnavailable:
        return []


def _sample(nv, index: int, h) -> dict:
    util = _try(nv, nv.nvmlDeviceGetUtilizationRates, h)
    mem = _try(nv, nv.nvmlDeviceGetMemoryInfo, h)
    return {
        "index": index,
        "uuid": _text(_try(nv, nv.nvmlDeviceGetUUID, h)),
        "utilization_pct": None if util is None else util.gpu,
        "memory_used_mb": None if mem is None else mem.used // MB,
        "power_w": _watts(nv, nv.nvmlDeviceGetPowerUsage, h),
        "temperature_c": _try(nv, nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU),
    }


# ---- what an agent offers ----

def cpu_devices(n: int) -> list[dict]:
    """The devices an agent offers without a GPU: n CPU workers sharing the machine's RAM evenly."""
    if n < 1:
        raise ValueError(f"an agent needs at least one CPU worker, got {n}")
    per_worker = read_host().ram_total_mb // n
    return [{"kind": "cpu", "index": i, "memory_mb": per_worker} for i in range(n)]


def _short_name(name: str) -> str:
    for prefix in ("NVIDIA GeForce ", "NVIDIA "):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def device_summary(inv: Inventory, cpu_workers: int) -> str:
    """E.g. "2x RTX 4090 24GB" or "cpu:2 (no GPU)", for the mDNS TXT record; at most 200 bytes."""
    if not inv.gpus:
        return _cap(f"cpu:{cpu_workers} (no GPU)")
    groups: dict[str, int] = {}  # insertion order = GPU index order
    for g in inv.gpus:
        label = f"{_short_name(g.name)} {round(g.memory_total_mb / 1024)}GB"  # 24564 MiB -> "24GB"
        groups[label] = groups.get(label, 0) + 1
    return _cap(", ".join(f"{n}x {label}" for label, n in groups.items()))


def summary_devices(summary: str) -> list[tuple[str, str]]:
    """`device_summary` read back: one (kind, name) per device, kind "cpu" or "cuda"; [] for what it cannot read
    (a record cut at 200 bytes, another version's)."""
    if m := re.fullmatch(r"cpu:(\d{1,3}) \(no GPU\)", summary):
        return [("cpu", "")] * int(m.group(1))
    out = []
    for group in summary.split(", "):
        m = re.fullmatch(r"(\d{1,3})x (.+)", group)
        if not m:
            return []
        out += [("cuda", m.group(2))] * int(m.group(1))
    return out


def _cap(s: str) -> str:
    # Cut on bytes, not characters, and drop a multi-byte character split by the cut.
    return s.encode()[:TXT_MAX_BYTES].decode(errors="ignore")


# ---- live CPU readings of engine processes (what a CPU "device" is doing) ----

@dataclass(frozen=True)
class ProcessSample:
    cpu_pct: float  # percent of one core since the previous reading; above 100 with several threads
    rss_mb: float


def read_process_sample(proc: psutil.Process) -> ProcessSample | None:
    """One reading of a worker process, None once it has exited. Keep the same `Process` object between
    calls: psutil measures CPU time since the previous call on it (the first call reads 0)."""
    try:
        with proc.oneshot():
            return ProcessSample(cpu_pct=proc.cpu_percent(interval=None), rss_mb=proc.memory_info().rss / MB)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def cpu_temperature_c() -> float | None:
    """The CPU package temperature where the OS exposes one (often not in VMs)."""
    read = getattr(psutil, "sensors_temperatures", None)
    try:
        sensors = read() if read else {}
    except OSError:
        return None
    for key in ("coretemp", "k10temp", "cpu_thermal", "acpitz"):
        if sensors.get(key):
            return float(sensors[key][0].current)
    return None
