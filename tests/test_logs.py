"""Structured logs: one setup (dgxready.logs) writes JSON lines with time, level, service, agent,
session and event; the real multiplexer process logs through it; the committed Alloy configuration
matches the files the services write and is balanced. Alloy itself cannot run here."""
import json
import logging
import os
import subprocess
import sys
import time
from fnmatch import fnmatch

import httpx
import pytest
import yaml

from agents.config import write_keys
from agents.service import SERVICE
from dgxready.logs import FIELDS, log_path, setup_logging
from dgxready.ports import free_port
from dgxready.roles import ROLE_ORDER
from dgxready.settings import REPO_ROOT, Settings
from monitoring.alloy import ALLOY_CONFIG, AlloyTargets, render_alloy_config


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_line_is_json_with_the_six_fields_and_extras_after_them(tmp_path, restore_root_logger):
    path = setup_logging("dgxready-test", tmp_path / "t.jsonl", console=False)
    log = logging.getLogger("dgxready.test")
    log.info("chat.completed", extra={"agent": "developer-1", "session": "feature-42", "tokens": 7})
    # Not uvicorn: an in-process uvicorn earlier in the run installs its own logging config.
    logging.getLogger("aiohttp.client").warning("from a library")
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("failed", extra={"agent": "qa-specialist-1"})
    first, library, failure = read_lines(path)
    for line in (first, library, failure):
        assert set(FIELDS) <= set(line) and line["service"] == "dgxready-test"
    assert (first["agent"], first["session"], first["event"], first["tokens"]) == (
        "developer-1", "feature-42", "chat.completed", 7)
    assert first["time"].endswith("+00:00") and first["level"] == "INFO"
    assert library["agent"] is None and library["event"] == "from a library"
    assert failure["level"] == "ERROR" and "ValueError: bad" in failure["exc_info"]


def test_setting_up_twice_replaces_the_handlers_instead_of_doubling_lines(tmp_path, restore_root_logger):
    setup_logging("a", tmp_path / "a.jsonl", console=False)
    path = setup_logging("b", tmp_path / "b.jsonl", console=False)
    logging.getLogger("x").warning("once")
    assert [line["service"] for line in read_lines(path)] == ["b"]
    assert (tmp_path / "a.jsonl").read_text() == ""


def wait_for(check, seconds=30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_the_multiplexer_process_logs_tool_calls_with_agent_and_session_and_no_session_in_metrics(tmp_path):
    keys = write_keys(tmp_path / "keys.yaml", 7, ROLE_ORDER)
    port = free_port()
    config = tmp_path / "mux.yaml"
    config.write_text(yaml.safe_dump({"host": "127.0.0.1", "port": port,
                                      "keys_file": str(tmp_path / "keys.yaml"),
                                      "state_db": str(tmp_path / "mux.db"),
                                      "backends": [{"name": "none", "url": "http://127.0.0.1:9"}]}))
    env = os.environ | {"DGXREADY_STATE_DIR": str(tmp_path / "state"), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "agents.service", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _answers(url)), proc.stdout.read1().decode() if proc.poll() is not None else ""
        pm = next(a for a in keys.agents if a.role == "product-manager")
        r = httpx.post(f"{url}/v1/tools/call", headers={"Authorization": f"Bearer {pm.key}"},
                       json={"tool": "shell.run", "args": {"argv": ["id"]}, "session": "feature-42"})
        assert r.status_code == 403
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    lines = read_lines(log_path(SERVICE, Settings(state_dir=tmp_path / "state")))
    assert lines[0]["event"] == "mux.started" and lines[0]["service"] == "dgxready-mux"
    tool = next(line for line in lines if line["event"] == "tool.call")
    assert (tool["agent"], tool["session"], tool["tool"], tool["outcome"]) == (
        pm.name, "feature-42", "shell.run", "denied")
    assert "feature-42" not in metrics


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/metrics", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_committed_alloy_config_is_the_generated_one():
    assert ALLOY_CONFIG.read_text() == render_alloy_config(), "run `python -m monitoring.alloy` and commit"


def test_alloy_matches_the_files_the_provisioned_services_write():
    targets = AlloyTargets()
    host_state = Settings(state_dir=f"{targets.prefix}/state")
    for service in (SERVICE, "alert-webhook", "dgxready-exporter"):
        assert fnmatch(str(log_path(service, host_state)), targets.log_glob), service
    assert not fnmatch(f"{targets.prefix}/state/multiplexer.db", targets.log_glob)


def code_outside_strings(text: str) -> tuple[str, bool]:
    """Alloy text with comments and string contents removed, and whether every string closed."""
    out, in_string, i = [], False, 0
    while i < len(text):
        ch = text[i]
        if in_string:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_string = False
                out.append(ch)
        elif text.startswith("//", i):
            i = text.find("\n", i) if "\n" in text[i:] else len(text)
            continue
        else:
            in_string = ch == '"'
            out.append(ch)
        i += 1
    return "".join(out), not in_string


def test_alloy_config_is_balanced_and_wires_file_and_journal_sources_to_one_loki_writer():
    text = ALLOY_CONFIG.read_text()
    code, strings_closed = code_outside_strings(text)
    assert strings_closed
    for opening, closing in ("{}", "[]", "()"):
        depth = 0
        for ch in code:
            depth += (ch == opening) - (ch == closing)
            assert depth >= 0
        assert depth == 0, opening + closing
    for chain in ("local.file_match.dgxready.targets", "loki.process.dgxready.receiver",
                  "loki.relabel.journal.rules", "loki.write.default.receiver"):
        assert chain in code
    for block in ('local.file_match "dgxready"', 'loki.source.file "dgxready"', 'loki.process "dgxready"',
                  'loki.source.journal "dgxready"', 'loki.write "default"'):
        assert text.count(block) == 1, block
    assert "session" not in text.split("stage.labels")[1].split("}")[0]
