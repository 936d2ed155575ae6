"""Tools the agents may call through the multiplexer, with per-role permissions, an audit log,
idempotency keys and leases with fencing tokens.

A mutating call is applied once per idempotency key: the client's own (the Idempotency-Key
header), kept for `idempotency_retention_s`, or without one a hash of agent, session, tool and
arguments, which only catches retries within `idempotency_window_s`. A leased path takes no
mutation but its holder's; shell.run runs in the sandbox of agents.sandbox."""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from agents.config import MuxConfig
from agents.knowledge.service import KnowledgeService
from agents.knowledge.types import TEAM_SCOPE, Author, KnowledgeError, SearchAnswer
from agents.sandbox import (
    DEFAULT_SHELL_ALLOWLIST,
    MAX_ARGS,
    ArgvMatch,
    ArgvPattern,
    Sandbox,
    SandboxError,
    SandboxLimits,
    is_workspace_path,
)
from agents.state import StateStore
from dgxready.roles import Role

log = logging.getLogger("dgxready.mux.tools")

MUTATING = {"workspace.write", "taskboard.append"}
# A role that may call the right-hand tool may call the left-hand name for it too.
ALIASES = {"knowledge.query": "kb.search"}
SEARCH_LIMIT_MAX = 20
IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")


class ToolError(Exception):
    """A tool refused the call; the message goes back to the caller as the tool's result."""


@dataclass(frozen=True)
class ToolCall:
    agent: str
    role: Role
    session: str | None
    tool: str
    args: dict
    idempotency_key: str | None = None


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    outcome: str
    result: dict | None = None
    error: str | None = None
    replayed: bool = False


def default_patterns() -> tuple[ArgvPattern, ...]:
    return tuple(ArgvPattern.parse(words) for words in DEFAULT_SHELL_ALLOWLIST)


@dataclass(frozen=True)
class ToolSettings:
    shell_allowlist: tuple[ArgvPattern, ...] = field(default_factory=default_patterns)
    sandbox: SandboxLimits = SandboxLimits()
    lease_ttl_s: float = 30.0
    idempotency_window_s: float = 60.0
    idempotency_retention_s: float = 86400.0
    prune_every: int = 100
    clock: Callable[[], float] = time.time

    @classmethod
    def from_config(cls, config: MuxConfig) -> ToolSettings:
        return cls(shell_allowlist=tuple(ArgvPattern.parse(words) for words in config.shell_allowlist),
                   sandbox=SandboxLimits(wall_s=config.shell_timeout_s,
                                         output_bytes=config.shell_output_bytes),
                   idempotency_window_s=config.idempotency_window_s,
                   idempotency_retention_s=config.idempotency_retention_s)

    def key_lifetime_s(self, explicit: bool) -> float:
        return self.idempotency_retention_s if explicit else self.idempotency_window_s


@dataclass(frozen=True)
class IdempotencyKey:
    digest: str
    call: str
    explicit: bool


def _sha(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def idempotency_key(call: ToolCall) -> IdempotencyKey | None:
    """The client's key when it gave one; else, within a session, the call itself."""
    canonical = json.dumps(call.args, sort_keys=True, separators=(",", ":"))
    fingerprint = _sha(call.tool, canonical)
    if call.idempotency_key is not None:
        if not isinstance(call.idempotency_key, str) or not IDEMPOTENCY_KEY_RE.match(call.idempotency_key):
            raise ToolError("idempotency key: use 1 to 200 of letters, digits and ._:-")
        return IdempotencyKey(_sha("explicit", call.agent, call.idempotency_key), fingerprint, True)
    if call.session is None:
        return None
    return IdempotencyKey(_sha("window", call.agent, call.session, fingerprint), fingerprint, False)


def _path(args: dict) -> str:
    path = args.get("path")
    if not isinstance(path, str) or not is_workspace_path(path):
        raise ToolError(f"path {path!r}: use letters, digits, ._-/ and no '..'")
    return path


def _argv(args: dict) -> list[str]:
    argv = args.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ToolError("argv must be a non-empty list of strings")
    if len(argv) > MAX_ARGS or any("\0" in a for a in argv):
        raise ToolError(f"argv: at most {MAX_ARGS} arguments, none with a NUL byte")
    return argv


def allowed_match(patterns: Sequence[ArgvPattern], argv: list[str]) -> ArgvMatch:
    if not any(p.program == argv[0] for p in patterns):
        raise ToolError(f"command {argv[0]!r} is not allowlisted")
    for pattern in patterns:
        match = pattern.match(argv)
        if match is not None:
            return match
    raise ToolError(f"argv {json.dumps(argv)[:200]} matches no shell_allowlist pattern for {argv[0]!r}")


@dataclass(frozen=True)
class Lease:
    holder: str
    token: int
    expires: float


class ToolRegistry:
    def __init__(self, store: StateStore, settings: ToolSettings | None = None,
                 knowledge: KnowledgeService | None = None,
                 on_outcome: Callable[[ToolCall, str], None] | None = None):
        self.store = store
        self.settings = settings or ToolSettings()
        self.sandbox = Sandbox(self.settings.sandbox)
        self.knowledge = knowledge
        self.on_outcome = on_outcome or (lambda call, outcome: None)
        self._recorded = 0
        self.tools: dict[str, Callable[[ToolCall], dict]] = {
            "workspace.read": self._read, "workspace.write": self._write,
            "taskboard.append": self._append, "shell.run": self._shell,
            "knowledge.query": self._kb_search, "kb.search": self._kb_search, "kb.add": self._kb_add,
            "onto.query": self._onto_query, "onto.assert": self._onto_assert,
        }

    def permitted(self, call: ToolCall) -> str | None:
        if call.tool not in self.tools:
            return f"unknown tool {call.tool!r}"
        needed = {ALIASES.get(call.tool, call.tool)}
        if call.tool == "workspace.read" and call.args.get("lease"):
            needed.add("workspace.write")
        granted = set(call.role.tools) | {ALIASES[t] for t in call.role.tools if t in ALIASES}
        missing = sorted(needed - granted)
        return f"role {call.role.name} may not call {', '.join(missing)}" if missing else None

    def call(self, call: ToolCall) -> ToolResult:
        denied = self.permitted(call)
        if denied:
            return self._finish(call, ToolResult(False, "denied", error=denied))
        try:
            # Reads, leased reads (the holder just gets a fresh token), queries and the sandboxed
            # shell change nothing, so only the mutating tools are deduplicated.
            if call.tool not in MUTATING:
                return self._finish(call, ToolResult(True, "ok", self.tools[call.tool](call)))
            result, replayed = self._apply_once(call)
        except ToolError as exc:
            return self._finish(call, ToolResult(False, "error", error=str(exc)))
        return self._finish(call, ToolResult(True, "replayed" if replayed else "ok", result,
                                             replayed=replayed))

    def _apply_once(self, call: ToolCall) -> tuple[dict, bool]:
        """Check, apply and record in one transaction, so a retry applies once."""
        key = idempotency_key(call)
        if key is None:
            return self.tools[call.tool](call), False
        now = self.settings.clock()
        with self.store.tx() as db:
            row = db.execute("SELECT result, ts FROM idempotency WHERE key=?", (key.digest,)).fetchone()
            if row and now - row[1] < self.settings.key_lifetime_s(key.explicit):
                record = json.loads(row[0])
                if record.get("call") != key.call:
                    raise ToolError(f"idempotency key {call.idempotency_key!r} was used for a different "
                                    "call; use a new key for a new call")
                return record["result"], True
            result = self.tools[call.tool](call)
            db.execute("INSERT OR REPLACE INTO idempotency(key, result, ts) VALUES(?,?,?)",
                       (key.digest, json.dumps({"call": key.call, "result": result}), now))
            self._recorded += 1
            if self._recorded % self.settings.prune_every == 0:
                db.execute("DELETE FROM idempotency WHERE ts < ?",
                           (now - self.settings.idempotency_retention_s,))
        return result, False

    def _finish(self, call: ToolCall, res: ToolResult) -> ToolResult:
        log.info("tool.call", extra={"agent": call.agent, "session": call.session, "tool": call.tool,
                                     "outcome": res.outcome})
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

    def _current_lease(self, db, resource: str) -> Lease | None:
        row = db.execute("SELECT holder, token, expires FROM leases WHERE resource=?", (resource,)).fetchone()
        return Lease(*row) if row else None

    def _refuse_if_leased_by_another(self, db, resource: str, holder: str) -> None:
        lease = self._current_lease(db, resource)
        now = self.settings.clock()
        if lease and lease.holder != holder and lease.expires > now:
            raise ToolError(f"{resource}: leased by another agent for {lease.expires - now:.1f} s more; "
                            "try again when its write lands or the lease ends")

    def _lease(self, db, resource: str, holder: str) -> int:
        self._refuse_if_leased_by_another(db, resource, holder)
        fence = db.execute("SELECT last_token FROM fences WHERE resource=?", (resource,)).fetchone()
        token = (fence[0] if fence else 0) + 1
        db.execute("INSERT INTO fences(resource, last_token) VALUES(?,?) ON CONFLICT(resource) "
                   "DO UPDATE SET last_token=excluded.last_token", (resource, token))
        db.execute("INSERT INTO leases(resource, holder, token, expires) VALUES(?,?,?,?) "
                   "ON CONFLICT(resource) DO UPDATE SET holder=excluded.holder, token=excluded.token, "
                   "expires=excluded.expires",
                   (resource, holder, token, self.settings.clock() + self.settings.lease_ttl_s))
        return token

    def _write(self, call: ToolCall) -> dict:
        path = _path(call.args)
        append = call.args.get("append")
        with self.store.tx() as db:
            row = db.execute("SELECT content, version, token FROM workspace WHERE path=?", (path,)).fetchone()
            current, version, last_token = row if row else ("", 0, 0)
            if append is not None:
                if not isinstance(append, str):
                    raise ToolError("append must be a string")
                self._refuse_if_leased_by_another(db, path, self._holder(call))
                new, token = current + append, last_token
            else:
                new, token = self._fenced_content(db, call, path, last_token)
            db.execute("INSERT INTO workspace(path, content, version, token) VALUES(?,?,?,?) "
                       "ON CONFLICT(path) DO UPDATE SET content=excluded.content, version=excluded.version, "
                       "token=excluded.token", (path, new, version + 1, token))
        return {"path": path, "version": version + 1}

    def _fenced_content(self, db, call: ToolCall, path: str, last_token: int) -> tuple[str, int]:
        """The content of a whole-file write, once its token is the live lease's; ends the lease."""
        content = call.args.get("content")
        if not isinstance(content, str):
            raise ToolError("give content (with the token from a leased read) or append")
        token = call.args.get("token")
        lease = self._current_lease(db, path)
        if not isinstance(token, int) or lease is None:
            raise ToolError(f"{path}: writing needs a lease token from workspace.read(lease=true)")
        if token < lease.token or token <= last_token:
            raise ToolError(f"{path}: stale fencing token {token} (current {lease.token})")
        if lease.holder != self._holder(call) or lease.expires < self.settings.clock():
            raise ToolError(f"{path}: the lease for token {token} expired or moved")
        db.execute("DELETE FROM leases WHERE resource=?", (path,))
        return content, token

    def _append(self, call: ToolCall) -> dict:
        item = call.args.get("item")
        if not isinstance(item, str) or not item.strip():
            raise ToolError("item must be a non-empty string")
        with self.store.tx() as db:
            cur = db.execute("INSERT INTO taskboard(ts, agent, item) VALUES(?,?,?)",
                             (time.time(), call.agent, item[:4000]))
        return {"id": cur.lastrowid}

    def _shell(self, call: ToolCall) -> dict:
        argv = _argv(call.args)
        match = allowed_match(self.settings.shell_allowlist, argv)
        try:
            res = self.sandbox.run(argv, self._workspace_files(match))
        except SandboxError as exc:
            raise ToolError(f"shell.run: {exc}") from None
        if res.timed_out:
            raise ToolError(f"{argv[0]} ran past {self.settings.sandbox.wall_s:g} s and was stopped")
        return {"exit": res.exit, "stdout": res.stdout, "stderr": res.stderr, "truncated": res.truncated}

    def _workspace_files(self, match: ArgvMatch) -> dict[str, str]:
        """The workspace files a command names (a named folder brings what is under it); all of
        them for a command that takes paths but was given none, as `ls` lists the workspace."""
        if not match.takes_paths:
            return {}
        with self.store.tx() as db:
            if not match.paths:
                return dict(db.execute("SELECT path, content FROM workspace").fetchall())
            files: dict[str, str] = {}
            for named in {posixpath.normpath(p) for p in match.paths}:
                files.update(db.execute(
                    "SELECT path, content FROM workspace WHERE path=? OR substr(path, 1, ?)=?",
                    (named, len(named) + 1, named + "/")).fetchall())
        return files

    def _service(self) -> KnowledgeService:
        if self.knowledge is None:
            raise ToolError("no knowledge store is configured (knowledge.enabled in the multiplexer config)")
        return self.knowledge

    def _kb_search(self, call: ToolCall) -> dict:
        text = call.args.get("query")
        if not isinstance(text, str) or not text.strip():
            raise ToolError("query must be a non-empty string")
        limit = call.args.get("limit", 5)
        if not isinstance(limit, int) or not 1 <= limit <= SEARCH_LIMIT_MAX:
            raise ToolError(f"limit must be an integer from 1 to {SEARCH_LIMIT_MAX}")
        try:
            answer = self._service().search(text, limit, call.role.name)
        except KnowledgeError as exc:
            raise ToolError(f"kb.search: {exc}") from None
        return search_result(answer)

    def _kb_add(self, call: ToolCall) -> dict:
        source, text = call.args.get("source"), call.args.get("text")
        if not isinstance(source, str) or not 1 <= len(source) <= 300 or not isinstance(text, str):
            raise ToolError("give source (a name of 1 to 300 characters) and text (a string)")
        scope = call.args.get("scope", "team")
        if scope not in ("team", "role"):
            raise ToolError("scope must be team (every agent) or role (agents of your role)")
        scope = TEAM_SCOPE if scope == "team" else f"role:{call.role.name}"
        try:
            stored = self._service().add_text(text, source, Author(call.agent, call.role.name), scope)
        except KnowledgeError as exc:
            raise ToolError(f"kb.add: {exc}") from None
        return asdict(stored)

    def _onto_query(self, call: ToolCall) -> dict:
        sparql = call.args.get("sparql")
        reasoning = call.args.get("reasoning", True)
        if not isinstance(sparql, str) or not isinstance(reasoning, bool):
            raise ToolError("give sparql (a SELECT or ASK query) and optionally reasoning (true or false)")
        try:
            return asdict(self._service().onto_query(sparql, reasoning))
        except KnowledgeError as exc:
            raise ToolError(f"onto.query: {exc}") from None

    def _onto_assert(self, call: ToolCall) -> dict:
        turtle = call.args.get("turtle")
        if not isinstance(turtle, str):
            raise ToolError("turtle must be a string of Turtle triples")
        try:
            return asdict(self._service().onto_assert(turtle, Author(call.agent, call.role.name),
                                                      f"onto.assert by {call.agent}"))
        except KnowledgeError as exc:
            raise ToolError(f"onto.assert: {exc}") from None


def search_result(answer: SearchAnswer) -> dict:
    """A search answer as the tool returns it: each hit with its citation and text."""
    return {"version": answer.version, "cached": answer.cached, "retrieval": answer.vector_search,
            "results": [asdict(hit.chunk) | {"citation": hit.citation, "score": round(hit.score, 5),
                                             "text_rank": hit.text_rank, "vector_rank": hit.vector_rank}
                        for hit in answer.hits]}
