"""The dashboards' own vocabulary: plain dataclasses that the Grafana renderer (grafana.py, through
grafana-foundation-sdk) and the PNG snapshot (monitoring.snapshot) both read, so a panel is
defined once. `needs` marks a panel whose series exist only on some hosts (a GPU, vLLM, a
bench.all baseline) or in Loki."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Grafana substitutes $__rate_interval; Prometheus's API does not know it.
RATE_INTERVAL = "$__rate_interval"

# Where a panel can have data: a GPU, vLLM, a bench.all baseline on this host, Loki.
Needs = Literal["gpu", "vllm", "baseline", "loki"]
Kind = Literal["timeseries", "stat", "logs"]


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: Kind = "timeseries"
    needs: Needs | None = None
    description: str = ""
    line: float | None = None
    width: int = 12
    height: int = 8

    @property
    def datasource(self) -> str:
        return "loki" if self.kind == "logs" else "prometheus"


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]

    @property
    def panels(self) -> tuple[Panel, ...]:
        return tuple(p for row in self.rows for p in row.panels)


@dataclass(frozen=True)
class PanelQuery:
    """One PromQL expression of one panel, as a test or the snapshot sends it to Prometheus."""
    dashboard: str
    panel: str
    expr: str
    legend: str
    needs: Needs | None

    def concrete(self, rate_interval: str) -> str:
        return concrete(self.expr, rate_interval)


def concrete(expr: str, rate_interval: str) -> str:
    """The expression as Prometheus's API takes it: Grafana's $__rate_interval made a real window."""
    return expr.replace(RATE_INTERVAL, rate_interval)


def panel_queries(dashboards: tuple[Dashboard, ...]) -> list[PanelQuery]:
    """Every (dashboard, panel, PromQL expression); Loki panels are not PromQL and are left out."""
    return [PanelQuery(d.uid, p.title, q.expr, q.legend, p.needs)
            for d in dashboards for p in d.panels if p.datasource == "prometheus" for q in p.queries]
