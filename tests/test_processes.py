"""The `processes` fixture's cleanup: a tracked process's whole tree goes, even children that left its
session (as llama-server does when bench.all starts it) and children whose parent died first (as a
remote bench.all does when its SSH session closes)."""
import subprocess
import time
from pathlib import Path

from tests.processes import ProcessTracker, process_tree

DETACHED_GRANDCHILD = "setsid sleep 300 & echo $!; sleep 300"
ORPHANED_GRANDCHILD = "bash -c 'sleep 300 & echo $!; sleep 1'; sleep 300"


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def grandchild_of(tracker: ProcessTracker, script: str) -> tuple[subprocess.Popen, int]:
    proc = tracker.start(["bash", "-c", script], stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def test_stop_all_kills_a_tracked_process_and_its_detached_grandchild():
    tracker = ProcessTracker()
    proc, grandchild = grandchild_of(tracker, DETACHED_GRANDCHILD)
    assert wait_until(lambda: grandchild in process_tree(proc.pid))
    tracker.stop_all()
    assert proc.returncode is not None
    assert wait_until(lambda: not alive(grandchild))


def test_stop_all_kills_a_grandchild_whose_parent_exited_before_the_end():
    tracker = ProcessTracker()
    proc, grandchild = grandchild_of(tracker, ORPHANED_GRANDCHILD)
    assert wait_until(lambda: grandchild not in process_tree(proc.pid))  # its parent is gone
    assert alive(grandchild)
    tracker.stop_all()
    assert wait_until(lambda: not alive(grandchild))


def test_stop_all_leaves_alone_a_process_that_already_exited():
    tracker = ProcessTracker()
    proc = tracker.start(["true"])
    proc.wait()
    tracker.stop_all()
    assert proc.returncode == 0
