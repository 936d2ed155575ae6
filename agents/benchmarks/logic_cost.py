"""The multiplexer's request logic alone: its chat path run in process against canned transports,
with the same requests sent through the bare pass-through proxy's forward over the same transports.
Thread CPU per streamed request, the best of several passes. No sockets, no other process and no
event-loop I/O, so a change of a few microseconds shows in seconds, where the overhead bars' runs
on a small machine read to about ±10%. Also the Python bytecodes each path runs a request, counted
by a tracer: the same on every run and machine, where a shared VM's speed moves CPU time by a
quarter from one minute to the next (not counted: work in C, such as orjson, regexes or SQLite).
And what each streamed token costs, from a long answer sent an event a chunk, as a model streams
it, against the short one sent the same way: the overhead bars' 3-token answers hardly show it,
where a real answer has hundreds.

Simulated here: the backend (aiohttp's client answers with a canned SSE stream of three tokens and
a usage event, in two chunks, as the instant backend sends it) and the client's ASGI receive and
send. Everything between them is the multiplexer's code as it serves: key lookup, admission and
screening, the prompt, the fair-queue grant, deadlines, the stream's accounting and metrics."""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from agents.benchmarks.fixtures import key_of, mux_config, write_bench_keys
from agents.benchmarks.passthrough import PassThrough
from agents.config import MuxConfig
from agents.mux import Mux
from agents.server import chat
from agents.service import build_mux
from dgxready.files import atomic_write_json

AGENT = "developer-1"
CANNED_URL = "http://canned"
PASSES = 5
CANNED_TOKENS = ("Ack", "nowledged", ".")
REQUEST = orjson.dumps({"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "alpha beta gamma delta"}],
                        "max_tokens": 3, "temperature": 0.0, "stream": True,
                        "stream_options": {"include_usage": True}})


def canned_events(tokens: tuple[str, ...] = CANNED_TOKENS) -> list[bytes]:
    """The SSE events of an answer of `tokens`, its usage and its end, as the instant backend sends them."""
    events = [{"choices": [{"index": 0, "delta": {"content": t},
                            "finish_reason": "stop" if i == len(tokens) - 1 else None}]}
              for i, t in enumerate(tokens)]
    events.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(tokens),
                                            "total_tokens": 5 + len(tokens)}})
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def halves(whole: bytes) -> list[bytes]:
    return [whole[:len(whole) // 2], whole[len(whole) // 2:]]


SSE = b"".join(canned_events())
# The short answer in two chunks, as the instant backend's arrive; a long one an event a chunk.
SHORT_CHUNKS = halves(SSE)
LONG_TOKENS = 200
LONG_CHUNKS = canned_events(CANNED_TOKENS + ("token",) * LONG_TOKENS)
EVENT_CHUNKS = canned_events()


class CannedStream:
    """aiohttp's StreamReader as the proxy reads it, over a canned answer's chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    def iter_any(self) -> CannedStream:
        return self

    def __aiter__(self) -> CannedStream:
        return self

    async def __anext__(self) -> bytes:
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)

    def read_nowait(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    async def readany(self) -> bytes:
        return self.read_nowait()

    def at_eof(self) -> bool:
        return not self.chunks


class CannedResponse:
    """aiohttp's ClientResponse as the two proxies read it: awaited (the multiplexer) or entered
    (the bare pass-through)."""
    status = 200
    raw_headers = ((b"Content-Type", b"text/event-stream"),)

    def __init__(self, chunks: list[bytes]) -> None:
        self.content = CannedStream(chunks)
        self.whole = b"".join(chunks)

    async def __aenter__(self) -> CannedResponse:
        return self

    async def __aexit__(self, *exc) -> None:
        pass

    async def read(self) -> bytes:
        return self.whole

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class CannedClient:
    """Stands in for the proxies' aiohttp.ClientSession: every request gets the canned answer, in
    `chunks` (the short answer in two unless set otherwise)."""

    def __init__(self) -> None:
        self.chunks = SHORT_CHUNKS

    def post(self, url: str, data: bytes | None = None,
             headers: dict | None = None) -> Awaitable[CannedResponse]:
        return self.answer()

    def request(self, method: str, url: str, data: bytes | None = None,
                headers: list | None = None) -> CannedResponse:
        return CannedResponse(self.chunks)

    async def answer(self) -> CannedResponse:
        return CannedResponse(self.chunks)


@dataclass(frozen=True)
class LogicCost:
    mux_us: float
    bare_us: float
    requests: int
    passes: int
    mux_opcodes: int
    bare_opcodes: int
    session_opcodes: int
    token_mux_us: float
    token_bare_us: float
    token_mux_opcodes: float
    token_bare_opcodes: float

    @property
    def extra_us(self) -> float:
        return self.mux_us - self.bare_us

    @property
    def extra_opcodes(self) -> int:
        return self.mux_opcodes - self.bare_opcodes

    @property
    def token_extra_us(self) -> float:
        return self.token_mux_us - self.token_bare_us


def canned_mux(tmp: Path) -> tuple[Mux, str]:
    """A multiplexer on a throw-away config with one backend, its client the canned one; and the key of
    the agent whose requests are measured."""
    keys = write_bench_keys(tmp / "keys.yaml")
    mux = build_mux(MuxConfig.model_validate(mux_config(tmp, 1, CANNED_URL, 256, tmp / "keys.yaml")))
    mux.client = CannedClient()
    return mux, key_of(keys, AGENT)


def http_scope(key: str, session: str | None = None) -> dict:
    headers = [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {key}".encode()),
               (b"content-type", b"application/json"), (b"content-length", str(len(REQUEST)).encode())]
    if session is not None:
        headers.append((b"x-session-id", session.encode()))
    return {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers}


Handler = Callable[[dict, Callable, Callable], Awaitable[None]]


class CannedCycle:
    """The client's side of one request as uvicorn's request cycle offers it: receive() gives the
    body, send() is a bound method of an object with `disconnected` (agents.asgi.server_cycle)."""

    def __init__(self) -> None:
        self.disconnected = False
        self.sent: list[dict] = []

    async def receive(self) -> dict:
        return {"type": "http.request", "body": REQUEST, "more_body": False}

    async def send(self, message: dict) -> None:
        self.sent.append(message)


async def one_request(handler: Handler, scope: dict) -> list[dict]:
    """One request through `handler`; the ASGI messages it sent back."""
    cycle = CannedCycle()
    await handler(scope, cycle.receive, cycle.send)
    return cycle.sent


def answer_body(messages: list[dict]) -> bytes:
    return b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


async def pass_us(handler: Handler, scope: dict, requests: int) -> float:
    """Thread CPU per request over one pass of `requests`."""
    started = time.thread_time_ns()
    for _ in range(requests):
        await one_request(handler, scope)
    return (time.thread_time_ns() - started) / requests / 1000


def mux_handler(mux: Mux) -> Handler:
    async def handle(scope: dict, receive, send) -> None:
        await chat(mux, scope, receive, send)
    return handle


def bare_handler(client: CannedClient) -> Handler:
    """The bare pass-through proxy's own forward, its client the canned one."""
    proxy = PassThrough(CANNED_URL)
    proxy.client = client

    async def handle(scope: dict, receive, send) -> None:
        await proxy.forward(scope, receive, send)
    return handle


OPCODE_REQUESTS = 20


async def opcodes_per_request(handler: Handler, scope: dict, requests: int = OPCODE_REQUESTS) -> int:
    """Python bytecodes run in this thread per request, over `requests` after as many to warm up."""
    for _ in range(requests):
        await one_request(handler, scope)
    count = 0

    def trace(frame, event: str, arg):
        nonlocal count
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
        return trace
    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        for _ in range(requests):
            await one_request(handler, scope)
    finally:
        sys.settrace(previous)
    return round(count / requests)


async def best_us(paths: tuple[Handler, ...], scope: dict, requests: int, passes: int) -> list[float]:
    """Best CPU per request of each path: passes alternate, so that a change in the machine's speed
    (a shared VM's) reaches all; after a warm-up of each."""
    for handler in paths:
        await pass_us(handler, scope, min(requests, 500))
    best = [float("inf")] * len(paths)
    for _ in range(passes):
        for i, handler in enumerate(paths):
            best[i] = min(best[i], await pass_us(handler, scope, requests))
    return best


async def per_token(paths: tuple[Handler, ...], client: CannedClient, scope: dict, requests: int,
                    passes: int) -> tuple[list[float], list[float]]:
    """CPU and bytecodes each path spends per streamed token: the long answer against the short one,
    both an event a chunk."""
    async def answer_cost(chunks: list[bytes]) -> tuple[list[float], list[int]]:
        client.chunks = chunks
        return (await best_us(paths, scope, requests, passes),
                [await opcodes_per_request(h, scope, 5) for h in paths])

    def per_token_of(long: list, short: list) -> list[float]:
        return [(a - b) / LONG_TOKENS for a, b in zip(long, short, strict=True)]
    try:
        short_us, short_ops = await answer_cost(EVENT_CHUNKS)
        long_us, long_ops = await answer_cost(LONG_CHUNKS)
    finally:
        client.chunks = SHORT_CHUNKS
    return per_token_of(long_us, short_us), per_token_of(long_ops, short_ops)


async def measure(mux: Mux, key: str, requests: int, passes: int) -> LogicCost:
    """The best pass of each path counts; the long answers' passes are shorter, in proportion."""
    scope = http_scope(key)
    paths = (mux_handler(mux), bare_handler(mux.client))
    best = await best_us(paths, scope, requests, passes)
    opcodes = [await opcodes_per_request(handler, scope) for handler in paths]
    session = await opcodes_per_request(paths[0], http_scope(key, "logic-cost"))
    token_us, token_ops = await per_token(paths, mux.client, scope, max(10, requests // 50), passes)
    return LogicCost(best[0], best[1], requests, passes, opcodes[0], opcodes[1], session,
                     token_us[0], token_us[1], token_ops[0], token_ops[1])


def logic_cost(requests: int = 5000, passes: int = PASSES) -> LogicCost:
    with tempfile.TemporaryDirectory(prefix="dgxready-logic-") as tmp:
        mux, key = canned_mux(Path(tmp))
        try:
            return asyncio.run(measure(mux, key, requests, passes))
        finally:
            mux.store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000, help="requests in each timed pass")
    parser.add_argument("--passes", type=int, default=PASSES, help="timed passes; the best one counts")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    cost = logic_cost(args.requests, args.passes)
    print(f"multiplexer's chat path: {cost.mux_us:.1f} µs CPU a streamed request; bare forward: "
          f"{cost.bare_us:.1f} µs; the multiplexer's logic: {cost.extra_us:.1f} µs "
          f"(best of {cost.passes} passes of {cost.requests}, canned transports)")
    print(f"Python bytecodes a request: multiplexer {cost.mux_opcodes}, with a session {cost.session_opcodes}; "
          f"bare forward {cost.bare_opcodes}; the multiplexer's logic {cost.extra_opcodes}")
    print(f"each streamed token (an event a chunk, {LONG_TOKENS} more): multiplexer {cost.token_mux_us:.2f} µs "
          f"and {cost.token_mux_opcodes:.0f} bytecodes, bare forward {cost.token_bare_us:.2f} µs and "
          f"{cost.token_bare_opcodes:.0f}; the multiplexer's logic {cost.token_extra_us:.2f} µs")
    if args.json:
        derived = {"extra_us": cost.extra_us, "extra_opcodes": cost.extra_opcodes,
                   "token_extra_us": cost.token_extra_us}
        atomic_write_json(args.json, asdict(cost) | derived)


if __name__ == "__main__":
    main()
