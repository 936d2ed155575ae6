"""The toolkit's Alertmanager receiver: each alert of a webhook notification becomes one JSON line,
appended to a file and printed on stdout. The file defaults to `<state>/logs/alert-webhook.jsonl`,
beside the other services' logs, where Alloy ships them to Loki. `python -m monitoring.webhook --port 9095`"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TextIO

from dgxready.logs import log_path

SERVICE = "alert-webhook"
ALERTS_PATH = "/alerts"
LEVELS = {"critical": "error", "warning": "warning"}


@dataclass(frozen=True)
class AlertRecord:
    """One alert as the webhook logs it."""
    time: str
    level: str
    service: str
    event: str
    alertname: str
    status: str
    severity: str
    receiver: str
    starts_at: str
    ends_at: str
    fingerprint: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def alert_record(alert: dict, receiver: str) -> AlertRecord:
    labels, status = dict(alert.get("labels") or {}), str(alert.get("status", "firing"))
    severity = labels.get("severity", "")
    return AlertRecord(
        time=now_iso(), level="info" if status == "resolved" else LEVELS.get(severity, "warning"),
        service=SERVICE, event=f"alert_{status}", alertname=labels.get("alertname", ""), status=status,
        severity=severity, receiver=receiver, starts_at=str(alert.get("startsAt", "")),
        ends_at=str(alert.get("endsAt", "")), fingerprint=str(alert.get("fingerprint", "")),
        labels=labels, annotations=dict(alert.get("annotations") or {}))


def alert_records(notification: dict) -> list[AlertRecord]:
    """The records of an Alertmanager webhook notification (payload version 4)."""
    receiver = str(notification.get("receiver", ""))
    return [alert_record(a, receiver) for a in notification.get("alerts") or []]


class AlertLog:
    """Appends records as JSON lines to a file and to a stream, one whole line at a time."""

    def __init__(self, path: Path, stream: TextIO = sys.stdout) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.stream = path, stream
        self.file = open(path, "a", encoding="utf-8")
        self.lock = threading.Lock()

    def write(self, record: AlertRecord) -> None:
        line = json.dumps(asdict(record), sort_keys=True) + "\n"
        with self.lock:
            for out in (self.file, self.stream):
                out.write(line)
                out.flush()

    def close(self) -> None:
        self.file.close()


def read_alert_log(path: Path) -> list[AlertRecord]:
    if not path.exists():
        return []
    return [AlertRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def handler_for(log: AlertLog) -> type[BaseHTTPRequestHandler]:
    class WebhookHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.answer(200 if self.path == "/health" else 404, b"ok\n" if self.path == "/health" else b"")

        def do_POST(self) -> None:  # noqa: N802
            if self.path != ALERTS_PATH:
                self.answer(404, b"")
                return
            try:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                records = alert_records(json.loads(body))
            except (ValueError, AttributeError, TypeError) as exc:
                self.answer(400, f"not an Alertmanager notification: {exc}\n".encode())
                return
            for record in records:
                log.write(record)
            self.answer(200, b"ok\n")

        def answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet access log
            pass

    return WebhookHandler


def make_server(address: str, port: int, log: AlertLog) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((address, port), handler_for(log))


def main() -> None:
    parser = argparse.ArgumentParser(description="dgxready Alertmanager webhook receiver")
    parser.add_argument("--address", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9095, help="port to listen on")
    parser.add_argument("--log", type=Path, default=None,
                        help=f"JSON-lines file for the alerts (default <state>/logs/{SERVICE}.jsonl)")
    args = parser.parse_args()
    log = AlertLog(args.log or log_path(SERVICE))
    server = make_server(args.address, args.port, log)
    try:
        server.serve_forever()
    finally:
        log.close()


if __name__ == "__main__":
    main()
