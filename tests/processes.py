"""Processes a test starts, and everything they start, killed when the test ends, passed or not."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

from model.procs import proc_start_time

WATCH_INTERVAL_S = 0.25


def children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, parents first."""
    children, tree = children_by_parent(), [pid]
    for parent in tree:
        tree += children.get(parent, [])
    return tree


def signal_if_same(pid: int, start_time: int | None, sig: signal.Signals) -> None:
    if start_time is not None and proc_start_time(pid) == start_time:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_tree(pid: int, start_time: int | None) -> None:
    """SIGKILL `pid` (if it is still the process that started at `start_time`) and its descendants,
    including those in sessions of their own. SIGSTOP freezes the tree first, so nothing forks past us."""
    frozen: dict[int, int | None] = {pid: start_time}
    signal_if_same(pid, start_time, signal.SIGSTOP)
    if proc_start_time(pid) != start_time:
        return
    while unseen := [p for p in process_tree(pid) if p not in frozen]:
        for p in unseen:
            frozen[p] = proc_start_time(p)
            signal_if_same(p, frozen[p], signal.SIGSTOP)
    for p, started in frozen.items():
        signal_if_same(p, started, signal.SIGKILL)


class ProcessTracker:
    """Starts or adopts Popen objects. A watcher notes every descendant it sees, so one whose parent
    died (a remote command whose SSH session closed, now a child of init) is still found at the end."""

    def __init__(self) -> None:
        self.roots: list[tuple[subprocess.Popen, int | None]] = []
        self.seen: set[tuple[int, int | None]] = set()
        self.stopping = threading.Event()
        self.watcher = threading.Thread(target=self.watch, name="process-tracker", daemon=True)

    def start(self, argv: list[str], **popen_kwargs) -> subprocess.Popen:
        return self.track(subprocess.Popen(argv, **popen_kwargs))

    def track(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.roots.append((proc, proc_start_time(proc.pid)))
        self.note_descendants()
        if not self.watcher.is_alive():
            self.watcher.start()
        return proc

    def watch(self) -> None:
        while not self.stopping.wait(WATCH_INTERVAL_S):
            self.note_descendants()

    def note_descendants(self) -> None:
        for proc, start_time in list(self.roots):
            if proc_start_time(proc.pid) == start_time:
                self.seen.update((pid, proc_start_time(pid)) for pid in process_tree(proc.pid))

    def stop_all(self) -> None:
        self.stopping.set()
        if self.watcher.is_alive():
            self.watcher.join()
        self.note_descendants()
        for proc, start_time in self.roots:
            kill_tree(proc.pid, start_time)
        for pid, start_time in self.seen:
            kill_tree(pid, start_time)
        for proc, _ in self.roots:
            proc.wait(timeout=30)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream:
                    stream.close()
