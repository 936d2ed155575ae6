"""How often bench.compare cries wolf, and how often it sees a wolf: N pairs of synthetic runs with
no change between them and N pairs with a planted change, drawn with the noise measured on the
busy 2-core VM and with that of an assumed quiet host (bench/benchmarks/noise.py); with
--real DIR, also every pair of real baselines in DIR (runs of an unchanged kit on an unchanged
host). For each metric family it prints the share of
pairs in which some metric of the family was called *regressed*: with no change that is a false
alarm, with a planted change a detection. The old rule, a threshold on the lone figures, is
printed beside it for reference.

    python -m bench.benchmarks.compare_false_alarms [--pairs 100] [--change 0.3] [--real DIR]

Bars: a false-alarm rate of at most 5% of comparisons (any metric), and, on a quiet host, a
planted 30% change detected in at least 90% of comparisons in STREAM, storage and serving E2EL.

Last run (2-core VM, --pairs 100, with the capacity search that stops a round at a clear miss and
gives up on a level 52 requests could not decide; the serving run spread is each noise model's
own, as a user passes --run-spread). False alarms, any metric: busy VM 5% (stream 1%, each serving
family 2-3%, capacity 2%), quiet host 1% (the old threshold-only rule: 100%, 98%). Real runs, 3
back-to-back bench.all on an unchanged host, each pair through bench.compare: 0 of 3. Planted
30%: quiet host 100% of comparisons (STREAM 100%, storage 91%, net 54%, E2EL 89%, TTFT 66%, TPOT
79%, capacity 24%); busy VM 52%: one run against one run cannot tell a 30% change from a run
shift of 0.10 there."""
from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.benchmarks.noise import NOISE_BUSY_2CORE_VM, NOISE_QUIET_HOST, Noise, synthetic_baseline
from bench.compare import Comparison, compare, relative_change
from bench.report import Baseline, load_baseline

FAMILIES: dict[str, Callable[[str], bool]] = {
    "stream": lambda m: m.startswith("stream"),
    "storage": lambda m: m.startswith("storage"),
    "net": lambda m: m.startswith("net"),
    "serve E2EL": lambda m: " E2EL " in m,
    "serve TTFT": lambda m: " TTFT " in m,
    "serve TPOT": lambda m: " TPOT " in m,
    "serve output tok/s": lambda m: m.endswith("output tok/s"),
    "capacity": lambda m: m.startswith("capacity"),
    "any metric": lambda m: True,
}


@dataclass
class Tally:
    """Per family: in how many compared pairs some metric was flagged."""
    pairs: int = 0
    flagged: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAMILIES, 0))
    flagged_by_threshold: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAMILIES, 0))

    def add(self, rows: list[Comparison], threshold: float) -> None:
        self.pairs += 1
        for family, member in FAMILIES.items():
            mine = [r for r in rows if member(r.metric)]
            self.flagged[family] += any(r.verdict == "regressed" for r in mine)
            self.flagged_by_threshold[family] += any(worse_than(r, threshold) for r in mine)

    def rate(self, family: str, by_threshold: bool = False) -> float:
        counts = self.flagged_by_threshold if by_threshold else self.flagged
        return counts[family] / self.pairs if self.pairs else float("nan")


def worse_than(row: Comparison, threshold: float) -> bool:
    """The old rule: a lone figure worse by more than the threshold."""
    change = relative_change(row.before, row.after)
    return (-change if row.higher_is_better else change) > threshold


def synthetic_tallies(noise: Noise, pairs: int, change: float, threshold: float, seed: int
                      ) -> tuple[Tally, Tally]:
    rng = np.random.default_rng(seed)
    unchanged, planted = Tally(), Tally()
    for _ in range(pairs):
        before = synthetic_baseline(rng, noise)
        spread = noise.latency.run
        unchanged.add(compare(before, synthetic_baseline(rng, noise), threshold, run_spread=spread), threshold)
        planted.add(compare(before, synthetic_baseline(rng, noise, worse_by=change), threshold,
                            run_spread=spread), threshold)
    return unchanged, planted


def real_tally(folder: Path, threshold: float) -> Tally:
    runs: list[Baseline] = [load_baseline(p) for p in sorted(folder.glob("*.json"))]
    tally = Tally()
    for before, after in itertools.combinations(runs, 2):
        tally.add(compare(before, after, threshold), threshold)
    return tally


def report(tallies: dict[str, Tally], out: Console) -> None:
    t = Table(title="share of compared pairs with a metric of the family called regressed "
                    "(old threshold-only rule in brackets)")
    t.add_column("family")
    for name, tally in tallies.items():
        t.add_column(f"{name}\n({tally.pairs} pairs)", justify="right")
    for family in FAMILIES:
        t.add_row(family, *(f"{tally.rate(family):.1%} ({tally.rate(family, True):.0%})"
                            for tally in tallies.values()))
    out.print(t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=100, help="synthetic pairs of each kind")
    parser.add_argument("--change", type=float, default=0.3, help="planted change (0.3 = 30%% worse)")
    parser.add_argument("--threshold", type=float, default=0.10, help="bench.compare's threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", type=Path, help="a folder of real baselines of an unchanged kit and host")
    args = parser.parse_args()
    tallies = {}
    for label, noise in (("busy VM", NOISE_BUSY_2CORE_VM), ("quiet host", NOISE_QUIET_HOST)):
        unchanged, planted = synthetic_tallies(noise, args.pairs, args.change, args.threshold, args.seed)
        tallies |= {f"{label}, no change": unchanged, f"{label}, {args.change:.0%} worse": planted}
    if args.real:
        tallies["real runs, no change"] = real_tally(args.real, args.threshold)
    report(tallies, Console(width=200))


if __name__ == "__main__":
    main()
