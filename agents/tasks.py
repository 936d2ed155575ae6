"""Invoke tasks for the agent multiplexer and the team runner."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from invoke import Collection, task
from rich.markup import escape
from rich.table import Table

from agents.config import BackendConfig, MuxConfig, load_config, load_keys, write_keys
from agents.service import DEFAULT_CONFIG, default_keys_path, serve_forever, start_background
from agents.team import run_team
from dgxready.cli import out, user_errors
from dgxready.roles import ROLE_ORDER, load_roles
from dgxready.settings import load_settings
from model.running import running_model

FEATURE = ("Feature request: per-agent token budgets in the multiplexer, so that one agent "
           "cannot starve the others on the shared DGX Spark.")


def ensure_keys(path: Path, count: int) -> None:
    if not path.exists():
        keys = write_keys(path, count, ROLE_ORDER)
        out.print(f"wrote {len(keys.agents)} agent keys to {path} (mode 600)")


def any_backend_answers(config: MuxConfig) -> bool:
    for b in config.backends:
        try:
            if httpx.get(f"{b.url}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            continue
    return False


@contextlib.contextmanager
def backend_for(config: MuxConfig, parallel: int) -> Iterator[MuxConfig]:
    """The configured backends if one answers; otherwise start the default model for them."""
    if any_backend_answers(config):
        yield config
        return
    with running_model(parallel=parallel, ctx_per_slot=4096) as model:
        yield config.model_copy(update={"backends": [BackendConfig(
            name="local", url=model.base_url, kind="llamacpp", max_concurrency=parallel)]})


@task(help={"count": "number of agents (the seven roles, then extra developers and QA)",
            "output": "keys file to write (default: <state dir>/agent-keys.yaml)"})
@user_errors
def keys(c, count=10, output=None):
    """Create one API key per agent, mapped to its role; the file is written with mode 600."""
    path = Path(output) if output else default_keys_path()
    written = write_keys(path, int(count), ROLE_ORDER)
    for a in written.agents:
        out.print(f"{a.name:<22} {a.role}")
    out.print(f"keys in {path}")


@task(help={"config": "multiplexer YAML (default agents/multiplexer.yaml)",
            "port": "port to listen on (overrides the config)",
            "parallel": "slots for the backend started when none is reachable"})
@user_errors
def serve(c, config=None, port=None, parallel=10):
    """Run the OpenAI-compatible multiplexer in the foreground (Ctrl-C stops it)."""
    cfg = load_config(Path(config) if config else DEFAULT_CONFIG)
    if port:
        cfg = cfg.model_copy(update={"port": int(port)})
    ensure_keys(cfg.keys_file or default_keys_path(), 10)
    with backend_for(cfg, int(parallel)) as live:
        backends = ", ".join(b.url for b in live.backends)
        out.print(f"multiplexer on http://{live.host}:{live.port}/v1 -> {backends}; "
                  f"keys: {live.keys_file or default_keys_path()}")
        serve_forever(live)


@task(help={"scenario": "the scenario to run (feature-cycle)",
            "agents": "number of agents, at least 7",
            "url": "a running multiplexer (default: start one, and a backend if needed)",
            "keys_file": "agent keys for --url (default: <state dir>/agent-keys.yaml)",
            "max_tokens": "output cap per agent turn",
            "output": "transcript JSON (default: <state dir>/runs/<timestamp>.json)"})
@user_errors
def run(c, scenario="feature-cycle", agents=10, url=None, keys_file=None, max_tokens=96, output=None):
    """Run the seven roles through a feature cycle, concurrently, through the multiplexer."""
    settings = load_settings()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out_path = Path(output) if output else settings.state_dir / "runs" / f"{stamp}.json"
    n = int(agents)
    if n < 7:
        raise SystemExit("error: --agents must be at least 7 (one per role)")
    if url:
        kpath = Path(keys_file) if keys_file else default_keys_path()
        team = list(load_keys(kpath, set(load_roles())).values())[:n]
        result = run_team(url, team, out_path, FEATURE, int(max_tokens), scenario)
    else:
        kpath = settings.state_dir / "runs" / "team-keys.yaml"
        team = write_keys(kpath, n, ROLE_ORDER).agents
        base = MuxConfig(port=0, backends=[BackendConfig(name="local", url="http://127.0.0.1:1")],
                         keys_file=kpath, state_db=settings.state_dir / "runs" / "team.db")
        with backend_for(base, n) as cfg:
            mux = start_background(cfg)
            try:
                result = run_team(mux.url, team, out_path, FEATURE, int(max_tokens), scenario)
            finally:
                mux.stop()
    table = Table(title=f"{scenario}: {n} agents, wall {result.wall_s:.1f} s, "
                        f"P95 latency {result.p95_latency_s:.2f} s")
    for col in ("stage", "agent", "latency s", "TTFT s", "tokens out", "tools", "error"):
        table.add_column(col)
    for r in result.records:
        outcomes = sorted(set(r.tool_calls.values()))
        tools = ", ".join(f"{o} {list(r.tool_calls.values()).count(o)}" for o in outcomes)
        table.add_row(str(r.stage), r.agent, f"{r.latency_s:.2f}", f"{r.ttft_s or 0:.2f}",
                      str(r.completion_tokens), tools, r.error or "")
    out.print(table)
    for failure in result.failures:
        out.print(f"[red]hand-off failed[/]: {escape(str(failure))}")
    out.print(f"transcript: {out_path}")
    if not result.ok:
        raise SystemExit(1)


ns = Collection("agents")
for t in (keys, serve, run):
    ns.add_task(t)
