"""Turn deadlines over the talk with a backend, watched by one task of the multiplexer instead of a
timer per request. A talk is any object with the attributes of `Talk` (the proxy's turns are).
While the turn awaits the backend (`reading`), a deadline that passes cancels its task, and the
proxy turns that cancellation into a timeout (`timed_out`); while the turn writes to its client,
the deadline only marks the talk `passed`, and the proxy fails its next read. So the turn is never
cancelled in the middle of an answer to its client.

Why not aiohttp's total timeout: its handle, its timer context around every read and the task
lookups they make cost up to about 17 µs a request in the multiplexer on the 2-core VM (a same-run
A/B with the timeout left out: 1.43x against 1.34x the bare proxy's CPU per request at 16 streams;
a second A/B found no difference, which is the noise of this VM); a deadline here is at most
`TICK_S` late."""
from __future__ import annotations

import asyncio
import time
from typing import Protocol

TICK_S = 0.05


class Talk(Protocol):
    deadline: float
    task: asyncio.Task | None
    reading: bool
    passed: bool
    cancelled: bool


class DeadlineWatch:
    def __init__(self) -> None:
        self.talking: set[Talk] = set()

    def begin(self, talk: Talk) -> None:
        talk.task = asyncio.current_task()
        self.talking.add(talk)

    def end(self, talk: Talk) -> None:
        self.talking.discard(talk)

    def expire_due(self, now: float) -> int:
        """Marks the talks whose deadline has passed, cancelling those awaiting their backend."""
        due = [talk for talk in self.talking if talk.deadline <= now]
        for talk in due:
            self.talking.discard(talk)
            talk.passed = True
            if talk.reading and talk.task is not None:
                talk.cancelled = True
                talk.task.cancel()
        return len(due)

    async def run(self, tick_s: float = TICK_S) -> None:
        while True:
            await asyncio.sleep(tick_s)
            self.expire_due(time.monotonic())


def timed_out(talk: Talk) -> bool:
    """After a CancelledError: whether the talk's deadline sent it (the task's cancellation is then
    taken back and the caller raises TimeoutError), or something else did."""
    if not talk.cancelled:
        return False
    talk.cancelled = False
    if talk.task is not None:
        talk.task.uncancel()
    return True
