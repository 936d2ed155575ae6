"""The multiplexer's bars, measured side by side with direct calls in one run:
- overhead: against the instant-reply backend at 64 concurrent streams (closed loop, direct and
  multiplexed runs alternating), the multiplexer adds <= 1 ms p50 and <= 5 ms p99 E2E latency,
  and keeps >= 80% of direct request throughput. Context, without a bound: the CPU each process
  spends per request (from /proc), and the same comparison on streams that decode at 50 tok/s;
- serving: against llama-server with 10 agents, output tokens/s through the multiplexer is
  >= 95% of the same load sent directly;
- fairness: with one agent flooding, the other agents' p95 queue wait stays within 2x of what
  they see without it; over equal-weight agents, Jain's index on served tokens is >= 0.9."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from agents.config import AgentIdentity, KeysFile, write_keys
from bench.loadgen import Endpoint, closed_loop
from bench.metrics import compute_metrics
from bench.workloads import SyntheticWorkload
from dgxready.ports import free_port
from dgxready.roles import ROLE_ORDER
from model.running import running_model

# Fairness is measured inside one priority class: six agents of one role (equal weight and
# priority); priority classes between roles are strict by design.
EQUAL_WEIGHT = tuple(f"peer-{i}" for i in range(1, 6))
FLOODER = "flood-1"
SERVING_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Bar:
    """A measured figure; one without a bound is context for the bars."""
    name: str
    value: float
    bound: float | None
    higher_is_better: bool
    detail: str

    @property
    def met(self) -> bool | None:
        if self.bound is None:
            return None
        return self.value >= self.bound if self.higher_is_better else self.value <= self.bound


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def spawn(args: list[str], health: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL)
    wait_http(health)
    return proc


def spawn_mux(tmp: Path, backend_url: str, cap: int, keys_path: Path, kind: str = "openai"
              ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = tmp / f"mux-{port}.yaml"
    cfg.write_text(yaml.safe_dump({
        "port": port, "keys_file": str(keys_path), "state_db": str(tmp / f"mux-{port}.db"),
        "rate_limits": False, "queue_max": 4096, "health_interval_s": 5,
        "backends": [{"name": "b", "url": backend_url, "max_concurrency": cap, "kind": kind}]}))
    url = f"http://127.0.0.1:{port}"
    return spawn(["agents.service", "--config", str(cfg)], f"{url}/health"), url


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


@dataclass
class Side:
    """One side (direct or through the multiplexer) of the overhead comparison."""
    records: list = field(default_factory=list)
    sent: int = 0
    rps: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=lambda: {"loadgen": 0.0, "backend": 0.0, "mux": 0.0})

    @property
    def metrics(self):
        return compute_metrics(self.records)

    @property
    def median_rps(self) -> float:
        return float(np.median(self.rps))

    def cpu_us_per_request(self, part: str) -> float:
        return self.cpu_s[part] / max(1, self.sent) * 1e6


def compare(urls: dict[str, str], pids: dict[str, int], key: str, wl: SyntheticWorkload,
            requests: int, rounds: int, streams: int = 64) -> dict[str, Side]:
    """Closed loops of 64 streams, direct and multiplexed runs alternating, CPU counted per process.
    Each stream's first request is left out: all 64 start at once, a burst that steady state lacks."""
    sides = {label: Side() for label in urls}
    for r in range(rounds):
        for label in (list(urls) if r % 2 == 0 else list(reversed(urls))):
            ep = Endpoint(urls[label], "instant", api_key=key)
            before = {part: cpu_seconds(pid) for part, pid in pids.items()}
            records = asyncio.run(closed_loop(ep, wl, streams, requests + streams))
            for part, pid in pids.items():
                sides[label].cpu_s[part] += cpu_seconds(pid) - before[part]
            sides[label].sent += len(records)
            steady = sorted(records, key=lambda rec: rec.sent_at)[streams:]
            sides[label].records += steady
            sides[label].rps.append(compute_metrics(steady).request_throughput)
    return sides


def spawn_instant(args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return spawn(["agents.benchmarks.instant_backend", "--port", str(port), *args], f"{url}/health"), url


def on_own_core(pids: dict[str, int], run) -> dict[str, Side] | None:
    """Run with the multiplexer pinned to the last core and everything else to the others, as on
    a host where it has a core of its own; None on a single-core machine."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    rest = set(cores[:-1])
    for part, pid in pids.items():
        os.sched_setaffinity(pid, {cores[-1]} if part == "mux" else rest)
    try:
        return run()
    finally:
        for pid in pids.values():
            os.sched_setaffinity(pid, set(cores))


def own_core_bars(sides: dict[str, Side] | None) -> list[Bar]:
    if sides is None:
        return []
    m = {label: side.metrics for label, side in sides.items()}
    rps = {label: side.median_rps for label, side in sides.items()}
    detail = (f"the multiplexer pinned to a core of its own, the load generator and the backend to the "
              f"rest; direct p50 {m['direct'].e2el.p50 * 1e3:.2f} ms p99 {m['direct'].e2el.p99 * 1e3:.2f} ms, "
              f"mux p50 {m['mux'].e2el.p50 * 1e3:.2f} ms p99 {m['mux'].e2el.p99 * 1e3:.2f} ms; direct "
              f"{rps['direct']:.0f} req/s, mux {rps['mux']:.0f} req/s")
    return [
        Bar("own core: overhead p50 (ms) at 64 streams", (m["mux"].e2el.p50 - m["direct"].e2el.p50) * 1e3, None,
            False, detail),
        Bar("own core: overhead p99 (ms) at 64 streams", (m["mux"].e2el.p99 - m["direct"].e2el.p99) * 1e3, None,
            False, detail),
        Bar("own core: request throughput vs direct", rps["mux"] / rps["direct"], None, True, detail),
    ]


def overhead(tmp: Path, keys: KeysFile, keys_path: Path, requests: int, rounds: int) -> list[Bar]:
    key = key_of(keys, "developer-1")
    wl = SyntheticWorkload(input_words=(4, 8), output_tokens=(3, 3), system_prompt="Be brief.")
    backend, backend_url = spawn_instant([])
    paced, paced_url = spawn_instant(["--tokens", "16", "--token-interval-ms", "20"])
    mux, mux_url = spawn_mux(tmp, backend_url, 256, keys_path)
    paced_mux, paced_mux_url = spawn_mux(tmp, paced_url, 256, keys_path)
    try:
        pids = {"loadgen": os.getpid(), "backend": backend.pid, "mux": mux.pid}
        sides = compare({"direct": backend_url, "mux": mux_url}, pids, key, wl, requests, rounds)
        own_core = on_own_core(pids, lambda: compare({"direct": backend_url, "mux": mux_url}, pids, key, wl,
                                                     requests, rounds))
        paced_sides = compare({"direct": paced_url, "mux": paced_mux_url},
                              {"loadgen": os.getpid(), "backend": paced.pid, "mux": paced_mux.pid},
                              key, wl, 1280, 2)
    finally:
        for proc in (mux, paced_mux, backend, paced):
            proc.terminate()
    m = {label: side.metrics for label, side in sides.items()}
    pm = {label: side.metrics for label, side in paced_sides.items()}
    rps = {label: side.median_rps for label, side in sides.items()}
    failed = sum(x.failed for x in (*m.values(), *pm.values()))
    cpu = {part: sides["mux"].cpu_us_per_request(part) for part in ("loadgen", "backend", "mux")}
    ms = lambda d: f"{d * 1e3:.2f} ms"  # noqa: E731
    detail = (f"{rounds} alternating runs of {requests} requests a side, {os.cpu_count()} cores shared by "
              f"the load generator, the backend and the multiplexer; direct p50 {ms(m['direct'].e2el.p50)}, "
              f"mux p50 {ms(m['mux'].e2el.p50)}; direct p99 {ms(m['direct'].e2el.p99)}, mux p99 "
              f"{ms(m['mux'].e2el.p99)}; {failed} failed")
    return [
        Bar("overhead p50 (ms) at 64 streams", (m["mux"].e2el.p50 - m["direct"].e2el.p50) * 1e3, 1.0, False,
            detail),
        Bar("overhead p99 (ms) at 64 streams", (m["mux"].e2el.p99 - m["direct"].e2el.p99) * 1e3, 5.0, False,
            detail),
        Bar("request throughput vs direct", rps["mux"] / rps["direct"], 0.80, True,
            f"direct {rps['direct']:.0f} req/s, mux {rps['mux']:.0f} req/s (medians of the runs)"),
        Bar("CPU per request, multiplexer (µs)", cpu["mux"], None, False,
            f"load generator {cpu['loadgen']:.0f} µs, instant backend {cpu['backend']:.0f} µs, multiplexer "
            f"{cpu['mux']:.0f} µs per request, user + system time from /proc over the multiplexed runs"),
        *own_core_bars(own_core),
        Bar("paced streams: TTFT overhead p50 (ms)", (pm["mux"].ttft.p50 - pm["direct"].ttft.p50) * 1e3, None,
            False, f"64 streams of 16 tokens at 50 tok/s; direct TTFT p50 {ms(pm['direct'].ttft.p50)} p99 "
            f"{ms(pm['direct'].ttft.p99)}, mux TTFT p50 {ms(pm['mux'].ttft.p50)} p99 {ms(pm['mux'].ttft.p99)}"),
        Bar("paced streams: E2E overhead p50 (ms)", (pm["mux"].e2el.p50 - pm["direct"].e2el.p50) * 1e3, None,
            False, f"direct E2E p50 {ms(pm['direct'].e2el.p50)} p99 {ms(pm['direct'].e2el.p99)}, mux E2E p50 "
            f"{ms(pm['mux'].e2el.p50)} p99 {ms(pm['mux'].e2el.p99)}"),
    ]


def serving(tmp: Path, keys: KeysFile, keys_path: Path, requests: int) -> list[Bar]:
    with running_model(SERVING_MODEL, backend="llamacpp", parallel=10, ctx_per_slot=2048) as model:
        direct_url = model.base_url
        mux, mux_url = spawn_mux(tmp, direct_url, 10, keys_path, kind="llamacpp")
        try:
            # Fresh prompts for every run (seeds differ), so llama-server's prompt cache favours neither.
            tps: dict[str, list[float]] = {"direct": [], "mux": []}
            failed = 0
            for r, order in enumerate((("direct", "mux"), ("mux", "direct")) * 2):
                for label in order:
                    url = direct_url if label == "direct" else mux_url
                    wl = SyntheticWorkload(seed=100 + 10 * r + len(tps[label]) + (label == "mux") * 50,
                                           input_words=(32, 96), output_tokens=(64, 64),
                                           system_prompt="You are a helpful assistant.")
                    ep = Endpoint(url, SERVING_MODEL, api_key=key_of(keys, "developer-1"))
                    m = compute_metrics(asyncio.run(closed_loop(ep, wl, 10, requests, warmup=10)))
                    tps[label].append(m.output_throughput)
                    failed += m.failed
        finally:
            mux.terminate()
    d, x = float(np.mean(tps["direct"])), float(np.mean(tps["mux"]))
    return [Bar("llama-server output tok/s vs direct (10 agents)", x / d, 0.95, True,
                f"direct {d:.1f} tok/s, mux {x:.1f} tok/s (4 alternating rounds); failed {failed}")]


async def agent_loop(client, url, key, workers, until, waits, served) -> None:
    async def worker():
        while time.monotonic() < until:
            r = await client.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "m", "max_tokens": 128,
                                        "messages": [{"role": "user", "content": "x"}]})
            if r.status_code == 200:
                waits.append(float(r.headers["x-dgxready-queue-ms"]))
                served.append(r.json()["usage"]["completion_tokens"])

    await asyncio.gather(*(worker() for _ in range(workers)))


def run_agents(url: str, keys: KeysFile, plan: dict[str, int], seconds: float) -> dict[str, tuple]:
    results = {name: ([], []) for name in plan}

    async def run():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=256)) as client:
            until = time.monotonic() + seconds
            await asyncio.gather(*(agent_loop(client, url, key_of(keys, n), w, until, *results[n])
                                   for n, w in plan.items()))

    asyncio.run(run())
    return results


def fairness(tmp: Path, keys: KeysFile, keys_path: Path, seconds: float) -> list[Bar]:
    backend, backend_url = spawn_instant(["--service-ms", "20"])
    mux, url = spawn_mux(tmp, backend_url, 4, keys_path)
    try:
        calm = {n: 2 for n in EQUAL_WEIGHT}
        base = run_agents(url, keys, calm, seconds)
        flood = run_agents(url, keys, calm | {FLOODER: 48}, seconds)
        backlog = run_agents(url, keys, {n: 8 for n in EQUAL_WEIGHT}, seconds)
    finally:
        mux.terminate()
        backend.terminate()
    p95 = lambda res: float(np.percentile([w for n in EQUAL_WEIGHT for w in res[n][0]], 95))  # noqa: E731
    tokens = np.array([sum(backlog[n][1]) for n in EQUAL_WEIGHT], dtype=float)
    jain = float(tokens.sum() ** 2 / (len(tokens) * (tokens ** 2).sum()))
    flood_share = sum(flood[FLOODER][1]) / max(1, sum(sum(v[1]) for v in flood.values()))
    return [
        Bar("others' p95 queue wait: flood / calm", p95(flood) / max(p95(base), 1e-3), 2.0, False,
            f"calm p95 {p95(base):.1f} ms, with a 48-stream flood {p95(flood):.1f} ms; the flooder got "
            f"{flood_share:.0%} of tokens"),
        Bar("Jain's index, 5 equal-weight backlogged agents", jain, 0.9, True,
            "served tokens " + ", ".join(f"{int(t)}" for t in tokens)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("overhead", "serving", "fairness", "all"), default="all",
                        help="which bar to measure")
    parser.add_argument("--requests", type=int, default=4000, help="requests per overhead run")
    parser.add_argument("--rounds", type=int, default=4, help="alternating direct/mux overhead runs")
    parser.add_argument("--serving-requests", type=int, default=30, help="requests per serving run")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each fairness phase")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mux-bars-"))
    keys_path = tmp / "keys.yaml"
    keys = write_bench_keys(keys_path)
    bars: list[Bar] = []
    if args.part in ("overhead", "all"):
        bars += overhead(tmp, keys, keys_path, args.requests, args.rounds)
    if args.part in ("fairness", "all"):
        bars += fairness(tmp, keys, keys_path, args.seconds)
    if args.part in ("serving", "all"):
        bars += serving(tmp, keys, keys_path, args.serving_requests)
    table = Table(title="multiplexer bars")
    for col in ("bar", "value", "bound", "", "detail"):
        table.add_column(col)
    for b in bars:
        bound = "" if b.bound is None else ("≥ " if b.higher_is_better else "≤ ") + f"{b.bound:g}"
        verdict = "context" if b.met is None else "[green]met" if b.met else "[red]MISSED"
        table.add_row(b.name, f"{b.value:.3f}", bound, verdict, b.detail)
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps([asdict(b) | {"met": b.met} for b in bars], indent=2))
    return 0 if all(b.met is not False for b in bars) else 1


if __name__ == "__main__":
    sys.exit(main())
