"""The monitoring stack on the host: Prometheus, Alertmanager and node_exporter from Debian's
packages, the dgxready exporter and the alert webhook from the toolkit's venv, each a dgxready-*
unit run as the service user (or, where PID 1 is not systemd, a supervised process with a
pidfile, as services.py runs the engine). Prometheus scrapes the host's engine, multiplexer,
exporter, node_exporter, Alertmanager, and dcgm-exporter where one answers on an NVIDIA host;
its config and rules and Alertmanager's config come from monitoring/'s generators.

With `vars.monitoring.grafana`, Grafana, Loki and Alloy come from Grafana's apt repository, with
the provisioning and dashboards monitoring/dashboards generates and monitoring/alloy's config
when there is one. That part is untested here: the lab hosts have no systemd and no way to
apt.grafana.com, so the lab tests leave it off."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import yaml

from dgxready.logs import LOG_SUFFIX
from dgxready.settings import REPO_ROOT
from monitoring.alertmanager import render_alertmanager_config
from monitoring.prometheus.config import ENGINE_JOB, EngineTarget, ScrapeTargets, prometheus_config
from monitoring.prometheus.rules import render_rule_file
from monitoring.settings import MonitoringSettings
from monitoring.webhook import ALERTS_PATH
from monitoring.webhook import SERVICE as WEBHOOK_SERVICE
from provision.core import Changes, Host, Step, StepFailed, changes, q
from provision.facts import (
    DebPackages,
    FileExists,
    FileText,
    HttpStatus,
    NvidiaHardware,
    Sha256s,
    SystemdIsInit,
    SystemdUnits,
)
from provision.steps.base import InstallPackages, apt_install, sha256_text, upload_text
from provision.steps.modelfiles import ModelFiles, host_engine
from provision.steps.services import (
    InstallService,
    ServiceSpec,
    StartService,
    engine_bind,
    engine_key_path,
    engine_url,
    install_service,
    is_loopback,
    mux_host,
    service_changes,
    stamp_path,
    start_service,
    stop_service,
    unit_path,
    wait_healthy,
)

MONITORING_PACKAGES = ("prometheus", "prometheus-alertmanager", "prometheus-node-exporter")
# Debian starts its own units for these packages on :9090, :9093 and :9100 (every address);
# the dgxready-* units replace them.
PACKAGE_UNITS = MONITORING_PACKAGES
PROMETHEUS_BIN = "/usr/bin/prometheus"
ALERTMANAGER_BIN = "/usr/bin/prometheus-alertmanager"
NODE_EXPORTER_BIN = "/usr/bin/prometheus-node-exporter"

NODE_UNIT = "dgxready-node-exporter"
EXPORTER_UNIT = "dgxready-exporter"
WEBHOOK_UNIT = "dgxready-alert-webhook"
ALERTMANAGER_UNIT = "dgxready-alertmanager"
PROMETHEUS_UNIT = "dgxready-prometheus"
# Start order: what Alertmanager and Prometheus point at comes first.
UNITS = (NODE_UNIT, EXPORTER_UNIT, WEBHOOK_UNIT, ALERTMANAGER_UNIT, PROMETHEUS_UNIT)

GRAFANA_PACKAGES = ("grafana", "loki", "alloy")
GRAFANA_UNITS = ("grafana-server", "loki", "alloy")
GRAFANA_KEY_URL = "https://apt.grafana.com/gpg.key"
GRAFANA_KEYRING = "/etc/apt/keyrings/grafana.asc"
GRAFANA_SOURCES = "/etc/apt/sources.list.d/grafana.list"
GRAFANA_SOURCE_LINE = f"deb [signed-by={GRAFANA_KEYRING}] https://apt.grafana.com stable main\n"
GRAFANA_PROVISIONING = "/etc/grafana/provisioning"
LOKI_URL = "http://127.0.0.1:3100"
# monitoring/dashboards' committed output (a test keeps it equal to the generator), read rather than
# regenerated: the generator imports the SDK and the capacity figures' plotting.
GRAFANA_SOURCE = REPO_ROOT / "monitoring" / "grafana"
ALLOY_SOURCE = REPO_ROOT / "monitoring" / "alloy" / "config.alloy"
ALLOY_CONFIG = "/etc/alloy/config.alloy"


def monitoring_enabled(host: Host) -> bool:
    """The inventory's `monitoring.enabled`; unset, on for the NVIDIA profiles and off for cpu-only."""
    enabled = host.vars.monitoring.enabled
    return host.vars.profile != "cpu-only" if enabled is None else enabled


def local_url(host: Host, port: int) -> str:
    bind = host.vars.monitoring.bind
    return f"http://{'127.0.0.1' if bind in ('0.0.0.0', '::') else bind}:{port}"


def config_dir(host: Host) -> str:
    return f"{host.vars.prefix}/etc/monitoring"


def app_python(host: Host) -> str:
    return f"{host.vars.prefix}/venv/bin/python"


def app_environment(host: Host) -> dict[str, str]:
    return {"PYTHONPATH": f"{host.vars.prefix}/app", "DGXREADY_STATE_DIR": f"{host.vars.prefix}/state"}


def listen(host: Host, port: int) -> str:
    return f"--web.listen-address={host.vars.monitoring.bind}:{port}"


def node_exporter_spec(host: Host) -> ServiceSpec:
    port = host.vars.monitoring.node_exporter_port
    return ServiceSpec(NODE_UNIT, "dgxready node_exporter", (NODE_EXPORTER_BIN, listen(host, port)),
                       host.vars.service_user, f"{local_url(host, port)}/metrics")


def exporter_spec(host: Host, app_sha256: str) -> ServiceSpec:
    v, m = host.vars, host.vars.monitoring
    argv = (app_python(host), "-m", "monitoring.exporter", "--address", m.bind, "--port", str(m.exporter_port),
            "--state-dir", f"{v.prefix}/state", "--models-dir", f"{v.prefix}/models",
            "--mux-url", f"http://{mux_host(host)}:{v.mux_port}")
    return ServiceSpec(EXPORTER_UNIT, "dgxready exporter", argv, v.service_user,
                       f"{local_url(host, m.exporter_port)}/metrics", environment=app_environment(host),
                       revision=app_sha256)


def webhook_spec(host: Host, app_sha256: str) -> ServiceSpec:
    v, m = host.vars, host.vars.monitoring
    argv = (app_python(host), "-m", "monitoring.webhook", "--address", m.bind, "--port", str(m.webhook_port),
            "--log", f"{v.prefix}/state/logs/{WEBHOOK_SERVICE}{LOG_SUFFIX}")
    return ServiceSpec(WEBHOOK_UNIT, "dgxready alert webhook", argv, v.service_user,
                       f"{local_url(host, m.webhook_port)}/health", environment=app_environment(host),
                       revision=app_sha256)


def alertmanager_spec(host: Host) -> ServiceSpec:
    v, m = host.vars, host.vars.monitoring
    config = f"{config_dir(host)}/alertmanager.yml"
    text = render_alertmanager_config(local_url(host, m.webhook_port) + ALERTS_PATH)
    argv = (ALERTMANAGER_BIN, f"--config.file={config}", f"--storage.path={v.prefix}/state/alertmanager",
            listen(host, m.alertmanager_port), "--cluster.listen-address=")
    return ServiceSpec(ALERTMANAGER_UNIT, "dgxready Alertmanager", argv, v.service_user,
                       f"{local_url(host, m.alertmanager_port)}/-/ready", files={config: text})


def scrape_targets(host: Host, engine: str, dcgm: bool) -> ScrapeTargets:
    v, m = host.vars, host.vars.monitoring
    return ScrapeTargets(exporter_url=local_url(host, m.exporter_port),
                         node_url=local_url(host, m.node_exporter_port),
                         mux_url=f"http://{mux_host(host)}:{v.mux_port}",
                         dcgm_url=f"http://127.0.0.1:{m.dcgm_port}" if dcgm else None,
                         alertmanager_url=local_url(host, m.alertmanager_port),
                         engines=[EngineTarget(engine_url(host), engine, v.model)])


def engine_scrape_key(host: Host, engine: str) -> str | None:
    """llama-server beyond loopback asks its API key for /metrics too; vLLM's key guards /v1 only."""
    return None if engine != "llamacpp" or is_loopback(engine_bind(host)) else engine_key_path(host)


def prometheus_yaml(targets: ScrapeTargets, settings: MonitoringSettings, rules: str,
                    key_file: str | None) -> str:
    doc = prometheus_config(targets, settings, [rules])
    if key_file:
        for job in doc["scrape_configs"]:
            if job["job_name"] == ENGINE_JOB:
                job["authorization"] = {"type": "Bearer", "credentials_file": key_file}
    return yaml.safe_dump(doc, sort_keys=False)


def prometheus_spec(host: Host, engine: str, dcgm: bool, settings: MonitoringSettings) -> ServiceSpec:
    v, m = host.vars, host.vars.monitoring
    config, rules = f"{config_dir(host)}/prometheus.yml", f"{config_dir(host)}/rules.yml"
    files = {config: prometheus_yaml(scrape_targets(host, engine, dcgm), settings, rules,
                                     engine_scrape_key(host, engine)),
             rules: render_rule_file(settings.alerts, settings.runbook_base_url)}
    argv = (PROMETHEUS_BIN, f"--config.file={config}", f"--storage.tsdb.path={v.prefix}/state/prometheus",
            f"--storage.tsdb.retention.time={settings.retention}", listen(host, m.prometheus_port))
    return ServiceSpec(PROMETHEUS_UNIT, "dgxready Prometheus", argv, v.service_user,
                       f"{local_url(host, m.prometheus_port)}/-/ready", files=files)


def datasources_for(text: str, prometheus_url: str) -> str:
    """The committed datasources file with the host's Prometheus in place of the default one."""
    doc = yaml.safe_load(text)
    for source in doc["datasources"]:
        if source["type"] == "prometheus":
            source["url"] = prometheus_url
    return yaml.safe_dump(doc, sort_keys=False)


def dashboards_path(provider_text: str) -> str:
    return yaml.safe_load(provider_text)["providers"][0]["options"]["path"]


@functools.lru_cache(maxsize=8)
def grafana_texts(prometheus_url: str) -> tuple[tuple[str, str], ...]:
    """Host path -> text: the provisioning and dashboards monitoring/dashboards generates, and
    Alloy's config when monitoring/alloy has one."""
    provisioning = GRAFANA_SOURCE / "provisioning"
    datasources = (provisioning / "datasources" / "dgxready.yaml").read_text()
    provider = (provisioning / "dashboards" / "dgxready.yaml").read_text()
    out = [(f"{GRAFANA_PROVISIONING}/datasources/dgxready.yaml", datasources_for(datasources, prometheus_url)),
           (f"{GRAFANA_PROVISIONING}/dashboards/dgxready.yaml", provider)]
    target = dashboards_path(provider)
    out += [(f"{target}/{path.name}", path.read_text())
            for path in sorted((GRAFANA_SOURCE / "dashboards").glob("*.json"))]
    if ALLOY_SOURCE.is_file():
        out.append((ALLOY_CONFIG, ALLOY_SOURCE.read_text()))
    return tuple(out)


def grafana_files(host: Host) -> dict[str, str]:
    return dict(grafana_texts(local_url(host, host.vars.monitoring.prometheus_port)))


@dataclass(frozen=True)
class DisablePackageUnits:
    units: tuple[str, ...]

    def describe(self) -> str:
        return f"stop and disable Debian's own {', '.join(self.units)} units (dgxready-* units replace them)"


@dataclass(frozen=True)
class AddGrafanaRepository:
    def describe(self) -> str:
        return f"add Grafana's apt repository ({GRAFANA_SOURCES}, signed-by {GRAFANA_KEYRING})"


@dataclass(frozen=True)
class UploadFiles:
    paths: tuple[str, ...]

    def describe(self) -> str:
        return "upload " + ", ".join(self.paths)


@dataclass(frozen=True)
class StartPackageUnits:
    units: tuple[str, ...]
    reason: str

    def describe(self) -> str:
        return f"enable and (re)start {', '.join(self.units)} ({self.reason})"


def with_drift(host: Host, spec: ServiceSpec, found: dict[str, str]) -> Changes:
    """The service's changes, plus a reinstall and restart when a config file on the host is not
    the generated one although the identity stamp says it is."""
    todo = service_changes(host, spec)
    drifted = any(found.get(path) != sha256_text(text) for path, text in spec.files.items())
    if not drifted or todo.of(InstallService):
        return todo
    start = next(iter(todo.of(StartService)), None) or StartService(
        spec.unit, "restart: a config file on the host differs from the generated one")
    return changes(InstallService(spec.unit), start)


def package_changes(host: Host) -> Changes:
    installed = host.fact(DebPackages(MONITORING_PACKAGES))
    missing = tuple(p for p in MONITORING_PACKAGES if p not in installed)
    on = ()
    if host.fact(SystemdIsInit()):
        states = host.fact(SystemdUnits(PACKAGE_UNITS))
        on = tuple(u for u in PACKAGE_UNITS if states[u].enabled or states[u].active)
    return changes(InstallPackages(missing) if missing else None, DisablePackageUnits(on) if on else None)


def grafana_restarts(host: Host, stale: tuple[str, ...]) -> StartPackageUnits | None:
    states = host.fact(SystemdUnits(GRAFANA_UNITS))
    down = [u for u in GRAFANA_UNITS if not (states[u].enabled and states[u].active)]
    changed = (["grafana-server"] if any(p != ALLOY_CONFIG for p in stale) else []) + (
        ["alloy"] if ALLOY_CONFIG in stale else [])
    units = tuple(u for u in GRAFANA_UNITS if u in down or u in changed)
    if not units:
        return None
    return StartPackageUnits(units, "their configuration changed" if changed else "not running")


def grafana_changes(host: Host) -> Changes:
    """Untested here (no systemd on the lab hosts, no network to apt.grafana.com)."""
    if not host.vars.monitoring.grafana:
        return changes()
    if not host.fact(SystemdIsInit()):
        raise StepFailed(f"{host.name}: vars.monitoring.grafana: Grafana, Loki and Alloy run from their "
                         "packages' systemd units, and PID 1 here is not systemd")
    repo = (host.fact(FileText(GRAFANA_SOURCES)) == GRAFANA_SOURCE_LINE
            and host.fact(FileExists(GRAFANA_KEYRING)))
    installed = host.fact(DebPackages(GRAFANA_PACKAGES))
    missing = tuple(p for p in GRAFANA_PACKAGES if p not in installed)
    files = grafana_files(host)
    found = host.fact(Sha256s(tuple(files)))
    stale = tuple(p for p, text in files.items() if found.get(p) != sha256_text(text))
    return changes(None if repo else AddGrafanaRepository(), InstallPackages(missing) if missing else None,
                   UploadFiles(stale) if stale else None, grafana_restarts(host, stale))


def add_grafana_repository(host: Host) -> None:
    # Over HTTPS, as Grafana's own instructions do; an armored key in signed-by needs no gpg.
    partial = q(GRAFANA_KEYRING + ".partial")
    host.sh(f"install -d -m 0755 /etc/apt/keyrings && curl -fsSL {q(GRAFANA_KEY_URL)} -o {partial} && "
            f"chmod 0644 {partial} && mv -f {partial} {q(GRAFANA_KEYRING)}")
    upload_text(host, GRAFANA_SOURCES, GRAFANA_SOURCE_LINE)


def disable_units(host: Host, units: tuple[str, ...]) -> None:
    host.sh(f"systemctl disable --now {q(*units)} 2>/dev/null || "
            f"systemctl stop {q(*units)} 2>/dev/null || true")


class MonitoringStep(Step):
    """Install, (re)start and health-check the monitoring services that changed; the Grafana part
    behind `vars.monitoring.grafana`. Undo stops the services and removes their units and
    configs, and keeps the packages."""
    name = "monitoring"

    def __init__(self, formats: dict[str, ModelFiles], app_sha256: str = "",
                 settings: MonitoringSettings | None = None):
        self.formats = formats
        self.app_sha256 = app_sha256
        self.settings = settings or MonitoringSettings()

    def skip_reason(self, host: Host) -> str | None:
        if monitoring_enabled(host):
            return None
        if host.vars.monitoring.enabled is False:
            return "vars.monitoring.enabled is false"
        return "profile cpu-only: monitoring is off unless vars.monitoring.enabled is true"

    def scrapes_dcgm(self, host: Host) -> bool:
        """dcgm-exporter is optional (its support on GB10 is unconfirmed): scraped where it answers."""
        if host.vars.profile == "cpu-only" or not host.fact(NvidiaHardware()):
            return False
        return host.fact(HttpStatus(f"http://127.0.0.1:{host.vars.monitoring.dcgm_port}/metrics")) == 200

    def specs(self, host: Host) -> list[ServiceSpec]:
        engine = host_engine(host, self.formats)
        return [node_exporter_spec(host), exporter_spec(host, self.app_sha256),
                webhook_spec(host, self.app_sha256), alertmanager_spec(host),
                prometheus_spec(host, engine, self.scrapes_dcgm(host), self.settings)]

    def service_todo(self, host: Host) -> Changes:
        specs = self.specs(host)
        found = host.fact(Sha256s(tuple(p for s in specs for p in s.files)))
        return Changes(tuple(c for s in specs for c in with_drift(host, s, found)))

    def check(self, host: Host) -> Changes:
        return Changes((*package_changes(host).items, *grafana_changes(host).items,
                        *self.service_todo(host).items))

    def apply(self, host: Host, todo: Changes) -> str:
        if todo.of(AddGrafanaRepository):
            add_grafana_repository(host)
        for packages in todo.of(InstallPackages):
            apt_install(host, packages.packages)
        if (todo.of(InstallPackages) or todo.of(DisablePackageUnits)) and host.fact(SystemdIsInit()):
            disable_units(host, PACKAGE_UNITS)
        self.apply_grafana(host, todo)
        return self.apply_services(host, todo)

    def apply_grafana(self, host: Host, todo: Changes) -> None:
        files = grafana_files(host) if host.vars.monitoring.grafana else {}
        for upload in todo.of(UploadFiles):
            for path in upload.paths:
                upload_text(host, path, files[path])
        for start in todo.of(StartPackageUnits):
            host.sh(f"systemctl daemon-reload && systemctl enable {q(*start.units)} && "
                    f"systemctl restart {q(*start.units)}")

    def apply_services(self, host: Host, todo: Changes) -> str:
        install = {c.unit for c in todo.of(InstallService)}
        start = {c.unit for c in todo.of(StartService)}
        started, how = [], ""
        for spec in self.specs(host):
            if spec.unit in install:
                install_service(host, spec)
            if spec.unit in start:
                stop_service(host, spec.unit)
                how = start_service(host, spec)
                wait_healthy(host, spec)
                started.append(spec.unit)
        return f"started {', '.join(started)}: {how}" if started else ""

    def verify(self, host: Host) -> None:
        super().verify(host)
        for spec in self.specs(host):
            if host.fact(HttpStatus(spec.health_url)) != 200:
                raise StepFailed(f"{host.name}: {spec.unit} does not answer {spec.health_url}")

    def undo(self, host: Host) -> str | None:
        systemd = host.fact(SystemdIsInit())
        for unit in reversed(UNITS):
            stop_service(host, unit)
            if systemd:
                host.sh(f"systemctl disable {q(unit)} 2>/dev/null || true")
            host.sh(f"rm -f {q(unit_path(unit))} {q(stamp_path(host, unit))}")
        host.sh(f"rm -rf {q(config_dir(host))}")
        return f"stopped {', '.join(UNITS)} and removed their units and configs (packages kept)"
