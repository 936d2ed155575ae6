"""PNG plots of a run: latency percentiles and throughput vs concurrency, TTFT/ITL
distributions, and the capacity search."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.serving import CapacityResult, LevelResult  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def latency_vs_concurrency(levels: list[LevelResult], slo_s: float | None, path: Path) -> Path:
    pts = [lv for lv in levels if lv.metrics.e2el and lv.concurrency]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [lv.concurrency for lv in pts]
    for p in ("p50", "p90", "p95", "p99"):
        ax.plot(xs, [getattr(lv.metrics.e2el, p) for lv in pts], marker="o", label=f"E2EL {p}")
    ax.plot(xs, [lv.metrics.ttft.p95 for lv in pts], marker="x", ls="--", label="TTFT p95")
    if slo_s:
        ax.axhline(slo_s, color="red", ls=":", label=f"SLO P95 {slo_s:g} s")
    ax.set(xlabel="concurrent requests", ylabel="seconds", title="Latency vs concurrency")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def throughput_vs_concurrency(levels: list[LevelResult], path: Path) -> Path:
    pts = [lv for lv in levels if lv.concurrency]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [lv.concurrency for lv in pts]
    ax.plot(xs, [lv.metrics.output_throughput for lv in pts], marker="o", label="output tok/s")
    ax.plot(xs, [lv.metrics.total_token_throughput for lv in pts], marker="s",
            label="total tok/s")
    ax2 = ax.twinx()
    ax2.plot(xs, [lv.metrics.request_throughput for lv in pts], marker="^", color="grey",
             label="requests/s")
    ax.set(xlabel="concurrent requests", ylabel="tokens/s", title="Throughput vs concurrency")
    ax2.set_ylabel("requests/s")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left")
    return _save(fig, path)


def ttft_itl_distributions(levels: list[LevelResult], path: Path) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for lv in levels:
        label = f"c={lv.concurrency}"
        if lv.ttft_samples:
            a.hist(lv.ttft_samples, bins=30, histtype="step", label=label)
        if lv.itl_samples:
            b.hist([x * 1000 for x in lv.itl_samples], bins=50, histtype="step", label=label,
                   density=True)
    a.set(xlabel="TTFT (s)", ylabel="requests", title="TTFT distribution")
    b.set(xlabel="ITL (ms)", ylabel="density", title="Inter-token latency distribution")
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def capacity_search_plot(result: CapacityResult, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, lv in enumerate(result.levels, 1):
        if lv.p95_e2el_s is None:
            continue
        ax.scatter(lv.concurrency, lv.p95_e2el_s, color="green" if lv.passed else "red", zorder=3)
        ax.annotate(str(i), (lv.concurrency, lv.p95_e2el_s), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.axhline(result.slo_p95_e2el_s, color="red", ls=":", label=f"SLO {result.slo_p95_e2el_s:g} s")
    ax.axvline(result.max_concurrency_meeting_slo, color="green", ls="--",
               label=f"capacity = {result.max_concurrency_meeting_slo}")
    ax.set(xlabel="concurrent agents", ylabel="P95 E2E latency (s)",
           title=f"Capacity search ({result.workload.get('name', '?')} workload; numbers = order)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
