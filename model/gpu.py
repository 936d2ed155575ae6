"""NVIDIA GPU facts through NVML (the nvidia-ml-py binding). No GPU is a valid answer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GpuFacts:
    index: int
    name: str
    compute_capability: tuple[int, int] | None
    memory_total_bytes: int | None
    memory_free_bytes: int | None
    # GB10 (DGX Spark) shares LPDDR5x with the CPU and NVML's memory queries say NOT_SUPPORTED.
    unified_memory: bool


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_facts() -> list[GpuFacts]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        return [_device_facts(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def _device_facts(pynvml, index: int) -> GpuFacts:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    try:
        cc = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
    except pynvml.NVMLError:
        cc = None
    try:
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        total, free, unified = int(mem.total), int(mem.free), False
    except pynvml.NVMLError_NotSupported:
        total, free, unified = None, None, True
    return GpuFacts(index, _text(pynvml.nvmlDeviceGetName(handle)), cc, total, free, unified)


def meminfo_bytes(field: str, path: Path = Path("/proc/meminfo")) -> int:
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key == field:
            return int(rest.split()[0]) * 1024
    raise KeyError(f"{path}: no {field} line")
