"""`backup.drill`: the recovery procedure timed on a scratch copy, never on the live state.

A multiplexer is started on a drill state folder in front of the given backends; agents send
session turns and tool calls while the backup runs; the state folder is then destroyed, restored
from the snapshot, verified (restic check, sha256 against the manifest, integrity_check) and
served again, and one agent's session continues where it was. The recovery time is measured from
the destruction to that continued turn; the recovery point is what the schedule implies."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from jsonschema import Draft202012Validator
from rich.console import Console
from rich.table import Table

from agents.config import AgentIdentity, BackendConfig, KeysFile, MuxConfig
from agents.service import start_background
from backup.capture import integrity
from backup.config import BackupConfig, Resolved, resolve
from backup.ops import restic_for, restore_snapshot, run_backup
from backup.restic import BackupError
from dgxready.files import atomic_write_json, atomic_write_text
from dgxready.settings import load_settings

SCHEMA = Path(__file__).with_name("schema") / "drill-report-v1.schema.json"
SCHEMA_ID = "dgxready.backup-drill/v1"
ROLE = "developer"
TASKBOARD = "taskboard-items"
Say = Callable[[str], None]


@dataclass(frozen=True)
class DrillOptions:
    agents: int = 4
    workdir: Path | None = None
    output: Path | None = None
    turns_before: int = 2
    max_tokens: int = 8
    keep: bool = False  # the scratch folder (its repository and password) stays for a look afterwards


@dataclass(frozen=True)
class DrillPaths:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def db(self) -> Path:
        return self.state / "multiplexer.db"

    @property
    def keys(self) -> Path:
        return self.state / "agent-keys.yaml"

    @property
    def password(self) -> Path:
        return self.root / "password"


def drill_config(base: BackupConfig, paths: DrillPaths) -> Resolved:
    """The configured schedule, retention and targets; a scratch repository and state."""
    config = base.model_copy(update={
        "repository": str(paths.root / "repo"), "password_file": paths.password,
        "databases": {"multiplexer": paths.db, "knowledge": paths.db.with_name("knowledge.db")},
        "paths": [paths.state], "weights": False,
        "staging_dir": paths.root / "staging", "cache_dir": paths.root / "restic-cache"})
    return resolve(config)


def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    os.chmod(path, 0o600)


def drill_keys(paths: DrillPaths, count: int) -> list[AgentIdentity]:
    agents = [AgentIdentity(name=f"drill-{i + 1}", role=ROLE, key=f"dgx-{secrets.token_urlsafe(24)}")
              for i in range(count)]
    write_private(paths.keys, yaml.safe_dump(KeysFile(agents=agents).model_dump(mode="json"), sort_keys=False))
    return agents


def mux_config(paths: DrillPaths, backends: list[BackendConfig]) -> MuxConfig:
    return MuxConfig(port=0, backends=backends, keys_file=paths.keys, state_db=paths.db, rate_limits=False,
                     health_interval_s=0.5, cooldown_s=2.0)


def session_id(agent: AgentIdentity) -> str:
    return f"drill-session-{agent.name}"


def headers(agent: AgentIdentity) -> dict[str, str]:
    return {"Authorization": f"Bearer {agent.key}", "X-Session-Id": session_id(agent)}


def chat_turn(client: httpx.Client, url: str, agent: AgentIdentity, text: str, max_tokens: int) -> None:
    r = client.post(f"{url}/v1/chat/completions", headers=headers(agent), json={
        "model": "any", "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}]})
    r.raise_for_status()


def tool_call(client: httpx.Client, url: str, agent: AgentIdentity, tool: str, args: dict) -> None:
    r = client.post(f"{url}/v1/tools/call", headers=headers(agent), json={"tool": tool, "args": args})
    r.raise_for_status()


def session_of(url: str, agent: AgentIdentity) -> dict:
    r = httpx.get(f"{url}/v1/sessions/{session_id(agent)}", headers=headers(agent), timeout=30)
    r.raise_for_status()
    return r.json()


@dataclass
class Traffic:
    """Two threads per agent: one sends chat turns in the agent's session, the other workspace
    appends and task-board items (paced, `tool_pause_s` apart); every acknowledged operation is timed."""
    url: str
    agents: list[AgentIdentity]
    max_tokens: int
    turns: list[tuple[str, float]] = field(default_factory=list)
    tools: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)
    tool_pause_s: float = 0.2

    def failed(self, agent: AgentIdentity, exc: Exception) -> None:
        with self.lock:
            self.errors.append(f"{agent.name}: {exc.__class__.__name__}: {exc}"[:300])
        self.stop.wait(0.5)

    def chat_loop(self, agent: AgentIdentity) -> None:
        with httpx.Client(timeout=120) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                try:
                    chat_turn(client, self.url, agent, f"Drill turn {n}: name one thing a backup must keep.",
                              self.max_tokens)
                except httpx.HTTPError as exc:
                    self.failed(agent, exc)
                    continue
                with self.lock:
                    self.turns.append((agent.name, time.monotonic()))

    def tool_loop(self, agent: AgentIdentity) -> None:
        with httpx.Client(timeout=60) as client:
            n = 0
            while not self.stop.wait(self.tool_pause_s):
                n += 1
                try:
                    tool_call(client, self.url, agent, "workspace.write",
                              {"path": f"drill/{agent.name}.log", "append": f"note {n} {time.time():.6f}\n"})
                    tool_call(client, self.url, agent, "taskboard.append",
                              {"item": f"{agent.name}: drill item {n} at {time.time():.6f}"})
                except httpx.HTTPError as exc:
                    self.failed(agent, exc)
                    continue
                with self.lock:
                    self.tools.extend([time.monotonic()] * 2)

    def start(self) -> None:
        for agent in self.agents:
            for loop in (self.chat_loop, self.tool_loop):
                t = threading.Thread(target=loop, args=(agent,), daemon=True)
                t.start()
                self.threads.append(t)

    def wait_for_turns(self, count: int, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.turns) < count and time.monotonic() < deadline and not self.errors:
            time.sleep(0.05)
        if len(self.turns) < count:
            raise BackupError(f"drill: the multiplexer answered {len(self.turns)} of {count} turns before the "
                              f"backup: {'; '.join(self.errors[:3]) or 'too slow'}")

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)

    def acked(self, agent: str, before: float) -> int:
        return sum(1 for name, at in self.turns if name == agent and at < before)

    def tool_pairs_before(self, before: float) -> int:
        """Workspace append + task-board item pairs acknowledged before `before`."""
        return sum(1 for at in self.tools if at < before) // 2

    def between(self, start: float, end: float) -> tuple[int, int]:
        turns = sum(1 for _, at in self.turns if start <= at <= end)
        return turns, sum(1 for at in self.tools if start <= at <= end)


def continue_session(url: str, agent: AgentIdentity, acked_before: int, max_tokens: int) -> dict:
    """The restored session has at least the turns acknowledged before the backup began, and a
    new turn appends after them with the earlier history intact."""
    before = session_of(url, agent)
    with httpx.Client(timeout=120) as client:
        chat_turn(client, url, agent, "After the restore: continue where we were.", max_tokens)
    after = session_of(url, agent)
    kept = after["history"][:len(before["history"])] == before["history"]
    continued = after["turns"] == before["turns"] + 1 and kept and before["turns"] >= acked_before
    return {"id": session_id(agent), "acked_before_backup": acked_before, "turns_restored": before["turns"],
            "turns_after_new_turn": after["turns"], "history_kept": kept, "continued": continued}


@dataclass
class Clock:
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> float:
        self.marks[name] = time.monotonic()
        return self.marks[name]

    def between(self, a: str, b: str) -> float:
        return round(self.marks[b] - self.marks[a], 3)


def backup_under_traffic(resolved: Resolved, paths: DrillPaths, backends: list[BackendConfig],
                         options: DrillOptions, clock: Clock,
                         say: Say) -> tuple[dict, dict, list[AgentIdentity]]:
    agents = drill_keys(paths, options.agents)
    mux = start_background(mux_config(paths, backends))
    traffic = Traffic(mux.url, agents, options.max_tokens)
    try:
        traffic.start()
        traffic.wait_for_turns(options.turns_before * len(agents))
        write_private(paths.state / "runs" / "drill-transcript.json",
                      json.dumps({"turns": [{"agent": a, "t": t} for a, t in traffic.turns]}))
        start = clock.mark("backup_start")
        say(f"backing up while {len(agents)} agents send turns and tool calls to {mux.url}")
        result = run_backup(resolved, restic_for(resolved, "drill"), False, say)
        end = clock.mark("backup_end")
        traffic.stop.wait(1.0)
    finally:
        traffic.finish()
        mux.stop()
    turns, tools = traffic.between(start, end)
    acked = {a.name: traffic.acked(a.name, start) for a in agents} | {
        TASKBOARD: traffic.tool_pairs_before(start)}
    doc = {"snapshot": result.snapshot, "seconds": round(result.seconds, 3), "files": result.files,
           "bytes": result.bytes, "databases": {Path(p).name: c for p, c in result.databases.items()},
           "turns_during_backup": turns, "tool_calls_during_backup": tools,
           "traffic_errors": traffic.errors[:10], "turns_total": len(traffic.turns)}
    return doc, acked, agents


def restore_and_continue(resolved: Resolved, paths: DrillPaths, backends: list[BackendConfig], snapshot: str,
                         agents: list[AgentIdentity], acked: dict[str, int], options: DrillOptions,
                         clock: Clock, say: Say) -> dict:
    restic = restic_for(resolved, "drill")
    result = restore_snapshot(resolved, restic, snapshot, None, say)
    clock.mark("restored")
    mux = start_background(mux_config(paths, backends))
    clock.mark("serving")
    try:
        session = continue_session(mux.url, agents[0], acked[agents[0].name], options.max_tokens)
    finally:
        mux.stop()
    clock.mark("continued")
    restored_items = taskboard_items(paths.db)
    return {"taskboard": {"acked_before_backup": acked[TASKBOARD], "restored": restored_items,
                          "kept": restored_items >= acked[TASKBOARD]},
            "restore_seconds": round(result.seconds, 3), "files": result.files,
            "restic_check": "ok", "checksums": "ok" if not result.problems_in_place else "mismatch",
            "problems": result.problems_in_place[:10],
            "sqlite_integrity": {Path(p).name: integrity(Path(p)) for p in result.databases},
            "session": session}


def taskboard_items(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM taskboard").fetchone()[0]
    finally:
        conn.close()


def rpo(config: BackupConfig, backup_seconds: float) -> dict:
    """The schedule's interval is the RPO it implies; the worst case adds the time a backup takes
    to become a snapshot, reported beside it."""
    implied = config.schedule_minutes * 60
    return {"schedule_minutes": config.schedule_minutes, "implied_s": implied,
            "worst_case_s": round(implied + backup_seconds, 3), "target_s": config.rpo_target_s,
            "met": implied <= config.rpo_target_s}


def check_report(doc: dict) -> None:
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(Draft202012Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        where = "/".join(str(p) for p in errors[0].path) or "<root>"
        raise BackupError(f"drill report: {where}: {errors[0].message} ({SCHEMA.name})")


def report_path(options: DrillOptions) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return options.output or load_settings().state_dir / "backup" / "drills" / f"{stamp}.json"


def run_drill(config: BackupConfig, backends: list[BackendConfig], options: DrillOptions,
              say: Say = print) -> tuple[dict, Path]:
    root = options.workdir or load_settings().cache_dir / "backup-drill" / time.strftime("%Y%m%dT%H%M%S")
    paths = DrillPaths(root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, mode=0o700)
    write_private(paths.password, secrets.token_urlsafe(32) + "\n")
    resolved = drill_config(config, paths)
    clock = Clock()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        backup, acked, agents = backup_under_traffic(resolved, paths, backends, options, clock, say)
        clock.mark("destroyed")
        shutil.rmtree(paths.state)
        say(f"destroyed {paths.state}; restoring snapshot {backup['snapshot']}")
        verify = restore_and_continue(resolved, paths, backends, backup["snapshot"], agents, acked, options,
                                      clock, say)
    finally:
        if not options.keep:
            shutil.rmtree(root, ignore_errors=True)
    rto = clock.between("destroyed", "continued")
    doc = {"schema": SCHEMA_ID, "started_at": started, "host": socket.gethostname(), "backup": backup,
           "verify": verify,
           "rto": {"measured_s": rto, "restore_s": clock.between("destroyed", "restored"),
                   "serve_s": clock.between("restored", "serving"),
                   "continue_s": clock.between("serving", "continued"),
                   "target_s": config.rto_target_s, "met": rto <= config.rto_target_s},
           "rpo": rpo(config, backup["seconds"])}
    doc["passed"] = bool(doc["rto"]["met"] and doc["rpo"]["met"] and verify["session"]["continued"]
                         and verify["checksums"] == "ok" and not backup["traffic_errors"]
                         and verify["taskboard"]["kept"]
                         and all(c == "ok" for c in verify["sqlite_integrity"].values()))
    check_report(doc)
    path = report_path(options)
    atomic_write_json(path, doc)
    return doc, path


def print_report(out: Console, doc: dict, path: Path) -> None:
    table = Table(title=f"backup drill: {'PASSED' if doc['passed'] else 'FAILED'}")
    for col in ("measure", "value", "target", "met"):
        table.add_column(col)
    rto, rpo_ = doc["rto"], doc["rpo"]
    table.add_row("RTO (destroy → continued session)", f"{rto['measured_s']:.1f} s", f"{rto['target_s']:.0f} s",
                  "yes" if rto["met"] else "NO")
    table.add_row(f"RPO (a backup every {rpo_['schedule_minutes']} min)",
                  f"{rpo_['implied_s']:.0f} s (worst case, with the backup's own time: "
                  f"{rpo_['worst_case_s']:.0f} s)",
                  f"{rpo_['target_s']:.0f} s", "yes" if rpo_["met"] else "NO")
    table.add_row("  of the RTO: restore+verify / multiplexer up / continued turn",
                  f"{rto['restore_s']:.1f} / {rto['serve_s']:.1f} / {rto['continue_s']:.1f} s", "", "")
    b, v = doc["backup"], doc["verify"]
    table.add_row("turns / tool calls during the backup", f"{b['turns_during_backup']} / "
                  f"{b['tool_calls_during_backup']}", "", "")
    s = v["session"]
    table.add_row("session continued", f"{s['turns_restored']} → {s['turns_after_new_turn']} turns "
                  f"(≥ {s['acked_before_backup']} acknowledged before)", "", "yes" if s["continued"] else "NO")
    board = v["taskboard"]
    table.add_row("task-board items restored", f"{board['restored']} (≥ {board['acked_before_backup']} "
                  "acknowledged before)", "", "yes" if board["kept"] else "NO")
    table.add_row("checksums, integrity_check", f"{v['checksums']}, "
                  f"{', '.join(f'{k}: {c}' for k, c in v['sqlite_integrity'].items())}", "", "")
    out.print(table)
    out.print(f"report: {path}")
