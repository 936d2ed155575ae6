"""How much memory an engine may use on this host: GPU, unified (DGX Spark) or CPU RAM."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from model.gpu import GpuFacts, gpu_facts, meminfo_bytes

# Unified memory: the page cache competes with the GPU, so NVIDIA's playbooks drop it before an
# engine starts. The same line runs here (model.serve) and on provisioned hosts.
DROP_PAGE_CACHE_SH = "sync && echo 3 > /proc/sys/vm/drop_caches"


@dataclass(frozen=True)
class MemoryBudget:
    kind: Literal["gpu", "unified", "cpu"]
    total_bytes: int
    available_bytes: int
    source: str


def budget_from(gpus: list[GpuFacts], mem_total: int, mem_available: int) -> MemoryBudget:
    gpu = gpus[0] if gpus else None
    if gpu is None:
        return MemoryBudget("cpu", mem_total, mem_available, "/proc/meminfo MemAvailable (no GPU)")
    if gpu.unified_memory or gpu.memory_total_bytes is None:
        return MemoryBudget("unified", mem_total, mem_available,
                            f"/proc/meminfo MemAvailable ({gpu.name}: NVML memory NOT_SUPPORTED, "
                            "unified pool)")
    return MemoryBudget("gpu", gpu.memory_total_bytes, gpu.memory_free_bytes or 0,
                        f"NVML {gpu.name} free memory")


def host_budget() -> MemoryBudget:
    return budget_from(gpu_facts(), meminfo_bytes("MemTotal"), meminfo_bytes("MemAvailable"))
