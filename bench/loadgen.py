"""Asyncio streaming load generator for any OpenAI-compatible /v1/chat/completions endpoint.
Closed loop: N workers, each sends its next request when its last one ends. Open loop: gamma
arrivals (burstiness 1 = Poisson) with an optional concurrency cap."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np

from bench.metrics import RequestRecord
from bench.workloads import RequestSpec, Workload
from dgxready.errors import DgxReadyError


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


async def send(client: httpx.AsyncClient, ep: Endpoint, spec: RequestSpec) -> tuple[RequestRecord, str]:
    rec = RequestRecord(sent_at=time.perf_counter())
    text: list[str] = []
    last = rec.sent_at
    try:
        async with client.stream("POST", ep.chat_url, json=request_body(ep, spec),
                                 headers={"Authorization": f"Bearer {ep.api_key}"},
                                 timeout=ep.timeout_s) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")[:200]
                rec.error = f"http {resp.status_code}: {body}"
                return rec, ""
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    rec.error = f"stream error: {chunk['error']}"
                    return rec, "".join(text)
                if chunk.get("usage"):
                    rec.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    rec.output_tokens = chunk["usage"].get("completion_tokens", 0)
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        now = time.perf_counter()
                        if rec.ttft is None:
                            rec.ttft = now - rec.sent_at
                        else:
                            rec.itl.append(now - last)
                        last = now
                        text.append(content)
                    rec.finish_reason = choice.get("finish_reason") or rec.finish_reason
    except (httpx.TimeoutException, asyncio.TimeoutError):
        rec.error = "timeout"
    except httpx.HTTPError as exc:
        rec.error = f"transport: {exc.__class__.__name__}"
    except json.JSONDecodeError:
        rec.error = "protocol: bad SSE JSON"
    finally:
        rec.ended_at = time.perf_counter()
    if rec.error is None:
        rec.e2el = last - rec.sent_at if rec.ttft is not None else None
        # A 200 with no tokens or no finish_reason is a failure (e.g. an interrupted stream).
        if rec.output_tokens <= 0:
            rec.error = "empty: no output tokens in usage"
        elif rec.finish_reason is None:
            rec.error = "truncated: no finish_reason"
        else:
            rec.success = True
    return rec, "".join(text)


def make_client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(limits=limits, timeout=None)


async def closed_loop(ep: Endpoint, workload: Workload, concurrency: int, num_requests: int,
                      warmup: int = 0, on_done: Callable[[RequestRecord], None] | None = None
                      ) -> list[RequestRecord]:
    sessions = [workload.session(i) for i in range(concurrency)]
    async with make_client(concurrency) as client:
        if warmup:
            await _run_workers(client, ep, sessions, warmup, None)
        return await _run_workers(client, ep, sessions, num_requests, on_done)


async def _run_workers(client, ep, sessions, total, on_done) -> list[RequestRecord]:
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
