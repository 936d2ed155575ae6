"""Weighted fair queueing across agents, with virtual time counted in tokens, strict priority
classes (lower runs first), a bounded queue and deadlines. A grant is a backend slot."""
from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from dataclasses import dataclass, field

from agents.backends import Backend, BackendPool


class QueueFull(Exception):
    pass


class DeadlineExceeded(Exception):
    pass


class NoBackend(Exception):
    pass


@dataclass(order=True)
class Ticket:
    priority: int
    finish: float
    seq: int
    start: float = field(compare=False)
    agent: str = field(compare=False)
    future: asyncio.Future = field(compare=False)
    enqueued_at: float = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


@dataclass
class Grant:
    backend: Backend
    queue_wait_s: float
    ticket: Ticket


class FairScheduler:
    def __init__(self, pool: BackendPool, queue_max: int):
        self.pool = pool
        self.queue_max = queue_max
        self.heap: list[Ticket] = []
        self.vtime = 0.0
        self.last_finish: dict[str, float] = {}
        self._seq = itertools.count()
        self.served_tokens: dict[str, float] = {}
        self.depth = 0

    async def acquire(self, agent: str, weight: float, priority: int, cost_tokens: float,
                      deadline: float, retry: bool = False) -> Grant:
        if not self.pool.any_available():
            raise NoBackend()
        if self.depth >= self.queue_max and not retry:
            raise QueueFull()
        start = max(self.vtime, self.last_finish.get(agent, 0.0))
        finish = start + cost_tokens / weight
        self.last_finish[agent] = finish
        loop = asyncio.get_running_loop()
        ticket = Ticket(-1 if retry else priority, finish, next(self._seq), start, agent,
                        loop.create_future(), time.monotonic())
        heapq.heappush(self.heap, ticket)
        self.depth += 1
        self.dispatch()
        if ticket.future.done():
            return Grant(ticket.future.result(), 0.0, ticket)
        try:
            backend = await asyncio.wait_for(asyncio.shield(ticket.future),
                                             timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.withdraw(ticket)
            raise DeadlineExceeded() from None
        except asyncio.CancelledError:
            self.withdraw(ticket)
            raise
        return Grant(backend, time.monotonic() - ticket.enqueued_at, ticket)

    def withdraw(self, ticket: Ticket) -> None:
        """A waiter gave up: drop its ticket, or hand back the slot it was granted meanwhile."""
        ticket.cancelled = True
        if not ticket.future.done():
            self.depth -= 1
            ticket.future.cancel()
        elif not ticket.future.cancelled():
            self.release(ticket.future.result())

    def settle(self, agent: str, weight: float, estimated: float, actual: float) -> None:
        """Charge the agent for the tokens it really used instead of the estimate."""
        self.last_finish[agent] = self.last_finish.get(agent, 0.0) + (actual - estimated) / weight
        self.served_tokens[agent] = self.served_tokens.get(agent, 0.0) + actual

    def release(self, backend: Backend) -> None:
        backend.outstanding -= 1
        self.dispatch()

    def dispatch(self) -> None:
        while self.heap:
            if self.heap[0].cancelled:
                heapq.heappop(self.heap)
                continue
            backend = self.pool.pick()
            if backend is None:
                return
            ticket = heapq.heappop(self.heap)
            self.depth -= 1
            self.vtime = max(self.vtime, ticket.start)
            backend.outstanding += 1
            ticket.future.set_result(backend)
