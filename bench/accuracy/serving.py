"""The load generator's figures against llama-server's own /metrics counters, one stream at a
time so that both clocks see the same requests:
- output tokens: Σ usage.completion_tokens vs Δ llamacpp:tokens_predicted_total (exact)
- decode tokens/s: Σ(tokens − 1) / Σ(E2EL − TTFT) vs Δtokens_predicted_total /
  Δtokens_predicted_seconds_total
- mean TTFT vs Δprompt_seconds_total / requests (the server's prompt time per request)"""
from __future__ import annotations

import argparse
import asyncio
import sys

import httpx

from bench.accuracy import Comparison, report
from bench.loadgen import Endpoint, closed_loop, probe
from bench.metrics import RequestRecord
from bench.workloads import make_workload


def counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url.rstrip('/')}/metrics", timeout=10).text
    return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("llamacpp:")}


def compare_records(records: list[RequestRecord], before: dict, after: dict) -> list[Comparison]:
    ok = [r for r in records if r.success]
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    tokens = sum(r.output_tokens for r in ok)
    ours_decode = sum(r.output_tokens - 1 for r in ok) / sum(r.e2el - r.ttft for r in ok)
    ours_ttft = sum(r.ttft for r in ok) / len(ok)
    return [
        Comparison("output tokens", tokens, d["llamacpp:tokens_predicted_total"], "llama-server /metrics", 0.0),
        Comparison("decode tokens/s", ours_decode,
                   d["llamacpp:tokens_predicted_total"] / d["llamacpp:tokens_predicted_seconds_total"],
                   "llama-server /metrics", 0.10),
        Comparison("mean TTFT s", ours_ttft, d["llamacpp:prompt_seconds_total"] / len(ok),
                   "llama-server /metrics", 0.10),
    ]


def measure(url: str, requests: int, max_tokens: int) -> list[Comparison]:
    ep = Endpoint(url, probe(url))
    workload = make_workload("synthetic", seed=7, max_tokens=max_tokens)
    asyncio.run(closed_loop(ep, workload, 1, 2))
    before = counters(url)
    records = asyncio.run(closed_loop(ep, make_workload("synthetic", seed=8, max_tokens=max_tokens),
                                      1, requests))
    return compare_records(records, before, counters(url))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", help="a llama-server started with --metrics (default: start one)")
    parser.add_argument("--requests", type=int, default=12, help="requests to send, one at a time")
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    args = parser.parse_args()
    if args.url:
        rows = measure(args.url, args.requests, args.max_tokens)
    else:
        from bench.runner import target
        from dgxready.cli import out

        with target(None, 1, 4096, out) as tgt:
            rows = measure(tgt.url, args.requests, args.max_tokens)
    return report("serving: dgxready load generator vs llama-server counters", rows)


if __name__ == "__main__":
    sys.exit(main())
