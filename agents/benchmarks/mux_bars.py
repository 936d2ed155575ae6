"""The multiplexer's bars, measured side by side in one run:
- overhead (agents/benchmarks/overhead.py): what a user pays per request, in proxy CPU, against a
  bare pass-through proxy, with and without sessions, and against LiteLLM's proxy; a session's
  1000th turn against its 10th; latency over direct calls only where the processes can be pinned
  to cores of their own;
- serving: against llama-server with 10 agents, output tokens/s through the multiplexer is
  >= 95% of the same load sent directly;
- fairness: with one agent flooding, the other agents' p95 queue wait stays within 2x of what
  they see without it; over equal-weight agents, Jain's index on served tokens is >= 0.9.

`--json FILE` writes the figures; parts not run this time keep what FILE already holds."""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from agents.benchmarks.fixtures import (
    EQUAL_WEIGHT,
    FLOODER,
    Bar,
    key_of,
    spawn_instant,
    spawn_mux,
    write_bench_keys,
)
from agents.benchmarks.overhead import BAR_ANSWER_TOKENS, SIDE_NAMES, OverheadResult, Settings, measure_overhead
from agents.config import KeysFile
from bench.loadgen import Endpoint, closed_loop
from bench.metrics import compute_metrics
from bench.workloads import SyntheticWorkload
from dgxready.settings import REPO_ROOT
from model.running import running_model

SERVING_MODEL = "smollm2-135m"
PARTS = ("overhead", "serving", "fairness")
SCHEMA = "dgxready-mux-bars/2"


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


def legacy_part(entry: dict) -> str:
    """Which part a bar of the first file format (a flat list) belonged to."""
    name = entry.get("name", "")
    if "queue wait" in name or "Jain" in name:
        return "fairness"
    return "serving" if "llama-server" in name else "overhead"


def load_previous(path: Path) -> dict:
    if not path.exists():
        return {"schema": SCHEMA, "parts": {}}
    data = json.loads(path.read_text())
    if isinstance(data, list):
        parts: dict[str, dict] = {}
        for entry in data:
            parts.setdefault(legacy_part(entry), {"bars": []})["bars"].append(entry)
        return {"schema": SCHEMA, "parts": parts}
    return data


def git_commit() -> str:
    out = subprocess.run(["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h %s"], capture_output=True,
                         text=True)
    return out.stdout.strip()


def bar_json(bars: list[Bar]) -> list[dict]:
    return [asdict(b) | {"met": b.met} for b in bars]


def write_json(path: Path, ran: dict[str, list[Bar]], overhead: OverheadResult | None) -> None:
    data = load_previous(path)
    stamp = {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit()}
    for part, bars in ran.items():
        data["parts"][part] = stamp | {"bars": bar_json(bars)}
    if overhead is not None:
        data["parts"]["overhead"] = stamp | overhead.as_json()
    data["schema"] = SCHEMA
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def print_bars(console: Console, bars: list[Bar]) -> None:
    table = Table(title="multiplexer bars")
    for col in ("bar", "value", "bound", "", "detail"):
        table.add_column(col)
    for b in bars:
        bound = "" if b.bound is None else ("≥ " if b.higher_is_better else "≤ ") + f"{b.bound:g}"
        style = {"met": "[green]", "MISSED": "[red]"}.get(b.verdict, "")
        detail = f"{b.not_applicable}. {b.detail}" if b.not_applicable else b.detail
        table.add_row(b.name, f"{b.value:.3f}", bound, style + b.verdict, detail)
    console.print(table)


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_overhead(console: Console, result: OverheadResult) -> None:
    m, st = result.machine, result.settings
    spacing = f", a token every {st.token_interval_ms:g} ms" if st.token_interval_ms else ""
    table = Table(title=f"what a request costs, answers of {st.answer_tokens} tokens{spacing}: "
                        f"{m.usable_cores} cores ({m.cpu_model}), "
                        f"load {m.loadavg_start[0]:.2f} → {m.loadavg_end[0]:.2f}")
    for col in ("side", "streams", "req/s", "E2E p50 ms", "E2E p99 ms", "proxy CPU µs/req", "vs bare",
                "backend µs/req", "failed"):
        table.add_column(col, justify="left" if col == "side" else "right")
    for r in result.table:
        table.add_row(r.side, str(r.streams), f"{r.req_per_s:.0f}", f"{r.e2e_p50_ms:.2f}",
                      f"{r.e2e_p99_ms:.2f}", fmt(r.proxy_cpu_us, ".0f"), fmt(r.proxy_cpu_vs_bare, ".2f"),
                      f"{r.backend_cpu_us:.0f}", str(r.failed))
    console.print(table)
    console.print("sides: " + "; ".join(f"{k}: {v}" for k, v in SIDE_NAMES.items()))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", "--part", dest="only", choices=(*PARTS, "all"), default="all",
                        help="measure only this part (default: all)")
    parser.add_argument("--round-s", type=float, default=6.0, help="length of each overhead round, seconds")
    parser.add_argument("--rounds", type=int, default=4,
                        help="overhead rounds per side and stream count; the order of the sides alternates")
    parser.add_argument("--streams", default="1,16,64", help="overhead stream counts, comma-separated")
    parser.add_argument("--turns", type=int, default=1000,
                        help="session length whose turn cost is compared with the 10th turn's")
    parser.add_argument("--turn-sessions", type=int, default=5, help="fresh sessions driven for the turn cost")
    parser.add_argument("--answer-tokens", type=int, default=BAR_ANSWER_TOKENS,
                        help="overhead: tokens in each of the instant backend's answers (the bars are stated "
                             f"for {BAR_ANSWER_TOKENS}; a model's run to hundreds)")
    parser.add_argument("--token-interval-ms", type=float, default=0.0,
                        help="overhead: time between the streamed tokens of an answer (0: all at once; 1 "
                             "sends each in a chunk of its own, as a model streams)")
    parser.add_argument("--no-litellm", action="store_true",
                        help="leave LiteLLM's proxy out (else installed once under the cache, pinned)")
    parser.add_argument("--serving-requests", type=int, default=30, help="requests per serving run")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each fairness phase")
    parser.add_argument("--json", type=Path, help="write the figures here, keeping other parts' sections")
    return parser.parse_args()


def overhead_settings(args: argparse.Namespace) -> Settings:
    return Settings(streams=tuple(int(x) for x in args.streams.split(",")), round_s=args.round_s,
                    rounds=args.rounds, turns=args.turns, turn_sessions=args.turn_sessions,
                    litellm=not args.no_litellm, answer_tokens=args.answer_tokens,
                    token_interval_ms=args.token_interval_ms)


def tagged(part: str, bars: list[Bar]) -> list[Bar]:
    return [replace(b, part=part) for b in bars]


def main() -> int:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mux-bars-"))
    keys_path = tmp / "keys.yaml"
    keys = write_bench_keys(keys_path)
    # Whole lines in a log: rich would wrap the tables to 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    ran: dict[str, list[Bar]] = {}
    result = None
    if args.only in ("overhead", "all"):
        result = measure_overhead(tmp, keys, keys_path, overhead_settings(args))
        print_overhead(console, result)
    if args.only in ("fairness", "all"):
        ran["fairness"] = tagged("fairness", fairness(tmp, keys, keys_path, args.seconds))
    if args.only in ("serving", "all"):
        ran["serving"] = tagged("serving", serving(tmp, keys, keys_path, args.serving_requests))
    bars = (result.bars if result else []) + [b for part in ran.values() for b in part]
    print_bars(console, bars)
    if args.json:
        write_json(args.json, ran, result)
    return 0 if all(b.met is not False for b in bars) else 1


if __name__ == "__main__":
    sys.exit(main())
