"""The alert webhook, over real HTTP: each alert of an Alertmanager notification is one JSON line."""
from __future__ import annotations

import io
import json
import threading

import httpx

from monitoring.webhook import AlertLog, make_server, read_alert_log

NOTIFICATION = {
    "version": "4", "receiver": "dgxready-webhook", "status": "firing",
    "alerts": [
        {"status": "firing", "labels": {"alertname": "SloP95LatencyHigh", "severity": "critical"},
         "annotations": {"runbook_url": "runbooks/alerts.md#slop95latencyhigh"},
         "startsAt": "2026-01-01T00:00:00Z", "endsAt": "0001-01-01T00:00:00Z", "fingerprint": "a1"},
        {"status": "resolved",
         "labels": {"alertname": "BackendDown", "severity": "critical", "backend": "local"},
         "annotations": {}, "startsAt": "2026-01-01T00:00:00Z", "endsAt": "2026-01-01T00:05:00Z",
         "fingerprint": "b2"},
    ],
}


def test_each_alert_is_logged_as_one_json_line_to_the_file_and_stdout(tmp_path):
    stream = io.StringIO()
    log = AlertLog(tmp_path / "alerts.jsonl", stream)
    server = make_server("127.0.0.1", 0, log)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert httpx.post(f"{url}/alerts", json=NOTIFICATION).status_code == 200
        assert httpx.post(f"{url}/alerts", content=b"not json").status_code == 400
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        server.shutdown()
        log.close()
    records = read_alert_log(tmp_path / "alerts.jsonl")
    assert [(r.alertname, r.event, r.level) for r in records] == [
        ("SloP95LatencyHigh", "alert_firing", "error"), ("BackendDown", "alert_resolved", "info")]
    assert records[1].labels["backend"] == "local" and records[0].service == "alert-webhook"
    printed = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [p["fingerprint"] for p in printed] == ["a1", "b2"]
