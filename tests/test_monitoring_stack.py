"""The local monitoring stack against the real thing: Prometheus, Alertmanager, node_exporter, the
exporter and the webhook started by monitoring.stack, scraping a real llama-server (the conftest's
`served`) and a real multiplexer in front of it, with 1 s scrape and evaluation intervals."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from dgxready.errors import DgxReadyError
from dgxready.settings import load_settings
from monitoring.alertmanager import RouteTiming
from monitoring.prometheus.config import EngineTarget
from monitoring.prometheus.rules import all_expressions
from monitoring.settings import AlertParams, MonitoringSettings
from monitoring.stack import StackTargets, stack_status, start_stack, stop_stack
from monitoring.webhook import read_alert_log
from tests.agents_helpers import chat, start_mux
from tests.processes import ProcessTracker

# The SLO lowered to 1 ms, so that real traffic through the multiplexer breaches it at once.
LOWERED_SLO = AlertParams(slo_p95_e2e_s=0.001, slo_p95_ttft_s=0.001, window="1m", short_for_s=0,
                          sustained_for_s=5)
FAST = MonitoringSettings(alerts=LOWERED_SLO, scrape_interval_s=1, evaluation_interval_s=1, mux_url=None)
FAST_ROUTE = RouteTiming(group_wait_s=1, group_interval_s=1, repeat_interval_s=3600)


def eventually(check: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s"
        time.sleep(0.5)


def query(prometheus_url: str, expr: str) -> dict:
    return httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=10).json()


@pytest.fixture
def private_state(tmp_path, monkeypatch):
    monkeypatch.setenv("DGXREADY_STATE_DIR", str(tmp_path / "state"))
    settings = load_settings()
    yield settings
    stop_stack(settings)


def test_the_stack_starts_reports_ready_refuses_a_second_start_and_stops(private_state, processes):
    stack = start_stack(private_state, FAST, StackTargets(), on_start=processes.track)
    assert set(stack.urls()) == {"webhook", "exporter", "node_exporter", "alertmanager", "prometheus"}
    assert Path(stack.paths.prometheus_config).is_file() and Path(stack.paths.rules).is_file()
    assert all(row.running and row.ready for row in stack_status(private_state))
    with pytest.raises(DgxReadyError, match="already runs"):
        start_stack(private_state, FAST, StackTargets())
    stop_stack(private_state)
    assert not any(p.running for p in stack.processes)
    assert stack_status(private_state) == []



@pytest.fixture(scope="module")
def mux(served, tmp_path_factory):
    m = start_mux(tmp_path_factory.mktemp("mux"), [("local", served.base_url, 2)], rate_limits=False)
    yield m
    m.mux.stop()


@pytest.fixture(scope="module")
def live_stack(served, mux, tmp_path_factory):
    """The stack watching the real llama-server and multiplexer, after real chat traffic through it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DGXREADY_STATE_DIR", str(tmp_path_factory.mktemp("monitoring-state")))
    settings, tracker = load_settings(), ProcessTracker()
    targets = StackTargets([EngineTarget(served.base_url, "llamacpp", served.model)], mux_url=mux.url)
    try:
        stack = start_stack(settings, FAST.model_copy(update={"mux_url": mux.url}), targets, FAST_ROUTE,
                            on_start=tracker.track)
        for i in range(6):
            resp = chat(mux.url, mux.key("developer"), f"Name a colour ({i}).", max_tokens=8)
            assert resp.status_code == 200, resp.text
        yield stack
    finally:
        stop_stack(settings)
        tracker.stop_all()
        mp.undo()


def active_targets(prometheus_url: str) -> dict[str, str]:
    data = httpx.get(f"{prometheus_url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    return {t["labels"]["job"]: t["health"] for t in data}


@pytest.mark.server
def test_prometheus_scrapes_the_exporter_the_engine_the_multiplexer_and_node_exporter(live_stack):
    jobs = {"dgxready-exporter", "engine", "multiplexer", "node", "alertmanager"}

    def all_up() -> bool:
        health = active_targets(live_stack.prometheus_url)
        return set(health) == jobs and all(h == "up" for h in health.values())
    eventually(all_up, 60, f"every job of {sorted(jobs)} scraped")
    engine = query(live_stack.prometheus_url, "llamacpp:prompt_tokens_total")["data"]["result"]
    assert engine and engine[0]["metric"]["backend"] == "llamacpp"


@pytest.mark.server
def test_after_real_traffic_every_rule_expression_parses_and_the_recording_rules_return_data(live_stack):
    url = live_stack.prometheus_url
    for expression in all_expressions(LOWERED_SLO):
        answer = query(url, expression.expr)
        assert answer["status"] == "success", f"{expression.rule}: {answer}"
        if expression.is_recording:
            eventually(lambda e=expression: query(url, e.expr)["data"]["result"], 60,
                       f"{expression.rule} returned data")
            assert eventually(lambda e=expression: query(url, e.rule)["data"]["result"], 60,
                              f"the recorded series {expression.rule} exists")


@pytest.mark.server
def test_a_real_latency_breach_of_the_lowered_slo_reaches_the_webhook_through_alertmanager(live_stack, mux):
    log = Path(live_stack.paths.alert_log)

    def breach_logged():
        # Fresh traffic on every look: the fixture's chats may all have ended before the first
        # scrape, or left the 1-minute rate window while earlier tests ran.
        chat(mux.url, mux.key("developer"), "Name a fruit.", max_tokens=4)
        return [r for r in read_alert_log(log) if r.alertname == "SloP95LatencyHigh" and r.status == "firing"]
    records = eventually(breach_logged, 90, "SloP95LatencyHigh logged by the webhook")
    record = records[0]
    assert record.severity == "critical" and record.receiver == "dgxready-webhook"
    assert record.annotations["runbook_url"].endswith("runbooks/alerts.md#slop95latencyhigh")
    alerts = httpx.get(f"{live_stack.alertmanager_url}/api/v2/alerts", timeout=10).json()
    assert any(a["labels"]["alertname"] == "SloP95LatencyHigh" for a in alerts)
