"""Compare two baselines: a table of changes, and regressions beyond a threshold."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.report import Baseline


@dataclass(frozen=True)
class Change:
    metric: str
    before: float
    after: float
    higher_is_better: bool

    @property
    def relative(self) -> float:
        return (self.after - self.before) / self.before if self.before else 0.0

    def regressed(self, threshold: float) -> bool:
        worse = -self.relative if self.higher_is_better else self.relative
        return worse > threshold


def _metrics(b: Baseline) -> dict[str, tuple[float, bool]]:
    out: dict[str, tuple[float, bool]] = {}

    def put(name: str, value: float | None, higher: bool) -> None:
        if value is not None:
            out[name] = (float(value), higher)

    if b.micro.stream:
        for op, v in b.micro.stream.best_gbps.items():
            put(f"stream.{op} GB/s", v, True)
    if b.micro.storage:
        for j in b.micro.storage.jobs:
            put(f"storage.{j.name} MB/s", j.bandwidth_mbps, True)
            put(f"storage.{j.name} IOPS", j.iops, True)
    for n in b.micro.network:
        put(f"net.{n.target.split(':')[0]} Gbit/s", n.throughput_gbps, True)
        put(f"net.{n.target.split(':')[0]} RTT p50 us", n.rtt_p50_us, False)
    if b.serving:
        for lv in b.serving.levels:
            key = f"c={lv.concurrency}" if lv.concurrency else f"rate={lv.request_rate}"
            m = lv.metrics
            put(f"serve {key} output tok/s", m.output_throughput, True)
            put(f"serve {key} E2EL p95 s", m.e2el.p95 if m.e2el else None, False)
            put(f"serve {key} TTFT mean s", m.ttft.mean if m.ttft else None, False)
    if b.capacity:
        put("capacity (agents within SLO)", b.capacity.max_concurrency_meeting_slo, True)
    if b.roofline:
        put("decode tok/s (single stream)", b.roofline.decode_tokens_per_s, True)
    return out


def compare(a: Baseline, b: Baseline) -> list[Change]:
    ma, mb = _metrics(a), _metrics(b)
    return [Change(k, ma[k][0], mb[k][0], ma[k][1]) for k in ma if k in mb]


def regressions(changes: list[Change], threshold: float,
                keep: Callable[[Change], bool] = lambda c: True) -> list[Change]:
    return [c for c in changes if keep(c) and c.regressed(threshold)]
