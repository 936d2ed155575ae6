"""Compare two baselines metric by metric, telling noise from change.

Each metric is compared on what both baselines hold for it: per-request samples (E2EL, TTFT,
TPOT), repeated host measurements (STREAM repetitions, storage windows, network rounds), the
capacity range, or, in older baselines, a lone figure. With samples on both sides, the change
is tested with a two-sided Mann-Whitney U test (p-values Holm-adjusted over the whole table)
and bounded by a 95% bootstrap interval of the relative change of the statistic compared. A
host figure's interval is widened by a run-to-run allowance (see `with_run_allowance`): its
samples come from one run, and a whole run can shift with what else the host is doing. A
serving figure's interval is widened the same way by an assumed run-to-run spread (`run_spread`,
the standard deviation of the log of a whole run's shift): its requests share their run's
conditions, so they cannot show how far the next run may move.

A metric is *unchanged* when it moved less than the threshold. Beyond the threshold, it has
*regressed* (or *improved*) only when the change is significant (adjusted p below alpha, and
for the capacity disjoint ranges) and the whole interval of the change lies beyond the
threshold. Anything else beyond the threshold is *inconclusive*: the data cannot tell it from
noise, and a lone figure never can."""
from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from rich.table import Table

from bench.report import Baseline
from bench.stats import STATISTICS, bootstrap_relative_change, holm, mann_whitney

Verdict = Literal["improved", "regressed", "unchanged", "inconclusive"]
ALPHA = 0.05
MIN_SAMPLES = 2
Z95 = 1.959964
# Eleven back-to-back runs of the host benchmarks on the busy 2-core VM: the run-to-run spread of
# a figure was up to 1.31 times the spread of its samples within a run (STREAM scale); 2 leaves
# room for a busier day (bench/benchmarks/compare_false_alarms.py).
RUN_TO_SAMPLE_SPREAD = 2.0
HOST_UNITS = ("repetitions", "windows", "rounds")
# Three back-to-back bench.all runs on the busy 2-core VM: the log of a serving figure (E2EL, TTFT,
# TPOT at c >= 2) moved between runs with a median standard deviation of 0.10 (0.02 to 0.24).
SERVING_RUN_SPREAD = 0.10
VERDICT_STYLE = {"regressed": "bold red", "improved": "green", "inconclusive": "yellow",
                 "unchanged": "dim"}


@dataclass(frozen=True)
class Figure:
    """One metric of one baseline: its headline figure and what it was computed from."""
    name: str
    higher_is_better: bool
    headline: float
    samples: tuple[float, ...] = ()
    statistic: str = "median"
    unit: str = "samples"
    bounds: tuple[int, int] | None = None

    @property
    def sampled_value(self) -> float:
        return float(STATISTICS[self.statistic](list(self.samples)))


@dataclass(frozen=True)
class Evidence:
    """What a pair of figures allows: the compared values, an interval of the relative change
    (a bootstrap interval, or for ranges the least and the most change they allow) and, for
    samples, the raw p-value of the Mann-Whitney test."""
    before: float
    after: float
    description: str
    interval: tuple[float, float] | None = None
    p_value: float | None = None


@dataclass(frozen=True)
class Comparison:
    metric: str
    before: float
    after: float
    higher_is_better: bool
    evidence: str
    interval: tuple[float, float] | None
    p_adjusted: float | None
    verdict: Verdict

    @property
    def relative(self) -> float:
        return relative_change(self.before, self.after)


def relative_change(before: float, after: float) -> float:
    if before == 0:
        return 0.0 if after == 0 else math.copysign(math.inf, after)
    return (after - before) / abs(before)


def _host_figures(b: Baseline) -> Iterator[Figure]:
    stream = b.micro.stream
    if stream:
        for op, best in stream.best_gbps.items():
            reps = (stream.gbps_samples or {}).get(op, [])
            yield Figure(f"stream {op} GB/s", True, best, tuple(reps), unit="repetitions")
    for job in b.micro.storage.jobs if b.micro.storage else []:
        windows = tuple(job.iops_samples or ())
        if job.name.startswith("seq"):
            yield Figure(f"storage {job.name} MB/s", True, job.bandwidth_mbps,
                         tuple(x * job.block_bytes / 1e6 for x in windows), unit="windows")
        else:
            yield Figure(f"storage {job.name} IOPS", True, job.iops, windows, unit="windows")
    for net in b.micro.network:
        host = net.target.split(":")[0]
        yield Figure(f"net {host} Gbit/s", True, net.throughput_gbps,
                     tuple(net.throughput_samples_gbps or ()), unit="rounds")
        yield Figure(f"net {host} RTT p50 us", False, net.rtt_p50_us,
                     tuple(net.rtt_p50_samples_us or ()), unit="rounds")


def _serving_figures(b: Baseline) -> Iterator[Figure]:
    for lv in b.serving.levels if b.serving else []:
        key = f"c={lv.concurrency}" if lv.concurrency else f"rate={lv.request_rate}"
        m = lv.metrics
        for label, dist, samples in (("E2EL", m.e2el, lv.e2el_samples), ("TTFT", m.ttft, lv.ttft_samples),
                                     ("TPOT", m.tpot, lv.tpot_samples or [])):
            if dist is None:
                continue
            yield Figure(f"serve {key} {label} p50 s", False, dist.p50, tuple(samples), "median",
                         "requests")
            if label != "TPOT":
                yield Figure(f"serve {key} {label} p95 s", False, dist.p95, tuple(samples), "p95",
                             "requests")
        yield Figure(f"serve {key} output tok/s", True, m.output_throughput)


def _capacity_figures(b: Baseline) -> Iterator[Figure]:
    cap = b.capacity
    if cap:
        bounds = (cap.capacity_low, cap.capacity_high) if cap.capacity_low is not None else None
        yield Figure("capacity (agents within SLO)", True, cap.max_concurrency_meeting_slo,
                     bounds=bounds)
    if b.roofline:
        yield Figure("decode tok/s (single stream)", True, b.roofline.decode_tokens_per_s)


def figures(b: Baseline) -> dict[str, Figure]:
    return {f.name: f for part in (_host_figures, _serving_figures, _capacity_figures) for f in part(b)}


def log_spread(samples: tuple[float, ...]) -> float:
    """A robust standard deviation of the logarithm of the positive samples (IQR / 1.349)."""
    logs = np.log([x for x in samples if x > 0])
    if len(logs) < 2:
        return math.inf
    q1, q3 = np.percentile(logs, [25, 75])
    return float(q3 - q1) / 1.349


def host_run_allowance(a: Figure, b: Figure) -> float:
    """One run's host figure is assumed to move between runs RUN_TO_SAMPLE_SPREAD times as much
    as one of its samples moves within the run."""
    return Z95 * RUN_TO_SAMPLE_SPREAD * math.hypot(log_spread(a.samples), log_spread(b.samples))


def serving_run_allowance(run_spread: float) -> float:
    return Z95 * math.sqrt(2.0) * run_spread


def with_run_allowance(interval: tuple[float, float], before: float, after: float,
                       allowance: float) -> tuple[float, float]:
    """Widen an interval of a relative change by what whole runs may shift: the interval of the
    log ratio grows, in quadrature, by `allowance` (z times the spread of the log ratio of two
    runs)."""
    if before <= 0 or after <= 0 or interval[0] <= -1 or not math.isfinite(interval[1]):
        return interval
    centre = math.log(after / before)
    below = math.hypot(centre - math.log1p(interval[0]), allowance)
    above = math.hypot(math.log1p(interval[1]) - centre, allowance)
    return math.expm1(centre - below), math.expm1(centre + above)


def _sample_evidence(a: Figure, b: Figure, run_spread: float) -> Evidence:
    test = mann_whitney(a.samples, b.samples)
    interval = bootstrap_relative_change(a.samples, b.samples, STATISTICS[a.statistic],
                                         seed=zlib.crc32(a.name.encode()))
    before, after = a.sampled_value, b.sampled_value
    allowance = host_run_allowance(a, b) if a.unit in HOST_UNITS else serving_run_allowance(run_spread)
    interval = with_run_allowance(interval, before, after, allowance)
    return Evidence(before, after, f"{a.statistic} of {len(a.samples)} vs {len(b.samples)} {a.unit}",
                    interval, test.p_value)


def _range_evidence(a: Figure, b: Figure, run_spread: float) -> Evidence:
    """A capacity range holds one run's sampling uncertainty; the whole run's shift widens it
    as it does the latencies the capacity is read from."""
    (a_low, a_high), (b_low, b_high) = a.bounds, b.bounds
    least, most = relative_change(a_high, b_low), relative_change(a_low, b_high)
    interval = with_run_allowance((min(least, most), max(least, most)), a.headline, b.headline,
                                  serving_run_allowance(run_spread))
    return Evidence(a.headline, b.headline, f"ranges {a_low}-{a_high} vs {b_low}-{b_high}", interval)


def evidence(a: Figure, b: Figure, run_spread: float = SERVING_RUN_SPREAD) -> Evidence:
    if len(a.samples) >= MIN_SAMPLES and len(b.samples) >= MIN_SAMPLES:
        return _sample_evidence(a, b, run_spread)
    if a.bounds and b.bounds:
        return _range_evidence(a, b, run_spread)
    return Evidence(a.headline, b.headline, "single values")


def judge(change: float, higher_is_better: bool, significant: bool,
          interval: tuple[float, float] | None, threshold: float) -> Verdict:
    if abs(change) <= threshold:
        return "unchanged"
    beyond = interval is not None and (interval[0] > threshold or interval[1] < -threshold)
    if not (significant and beyond):
        return "inconclusive"
    worse = -change if higher_is_better else change
    return "regressed" if worse > 0 else "improved"


def _significant(ev: Evidence, p_adjusted: float | None, alpha: float) -> bool:
    if ev.interval is None:
        return False
    excludes_no_change = ev.interval[0] > 0 or ev.interval[1] < 0
    if ev.p_value is None:
        return excludes_no_change
    return p_adjusted is not None and p_adjusted < alpha and excludes_no_change


def compare(a: Baseline, b: Baseline, threshold: float = 0.10, alpha: float = ALPHA,
            run_spread: float = SERVING_RUN_SPREAD) -> list[Comparison]:
    """`run_spread`: how far a whole run's serving figures may shift from run to run (standard
    deviation of the log); 0.10 as measured on a busy shared VM, a few hundredths on a
    dedicated host."""
    fa, fb = figures(a), figures(b)
    names = [name for name in fa if name in fb]
    found = [evidence(fa[name], fb[name], run_spread) for name in names]
    tested = [i for i, ev in enumerate(found) if ev.p_value is not None]
    adjusted = dict(zip(tested, holm([found[i].p_value for i in tested]), strict=True))
    rows = []
    for i, (name, ev) in enumerate(zip(names, found, strict=True)):
        p_adj = adjusted.get(i)
        change = relative_change(ev.before, ev.after)
        verdict = judge(change, fa[name].higher_is_better, _significant(ev, p_adj, alpha), ev.interval,
                        threshold)
        rows.append(Comparison(name, ev.before, ev.after, fa[name].higher_is_better, ev.description,
                               ev.interval, p_adj, verdict))
    return rows


def regressions(rows: list[Comparison]) -> list[Comparison]:
    return [row for row in rows if row.verdict == "regressed"]


def _percent(x: float) -> str:
    return f"{x:+.1%}" if math.isfinite(x) else ("+inf" if x > 0 else "-inf")


def comparison_table(rows: list[Comparison], table: Table) -> Table:
    """Fill `table` (made by the caller, who knows the console) with one row per metric."""
    for col in ("metric", "compared on", "before", "after", "change", "95% CI of change", "p (Holm)",
                "verdict"):
        table.add_column(col, justify="left" if col in ("metric", "compared on", "verdict") else "right")
    for row in rows:
        ci = f"{_percent(row.interval[0])} .. {_percent(row.interval[1])}" if row.interval else "-"
        p = f"{row.p_adjusted:.3g}" if row.p_adjusted is not None else "-"
        table.add_row(row.metric, row.evidence, f"{row.before:.4g}", f"{row.after:.4g}",
                      _percent(row.relative), ci, p, f"[{VERDICT_STYLE[row.verdict]}]{row.verdict}[/]")
    return table


def table_title(before: str, after: str, threshold: float) -> str:
    return (f"{before} -> {after}: a change beyond {threshold:.0%} counts when significant "
            f"(Mann-Whitney, Holm-adjusted alpha {ALPHA:g}) and its whole 95% interval is beyond it")
