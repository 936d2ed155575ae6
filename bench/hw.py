"""Hardware baseline: host facts, GPU facts through NVML, and profile checks (dgx-spark, generic).
No GPU is a valid result. NVML queries that GB10 answers NOT_SUPPORTED are recorded, not fatal."""
from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from model.gpu import meminfo_bytes


@dataclass(frozen=True)
class HostFacts:
    hostname: str
    cpu_model: str
    architecture: str
    logical_cpus: int
    memory_total_bytes: int
    memory_available_bytes: int
    last_level_cache_bytes: int | None
    kernel: str
    os_release: str
    dgx_os_release: str | None


@dataclass
class GpuReport:
    index: int
    name: str
    compute_capability: str | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None
    unified_memory: bool = False
    sm_clock_max_mhz: int | None = None
    mem_clock_max_mhz: int | None = None
    power_limit_w: float | None = None
    temperature_c: int | None = None
    nvml_failed: dict[str, str] = field(default_factory=dict)


def _cpu_model(cpuinfo: str) -> str:
    for key in ("model name", "Model", "Hardware", "CPU part"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.M)
        if m:
            return m.group(1).strip()
    return platform.processor() or "unknown"


def _size_to_bytes(text: str) -> int:
    m = re.match(r"(\d+)\s*([KMG]?)", text.strip())
    if not m:
        return 0
    return int(m.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[m.group(2)]


def last_level_cache(sys_cpu: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    best: tuple[int, int] | None = None
    for index in sys_cpu.glob("index*"):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = _size_to_bytes((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind != "Instruction" and (best is None or level > best[0]):
            best = (level, size)
    return best[1] if best else None


def _os_release() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return platform.platform()
    m = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', text, re.M)
    return m.group(1) if m else platform.platform()


def _dgx_release() -> str | None:
    path = Path("/etc/dgx-release")
    if not path.exists():
        return None
    m = re.search(r'^DGX_(?:SWBUILD_VERSION|OTA_VERSION|RELEASE)="?([^"\n]+)', path.read_text(), re.M)
    return m.group(1) if m else path.read_text().strip().splitlines()[0]


def host_facts() -> HostFacts:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return HostFacts(
        hostname=platform.node(), cpu_model=_cpu_model(cpuinfo), architecture=platform.machine(),
        logical_cpus=os.cpu_count() or 1, memory_total_bytes=meminfo_bytes("MemTotal"),
        memory_available_bytes=meminfo_bytes("MemAvailable"),
        last_level_cache_bytes=last_level_cache(), kernel=platform.release(),
        os_release=_os_release(), dgx_os_release=_dgx_release(),
    )


def _query(report: GpuReport, name: str, fn, *args):
    import pynvml

    try:
        return fn(*args)
    except pynvml.NVMLError as exc:
        report.nvml_failed[name] = str(exc)
        return None


def gpu_reports() -> list[GpuReport]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no library: no GPU
        return []
    try:
        return [_gpu_report(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def _text(v) -> str | None:
    return v.decode() if isinstance(v, bytes) else (None if v is None else str(v))


def _gpu_report(nv, index: int) -> GpuReport:
    h = nv.nvmlDeviceGetHandleByIndex(index)
    r = GpuReport(index, _text(nv.nvmlDeviceGetName(h)) or "unknown")
    cc = _query(r, "compute_capability", nv.nvmlDeviceGetCudaComputeCapability, h)
    r.compute_capability = f"{cc[0]}.{cc[1]}" if cc else None
    r.driver_version = _text(_query(r, "driver_version", nv.nvmlSystemGetDriverVersion))
    cuda = _query(r, "cuda_driver_version", nv.nvmlSystemGetCudaDriverVersion)
    r.cuda_driver_version = f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None
    mem = _query(r, "memory_info", nv.nvmlDeviceGetMemoryInfo, h)
    if mem is not None:
        r.memory_total_bytes, r.memory_free_bytes = int(mem.total), int(mem.free)
    else:
        r.unified_memory = True
        r.memory_total_bytes = meminfo_bytes("MemTotal")
        r.memory_free_bytes = meminfo_bytes("MemAvailable")
    r.sm_clock_max_mhz = _query(r, "sm_clock_max", nv.nvmlDeviceGetMaxClockInfo, h, nv.NVML_CLOCK_SM)
    r.mem_clock_max_mhz = _query(r, "mem_clock_max", nv.nvmlDeviceGetMaxClockInfo, h, nv.NVML_CLOCK_MEM)
    power = _query(r, "power_limit", nv.nvmlDeviceGetEnforcedPowerLimit, h)
    r.power_limit_w = power / 1000 if power else None
    r.temperature_c = _query(r, "temperature", nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
    return r


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


def check_profile(profile: str, host: HostFacts, gpus: list[GpuReport]) -> list[Check]:
    if profile == "generic":
        return [Check("generic profile", True, "no expectations")]
    if profile != "dgx-spark":
        raise ValueError(f"--profile {profile!r}: choose dgx-spark or generic")
    gb10 = next((g for g in gpus if "GB10" in g.name), None)
    mem_gib = host.memory_total_bytes / 1024**3
    cuda = gb10.cuda_driver_version if gb10 else None
    return [
        Check("architecture aarch64", host.architecture == "aarch64", host.architecture),
        Check("GPU is GB10", gb10 is not None, ", ".join(g.name for g in gpus) or "no GPU"),
        Check("compute capability 12.1", bool(gb10 and gb10.compute_capability == "12.1"),
              gb10.compute_capability if gb10 and gb10.compute_capability else "n/a"),
        Check("unified memory ~128 GB", 100 <= mem_gib <= 136 and bool(gb10 and gb10.unified_memory),
              f"{mem_gib:.1f} GiB, unified={bool(gb10 and gb10.unified_memory)}"),
        Check("CUDA driver >= 13", bool(cuda and int(cuda.split(".")[0]) >= 13), cuda or "n/a"),
    ]
