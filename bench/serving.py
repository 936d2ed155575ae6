"""Serving levels, sweeps and the capacity search, on top of the load generator."""
from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Literal

import numpy as np

from bench.loadgen import Endpoint, StopRule, closed_loop, closed_warmup, open_loop
from bench.metrics import RequestRecord, ServingMetrics, Slo, compute_metrics
from bench.workloads import Workload

# A level meets a P95 SLO when at least 95% of its requests are within it. To show that with
# one-sided 95% confidence (a two-sided 90% Wilson interval whose lower end is >= 0.95) takes 52
# requests, all within the SLO; a level whose true P95 is 70% of the SLO does it in 94% of
# 52-request trials (python -m bench.benchmarks.capacity_requests). So the search screens each
# level with one round of REQUESTS_PER_ROUND and measures the levels it must decide again, round
# by round, until they are decided or have SETTLE_REQUESTS: four rounds of 13.
REQUESTS_PER_ROUND = 13
SETTLE_REQUESTS = 52
CONFIDENCE = 0.90
SLO_QUANTILE = 0.95
# A round stops early once its level misses the SLO by an exact one-sided binomial test: were
# SLO_QUANTILE of its requests within the SLO, as few within as it has would come up with a chance
# below this. The test runs after every request, so it is stricter than CONFIDENCE, and exact
# because the Wilson interval is too narrow for the first few requests.
EARLY_MISS_ALPHA = 0.01


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
    tpot_samples: list[float] = field(default_factory=list)
    output_token_samples: list[int] = field(default_factory=list)


def level_from(records: list[RequestRecord], concurrency, rate, warmup, slo) -> LevelResult:
    ok = [r for r in records if r.success]
    return LevelResult(
        concurrency, rate, len(records), warmup, compute_metrics(records, slo),
        [r.e2el for r in ok if r.e2el is not None], [r.ttft for r in ok if r.ttft is not None],
        [g for r in ok for g in r.itl], [t for r in ok if (t := r.tpot) is not None],
        [r.output_tokens for r in ok],
    )


def requests_for(concurrency: int, per_worker: int = 2, minimum: int = REQUESTS_PER_ROUND) -> int:
    """Requests in one round of a level: at least `minimum`, and `per_worker` from every worker."""
    return max(minimum, per_worker * concurrency)


def run_level(ep: Endpoint, workload: Workload, concurrency: int, num_requests: int, warmup: int,
              slo: Slo | None, on_done: Callable[[RequestRecord], None] | None = None,
              stop: StopRule | None = None) -> LevelResult:
    records = asyncio.run(closed_loop(ep, workload, concurrency, num_requests, warmup, on_done, stop))
    return level_from(records, concurrency, None, closed_warmup(warmup, concurrency), slo)


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


Verdict = Literal["meets", "misses", "undecided"]


@dataclass(frozen=True)
class CapacityLevel:
    """One level as judged: `passed` and `reason` by the point estimate of the P95 E2EL;
    `verdict` by `attainment_interval`, the Wilson interval of the share of requests within the
    SLO at the search's confidence (`attainment_ci95` is the same at 95%); `rounds` measured and
    pooled into `num_requests`; each completed request's E2EL and TTFT, round after round, in the
    order they completed (absent before schema version 5)."""
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
    attainment_interval: tuple[float, float] | None = None
    verdict: Verdict | None = None
    rounds: int = 1
    e2el_samples: list[float] = field(default_factory=list)
    ttft_samples: list[float] = field(default_factory=list)

    @property
    def requests_per_agent(self) -> float:
        """Requests each agent sent in one round of this level (a round starts them all at once)."""
        return self.num_requests / max(self.rounds, 1) / self.concurrency


@dataclass(frozen=True)
class CapacityResult:
    """`max_concurrency_meeting_slo` is the point estimate; the SLO is met with confidence up to
    `capacity_low` agents and cannot be ruled out up to `capacity_high` (the levels between them
    could not be told apart). Both bounds are None in baselines written before they existed."""
    slo_p95_e2el_s: float
    workload: dict
    max_concurrency_meeting_slo: int
    levels: list[CapacityLevel]
    search_limit: int
    capacity_low: int | None = None
    capacity_high: int | None = None
    confidence: float | None = None

    @property
    def bounds(self) -> tuple[int, int]:
        """(low, high), both the point estimate where the baseline predates the range."""
        point = self.max_concurrency_meeting_slo
        return (point if self.capacity_low is None else self.capacity_low,
                point if self.capacity_high is None else self.capacity_high)

    @property
    def range_text(self) -> str:
        low, high = self.bounds
        return f"{low}" if low == high else f"{low}\u2013{high}"


@dataclass(frozen=True)
class PooledLevel:
    """Every round measured at one concurrency, judged together."""
    concurrency: int
    rounds: tuple[LevelResult, ...]

    @property
    def e2el_samples(self) -> list[float]:
        return [x for r in self.rounds for x in r.e2el_samples]

    @property
    def ttft_samples(self) -> list[float]:
        return [x for r in self.rounds for x in r.ttft_samples]

    @property
    def failed(self) -> int:
        return sum(r.metrics.failed for r in self.rounds)

    @property
    def num_requests(self) -> int:
        return sum(r.metrics.completed + r.metrics.failed for r in self.rounds)

    @property
    def output_throughput(self) -> float:
        seconds = sum(r.metrics.duration_s for r in self.rounds)
        return sum(r.metrics.total_output_tokens for r in self.rounds) / seconds if seconds else 0.0

    def adding(self, level: LevelResult) -> PooledLevel:
        return PooledLevel(self.concurrency, (*self.rounds, level))


def _percentile(samples: list[float], q: float) -> float | None:
    return float(np.percentile(samples, q)) if samples else None


def z_score(confidence: float) -> float:
    """The standard normal quantile for a two-sided interval at `confidence`."""
    return NormalDist().inv_cdf((1.0 + confidence) / 2.0)


def level_verdict(failed: int, attainment_interval: tuple[float, float]) -> Verdict:
    """Meets when the whole interval of the attainment (the share of requests within the SLO)
    is at or above SLO_QUANTILE, misses when all of it is below (or a request failed),
    undecided otherwise."""
    low, high = attainment_interval
    if failed or high < SLO_QUANTILE:
        return "misses"
    return "meets" if low >= SLO_QUANTILE else "undecided"


def point_reason(failed: int, n: int, p95: float | None, slo_s: float) -> tuple[bool, str]:
    if failed:
        return False, f"{failed} of {n} requests failed"
    if p95 is None:
        return False, "no successful request"
    if p95 > slo_s:
        return False, f"P95 E2EL {p95:.2f} s > {slo_s:g} s"
    return True, f"P95 E2EL {p95:.2f} s <= {slo_s:g} s"


def judge(level: LevelResult | PooledLevel, slo_s: float) -> CapacityLevel:
    pooled = level if isinstance(level, PooledLevel) else PooledLevel(level.concurrency or 0, (level,))
    e2el, n = pooled.e2el_samples, pooled.num_requests
    within = sum(1 for x in e2el if x <= slo_s)
    p95 = _percentile(e2el, 95)
    interval = wilson_interval(within, n, z_score(CONFIDENCE))
    passed, reason = point_reason(pooled.failed, n, p95, slo_s)
    return CapacityLevel(
        pooled.concurrency, n, pooled.failed, _percentile(e2el, 50), p95, _percentile(e2el, 99),
        _percentile(pooled.ttft_samples, 95), pooled.output_throughput, within / n if n else 0.0,
        wilson_interval(within, n), passed, reason, interval, level_verdict(pooled.failed, interval),
        len(pooled.rounds), e2el, pooled.ttft_samples,
    )


@dataclass(frozen=True)
class RoundPlan:
    """One round the search asks for: its level; whether to warm the server up first (not when
    the round before measured the same level, which left it warm); and when to stop sending."""
    concurrency: int
    warm_up: bool
    stop: StopRule


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


def misses_early(before: PooledLevel, slo_s: float) -> StopRule:
    """Stop a round once a request failed, or once the level's rounds, this one included, have
    so few requests within the SLO that the level misses it by EARLY_MISS_ALPHA's test."""
    within_before = sum(1 for x in before.e2el_samples if x <= slo_s)

    def stop(records: list[RequestRecord]) -> bool:
        if before.failed or any(not r.success for r in records):
            return True
        within = within_before + sum(1 for r in records if r.e2el is not None and r.e2el <= slo_s)
        return binomial_cdf(within, before.num_requests + len(records), SLO_QUANTILE) < EARLY_MISS_ALPHA

    return stop


def records_until(records: list[RequestRecord], stop: StopRule | None) -> list[RequestRecord]:
    """The records a round would have kept, taken in order, had `stop` (if any) been asked after
    each (for simulated rounds; requests still in flight at the stop are not modelled)."""
    if stop is None:
        return records
    for n in range(1, len(records) + 1):
        if stop(records[:n]):
            return records[:n]
    return records


class CapacityProbe:
    """The levels measured so far, pooled per concurrency, each judged on all its rounds."""

    def __init__(self, measure: Callable[[RoundPlan], LevelResult], slo_s: float,
                 on_level: Callable[[CapacityLevel], None] | None) -> None:
        self.measure, self.slo_s, self.on_level = measure, slo_s, on_level
        self.pooled: dict[int, PooledLevel] = {}
        self.judged: dict[int, CapacityLevel] = {}
        self.last: int | None = None

    @property
    def rounds(self) -> int:
        return sum(len(level.rounds) for level in self.pooled.values())

    def measure_again(self, c: int) -> CapacityLevel:
        before = self.pooled.get(c, PooledLevel(c, ()))
        plan = RoundPlan(c, warm_up=self.last != c, stop=misses_early(before, self.slo_s))
        self.last = c
        self.pooled[c] = before.adding(self.measure(plan))
        self.judged[c] = judge(self.pooled[c], self.slo_s)
        if self.on_level:
            self.on_level(self.judged[c])
        return self.judged[c]

    def passes(self, c: int) -> bool:
        level = self.judged.get(c) or self.measure_again(c)
        return level.passed


def bracket(passes: Callable[[int], bool], start: int, limit: int) -> tuple[int, int | None]:
    """Double from `start` until a level fails (or `limit`), then bisect between the last pass
    and the first fail: (largest passing level, smallest failing one or None)."""
    good, bad = 0, None
    c = start
    while c <= limit:
        if passes(c):
            good = c
            c *= 2
        else:
            bad = c
            break
    if bad is None and good < limit:
        bad = limit + 1 if passes(limit) else limit
        good = limit if bad > limit else good
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        if passes(mid):
            good = mid
        else:
            bad = mid
    return good, bad if bad is not None and bad <= limit else None


def capacity_bounds(judged: dict[int, CapacityLevel], point: int) -> tuple[int, int]:
    """Assuming latency grows with concurrency, and reading the tested levels upwards to the
    first that misses the SLO: it is met with confidence up to the largest level that meets it,
    and cannot be ruled out up to the largest level before that first miss."""
    low = high = 0
    for c in sorted(judged):
        verdict = judged[c].verdict
        if verdict == "misses":
            break
        high = c
        low = c if verdict == "meets" else low
    return min(low, point), max(high, point)


def decidable(level: CapacityLevel, most: int) -> bool:
    """Whether `most` requests could still decide the level: meet the SLO if every request left
    were within it, or miss it if they kept the attainment seen so far. One that can do neither
    sits at the SLO, and more rounds would only leave it undecided."""
    n, left = level.num_requests, most - level.num_requests
    within = level.attainment * n
    z = z_score(CONFIDENCE)
    could_meet = wilson_interval(round(within) + left, most, z)[0] >= SLO_QUANTILE
    could_miss = wilson_interval(within + left * level.attainment, most, z)[1] < SLO_QUANTILE
    return could_meet or could_miss


def settle(probe: CapacityProbe, c: int, most: int) -> CapacityLevel:
    """Measure level c again, round by round, until it is decided, has `most` requests, or can no
    longer be decided by then."""
    level = probe.judged.get(c) or probe.measure_again(c)
    while level.verdict == "undecided" and level.num_requests < most and decidable(level, most):
        level = probe.measure_again(c)
    return level


def refine_low_end(probe: CapacityProbe, point: int, most: int, steps: int) -> None:
    """When the point estimate does not meet the SLO with confidence, walk down from it, settling
    each level, until one does (at most `steps` levels), so that the range's low end is as high
    as the data allow."""
    low, _ = capacity_bounds(probe.judged, point)
    for c in range(point - 1, max(low, point - 1 - steps), -1):
        if settle(probe, c, most).verdict == "meets":
            return


def capacity_search(measure: Callable[[RoundPlan], LevelResult], slo_s: float, workload: dict,
                    start: int = 1, limit: int = 64,
                    on_level: Callable[[CapacityLevel], None] | None = None,
                    settle_requests: int = SETTLE_REQUESTS, refine_steps: int = 1) -> CapacityResult:
    """Bracket the largest concurrency whose P95 E2EL meets the SLO by point estimates (double,
    then bisect), each level measured once; settle the two levels either side of the boundary
    (measure them again until their verdict is decided, or up to `settle_requests`) and bracket
    again on what is now known, until the boundary levels are settled; if the boundary level is
    still not a confident pass, walk down from it. The answer is the point estimate and the
    range of levels the data cannot tell apart."""
    probe = CapacityProbe(measure, slo_s, on_level)
    good, bad = bracket(probe.passes, start, limit)
    while True:
        rounds_before = probe.rounds
        for c in (good, bad):
            if c:
                settle(probe, c, settle_requests)
        good, bad = bracket(probe.passes, start, limit)
        if probe.rounds == rounds_before:
            break
    refine_low_end(probe, good, settle_requests, refine_steps)
    low, high = capacity_bounds(probe.judged, good)
    return CapacityResult(slo_s, workload, good, list(probe.judged.values()), limit, low, high,
                          CONFIDENCE)
