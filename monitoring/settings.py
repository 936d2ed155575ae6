"""Monitoring settings: alert thresholds, scrape and evaluation intervals, the multiplexer to watch.
Defaults live here; a YAML file (`--config`, or $DGXREADY_MONITORING_CONFIG) overrides them."""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from dgxready.config import load_yaml

CONFIG_ENV = "DGXREADY_MONITORING_CONFIG"


class AlertParams(BaseModel):
    """What the alert rules compare against, and how long a condition must last before it fires."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    slo_p95_e2e_s: float = Field(6.0, gt=0, description="P95 end-to-end latency SLO at the multiplexer")
    slo_p95_ttft_s: float = Field(6.0, gt=0, description="P95 time-to-first-token SLO at the multiplexer")
    error_ratio: float = Field(0.01, gt=0, lt=1, description="failed requests over all requests")
    kv_cache_ratio: float = Field(0.9, gt=0, le=1, description="vLLM KV cache usage (0..1)")
    gpu_temp_c: float = Field(85.0, gt=0, description="GPU temperature, degrees Celsius")
    memory_used_ratio: float = Field(0.95, gt=0, lt=1, description="GPU, unified or host memory in use")
    disk_free_ratio: float = Field(0.10, gt=0, lt=1, description="model store free space below this")
    queue_depth: float = Field(0, ge=0, description="multiplexer queue depth above this, sustained")
    window: str = Field("5m", pattern=r"^[0-9]+[smh]$", description="rate window of the SLO figures")
    short_for_s: float = Field(60, ge=0, description="`for:` of alerts on a broken part (down, missing)")
    sustained_for_s: float = Field(300, ge=0, description="`for:` of alerts on a sustained condition")


class MonitoringSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alerts: AlertParams = AlertParams()
    scrape_interval_s: float = Field(15, gt=0)
    evaluation_interval_s: float = Field(15, gt=0)
    mux_url: str | None = Field("http://127.0.0.1:8090", pattern=r"^https?://",
                                description="the multiplexer to scrape; null when none runs")
    dcgm_url: str | None = Field(None, pattern=r"^https?://", description="dcgm-exporter, when present")
    runbook_base_url: str = Field("runbooks/alerts.md",
                                  description="where runbooks/alerts.md is published; anchors are appended")
    retention: str = Field("15d", pattern=r"^[0-9]+[smhdwy]$", description="Prometheus TSDB retention")


def monitoring_config_path(explicit: Path | None = None) -> Path | None:
    if explicit:
        return explicit
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else None


def load_monitoring_settings(path: Path | None = None) -> MonitoringSettings:
    """Defaults in code, overridden by the YAML file at `path` (or $DGXREADY_MONITORING_CONFIG)."""
    found = monitoring_config_path(path)
    return load_yaml(found, MonitoringSettings) if found else MonitoringSettings()
