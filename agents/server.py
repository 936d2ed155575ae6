"""The agent multiplexer: an OpenAI-compatible server between the role agents and one or more
inference backends, with identity, fair queueing, sessions, tools and metrics."""
from __future__ import annotations

import asyncio
import json
import math
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agents.backends import Backend, BackendPool, health_loop
from agents.config import AgentIdentity, MuxConfig, key_digest
from agents.metrics import MuxMetrics
from agents.roles import Role
from agents.scheduler import DeadlineExceeded, FairScheduler, Grant, NoBackend, QueueFull
from agents.state import StateStore
from agents.tools import ToolCall, ToolRegistry

SESSION_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_RETRIES = 2
ALLOWED_FAILS = 3


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind}},
                            status_code=self.status, headers=self.headers)


class BackendFailed(Exception):
    pass


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
    session_locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)

    def identify(self, request: Request) -> tuple[AgentIdentity, Role]:
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        ident = self.keys.get(key_digest(key)) if key else None
        if ident is None:
            self.metrics.rejections.labels("unauthorized").inc()
            raise ApiError(401, "unknown or missing API key", "authentication_error")
        return ident, self.roles[ident.role]

    def lock_for(self, agent: str, session: str) -> asyncio.Lock:
        return self.session_locks.setdefault((agent, session), asyncio.Lock())


def create_mux(config: MuxConfig, roles: dict[str, Role], keys: dict[str, AgentIdentity],
               store: StateStore) -> Mux:
    metrics = MuxMetrics()
    pool = BackendPool.of(config.backends, config.cooldown_s)
    tools = ToolRegistry(store, config.shell_allowlist,
                         on_outcome=lambda c, o: metrics.tool_calls.labels(c.agent, c.tool, o).inc())
    return Mux(config, roles, keys, store, metrics, pool, FairScheduler(pool, config.queue_max), tools)


async def read_json(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body larger than {limit} bytes", "invalid_request_error")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"body larger than {limit} bytes", "invalid_request_error")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "body is not valid JSON", "invalid_request_error") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object", "invalid_request_error")
    return data


def valid_messages(data: dict) -> list[dict]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "invalid_request_error")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool") \
                or not isinstance(m.get("content"), str):
            raise ApiError(400, f"messages[{i}] needs a role and string content", "invalid_request_error")
    return messages


def session_of(request: Request, data: dict) -> str | None:
    session = request.headers.get("x-session-id") or data.get("session")
    if session is None:
        return None
    if not isinstance(session, str) or not SESSION_RE.match(session):
        raise ApiError(400, "session must match [A-Za-z0-9._:-]{1,128}", "invalid_request_error")
    return session


def build_prompt(mux: Mux, role: Role, ident: AgentIdentity, session: str | None,
                 messages: list[dict]) -> list[dict]:
    system = [m for m in messages if m["role"] == "system"] or [
        {"role": "system", "content": role.system_prompt()}]
    rest = [m for m in messages if m["role"] != "system"]
    history: list[dict] = []
    if session:
        keep = mux.config.history_turns * 2
        stored = mux.store.session(ident.name, session).history
        history = stored[-keep:] if keep else []
    return system[:1] + history + rest


def backend_body(data: dict, prompt: list[dict], role: Role, backend: Backend, agent: str,
                 session: str | None, stream: bool) -> dict:
    body = {k: v for k, v in data.items() if k not in ("messages", "session", "model")}
    body["messages"] = prompt
    body["model"] = backend.model_id or data.get("model") or "default"
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.setdefault("temperature", role.sampling.temperature)
    body.setdefault("top_p", role.sampling.top_p)
    body["max_tokens"] = max_tokens_for(data, role)
    if backend.config.kind == "vllm":
        body["priority"] = role.scheduling.priority
        if session:
            body["cache_salt"] = key_digest(f"{agent}:{session}")[:32]
    return body


def max_tokens_for(data: dict, role: Role) -> int:
    """The client's max_tokens, capped by the role's."""
    asked = data.get("max_tokens")
    cap = role.sampling.max_tokens
    return min(asked, cap) if isinstance(asked, int) and asked > 0 else cap


def estimate_tokens(prompt: list[dict], max_tokens: int) -> float:
    return sum(len(m["content"]) for m in prompt) / 4.0 + max_tokens


@dataclass
class Outcome:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


async def chat(request: Request) -> Response:
    mux: Mux = request.app.state.mux
    arrived = time.perf_counter()
    try:
        ident, role = mux.identify(request)
        data = await read_json(request, mux.config.max_body_bytes)
        messages = valid_messages(data)
        session = session_of(request, data)
        wait = mux.limiter.take(ident.name, role.rate_limit.requests_per_minute) \
            if mux.config.rate_limits else 0.0
        if wait:
            mux.metrics.rejections.labels("rate_limited").inc()
            raise ApiError(429, f"rate limit of {role.rate_limit.requests_per_minute}/min for "
                                f"{ident.name}", "rate_limit_error",
                           {"Retry-After": str(max(1, math.ceil(wait)))})
    except ApiError as err:
        return err.response()
    stream = bool(data.get("stream"))
    deadline = time.monotonic() + float(request.headers.get("x-deadline-s") or mux.config.deadline_s)
    lock = mux.lock_for(ident.name, session) if session else None
    if not stream:
        try:
            if lock:
                async with lock:
                    return await complete(mux, ident, role, session, messages, data, deadline, arrived)
            return await complete(mux, ident, role, session, messages, data, deadline, arrived)
        except ApiError as err:
            return err.response()
    if lock:
        await lock.acquire()
    try:
        first = await open_stream(mux, ident, role, session, messages, data, deadline, arrived)
    except ApiError as err:
        if lock:
            lock.release()
        return err.response()
    return StreamingResponse(relay(mux, ident, role, session, messages, first, lock),
                             media_type="text/event-stream")


async def acquire(mux: Mux, ident: AgentIdentity, role: Role, cost: float, deadline: float,
                  retry: bool) -> Grant:
    mux.metrics.queue_depth.set(mux.scheduler.depth + 1)
    try:
        grant = await mux.scheduler.acquire(ident.name, role.scheduling.weight, role.scheduling.priority,
                                            cost, deadline, retry)
    except QueueFull:
        mux.metrics.rejections.labels("queue_full").inc()
        raise ApiError(429, "queue is full", "rate_limit_error", {"Retry-After": "2"}) from None
    except NoBackend:
        mux.metrics.rejections.labels("no_backend").inc()
        raise ApiError(503, "no healthy backend", "service_unavailable", {"Retry-After": "5"}) from None
    except DeadlineExceeded:
        mux.metrics.rejections.labels("deadline").inc()
        raise ApiError(504, "deadline passed while queued", "timeout") from None
    finally:
        mux.metrics.queue_depth.set(mux.scheduler.depth)
    mux.metrics.queue_wait.labels(ident.name).observe(grant.queue_wait_s)
    mux.metrics.inflight.labels(grant.backend.name).set(grant.backend.outstanding)
    return grant


def release(mux: Mux, grant: Grant, failed: bool, refused: bool = False) -> None:
    """A refused connection cools the backend down at once; other failures (a reused keep-alive
    connection the server had closed, a timeout) only when they repeat."""
    backend = grant.backend
    if failed:
        backend.failures += 1
        if refused or backend.failures >= ALLOWED_FAILS:
            mux.pool.cool_down(backend)
            mux.metrics.cooldowns.labels(backend.name).inc()
            mux.metrics.backend_up.labels(backend.name).set(0)
    else:
        backend.failures = 0
    mux.scheduler.release(backend)
    mux.metrics.inflight.labels(grant.backend.name).set(grant.backend.outstanding)


async def complete(mux, ident, role, session, messages, data, deadline, arrived) -> Response:
    prompt = build_prompt(mux, role, ident, session, messages)
    cost = estimate_tokens(prompt, max_tokens_for(data, role))
    for attempt in range(MAX_RETRIES + 1):
        grant = await acquire(mux, ident, role, cost, deadline, retry=attempt > 0)
        body = backend_body(data, prompt, role, grant.backend, ident.name, session, False)
        queued = grant.queue_wait_s
        sent = time.perf_counter()
        try:
            timeout = aiohttp.ClientTimeout(total=max(1.0, deadline - time.monotonic()))
            async with mux.client.post(f"{grant.backend.config.url}/v1/chat/completions", json=body,
                                       timeout=timeout) as resp:
                status, content = resp.status, await resp.read()
            if status >= 500:
                raise BackendFailed(f"HTTP {status}")
        except (aiohttp.ClientError, asyncio.TimeoutError, BackendFailed) as exc:
            release(mux, grant, failed=True, refused=isinstance(exc, aiohttp.ClientConnectorError))
            mux.metrics.requests.labels(ident.name, grant.backend.name, "retried").inc()
            last = exc
            continue
        release(mux, grant, failed=False)
        if status != 200:
            mux.metrics.requests.labels(ident.name, grant.backend.name, str(status)).inc()
            return Response(content, status_code=status, media_type="application/json")
        out = json.loads(content)
        usage = out.get("usage") or {}
        text = ((out.get("choices") or [{}])[0].get("message") or {}).get("content") or ""
        finish(mux, ident, role, session, messages, grant, Outcome(
            text, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)),
            cost, arrived, sent, queued, time.perf_counter())
        out["model"] = data.get("model") or out.get("model")
        overhead_ms = (sent - arrived - queued) * 1000
        return JSONResponse(out, headers={"x-dgxready-overhead-ms": f"{overhead_ms:.3f}",
                                          "x-dgxready-queue-ms": f"{queued * 1000:.3f}",
                                          "x-dgxready-backend": grant.backend.name})
    mux.metrics.requests.labels(ident.name, "none", "failed").inc()
    raise ApiError(502, f"every backend failed before answering: {last}", "backend_error")


def finish(mux, ident, role, session, messages, grant, outcome: Outcome, cost, arrived, sent,
           queued, first_byte) -> None:
    m = mux.metrics
    m.requests.labels(ident.name, grant.backend.name, "ok").inc()
    m.tokens.labels(ident.name, "prompt").inc(outcome.prompt_tokens)
    m.tokens.labels(ident.name, "completion").inc(outcome.completion_tokens)
    m.ttft.labels(ident.name).observe(first_byte - arrived)
    m.duration.labels(ident.name).observe(time.perf_counter() - arrived)
    m.overhead.observe(max(0.0, sent - arrived - queued))
    mux.scheduler.settle(ident.name, role.scheduling.weight, cost,
                         outcome.prompt_tokens + outcome.completion_tokens)
    if session:
        new = [x for x in messages if x["role"] != "system"]
        mux.store.append_turn(ident.name, session, new + [{"role": "assistant", "content": outcome.text}])


async def sse_lines(resp: aiohttp.ClientResponse):
    async for raw in resp.content:
        yield raw.decode(errors="replace").rstrip("\r\n")


@dataclass
class OpenStream:
    grant: Grant
    response: aiohttp.ClientResponse
    first_lines: list[str]
    lines: object
    cost: float
    arrived: float
    sent: float
    first_byte: float


async def open_stream(mux, ident, role, session, messages, data, deadline, arrived) -> OpenStream:
    """Dispatch and wait for the first event; failures before any byte retry elsewhere."""
    prompt = build_prompt(mux, role, ident, session, messages)
    last: Exception | None = None
    cost = estimate_tokens(prompt, max_tokens_for(data, role))
    for attempt in range(MAX_RETRIES + 1):
        grant = await acquire(mux, ident, role, cost, deadline, retry=attempt > 0)
        body = backend_body(data, prompt, role, grant.backend, ident.name, session, True)
        sent = time.perf_counter()
        try:
            resp = await mux.client.post(
                f"{grant.backend.config.url}/v1/chat/completions", json=body,
                timeout=aiohttp.ClientTimeout(total=max(1.0, deadline - time.monotonic()), sock_connect=5.0))
            if resp.status != 200:
                content = await resp.read()
                resp.release()
                if resp.status >= 500:
                    raise BackendFailed(f"HTTP {resp.status}")
                release(mux, grant, failed=False)
                raise ApiError(resp.status, content.decode(errors="replace")[:500], "backend_error")
            lines = sse_lines(resp)
            first: list[str] = []
            async for line in lines:
                first.append(line)
                if line.startswith("data:"):
                    break
            if not first:
                resp.release()
                raise BackendFailed("empty stream")
            return OpenStream(grant, resp, first, lines, cost, arrived, sent, time.perf_counter())
        except (aiohttp.ClientError, asyncio.TimeoutError, BackendFailed) as exc:
            release(mux, grant, failed=True, refused=isinstance(exc, aiohttp.ClientConnectorError))
            mux.metrics.requests.labels(ident.name, grant.backend.name, "retried").inc()
            last = exc
    mux.metrics.requests.labels(ident.name, "none", "failed").inc()
    raise ApiError(502, f"every backend failed before streaming: {last}", "backend_error")


async def relay(mux, ident, role, session, messages, st: OpenStream, lock):
    outcome = Outcome()
    failed = False
    try:
        async def all_lines():
            for line in st.first_lines:
                yield line
            async for line in st.lines:
                yield line

        async for line in all_lines():
            # Parse only what is needed: every chunk's text for a session's history, and the
            # chunks that carry usage or a finish_reason.
            wanted = session or '"usage"' in line or '"finish_reason":"' in line \
                or '"finish_reason": "' in line
            if wanted and line.startswith("data:") and line[5:].strip() != "[DONE]":
                try:
                    chunk = json.loads(line[5:])
                except json.JSONDecodeError:
                    chunk = {}
                for choice in chunk.get("choices") or []:
                    outcome.text += (choice.get("delta") or {}).get("content") or ""
                    outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
                if chunk.get("usage"):
                    outcome.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    outcome.completion_tokens = chunk["usage"].get("completion_tokens", 0)
            yield (line + "\n").encode()
        if outcome.finish_reason is None:
            raise BackendFailed("stream ended without a finish_reason")
    except (aiohttp.ClientError, asyncio.TimeoutError, BackendFailed) as exc:
        failed = True
        event = {"error": {"message": f"backend {st.grant.backend.name} failed mid-stream: {exc}",
                           "type": "backend_error"}}
        yield f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
        mux.metrics.requests.labels(ident.name, st.grant.backend.name, "failed_midstream").inc()
    finally:
        st.response.release()
        release(mux, st.grant, failed=failed)
        if not failed:
            finish(mux, ident, role, session, messages, st.grant, outcome, st.cost, st.arrived, st.sent,
                   st.grant.queue_wait_s, st.first_byte)
        if lock:
            lock.release()


async def models(request: Request) -> Response:
    mux: Mux = request.app.state.mux
    try:
        mux.identify(request)
    except ApiError as err:
        return err.response()
    ids = sorted({b.model_id for b in mux.pool.backends if b.model_id})
    return JSONResponse({"object": "list", "data": [{"id": i, "object": "model", "owned_by": "dgxready"}
                                                    for i in ids]})


async def health(request: Request) -> Response:
    mux: Mux = request.app.state.mux
    now = time.monotonic()
    backends = {b.name: {"up": b.available(now), "outstanding": b.outstanding} for b in mux.pool.backends}
    ok = any(v["up"] for v in backends.values())
    return JSONResponse({"status": "ok" if ok else "degraded", "backends": backends,
                         "queue_depth": mux.scheduler.depth}, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    mux: Mux = request.app.state.mux
    for b in mux.pool.backends:
        mux.metrics.backend_up.labels(b.name).set(1 if b.available(time.monotonic()) else 0)
    mux.metrics.queue_depth.set(mux.scheduler.depth)
    return Response(generate_latest(mux.metrics.registry), media_type="text/plain; version=0.0.4")


async def tool_call(request: Request) -> Response:
    mux: Mux = request.app.state.mux
    try:
        ident, role = mux.identify(request)
        data = await read_json(request, mux.config.max_body_bytes)
        tool, args = data.get("tool"), data.get("args", {})
        if not isinstance(tool, str) or not isinstance(args, dict):
            raise ApiError(400, "give tool (a string) and args (an object)", "invalid_request_error")
        session = session_of(request, data)
    except ApiError as err:
        return err.response()
    result = await asyncio.to_thread(mux.tools.call, ToolCall(ident.name, role, session, tool, args))
    status = 200 if result.ok else (403 if result.outcome == "denied" else 409)
    return JSONResponse({"ok": result.ok, "outcome": result.outcome, "result": result.result,
                         "error": result.error, "replayed": result.replayed}, status_code=status)


async def session_view(request: Request) -> Response:
    mux: Mux = request.app.state.mux
    try:
        ident, _ = mux.identify(request)
    except ApiError as err:
        return err.response()
    session = request.path_params["session"]
    if not SESSION_RE.match(session):
        return ApiError(400, "bad session id", "invalid_request_error").response()
    st = mux.store.session(ident.name, session)
    return JSONResponse({"agent": st.agent, "session": st.session, "turns": st.turns,
                         "history": st.history})


def create_app(mux: Mux) -> Starlette:
    @asynccontextmanager
    async def lifespan(app):
        connector = aiohttp.TCPConnector(limit=mux.pool.capacity() + 64, limit_per_host=0)
        mux.client = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))

        def notify(backend: Backend) -> None:
            mux.metrics.backend_up.labels(backend.name).set(1 if backend.up else 0)
            mux.scheduler.dispatch()

        checker = asyncio.create_task(health_loop(mux.pool, mux.client, mux.config.health_interval_s,
                                                  notify))
        try:
            yield
        finally:
            checker.cancel()
            await mux.client.close()

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/tools/call", tool_call, methods=["POST"]),
        Route("/v1/sessions/{session}", session_view, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.mux = mux
    return app
