"""Tools the agents may call through the multiplexer, with per-role permissions, an audit log,
idempotency keys (session + tool + hash of the arguments) and leases with fencing tokens."""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agents.state import StateStore
from dgxready.roles import Role

PATH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,200}$")
MUTATING = {"workspace.write", "taskboard.append", "shell.run"}


class ToolError(Exception):
    """A tool refused the call; the message goes back to the caller as the tool's result."""


@dataclass(frozen=True)
class ToolCall:
    agent: str
    role: Role
    session: str | None
    tool: str
    args: dict


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    outcome: str
    result: dict | None = None
    error: str | None = None
    replayed: bool = False


class KnowledgeBackend(Protocol):
    def query(self, text: str, limit: int) -> list[dict]: ...


class NoKnowledge:
    def query(self, text: str, limit: int) -> list[dict]:
        return []


def idempotency_key(call: ToolCall) -> str:
    canonical = json.dumps(call.args, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{call.agent}\0{call.session}\0{call.tool}\0{canonical}".encode()).hexdigest()


def _path(args: dict) -> str:
    path = args.get("path")
    if not isinstance(path, str) or not PATH_RE.match(path) or ".." in path.split("/"):
        raise ToolError(f"path {path!r}: use letters, digits, ._-/ and no '..'")
    return path


class ToolRegistry:
    def __init__(self, store: StateStore, shell_allowlist: list[str],
                 knowledge: KnowledgeBackend | None = None,
                 on_outcome: Callable[[ToolCall, str], None] | None = None, lease_ttl_s: float = 30.0):
        self.store = store
        self.shell_allowlist = set(shell_allowlist)
        self.knowledge = knowledge or NoKnowledge()
        self.on_outcome = on_outcome or (lambda call, outcome: None)
        self.lease_ttl_s = lease_ttl_s
        self.tools: dict[str, Callable[[ToolCall], dict]] = {
            "workspace.read": self._read, "workspace.write": self._write,
            "taskboard.append": self._append, "shell.run": self._shell,
            "knowledge.query": self._knowledge,
        }

    def permitted(self, call: ToolCall) -> str | None:
        if call.tool not in self.tools:
            return f"unknown tool {call.tool!r}"
        needed = {call.tool}
        if call.tool == "workspace.read" and call.args.get("lease"):
            needed.add("workspace.write")
        missing = sorted(needed - set(call.role.tools))
        return f"role {call.role.name} may not call {', '.join(missing)}" if missing else None

    def call(self, call: ToolCall) -> ToolResult:
        denied = self.permitted(call)
        if denied:
            return self._finish(call, ToolResult(False, "denied", error=denied))
        # A leased read is safe to repeat (the same holder just gets a fresh token), so only
        # the mutating tools are deduplicated.
        key = idempotency_key(call) if call.tool in MUTATING and call.session else None
        # Database tools check, apply and record in one transaction, so a retry applies once;
        # shell.run runs outside it so that a slow command does not hold the store.
        atomic = key is not None and call.tool != "shell.run"
        try:
            with self.store.tx() if atomic else contextlib.nullcontext():
                if key:
                    with self.store.tx() as db:
                        row = db.execute("SELECT result FROM idempotency WHERE key=?", (key,)).fetchone()
                    if row:
                        return self._finish(call, ToolResult(True, "replayed", json.loads(row[0]),
                                                             replayed=True))
                result = self.tools[call.tool](call)
                if key:
                    with self.store.tx() as db:
                        db.execute("INSERT OR IGNORE INTO idempotency(key, result, ts) VALUES(?,?,?)",
                                   (key, json.dumps(result), time.time()))
        except ToolError as exc:
            return self._finish(call, ToolResult(False, "error", error=str(exc)))
        return self._finish(call, ToolResult(True, "ok", result))

    def _finish(self, call: ToolCall, res: ToolResult) -> ToolResult:
        detail = json.dumps(call.args)[:500] if res.ok else (res.error or "")
        self.store.audit(call.agent, call.session, call.tool, res.outcome, detail)
        self.on_outcome(call, res.outcome)
        return res

    def _holder(self, call: ToolCall) -> str:
        return f"{call.agent}:{call.session or '-'}"

    def _read(self, call: ToolCall) -> dict:
        path = _path(call.args)
        with self.store.tx() as db:
            row = db.execute("SELECT content, version FROM workspace WHERE path=?", (path,)).fetchone()
            out = {"path": path, "content": row[0] if row else "", "version": row[1] if row else 0}
            if call.args.get("lease"):
                out["token"] = self._lease(db, path, self._holder(call))
        return out

    def _lease(self, db, resource: str, holder: str) -> int:
        now = time.time()
        lease = db.execute("SELECT holder, expires FROM leases WHERE resource=?", (resource,)).fetchone()
        if lease and lease[0] != holder and lease[1] > now:
            raise ToolError(f"{resource}: leased by another agent for {lease[1] - now:.1f} s more")
        fence = db.execute("SELECT last_token FROM fences WHERE resource=?", (resource,)).fetchone()
        token = (fence[0] if fence else 0) + 1
        db.execute("INSERT INTO fences(resource, last_token) VALUES(?,?) ON CONFLICT(resource) "
                   "DO UPDATE SET last_token=excluded.last_token", (resource, token))
        db.execute("INSERT INTO leases(resource, holder, token, expires) VALUES(?,?,?,?) "
                   "ON CONFLICT(resource) DO UPDATE SET holder=excluded.holder, token=excluded.token, "
                   "expires=excluded.expires", (resource, holder, token, now + self.lease_ttl_s))
        return token

    def _write(self, call: ToolCall) -> dict:
        path = _path(call.args)
        append = call.args.get("append")
        content = call.args.get("content")
        with self.store.tx() as db:
            row = db.execute("SELECT content, version, token FROM workspace WHERE path=?", (path,)).fetchone()
            current, version, last_token = row if row else ("", 0, 0)
            if append is not None:
                if not isinstance(append, str):
                    raise ToolError("append must be a string")
                new, token = current + append, last_token
            else:
                if not isinstance(content, str):
                    raise ToolError("give content (with the token from a leased read) or append")
                token = call.args.get("token")
                lease = db.execute("SELECT holder, token, expires FROM leases WHERE resource=?",
                                   (path,)).fetchone()
                if not isinstance(token, int) or lease is None:
                    raise ToolError(f"{path}: writing needs a lease token from workspace.read(lease=true)")
                if token < lease[1] or token <= last_token:
                    raise ToolError(f"{path}: stale fencing token {token} (current {lease[1]})")
                if lease[0] != self._holder(call) or lease[2] < time.time():
                    raise ToolError(f"{path}: the lease for token {token} expired or moved")
                new = content
                db.execute("DELETE FROM leases WHERE resource=?", (path,))
            db.execute("INSERT INTO workspace(path, content, version, token) VALUES(?,?,?,?) "
                       "ON CONFLICT(path) DO UPDATE SET content=excluded.content, version=excluded.version, "
                       "token=excluded.token", (path, new, version + 1, token))
        return {"path": path, "version": version + 1}

    def _append(self, call: ToolCall) -> dict:
        item = call.args.get("item")
        if not isinstance(item, str) or not item.strip():
            raise ToolError("item must be a non-empty string")
        with self.store.tx() as db:
            cur = db.execute("INSERT INTO taskboard(ts, agent, item) VALUES(?,?,?)",
                             (time.time(), call.agent, item[:4000]))
        return {"id": cur.lastrowid}

    def _shell(self, call: ToolCall) -> dict:
        argv = call.args.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ToolError("argv must be a non-empty list of strings")
        if argv[0] not in self.shell_allowlist:
            raise ToolError(f"command {argv[0]!r} is not allowlisted")
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=5, shell=False)
        except subprocess.TimeoutExpired:
            raise ToolError(f"{argv[0]} timed out after 5 s") from None
        return {"exit": proc.returncode, "stdout": proc.stdout[-4000:], "stderr": proc.stderr[-2000:]}

    def _knowledge(self, call: ToolCall) -> dict:
        text = call.args.get("query")
        if not isinstance(text, str):
            raise ToolError("query must be a string")
        limit = call.args.get("limit", 5)
        return {"results": self.knowledge.query(text, int(limit) if isinstance(limit, int) else 5)}
