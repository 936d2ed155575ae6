"""Synthetic baselines whose figures move between runs as measured ones do, for judging
bench.compare: every figure is a base value times a run-wide factor (what changes from one run
to the next: the other tenants, thread placement, caches) times a per-sample factor (request to
request, repetition to repetition), both log-normal. Two sets of spreads: those measured on the
busy 2-core development VM, and those of an assumed quiet host; `worse_by` plants a change."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.compare import SERVING_RUN_SPREAD
from bench.environment import Environment
from bench.hw import Check, HostFacts
from bench.loadgen import StopRule
from bench.metrics import RequestRecord
from bench.net import NetResult
from bench.report import Baseline, Hardware, Micro, Serving, ServingLevel
from bench.serving import (
    CapacityResult,
    LevelResult,
    RoundPlan,
    capacity_search,
    level_from,
    records_until,
    requests_for,
)
from bench.storage import IoResult, StorageResult
from bench.stream import StreamResult


@dataclass(frozen=True)
class Spread:
    """Log-normal sigmas: of the factor shared by a whole run, and of each sample within it."""
    run: float
    sample: float


SWEEP_LEVELS = (1, 2, 4, 8, 16)
SWEEP_REQUESTS = tuple(requests_for(c, per_worker=2, minimum=8) for c in SWEEP_LEVELS)   # as bench.runner


@dataclass(frozen=True)
class Noise:
    stream: Spread
    storage: Spread
    net_gbps: Spread
    rtt_modes_us: tuple[float, ...]
    rtt_mode_weights: tuple[float, ...]
    latency: Spread
    sweep_requests: tuple[int, ...]


# Host spreads measured on the 2-core development VM while other work moved its load average
# between 2 and 11 (eleven back-to-back runs of STREAM, storage and loopback: the spread of the
# log of each sample within a run, and of the runs' medians beyond what that explains). The
# serving spreads: 20% request to request (assumed), and a whole run's shift of 0.10 (the median
# over three back-to-back bench.all runs, bench.compare's SERVING_RUN_SPREAD).
# Requests per level are bench.runner's.
NOISE_BUSY_2CORE_VM = Noise(
    stream=Spread(run=0.37, sample=0.30),
    storage=Spread(run=0.30, sample=0.35),
    net_gbps=Spread(run=0.25, sample=0.43),
    rtt_modes_us=(8.0, 12.0, 65.0),
    rtt_mode_weights=(0.4, 0.45, 0.15),
    latency=Spread(run=SERVING_RUN_SPREAD, sample=0.20),
    sweep_requests=SWEEP_REQUESTS,
)

# An assumed quiet, dedicated host (a DGX Spark serving nothing else): host figures within a few
# percent from sample to sample and from run to run.
NOISE_QUIET_HOST = Noise(
    stream=Spread(run=0.02, sample=0.03),
    storage=Spread(run=0.03, sample=0.05),
    net_gbps=Spread(run=0.02, sample=0.05),
    rtt_modes_us=(8.0, 9.0),
    rtt_mode_weights=(0.5, 0.5),
    latency=Spread(run=0.03, sample=0.20),
    sweep_requests=SWEEP_REQUESTS,
)

STREAM_GBPS = {"copy": 14.0, "scale": 7.7, "add": 6.4, "triad": 5.5}
STORAGE_IOPS = {"seq_write_1m": 900.0, "seq_read_1m": 890.0, "rand_read_4k_qd1": 7000.0,
                "rand_read_4k_qd16": 40000.0}


def _factor(rng: np.random.Generator, sigma: float, size: int | None = None):
    return rng.lognormal(0.0, sigma, size)


def _samples(rng: np.random.Generator, base: float, spread: Spread, n: int) -> list[float]:
    return (base * _factor(rng, spread.run) * _factor(rng, spread.sample, n)).tolist()


def _stream(rng, noise: Noise, worse: float) -> StreamResult:
    reps = {op: _samples(rng, gbps * (1 - worse), noise.stream, 10) for op, gbps in STREAM_GBPS.items()}
    return StreamResult(64 << 20, 2, 10, {op: max(v) for op, v in reps.items()}, None, reps)


def _storage(rng, noise: Noise, worse: float) -> StorageResult:
    jobs = []
    for name, iops in STORAGE_IOPS.items():
        windows = _samples(rng, iops * (1 - worse), noise.storage, 10)
        block = 1 << 20 if name.startswith("seq") else 4096
        mean = float(np.mean(windows))
        jobs.append(IoResult(name, block, 16 if name.endswith("16") else 1, "direct", mean * block / 1e6,
                             mean, 100.0, 1000.0, 3.0, windows))
    return StorageResult("/store", 1 << 30, "direct", jobs)


def _net(rng, noise: Noise, worse: float) -> NetResult:
    gbps = _samples(rng, 11.0 * (1 - worse), noise.net_gbps, 10)
    weights = rng.dirichlet(np.asarray(noise.rtt_mode_weights) * 20)
    modes = rng.choice(noise.rtt_modes_us, size=10, p=weights)
    rtts = (modes * (1 + worse) * _factor(rng, 0.05, 10)).tolist()
    return NetResult("127.0.0.1:1", float(np.mean(gbps)), float(np.median(rtts)), 1000.0, 2.0, gbps, rtts)


def _records(rng, e2el: list[float], tokens: int = 128) -> list[RequestRecord]:
    """Requests back to back; TTFT about a tenth of each E2EL, with its own spread."""
    ttft = np.asarray(e2el) * 0.1 * _factor(rng, 0.2, len(e2el))
    starts = np.concatenate([[0.0], np.cumsum(e2el)[:-1]])
    return [RequestRecord(sent_at=float(t), prompt_tokens=50, output_tokens=tokens, ttft=float(f), e2el=x,
                          success=True, finish_reason="length", ended_at=float(t) + x)
            for t, f, x in zip(starts, ttft, e2el, strict=True)]


def sweep_median_e2el_s(c: int) -> float:
    return 1.8 * (1 + 0.45 * (c - 1))


def capacity_median_e2el_s(c: int) -> float:
    return 1.03 * c


def _level(rng, c: int, n: int, median_s: float, noise: Noise, run_factor: float,
           stop: StopRule | None = None) -> LevelResult:
    e2el = (median_s * run_factor * _factor(rng, noise.latency.sample, n)).tolist()
    return level_from(records_until(_records(rng, e2el), stop), c, None, 0, None)


def _serving(rng, noise: Noise, worse: float, run_factor: float) -> Serving:
    levels = [ServingLevel.of(_level(rng, c, n, sweep_median_e2el_s(c) * (1 + worse), noise, run_factor))
              for c, n in zip(SWEEP_LEVELS, noise.sweep_requests, strict=True)]
    return Serving(url="http://127.0.0.1:1", model="smollm2-135m", backend="llamacpp", started_server=True,
                   workload={"name": "synthetic", "max_tokens": 128}, mode="closed", levels=levels)


def _capacity(rng, noise: Noise, worse: float, run_factor: float) -> CapacityResult:
    def measure(plan: RoundPlan) -> LevelResult:
        c = plan.concurrency
        return _level(rng, c, requests_for(c), capacity_median_e2el_s(c) * (1 + worse), noise, run_factor,
                      plan.stop)

    return capacity_search(measure, 6.0, {"name": "agents", "max_tokens": 128}, limit=32)


ENVIRONMENT = Environment("0.1.0", None, "3.11", "linux", "glibc", {}, {}, None, None)
HARDWARE = Hardware(host=HostFacts("vm", "cpu", "x86_64", 2, 8 << 30, 4 << 30, None, "6", "debian", None),
                    gpus=[], profile="generic", checks=[Check("generic profile", True, "")],
                    profile_passed=True)


def wrap(micro: Micro | None = None, serving: Serving | None = None,
         capacity: CapacityResult | None = None) -> Baseline:
    return Baseline(created_at="2025-01-01T00:00:00Z", host="vm", environment=ENVIRONMENT,
                    hardware=HARDWARE, micro=micro or Micro(), serving=serving, capacity=capacity)


def synthetic_baseline(rng: np.random.Generator, noise: Noise = NOISE_BUSY_2CORE_VM,
                       worse_by: float = 0.0, with_capacity: bool = True) -> Baseline:
    """One run: host figures, a serving sweep and (optionally) a capacity search. `worse_by`
    lowers every bandwidth by that share and raises every latency by it."""
    run_factor = float(_factor(rng, noise.latency.run))
    micro = Micro(stream=_stream(rng, noise, worse_by), storage=_storage(rng, noise, worse_by),
                  network=[_net(rng, noise, worse_by)])
    capacity = _capacity(rng, noise, worse_by, run_factor) if with_capacity else None
    return wrap(micro, _serving(rng, noise, worse_by, run_factor), capacity)
