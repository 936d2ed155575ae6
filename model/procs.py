"""Detached server processes: launch, readiness, identity (pid + start time) and stop."""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from dgxready.errors import DgxReadyError


class ServerFailed(DgxReadyError):
    pass


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def proc_start_time(pid: int) -> int | None:
    """Kernel start time of `pid`, so a recycled pid is never mistaken for our server."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def is_running(pid: int, start_time: int | None) -> bool:
    current = proc_start_time(pid)
    if current is None:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z" and (start_time is None or current == start_time)


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


def launch(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)


def wait_ready(proc: subprocess.Popen, base_url: str, log: Path, timeout_s: float) -> None:
    """Ready means /health answers 200 and /v1/models lists a model."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerFailed(f"the server exited with code {proc.returncode} before it was "
                                   f"ready; last lines of {log}:\n{log_tail(log)}")
            try:
                if (client.get(f"{base_url}/health").status_code == 200
                        and client.get(f"{base_url}/v1/models").status_code == 200):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
    terminate(proc.pid, None)
    raise ServerFailed(f"the server was not ready within {timeout_s:.0f} s and was stopped; "
                       f"last lines of {log}:\n{log_tail(log)}")


def terminate(pid: int, start_time: int | None, grace_s: float = 10.0) -> bool:
    """SIGTERM the server's process group, then SIGKILL; True if it was running."""
    if not is_running(pid, start_time):
        return False
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if not is_running(pid, start_time):
                return True
            time.sleep(0.1)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
