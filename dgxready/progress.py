"""The shared consoles and progress displays: rich bars on a terminal; in a log or a pipe, whole
lines (no 80-column cut) and a plain progress line per task at least every PLAIN_INTERVAL_S
(DGXREADY_PROGRESS_INTERVAL_S, default 10 s)."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

# Wide enough that no table of ours is squeezed; plain text is never wrapped at all (soft_wrap).
PLAIN_WIDTH = 1000
PLAIN_INTERVAL_S = float(os.environ.get("DGXREADY_PROGRESS_INTERVAL_S", "10"))


def make_console(stderr: bool = False) -> Console:
    """A terminal gets rich's usual console; anything else gets whole lines."""
    if Console(stderr=stderr).is_terminal:
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=PLAIN_WIDTH, soft_wrap=True)


console = make_console(stderr=True)


def new_table(out: Console, title: str) -> Table:
    """Box-drawn on a terminal; in a log, a markdown-style table that grep and diff read well."""
    return Table(title=title, box=box.HEAVY_HEAD if out.is_terminal else box.MARKDOWN)


def elapsed_text(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


@dataclass
class PlainTask:
    description: str
    total: float | None
    completed: float = 0.0
    started_at: float = field(default_factory=time.monotonic)
    printed_at: float = field(default_factory=time.monotonic)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_at

    @property
    def finished(self) -> bool:
        return self.total is not None and self.completed >= self.total


def percent_text(task: PlainTask) -> str:
    return f"{100 * task.completed / task.total:.0f}%" if task.total else count_text(task)


def count_text(task: PlainTask) -> str:
    if task.total is None:
        return f"{task.completed:g} done" if task.completed else "running"
    return f"{task.completed:g}/{task.total:g}"


def bytes_text(task: PlainTask) -> str:
    total = f" of {megabytes(task.total)}" if task.total else ""
    speed = task.completed / task.elapsed_s if task.elapsed_s > 0 else 0.0
    return f"{megabytes(task.completed)}{total}, {megabytes(speed)}/s"


class PlainProgress:
    """The part of rich's Progress that our code uses, printed as plain lines: a line per running
    task at most and at least every `interval_s`, so a silent step (a long compile, a slow
    request) still shows it is alive. The callers print what a finished task gave."""

    def __init__(self, out: Console, amount: Callable[[PlainTask], str],
                 interval_s: float = PLAIN_INTERVAL_S):
        self.out = out
        self.amount = amount
        self.interval_s = interval_s
        self.tasks: dict[int, PlainTask] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.heartbeat = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> PlainProgress:
        self.heartbeat.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stopped.set()
        self.heartbeat.join()

    def add_task(self, description: str, total: float | None = 100.0, **_: Any) -> int:
        with self.lock:
            task_id = len(self.tasks)
            self.tasks[task_id] = PlainTask(description, total)
        return task_id

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **_: Any) -> None:
        with self.lock:
            task = self.tasks[task_id]
            task.total = task.total if total is None else total
            task.completed = task.completed if completed is None else completed
            task.completed += advance or 0
            task.description = description or task.description
            if self._due(task):
                self._show(task)

    def remove_task(self, task_id: int) -> None:
        with self.lock:
            del self.tasks[task_id]

    def _due(self, task: PlainTask) -> bool:
        return not task.finished and time.monotonic() - task.printed_at >= self.interval_s

    def _show(self, task: PlainTask) -> None:
        task.printed_at = time.monotonic()
        self.out.print(f"{task.description}: {self.amount(task)} ({elapsed_text(task.elapsed_s)})",
                       markup=False, highlight=False)

    def _beat(self) -> None:
        while not self.stopped.wait(min(1.0, self.interval_s / 4)):
            with self.lock:
                for task in filter(self._due, self.tasks.values()):
                    self._show(task)


AnyProgress = Progress | PlainProgress


def byte_progress() -> AnyProgress:
    if not console.is_terminal:
        return PlainProgress(console, bytes_text)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
    )


def step_progress(percent: bool = False, transient: bool = False) -> AnyProgress:
    """Steps of a known total; `percent` shows them as a percentage in plain lines too."""
    if not console.is_terminal:
        return PlainProgress(console, percent_text if percent else count_text)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
    )


@contextlib.contextmanager
def waiting(description: str) -> Iterator[None]:
    """A spinner on a terminal; in a log, a line saying it still waits at least every interval."""
    if console.is_terminal:
        with console.status(description):
            yield
        return
    with PlainProgress(console, count_text, PLAIN_INTERVAL_S) as progress:
        progress.add_task(description, total=None)
        yield
