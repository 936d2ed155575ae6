"""Small nonparametric statistics in numpy: the Mann-Whitney U test, bootstrap confidence
intervals of a statistic and of the relative change between two samples, and Holm's step-down
adjustment of several p-values."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Statistic = Callable[[np.ndarray], np.ndarray]
BOOTSTRAP_ROUNDS = 2000
EXACT_MAX_PAIRS = 400


def median_of_rows(rows: np.ndarray) -> np.ndarray:
    return np.median(rows, axis=-1)


def p95_of_rows(rows: np.ndarray) -> np.ndarray:
    return np.percentile(rows, 95, axis=-1)


STATISTICS: dict[str, Statistic] = {"median": median_of_rows, "p95": p95_of_rows}


@dataclass(frozen=True)
class MannWhitney:
    u: float
    p_value: float
    exact: bool


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def u_distribution(n1: int, n2: int) -> np.ndarray:
    """Number of orderings of n1 + n2 distinct values giving each U = 0 .. n1*n2 (the exact null)."""
    counts = [[np.zeros(1, dtype=float) for _ in range(n2 + 1)] for _ in range(n1 + 1)]
    for i in range(n1 + 1):
        for j in range(n2 + 1):
            if i == 0 or j == 0:
                counts[i][j] = np.ones(1)
                continue
            size = i * j + 1
            total = np.zeros(size)
            without_x = counts[i - 1][j]
            total[j:j + len(without_x)] += without_x
            without_y = counts[i][j - 1]
            total[:len(without_y)] += without_y
            counts[i][j] = total
    return counts[n1][n2]


def _exact_p(u: float, n1: int, n2: int) -> float:
    dist = u_distribution(n1, n2)
    tail_u = min(u, n1 * n2 - u)
    tail = dist[: int(math.floor(tail_u)) + 1].sum() / dist.sum()
    return float(min(1.0, 2.0 * tail))


def _normal_p(u: float, n1: int, n2: int, ranks: np.ndarray) -> float:
    n = n1 + n2
    _, tie_sizes = np.unique(ranks, return_counts=True)
    tie_term = float((tie_sizes ** 3 - tie_sizes).sum()) / (n * (n - 1))
    variance = n1 * n2 / 12.0 * (n + 1 - tie_term)
    if variance <= 0:
        return 1.0
    z = (abs(u - n1 * n2 / 2.0) - 0.5) / math.sqrt(variance)
    return min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2.0)))


def mann_whitney(x: Sequence[float], y: Sequence[float]) -> MannWhitney:
    """Two-sided Mann-Whitney U test of x against y: exact when the samples are small and have
    no ties, otherwise the normal approximation with tie and continuity corrections."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        return MannWhitney(0.0, 1.0, False)
    ranks = average_ranks(np.concatenate([a, b]))
    u = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2.0)
    if n1 * n2 <= EXACT_MAX_PAIRS and len(np.unique(ranks)) == n1 + n2:
        return MannWhitney(u, _exact_p(u, n1, n2), True)
    return MannWhitney(u, _normal_p(u, n1, n2, ranks), False)


def resampled(values: Sequence[float], rng: np.random.Generator, rounds: int) -> np.ndarray:
    data = np.asarray(values, dtype=float)
    return data[rng.integers(0, len(data), size=(rounds, len(data)))]


def bootstrap_interval(values: Sequence[float], statistic: Statistic, confidence: float = 0.95,
                       seed: int = 0, rounds: int = BOOTSTRAP_ROUNDS) -> tuple[float, float]:
    """Percentile bootstrap interval of statistic(values)."""
    estimates = statistic(resampled(values, np.random.default_rng(seed), rounds))
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(estimates, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_relative_change(before: Sequence[float], after: Sequence[float], statistic: Statistic,
                              confidence: float = 0.95, seed: int = 0,
                              rounds: int = BOOTSTRAP_ROUNDS) -> tuple[float, float]:
    """Percentile bootstrap interval of statistic(after) / statistic(before) - 1, each sample
    resampled on its own."""
    rng = np.random.default_rng(seed)
    base = statistic(resampled(before, rng, rounds))
    new = statistic(resampled(after, rng, rounds))
    ratios = np.divide(new, base, out=np.full(rounds, np.nan), where=base != 0) - 1.0
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.nanpercentile(ratios, [tail, 100.0 - tail])
    return float(low), float(high)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: compare each with the family's alpha to keep the
    chance of any false positive in the family below alpha."""
    m = len(p_values)
    order = np.argsort(p_values, kind="mergesort")
    adjusted = np.empty(m)
    running = 0.0
    for position, index in enumerate(order):
        running = max(running, min(1.0, (m - position) * p_values[index]))
        adjusted[index] = running
    return adjusted.tolist()
