"""Serving levels, sweeps and the capacity search, on top of the load generator."""
from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.loadgen import Endpoint, closed_loop, open_loop
from bench.metrics import RequestRecord, ServingMetrics, Slo, compute_metrics
from bench.workloads import Workload


@dataclass(frozen=True)
class LevelResult:
    concurrency: int | None
    request_rate: float | None
    num_requests: int
    warmup_requests: int
    metrics: ServingMetrics
    e2el_samples: list[float] = field(default_factory=list)
    ttft_samples: list[float] = field(default_factory=list)
    itl_samples: list[float] = field(default_factory=list, repr=False)


def level_from(records: list[RequestRecord], concurrency, rate, warmup, slo) -> LevelResult:
    ok = [r for r in records if r.success]
    return LevelResult(
        concurrency, rate, len(records), warmup, compute_metrics(records, slo),
        [r.e2el for r in ok if r.e2el is not None], [r.ttft for r in ok if r.ttft is not None],
        [g for r in ok for g in r.itl],
    )


def requests_for(concurrency: int, per_worker: int = 3, minimum: int = 20) -> int:
    """Enough requests for a P95 to mean something: at least 20, and 3 rounds of every worker."""
    return max(minimum, per_worker * concurrency)


def run_level(ep: Endpoint, workload: Workload, concurrency: int, num_requests: int, warmup: int,
              slo: Slo | None, on_done: Callable[[RequestRecord], None] | None = None) -> LevelResult:
    records = asyncio.run(closed_loop(ep, workload, concurrency, num_requests, warmup, on_done))
    return level_from(records, concurrency, None, warmup, slo)


def run_rate(ep: Endpoint, workload: Workload, rate: float, burstiness: float, num_requests: int,
             max_concurrency: int | None, warmup: int, slo: Slo | None, seed: int = 0,
             on_done: Callable[[RequestRecord], None] | None = None) -> LevelResult:
    records = asyncio.run(open_loop(ep, workload, rate, burstiness, num_requests, max_concurrency,
                                    seed, warmup, on_done))
    return level_from(records, max_concurrency, rate, warmup, slo)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class CapacityLevel:
    concurrency: int
    num_requests: int
    failed: int
    p50_e2el_s: float | None
    p95_e2el_s: float | None
    p99_e2el_s: float | None
    p95_ttft_s: float | None
    output_throughput: float
    attainment: float
    attainment_ci95: tuple[float, float]
    passed: bool
    reason: str


@dataclass(frozen=True)
class CapacityResult:
    slo_p95_e2el_s: float
    workload: dict
    max_concurrency_meeting_slo: int
    levels: list[CapacityLevel]
    search_limit: int


def judge(level: LevelResult, slo_s: float) -> CapacityLevel:
    m = level.metrics
    within = sum(1 for x in level.e2el_samples if x <= slo_s)
    n = m.completed + m.failed
    p95 = m.e2el.p95 if m.e2el else None
    if m.failed:
        passed, reason = False, f"{m.failed} of {n} requests failed"
    elif p95 is None:
        passed, reason = False, "no successful request"
    elif p95 > slo_s:
        passed, reason = False, f"P95 E2EL {p95:.2f} s > {slo_s:g} s"
    else:
        passed, reason = True, f"P95 E2EL {p95:.2f} s <= {slo_s:g} s"
    return CapacityLevel(
        level.concurrency or 0, n, m.failed, m.e2el.p50 if m.e2el else None, p95,
        m.e2el.p99 if m.e2el else None, m.ttft.p95 if m.ttft else None, m.output_throughput,
        within / n if n else 0.0, wilson_interval(within, n), passed, reason,
    )


def capacity_search(measure: Callable[[int], LevelResult], slo_s: float, workload: dict,
                    start: int = 1, limit: int = 64,
                    on_level: Callable[[CapacityLevel], None] | None = None) -> CapacityResult:
    """Double from `start` until a level fails (or `limit`), then bisect between the last pass
    and the first fail. The answer is the largest concurrency that passed."""
    tested: dict[int, CapacityLevel] = {}

    def test(c: int) -> bool:
        if c not in tested:
            tested[c] = judge(measure(c), slo_s)
            if on_level:
                on_level(tested[c])
        return tested[c].passed

    good, bad = 0, None
    c = start
    while c <= limit:
        if test(c):
            good = c
            c *= 2
        else:
            bad = c
            break
    if bad is None and good < limit:
        bad = limit + 1 if test(limit) else limit
        good = limit if bad > limit else good
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        if test(mid):
            good = mid
        else:
            bad = mid
    return CapacityResult(slo_s, workload, good, list(tested.values()), limit)
