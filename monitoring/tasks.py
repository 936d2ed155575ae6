"""Invoke tasks for the local monitoring stack: thin shells over monitoring.stack."""
from __future__ import annotations

from pathlib import Path

import httpx
from invoke import Collection, task
from rich.table import Table

from dgxready.cli import out, user_errors
from dgxready.errors import DgxReadyError
from monitoring.prometheus.rule_tests import write_rule_files
from monitoring.promtool import check_rules, test_rules
from monitoring.settings import load_monitoring_settings
from monitoring.snapshot import Snapshot, take_snapshot
from monitoring.stack import MonitoringStack, stack_status, start_stack, stop_stack


def answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return True


def print_urls(stack: MonitoringStack) -> None:
    for name, url in stack.urls().items():
        out.print(f"{name:<14} {url}")
    out.print(f"alerts are logged to {stack.paths.alert_log}; files under {stack.paths.root}")


@task(help={"config": "monitoring YAML overriding thresholds and intervals (default: built-in defaults, "
                      "or $DGXREADY_MONITORING_CONFIG)"})
@user_errors
def up(c, config=None):
    """Start Prometheus, Alertmanager, node_exporter, the exporter and the alert webhook; print the URLs."""
    stack = start_stack(monitoring=load_monitoring_settings(Path(config) if config else None))
    engines = ", ".join(e.url for e in stack.targets.engines) or "none recorded (start one with model.serve)"
    out.print(f"[green]monitoring up[/]: engines {engines}; multiplexer {stack.targets.mux_url or 'none'}")
    if stack.targets.mux_url and not answers(f"{stack.targets.mux_url}/health"):
        out.print(f"[yellow]the multiplexer at {stack.targets.mux_url} does not answer: its alerts will fire "
                  "until it runs (or set mux_url: null in the monitoring YAML)")
    print_urls(stack)


@task
@user_errors
def down(c):
    """Stop the monitoring stack that monitoring.up started."""
    stack = stop_stack()
    out.print("stopped the monitoring stack" if stack else "no monitoring stack was recorded")


@task
@user_errors
def status(c):
    """Show the monitoring stack's processes: running, and answering."""
    rows = stack_status()
    if not rows:
        out.print("no monitoring stack is recorded; start one with `invoke monitoring.up`")
        return
    table = Table(title="monitoring stack")
    for col in ("process", "url", "pid", "state", "log"):
        table.add_column(col)
    for row in rows:
        state = "ready" if row.ready else ("running, not answering" if row.running else "dead")
        table.add_row(row.process.name, row.process.url, str(row.process.pid), state, row.process.log_path)
    out.print(table)


@task(help={"output": "folder for rules.yml and rules_test.yml (default monitoring/prometheus)",
            "config": "monitoring YAML whose thresholds the rules use"})
@user_errors
def rules(c, output=None, config=None):
    """Write the Prometheus rule file and its promtool test suite, then check and test them."""
    settings = load_monitoring_settings(Path(config) if config else None)
    folder = Path(output) if output else Path(__file__).parent / "prometheus"
    files = write_rule_files(folder, settings.alerts, settings.runbook_base_url)
    for result in (check_rules(files.rules), test_rules(files.tests)):
        out.print(result.describe(), markup=False, highlight=False)
        if not result.ok:
            raise DgxReadyError(f"{result.command[-1]} did not pass")
    out.print(f"wrote {files.rules} and {files.tests}")


def print_snapshot(shot: Snapshot) -> None:
    for png in shot.pngs:
        out.print(f"wrote {png}")
    for dashboard, panel in shot.no_data:
        out.print(f"[yellow]no data[/]: {dashboard} / {panel}")


@task(help={"url": "Prometheus to query (default: the one monitoring.up started)",
            "minutes": "how far back from now", "out": "folder for the PNGs (default: "
            "<state>/monitoring/snapshots/<timestamp>/)", "host": "host name in the titles"})
@user_errors
def snapshot(c, url=None, minutes=60, out=None, host=None):
    """Draw each dashboard's panels from Prometheus as one PNG per dashboard; name the empty panels."""
    print_snapshot(take_snapshot(url, Path(out) if out else None, float(minutes), host))


ns = Collection("monitoring")
for t in (up, down, status, rules, snapshot):
    ns.add_task(t)
