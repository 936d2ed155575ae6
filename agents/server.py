"""The agent multiplexer: an OpenAI-compatible server between the role agents and one or more
inference backends, with identity, fair queueing, sessions, tools and metrics."""
from __future__ import annotations

import asyncio
import math
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agents.asgi import ApiError, Receive, Send, json_object, read_body
from agents.backends import Backend, health_loop
from agents.config import AgentIdentity
from agents.knowledge.notices import notice_messages
from agents.messages import INSTRUCTION_ROLES, estimate_tokens, valid_messages
from agents.mux import Mux
from agents.policy import screen_request
from agents.proxy import Turn, audit_client_tools, complete, open_stream, relay
from agents.state import NO_HISTORY
from agents.tools import ToolCall
from dgxready.roles import Role
from model.backend import ENGINE_CLIENT_KEEPALIVE_S

# Backends answer without these; leaving them out saves the client their header work per request.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding")
# A turn's deadline bounds its talk with a backend (agents.deadlines.DeadlineWatch); a new
# connection to a backend has 5 s.
BACKEND_CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5.0)
SESSION_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def session_of(header: str | None, data: dict) -> str | None:
    session = header or data.get("session")
    if session is None:
        return None
    if not isinstance(session, str) or not SESSION_RE.match(session):
        raise ApiError(400, "session must match [A-Za-z0-9._:-]{1,128}", "invalid_request_error")
    return session


def deadline_of(header: bytes) -> float:
    try:
        deadline_s = float(header)
    except ValueError:
        deadline_s = math.nan
    if not (math.isfinite(deadline_s) and deadline_s > 0):
        raise ApiError(400, "x-deadline-s must be a positive number of seconds", "invalid_request_error")
    return deadline_s


def admit(mux: Mux, ident: AgentIdentity, role: Role, headers: dict[bytes, bytes], data: dict,
          arrived: float) -> Turn:
    messages = valid_messages(data)
    raw_session = headers.get(b"x-session-id")
    session = session_of(raw_session.decode("latin-1") if raw_session is not None else None, data)
    wait = mux.limiter.take(ident.name, role.rate_limit.requests_per_minute) if mux.config.rate_limits else 0.0
    if wait:
        mux.metrics.rejections.labels("rate_limited").inc()
        raise ApiError(429, f"rate limit of {role.rate_limit.requests_per_minute}/min for {ident.name}",
                       "rate_limit_error", {"Retry-After": str(max(1, math.ceil(wait)))})
    asked = headers.get(b"x-deadline-s")
    deadline_s = deadline_of(asked) if asked else mux.config.deadline_s
    scope = mux.scopes[role.name]
    screened = screen_request(data, role.sampling.max_tokens, scope)
    turn = Turn(ident, role, session, messages, data, time.monotonic() + deadline_s, arrived,
                screened.forward, scope, screened.max_tokens)
    if screened.denied_tools:
        refuse_or_drop_tools(mux, turn, screened.denied_tools)
    return turn


def refuse_or_drop_tools(mux: Mux, turn: Turn, denied: list[str]) -> None:
    if mux.config.client_tools_policy == "refuse":
        audit_client_tools(mux, turn, "refused", denied)
        reasons = "; ".join(turn.scope.denial(n) for n in denied)
        raise ApiError(400, f"tools: {reasons}", "invalid_request_error")
    audit_client_tools(mux, turn, "dropped", denied)
    turn.dropped_tools = denied


def prepare(mux: Mux, turn: Turn) -> None:
    """The prompt, read while the session's lock is held: the instructions (the client's, else the
    role's) and the knowledge notice, the session's history, then the rest of the client's
    messages; and the turn's cost for the fair queue."""
    system, rest = [], []
    for message in turn.messages:
        (system if message["role"] in INSTRUCTION_ROLES else rest).append(message)
    head = (system or [{"role": "system", "content": turn.role.system_prompt()}]) + \
        notice_messages(mux.knowledge, turn.ident.name, turn.role.name, turn.role.knowledge_notice_tokens)
    keep = mux.config.history_turns
    # A tool-calling client's turn can hold many messages: at most 2 per turn are sent.
    history = mux.store.recent_history(turn.ident.name, turn.session, keep).last(2 * keep) \
        if turn.session and keep else NO_HISTORY
    turn.prompt = head + history.messages + rest
    # Charged at dispatch: the prompt, plus for a non-streamed answer the agent's typical output;
    # a stream's output is charged as it arrives. The answer's usage settles the difference.
    typical = mux.typical_output.get(turn.ident.name, turn.max_tokens)
    output = 0 if turn.data.get("stream") else min(turn.max_tokens, typical)
    turn.cost = estimate_tokens(head + rest, output, history.chars)


async def chat(mux: Mux, scope: dict, receive: Receive, send: Send) -> None:
    """POST /v1/chat/completions, streaming or not. One session's turns run in order. The turn is
    answered in this coroutine, not one it awaits: every level of awaiting coroutines costs each
    resumption of the request's task, several a request."""
    arrived = time.perf_counter()
    # Names lower-cased by the server, a repeated header's last value; only the values read are decoded.
    headers = dict(scope["headers"])
    try:
        ident, role = mux.identify_header(headers.get(b"authorization", b""))
        body = await read_body(receive, headers.get(b"content-length"), mux.config.max_body_bytes)
        turn = admit(mux, ident, role, headers, json_object(body), arrived)
    except ApiError as err:
        await err.send(send)
        return
    held = mux.sessions.hold(turn.ident.name, turn.session) if turn.session is not None else None
    if held is not None:
        await held.__aenter__()
    try:
        prepare(mux, turn)
        mux.deadlines.begin(turn)
        try:
            if turn.data.get("stream"):
                await relay(mux, turn, await open_stream(mux, turn), send, receive)
            else:
                await complete(mux, turn, send)
        except ApiError as err:
            await err.send(send)
        finally:
            mux.deadlines.end(turn)
    finally:
        if held is not None:
            await held.__aexit__()


async def models(request: Request) -> Response:
    mux: Mux = request.app.state.mux
    try:
        mux.identify(request.headers.get("authorization", ""))
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
        mux.metrics.backend_inflight(b.name).set(b.outstanding)
    mux.metrics.queue_depth.set(mux.scheduler.depth)
    return Response(generate_latest(mux.metrics.registry), media_type="text/plain; version=0.0.4")


async def tool_call(request: Request) -> Response:
    mux: Mux = request.app.state.mux
    try:
        ident, role = mux.identify(request.headers.get("authorization", ""))
        data = json_object(await read_body(request.receive, request.headers.get("content-length"),
                                           mux.config.max_body_bytes))
        tool, args = data.get("tool"), data.get("args", {})
        if not isinstance(tool, str) or not isinstance(args, dict):
            raise ApiError(400, "give tool (a string) and args (an object)", "invalid_request_error")
        session = session_of(request.headers.get("x-session-id"), data)
    except ApiError as err:
        return err.response()
    key = request.headers.get("idempotency-key", data.get("idempotency_key"))
    result = await asyncio.to_thread(mux.tools.call, ToolCall(ident.name, role, session, tool, args, key))
    status = 200 if result.ok else (403 if result.outcome == "denied" else 409)
    return JSONResponse({"ok": result.ok, "outcome": result.outcome, "result": result.result,
                         "error": result.error, "replayed": result.replayed}, status_code=status)


async def session_view(request: Request) -> Response:
    mux: Mux = request.app.state.mux
    try:
        ident, _ = mux.identify(request.headers.get("authorization", ""))
        session = session_of(request.path_params["session"], {})
    except ApiError as err:
        return err.response()
    st = mux.store.session(ident.name, session)
    return JSONResponse({"agent": st.agent, "session": st.session, "turns": st.turns,
                         "history": st.history})


@dataclass
class MuxApp:
    """The chat endpoint as a bare ASGI handler; every other route through Starlette."""
    mux: Mux
    routes: Starlette

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions" and scope["method"] == "POST":
            await chat(self.mux, scope, receive, send)
        else:
            await self.routes(scope, receive, send)


def create_app(mux: Mux) -> MuxApp:
    @asynccontextmanager
    async def lifespan(app):
        connector = aiohttp.TCPConnector(limit=mux.pool.capacity() + 64, limit_per_host=0,
                                         keepalive_timeout=ENGINE_CLIENT_KEEPALIVE_S)
        mux.client = aiohttp.ClientSession(connector=connector, timeout=BACKEND_CLIENT_TIMEOUT,
                                           auto_decompress=False, skip_auto_headers=SKIP_AUTO_HEADERS)

        def notify(backend: Backend) -> None:
            mux.metrics.backend_up.labels(backend.name).set(1 if backend.up else 0)
            mux.scheduler.dispatch()

        checker = asyncio.create_task(health_loop(mux.pool, mux.client, mux.config.health_interval_s,
                                                  notify))
        watch = asyncio.create_task(mux.deadlines.run())
        try:
            yield
        finally:
            checker.cancel()
            watch.cancel()
            mux.close_turns()
            await mux.client.close()

    app = Starlette(routes=[
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/tools/call", tool_call, methods=["POST"]),
        Route("/v1/sessions/{session}", session_view, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.mux = mux
    return MuxApp(mux, app)
