"""How many requests a capacity level needs before its verdict means something: for n requests,
how often a level is judged to meet, miss or be undecided about a P95 SLO (bench.serving's
Wilson-interval rule at CONFIDENCE), for levels whose true P95 is a given share of the SLO, with
per-request latencies log-normal with the given spread. Also the fewest requests, all within
the SLO, that meet it.

    python -m bench.benchmarks.capacity_requests [--spread 0.25] [--trials 2000]"""
from __future__ import annotations

import argparse

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.serving import CONFIDENCE, SLO_QUANTILE, level_verdict, wilson_interval, z_score

SIZES = (8, 13, 16, 20, 32, 48, 52, 64, 96)
TRUE_P95_SHARES = (0.7, 0.9, 1.0, 1.1, 1.3)


def fewest_requests_to_meet() -> int:
    n = 1
    while wilson_interval(n, n, z_score(CONFIDENCE))[0] < SLO_QUANTILE:
        n += 1
    return n


def verdict_shares(n: int, p95_share: float, spread: float, trials: int, rng: np.random.Generator
                   ) -> dict[str, float]:
    """Shares of verdicts over `trials` levels of n requests whose true P95 is p95_share x SLO."""
    median = p95_share * np.exp(-1.6449 * spread)
    within = (median * rng.lognormal(0, spread, (trials, n)) <= 1.0).sum(axis=1)
    verdicts = [level_verdict(0, wilson_interval(int(k), n, z_score(CONFIDENCE))) for k in within]
    return {v: verdicts.count(v) / trials for v in ("meets", "undecided", "misses")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spread", type=float, default=0.25, help="log-normal sigma of one request")
    parser.add_argument("--trials", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    t = Table(title=f"verdicts (meets / undecided / misses) at {CONFIDENCE:.0%} Wilson intervals; "
                    f"per-request spread {args.spread}")
    t.add_column("requests", justify="right")
    for share in TRUE_P95_SHARES:
        t.add_column(f"true P95 = {share:g} x SLO", justify="right")
    for n in SIZES:
        cells = []
        for share in TRUE_P95_SHARES:
            s = verdict_shares(n, share, args.spread, args.trials, rng)
            cells.append(f"{s['meets']:.0%} / {s['undecided']:.0%} / {s['misses']:.0%}")
        t.add_row(str(n), *cells)
    out = Console(width=160)
    out.print(t)
    out.print(f"fewest requests, all within the SLO, that meet it: {fewest_requests_to_meet()}")


if __name__ == "__main__":
    main()
