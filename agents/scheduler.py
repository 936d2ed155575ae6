"""Fair queueing across agents with virtual token counters (VTC: Sheng et al., "Fairness in
Serving Large Language Models", OSDI 2024), strict priority classes (lower runs first), a bounded
queue and deadlines. A grant is a backend slot.

Each agent's counter grows by the tokens it is served divided by its weight; a free slot goes to
the backlogged agent with the smallest counter in the most urgent class. An agent is charged its
prompt when a request is dispatched and its output as it is generated, then corrected by the real
usage, so a deep queue of one agent is never paid for in advance. An agent that becomes backlogged is lifted
to the smallest counter among the others, so idle time saves up no credit.

The queue is bounded twice: `queue_max` requests in all, and `agent_queue_max` for any one agent,
so that one agent flooding the queue turns away only itself."""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from agents.backends import Backend, BackendPool


class QueueFull(Exception):
    pass


class AgentQueueFull(QueueFull):
    """The agent has its whole share of the queue waiting; the queue itself may have room."""


class DeadlineExceeded(Exception):
    pass


class NoBackend(Exception):
    pass


@dataclass
class Ticket:
    agent: str
    priority: int
    cost: float
    weight: float
    seq: int
    future: asyncio.Future
    enqueued_at: float
    cancelled: bool = field(default=False)


@dataclass
class Grant:
    backend: Backend
    queue_wait_s: float
    ticket: Ticket | None = None


def waiting(queue: deque[Ticket]) -> bool:
    """Whether a live ticket heads the queue, once withdrawn ones are dropped from its front."""
    while queue and queue[0].cancelled:
        queue.popleft()
    return bool(queue)


def default_agent_queue_max(queue_max: int) -> int:
    """A quarter of the queue, and never fewer than four requests."""
    return max(4, queue_max // 4)


class FairScheduler:
    def __init__(self, pool: BackendPool, queue_max: int, agent_queue_max: int | None = None):
        self.pool = pool
        self.queue_max = queue_max
        self.agent_queue_max = agent_queue_max or default_agent_queue_max(queue_max)
        self.queued: dict[str, int] = {}
        self.queues: dict[str, deque[Ticket]] = {}
        self.counters: dict[str, float] = {}
        self.floor = 0.0
        self.depth = 0
        self.served_tokens: dict[str, float] = {}
        self._seq = itertools.count()

    def grant_now(self, agent: str, weight: float, cost_tokens: float, retry: bool = False) -> Grant | None:
        """A slot without waiting when one is free and nothing is queued (then there is room and a
        backend is up); None when the request must queue. Raises what `acquire` raises for a
        request that may not."""
        if not self.depth:
            backend = self.pool.pick()
            if backend is not None:
                self.floor = max(self.counters.get(agent, 0.0), self.floor)
                self.counters[agent] = self.floor + cost_tokens / weight
                backend.outstanding += 1
                return Grant(backend, 0.0)
        if not self.pool.any_available():
            raise NoBackend()
        if not retry:
            self.check_room(agent)
        return None

    async def acquire(self, agent: str, weight: float, priority: int, cost_tokens: float,
                      deadline: float, retry: bool = False) -> Grant:
        granted = self.grant_now(agent, weight, cost_tokens, retry)
        if granted is not None:
            return granted
        queue = self.queues.setdefault(agent, deque())
        if not waiting(queue):
            self.counters[agent] = max(self.counters.get(agent, 0.0), self.backlogged_floor())
        ticket = Ticket(agent, -1 if retry else priority, cost_tokens, weight, next(self._seq),
                        asyncio.get_running_loop().create_future(), time.monotonic())
        queue.append(ticket)
        self.depth += 1
        self.queued[agent] = self.queued.get(agent, 0) + 1
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

    def check_room(self, agent: str) -> None:
        if self.depth >= self.queue_max:
            raise QueueFull()
        if self.queued.get(agent, 0) >= self.agent_queue_max:
            raise AgentQueueFull()

    def dequeued(self, agent: str) -> None:
        self.depth -= 1
        self.queued[agent] -= 1

    def backlogged_floor(self) -> float:
        """The smallest counter among agents with a request waiting, else the last one served."""
        counters = [self.counters[a] for a, q in self.queues.items() if waiting(q)]
        return min(counters) if counters else self.floor

    def withdraw(self, ticket: Ticket) -> None:
        """A waiter gave up: drop its ticket, or hand back the slot it was granted meanwhile."""
        ticket.cancelled = True
        if not ticket.future.done():
            self.dequeued(ticket.agent)
            ticket.future.cancel()
        elif not ticket.future.cancelled():
            self.release(ticket.future.result())

    def charge(self, agent: str, weight: float, tokens: float) -> None:
        self.counters[agent] = self.counters.get(agent, 0.0) + tokens / weight

    def settle(self, agent: str, weight: float, charged: float, actual: float) -> None:
        """Charge the agent for the tokens it really used instead of what it was charged so far."""
        self.counters[agent] = self.counters.get(agent, 0.0) + (actual - charged) / weight
        self.served_tokens[agent] = self.served_tokens.get(agent, 0.0) + actual

    def release(self, backend: Backend) -> None:
        backend.outstanding -= 1
        if self.depth:
            self.dispatch()

    def next_ticket(self) -> Ticket | None:
        best: Ticket | None = None
        best_key: tuple[int, float, int] | None = None
        for agent, queue in self.queues.items():
            if waiting(queue):
                key = (queue[0].priority, self.counters[agent], queue[0].seq)
                if best_key is None or key < best_key:
                    best, best_key = queue[0], key
        return best

    def dispatch(self) -> None:
        while self.depth:
            backend = self.pool.pick()
            if backend is None:
                return
            ticket = self.next_ticket()
            if ticket is None:
                return
            self.queues[ticket.agent].popleft()
            self.dequeued(ticket.agent)
            self.floor = self.counters[ticket.agent]
            self.counters[ticket.agent] += ticket.cost / ticket.weight
            backend.outstanding += 1
            ticket.future.set_result(backend)
