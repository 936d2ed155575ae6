"""What a run prints, one function per part, so `bench.all` can print each part as it is measured
and a fetched or reloaded baseline can be printed whole."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from bench.engine_table import EngineTable
from bench.labels import agents_meet, workload_label
from bench.metrics import ServingMetrics
from bench.prediction import CHECK_BAR, STEADY_ROUNDS, CapacityCheck, Prediction
from bench.report import Baseline, Hardware, Micro, Serving
from bench.roofline import Roofline
from bench.serving import CapacityLevel, CapacityResult, LevelResult
from bench.verdict import SloVerdict, tuning_hint
from dgxready.progress import new_table

SERVING_COLUMNS = ("conc.", "ok", "fail", "out tok/s", "req/s", "TTFT mean", "TPOT mean",
                   "ITL p95", "E2EL p50", "E2EL p95", "E2EL p99")
CONFIDENCE_WORDS = {"meets": "meets it with confidence", "misses": "misses it with confidence",
                    "undecided": "not yet decided with confidence"}


def _f(v, fmt=".2f") -> str:
    return "-" if v is None else format(v, fmt)


def print_hardware(host: str, hw: Hardware, out: Console) -> None:
    out.print(f"[bold]{host}[/]: {hw.host.cpu_model}, {hw.host.architecture}, "
              f"{hw.host.logical_cpus} CPUs, {hw.host.memory_total_bytes / 2**30:.1f} GiB; GPUs: "
              f"{', '.join(g.name for g in hw.gpus) or 'none'}; profile {hw.profile}: "
              f"{'pass' if hw.profile_passed else 'FAIL'}")


def print_micro(micro: Micro, out: Console) -> None:
    if micro.stream:
        s = micro.stream
        out.print("STREAM GB/s (" + f"{s.threads} threads, {s.array_bytes / 2**20:.0f} MiB arrays): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in s.best_gbps.items()))
    if micro.storage:
        out.print(f"storage ({micro.storage.mode}): " + ", ".join(
            f"{j.name} {j.bandwidth_mbps:.0f} MB/s {j.iops:.0f} IOPS" for j in micro.storage.jobs))
    for n in micro.network:
        out.print(f"network {n.target}: {n.throughput_gbps:.1f} Gbit/s, RTT p50 {n.rtt_p50_us:.0f} us")


def print_engine_table(table: EngineTable, out: Console) -> None:
    """A step's time by batch at each context, and what it costs each stream."""
    for depth in table.depths:
        steps = [(b, table.point(b, depth).step_s) for b in table.batches]
        out.print(f"engine decode step at context {depth} (llama-bench, {table.threads} threads): "
                  + ", ".join(f"batch {b} {s * 1e3:.1f} ms ({s * 1e3 / b:.1f} a stream)" for b, s in steps))


def serving_row(level_name: str, m: ServingMetrics) -> list[str]:
    return [level_name, str(m.completed), str(m.failed), _f(m.output_throughput, ".1f"),
            _f(m.request_throughput), _f(m.ttft and m.ttft.mean, ".3f"), _f(m.tpot and m.tpot.mean, ".4f"),
            _f(m.itl and m.itl.p95, ".4f"), _f(m.e2el and m.e2el.p50), _f(m.e2el and m.e2el.p95),
            _f(m.e2el and m.e2el.p99)]


def print_serving(serving: Serving, out: Console) -> None:
    t = new_table(out, f"serving: {serving.model} at {serving.url} ({workload_label(serving.workload)})")
    for col in SERVING_COLUMNS:
        t.add_column(col, justify="right", no_wrap=True)
    for lv in serving.levels:
        t.add_row(*serving_row(str(lv.concurrency or lv.request_rate), lv.metrics))
    out.print(t)


def level_line(level: LevelResult) -> str:
    """One finished sweep level, as the sweep goes."""
    m = level.metrics
    p95 = _f(m.e2el and m.e2el.p95)
    return (f"  c={level.concurrency:<3} {m.completed} ok, {m.failed} failed  P95 E2EL {p95} s  "
            f"TTFT mean {_f(m.ttft and m.ttft.mean, '.3f')} s  {m.output_throughput:.0f} out tok/s  "
            f"({m.duration_s:.0f}s)")


def capacity_level_line(lv: CapacityLevel) -> str:
    mark = "[green]pass" if lv.passed else "[red]fail"
    confidence = f", {CONFIDENCE_WORDS[lv.verdict]}" if lv.verdict else ""
    rounds = f", {lv.rounds} rounds pooled" if lv.rounds > 1 else ""
    return (f"  c={lv.concurrency:<3} n={lv.num_requests:<3} P95 E2EL {_f(lv.p95_e2el_s)} s  "
            f"{lv.output_throughput:.0f} tok/s  attainment {lv.attainment:.0%}  {mark}[/] "
            f"({lv.reason}{confidence}{rounds})")


def capacity_range_text(c: CapacityResult) -> str:
    if c.capacity_low is None or c.capacity_low == c.capacity_high:
        return ""
    confidence = f" at {c.confidence:.0%} confidence" if c.confidence else ""
    return (f"; range {c.capacity_low}-{c.capacity_high}{confidence} (met up to {c.capacity_low}, "
            f"not ruled out up to {c.capacity_high})")


def print_capacity(c: CapacityResult, out: Console) -> None:
    out.print(f"[bold]capacity[/]: {agents_meet(c.max_concurrency_meeting_slo)} P95 "
              f"E2EL <= {c.slo_p95_e2el_s:g} s ({workload_label(c.workload)}){capacity_range_text(c)}; "
              f"levels tested: " + ", ".join(
                  f"{lv.concurrency}{'✓' if lv.passed else '✗'}" for lv in c.levels))


def print_roofline(r: Roofline, out: Console) -> None:
    out.print(f"roofline: {r.decode_tokens_per_s:.1f} tok/s single-stream decode = "
              f"{r.fraction:.0%} of the {r.bound_tokens_per_s:.0f} tok/s bound "
              f"({r.bandwidth_gbps:.1f} GB/s {r.bandwidth_source} / "
              f"{r.weight_bytes / 1e6:.0f} MB per token): {r.verdict}")


def print_verdict(v: SloVerdict, out: Console, baseline: Path | None = None) -> None:
    colour = {"met": "green", "not met": "red", "undecided": "yellow"}[v.outcome]
    out.print(f"[bold {colour}]{v.headline}[/]")
    hint = tuning_hint(str(baseline) if baseline else "FILE", v)
    if v.outcome == "undecided":
        out.print(f"this run cannot decide it; to meet it with margin, see {hint}")
    elif v.outcome == "not met":
        out.print(f"to serve {v.target_agents} agents within {v.slo_p95_e2el_s:g} s, see {hint}")


def print_summary(b: Baseline, out: Console, verdict: SloVerdict | None = None) -> None:
    print_hardware(b.host, b.hardware, out)
    print_micro(b.micro, out)
    if b.serving:
        print_serving(b.serving, out)
    if b.capacity:
        print_capacity(b.capacity, out)
    if b.roofline:
        print_roofline(b.roofline, out)
    if verdict:
        print_verdict(verdict, out)


def prediction_headline(p: Prediction) -> str:
    """One line, worded apart from the measured verdict ("the N-agent SLO is ...") it is printed beside."""
    where = f"{p.profile} ({p.engine}), {p.model.name}, {p.workload.name} workload"
    if p.capacity == 0:
        agents = "not even one agent meets"
    else:
        agents = f"{p.capacity} concurrent agent{'s' if p.capacity != 1 else ''} meet"
    answer = "within it" if p.meets_target else "beyond it"
    n = p.target_agents
    if p.longest_output_tokens:
        outputs = f"{n} agents can have outputs up to {p.longest_output_tokens} tokens"
    else:
        outputs = f"{n} agents miss it even with one-token outputs, on prefill and queueing alone"
    return (f"predicted on {where}: {agents} P95 E2EL <= {p.slo_p95_e2el_s:g} s, so {n} agents are {answer}; "
            f"{outputs} (the workload asks up to {p.workload.output_p95:.0f}){flat_curve_note(p)}")


# A target within this factor of one agent's P95 means batching is nearly free (a memory-bound
# decode), so a small capacity says more about the outputs' length than about the agent count.
FLAT_CURVE = 1.25


def flat_curve_note(p: Prediction) -> str:
    by_agents = {lv.concurrency: lv for lv in p.levels}
    one, target = by_agents.get(1), by_agents.get(p.target_agents)
    if p.meets_target or not (one and target) or target.e2el_p95_s > FLAT_CURVE * one.e2el_p95_s:
        return ""
    return (f"; the latency barely grows with the agents (P95 {one.e2el_p95_s:.2f} s at 1, "
            f"{target.e2el_p95_s:.2f} s at {p.target_agents}): the outputs' length sets it, not their number")


def print_prediction(p: Prediction, out: Console) -> None:
    t = new_table(out, f"predicted per concurrency: {p.profile} ({p.engine}), {p.model.name}, KV {p.kv_dtype}")
    for col in ("agents", "P95 E2EL s", "P95 TTFT s", "decode step ms", "bound", "output tok/s"):
        t.add_column(col, justify="right")
    for lv in p.levels:
        t.add_row(str(lv.concurrency), f"{lv.e2el_p95_s:.2f}", f"{lv.ttft_p95_s:.2f}", f"{lv.step_s * 1e3:.1f}",
                  lv.bound, f"{lv.output_tokens_per_s:.1f}")
    out.print(t)
    levers = new_table(out, f"levers for {p.target_agents} agents, ranked by predicted effect")
    for col in ("lever", "what", "capacity", f"P95 E2EL at {p.target_agents}", "meets"):
        levers.add_column(col, justify="left" if col in ("lever", "what") else "right")
    for e in p.levers:
        levers.add_row(e.name, e.description, str(e.capacity), f"{e.p95_e2el_at_target_s:.2f} s",
                       "yes" if e.meets_target else "no")
    out.print(levers)
    if p.checks:
        print_checks(p, out)
    if p.capacity_check:
        print_capacity_check(p.capacity_check, out)
    colour = "green" if p.meets_target else "red"
    out.print(f"[bold {colour}]{prediction_headline(p)}[/]")


def print_checks(p: Prediction, out: Console) -> None:
    t = new_table(out, f"the model against levels it was not calibrated on (bar: within {CHECK_BAR:.0%})")
    for col in ("agents", "workload", "rounds", "P95 E2EL predicted", "measured", "error", "tok/s predicted",
                "measured", "error", "within bar"):
        t.add_column(col, justify="right")
    for c in p.checks:
        t.add_row(str(c.concurrency), c.workload, f"{c.rounds:.1f}", f"{c.predicted_e2el_p95_s:.2f}",
                  f"{c.measured_e2el_p95_s:.2f}", f"{c.e2el_error:+.0%}",
                  f"{c.predicted_output_tokens_per_s:.1f}", f"{c.measured_output_tokens_per_s:.1f}",
                  f"{c.tokens_error:+.0%}", "yes" if c.within_bar else "no")
    out.print(t)
    short = [c for c in p.checks if not c.steady]
    if short:
        most = max(c.concurrency for c in short)
        out.print(f"[yellow]{', '.join(str(c.concurrency) for c in short)} agents: fewer than {STEADY_ROUNDS} "
                  "rounds, so measured tok/s includes the last round draining to its slowest agent (the "
                  f"prediction is a steady loop); `bench.all --sweep-requests {STEADY_ROUNDS * most}` "
                  "measures enough[/]")
    out.print(f"engine parameters {p.parameters.source}")


def print_capacity_check(c: CapacityCheck, out: Console) -> None:
    t = new_table(out, f"the capacity search of the same baseline against the model ({c.workload}, "
                       f"P95 E2EL <= {c.slo_p95_e2el_s:g} s; each level predicted as the run it was)")
    for col in ("agents", "requests", "P95 E2EL predicted", "measured", "measured within SLO"):
        t.add_column(col, justify="right")
    for lv in c.levels:
        measured = "-" if lv.measured_e2el_p95_s is None else f"{lv.measured_e2el_p95_s:.2f}"
        t.add_row(str(lv.concurrency), str(lv.requests), f"{lv.predicted_e2el_p95_s:.2f}", measured,
                  "yes" if lv.measured_meets else "no")
    out.print(t)
    measured = (f"{c.measured_capacity}" if c.measured_low == c.measured_high
                else f"{c.measured_capacity} (range {c.measured_low}\u2013{c.measured_high})")
    verdict = "within its range" if c.within_range else "outside its range"
    out.print(f"capacity: predicted {c.predicted_capacity} agents (the steady loop), bench.capacity "
              f"measured {measured} in the same baseline: {verdict}")
