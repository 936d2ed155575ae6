"""The Prometheus rules, their promtool suites, prometheus.yml and alertmanager.yml, checked with the
real promtool and amtool (Debian's prometheus and prometheus-alertmanager packages)."""
from __future__ import annotations

import re

import pytest

from dgxready.errors import ConfigError
from dgxready.settings import REPO_ROOT
from monitoring.alertmanager import RouteTiming, render_alertmanager_config
from monitoring.prometheus.config import EngineTarget, ScrapeTargets, render_prometheus_config
from monitoring.prometheus.rule_tests import alert_cases, render_rule_test_suite, write_rule_files
from monitoring.prometheus.rules import all_expressions, render_rule_file, rule_set
from monitoring.promtool import check_alertmanager_config, check_config, check_rules, test_rules
from monitoring.settings import AlertParams, MonitoringSettings, load_monitoring_settings

COMMITTED = REPO_ROOT / "monitoring" / "prometheus"
RUNBOOK = REPO_ROOT / "runbooks" / "alerts.md"


def test_the_committed_rule_file_and_suite_are_what_the_code_generates():
    assert (COMMITTED / "rules.yml").read_text() == render_rule_file(), "run `invoke monitoring.rules`"
    assert (COMMITTED / "rules_test.yml").read_text() == render_rule_test_suite("rules.yml")


def test_promtool_accepts_the_rule_file():
    result = check_rules(COMMITTED / "rules.yml")
    assert result.ok, result.describe()


def test_every_alert_fires_on_its_bad_series_and_stays_silent_on_good_ones():
    result = test_rules(COMMITTED / "rules_test.yml")
    assert result.ok, result.describe()


def test_every_alert_has_a_promtool_case():
    assert sorted(c.alert for c in alert_cases()) == sorted(a.name for a in rule_set().alerts)


def test_the_suites_follow_the_thresholds_when_they_change(tmp_path):
    params = AlertParams(slo_p95_e2e_s=0.5, slo_p95_ttft_s=2, error_ratio=0.2, gpu_temp_c=70,
                         memory_used_ratio=0.8, disk_free_ratio=0.3, queue_depth=5, window="2m",
                         short_for_s=0, sustained_for_s=120)
    files = write_rule_files(tmp_path, params)
    assert "dgxready:mux_request_duration_seconds:p95 > 0.5" in files.rules.read_text()
    result = test_rules(files.tests)
    assert result.ok, result.describe()


def runbook_anchors() -> set[str]:
    return {m.group(1).lower() for m in re.finditer(r"^## (\S+)\s*$", RUNBOOK.read_text(), re.MULTILINE)}


def test_every_alert_links_to_its_own_section_of_the_runbook():
    anchors = runbook_anchors()
    for alert in rule_set().alerts:
        url = alert.annotations("runbooks/alerts.md")["runbook_url"]
        assert url == f"runbooks/alerts.md#{alert.anchor}"
        assert alert.anchor in anchors, f"runbooks/alerts.md has no section ## {alert.name}"


def test_the_list_of_expressions_holds_every_recording_and_alert_expression():
    rules = rule_set()
    expressions = all_expressions()
    assert [e.expr for e in expressions] == [r.expr for r in rules.recording] + [a.expr for a in rules.alerts]
    assert sum(e.is_recording for e in expressions) == len(rules.recording)


def test_promtool_accepts_a_prometheus_config_with_every_scrape_job(tmp_path):
    write_rule_files(tmp_path)
    targets = ScrapeTargets(exporter_url="http://127.0.0.1:9400", node_url="http://127.0.0.1:9100",
                            mux_url="http://127.0.0.1:8090", dcgm_url="http://127.0.0.1:9401",
                            alertmanager_url="http://127.0.0.1:9093",
                            engines=[EngineTarget("http://127.0.0.1:8080", "llamacpp", "smollm2-135m"),
                                     EngineTarget("http://127.0.0.1:8000", "vllm", "qwen")])
    config = tmp_path / "prometheus.yml"
    config.write_text(render_prometheus_config(targets, MonitoringSettings(), [str(tmp_path / "rules.yml")]))
    result = check_config(config)
    assert result.ok, result.describe()
    for job in ("dgxready-exporter", "node", "multiplexer", "dcgm", "alertmanager", "engine"):
        assert f"job_name: {job}" in config.read_text()


def test_amtool_accepts_the_alertmanager_config_routing_to_the_webhook(tmp_path):
    config = tmp_path / "alertmanager.yml"
    config.write_text(render_alertmanager_config("http://127.0.0.1:9095/alerts", RouteTiming(group_wait_s=1)))
    result = check_alertmanager_config(config)
    assert result.ok, result.describe()
    assert "http://127.0.0.1:9095/alerts" in config.read_text()


def test_a_monitoring_yaml_overrides_the_defaults_and_its_errors_name_file_and_field(tmp_path):
    good = tmp_path / "monitoring.yaml"
    good.write_text("alerts: {slo_p95_e2e_s: 3}\nscrape_interval_s: 5\n")
    settings = load_monitoring_settings(good)
    assert settings.alerts.slo_p95_e2e_s == 3 and settings.alerts.error_ratio == 0.01
    assert settings.scrape_interval_s == 5
    bad = tmp_path / "bad.yaml"
    bad.write_text("alerts: {error_ratio: 2}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: alerts.error_ratio"):
        load_monitoring_settings(bad)
