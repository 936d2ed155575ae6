"""The serving-overhead bar: the added monitoring changes `bench.serve`'s output tok/s by less than 2%.

The real llama-server with the default model is started through model.running.running_model, as
`bench.serve` starts it (`--threads` adds llama-server's -t, for a machine shared with other
servers), and `bench.serve`'s closed loop (bench.serving.run_level) drives it in
rounds of about `--round-s` seconds, alternately with the monitoring stack on (monitoring.stack:
Prometheus scraping the engine's /metrics, the exporter, node_exporter and Alertmanager at the
scrape interval, rules evaluated, the exporter and webhook running) and off. Pairs run in ABBA
order (on/off, off/on, ...) so that a drift in the machine's load weighs on both sides alike, and
every round, on or off, starts after the same `--settle-s` of idle engine (a monitored round's
counted from when the stack is ready), so that no side inherits a warm engine from the round before.
Two warm-up rounds come first, neither counted: one sizes the rounds, one more lets a fresh
engine's tok/s settle.

Printed: tok/s per round with /proc/loadavg and, for the "on" rounds, the CPU the stack's
processes spent; the mean of the on rounds over the mean of the off rounds, the per-pair ratios
with a 95% interval, and met/missed. The bar is met when the mean ratio is within 2% of 1; where
the interval is wider than the bar on a busy machine, the verdict says so.

`python -m monitoring.benchmarks.serving_overhead [--pairs 4] [--round-s 45] [--concurrency 4]
[--scrape-interval 15] [--json out.json]`"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.loadgen import Endpoint, probe
from bench.serving import run_level
from bench.workloads import make_workload
from dgxready.progress import console, waiting
from dgxready.settings import Settings, load_settings
from model.running import RunningModel, running_model
from monitoring.benchmarks.exporter_bars import cpu_seconds
from monitoring.prometheus.config import EngineTarget
from monitoring.settings import MonitoringSettings
from monitoring.stack import MonitoringStack, StackTargets, start_stack, stop_stack

BAR = 0.02
# Student's t, two-sided 95%, by degrees of freedom; beyond 10 the 10's value (a wider interval).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
ON, OFF = "on", "off"


@dataclass(frozen=True)
class Options:
    pairs: int
    round_s: float
    concurrency: int
    max_tokens: int
    workload: str
    scrape_interval_s: float
    settle_s: float
    threads: int | None


@dataclass(frozen=True)
class RoundResult:
    pair: int
    side: str
    requests: int
    seconds: float
    output_tok_s: float
    failed: int
    loadavg_before: str
    loadavg_after: str
    stack_cpu_s: float | None = None

    @property
    def stack_cpu_percent(self) -> float | None:
        return None if self.stack_cpu_s is None else 100 * self.stack_cpu_s / self.seconds


@dataclass(frozen=True)
class Verdict:
    mean_on: float
    mean_off: float
    mean_ratio: float
    pair_ratios: list[float]
    pair_ratio_ci95: tuple[float, float] | None
    met: bool
    decided: bool


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def stack_cpu(stack: MonitoringStack) -> float:
    total = 0.0
    for proc in stack.processes:
        try:
            total += cpu_seconds(proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def measure(ep: Endpoint, opts: Options, requests: int, pair: int, side: str,
            stack: MonitoringStack | None) -> RoundResult:
    workload = make_workload(opts.workload, max_tokens=opts.max_tokens)
    before, cpu0 = loadavg(), stack_cpu(stack) if stack else None
    started = time.monotonic()
    with waiting(f"pair {pair + 1}, monitoring {side}: {requests} requests at c={opts.concurrency}"):
        level = run_level(ep, workload, opts.concurrency, requests, 0, None)
    seconds = time.monotonic() - started
    cpu = stack_cpu(stack) - cpu0 if stack else None
    result = RoundResult(pair, side, requests, seconds, level.metrics.output_throughput, level.metrics.failed,
                         before, loadavg(), cpu)
    console.print(round_line(result))
    return result


def round_line(r: RoundResult) -> str:
    cpu = f", stack CPU {r.stack_cpu_percent:.1f}% of a core" if r.stack_cpu_s is not None else ""
    failed = f", {r.failed} failed" if r.failed else ""
    return (f"  pair {r.pair + 1} monitoring {r.side:>3}: {r.output_tok_s:7.1f} output tok/s "
            f"({r.requests} requests, {r.seconds:.1f} s{failed}{cpu}; loadavg {r.loadavg_before} -> "
            f"{r.loadavg_after})")


def calibrate(ep: Endpoint, opts: Options) -> int:
    """Requests for a round of about `round_s`, from a warm-up round (which also warms the engine)."""
    workload = make_workload(opts.workload, max_tokens=opts.max_tokens)
    n = 4 * opts.concurrency
    with waiting(f"warm-up: {n} requests at c={opts.concurrency}"):
        started = time.monotonic()
        run_level(ep, workload, opts.concurrency, n, 0, None)
        seconds = time.monotonic() - started
    requests = max(2 * opts.concurrency, round(n * opts.round_s / seconds))
    console.print(f"warm-up: {n} requests in {seconds:.1f} s; {requests} requests per round")
    return requests


def warm_up(ep: Endpoint, opts: Options, requests: int) -> None:
    """A whole round more, not counted: a fresh engine's tok/s still rises over the first rounds,
    and the first pair would take the rise for a difference between its sides."""
    workload = make_workload(opts.workload, max_tokens=opts.max_tokens)
    with waiting(f"warm-up round, not counted: {requests} requests at c={opts.concurrency}"):
        run_level(ep, workload, opts.concurrency, requests, 0, None)


def stack_settings(opts: Options) -> MonitoringSettings:
    # No multiplexer runs here: bench.serve's traffic goes straight to the engine.
    return MonitoringSettings(scrape_interval_s=opts.scrape_interval_s,
                              evaluation_interval_s=opts.scrape_interval_s, mux_url=None)


def monitored_round(ep: Endpoint, served: RunningModel, opts: Options, requests: int, pair: int,
                    settings: Settings) -> RoundResult:
    engine = EngineTarget(served.base_url, served.state.backend, ep.model)
    stack = start_stack(settings, stack_settings(opts), StackTargets(engines=[engine]))
    try:
        with waiting(f"monitoring on: settling for {opts.settle_s:.0f} s"):
            time.sleep(opts.settle_s)
        return measure(ep, opts, requests, pair, ON, stack)
    finally:
        stop_stack(settings)
        shutil.rmtree(Path(stack.paths.root) / "prometheus" / "data", ignore_errors=True)
        shutil.rmtree(Path(stack.paths.root) / "alertmanager" / "data", ignore_errors=True)


def unmonitored_round(ep: Endpoint, opts: Options, requests: int, pair: int) -> RoundResult:
    """The same idle time before the round as a monitored round has, so that neither side is the
    one that starts on an engine still warm from the round before."""
    with waiting(f"monitoring off: settling for {opts.settle_s:.0f} s"):
        time.sleep(opts.settle_s)
    return measure(ep, opts, requests, pair, OFF, None)


def verdict(rounds: list[RoundResult]) -> Verdict:
    on = {r.pair: r.output_tok_s for r in rounds if r.side == ON}
    off = {r.pair: r.output_tok_s for r in rounds if r.side == OFF}
    ratios = [on[p] / off[p] for p in sorted(on) if off.get(p)]
    mean_on, mean_off = float(np.mean(list(on.values()))), float(np.mean(list(off.values())))
    ratio = mean_on / mean_off
    ci = None
    if len(ratios) >= 2:
        half = T95[min(len(ratios) - 1, 10)] * np.std(ratios, ddof=1) / np.sqrt(len(ratios))
        ci = (float(np.mean(ratios) - half), float(np.mean(ratios) + half))
    met = abs(1 - ratio) < BAR
    return Verdict(mean_on, mean_off, ratio, ratios, ci, met, decided(ci, met))


def decided(ci: tuple[float, float] | None, met: bool) -> bool:
    """Whether the interval lies wholly on the verdict's side of the bar."""
    if ci is None:
        return False
    inside = 1 - BAR < ci[0] and ci[1] < 1 + BAR
    outside = ci[1] < 1 - BAR or ci[0] > 1 + BAR
    return inside if met else outside


def print_verdict(v: Verdict) -> None:
    console.print(f"mean output tok/s: monitoring on {v.mean_on:.1f}, off {v.mean_off:.1f}; "
                  f"ratio on/off {v.mean_ratio:.4f} ({100 * (v.mean_ratio - 1):+.2f}%)")
    pairs = ", ".join(f"{r:.4f}" for r in v.pair_ratios)
    ci = f"; 95% interval of the pair mean {v.pair_ratio_ci95[0]:.4f}-{v.pair_ratio_ci95[1]:.4f}" \
        if v.pair_ratio_ci95 else ""
    console.print(f"per-pair ratios: {pairs}{ci}")
    status = "met" if v.met else "missed"
    sure = "" if v.decided else " (by the point estimate; the interval is wider than the bar on this machine)"
    console.print(f"bar (|change| < {100 * BAR:g}%): {status}{sure}")


def run(opts: Options) -> tuple[list[RoundResult], Verdict]:
    settings = load_settings()
    rounds: list[RoundResult] = []
    extra = ("-t", str(opts.threads)) if opts.threads else ()
    with running_model(parallel=opts.concurrency, ctx_per_slot=2048, extra_args=extra,
                       settings=settings) as served:
        ep = Endpoint(served.base_url, probe(served.base_url))
        requests = calibrate(ep, opts)
        warm_up(ep, opts, requests)
        for pair in range(opts.pairs):
            for side in ((ON, OFF) if pair % 2 == 0 else (OFF, ON)):
                if side == ON:
                    rounds.append(monitored_round(ep, served, opts, requests, pair, settings))
                else:
                    rounds.append(unmonitored_round(ep, opts, requests, pair))
    result = verdict(rounds)
    print_verdict(result)
    return rounds, result


def parse_args() -> tuple[Options, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4, help="on/off pairs, in ABBA order")
    parser.add_argument("--round-s", type=float, default=45.0, help="about how long each round runs")
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop workers (and server slots)")
    parser.add_argument("--max-tokens", type=int, default=128, help="bench.serve's default output cap")
    parser.add_argument("--workload", default="synthetic", help="bench.serve's default workload")
    parser.add_argument("--scrape-interval", type=float, default=15.0, help="Prometheus scrape interval, s")
    parser.add_argument("--settle-s", type=float, default=10.0,
                        help="idle time before every round (monitored: after the stack is ready)")
    parser.add_argument("--threads", type=int, help="llama-server -t (default: all cores, as bench.serve)")
    parser.add_argument("--json", type=Path, help="write the rounds and the verdict here")
    args = parser.parse_args()
    return Options(args.pairs, args.round_s, args.concurrency, args.max_tokens, args.workload,
                   args.scrape_interval, args.settle_s, args.threads), args.json


def interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # so that the server and the stack are stopped on the way out


def main() -> None:
    opts, out = parse_args()
    signal.signal(signal.SIGTERM, interrupt)
    # A private state folder: the stack's record and the server's never meet the user's.
    os.environ["DGXREADY_STATE_DIR"] = tempfile.mkdtemp(prefix="dgxready-serving-overhead-")
    console.print(f"{os.cpu_count()} cores, loadavg {loadavg()} at the start")
    rounds, result = run(opts)
    console.print(f"loadavg {loadavg()} at the end")
    if out:
        doc = {"options": asdict(opts), "rounds": [asdict(r) | {"stack_cpu_percent": r.stack_cpu_percent}
                                                   for r in rounds], "verdict": asdict(result)}
        out.write_text(json.dumps(doc, indent=2))
    shutil.rmtree(os.environ["DGXREADY_STATE_DIR"], ignore_errors=True)


if __name__ == "__main__":
    main()
