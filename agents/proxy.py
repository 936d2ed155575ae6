"""Forwarding one chat turn to a backend: take a fair-queue slot, send, retry elsewhere while no
byte has reached the client, relay the stream, and account for what the turn produced."""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

import aiohttp
import orjson

from agents.asgi import SSE_HEADERS, ApiError, Receive, Send, send_response, server_cycle
from agents.backends import Backend
from agents.config import MAX_ANSWER_BYTES, AgentIdentity, key_digest
from agents.deadlines import timed_out
from agents.messages import INSTRUCTION_ROLES
from agents.mux import Mux
from agents.policy import StreamGuard, ToolScope, screen_answer
from agents.scheduler import AgentQueueFull, DeadlineExceeded, Grant, NoBackend, QueueFull
from dgxready.roles import Role

MAX_RETRIES = 2
ALLOWED_FAILS = 3
# A stream's output is charged to its agent as it arrives, this many events (about a token each)
# at a time: the fair queue sees a long answer grow, at a call per step instead of per chunk.
CHARGE_EVENTS = 16
# An SSE line holds one event: a token's delta, its logprobs, a tool call's arguments. A longer line
# is a broken stream; holding a growing line costs a copy of it each read.
MAX_LINE_BYTES = 4 << 20


class BackendFailed(Exception):
    pass


def answer_too_large(limit: int) -> BackendFailed:
    return BackendFailed(f"its answer passed max_answer_bytes ({limit} bytes)")


async def read_answer(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """A whole answer's body, at most `limit` bytes: read in one call when its length is declared
    (aiohttp reads no more than that), else chunk by chunk."""
    length = resp.content_length
    if length is not None:
        if length > limit:
            raise answer_too_large(limit)
        return await resp.read()
    body = bytearray()
    while chunk := await resp.content.readany():
        body += chunk
        if len(body) > limit:
            raise answer_too_large(limit)
    return bytes(body)


@dataclass(eq=False, slots=True)
class Turn:
    """One validated chat request of one agent, in one session or none. `forward` holds the
    client's fields that reach the backend as they are (agents.policy screened them)."""
    ident: AgentIdentity
    role: Role
    session: str | None
    messages: list[dict]
    data: dict
    deadline: float
    arrived: float
    forward: dict
    scope: ToolScope
    max_tokens: int
    dropped_tools: list[str] | tuple[()] = ()
    prompt: list[dict] | None = None
    cost: float = 0.0
    streamed: int = 0
    # Its talk with a backend, as agents.deadlines watches it: the slot, when the request went
    # and when the answer's first event came back.
    task: asyncio.Task | None = None
    reading: bool = False
    passed: bool = False
    cancelled: bool = False
    grant: Grant | None = None
    sent: float = 0.0
    first_byte: float = 0.0

    @property
    def overhead_s(self) -> float:
        """What the multiplexer itself took before the request went: since arrival, less the queue."""
        return self.sent - self.arrived - self.grant.queue_wait_s


def audit_client_tools(mux: Mux, turn: Turn, action: str, names: list[str]) -> None:
    """Records tools a role may not use: dropped from or refusing a request, or blocked in an answer."""
    for name in names:
        mux.store.audit(turn.ident.name, turn.session, f"client:{name[:64]}", action,
                        turn.scope.denial(name[:64]))
    if names:
        mux.metrics.client_tool(turn.role.name, action).inc(len(names))


def backend_body(turn: Turn, backend: Backend, stream: bool) -> bytes:
    """The request as the backend gets it: the role's sampling unless the client set its own, the
    client's forwarded fields, and what the multiplexer alone sets."""
    sampling = turn.role.sampling
    body = {"temperature": sampling.temperature, "top_p": sampling.top_p, **turn.forward,
            "messages": turn.prompt, "model": backend.model_id or turn.data.get("model") or "default",
            "stream": stream, "max_tokens": turn.max_tokens}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if backend.config.kind == "vllm":
        body["priority"] = turn.role.scheduling.priority
        if turn.session:
            body["cache_salt"] = key_digest(f"{turn.ident.name}:{turn.session}")[:32]
    return orjson.dumps(body)


def usage_counts(usage: object) -> tuple[int, int]:
    """The prompt and completion tokens of an answer's usage, whatever shape the backend gave it: a
    value that is not a count counts as none."""
    if type(usage) is not dict:
        return 0, 0
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (prompt if type(prompt) is int and prompt >= 0 else 0,
            completion if type(completion) is int and completion >= 0 else 0)


def answer_text(answer: dict) -> str:
    """The first choice's message content when it is text, whatever shape the backend gave the rest."""
    choices = answer.get("choices")
    first = choices[0] if type(choices) is list and choices else None
    message = first.get("message") if type(first) is dict else None
    content = message.get("content") if type(message) is dict else None
    return content if type(content) is str else ""


@dataclass(slots=True)
class Outcome:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


# Only the events carrying usage are parsed while the stream passes (some servers send
# `"usage": null` in every event); a finish reason is read without parsing. Within a JSON
# string these marks would have escaped quotes, so a model's text cannot fake them. A chunk is
# searched once for any of them (most chunks hold none): one scan instead of three.
USAGE_MARK = re.compile(rb'"usage": ?\{')
FINISH_REASON = re.compile(rb'"finish_reason": ?"([A-Za-z_]+)"')
TOOL_CALLS_MARK = b'"tool_calls"'
ANY_MARK = re.compile(rb'"finish_reason": ?"|"usage": ?\{|"tool_calls"')
# A delta's content when it is a string at the head of the delta (after the role, in a first event).
DELTA_CONTENT = re.compile(rb'"delta": ?\{(?:"role": ?"[a-z]+", ?)?"content": ?("[^"\\]*(?:\\.[^"\\]*)*")')
# The JSON object of each data line; `data: [DONE]` is not one.
DATA_OBJECT = re.compile(rb"^data: ?(\{.*)$", re.MULTILINE)


def event_of(line: bytes) -> dict | None:
    if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
        return None
    return event_body(line[5:])


def event_body(body: bytes) -> dict | None:
    """An event's JSON object, or None when it is not one."""
    try:
        chunk = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return chunk if isinstance(chunk, dict) else None


def screened_events(whole: bytes, guard: StreamGuard) -> bytes:
    """The SSE lines with the tool calls the role may not make taken out."""
    lines = whole.split(b"\n")
    for i, line in enumerate(lines):
        if TOOL_CALLS_MARK in line or guard.note_pending:
            chunk = event_of(line)
            if chunk is not None and guard.screen(chunk):
                lines[i] = b"data: " + orjson.dumps(chunk)
    return b"\n".join(lines)


class SseTally(Outcome):
    """Reads the backend's SSE bytes into the stream's outcome: passes on whole lines only,
    screens tool calls (a guard is made at the first one), and reads finish and usage as they
    pass. When the text goes into a session's history, the lines are kept and their deltas
    parsed once, at the end (`result()`). It holds at most a line (MAX_LINE_BYTES) and what a
    session keeps (`limit` bytes); beyond either, the backend has failed the turn."""
    __slots__ = ("scope", "limit", "guard", "pending", "events", "kept", "kept_bytes")

    def __init__(self, keep_text: bool, scope: ToolScope, limit: int = MAX_ANSWER_BYTES) -> None:
        self.text, self.prompt_tokens, self.completion_tokens, self.finish_reason = "", 0, 0, None
        self.scope, self.limit = scope, limit
        self.guard: StreamGuard | None = None
        self.pending = b""
        self.events = 0
        self.kept: list[bytes] | None = [] if keep_text else None
        self.kept_bytes = 0

    def feed(self, chunk: bytes) -> bytes:
        if self.pending:
            chunk = self.pending + chunk
        cut = chunk.rfind(b"\n") + 1
        if cut == len(chunk):
            whole, self.pending = chunk, b""
        elif cut:
            whole, self.pending = chunk[:cut], chunk[cut:]
        else:
            if len(chunk) > MAX_LINE_BYTES:
                raise BackendFailed(f"a line of its stream passed {MAX_LINE_BYTES} bytes")
            self.pending = chunk
            return b""
        self.events += whole.count(b"data:")
        if ANY_MARK.search(whole) is not None or self.guard is not None:
            whole = self.read_marks(whole)
        if self.kept is not None:
            self.kept.append(whole)
            self.kept_bytes += len(whole)
            if self.kept_bytes > self.limit:
                raise answer_too_large(self.limit)
        return whole

    def feed_end(self) -> bytes:
        """At the stream's end, the bytes after its last newline, read as a last line: a backend may
        leave out the newline, and its finish, usage and tool calls still count and are screened."""
        last, self.pending = self.pending, b""
        return self.feed(last + b"\n")[:-1] if last else b""

    def read_marks(self, whole: bytes) -> bytes:
        """Screens tool calls, and reads finish and usage, in lines that carry them."""
        if TOOL_CALLS_MARK in whole or (self.guard is not None and self.guard.note_pending):
            if self.guard is None:
                self.guard = StreamGuard(self.scope)
            whole = screened_events(whole, self.guard)
        reasons = FINISH_REASON.findall(whole)
        if reasons:
            self.finish_reason = reasons[-1].decode()
        mark = USAGE_MARK.search(whole)
        if mark:
            self.read_usage(whole, mark)
        return whole

    def result(self) -> Outcome:
        if self.kept:
            self.text = "".join(delta_texts(b"".join(self.kept)))
            self.kept = None
        return self

    def read_usage(self, whole: bytes, mark: re.Match | None) -> None:
        while mark:
            end = whole.find(b"\n", mark.end())
            line = whole[whole.rfind(b"\n", 0, mark.start()) + 1:end if end >= 0 else None]
            chunk = event_body(line[5:]) if line.startswith(b"data:") else None
            usage = chunk.get("usage") if chunk is not None else None
            if type(usage) is dict:
                self.prompt_tokens, self.completion_tokens = usage_counts(usage)
            mark = USAGE_MARK.search(whole, end) if end >= 0 else None


def delta_texts(whole: bytes) -> list[str]:
    """The content deltas of the events in `whole`. When every `"content"` key is a string at the
    head of a delta (as vLLM, llama-server and OpenAI send them), the strings are read by one regex
    and decoded as one JSON array, with no Python work per event (an answer has an event per
    token). Otherwise each event is parsed and its choices' delta contents kept (the regex reads
    every choice's too); all events as one JSON array, or one by one when some event is malformed,
    which is then skipped."""
    found = DELTA_CONTENT.findall(whole)
    if found and len(found) == whole.count(b'"content"'):
        try:
            return orjson.loads(b"[" + b",".join(found) + b"]")
        except orjson.JSONDecodeError:
            pass
    bodies = DATA_OBJECT.findall(whole)
    try:
        chunks = orjson.loads(b"[" + b",".join(bodies) + b"]")
    except orjson.JSONDecodeError:
        chunks = [event_body(b) for b in bodies]
    texts = []
    for chunk in chunks:
        for choice in (chunk.get("choices") if isinstance(chunk, dict) else None) or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                texts.append(content)
    return texts


def refusal(mux: Mux, turn: Turn, exc: Exception) -> ApiError:
    m = mux.metrics
    if isinstance(exc, AgentQueueFull):
        m.rejections.labels("agent_queue_full").inc()
        return ApiError(429, f"{turn.ident.name} has {mux.scheduler.agent_queue_max} requests queued, "
                             "its whole share of the queue", "rate_limit_error", {"Retry-After": "2"})
    if isinstance(exc, QueueFull):
        m.rejections.labels("queue_full").inc()
        return ApiError(429, "queue is full", "rate_limit_error", {"Retry-After": "2"})
    if isinstance(exc, NoBackend):
        m.rejections.labels("no_backend").inc()
        return ApiError(503, "no healthy backend", "service_unavailable", {"Retry-After": "5"})
    m.rejections.labels("deadline").inc()
    return ApiError(504, "deadline passed while queued", "timeout")


async def acquire(mux: Mux, turn: Turn, retry: bool) -> Grant:
    """A backend slot: at once when one is free and nothing waits (no coroutine of the
    scheduler's), else from the fair queue."""
    scheduling = turn.role.scheduling
    try:
        grant = mux.scheduler.grant_now(turn.ident.name, scheduling.weight, turn.cost, retry) or \
            await mux.scheduler.acquire(turn.ident.name, scheduling.weight, scheduling.priority, turn.cost,
                                        turn.deadline, retry)
    except (QueueFull, NoBackend, DeadlineExceeded) as exc:
        raise refusal(mux, turn, exc) from None
    mux.metrics.agent(turn.ident.name).queue_wait.observe(grant.queue_wait_s)
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


def retried(mux: Mux, turn: Turn, grant: Grant, exc: Exception) -> None:
    release(mux, grant, failed=True, refused=isinstance(exc, aiohttp.ClientConnectorError))
    mux.metrics.request(turn.ident.name, grant.backend.name, "retried").inc()


def time_left(turn: Turn) -> float:
    return max(0.0, turn.deadline - time.monotonic())


BACKEND_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, BackendFailed, asyncio.CancelledError)


def backend_error(raised: BaseException, turn: Turn) -> Exception:
    """What ended a talk with a backend, the deadline's cancellation as TimeoutError; any other
    cancellation goes on up."""
    if isinstance(raised, asyncio.CancelledError):
        if not timed_out(turn):
            raise raised
        return asyncio.TimeoutError()
    return raised


def failure_text(exc: Exception) -> str:
    return "the turn's deadline passed" if isinstance(exc, asyncio.TimeoutError) else str(exc)


def give_up_at_deadline(mux: Mux, turn: Turn, backend: str, last: Exception) -> None:
    if isinstance(last, asyncio.TimeoutError) and not time_left(turn):
        mux.metrics.request(turn.ident.name, backend, "timeout").inc()
        raise ApiError(504, "the turn's deadline passed before the backend answered", "timeout")


def answer_headers(turn: Turn) -> list[tuple[bytes, bytes]]:
    """x-dgxready-* headers of an answer, encoded as the server sends them."""
    grant = turn.grant
    headers = [(b"x-dgxready-overhead-ms", b"%.3f" % (turn.overhead_s * 1000)),
               (b"x-dgxready-queue-ms", b"%.3f" % (grant.queue_wait_s * 1000)),
               (b"x-dgxready-backend", grant.backend.name_header)]
    if turn.dropped_tools:
        headers.append((b"x-dgxready-dropped-tools", ",".join(turn.dropped_tools).encode("latin-1")))
    return headers


async def complete(mux: Mux, turn: Turn, send: Send) -> None:
    last: Exception | None = None
    for attempt in range(MAX_RETRIES + 1):
        turn.grant = grant = await acquire(mux, turn, retry=attempt > 0)
        turn.sent = time.perf_counter()
        try:
            turn.reading = True
            if turn.passed:
                raise asyncio.TimeoutError()
            async with mux.client.post(f"{grant.backend.config.url}/v1/chat/completions",
                                       data=backend_body(turn, grant.backend, False),
                                       headers=grant.backend.json_headers) as resp:
                status, content = resp.status, await read_answer(resp, mux.config.max_answer_bytes)
            turn.reading = False
            if status >= 500:
                raise BackendFailed(f"HTTP {status}")
        except BACKEND_ERRORS as raised:
            turn.reading = False
            exc = backend_error(raised, turn)
            retried(mux, turn, grant, exc)
            give_up_at_deadline(mux, turn, grant.backend.name, exc)
            last = exc
            continue
        release(mux, grant, failed=False)
        if status != 200:
            mux.metrics.request(turn.ident.name, grant.backend.name, str(status)).inc()
            await send_response(send, status, content)
            return
        try:
            out = orjson.loads(content)
        except orjson.JSONDecodeError:
            mux.metrics.request(turn.ident.name, grant.backend.name, "bad_answer").inc()
            raise ApiError(502, f"backend {grant.backend.name} answered malformed JSON",
                           "backend_error") from None
        if not isinstance(out, dict):
            mux.metrics.request(turn.ident.name, grant.backend.name, "bad_answer").inc()
            raise ApiError(502, f"backend {grant.backend.name} answered JSON that is not an object",
                           "backend_error")
        audit_client_tools(mux, turn, "blocked", screen_answer(out, turn.scope))
        turn.first_byte = time.perf_counter()
        finish(mux, turn, Outcome(answer_text(out), *usage_counts(out.get("usage"))))
        out["model"] = turn.data.get("model") or out.get("model")
        await send_response(send, 200, orjson.dumps(out), extra=answer_headers(turn))
        return
    mux.metrics.request(turn.ident.name, "none", "failed").inc()
    raise ApiError(502, f"every backend failed before answering: {failure_text(last)}", "backend_error")


def finish(mux: Mux, turn: Turn, outcome: Outcome) -> None:
    m, name, grant = mux.metrics, turn.ident.name, turn.grant
    m.request(name, grant.backend.config.name, "ok").value += 1
    m.agent(name).answered(outcome.prompt_tokens, outcome.completion_tokens, turn.first_byte - turn.arrived,
                           time.perf_counter() - turn.arrived)
    m.overhead.observe(max(0.0, turn.overhead_s))
    mux.scheduler.settle(name, turn.role.scheduling.weight, turn.cost + turn.streamed,
                         outcome.prompt_tokens + outcome.completion_tokens)
    last = mux.typical_output.get(name, outcome.completion_tokens)
    mux.typical_output[name] = 0.8 * last + 0.2 * outcome.completion_tokens
    if turn.session:
        new = [x for x in turn.messages if x["role"] not in INSTRUCTION_ROLES]
        mux.save_turn(name, turn.session, new + [{"role": "assistant", "content": outcome.text}])


async def open_stream(mux: Mux, turn: Turn) -> tuple[aiohttp.ClientResponse, SseTally, bytes]:
    """Dispatch and wait for the first data event; failures before it retry elsewhere. The answer,
    its tally and the lines read so far; the turn holds the slot."""
    last: Exception | None = None
    for attempt in range(MAX_RETRIES + 1):
        turn.grant = grant = await acquire(mux, turn, retry=attempt > 0)
        turn.sent = time.perf_counter()
        resp: aiohttp.ClientResponse | None = None
        try:
            turn.reading = True
            if turn.passed:
                raise asyncio.TimeoutError()
            resp = await mux.client.post(f"{grant.backend.config.url}/v1/chat/completions",
                                         data=backend_body(turn, grant.backend, True),
                                         headers=grant.backend.stream_headers)
            if resp.status != 200:
                content = await read_answer(resp, mux.config.max_answer_bytes)
                turn.reading = False
                resp.release()
                if resp.status >= 500:
                    raise BackendFailed(f"HTTP {resp.status}")
                release(mux, grant, failed=False)
                mux.metrics.request(turn.ident.name, grant.backend.name, str(resp.status)).inc()
                raise ApiError(resp.status, content.decode(errors="replace")[:500], "backend_error")
            tally = SseTally(turn.session is not None, turn.scope, mux.config.max_answer_bytes)
            head = b""
            while not tally.events:
                chunk = await resp.content.readany()
                if not chunk:
                    head += tally.feed_end()
                    break
                head += tally.feed(chunk)
                if len(head) > MAX_LINE_BYTES:
                    raise BackendFailed(f"its stream passed {MAX_LINE_BYTES} bytes before its first event")
            turn.reading = False
            if not tally.events:
                resp.release()
                raise BackendFailed("empty stream")
            turn.first_byte = time.perf_counter()
            return resp, tally, head
        except BACKEND_ERRORS as raised:
            turn.reading = False
            if resp is not None:
                resp.close()
            exc = backend_error(raised, turn)
            retried(mux, turn, grant, exc)
            give_up_at_deadline(mux, turn, grant.backend.name, exc)
            last = exc
    mux.metrics.request(turn.ident.name, "none", "failed").inc()
    raise ApiError(502, f"every backend failed before streaming: {failure_text(last)}", "backend_error")


class ClientGone(Exception):
    pass


def charge_streamed(mux: Mux, turn: Turn, tally: SseTally) -> None:
    """The stream's events not yet charged, to its agent (an event is about a token)."""
    new = tally.events - turn.streamed
    if new:
        turn.streamed = tally.events
        mux.scheduler.charge(turn.ident.name, turn.role.scheduling.weight, new)


async def relay(mux: Mux, turn: Turn, opened: tuple[aiohttp.ClientResponse, SseTally, bytes], send: Send,
                receive: Receive) -> None:
    """Forward the stream as the backend's bytes arrive, in as few writes as what is already
    buffered allows, charging the output to the agent as it streams (CHARGE_EVENTS at a time, the
    rest at the end; usage settles the difference). A backend failure or the turn's deadline ends
    it with an error event, sent after the backend slot is free; a client that hangs up frees the
    slot at once."""
    response, tally, out = opened
    gone: asyncio.Future | None = None
    cycle = server_cycle(send)
    content = response.content
    failed = cancelled = False
    tail: bytes | None = None
    try:
        await send({"type": "http.response.start", "status": 200,
                    "headers": SSE_HEADERS + answer_headers(turn)})
        chunk = content.read_nowait()
        reads = 0
        while True:
            out += tally.feed(chunk)
            if tally.events - turn.streamed >= CHARGE_EVENTS:
                charge_streamed(mux, turn, tally)
            # uvicorn's send() ignores a closed connection: its cycle's flag, or else receive(),
            # reports the hang-up. receive() is watched from the second read on: a short answer
            # ends before it, without a task.
            if reads and (cycle.disconnected if cycle is not None else
                          gone is not None and gone.done() and gone.result()["type"] == "http.disconnect"):
                if tally.finish_reason is None:
                    raise ClientGone()
                break  # the client had the whole answer and hung up before the stream's end
            if content.at_eof():
                break
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
                out = b""
            if cycle is None and gone is None and reads:
                gone = asyncio.ensure_future(receive())
            reads += 1
            if turn.passed:
                raise asyncio.TimeoutError()
            turn.reading = True
            chunk = await content.readany()
            turn.reading = False
        if tally.pending:
            out += tally.feed_end()
        if tally.finish_reason is None:
            raise BackendFailed("stream ended without a finish_reason")
        await send({"type": "http.response.body", "body": out, "more_body": False})
    except ClientGone:
        cancelled = True
        mux.metrics.request(turn.ident.name, turn.grant.backend.name, "client_gone").inc()
    except BACKEND_ERRORS as raised:
        try:
            exc = backend_error(raised, turn)
        except asyncio.CancelledError:
            cancelled = True
            raise
        failed = True
        late = isinstance(exc, asyncio.TimeoutError)
        name = turn.grant.backend.name
        event = {"error": {"message": f"backend {name} failed mid-stream: {failure_text(exc)}",
                           "type": "timeout" if late else "backend_error"}}
        # The leading blank line ends any event the backend left half-sent, its last line unended too.
        tail = out + b"\n\ndata: " + orjson.dumps(event) + b"\n\ndata: [DONE]\n\n"
        mux.metrics.request(turn.ident.name, name, "timeout" if late else "failed_midstream").inc()
    finally:
        turn.reading = False
        charge_streamed(mux, turn, tally)
        if gone:
            gone.cancel()
        if cancelled or failed:
            response.close()
        else:
            response.release()
        release(mux, turn.grant, failed=failed)
        if tally.guard is not None:
            audit_client_tools(mux, turn, "blocked", tally.guard.blocked)
        if not (failed or cancelled):
            finish(mux, turn, tally.result())
    if tail is not None:
        await send({"type": "http.response.body", "more_body": False, "body": tail})
