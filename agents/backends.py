"""Inference backends behind the multiplexer: slots, health, cooldown, least outstanding."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from functools import cached_property

import aiohttp

from agents.config import BackendConfig

JSON_HEADERS = {"Content-Type": "application/json"}
# llama-server announces keep-alive but closes the socket after a stream; saying so up front
# keeps the client from reusing a connection that is about to die.
STREAM_HEADERS = {"llamacpp": {**JSON_HEADERS, "Connection": "close"}}


@dataclass
class Backend:
    config: BackendConfig
    outstanding: int = 0
    up: bool = True
    cooldown_until: float = 0.0
    model_id: str | None = None
    failures: int = 0
    auth: dict[str, str] = field(default_factory=dict)

    @cached_property
    def json_headers(self) -> dict[str, str]:
        return {**JSON_HEADERS, **self.auth}

    @cached_property
    def stream_headers(self) -> dict[str, str]:
        return {**STREAM_HEADERS.get(self.config.kind, JSON_HEADERS), **self.auth}

    @property
    def name(self) -> str:
        return self.config.name

    @cached_property
    def name_header(self) -> bytes:
        return self.config.name.encode("latin-1")

    def available(self, now: float) -> bool:
        return self.up and now >= self.cooldown_until

    def has_slot(self) -> bool:
        return self.outstanding < self.config.max_concurrency


@dataclass
class BackendPool:
    backends: list[Backend]
    cooldown_s: float = 10.0
    _rr: int = 0
    on_change: list = field(default_factory=list)

    @classmethod
    def of(cls, configs: list[BackendConfig], cooldown_s: float) -> BackendPool:
        return cls([Backend(c, model_id=c.model, auth=auth_header(c)) for c in configs], cooldown_s)

    def pick(self) -> Backend | None:
        """Least outstanding requests among healthy backends with a free slot."""
        now = time.monotonic()
        self._rr += 1
        n = len(self.backends)
        if n == 1:
            only = self.backends[0]
            return only if only.available(now) and only.has_slot() else None
        best, best_key = None, None
        for i, b in enumerate(self.backends):
            if b.available(now) and b.has_slot():
                key = (b.outstanding, (i + self._rr) % n)
                if best_key is None or key < best_key:
                    best, best_key = b, key
        return best

    def any_available(self) -> bool:
        now = time.monotonic()
        return any(b.available(now) for b in self.backends)

    def cool_down(self, backend: Backend) -> None:
        backend.cooldown_until = time.monotonic() + self.cooldown_s
        backend.up = False

    def capacity(self) -> int:
        return sum(b.config.max_concurrency for b in self.backends)


def auth_header(config: BackendConfig) -> dict[str, str]:
    key = config.api_key()
    return {"Authorization": f"Bearer {key}"} if key else {}


async def probe_backend(client: aiohttp.ClientSession, backend: Backend) -> bool:
    timeout = aiohttp.ClientTimeout(total=3.0)
    try:
        async with client.get(f"{backend.config.url}/health", timeout=timeout) as health:
            if health.status != 200:
                return False
        if backend.model_id is None:
            async with client.get(f"{backend.config.url}/v1/models", timeout=timeout,
                                  headers=backend.auth) as models:
                backend.model_id = (await models.json())["data"][0]["id"]
        return True
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError):
        return False


async def health_loop(pool: BackendPool, client: aiohttp.ClientSession, interval_s: float, notify) -> None:
    """Active checks: a failing backend is cooled down; one that answers again comes back."""
    while True:
        for backend in pool.backends:
            ok = await probe_backend(client, backend)
            was_up = backend.up
            if ok and not backend.up and time.monotonic() >= backend.cooldown_until:
                backend.up = True
            elif not ok and backend.up:
                pool.cool_down(backend)
            if was_up != backend.up:
                notify(backend)
        await asyncio.sleep(interval_s)
