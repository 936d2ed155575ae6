"""Dashboards as code: the committed Grafana files are what the definitions generate, and the
definitions keep the shape the docs promise (SLO first, one definition per panel, no session ids)."""
import json

import pytest
import yaml

from dgxready.errors import DgxReadyError
from monitoring.dashboards.definitions import DASHBOARDS, OVERVIEW, SLO_S
from monitoring.dashboards.grafana import GRAFANA_DIR, HOST_DASHBOARDS_PATH, generated_files
from monitoring.dashboards.model import concrete, panel_queries
from monitoring.snapshot import TimeRange, legend, take_snapshot


def test_the_committed_grafana_files_are_the_generated_ones():
    expected = generated_files()
    committed = {str(p.relative_to(GRAFANA_DIR)): p.read_text()
                 for p in GRAFANA_DIR.rglob("*") if p.is_file()}
    assert committed == expected, "run `python -m monitoring.dashboards.grafana` and commit monitoring/grafana/"


def test_the_overview_puts_the_p95_against_the_6_s_line_first():
    first = OVERVIEW.panels[0]
    assert "P95" in first.title and first.line == SLO_S == 6.0
    assert "dgxready_mux_request_duration_seconds_bucket" in first.queries[0].expr
    grafana = json.loads(generated_files()["dashboards/dgxready-overview.json"])
    panel = next(p for p in grafana["panels"] if p["type"] != "row")
    assert panel["title"] == first.title
    assert panel["fieldConfig"]["defaults"]["thresholds"]["steps"][-1] == {"color": "red", "value": 6.0}


def test_every_dashboard_panel_has_a_unique_title_and_grafana_ids_are_unique():
    assert len({d.uid for d in DASHBOARDS}) == len(DASHBOARDS) == 4
    for d in DASHBOARDS:
        titles = [p.title for p in d.panels]
        assert len(titles) == len(set(titles)), d.uid
        ids = [p["id"] for p in json.loads(generated_files()[f"dashboards/{d.uid}.json"])["panels"]]
        assert len(ids) == len(set(ids)) and 0 not in ids


def test_provisioning_names_both_datasources_and_a_file_provider_with_a_path():
    files = generated_files()
    sources = yaml.safe_load(files["provisioning/datasources/dgxready.yaml"])["datasources"]
    assert {(s["type"], s["uid"]) for s in sources} == {("prometheus", "prometheus"), ("loki", "loki")}
    provider = yaml.safe_load(files["provisioning/dashboards/dgxready.yaml"])["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"] == HOST_DASHBOARDS_PATH
    panel_sources = {p["datasource"]["uid"] for name, text in files.items() if name.endswith(".json")
                     for p in json.loads(text)["panels"] if "datasource" in p}
    assert panel_sources == {"prometheus", "loki"}


def test_no_expression_groups_or_filters_by_a_session_id():
    for q in panel_queries(DASHBOARDS):
        assert "session" not in q.expr, q


def test_the_query_list_holds_every_prometheus_panel_and_rate_windows_become_concrete():
    queries = panel_queries(DASHBOARDS)
    prom_panels = {(d.uid, p.title) for d in DASHBOARDS for p in d.panels if p.datasource == "prometheus"}
    assert {(q.dashboard, q.panel) for q in queries} == prom_panels
    assert {q.needs for q in queries} == {None, "gpu", "vllm", "baseline"}
    assert all("$" not in concrete(q.expr, "1m").replace('"$1"', "") for q in queries)


def test_snapshot_without_a_recorded_stack_or_url_says_to_start_one(tmp_path, monkeypatch):
    monkeypatch.setenv("DGXREADY_STATE_DIR", str(tmp_path))
    with pytest.raises(DgxReadyError, match="monitoring.up"):
        take_snapshot()


def test_snapshot_legends_follow_grafanas_templates_and_rate_windows_cover_four_scrapes():
    assert legend("{{role}}: {{ tool }}", {"role": "developer", "tool": "shell.run"}) == "developer: shell.run"
    assert legend("__auto", {"__name__": "up", "job": "mux"}) == 'up{job="mux"}'
    assert TimeRange(0, 3600, 15).rate_interval(15) == "60s"
    assert TimeRange(0, 86400, 360).rate_interval(15) == "375s"
