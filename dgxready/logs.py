"""One logging setup for the toolkit's services (the multiplexer, the alert webhook, ...): JSON
lines through python-json-logger, with time, level, service, agent, session and event (the log
message) in every line and any `extra=` fields after them. Lines go to `<state>/logs/<service>.jsonl`,
which Grafana Alloy ships to Loki (monitoring/alloy/config.alloy). Session ids belong here, in
log lines, and never in metric labels.

    log = logging.getLogger("dgxready.mux")
    log.info("chat.completed", extra={"agent": "developer-1", "session": "feature-42", "tokens": 57})
"""
from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

from pythonjsonlogger.json import JsonFormatter

from dgxready.settings import Settings, load_settings

LOG_SUFFIX = ".jsonl"
FIELDS = ("time", "level", "service", "agent", "session", "event")


def log_dir(settings: Settings | None = None) -> Path:
    return (settings or load_settings()).state_dir / "logs"


def log_path(service: str, settings: Settings | None = None) -> Path:
    return log_dir(settings) / f"{service}{LOG_SUFFIX}"


def json_formatter(service: str) -> JsonFormatter:
    return JsonFormatter("{levelname}{service}{agent}{session}{message}", style="{", timestamp="time",
                         rename_fields={"levelname": "level", "message": "event"},
                         static_fields={"service": service}, defaults={"agent": None, "session": None})


def setup_logging(service: str, path: Path | None = None, level: str | int = "INFO",
                  console: bool | None = None) -> Path:
    """Route the root logger (and so uvicorn's and every library's) to JSON lines in `path`
    (default `<state>/logs/<service>.jsonl`); on a terminal (or with `console=True`) to stderr too.
    Under systemd stderr goes to the journal, which Alloy ships as well, so there it stays off.
    Calling it again replaces the handlers it installed before. Returns the file's path."""
    path = path or log_path(service)
    path.parent.mkdir(parents=True, exist_ok=True)
    formatter = json_formatter(service)
    # WatchedFileHandler reopens the file after logrotate moves it.
    handlers: list[logging.Handler] = [logging.handlers.WatchedFileHandler(path, encoding="utf-8")]
    if console if console is not None else sys.stderr.isatty():
        handlers.append(logging.StreamHandler(sys.stderr))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "dgxready_service", None)]:
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.dgxready_service = service  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    return path
