"""The local monitoring stack: Prometheus, Alertmanager, node_exporter, the dgxready exporter and the
alert webhook, started against the running stack (the engines `model.serve` recorded, the
multiplexer), under `<state>/monitoring/`, on free local ports. `start_stack` returns what it
started and records it, so that `stop_stack` and `stack_status` find it again."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from dgxready.errors import DgxReadyError
from dgxready.files import atomic_write_json, atomic_write_text
from dgxready.ports import free_port
from dgxready.progress import console, waiting
from dgxready.settings import REPO_ROOT, Settings, load_settings
from model.procs import is_running, launch, log_tail, proc_start_time, terminate
from model.serve import load_states
from monitoring.alertmanager import RouteTiming, render_alertmanager_config
from monitoring.prometheus.config import EngineTarget, ScrapeTargets, render_prometheus_config
from monitoring.prometheus.rules import render_rule_file
from monitoring.settings import MonitoringSettings, load_monitoring_settings
from monitoring.webhook import ALERTS_PATH

READY_TIMEOUT_S = 60.0
ADDRESS = "127.0.0.1"
OnStart = Callable[[subprocess.Popen], None]


@dataclass(frozen=True)
class StackTargets:
    """What the stack watches: the engines, the multiplexer, dcgm-exporter where one runs."""
    engines: list[EngineTarget] = field(default_factory=list)
    mux_url: str | None = None
    dcgm_url: str | None = None


@dataclass(frozen=True)
class StackProcess:
    name: str
    pid: int
    proc_start: int | None
    url: str
    ready_path: str
    log_path: str

    @property
    def running(self) -> bool:
        return is_running(self.pid, self.proc_start)


@dataclass(frozen=True)
class StackPaths:
    root: str
    prometheus_config: str
    rules: str
    alertmanager_config: str
    alert_log: str


@dataclass(frozen=True)
class MonitoringStack:
    """What `start_stack` started: base URLs, processes, and the files it wrote."""
    prometheus_url: str
    alertmanager_url: str
    node_exporter_url: str
    exporter_url: str
    webhook_url: str
    processes: list[StackProcess]
    paths: StackPaths
    targets: StackTargets
    started_at: float

    def process(self, name: str) -> StackProcess:
        return next(p for p in self.processes if p.name == name)

    def urls(self) -> dict[str, str]:
        return {p.name: p.url for p in self.processes}


@dataclass(frozen=True)
class ProcessStatus:
    process: StackProcess
    running: bool
    ready: bool


def stack_root(settings: Settings) -> Path:
    return settings.state_dir / "monitoring"


def record_path(settings: Settings) -> Path:
    return stack_root(settings) / "stack.json"


def discover_targets(settings: Settings, monitoring: MonitoringSettings) -> StackTargets:
    """The running engines `model.serve` recorded, and the multiplexer and dcgm-exporter from settings."""
    engines = [EngineTarget(s.base_url, s.backend, s.model) for s in load_states(settings) if s.running]
    return StackTargets(engines, monitoring.mux_url, monitoring.dcgm_url)


def binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise DgxReadyError(f"{names[0]} is not installed (none of {', '.join(names)} on PATH); "
                        "apt-get install prometheus prometheus-alertmanager prometheus-node-exporter")


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@dataclass(frozen=True)
class Planned:
    """A process about to start: its command, port and where readiness is probed."""
    name: str
    cmd: list[str]
    port: int
    ready_path: str

    @property
    def url(self) -> str:
        return f"http://{ADDRESS}:{self.port}"


def wait_until_ready(proc: subprocess.Popen, planned: Planned, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as client, waiting(f"starting {planned.name} on {planned.url}"):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DgxReadyError(f"{planned.name} exited with code {proc.returncode} before it was "
                                    f"ready; last lines of {log}:\n{log_tail(log)}")
            try:
                if client.get(planned.url + planned.ready_path).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise DgxReadyError(f"{planned.name} did not answer {planned.url}{planned.ready_path} within "
                        f"{timeout_s:.0f} s; last lines of {log}:\n{log_tail(log)}")


def start_one(planned: Planned, root: Path, on_start: OnStart | None) -> StackProcess:
    log = root / "logs" / f"{planned.name}.log"
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    proc = launch(planned.cmd, log, env=env)
    if on_start:
        on_start(proc)
    started = StackProcess(planned.name, proc.pid, proc_start_time(proc.pid), planned.url, planned.ready_path,
                           str(log))
    try:
        wait_until_ready(proc, planned, log, READY_TIMEOUT_S)
    except BaseException:
        terminate(started.pid, started.proc_start)
        raise
    return started


def stack_paths(root: Path) -> StackPaths:
    return StackPaths(root=str(root), prometheus_config=str(root / "prometheus" / "prometheus.yml"),
                      rules=str(root / "prometheus" / "rules.yml"),
                      alertmanager_config=str(root / "alertmanager" / "alertmanager.yml"),
                      alert_log=str(root / "alerts.jsonl"))


def plan_helpers(paths: StackPaths, targets: StackTargets, settings: Settings) -> list[Planned]:
    """The webhook, the exporter and node_exporter: what Alertmanager and Prometheus point at."""
    webhook, exporter, node = free_port(), free_port(), free_port()
    exporter_args = ["--address", ADDRESS, "--port", str(exporter), "--state-dir", str(settings.state_dir),
                     "--models-dir", str(settings.models_dir)]
    exporter_args += ["--mux-url", targets.mux_url] if targets.mux_url else []
    return [
        Planned("webhook", python_module("monitoring.webhook", "--address", ADDRESS, "--port", str(webhook),
                                         "--log", paths.alert_log), webhook, "/health"),
        Planned("exporter", python_module("monitoring.exporter", *exporter_args), exporter, "/metrics"),
        Planned("node_exporter", [binary("prometheus-node-exporter", "node_exporter"),
                                  f"--web.listen-address={ADDRESS}:{node}"], node, "/metrics"),
    ]


def plan_alertmanager(paths: StackPaths, webhook_url: str, timing: RouteTiming) -> Planned:
    atomic_write_text(Path(paths.alertmanager_config),
                      render_alertmanager_config(webhook_url + ALERTS_PATH, timing))
    port = free_port()
    return Planned("alertmanager", [
        binary("prometheus-alertmanager", "alertmanager"), f"--config.file={paths.alertmanager_config}",
        f"--storage.path={Path(paths.root) / 'alertmanager' / 'data'}",
        f"--web.listen-address={ADDRESS}:{port}", "--cluster.listen-address=",
    ], port, "/-/ready")


def plan_prometheus(paths: StackPaths, scrape: ScrapeTargets, monitoring: MonitoringSettings) -> Planned:
    atomic_write_text(Path(paths.rules), render_rule_file(monitoring.alerts, monitoring.runbook_base_url))
    atomic_write_text(Path(paths.prometheus_config),
                      render_prometheus_config(scrape, monitoring, [paths.rules]))
    port = free_port()
    return Planned("prometheus", [
        binary("prometheus"), f"--config.file={paths.prometheus_config}",
        f"--storage.tsdb.path={Path(paths.root) / 'prometheus' / 'data'}",
        f"--storage.tsdb.retention.time={monitoring.retention}",
        f"--web.listen-address={ADDRESS}:{port}", "--web.enable-lifecycle",
    ], port, "/-/ready")


def start_all(paths: StackPaths, targets: StackTargets, settings: Settings, monitoring: MonitoringSettings,
              timing: RouteTiming, on_start: OnStart | None, started: list[StackProcess]) -> None:
    root = Path(paths.root)
    for planned in plan_helpers(paths, targets, settings):
        started.append(start_one(planned, root, on_start))
    urls = {p.name: p.url for p in started}
    started.append(start_one(plan_alertmanager(paths, urls["webhook"], timing), root, on_start))
    urls["alertmanager"] = started[-1].url
    scrape = ScrapeTargets(exporter_url=urls["exporter"], node_url=urls["node_exporter"],
                           mux_url=targets.mux_url, dcgm_url=targets.dcgm_url,
                           alertmanager_url=urls["alertmanager"], engines=targets.engines)
    started.append(start_one(plan_prometheus(paths, scrape, monitoring), root, on_start))


def start_stack(settings: Settings | None = None, monitoring: MonitoringSettings | None = None,
                targets: StackTargets | None = None, timing: RouteTiming | None = None,
                on_start: OnStart | None = None) -> MonitoringStack:
    """Start the stack (targets default to `discover_targets`); `on_start` sees each process as it
    starts (tests hand in their process tracker). Refuses when a recorded stack still runs."""
    settings = settings or load_settings()
    monitoring = monitoring or load_monitoring_settings()
    running = load_stack(settings)
    if running and any(p.running for p in running.processes):
        raise DgxReadyError(f"a monitoring stack already runs (Prometheus at {running.prometheus_url}); "
                            "stop it first with `invoke monitoring.down`")
    targets = targets or discover_targets(settings, monitoring)
    paths = stack_paths(stack_root(settings))
    started: list[StackProcess] = []
    try:
        start_all(paths, targets, settings, monitoring, timing or RouteTiming(), on_start, started)
    except BaseException:
        for proc in reversed(started):
            terminate(proc.pid, proc.proc_start)
        raise
    urls = {p.name: p.url for p in started}
    stack = MonitoringStack(urls["prometheus"], urls["alertmanager"], urls["node_exporter"], urls["exporter"],
                            urls["webhook"], started, paths, targets, time.time())
    atomic_write_json(record_path(settings), asdict(stack))
    return stack


def stack_from_json(data: dict) -> MonitoringStack:
    targets = data["targets"]
    return MonitoringStack(**(data | {
        "processes": [StackProcess(**p) for p in data["processes"]],
        "paths": StackPaths(**data["paths"]),
        "targets": StackTargets([EngineTarget(**e) for e in targets["engines"]], targets["mux_url"],
                                targets["dcgm_url"])}))


def load_stack(settings: Settings | None = None) -> MonitoringStack | None:
    path = record_path(settings or load_settings())
    if not path.exists():
        return None
    try:
        return stack_from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        console.print(f"[yellow]{path}: unreadable monitoring stack record ({exc}); ignoring it")
        return None


def stop_stack(settings: Settings | None = None) -> MonitoringStack | None:
    """Stop the recorded stack's processes (Prometheus first) and forget it; None if none was recorded."""
    settings = settings or load_settings()
    stack = load_stack(settings)
    if stack is None:
        return None
    for proc in reversed(stack.processes):
        terminate(proc.pid, proc.proc_start)
    record_path(settings).unlink(missing_ok=True)
    return stack


def probe(client: httpx.Client, proc: StackProcess) -> bool:
    try:
        return client.get(proc.url + proc.ready_path).status_code == 200
    except httpx.HTTPError:
        return False


def stack_status(settings: Settings | None = None) -> list[ProcessStatus]:
    """Each recorded process: alive, and answering its readiness URL."""
    stack = load_stack(settings or load_settings())
    if stack is None:
        return []
    with httpx.Client(timeout=2.0) as client:
        return [ProcessStatus(p, p.running, p.running and probe(client, p)) for p in stack.processes]
