"""The team runner's feature cycle: its hand-offs agree with the role files, and a run against the
real llama-server with the default model hands real content from each step to the next, and the
architects' designs, published to the shared knowledge, come back in the developer's search and
are cited in its document; a denied hand-off fails the run and names the stage, the agent and the
tool."""
import json
import shutil
import subprocess
import sys

import httpx
import pytest

from agents.config import BackendConfig, MuxConfig, write_keys
from agents.service import start_background
from agents.tasks import FEATURE
from agents.team import CYCLE, STEPS, run_team
from dgxready.roles import ROLE_ORDER, ROLES_DIR, load_roles
from tests.conftest import module_server

MAX_TOKENS = 24


def test_every_step_uses_only_tools_its_role_may_call():
    roles = load_roles()
    for step in STEPS.values():
        assert step.tools <= set(roles[step.role].tools), step.role
    assert set(STEPS) == set(ROLE_ORDER)


def test_every_document_read_was_written_before_and_every_one_but_the_last_is_read():
    written: set[str] = set()
    read: set[str] = set()
    for stage in CYCLE:
        for step in stage:
            assert set(step.reads) <= written, f"{step.role} reads what no earlier stage writes"
            read |= set(step.reads)
        written |= {step.writes for step in stage}
    assert written - read == {CYCLE[-1][0].writes}


@pytest.fixture(scope="module")
def backend(tmp_path_factory, session_store, llama_build):
    with module_server(tmp_path_factory, session_store, parallel=4, ctx=4096) as state:
        yield state


def start_team_mux(tmp_path, backend, roles_dir=ROLES_DIR):
    """A multiplexer with one agent per role, whose roles come from `roles_dir`."""
    keys = write_keys(tmp_path / "keys.yaml", len(ROLE_ORDER), ROLE_ORDER)
    config = MuxConfig(port=0, backends=[BackendConfig(name="main", url=backend.base_url, max_concurrency=4)],
                       keys_file=tmp_path / "keys.yaml", state_db=tmp_path / "mux.db")
    return start_background(config, load_roles(roles_dir)), keys.agents


def read_document(url: str, key: str, path: str) -> str:
    r = httpx.post(f"{url}/v1/tools/call", headers={"Authorization": f"Bearer {key}"},
                   json={"tool": "workspace.read", "args": {"path": path}})
    return r.json()["result"]["content"]


@pytest.mark.server
def test_a_feature_cycle_hands_real_content_from_every_step_to_the_next(backend, tmp_path):
    mux, team = start_team_mux(tmp_path, backend)
    try:
        run = run_team(mux.url, team, tmp_path / "run.json", FEATURE, MAX_TOKENS)
        assert run.failures == [] and [r.error for r in run.records] == [None] * len(team)
        assert sorted(r.role for r in run.records) == sorted(ROLE_ORDER)
        for rec in run.records:
            step = STEPS[rec.role]
            assert rec.output.strip(), rec.role
            assert set(rec.tool_calls.values()) == {"ok"}, (rec.role, rec.tool_calls)
            assert len(rec.tool_calls) == len(step.reads) + 3 + step.publishes, (rec.role, rec.tool_calls)
            document = read_document(mux.url, team[0].key, f"runs/{run.started_at}/{step.writes}")
            assert f"## {rec.agent}\n" in document and rec.output.strip() in document
        assert json.loads((tmp_path / "run.json").read_text())["failures"] == []
        by_role = {r.role: r for r in run.records}
        assert by_role["product-manager"].citations == [], "the store starts empty"
        designs = [c for c in by_role["developer"].citations if "/design-" in c]
        assert designs, "the architects' published designs reach the developer's search"
        code = read_document(mux.url, team[0].key, f"runs/{run.started_at}/code.md")
        assert f"Sources: {'; '.join(by_role['developer'].citations)}" in code
    finally:
        mux.stop()


def roles_without(tmp_path, role: str, tool: str):
    """A copy of the role files in which `role` may not call `tool`."""
    roles_dir = tmp_path / "roles"
    shutil.copytree(ROLES_DIR, roles_dir)
    path = roles_dir / f"{role}.yaml"
    text = path.read_text()
    assert f"{tool}, " in text
    path.write_text(text.replace(f"{tool}, ", "", 1))
    return roles_dir


@pytest.mark.server
def test_a_denied_hand_off_fails_agents_run_naming_the_stage_agent_and_tool(backend, tmp_path):
    mux, team = start_team_mux(tmp_path, backend, roles_without(tmp_path, "qa-specialist", "workspace.write"))
    try:
        done = subprocess.run([sys.executable, "-m", "invoke", "agents.run", "--url", mux.url,
                               "--keys-file", str(tmp_path / "keys.yaml"), "--agents", "7",
                               "--max-tokens", str(MAX_TOKENS), "--output", str(tmp_path / "run.json")],
                              capture_output=True, text=True, timeout=600)
    finally:
        mux.stop()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "hand-off failed: stage 4 qa-specialist (qa-specialist-1): workspace.write runs/" in done.stdout
    assert "test-plan.md: denied: role qa-specialist may not call workspace.write" in done.stdout
    transcript = json.loads((tmp_path / "run.json").read_text())
    assert max(r["stage"] for r in transcript["records"]) == 4, "the stages after a failed one do not run"
    assert len(transcript["failures"]) == 1
