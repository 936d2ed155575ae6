"""PNG plots of a run: latency percentiles and throughput vs concurrency, TTFT/ITL
distributions, and the capacity search. Each names its host, model, workload and time."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator  # noqa: E402

from bench.labels import workload_label  # noqa: E402
from bench.prediction import Prediction  # noqa: E402
from bench.serving import CapacityResult, LevelResult  # noqa: E402

RIGHT_AXIS_COLOUR = "dimgrey"
SUBTITLE_COLOUR = "dimgrey"


@dataclass(frozen=True)
class RunLabel:
    """What every plot's subtitle says: where, what and when it was measured."""
    host: str
    model: str
    created_at: str

    def subtitle(self, workload: dict) -> str:
        return f"{self.host} · {self.model} · {workload_label(workload)} · {self.created_at}"


def _titled(fig: Figure, title: str, subtitle: str) -> None:
    fig.text(0.5, 0.985, title, ha="center", va="top", fontsize=12)
    fig.text(0.5, 0.935, subtitle, ha="center", va="top", fontsize=8, color=SUBTITLE_COLOUR)
    fig.tight_layout(rect=(0, 0, 1, 0.9))


def save(fig: Figure, path: Path) -> Path:
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _concurrency_axis(ax: Axes, levels: list[int], label: str = "concurrent requests") -> None:
    """Log-2 spacing, but ticks only at the measured levels, written as integers."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(label)


def _log_time_axis(ax: Axes) -> None:
    """Log scale labelled 0.05, 0.1, 0.2, 0.5, 1, ... rather than powers of ten; only the decades
    when the data span more than three of them, so that the labels do not overlap."""
    ax.set_xscale("log")
    low, high = ax.get_xlim()
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5) if high / low <= 1e3 else (1,)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _ecdf(ax: Axes, values: list[float], label: str) -> None:
    xs = np.sort(np.asarray(values, dtype=float))
    ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=label)


def latency_vs_concurrency(levels: list[LevelResult], workload: dict, slo_s: float | None,
                           capacity: CapacityResult | None, run: RunLabel) -> Figure:
    pts = [lv for lv in levels if lv.metrics.e2el and lv.concurrency]
    fig, ax = plt.subplots(figsize=(9.5, 5))
    xs = [lv.concurrency for lv in pts]
    for p in ("p50", "p90", "p95", "p99"):
        ax.plot(xs, [getattr(lv.metrics.e2el, p) for lv in pts], marker="o", label=f"E2EL {p}")
    ax.plot(xs, [lv.metrics.ttft.p95 for lv in pts], marker="x", ls="--", label="TTFT p95")
    if slo_s:
        ax.axhline(slo_s, color="red", ls=":", label=f"SLO: P95 E2EL {slo_s:g} s")
    if capacity and capacity.max_concurrency_meeting_slo:
        ax.axvline(capacity.max_concurrency_meeting_slo, color="green", ls="--",
                   label=f"capacity {capacity.max_concurrency_meeting_slo}, measured on the\n"
                         f"{workload_label(capacity.workload)} (not this one)")
    _concurrency_axis(ax, xs)
    ax.set_ylabel("seconds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _titled(fig, f"Latency vs concurrency ({workload.get('name', '?')} workload)", run.subtitle(workload))
    return fig


def throughput_vs_concurrency(levels: list[LevelResult], workload: dict, run: RunLabel) -> Figure:
    pts = [lv for lv in levels if lv.concurrency]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    xs = [lv.concurrency for lv in pts]
    ax.plot(xs, [lv.metrics.output_throughput for lv in pts], marker="o", label="output tok/s (left axis)")
    ax.plot(xs, [lv.metrics.total_token_throughput for lv in pts], marker="s",
            label="total tok/s, prompt + output (left axis)")
    right = ax.twinx()
    right.plot(xs, [lv.metrics.request_throughput for lv in pts], marker="^", ls="--",
               color=RIGHT_AXIS_COLOUR, label="requests/s (right axis, dashed)")
    right.set_ylabel("requests/s", color=RIGHT_AXIS_COLOUR)
    right.tick_params(axis="y", colors=RIGHT_AXIS_COLOUR)
    right.set_ylim(bottom=0)
    ax.set_ylim(bottom=0)
    _concurrency_axis(ax, xs)
    ax.set_ylabel("tokens/s")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    right_handles, right_labels = right.get_legend_handles_labels()
    ax.legend(handles + right_handles, labels + right_labels, loc="upper center", fontsize=8,
              bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    _titled(fig, f"Throughput vs concurrency ({workload.get('name', '?')} workload)",
            run.subtitle(workload))
    return fig


def ttft_itl_distributions(levels: list[LevelResult], workload: dict, run: RunLabel) -> Figure:
    """Cumulative distributions on log time axes: the ITL's bulk sits in milliseconds while a few
    gaps (a prefill of another request) last seconds, which a linear histogram hides."""
    fig, (ttft_ax, itl_ax) = plt.subplots(1, 2, figsize=(11, 4.8))
    for lv in levels:
        label = f"c={lv.concurrency}"
        if lv.ttft_samples:
            _ecdf(ttft_ax, lv.ttft_samples, label)
        if lv.itl_samples:
            _ecdf(itl_ax, [x * 1000 for x in lv.itl_samples], label)
    ttft_ax.set(xlabel="TTFT (s, log scale)", ylabel="fraction of requests at or below",
                title="Time to first token")
    itl_ax.set(xlabel="inter-token latency (ms, log scale)", ylabel="fraction of gaps at or below",
               title="Inter-token latency (all gaps, pooled)")
    for ax in (ttft_ax, itl_ax):
        _log_time_axis(ax)
        ax.set_ylim(0, 1.02)
        ax.axhline(0.95, color="grey", ls=":", lw=0.8)
        ax.legend(fontsize=8, title="concurrency", title_fontsize=8, loc="lower right")
        ax.grid(alpha=0.3, which="both")
    _titled(fig, "TTFT and ITL distributions (dotted line: P95)", run.subtitle(workload))
    return fig


def capacity_search_plot(result: CapacityResult, run: RunLabel) -> Figure:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    measured = [lv for lv in result.levels if lv.p95_e2el_s is not None]
    for i, lv in enumerate(result.levels, 1):
        if lv.p95_e2el_s is None:
            continue
        ax.scatter(lv.concurrency, lv.p95_e2el_s, color="green" if lv.passed else "red", zorder=3)
        ax.annotate(f"#{i}", (lv.concurrency, lv.p95_e2el_s), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.scatter([], [], color="green", label="level passed")
    ax.scatter([], [], color="red", label="level failed")
    ax.axhline(result.slo_p95_e2el_s, color="red", ls=":", label=f"SLO {result.slo_p95_e2el_s:g} s")
    ax.axvline(result.max_concurrency_meeting_slo, color="green", ls="--",
               label=f"capacity = {result.max_concurrency_meeting_slo}")
    if result.capacity_low is not None and result.capacity_low != result.capacity_high:
        confidence = f" ({result.confidence:.0%} confidence)" if result.confidence else ""
        ax.axvspan(result.capacity_low, result.capacity_high, color="green", alpha=0.12,
                   label=f"range {result.capacity_low}-{result.capacity_high}{confidence}")
    ticks = sorted({lv.concurrency for lv in measured} | {result.max_concurrency_meeting_slo})
    ax.set_xticks(ticks, [str(c) for c in ticks])
    ax.set_xlim(min(ticks) - 0.5, max(ticks) + 0.5)
    ax.set(xlabel="concurrent agents (#n: order tested)", ylabel="P95 E2E latency (s)")
    highest = max([lv.p95_e2el_s for lv in measured] + [result.slo_p95_e2el_s])
    ax.set_ylim(0, highest * 1.12)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _titled(fig, "Capacity search: double, then bisect", run.subtitle(result.workload))
    return fig


def prediction_plot(pred: Prediction, created_at: str) -> Figure:
    """The predicted P95 E2EL and output tok/s per concurrency, the SLO line, and the measured
    levels the model was checked against, when there are any."""
    fig, (lat, tps) = plt.subplots(1, 2, figsize=(11, 4.8))
    xs = [lv.concurrency for lv in pred.levels]
    lat.plot(xs, [lv.e2el_p95_s for lv in pred.levels], marker="o", label="predicted P95 E2EL")
    lat.plot(xs, [lv.ttft_p95_s for lv in pred.levels], marker="x", ls="--", label="predicted P95 TTFT")
    lat.axhline(pred.slo_p95_e2el_s, color="red", ls=":", label=f"SLO: P95 E2EL {pred.slo_p95_e2el_s:g} s")
    tps.plot(xs, [lv.output_tokens_per_s for lv in pred.levels], marker="o", label="predicted output tok/s")
    if pred.checks:
        cx = [c.concurrency for c in pred.checks]
        lat.scatter(cx, [c.measured_e2el_p95_s for c in pred.checks], color="black", zorder=3,
                    label="measured P95 E2EL")
        tps.scatter(cx, [c.measured_output_tokens_per_s for c in pred.checks], color="black", zorder=3,
                    label="measured output tok/s")
    lat.axvline(pred.target_agents, color="grey", ls="--", lw=0.8, label=f"target: {pred.target_agents} agents")
    for ax, ylabel in ((lat, "seconds"), (tps, "output tokens/s, all agents")):
        _concurrency_axis(ax, xs, "concurrent agents")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    subtitle = (f"{pred.profile} ({pred.engine}) · {pred.model.name}, KV {pred.kv_dtype} · "
                f"{pred.workload.name} workload, outputs up to {pred.workload.output_p95:.0f} tokens · "
                f"{created_at}")
    _titled(fig, f"Predicted: capacity {pred.capacity} agents within P95 {pred.slo_p95_e2el_s:g} s", subtitle)
    return fig
