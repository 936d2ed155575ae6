"""The overhead bars, restated as what a user pays per request. On a machine with fewer cores than
processes, a latency bar at fixed concurrency measures CPU contention, not the multiplexer; the
CPU each proxy spends per request does not depend on how the cores are shared.

Five sides in one run, with the same load generator, the same instant backend and the same
streams, the order of the sides alternating from round to round:
- direct: load generator -> instant backend;
- bare: a pass-through proxy with no logic on the multiplexer's stack (the floor for a Python hop);
- mux: the multiplexer, without sessions;
- mux+session: the multiplexer with a session per stream, kept across rounds, so turns accumulate
  as a long-running agent's do;
- litellm: LiteLLM's proxy, pinned, one worker, one model entry at the instant backend.

CPU per request = (utime + stime of the proxy process and its children, from /proc, over the
round) / requests completed in it. Bars: without sessions <= 1.2x bare at every stream count;
with a session per stream <= 1.5x bare; the 1000th turn of a session costs <= 1.2x its 10th;
the multiplexer <= 0.1x LiteLLM. The latency bars (+1 ms p50, +5 ms p99 over direct at 64
streams) are checked only on a machine with cores enough to pin the load generator, the backend
and the proxy to cores of their own."""
from __future__ import annotations

import asyncio
import os
import platform
import secrets
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from agents.benchmarks.drive import Round, Target, run_round, session_turns
from agents.benchmarks.fixtures import Bar, key_of, spawn_instant, spawn_mux, spawn_passthrough, stop, wait_http
from agents.benchmarks.litellm_peer import LITELLM_VERSION, ensure_litellm, start_litellm
from agents.benchmarks.procstat import loadavg, read_stat, run_ns, tree_cpu_seconds
from agents.config import KeysFile
from bench.metrics import compute_metrics
from bench.workloads import SyntheticWorkload
from dgxready.ports import free_port

PART = "overhead"
DIRECT, BARE, MUX, SESSION, LITELLM = "direct", "bare", "mux", "mux+session", "litellm"
SIDE_NAMES = {DIRECT: "direct", BARE: "bare pass-through", MUX: "multiplexer, no session",
              SESSION: "multiplexer, a session per stream", LITELLM: f"LiteLLM proxy {LITELLM_VERSION}"}
MIN_CORES_FOR_LATENCY = 6
# The bars are stated for the instant backend's 3-token answers; longer ones, streamed a token at a
# time, weigh what each streamed chunk costs, as a model's answers of hundreds of tokens do.
BAR_ANSWER_TOKENS = 3
LITELLM_START_S = 300.0
# Where the turn-cost curve is sampled besides the two compared windows (context for the bar: a
# session's kept turns are bounded, so pruning starts at session_max_turns).
CURVE_TURNS = (10, 50, 100, 150, 200, 500)


@dataclass(frozen=True)
class Settings:
    streams: tuple[int, ...] = (1, 16, 64)
    round_s: float = 6.0
    rounds: int = 4
    warmup_s: float = 1.0
    turns: int = 1000
    turn_sessions: int = 5
    turn_window: int = 5
    litellm: bool = True
    answer_tokens: int = BAR_ANSWER_TOKENS
    token_interval_ms: float = 0.0

    @property
    def workload(self) -> SyntheticWorkload:
        return SyntheticWorkload(input_words=(4, 8), output_tokens=(self.answer_tokens, self.answer_tokens),
                                 system_prompt="Be brief.")

    def backend_args(self) -> list[str]:
        return ["--tokens", str(self.answer_tokens), "--token-interval-ms", str(self.token_interval_ms)]


@dataclass
class Process:
    """One process whose CPU is counted: the proxy of a side, the backend, or the load generator."""
    name: str
    pid: int
    tree: bool = True

    def cpu_s(self) -> float:
        if self.tree:
            return tree_cpu_seconds(self.pid)
        stat = read_stat(self.pid)
        return stat.own if stat else 0.0


@dataclass
class Cell:
    """One side at one stream count, summed over its rounds."""
    side: str
    streams: int
    proxy_cpu_s: float = 0.0
    backend_cpu_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    completed: int = 0
    failed: int = 0
    seconds: float = 0.0
    records: list = field(default_factory=list)
    round_proxy_us: list[float] = field(default_factory=list)

    def add(self, rnd: Round, cpu: dict[str, float], streams: int) -> None:
        self.proxy_cpu_s += cpu.get("proxy", 0.0)
        self.round_proxy_us.append(cpu.get("proxy", 0.0) / max(1, rnd.completed) * 1e6)
        self.backend_cpu_s += cpu["backend"]
        self.loadgen_cpu_s += cpu["loadgen"]
        self.completed += rnd.completed
        self.failed += rnd.failed
        self.seconds += rnd.elapsed_s
        # Each stream's first request is left out of the latencies: all streams start at once,
        # a burst that steady state lacks. CPU and throughput count every request.
        self.records += sorted(rnd.records, key=lambda r: r.sent_at)[streams:]

    def per_request_us(self, cpu_s: float) -> float:
        return cpu_s / max(1, self.completed) * 1e6


@dataclass(frozen=True)
class Row:
    """A line of the table (JSON-ready)."""
    side: str
    streams: int
    requests: int
    failed: int
    req_per_s: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    proxy_cpu_us: float | None
    proxy_cpu_vs_bare: float | None
    backend_cpu_us: float
    loadgen_cpu_us: float
    rounds_proxy_cpu_us: tuple[float, ...] = ()
    rounds_vs_bare: tuple[float, ...] = ()


@dataclass(frozen=True)
class TurnCost:
    """A session's turn cost against its length: the multiplexer's CPU per turn (ns from
    /proc/<pid>/task/*/schedstat between turn starts) in windows around two turn numbers."""
    sessions: int
    turns: int
    early_turns: tuple[int, int]
    late_turns: tuple[int, int]
    early_median_us: float
    late_median_us: float
    early_mean_us: float
    late_mean_us: float
    curve: tuple[tuple[int, float], ...] = ()

    @property
    def ratio(self) -> float:
        return self.late_median_us / self.early_median_us


@dataclass(frozen=True)
class Machine:
    cores: int
    usable_cores: int
    cpu_model: str
    loadavg_start: tuple[float, float, float]
    loadavg_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pinned: dict[str, list[int]] | None = None


@dataclass(frozen=True)
class OverheadResult:
    settings: Settings
    machine: Machine
    table: list[Row]
    turn_cost: TurnCost
    bars: list[Bar]

    def as_json(self) -> dict:
        return {"settings": asdict(self.settings), "machine": asdict(self.machine),
                "table": [asdict(r) for r in self.table],
                "turn_cost": asdict(self.turn_cost) | {"ratio": self.turn_cost.ratio},
                "bars": [asdict(b) | {"met": b.met} for b in self.bars]}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def pin_plan(cores: list[int]) -> dict[str, set[int]] | None:
    """Cores of their own for the proxy under test, the backend and the load generator; None when
    the machine has too few to leave the rest to everything else."""
    if len(cores) < MIN_CORES_FOR_LATENCY:
        return None
    return {"proxy": {cores[0]}, "backend": {cores[1]}, "loadgen": {cores[2]}}


def pin(pids: dict[str, list[int]], plan: dict[str, set[int]]) -> None:
    for role, group in pids.items():
        for pid in group:
            for task in Path(f"/proc/{pid}/task").iterdir():
                os.sched_setaffinity(int(task.name), plan[role])


@dataclass
class Sides:
    """The running processes and how to reach them."""
    targets: dict[str, Target]
    proxies: dict[str, Process]
    backend: Process
    loadgen: Process
    procs: list[subprocess.Popen]
    workload: SyntheticWorkload


def start_litellm_side(tmp: Path, backend_url: str) -> tuple[subprocess.Popen, Target]:
    inst = ensure_litellm()
    port = free_port()
    master_key = f"sk-bench-{secrets.token_hex(16)}"
    proc = start_litellm(inst, backend_url, tmp, port, master_key)
    url = f"http://127.0.0.1:{port}"
    print(f"starting LiteLLM {inst.version} (one worker; its start takes over a minute on 2 cores)", flush=True)
    wait_http(f"{url}/health/liveliness", LITELLM_START_S, "LiteLLM")
    return proc, Target(LITELLM, url, master_key)


def start_sides(tmp: Path, keys: KeysFile, keys_path: Path, settings: Settings) -> Sides:
    key = key_of(keys, "developer-1")
    procs: list[subprocess.Popen] = []
    try:
        backend, backend_url = spawn_instant(settings.backend_args())
        procs.append(backend)
        targets = {DIRECT: Target(DIRECT, backend_url, key)}
        proxies: dict[str, Process] = {}
        if settings.litellm:
            lproc, targets[LITELLM] = start_litellm_side(tmp, backend_url)
            procs.append(lproc)
            proxies[LITELLM] = Process(LITELLM, lproc.pid)
        bare, bare_url = spawn_passthrough(backend_url)
        mux, mux_url = spawn_mux(tmp, backend_url, 256, keys_path)
        smux, smux_url = spawn_mux(tmp, backend_url, 256, keys_path)
        procs += [bare, mux, smux]
        targets |= {BARE: Target(BARE, bare_url, key), MUX: Target(MUX, mux_url, key),
                    SESSION: Target(SESSION, smux_url, key, session_prefix="stream")}
        proxies |= {BARE: Process(BARE, bare.pid), MUX: Process(MUX, mux.pid),
                    SESSION: Process(SESSION, smux.pid)}
    except BaseException:
        stop(*procs)
        raise
    order = [s for s in (DIRECT, BARE, MUX, SESSION, LITELLM) if s in targets]
    return Sides({s: targets[s] for s in order}, proxies, Process("backend", backend.pid),
                 Process("loadgen", os.getpid(), tree=False), procs, settings.workload)


def measured_round(sides: Sides, side: str, streams: int, seconds: float) -> tuple[Round, dict[str, float]]:
    counted = {"backend": sides.backend, "loadgen": sides.loadgen}
    if side in sides.proxies:
        counted["proxy"] = sides.proxies[side]
    before = {k: p.cpu_s() for k, p in counted.items()}
    target = sides.targets[side]
    if target.session_prefix is not None:
        target = Target(side, target.url, target.api_key, session_prefix=f"s{streams}")
    rnd = run_round(target, sides.workload, streams, seconds)
    return rnd, {k: p.cpu_s() - before[k] for k, p in counted.items()}


def run_rounds(sides: Sides, settings: Settings) -> dict[tuple[str, int], Cell]:
    cells: dict[tuple[str, int], Cell] = {}
    labels = list(sides.targets)
    for streams in settings.streams:
        for side in labels:
            measured_round(sides, side, streams, settings.warmup_s)
        for r in range(settings.rounds):
            for side in labels if r % 2 == 0 else labels[::-1]:
                rnd, cpu = measured_round(sides, side, streams, settings.round_s)
                cell = cells.setdefault((side, streams), Cell(side, streams))
                cell.add(rnd, cpu, streams)
                per_req = cpu.get("proxy", 0.0) / max(1, rnd.completed) * 1e6
                proxy = f", proxy {per_req:.0f} µs/req" if "proxy" in cpu else ""
                print(f"  {streams:>3} streams, round {r + 1}/{settings.rounds}, {side:<11}: "
                      f"{rnd.completed / rnd.elapsed_s:7.0f} req/s{proxy}, {rnd.failed} failed", flush=True)
    return cells


def round_figures(cell: Cell, bare: Cell | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-round proxy CPU per request, and its ratio to the bare proxy's in the same round (the two
    ran back to back), to show the spread that the pooled figure hides."""
    if cell.side == DIRECT:
        return (), ()
    pairs = zip(cell.round_proxy_us, bare.round_proxy_us, strict=True) if bare else ()
    return tuple(cell.round_proxy_us), tuple(c / b for c, b in pairs if b)


def table_rows(cells: dict[tuple[str, int], Cell]) -> list[Row]:
    rows = []
    for (side, streams), cell in cells.items():
        bare = cells.get((BARE, streams))
        proxy_us = cell.per_request_us(cell.proxy_cpu_s) if side != DIRECT else None
        bare_us = bare.per_request_us(bare.proxy_cpu_s) if bare else None
        m = compute_metrics(cell.records)
        ok = m.e2el is not None
        rows.append(Row(side, streams, cell.completed, cell.failed, cell.completed / cell.seconds,
                        m.e2el.p50 * 1e3 if ok else float("nan"), m.e2el.p99 * 1e3 if ok else float("nan"),
                        proxy_us, proxy_us / bare_us if proxy_us is not None and bare_us else None,
                        cell.per_request_us(cell.backend_cpu_s), cell.per_request_us(cell.loadgen_cpu_s),
                        *round_figures(cell, bare)))
    return sorted(rows, key=lambda r: (r.streams, list(SIDE_NAMES).index(r.side)))


def turn_cost(sides: Sides, settings: Settings) -> TurnCost:
    """Fresh sessions on the session-keeping multiplexer, each driven to the last turn of the late
    window; the median of the per-turn CPU in each window over all sessions."""
    w = settings.turn_window
    early = (max(1, 10 - w), 10 + w)
    late = (settings.turns - w, settings.turns + w)
    pid = sides.proxies[SESSION].pid
    target = sides.targets[SESSION]
    per_turn: list[list[int]] = []
    for k in range(settings.turn_sessions):
        started = time.monotonic()

        def progress(turn: int, k: int = k, started: float = started) -> None:
            if turn % 250 == 0:
                print(f"  session {k + 1}/{settings.turn_sessions}: turn {turn}/{late[1]} "
                      f"({time.monotonic() - started:.0f} s)", flush=True)

        session = f"turncost-{k}-{secrets.token_hex(4)}"
        per_turn.append(asyncio.run(session_turns(target, sides.workload, late[1], session, lambda: run_ns(pid),
                                                  progress)))
    costs = np.array(per_turn, dtype=float) / 1e3
    e, lt = window(costs, early), window(costs, late)
    points = [t for t in CURVE_TURNS if t < settings.turns]
    curve = tuple((t, float(np.median(window(costs, (t - w, t + w))))) for t in points)
    curve += ((settings.turns, float(np.median(lt))),)
    print("  median CPU per turn around turn " + ", ".join(f"{t}: {us:.0f} µs" for t, us in curve), flush=True)
    return TurnCost(settings.turn_sessions, late[1], early, late, float(np.median(e)), float(np.median(lt)),
                    float(e.mean()), float(lt.mean()), curve)


def window(costs: np.ndarray, turns: tuple[int, int]) -> np.ndarray:
    """Per-turn costs of turns first..last (1-based, inclusive), over all sessions."""
    return costs[:, turns[0] - 1:turns[1]].ravel()


def row_of(rows: list[Row], side: str, streams: int) -> Row | None:
    return next((r for r in rows if r.side == side and r.streams == streams), None)


def ratio_bar(rows: list[Row], side: str, streams: int, bound: float) -> Bar | None:
    row, bare = row_of(rows, side, streams), row_of(rows, BARE, streams)
    if row is None or bare is None or row.proxy_cpu_vs_bare is None:
        return None
    return Bar(f"CPU/request, {SIDE_NAMES[side]} vs bare, {streams} stream{'s' * (streams > 1)}",
               row.proxy_cpu_vs_bare, bound, False,
               f"{row.proxy_cpu_us:.0f} µs vs bare {bare.proxy_cpu_us:.0f} µs per request (rounds "
               f"{min(row.rounds_vs_bare):.2f}–{max(row.rounds_vs_bare):.2f}x); "
               f"{row.req_per_s:.0f} vs {bare.req_per_s:.0f} req/s", PART)


def litellm_bar(rows: list[Row], streams: int) -> Bar | None:
    mux, peer = row_of(rows, MUX, streams), row_of(rows, LITELLM, streams)
    if mux is None or peer is None or not peer.proxy_cpu_us:
        return None
    sess = row_of(rows, SESSION, streams)
    with_sessions = f"; with a session per stream {sess.proxy_cpu_us / peer.proxy_cpu_us:.3f}x" if sess else ""
    return Bar(f"CPU/request, multiplexer vs LiteLLM, {streams} stream{'s' * (streams > 1)}",
               mux.proxy_cpu_us / peer.proxy_cpu_us, 0.1, False,
               f"{mux.proxy_cpu_us:.0f} µs vs {peer.proxy_cpu_us:.0f} µs per request{with_sessions}; "
               f"LiteLLM {peer.req_per_s:.0f} req/s, E2E p50 {peer.e2e_p50_ms:.1f} ms", PART)


def span(turns: tuple[int, int]) -> str:
    return f"{turns[0]}–{turns[1]}"


def turn_bar(tc: TurnCost) -> Bar:
    early, late = span(tc.early_turns), span(tc.late_turns)
    return Bar(f"session CPU per turn, turns {late} vs turns {early}", tc.ratio, 1.2, False,
               f"median multiplexer CPU per turn over {tc.sessions} fresh sessions: turns {early} "
               f"{tc.early_median_us:.0f} µs (mean {tc.early_mean_us:.0f}), turns {late} "
               f"{tc.late_median_us:.0f} µs (mean {tc.late_mean_us:.0f})", PART)


def latency_bars(rows: list[Row], machine: Machine) -> list[Bar]:
    direct, mux = row_of(rows, DIRECT, 64), row_of(rows, MUX, 64)
    why = None
    if machine.pinned is None:
        why = (f"{machine.usable_cores} cores: fewer than {MIN_CORES_FOR_LATENCY}, so the load generator, the "
               "backend and the proxy share cores and the latency difference measures CPU contention")
    elif direct is None or mux is None:
        why = "64 streams not measured"
    p50 = (mux.e2e_p50_ms - direct.e2e_p50_ms) if direct and mux else float("nan")
    p99 = (mux.e2e_p99_ms - direct.e2e_p99_ms) if direct and mux else float("nan")
    detail = (f"direct p50 {direct.e2e_p50_ms:.2f} ms p99 {direct.e2e_p99_ms:.2f} ms, multiplexer p50 "
              f"{mux.e2e_p50_ms:.2f} ms p99 {mux.e2e_p99_ms:.2f} ms" if direct and mux else "")
    return [Bar("E2E p50 added at 64 streams (ms), pinned", p50, 1.0, False, detail, PART, why),
            Bar("E2E p99 added at 64 streams (ms), pinned", p99, 5.0, False, detail, PART, why)]


def overhead_bars(rows: list[Row], tc: TurnCost, machine: Machine, streams: tuple[int, ...]) -> list[Bar]:
    bars = [ratio_bar(rows, MUX, n, 1.2) for n in streams]
    bars += [ratio_bar(rows, SESSION, n, 1.5) for n in streams]
    bars += [turn_bar(tc)]
    bars += [litellm_bar(rows, n) for n in streams]
    return [b for b in bars if b is not None] + latency_bars(rows, machine)


def measure_overhead(tmp: Path, keys: KeysFile, keys_path: Path, settings: Settings) -> OverheadResult:
    cores = sorted(os.sched_getaffinity(0))
    plan = pin_plan(cores)
    start = Machine(os.cpu_count() or len(cores), len(cores), cpu_model(), loadavg())
    sides = start_sides(tmp, keys, keys_path, settings)
    try:
        if plan:
            pin({"proxy": [p.pid for p in sides.proxies.values()], "backend": [sides.backend.pid],
                 "loadgen": [os.getpid()]}, plan)
        print(f"overhead: {', '.join(sides.targets)} at {settings.streams} streams, {settings.rounds} rounds "
              f"of {settings.round_s:g} s a side, order alternating; answers of {settings.answer_tokens} tokens"
              f"{f' a {settings.token_interval_ms:g} ms apart' if settings.token_interval_ms else ''}; "
              f"{len(cores)} cores{', pinned' if plan else ''}", flush=True)
        rows = table_rows(run_rounds(sides, settings))
        print(f"turn cost: {settings.turn_sessions} sessions to turn {settings.turns + settings.turn_window}",
              flush=True)
        tc = turn_cost(sides, settings)
    finally:
        if plan:
            os.sched_setaffinity(0, set(cores))
        stop(*sides.procs)
    machine = Machine(start.cores, start.usable_cores, start.cpu_model, start.loadavg_start, loadavg(),
                      {k: sorted(v) for k, v in plan.items()} if plan else None)
    return OverheadResult(settings, machine, rows, tc, overhead_bars(rows, tc, machine, settings.streams))
