"""Rich tables for a finished run."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from bench.report import Baseline


def _f(v, fmt=".2f") -> str:
    return "-" if v is None else format(v, fmt)


def print_summary(b: Baseline, out: Console) -> None:
    hw = b.hardware
    out.print(f"[bold]{b.host}[/]: {hw.host.cpu_model}, {hw.host.architecture}, "
              f"{hw.host.logical_cpus} CPUs, {hw.host.memory_total_bytes / 2**30:.1f} GiB; GPUs: "
              f"{', '.join(g.name for g in hw.gpus) or 'none'}; profile {hw.profile}: "
              f"{'pass' if hw.profile_passed else 'FAIL'}")
    if b.micro.stream:
        s = b.micro.stream
        out.print("STREAM GB/s (" + f"{s.threads} threads, {s.array_bytes / 2**20:.0f} MiB arrays): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in s.best_gbps.items()))
    if b.micro.storage:
        out.print(f"storage ({b.micro.storage.mode}): " + ", ".join(
            f"{j.name} {j.bandwidth_mbps:.0f} MB/s {j.iops:.0f} IOPS" for j in b.micro.storage.jobs))
    for n in b.micro.network:
        out.print(f"network {n.target}: {n.throughput_gbps:.1f} Gbit/s, RTT p50 {n.rtt_p50_us:.0f} us")
    if b.serving:
        t = Table(title=f"serving: {b.serving.model} at {b.serving.url} "
                        f"({b.serving.workload.get('name')} workload)")
        for col in ("conc.", "ok", "fail", "out tok/s", "req/s", "TTFT mean", "TPOT mean",
                    "ITL p95", "E2EL p50", "E2EL p95", "E2EL p99"):
            t.add_column(col, justify="right")
        for lv in b.serving.levels:
            m = lv.metrics
            t.add_row(str(lv.concurrency or lv.request_rate), str(m.completed), str(m.failed),
                      _f(m.output_throughput, ".1f"), _f(m.request_throughput),
                      _f(m.ttft and m.ttft.mean, ".3f"), _f(m.tpot and m.tpot.mean, ".4f"),
                      _f(m.itl and m.itl.p95, ".4f"), _f(m.e2el and m.e2el.p50),
                      _f(m.e2el and m.e2el.p95), _f(m.e2el and m.e2el.p99))
        out.print(t)
    if b.capacity:
        c = b.capacity
        out.print(f"[bold]capacity[/]: {c.max_concurrency_meeting_slo} concurrent agents meet P95 "
                  f"E2EL <= {c.slo_p95_e2el_s:g} s on the {c.workload.get('name')} workload "
                  f"(max_tokens {c.workload.get('max_tokens', c.workload.get('output_tokens'))}); "
                  f"levels tested: " + ", ".join(
                      f"{lv.concurrency}{'✓' if lv.passed else '✗'}" for lv in c.levels))
    if b.roofline:
        r = b.roofline
        out.print(f"roofline: {r.decode_tokens_per_s:.1f} tok/s single-stream decode = "
                  f"{r.fraction:.0%} of the {r.bound_tokens_per_s:.0f} tok/s bound "
                  f"({r.bandwidth_gbps:.1f} GB/s {r.bandwidth_source} / "
                  f"{r.weight_bytes / 1e6:.0f} MB per token): {r.verdict}")
