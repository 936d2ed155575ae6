"""Serving metrics as `vllm bench serve` defines them (vllm/benchmarks/serve.py, calculate_metrics,
and lib/endpoint_request_func.py): TTFT is the first streamed event with `choices` (even a
role-only or empty delta), ITL every gap between such events after the first, E2EL the last
such event, TPOT (E2EL - TTFT) / (output tokens - 1) for requests of more than one token;
percentiles are numpy's linear ones over successful requests; throughputs over the run's
duration; goodput counts successful requests within every SLO bound. Times are seconds on the
client's monotonic clock. One deliberate difference: vLLM counts any stream with a token event
as a success, here a stream without usage tokens or a finish_reason is a failure."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass
class RequestRecord:
    sent_at: float
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    e2el: float | None = None
    itl: list[float] = field(default_factory=list)
    success: bool = False
    error: str | None = None
    finish_reason: str | None = None
    ended_at: float | None = None

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens <= 1 or self.ttft is None or self.e2el is None:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Distribution:
    mean: float
    median: float
    std: float
    p50: float
    p90: float
    p95: float
    p99: float
    count: int

    @classmethod
    def of(cls, values: list[float]) -> Distribution | None:
        if not values:
            return None
        arr = np.asarray(values, dtype=float)
        p = np.percentile(arr, PERCENTILES)
        return cls(float(arr.mean()), float(np.median(arr)), float(arr.std()),
                   *(float(x) for x in p), count=len(values))


@dataclass(frozen=True)
class Slo:
    """Per-request bounds for goodput. `e2el_p95_s` is the SLO's P95 target, applied to each
    request's E2EL as vLLM's `--goodput e2el:` applies its bound."""
    e2el_p95_s: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None

    def met_by(self, r: RequestRecord) -> bool:
        """vLLM's --goodput test: a successful request whose every bounded metric is within its
        bound. A request of at most one output token has TPOT 0 there, so it meets any TPOT bound."""
        if not r.success:
            return False
        checks = [(self.e2el_p95_s, r.e2el), (self.ttft_s, r.ttft), (self.tpot_s, r.tpot or 0.0)]
        return all(v is not None and v <= bound for bound, v in checks if bound is not None)


@dataclass(frozen=True)
class ServingMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    goodput: float | None
    ttft: Distribution | None
    tpot: Distribution | None
    itl: Distribution | None
    e2el: Distribution | None
    errors: dict[str, int]


def compute_metrics(records: list[RequestRecord], slo: Slo | None = None) -> ServingMetrics:
    ok = [r for r in records if r.success]
    failed = len(records) - len(ok)
    if records:
        start = min(r.sent_at for r in records)
        end = max((r.ended_at or r.sent_at) for r in records)
        duration = max(end - start, 1e-9)
    else:
        duration = 1e-9
    inp = sum(r.prompt_tokens for r in ok)
    outp = sum(r.output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in records:
        if not r.success:
            key = (r.error or "unknown").split(":")[0][:80]
            errors[key] = errors.get(key, 0) + 1
    good = None
    if slo is not None:
        good = sum(slo.met_by(r) for r in records) / duration
    return ServingMetrics(
        completed=len(ok), failed=failed, duration_s=duration,
        total_input_tokens=inp, total_output_tokens=outp,
        request_throughput=len(ok) / duration, output_throughput=outp / duration,
        total_token_throughput=(inp + outp) / duration, goodput=good,
        ttft=Distribution.of([r.ttft for r in ok if r.ttft is not None]),
        tpot=Distribution.of([t for r in ok if (t := r.tpot) is not None]),
        itl=Distribution.of([g for r in ok for g in r.itl]),
        e2el=Distribution.of([r.e2el for r in ok if r.e2el is not None]),
        errors=errors,
    )
