"""The multiplexer's state: configuration, roles and keys, the backend pool and its fair scheduler,
tools, metrics, and per-agent rate limits and session locks."""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from agents.asgi import ApiError
from agents.backends import BackendPool
from agents.config import AgentIdentity, MuxConfig, key_digest
from agents.deadlines import DeadlineWatch
from agents.knowledge.service import KnowledgeService
from agents.knowledge.setup import open_knowledge
from agents.metrics import KnownLabels, MuxMetrics
from agents.policy import ToolScope
from agents.scheduler import FairScheduler
from agents.state import StateStore
from agents.tools import ToolRegistry, ToolSettings
from dgxready.roles import Role

log = logging.getLogger("dgxready.mux")


@dataclass
class RateLimiter:
    """Token bucket per agent, refilled at the role's requests per minute."""
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def take(self, agent: str, per_minute: int) -> float:
        now = time.monotonic()
        tokens, last = self.buckets.get(agent, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - last) * per_minute / 60.0)
        if tokens < 1.0:
            self.buckets[agent] = (tokens, now)
            return (1.0 - tokens) * 60.0 / per_minute
        self.buckets[agent] = (tokens - 1.0, now)
        return 0.0


@dataclass
class SessionLocks:
    """One session's turns one at a time, in arrival order. `held` has an entry only while a turn
    holds its session: the turns waiting for it, oldest first."""
    held: dict[tuple[str, str], deque[asyncio.Future]] = field(default_factory=dict)

    def hold(self, agent: str, session: str) -> SessionTurn:
        return SessionTurn(self.held, (agent, session))

    def waiting(self, agent: str, session: str) -> int:
        return len(self.held.get((agent, session), ()))


class SessionTurn:
    """`async with`: the session held for one turn. A class, not a generator, and no asyncio.Lock
    made per turn: it is on every session turn's path, and mostly no other turn waits."""
    __slots__ = ("held", "key")

    def __init__(self, held: dict[tuple[str, str], deque[asyncio.Future]], key: tuple[str, str]):
        self.held, self.key = held, key

    async def __aenter__(self) -> None:
        waiters = self.held.get(self.key)
        if waiters is None:
            self.held[self.key] = deque()
            return
        handed = asyncio.get_running_loop().create_future()
        waiters.append(handed)
        try:
            await handed
        except BaseException:
            if handed.cancelled():
                if handed in waiters:
                    waiters.remove(handed)
            else:
                self.pass_on()  # handed the session just as this turn was cancelled
            raise

    async def __aexit__(self, *exc) -> None:
        self.pass_on()

    def pass_on(self) -> None:
        """To the oldest turn still waiting, else the session is free."""
        waiters = self.held[self.key]
        while waiters:
            handed = waiters.popleft()
            if not handed.done():
                handed.set_result(None)
                return
        del self.held[self.key]


@dataclass
class Mux:
    config: MuxConfig
    roles: dict[str, Role]
    keys: dict[str, AgentIdentity]
    store: StateStore
    metrics: MuxMetrics
    pool: BackendPool
    scheduler: FairScheduler
    tools: ToolRegistry
    client: aiohttp.ClientSession | None = None
    limiter: RateLimiter = field(default_factory=RateLimiter)
    sessions: SessionLocks = field(default_factory=SessionLocks)
    known_keys: dict[str, AgentIdentity] = field(default_factory=dict)
    known_headers: dict[bytes, tuple[AgentIdentity, Role]] = field(default_factory=dict)
    typical_output: dict[str, float] = field(default_factory=dict)
    knowledge: KnowledgeService | None = None
    scopes: dict[str, ToolScope] = field(default_factory=dict)
    commit_handle: asyncio.Handle | None = None
    apply_handle: asyncio.Handle | None = None
    deadlines: DeadlineWatch = field(default_factory=DeadlineWatch)

    def save_turn(self, agent: str, session: str, messages: list[dict]) -> None:
        """A session's turn: in its history at once, in the turn journal with the turns that end in
        the same pass of the event loop (or within `session_commit_ms` of it: one write for all),
        and in the state file's tables within `session_apply_ms` after that (one transaction)."""
        self.store.append_turn(agent, session, messages, defer=True)
        if self.commit_handle is None and self.store.pending_turns:
            loop = asyncio.get_running_loop()
            delay = self.config.session_commit_ms / 1000
            self.commit_handle = loop.call_later(delay, self.commit_turns) if delay else \
                loop.call_soon(self.commit_turns)

    def commit_turns(self) -> None:
        self.commit_handle = None
        self.write_turns(self.store.journal_turns)
        if self.apply_handle is None and self.store.journaled_turns:
            self.apply_handle = asyncio.get_running_loop().call_later(self.config.session_apply_ms / 1000,
                                                                      self.apply_turns)

    def apply_turns(self) -> None:
        self.apply_handle = None
        self.write_turns(self.store.flush_turns)

    def close_turns(self) -> None:
        """At shutdown: every turn into the tables, and the journal let go."""
        for handle in (self.commit_handle, self.apply_handle):
            if handle is not None:
                handle.cancel()
        self.commit_handle = self.apply_handle = None
        self.write_turns(self.store.close_journal)

    def write_turns(self, write: Callable[[], object]) -> None:
        """A write of session turns off the request path: a failure is logged, not raised."""
        try:
            write()
        except (OSError, sqlite3.Error) as exc:
            log.error("mux.session_write_failed", extra={"error": str(exc), "path": str(self.store.path)})

    def identify(self, auth: str) -> tuple[AgentIdentity, Role]:
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        ident = self.known_keys.get(key) or (self.keys.get(key_digest(key)) if key else None)
        if ident is None:
            self.metrics.rejections.labels("unauthorized").inc()
            raise ApiError(401, "unknown or missing API key", "authentication_error")
        # Only keys that matched are remembered, so unknown keys cannot grow this.
        self.known_keys[key] = ident
        return ident, self.roles[ident.role]

    def identify_header(self, header: bytes) -> tuple[AgentIdentity, Role]:
        """identify() for the chat path's raw Authorization header. A header that matched is
        remembered as it came, only in its one canonical form (`Bearer <key>`), so that padding
        a key with spaces cannot grow this."""
        known = self.known_headers.get(header)
        if known is not None:
            return known
        known = self.identify(header.decode("latin-1"))
        if header[:7] == b"Bearer " and header[7:] == header[7:].strip():
            self.known_headers[header] = known
        return known


def create_mux(config: MuxConfig, roles: dict[str, Role], keys: dict[str, AgentIdentity],
               store: StateStore) -> Mux:
    metrics = MuxMetrics(KnownLabels(agents=frozenset(i.name for i in keys.values()), roles=frozenset(roles),
                                     backends=frozenset(b.name for b in config.backends)))
    pool = BackendPool.of(config.backends, config.cooldown_s)
    knowledge = open_knowledge(config.knowledge, store.path, metrics.knowledge_cache_event)
    tools = ToolRegistry(store, ToolSettings.from_config(config), knowledge=knowledge,
                         on_outcome=lambda c, o: metrics.tool_call(c.agent, c.tool, o).inc())
    scheduler = FairScheduler(pool, config.queue_max, config.queue_per_agent_max)
    scopes = {name: ToolScope(name, tuple(role.client_tools)) for name, role in roles.items()}
    return Mux(config, roles, keys, store, metrics, pool, scheduler, tools, knowledge=knowledge, scopes=scopes)
