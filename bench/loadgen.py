"""Asyncio streaming load generator for any OpenAI-compatible /v1/chat/completions endpoint.
Closed loop: N workers, each sends its next request when its last one ends. Open loop: gamma
arrivals (burstiness 1 = Poisson) with an optional concurrency cap. The client is aiohttp, as in
vLLM's benchmark: it costs a fraction of httpx's CPU per request, which the measured server and
the generator share on a small machine."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import httpx
import numpy as np
import orjson

from bench.metrics import RequestRecord
from bench.workloads import RequestSpec, Workload
from dgxready.errors import DgxReadyError
from model.backend import ENGINE_CLIENT_KEEPALIVE_S

# Whether a level has seen enough, given its measured records so far.
StopRule = Callable[[list[RequestRecord]], bool]


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    api_key: str = "none"
    timeout_s: float = 120.0

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/").removesuffix("/v1") + "/v1/chat/completions"


def probe(base_url: str, api_key: str = "none", timeout_s: float = 5.0) -> str:
    """Fail before the run when the endpoint is unreachable; returns the served model id."""
    url = base_url.rstrip("/").removesuffix("/v1") + "/v1/models"
    try:
        resp = httpx.get(url, timeout=timeout_s, headers={"Authorization": f"Bearer {api_key}"})
    except httpx.HTTPError as exc:
        raise DgxReadyError(f"{url}: unreachable ({exc.__class__.__name__}: {exc})") from None
    if resp.status_code != 200:
        raise DgxReadyError(f"{url}: HTTP {resp.status_code}: {resp.text[:200]}")
    try:
        return resp.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError):
        raise DgxReadyError(f"{url}: no model listed in {resp.text[:200]!r}") from None


def request_body(ep: Endpoint, spec: RequestSpec) -> dict:
    body = {"model": ep.model, "messages": spec.messages, "max_tokens": spec.max_tokens,
            "temperature": spec.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if spec.ignore_eos:
        body["ignore_eos"] = True
    return body


@dataclass
class StreamProgress:
    """What a request's stream has shown so far: when its last token event came, and its text."""
    last_token_at: float
    text: list[str]


class StaleConnection(Exception):
    """The server had closed a pooled keep-alive connection before this request went out."""


async def send(client: aiohttp.ClientSession, ep: Endpoint, spec: RequestSpec
               ) -> tuple[RequestRecord, str]:
    rec = RequestRecord(sent_at=time.perf_counter())
    progress = StreamProgress(rec.sent_at, [])
    try:
        # llama-server announces keep-alive yet closes the socket after each stream. A request that
        # met such a pooled connection is sent again; the pool drops each dead one, so this ends.
        for _ in range(client.connector.limit + 1 if client.connector else 1):
            try:
                await _stream(client, ep, spec, rec, progress)
                break
            except StaleConnection:
                continue
        else:
            rec.error = "transport: every pooled connection was closed by the server"
    except asyncio.TimeoutError:
        rec.error = "timeout"
    except aiohttp.ClientError as exc:
        rec.error = f"transport: {exc.__class__.__name__}"
    except (orjson.JSONDecodeError, AttributeError):
        rec.error = "protocol: bad SSE JSON"
    finally:
        rec.ended_at = time.perf_counter()
    settle(rec, progress)
    return rec, "".join(progress.text)


def settle(rec: RequestRecord, progress: StreamProgress) -> None:
    """A finished stream's E2EL and verdict. A 200 with no tokens or no finish_reason is a
    failure (e.g. an interrupted stream)."""
    if rec.error is not None:
        return
    rec.e2el = progress.last_token_at - rec.sent_at if rec.ttft is not None else None
    if rec.output_tokens <= 0:
        rec.error = "empty: no output tokens in usage"
    elif rec.finish_reason is None:
        rec.error = "truncated: no finish_reason"
    else:
        rec.success = True


async def _stream(client: aiohttp.ClientSession, ep: Endpoint, spec: RequestSpec, rec: RequestRecord,
                  progress: StreamProgress) -> None:
    try:
        resp = await client.post(ep.chat_url, data=orjson.dumps(request_body(ep, spec)),
                                 headers={"Authorization": f"Bearer {ep.api_key}",
                                          "Content-Type": "application/json"},
                                 timeout=aiohttp.ClientTimeout(total=ep.timeout_s))
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        if isinstance(exc, aiohttp.ClientConnectorError):
            raise
        raise StaleConnection() from exc
    async with resp:
        if resp.status != 200:
            body = (await resp.read()).decode(errors="replace")[:200]
            rec.error = f"http {resp.status}: {body}"
            return
        async for raw in resp.content:
            observe_line(rec, progress, raw, time.perf_counter())
            if rec.error:
                return


def observe_line(rec: RequestRecord, progress: StreamProgress, raw: bytes, arrived_at: float) -> None:
    """One line of the SSE body. Only data events count; the stream is still read to its end
    ([DONE]), so that the connection can be reused."""
    if not raw.startswith(b"data:"):
        return
    data = raw[5:].strip()
    if data != b"[DONE]":
        observe_event(rec, progress, orjson.loads(data), arrived_at)


def observe_event(rec: RequestRecord, progress: StreamProgress, event: dict, arrived_at: float) -> None:
    """One SSE data event, timed as vLLM's chat request function times it: every event with
    `choices` is a token event, even a role-only or empty-content delta; the first one is TTFT,
    each later one adds an ITL gap and moves the end of the request. The usage event carries no
    choices and no time."""
    if event.get("error"):
        rec.error = f"stream error: {event['error']}"
        return
    if usage := event.get("usage"):
        rec.prompt_tokens = usage.get("prompt_tokens", 0)
        rec.output_tokens = usage.get("completion_tokens", 0)
    choices = event.get("choices")
    if not choices:
        return
    if rec.ttft is None:
        rec.ttft = arrived_at - rec.sent_at
    else:
        rec.itl.append(arrived_at - progress.last_token_at)
    progress.last_token_at = arrived_at
    if content := (choices[0].get("delta") or {}).get("content"):
        progress.text.append(content)
    rec.finish_reason = choices[0].get("finish_reason") or rec.finish_reason


def make_client(concurrency: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=concurrency + 4, keepalive_timeout=ENGINE_CLIENT_KEEPALIVE_S)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


def closed_warmup(warmup: int, concurrency: int) -> int:
    """A closed loop's warm-up, when it has one: at least every stream's first request. All streams
    start at once, a burst of first turns that a running fleet lacks, and an agent's first turn
    finds no prompt of its role in the server's cache; the measured requests are agents' later
    turns, as the serving SLO means them."""
    return max(warmup, concurrency) if warmup else 0


async def closed_loop(ep: Endpoint, workload: Workload, concurrency: int, num_requests: int,
                      warmup: int = 0, on_done: Callable[[RequestRecord], None] | None = None,
                      stop: StopRule | None = None) -> list[RequestRecord]:
    """`num_requests` measured after the warm-up (`closed_warmup`); when `stop` says so, given the
    records so far, no further request is sent and those in flight are waited for."""
    sessions = [workload.session(i) for i in range(concurrency)]
    async with make_client(concurrency) as client:
        if warmup:
            await _run_workers(client, ep, sessions, closed_warmup(warmup, concurrency), None, None)
        return await _run_workers(client, ep, sessions, num_requests, on_done, stop)


async def _run_workers(client, ep, sessions, total, on_done, stop) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    remaining = [total]

    async def worker(session) -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            rec, reply = await send(client, ep, session.next_request())
            session.observe(reply)
            records.append(rec)
            if on_done:
                on_done(rec)
            if stop and stop(records):
                remaining[0] = 0

    await asyncio.gather(*(worker(s) for s in sessions))
    return records


async def open_loop(ep: Endpoint, workload: Workload, rate: float, burstiness: float,
                    num_requests: int, max_concurrency: int | None = None, seed: int = 0,
                    warmup: int = 0, on_done: Callable[[RequestRecord], None] | None = None
                    ) -> list[RequestRecord]:
    if rate <= 0 or burstiness <= 0:
        raise DgxReadyError("--rate and --burstiness must be positive")
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), num_requests)
    cap = asyncio.Semaphore(max_concurrency or num_requests)
    pool = [workload.session(i) for i in range(max(1, min(num_requests, max_concurrency or 16)))]
    locks = [asyncio.Lock() for _ in pool]
    records: list[RequestRecord] = []
    async with make_client(max_concurrency or 64) as client:
        if warmup:
            await _run_workers(client, ep, pool[:1], warmup, None)

        async def one(i: int) -> None:
            async with cap, locks[i % len(pool)]:
                session = pool[i % len(pool)]
                rec, reply = await send(client, ep, session.next_request())
                session.observe(reply)
                records.append(rec)
                if on_done:
                    on_done(rec)

        tasks = []
        for i, gap in enumerate(gaps):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(float(gap))
        await asyncio.gather(*tasks)
    return records
