"""The overview's capacity panel reads `dgxready_bench_capacity_agents{host, workload}`: the
concurrent agents that met the SLO in the newest `invoke bench.all` baseline of each host
(bench/baselines/<host>/<timestamp>.json). `CapacityCollector` yields it for an exporter's registry."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric

from dgxready.settings import BASELINES_DIR

CAPACITY_METRIC = "dgxready_bench_capacity_agents"


@dataclass(frozen=True)
class Capacity:
    host: str
    workload: str
    agents: int
    slo_p95_e2el_s: float
    created_at: str


def capacity_of(doc: dict) -> Capacity | None:
    cap = doc.get("capacity")
    if not isinstance(cap, dict) or cap.get("max_concurrency_meeting_slo") is None:
        return None
    workload = cap.get("workload") or {}
    return Capacity(str(doc.get("host", "?")), str(workload.get("name", "?")),
                    int(cap["max_concurrency_meeting_slo"]), float(cap.get("slo_p95_e2el_s") or 0),
                    str(doc.get("created_at", "")))


def newest_capacities(baselines: Path = BASELINES_DIR) -> list[Capacity]:
    """Per host folder, the newest baseline (names are timestamps) that holds a capacity."""
    found = []
    for host_dir in sorted(p for p in baselines.glob("*") if p.is_dir()):
        for path in sorted(host_dir.glob("*.json"), reverse=True):
            try:
                cap = capacity_of(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
            if cap:
                found.append(cap)
                break
    return found


def capacity_family(capacities: list[Capacity]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(CAPACITY_METRIC, "Concurrent agents meeting the P95 SLO in the newest "
                               "bench.all baseline", labels=["host", "workload"])
    for cap in capacities:
        family.add_metric([cap.host, cap.workload], cap.agents)
    return family


@dataclass(frozen=True)
class CapacityCollector:
    """Register with a prometheus_client registry; reads the baselines on every scrape."""
    baselines: Path = BASELINES_DIR

    def collect(self) -> Iterator[Metric]:
        yield capacity_family(newest_capacities(self.baselines))
