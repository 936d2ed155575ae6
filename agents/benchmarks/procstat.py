"""CPU time of processes, read from /proc: user + system time of a process and its children
(/proc/<pid>/stat, in clock ticks), and the nanosecond run time of a process's threads
(/proc/<pid>/task/*/schedstat) for windows too short for clock ticks. Linux only."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class StatFields:
    """The fields of /proc/<pid>/stat that CPU accounting needs, in seconds."""
    pid: int
    ppid: int
    utime: float
    stime: float
    cutime: float
    cstime: float

    @property
    def own(self) -> float:
        return self.utime + self.stime

    @property
    def reaped_children(self) -> float:
        return self.cutime + self.cstime


def parse_stat(text: str) -> StatFields:
    """One /proc/<pid>/stat line. The command name, in parentheses, may hold spaces and ')',
    so the fields are counted from the last ')'."""
    head, rest = text.rsplit(")", 1)
    pid = int(head.split("(", 1)[0])
    f = rest.split()
    # f[0] is field 3 (state): ppid is field 4, utime 14, stime 15, cutime 16, cstime 17.
    ticks = [int(x) / CLK_TCK for x in f[11:15]]
    return StatFields(pid, int(f[1]), *ticks)


def read_stat(pid: int, proc: Path = PROC) -> StatFields | None:
    try:
        return parse_stat((proc / str(pid) / "stat").read_text())
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return None


def all_stats(proc: Path = PROC) -> list[StatFields]:
    stats = (read_stat(int(p.name), proc) for p in proc.iterdir() if p.name.isdigit())
    return [s for s in stats if s is not None]


def descendants(pid: int, stats: list[StatFields]) -> list[StatFields]:
    children: dict[int, list[StatFields]] = {}
    for s in stats:
        children.setdefault(s.ppid, []).append(s)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


def tree_cpu_seconds(pid: int, proc: Path = PROC) -> float:
    """utime + stime of the process, of its live descendants, and of the children it has reaped."""
    root = read_stat(pid, proc)
    if root is None:
        raise ProcessLookupError(pid)
    return root.own + root.reaped_children + sum(s.own for s in descendants(pid, all_stats(proc)))


def run_ns(pid: int, proc: Path = PROC) -> int:
    """Nanoseconds the process's live threads have run (the first field of each schedstat)."""
    total = 0
    for task in (proc / str(pid) / "task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def loadavg(proc: Path = PROC) -> tuple[float, float, float]:
    one, five, fifteen = (proc / "loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)
