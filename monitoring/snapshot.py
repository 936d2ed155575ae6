"""`invoke monitoring.snapshot`: each dashboard drawn as one PNG, a grid of its panels, from
Prometheus's query_range API, for a README or a bug report when no Grafana is at hand. A panel
without data says so on the picture, and the result lists it. Loki panels are not drawn."""
from __future__ import annotations

import math
import re
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dgxready.errors import DgxReadyError  # noqa: E402
from dgxready.settings import load_settings  # noqa: E402
from monitoring.dashboards.definitions import DASHBOARDS  # noqa: E402
from monitoring.dashboards.model import Dashboard, Panel, concrete  # noqa: E402
from monitoring.settings import load_monitoring_settings  # noqa: E402
from monitoring.stack import load_stack  # noqa: E402

COLUMNS = 3
MAX_LEGEND = 8
MAX_POINTS = 240
NEEDS_TEXT = {"gpu": "needs an NVIDIA GPU (DCGM_* / GB10)", "vllm": "needs vLLM as the engine",
              "baseline": "needs a bench.all baseline on this host", "loki": "needs Loki"}
# unit -> (divide by, axis label); Grafana's unit ids
UNITS = {"s": (1, "s"), "bytes": (2**30, "GiB"), "decmbytes": (2**10, "GiB"), "percentunit": (0.01, "%"),
         "percent": (1, "%"), "reqps": (1, "req/s"), "Bps": (1e6, "MB/s"), "celsius": (1, "°C"),
         "watt": (1, "W"), "rotmhz": (1, "MHz"), "short": (1, "")}


class PrometheusError(RuntimeError):
    pass


@dataclass(frozen=True)
class TimeRange:
    start: float
    end: float
    step_s: float

    @classmethod
    def last(cls, seconds: float, end: float | None = None) -> TimeRange:
        end = time.time() if end is None else end
        return cls(end - seconds, end, max(1.0, math.ceil(seconds / MAX_POINTS)))

    def rate_interval(self, scrape_interval_s: float) -> str:
        """As Grafana computes $__rate_interval: at least four scrapes, at least one step."""
        return f"{int(max(4 * scrape_interval_s, self.step_s + scrape_interval_s))}s"

    def text(self) -> str:
        fmt = "%Y-%m-%d %H:%M:%S"
        start = datetime.fromtimestamp(self.start, timezone.utc).strftime(fmt)
        end = datetime.fromtimestamp(self.end, timezone.utc).strftime("%H:%M:%S")
        return f"{start}–{end} UTC, step {self.step_s:g} s"


@dataclass(frozen=True)
class Series:
    name: str
    times: tuple[float, ...]
    values: tuple[float, ...]

    @property
    def finite(self) -> bool:
        return any(math.isfinite(v) for v in self.values)


@dataclass(frozen=True)
class PanelData:
    panel: Panel
    series: tuple[Series, ...]
    errors: tuple[str, ...] = ()

    @property
    def has_data(self) -> bool:
        return any(s.finite for s in self.series)


@dataclass(frozen=True)
class Snapshot:
    pngs: list[Path]
    no_data: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Prometheus:
    url: str
    timeout_s: float = 30.0

    def get(self, path: str, params: dict) -> dict:
        try:
            r = httpx.get(f"{self.url.rstrip('/')}{path}", params=params, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise PrometheusError(f"{self.url}: {exc}") from None
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType', r.status_code)}: {body.get('error', r.text[:200])}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} | ({"time": at} if at is not None else {})
        return self.get("/api/v1/query", params)["result"]

    def query_range(self, expr: str, tr: TimeRange) -> list[dict]:
        return self.get("/api/v1/query_range",
                        {"query": expr, "start": tr.start, "end": tr.end, "step": tr.step_s})["result"]


def legend(fmt: str, metric: dict[str, str]) -> str:
    if not fmt or fmt == "__auto":
        inner = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
        return f"{metric.get('__name__', '')}{{{inner}}}" if inner else metric.get("__name__", "value")
    return re.sub(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt)


def to_series(result: list[dict], fmt: str) -> list[Series]:
    return [Series(legend(fmt, r["metric"]), tuple(float(t) for t, _ in r["values"]),
                   tuple(float(v) for _, v in r["values"])) for r in result]


def fetch_panel(prom: Prometheus, panel: Panel, tr: TimeRange, rate_interval: str) -> PanelData:
    series: list[Series] = []
    errors: list[str] = []
    for q in panel.queries:
        try:
            series += to_series(prom.query_range(concrete(q.expr, rate_interval), tr), q.legend)
        except PrometheusError as exc:
            errors.append(str(exc))
    return PanelData(panel, tuple(series), tuple(errors))


def scaled(panel: Panel, values: tuple[float, ...]) -> list[float]:
    div, _ = UNITS.get(panel.unit, (1, panel.unit))
    return [v / div for v in values]


def draw_no_data(ax: Axes, data: PanelData) -> None:
    why = NEEDS_TEXT.get(data.panel.needs or "", "no series matched in this range")
    if data.errors:
        why = "query failed: " + data.errors[0][:80]
    ax.text(0.5, 0.55, "no data", ha="center", va="center", fontsize=20, color="firebrick",
            transform=ax.transAxes)
    ax.text(0.5, 0.35, why, ha="center", va="center", fontsize=8, color="dimgrey",
            transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_stat(ax: Axes, data: PanelData) -> None:
    _, label = UNITS.get(data.panel.unit, (1, data.panel.unit))
    shown = [s for s in data.series if s.finite][:4]
    for i, s in enumerate(shown):
        last = [v for v in scaled(data.panel, s.values) if math.isfinite(v)][-1]
        y = 0.62 - i * 0.3 / max(1, len(shown) - 1) if len(shown) > 1 else 0.55
        ax.text(0.5, y, f"{last:g} {label}".strip(), ha="center", va="center",
                fontsize=28 if len(shown) == 1 else 16, color="seagreen", transform=ax.transAxes)
        ax.text(0.5, y - 0.16, s.name, ha="center", va="center", fontsize=8, color="dimgrey",
                transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def y_top(data: PanelData, shown: list[Series]) -> float:
    """Room above the highest point and the threshold line, so neither sits on the frame."""
    values = [v for s in shown for v in scaled(data.panel, s.values) if math.isfinite(v)]
    if data.panel.line is not None:
        values += scaled(data.panel, (data.panel.line,))
    top = max(values, default=0.0)
    return top * 1.12 if top > 0 else 1.0


def draw_timeseries(ax: Axes, data: PanelData) -> None:
    _, label = UNITS.get(data.panel.unit, (1, data.panel.unit))
    ranked = sorted((s for s in data.series if s.finite),
                    key=lambda s: -max(v for v in s.values if math.isfinite(v)))
    for s in ranked[:MAX_LEGEND]:
        times = [datetime.fromtimestamp(t, timezone.utc) for t in s.times]
        ax.plot(times, scaled(data.panel, s.values), lw=1.3, label=s.name[:48] or "value")
    if data.panel.line is not None:
        line = scaled(data.panel, (data.panel.line,))[0]
        ax.axhline(line, color="red", ls=":", lw=1.2, label=f"threshold {line:g} {label}".strip())
    ax.set_ylabel(label)
    ax.set_ylim(0, y_top(data, ranked[:MAX_LEGEND]))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=timezone.utc))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    hidden = len(ranked) - MAX_LEGEND
    ax.legend(fontsize=6.5, loc="upper left", frameon=False,
              title=f"+{hidden} more series" if hidden > 0 else None, title_fontsize=6.5)


def draw_panel(ax: Axes, data: PanelData) -> None:
    ax.set_title(data.panel.title, fontsize=9, loc="left")
    if not data.has_data:
        draw_no_data(ax, data)
    elif data.panel.kind == "stat":
        draw_stat(ax, data)
    else:
        draw_timeseries(ax, data)


def dashboard_figure(d: Dashboard, panels: list[PanelData], host: str, tr: TimeRange) -> Figure:
    rows = max(1, math.ceil(len(panels) / COLUMNS))
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(16, 3.4 * rows + 1.0), squeeze=False)
    for ax, data in zip(axes.flat, panels, strict=False):
        draw_panel(ax, data)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    top = 1 - 0.9 / (3.4 * rows + 1.0)
    fig.text(0.5, 0.995, d.title, ha="center", va="top", fontsize=13)
    fig.text(0.5, top + 0.25 * (1 - top), f"{host} · {tr.text()}", ha="center", va="center",
             fontsize=9, color="dimgrey")
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def snapshot(prometheus_url: str, out_dir: Path, tr: TimeRange, host: str | None = None,
             scrape_interval_s: float = 15.0, dashboards: tuple[Dashboard, ...] = DASHBOARDS) -> Snapshot:
    """One PNG per dashboard under out_dir (<uid>.png); which panels had no data."""
    prom = Prometheus(prometheus_url)
    host = host or socket.gethostname()
    window = tr.rate_interval(scrape_interval_s)
    pngs, empty = [], []
    for d in dashboards:
        panels = [fetch_panel(prom, p, tr, window) for p in d.panels if p.datasource == "prometheus"]
        empty += [(d.uid, p.panel.title) for p in panels if not p.has_data]
        pngs.append(save_png(dashboard_figure(d, panels, host, tr), out_dir / f"{d.uid}.png"))
    return Snapshot(pngs, empty)


def recorded_prometheus_url() -> str:
    stack = load_stack()
    if stack is None:
        raise DgxReadyError("no monitoring stack is recorded: start one with `invoke monitoring.up`, "
                            "or give --url of a Prometheus")
    return stack.prometheus_url


def take_snapshot(url: str | None = None, out_dir: Path | None = None, minutes: float = 60.0,
                  host: str | None = None) -> Snapshot:
    """What `invoke monitoring.snapshot` does: the last `minutes` from the given Prometheus (default:
    the one `monitoring.up` started), into out_dir (default <state>/monitoring/snapshots/<timestamp>/)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out_dir = out_dir or load_settings().state_dir / "monitoring" / "snapshots" / stamp
    scrape_s = load_monitoring_settings().scrape_interval_s
    return snapshot(url or recorded_prometheus_url(), out_dir, TimeRange.last(minutes * 60), host, scrape_s)
