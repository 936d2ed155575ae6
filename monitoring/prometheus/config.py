"""prometheus.yml, generated: a scrape job per part of the stack (the engine's /metrics, llama-server
with --metrics or vLLM; the multiplexer; the dgxready exporter; node_exporter; dcgm-exporter when
present), the rule file and the Alertmanager to send alerts to."""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

import yaml

from monitoring.prometheus.rules import EXPORTER_JOB, duration
from monitoring.settings import MonitoringSettings

ENGINE_JOB = "engine"
MUX_JOB = "multiplexer"
NODE_JOB = "node"
DCGM_JOB = "dcgm"
ALERTMANAGER_JOB = "alertmanager"


@dataclass(frozen=True)
class EngineTarget:
    """An inference server whose /metrics Prometheus scrapes (llama-server or vLLM)."""
    url: str
    backend: str
    model: str


@dataclass(frozen=True)
class ScrapeTargets:
    """Base URLs (http://host:port) of what Prometheus scrapes; None where that part is absent."""
    exporter_url: str
    node_url: str | None = None
    mux_url: str | None = None
    dcgm_url: str | None = None
    alertmanager_url: str | None = None
    engines: list[EngineTarget] = field(default_factory=list)


def host_port(url: str) -> str:
    return urlsplit(url).netloc


def static_job(name: str, url: str, labels: dict[str, str] | None = None) -> dict:
    target = {"targets": [host_port(url)]} | ({"labels": labels} if labels else {})
    return {"job_name": name, "scheme": urlsplit(url).scheme or "http", "static_configs": [target]}


def engine_job(engines: list[EngineTarget]) -> dict:
    return {"job_name": ENGINE_JOB, "static_configs": [
        {"targets": [host_port(e.url)], "labels": {"backend": e.backend, "model": e.model}} for e in engines]}


def scrape_jobs(targets: ScrapeTargets) -> list[dict]:
    jobs = [static_job(EXPORTER_JOB, targets.exporter_url)]
    optional = ((NODE_JOB, targets.node_url), (MUX_JOB, targets.mux_url), (DCGM_JOB, targets.dcgm_url),
                (ALERTMANAGER_JOB, targets.alertmanager_url))
    jobs += [static_job(name, url) for name, url in optional if url]
    if targets.engines:
        jobs.append(engine_job(targets.engines))
    return jobs


def prometheus_config(targets: ScrapeTargets, settings: MonitoringSettings, rule_files: list[str]) -> dict:
    config: dict = {
        "global": {"scrape_interval": duration(settings.scrape_interval_s),
                   "scrape_timeout": duration(min(10.0, settings.scrape_interval_s)),
                   "evaluation_interval": duration(settings.evaluation_interval_s)},
        "rule_files": rule_files,
        "scrape_configs": scrape_jobs(targets),
    }
    if targets.alertmanager_url:
        config["alerting"] = {"alertmanagers": [
            {"static_configs": [{"targets": [host_port(targets.alertmanager_url)]}]}]}
    return config


def render_prometheus_config(targets: ScrapeTargets, settings: MonitoringSettings,
                             rule_files: list[str]) -> str:
    return yaml.safe_dump(prometheus_config(targets, settings, rule_files), sort_keys=False)
