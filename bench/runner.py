"""Plain functions behind the bench.* tasks: each part on its own, and `run_all` end to end,
printing each part as soon as it is measured."""
from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from bench import plots
from bench.engine_table import BATCHES, DEPTH, ENGINE_PASSES, EngineTable, run_engine_table
from bench.environment import capture_environment
from bench.hw import check_profile, gpu_reports, host_facts, last_level_cache
from bench.labels import workload_label
from bench.loadgen import Endpoint, StopRule, probe
from bench.metrics import Slo
from bench.net import loopback, measure
from bench.predict import load_profiles
from bench.prediction import Prediction, PredictRequest, predict_from, write_prediction
from bench.report import Baseline, Hardware, Micro, Serving, ServingLevel, now_stamp, write_baseline
from bench.roofline import Roofline, roofline
from bench.serving import CapacityResult, LevelResult, RoundPlan, capacity_search, requests_for, run_level
from bench.storage import run_storage
from bench.stream import run_stream
from bench.summary import (
    capacity_level_line,
    level_line,
    prediction_headline,
    print_capacity,
    print_engine_table,
    print_hardware,
    print_micro,
    print_roofline,
    print_serving,
)
from bench.workloads import Workload, for_round, make_workload
from dgxready.errors import DgxReadyError
from dgxready.progress import AnyProgress, step_progress
from dgxready.roles import load_roles
from dgxready.settings import BASELINES_DIR, REPO_ROOT, load_settings
from model.catalog import load_catalog
from model.llamacpp_build import require_binary
from model.running import running_model

BASELINES = BASELINES_DIR
# Twice the SLO: on the 2-core VM the sweep's c=16 level took 53 s to show only the queue that c=8
# (P95 17 s) had already shown.
SATURATION_FACTOR = 2.0


@dataclass(frozen=True)
class Target:
    url: str
    model: str
    backend: str | None
    started: bool
    weight_bytes: int | None
    model_path: Path | None = None


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:64] or "host"


@contextlib.contextmanager
def target(url: str | None, parallel: int, ctx: int, out: Console) -> Iterator[Target]:
    """Use `url`, or start the default model on a free port and stop it whatever happens."""
    if url:
        tgt = Target(url, probe(url), None, False, None)
        out.print(f"benchmarking {tgt.model} at {tgt.url}")
        yield tgt
        return
    with running_model(parallel=parallel, ctx_per_slot=ctx) as served:
        yield Target(served.base_url, probe(served.base_url), served.state.backend, True,
                     served.weight_bytes, served.model_path)


def hardware(profile: str) -> Hardware:
    host, gpus = host_facts(), gpu_reports()
    checks = check_profile(profile, host, gpus)
    return Hardware(host=host, gpus=gpus, profile=profile, checks=checks,
                    profile_passed=all(c.passed for c in checks))


def parse_peer(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise DgxReadyError(f"--net-peer {text!r}: give HOST:PORT of `python -m bench.net --serve`")
    return host, int(port)


def micro(store_dir: Path, out: Console, stream_reps: int = 10, io_bytes: int = 1 << 30,
          peers: tuple[str, ...] = ()) -> Micro:
    targets = [parse_peer(p) for p in peers]
    with step_progress() as progress:
        task = progress.add_task("microbenchmarks", total=3 + len(targets))
        progress.update(task, description="microbenchmarks (STREAM memory bandwidth)")
        stream = run_stream(last_level_cache(), repetitions=stream_reps)
        progress.update(task, advance=1, description="microbenchmarks (storage I/O)")
        storage = run_storage(store_dir, size=io_bytes)
        progress.update(task, advance=1, description="microbenchmarks (network)")
        nets = [loopback()]
        progress.advance(task)
        for host, port in targets:
            try:
                nets.append(measure(host, port))
            except OSError as exc:
                raise DgxReadyError(f"network peer {host}:{port}: {exc}") from None
            progress.advance(task)
    result = Micro(stream=stream, storage=storage, network=nets)
    print_micro(result, out)
    return result


def engine_steps(tgt: Target, out: Console) -> EngineTable | None:
    """The served engine's decode step by batch and context, where it is llama.cpp started here
    (llama-bench beside llama-server, on the same model file); before the sweep, while the server
    idles. Without it the run goes on: bench.predict then falls back to a constant rate."""
    if not (tgt.started and tgt.backend == "llamacpp" and tgt.model_path):
        return None
    try:
        with step_progress() as progress:
            progress.add_task("engine batch table (llama-bench: batches " + ", ".join(map(str, BATCHES))
                              + f", contexts 0 and {DEPTH}, {ENGINE_PASSES} passes)", total=None)
            table = run_engine_table(require_binary("llama-bench"), tgt.model_path)
    except DgxReadyError as exc:
        out.print(f"[yellow]engine batch table skipped: {exc}")
        return None
    print_engine_table(table, out)
    return table


def measured_level(progress: AnyProgress, label: str, ep: Endpoint, workload: Workload, concurrency: int,
                   num_requests: int, warmup: int, slo: Slo, stop: StopRule | None = None) -> LevelResult:
    """One closed-loop level, its requests counted on a progress task of its own."""
    task = progress.add_task(label, total=num_requests)
    try:
        return run_level(ep, workload, concurrency, num_requests, warmup, slo,
                         lambda _record: progress.advance(task), stop)
    finally:
        progress.remove_task(task)


def saturated(level: LevelResult, slo: Slo, factor: float = SATURATION_FACTOR) -> bool:
    """Beyond `factor` times the SLO's P95 E2EL the engine is saturated: more concurrency only
    lengthens the queue."""
    e2el = level.metrics.e2el
    return slo.e2el_p95_s is not None and e2el is not None and e2el.p95 > factor * slo.e2el_p95_s


def sweep(ep: Endpoint, workload_name: str, levels: list[int], max_tokens: int, slo: Slo,
          out: Console, warmup: int = 2, stop_when_saturated: bool = True,
          num_requests: int | None = None) -> list[LevelResult]:
    """Each level with `num_requests` requests, or by default two per worker and at least 8."""
    workload = make_workload(workload_name, max_tokens=max_tokens)
    out.print(f"serving sweep: {workload_label(workload.describe())}, closed loop at concurrency "
              + ", ".join(map(str, levels)))
    results = []
    with step_progress(transient=True) as progress:
        for i, c in enumerate(levels):
            n = num_requests or requests_for(c, per_worker=2, minimum=8)
            results.append(measured_level(progress, f"{workload_name} c={c}", ep, for_round(workload, i),
                                          c, n, warmup, slo))
            out.print(level_line(results[-1]))
            rest = levels[i + 1:]
            if rest and stop_when_saturated and saturated(results[-1], slo):
                out.print(f"  c={', '.join(map(str, rest))} skipped: P95 E2EL is already beyond "
                          f"{SATURATION_FACTOR:g}x the SLO ({SATURATION_FACTOR * slo.e2el_p95_s:g} s); "
                          "--full-sweep measures them anyway")
                break
    return results


def capacity(ep: Endpoint, workload_name: str, slo_s: float, max_tokens: int, limit: int,
             out: Console) -> CapacityResult:
    workload = make_workload(workload_name, max_tokens=max_tokens)
    out.print(f"capacity search: P95 E2EL <= {slo_s:g} s, {workload_label(workload.describe())}, "
              f"up to {limit} concurrent agents")
    rounds = itertools.count()
    with step_progress(transient=True) as progress:
        def measure_at(plan: RoundPlan) -> LevelResult:
            c = plan.concurrency
            return measured_level(progress, f"capacity c={c}", ep, for_round(workload, next(rounds)), c,
                                  requests_for(c), min(c, 4) if plan.warm_up else 0, Slo(e2el_p95_s=slo_s),
                                  plan.stop)

        return capacity_search(measure_at, slo_s, workload.describe(), limit=limit,
                               on_level=lambda lv: out.print(capacity_level_line(lv)))


def single_stream_roofline(levels: list[LevelResult], mic: Micro, weight_bytes: int | None) -> Roofline | None:
    single = next((lv for lv in levels if lv.concurrency == 1 and lv.metrics.tpot), None)
    if not (single and mic.stream and weight_bytes):
        return None
    op, bandwidth = mic.stream.best_op
    return roofline(1.0 / single.metrics.tpot.mean, bandwidth,
                    f"STREAM {op}, {mic.stream.threads} threads", weight_bytes)


def write_plots(run_dir: Path, serving: Serving, levels: list[LevelResult], cap: CapacityResult | None,
                slo_s: float, run: plots.RunLabel) -> list[str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    figures = {}
    if levels:
        figures["latency_vs_concurrency"] = plots.latency_vs_concurrency(levels, serving.workload, slo_s,
                                                                         cap, run)
        figures["throughput_vs_concurrency"] = plots.throughput_vs_concurrency(levels, serving.workload, run)
        figures["ttft_itl_distributions"] = plots.ttft_itl_distributions(levels, serving.workload, run)
    if cap:
        figures["capacity_search"] = plots.capacity_search_plot(cap, run)
    paths = [plots.save(fig, run_dir / f"{name}.png") for name, fig in figures.items()]
    return [str(p.relative_to(REPO_ROOT) if p.is_relative_to(REPO_ROOT) else p) for p in paths]


SPARK_QUESTION = PredictRequest("dgx-spark", "mistral-7b-instruct-v0.3", "fp8", "f16", "agents", 128, 10, 6.0)


def spark_prediction(opts: AllOptions) -> Prediction:
    """The DGX Spark's predicted answer on the capacity search's own workload, SLO and target."""
    req = replace(SPARK_QUESTION, workload=opts.capacity_workload, max_tokens=opts.max_tokens,
                  slo_s=opts.slo_p95_e2e_s, agents=opts.target_agents)
    return predict_from(req, load_catalog(), load_profiles(), list(load_roles().values()))


def write_prediction_files(pred: Prediction, out_dir: Path | None) -> list[Path]:
    """The prediction's JSON and its plot, named after the profile, model and time."""
    created = now_stamp()
    folder = out_dir or BASELINES / "predictions"
    stem = safe_name(f"{pred.profile}-{pred.model.name}-{pred.workload.name}-"
                     + created.replace(":", "").replace("-", ""))
    folder.mkdir(parents=True, exist_ok=True)
    return [write_prediction(pred, folder / f"{stem}.json"),
            plots.save(plots.prediction_plot(pred, created), folder / f"{stem}.png")]


@dataclass(frozen=True)
class AllOptions:
    url: str | None = None
    profile: str = "generic"
    levels: tuple[int, ...] = (1, 2, 4, 8, 16)
    sweep_workload: str = "synthetic"
    capacity_workload: str = "agents"
    slo_p95_e2e_s: float = 6.0
    max_tokens: int = 128
    capacity_limit: int = 32
    output_dir: Path | None = None
    skip_micro: bool = False
    skip_capacity: bool = False
    net_peers: tuple[str, ...] = ()
    full_sweep: bool = False
    target_agents: int = 10
    sweep_requests: int | None = None


def serving_doc(tgt: Target, workload: dict, levels: list[LevelResult]) -> Serving:
    return Serving(url=tgt.url, model=tgt.model, backend=tgt.backend, started_server=tgt.started,
                   workload=workload, mode="closed", levels=[ServingLevel.of(lv) for lv in levels])


def run_all(opts: AllOptions, out: Console) -> tuple[Path, Baseline]:
    hw = hardware(opts.profile)
    print_hardware(hw.host.hostname, hw, out)
    mic = Micro() if opts.skip_micro else micro(load_settings().models_dir, out, peers=opts.net_peers)
    slo = Slo(e2el_p95_s=opts.slo_p95_e2e_s)
    parallel = max(max(opts.levels), opts.capacity_limit if not opts.skip_capacity else 1)
    with target(opts.url, parallel, 2048, out) as tgt:
        # After the target is up, so that a llama.cpp build made for it is in the record.
        env = capture_environment()
        if not opts.skip_micro:
            mic = mic.model_copy(update={"engine": engine_steps(tgt, out)})
        ep = Endpoint(tgt.url, tgt.model)
        levels = sweep(ep, opts.sweep_workload, list(opts.levels), opts.max_tokens, slo, out,
                       stop_when_saturated=not opts.full_sweep, num_requests=opts.sweep_requests)
        serving = serving_doc(tgt, make_workload(opts.sweep_workload, max_tokens=opts.max_tokens).describe(),
                              levels)
        print_serving(serving, out)
        cap = None if opts.skip_capacity else capacity(
            ep, opts.capacity_workload, opts.slo_p95_e2e_s, opts.max_tokens, opts.capacity_limit, out)
    if cap:
        print_capacity(cap, out)
        out.print(prediction_headline(spark_prediction(opts)))
    roof = single_stream_roofline(levels, mic, tgt.weight_bytes)
    if roof:
        print_roofline(roof, out)
    created = now_stamp()
    out_dir = opts.output_dir or BASELINES / safe_name(hw.host.hostname)
    run_dir = out_dir / created.replace(":", "").replace("-", "")
    baseline = Baseline(
        created_at=created, host=hw.host.hostname, environment=env, hardware=hw, micro=mic,
        serving=serving, capacity=cap, roofline=roof,
        plots=write_plots(run_dir, serving, levels, cap, opts.slo_p95_e2e_s,
                          plots.RunLabel(hw.host.hostname, tgt.model, created)),
    )
    return write_baseline(baseline, out_dir), baseline
