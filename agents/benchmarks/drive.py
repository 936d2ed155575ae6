"""The load generator of the overhead comparison: closed-loop streams for a fixed time, each
stream replaying its own seeded request sequence (so every side sees the same streams), with
an optional session per stream; and one session driven turn by turn with the multiplexer's CPU
read between turns."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson

from bench.loadgen import Endpoint, StreamProgress, make_client, observe_line, request_body, settle
from bench.metrics import RequestRecord
from bench.workloads import RequestSpec, SyntheticWorkload


@dataclass(frozen=True)
class Target:
    """Where the streams go, with which key, and whether each stream is a session."""
    label: str
    url: str
    api_key: str
    model: str = "instant"
    session_prefix: str | None = None

    def endpoint(self) -> Endpoint:
        return Endpoint(self.url, self.model, api_key=self.api_key)

    def headers(self, stream: int) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}
        if self.session_prefix is not None:
            headers["X-Session-Id"] = f"{self.session_prefix}-{stream}"
        return headers


@dataclass
class Round:
    """What one timed round produced: every request's record, and the wall time until the last
    request in flight at the deadline had ended."""
    records: list[RequestRecord]
    started: float
    elapsed_s: float

    @property
    def completed(self) -> int:
        return sum(1 for r in self.records if r.success)

    @property
    def failed(self) -> int:
        return len(self.records) - self.completed


async def send_one(client: aiohttp.ClientSession, ep: Endpoint, spec: RequestSpec,
                   headers: dict[str, str]) -> tuple[RequestRecord, str]:
    """One streamed chat request, timed as bench.loadgen times it."""
    rec = RequestRecord(sent_at=time.perf_counter())
    progress = StreamProgress(rec.sent_at, [])
    try:
        async with client.post(ep.chat_url, data=orjson.dumps(request_body(ep, spec)), headers=headers,
                               timeout=aiohttp.ClientTimeout(total=ep.timeout_s)) as resp:
            if resp.status != 200:
                rec.error = f"http {resp.status}: {(await resp.read())[:200]!r}"
            else:
                async for raw in resp.content:
                    observe_line(rec, progress, raw, time.perf_counter())
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        rec.error = f"transport: {exc.__class__.__name__}"
    rec.ended_at = time.perf_counter()
    settle(rec, progress)
    return rec, "".join(progress.text)


async def timed_streams(target: Target, workload: SyntheticWorkload, streams: int, seconds: float
                        ) -> Round:
    """`streams` closed-loop streams for `seconds`; a request in flight at the deadline finishes."""
    ep = target.endpoint()
    records: list[RequestRecord] = []
    started = time.perf_counter()
    deadline = started + seconds

    async def stream(index: int, client: aiohttp.ClientSession) -> None:
        session = workload.session(index)
        headers = target.headers(index)
        while time.perf_counter() < deadline:
            rec, reply = await send_one(client, ep, session.next_request(), headers)
            session.observe(reply)
            records.append(rec)

    async with make_client(streams) as client:
        await asyncio.gather(*(stream(i, client) for i in range(streams)))
    return Round(records, started, time.perf_counter() - started)


def run_round(target: Target, workload: SyntheticWorkload, streams: int, seconds: float) -> Round:
    return asyncio.run(timed_streams(target, workload, streams, seconds))


async def session_turns(target: Target, workload: SyntheticWorkload, turns: int, session: str,
                        cpu_ns: Callable[[], int], on_turn: Callable[[int], None] | None = None
                        ) -> list[int]:
    """Drives one session `turns` turns in a row; returns the CPU nanoseconds (as `cpu_ns` reads
    them) between consecutive turn starts, one figure per turn."""
    ep = target.endpoint()
    stream = workload.session(0)
    headers = target.headers(0) | {"X-Session-Id": session}
    marks = [cpu_ns()]
    async with make_client(1) as client:
        for turn in range(1, turns + 1):
            rec, reply = await send_one(client, ep, stream.next_request(), headers)
            if not rec.success:
                raise RuntimeError(f"turn {turn} of session {session} failed: {rec.error}")
            stream.observe(reply)
            marks.append(cpu_ns())
            if on_turn:
                on_turn(turn)
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]
