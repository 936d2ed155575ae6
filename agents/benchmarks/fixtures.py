"""What the multiplexer's bar benchmarks share: the Bar record, and starting the processes they
measure (the instant backend, a multiplexer on a throw-away config, the bare pass-through proxy)."""
from __future__ import annotations

import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from agents.config import AgentIdentity, KeysFile, write_keys
from dgxready.ports import free_port
from dgxready.roles import ROLE_ORDER

# Fairness is measured inside one priority class: six agents of one role (equal weight and
# priority); priority classes between roles are strict by design.
EQUAL_WEIGHT = tuple(f"peer-{i}" for i in range(1, 6))
FLOODER = "flood-1"
PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class Bar:
    """A measured figure against its bound. One without a bound is context; one whose condition
    this machine cannot provide carries the reason in `not_applicable` and no verdict."""
    name: str
    value: float
    bound: float | None
    higher_is_better: bool
    detail: str
    part: str = ""
    not_applicable: str | None = None

    @property
    def met(self) -> bool | None:
        if self.bound is None or self.not_applicable:
            return None
        return self.value >= self.bound if self.higher_is_better else self.value <= self.bound

    @property
    def verdict(self) -> str:
        if self.not_applicable:
            return "n/a"
        return "context" if self.met is None else "met" if self.met else "MISSED"


def wait_http(url: str, timeout: float = 60, what: str = "") -> None:
    """Polls until `url` answers 200; prints a line every PROGRESS_EVERY_S while waiting."""
    started = time.monotonic()
    said = started
    while time.monotonic() - started < timeout:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if what and time.monotonic() - said >= PROGRESS_EVERY_S:
            said = time.monotonic()
            print(f"  waiting for {what} ({said - started:.0f} s)", flush=True)
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f} s")


def spawn(args: list[str], health: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL)
    wait_http(health)
    return proc


def mux_config(tmp: Path, port: int, backend_url: str, cap: int, keys_path: Path, kind: str = "openai") -> dict:
    """A throw-away multiplexer config with one backend `b`, no rate limits and a deep queue."""
    return {"port": port, "keys_file": str(keys_path), "state_db": str(tmp / f"mux-{port}.db"),
            "rate_limits": False, "queue_max": 4096, "health_interval_s": 5,
            "backends": [{"name": "b", "url": backend_url, "max_concurrency": cap, "kind": kind}]}


def spawn_mux(tmp: Path, backend_url: str, cap: int, keys_path: Path, kind: str = "openai"
              ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = tmp / f"mux-{port}.yaml"
    cfg.write_text(yaml.safe_dump(mux_config(tmp, port, backend_url, cap, keys_path, kind)))
    url = f"http://127.0.0.1:{port}"
    return spawn(["agents.service", "--config", str(cfg)], f"{url}/health"), url


def spawn_instant(args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return spawn(["agents.benchmarks.instant_backend", "--port", str(port), *args], f"{url}/health"), url


def spawn_passthrough(upstream: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return spawn(["agents.benchmarks.passthrough", "--port", str(port), "--upstream", upstream],
                 f"{url}/health"), url


def write_bench_keys(path: Path) -> KeysFile:
    """The team's keys plus six agents of one role for the fairness runs."""
    team = write_keys(path, 10, ROLE_ORDER)
    peers = [AgentIdentity(name=n, role="architect-systems", key=f"bench-{n}-{secrets.token_hex(12)}")
             for n in (*EQUAL_WEIGHT, FLOODER)]
    keys = KeysFile(agents=team.agents + peers)
    path.write_text(yaml.safe_dump(keys.model_dump(mode="json"), sort_keys=False))
    return keys


def key_of(keys: KeysFile, name: str) -> str:
    return next(a.key for a in keys.agents if a.name == name)


def stop(*procs: subprocess.Popen | None) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.terminate()
    for proc in procs:
        if proc is not None:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
