"""Plain functions behind the bench.* tasks: each part on its own, and `run_all` end to end."""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from bench import plots
from bench.environment import capture_environment
from bench.hw import check_profile, gpu_reports, host_facts, last_level_cache
from bench.loadgen import Endpoint, probe
from bench.metrics import Slo
from bench.net import loopback, measure
from bench.report import Baseline, Hardware, Micro, Serving, ServingLevel, now_stamp, write_baseline
from bench.roofline import roofline
from bench.serving import CapacityResult, LevelResult, capacity_search, requests_for, run_level
from bench.storage import run_storage
from bench.stream import run_stream
from bench.workloads import make_workload
from dgxready.errors import DgxReadyError
from dgxready.progress import step_progress
from dgxready.settings import REPO_ROOT, load_settings

BASELINES = REPO_ROOT / "bench" / "baselines"


@dataclass(frozen=True)
class Target:
    url: str
    model: str
    backend: str | None
    started: bool
    weight_bytes: int | None


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:64] or "host"


@contextlib.contextmanager
def target(url: str | None, parallel: int, ctx: int, out: Console) -> Iterator[Target]:
    """Use `url`, or start the default model on a free port and stop it whatever happens."""
    if url:
        yield Target(url, probe(url), None, False, None)
        return
    from dgxready.ports import free_port
    from model.catalog import load_catalog
    from model.llamacpp_build import build_llamacpp
    from model.pull import pull, resolve_format, store_for
    from model.serve import ServeRequest, serve, stop

    settings = load_settings()
    name = load_catalog().default
    build_llamacpp(settings)
    result = pull(name, engine="llamacpp", settings=settings)
    state = serve(ServeRequest(model=name, fmt=result.fmt, port=free_port(), parallel=parallel,
                               ctx_per_slot=ctx), settings)
    spec = resolve_format(load_catalog(), store_for(settings), name, result.fmt).spec
    out.print(f"started {state.backend} for {name} at {state.base_url} ({state.reason})")
    try:
        yield Target(state.base_url, probe(state.base_url), state.backend, True, spec.weight_bytes)
    finally:
        stop(port=state.port, settings=settings)
        out.print(f"stopped the server on port {state.port}")


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
        stream = run_stream(last_level_cache(), repetitions=stream_reps)
        progress.advance(task)
        storage = run_storage(store_dir, size=io_bytes)
        progress.advance(task)
        nets = [loopback()]
        progress.advance(task)
        for host, port in targets:
            try:
                nets.append(measure(host, port))
            except OSError as exc:
                raise DgxReadyError(f"network peer {host}:{port}: {exc}") from None
            progress.advance(task)
    best_op, best = stream.best_op
    out.print(f"STREAM best {best_op} {best:.1f} GB/s ({stream.threads} threads); storage "
              f"{storage.mode}; " + "; ".join(f"{n.target} {n.throughput_gbps:.1f} Gbit/s" for n in nets))
    return Micro(stream=stream, storage=storage, network=nets)


def sweep(ep: Endpoint, workload_name: str, levels: list[int], max_tokens: int, slo: Slo,
          warmup: int = 2) -> list[LevelResult]:
    workload = make_workload(workload_name, max_tokens=max_tokens)
    results = []
    with Progress(transient=True) as progress:
        for c in levels:
            n = requests_for(c, per_worker=2, minimum=8)
            task = progress.add_task(f"{workload_name} c={c}", total=n)
            results.append(run_level(ep, workload, c, n, warmup, slo,
                                     lambda _r, t=task: progress.advance(t)))
    return results


def capacity(ep: Endpoint, workload_name: str, slo_s: float, max_tokens: int, limit: int,
             out: Console) -> CapacityResult:
    workload = make_workload(workload_name, max_tokens=max_tokens)

    def measure(c: int) -> LevelResult:
        return run_level(ep, workload, c, requests_for(c), min(c, 4), Slo(e2el_p95_s=slo_s))

    def show(lv) -> None:
        mark = "[green]pass" if lv.passed else "[red]fail"
        p95 = f"{lv.p95_e2el_s:.2f}" if lv.p95_e2el_s is not None else "-"
        out.print(f"  c={lv.concurrency:<3} n={lv.num_requests:<3} P95 E2EL {p95} s  "
                  f"{lv.output_throughput:.0f} tok/s  attainment {lv.attainment:.0%}  {mark}[/] "
                  f"({lv.reason})")

    out.print(f"capacity search: P95 E2EL <= {slo_s:g} s, workload {workload_name}, "
              f"max_tokens {max_tokens}")
    return capacity_search(measure, slo_s, workload.describe(), limit=limit, on_level=show)


def write_plots(run_dir: Path, levels: list[LevelResult], cap: CapacityResult | None,
                slo_s: float) -> list[str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if levels:
        paths += [plots.latency_vs_concurrency(levels, slo_s, run_dir / "latency_vs_concurrency.png"),
                  plots.throughput_vs_concurrency(levels, run_dir / "throughput_vs_concurrency.png"),
                  plots.ttft_itl_distributions(levels, run_dir / "ttft_itl_distributions.png")]
    if cap:
        paths.append(plots.capacity_search_plot(cap, run_dir / "capacity_search.png"))
    return [str(p.relative_to(REPO_ROOT) if p.is_relative_to(REPO_ROOT) else p) for p in paths]


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


def run_all(opts: AllOptions, out: Console) -> tuple[Path, Baseline]:
    env = capture_environment()
    hw = hardware(opts.profile)
    settings = load_settings()
    mic = Micro() if opts.skip_micro else micro(settings.models_dir, out, peers=opts.net_peers)
    slo = Slo(e2el_p95_s=opts.slo_p95_e2e_s)
    parallel = max(max(opts.levels), opts.capacity_limit if not opts.skip_capacity else 1)
    with target(opts.url, parallel, 2048, out) as tgt:
        ep = Endpoint(tgt.url, tgt.model)
        levels = sweep(ep, opts.sweep_workload, list(opts.levels), opts.max_tokens, slo)
        cap = None if opts.skip_capacity else capacity(
            ep, opts.capacity_workload, opts.slo_p95_e2e_s, opts.max_tokens, opts.capacity_limit, out)
    single = next((lv for lv in levels if lv.concurrency == 1 and lv.metrics.tpot), None)
    roof = None
    if single and mic.stream and tgt.weight_bytes:
        op, bw = mic.stream.best_op
        roof = roofline(1.0 / single.metrics.tpot.mean, bw, f"STREAM {op}, {mic.stream.threads} threads",
                        tgt.weight_bytes)
    created = now_stamp()
    out_dir = opts.output_dir or BASELINES / safe_name(hw.host.hostname)
    run_dir = out_dir / created.replace(":", "").replace("-", "")
    baseline = Baseline(
        created_at=created, host=hw.host.hostname, environment=env, hardware=hw, micro=mic,
        serving=Serving(url=tgt.url, model=tgt.model, backend=tgt.backend, started_server=tgt.started,
                        workload=make_workload(opts.sweep_workload, max_tokens=opts.max_tokens).describe(),
                        mode="closed", levels=[ServingLevel.of(lv) for lv in levels]),
        capacity=cap, roofline=roof,
        plots=write_plots(run_dir, levels, cap, opts.slo_p95_e2e_s),
    )
    return write_baseline(baseline, out_dir), baseline
