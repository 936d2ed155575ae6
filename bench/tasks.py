"""Invoke tasks for the benchmark kit: thin shells over bench.runner functions."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

from invoke import Collection, task
from invoke.exceptions import Exit

from bench import runner
from bench.compare import SERVING_RUN_SPREAD, comparison_table, regressions, table_title
from bench.compare import compare as compare_runs
from bench.environment import capture_environment
from bench.loadgen import Endpoint
from bench.metrics import Slo
from bench.predict import load_profiles
from bench.prediction import PredictRequest, predict_from, requested_max_tokens, requested_model
from bench.remote import RemoteRun, run_remote
from bench.report import Baseline, Serving, ServingLevel, load_baseline, now_stamp, write_baseline
from bench.serving import run_rate
from bench.summary import print_prediction, print_summary, print_verdict
from bench.verdict import judge_target
from bench.workloads import WORKLOAD_NAMES, make_workload
from dgxready.cli import out, user_errors
from dgxready.progress import new_table
from dgxready.roles import load_roles
from dgxready.settings import load_settings
from model.catalog import load_catalog


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise Exit(f"error: --concurrency {text!r}: give a comma-separated list of integers", 1) from None
    if not values or min(values) < 1:
        raise Exit(f"error: --concurrency {text!r}: every level must be >= 1", 1)
    return values


def _sigterm_as_interrupt() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@task(help={"profile": "expected specs to check: dgx-spark or generic"})
@user_errors
def hw(c, profile="generic"):
    """Host and GPU facts (NVML) with a pass/fail list for a profile; exit 1 on a failed check."""
    h = runner.hardware(profile)
    out.print(h.host)
    for g in h.gpus:
        out.print(g)
    if not h.gpus:
        out.print("no NVIDIA GPU (NVML found none): a valid result")
    for chk in h.checks:
        out.print(f"[{'green' if chk.passed else 'red'}]{'PASS' if chk.passed else 'FAIL'}[/] "
                  f"{chk.name}: {chk.detail}")
    if not h.profile_passed:
        raise Exit(code=1)


@task(help={"repetitions": "STREAM repetitions (best of N)",
            "io_mib": "size of the storage test file in MiB",
            "net_peer": "HOST:PORT running `python -m bench.net --serve`, comma-separated"})
@user_errors
def micro(c, repetitions=10, io_mib=1024, net_peer=""):
    """STREAM memory bandwidth, storage I/O on the model store, TCP to loopback and peers."""
    peers = tuple(p for p in net_peer.split(",") if p)
    runner.micro(load_settings().models_dir, out, int(repetitions), int(io_mib) << 20, peers)


def _save(partial: Baseline) -> Path:
    path = write_baseline(partial, runner.BASELINES / runner.safe_name(partial.host))
    out.print(f"wrote {path}")
    return path


@task(help={
    "url": "OpenAI-compatible base URL (default: start the default model here)",
    "concurrency": "closed-loop levels, comma-separated",
    "rate": "open-loop request rate per second (instead of --concurrency)",
    "burstiness": "gamma shape of arrivals with --rate; 1 is Poisson",
    "num_requests": "requests per level (default: two per worker and at least 8 in a closed loop, "
                    "50 with --rate)",
    "workload": "synthetic or agents",
    "max_tokens": "output tokens per request (synthetic: the length; agents: the cap)",
    "slo_p95_e2e": "SLO in seconds, for goodput",
})
@user_errors
def serve(c, url=None, concurrency="1,2,4,8,16", rate=None, burstiness=1.0, num_requests=None,
          workload="synthetic", max_tokens=128, slo_p95_e2e=6.0):
    """Streaming load against an endpoint; vLLM-defined TTFT/TPOT/ITL/E2EL and goodput."""
    _sigterm_as_interrupt()
    levels = _ints(concurrency)
    slo = Slo(e2el_p95_s=float(slo_p95_e2e))
    with runner.target(url, max(levels), 2048, out) as tgt:
        ep = Endpoint(tgt.url, tgt.model)
        if rate:
            n = int(num_requests or 50)
            results = [run_rate(ep, make_workload(workload, max_tokens=int(max_tokens)), float(rate),
                                float(burstiness), n, None, 2, slo)]
        else:
            results = runner.sweep(ep, workload, list(levels), int(max_tokens), slo, out,
                                   stop_when_saturated=False,
                                   num_requests=int(num_requests) if num_requests else None)
    hw_ = runner.hardware("generic")
    b = Baseline(created_at=now_stamp(), host=hw_.host.hostname, environment=capture_environment(),
                 hardware=hw_, serving=Serving(
                     url=tgt.url, model=tgt.model, backend=tgt.backend, started_server=tgt.started,
                     workload=make_workload(workload, max_tokens=int(max_tokens)).describe(),
                     mode="open" if rate else "closed", burstiness=float(burstiness) if rate else None,
                     levels=[ServingLevel.of(lv) for lv in results]))
    print_summary(b, out)
    _save(b)


@task(help={
    "slo_p95_e2e": "the SLO: P95 end-to-end latency in seconds",
    "workload": "agents (the seven roles, multi-turn) or synthetic",
    "url": "OpenAI-compatible base URL (default: start the default model here)",
    "max_tokens": "output token cap per request; it decides the answer, so it is recorded",
    "limit": "largest concurrency to try",
})
@user_errors
def capacity(c, slo_p95_e2e=6.0, workload="agents", url=None, max_tokens=128, limit=32):
    """Largest concurrency whose P95 E2E latency meets the SLO: double, then bisect."""
    _sigterm_as_interrupt()
    with runner.target(url, int(limit), 2048, out) as tgt:
        result = runner.capacity(Endpoint(tgt.url, tgt.model), workload, float(slo_p95_e2e),
                                 int(max_tokens), int(limit), out)
    hw_ = runner.hardware("generic")
    b = Baseline(created_at=now_stamp(), host=hw_.host.hostname, environment=capture_environment(),
                 hardware=hw_, capacity=result)
    print_summary(b, out)
    _save(b)


@task(help={
    "url": "benchmark this endpoint instead of starting the default model",
    "host": "run on an inventory host (or user@host) over SSH and fetch the results",
    "profile": "hardware profile to check: generic or dgx-spark",
    "concurrency": "serving sweep levels, comma-separated",
    "workload": "capacity-search workload: agents or synthetic",
    "sweep_workload": "serving-sweep workload: synthetic or agents",
    "slo_p95_e2e": "SLO: P95 end-to-end latency in seconds",
    "target_agents": "how many concurrent agents the SLO must hold for (the verdict's target)",
    "slo_exit": "exit 0 when the target agents meet the SLO, 1 when not (for CI); needs the capacity search",
    "max_tokens": "output tokens per request",
    "limit": "largest concurrency the capacity search tries (at least --target-agents)",
    "output_dir": "write the JSON and plots here (default bench/baselines/<host>/)",
    "skip_micro": "skip the microbenchmarks",
    "skip_capacity": "skip the capacity search (and so the SLO verdict)",
    "full_sweep": "measure every --concurrency level, even after one whose P95 E2EL is beyond twice the SLO",
    "sweep_requests": "requests at each sweep level (default: two per worker and at least 8); more "
                      "give steadier P95s, e.g. to calibrate `bench.predict --profile measured`",
    "remote_dir": "with --host: the toolkit's checkout on that host",
    "net_peer": "HOST:PORT running `python -m bench.net --serve`, comma-separated (e.g. other hosts)",
    "ssh_config": "with --host: an ssh_config file to read instead of ~/.ssh/config",
}, auto_shortflags=False)
@user_errors
def all_(c, url=None, host=None, profile="generic", concurrency="1,2,4,8,16", workload="agents",
         slo_p95_e2e=6.0, target_agents=10, slo_exit=False, max_tokens=128, limit=32, output_dir=None,
         skip_micro=False, skip_capacity=False, remote_dir="~/dgxready", ssh_config=None, net_peer="",
         full_sweep=False, sweep_workload="synthetic", sweep_requests=0):
    """Everything: hardware, microbenchmarks, serving sweep, capacity, roofline, SLO verdict; JSON + plots."""
    check_verdict_options(int(target_agents), int(limit), skip_capacity, slo_exit)
    check_workloads(workload=workload, sweep_workload=sweep_workload)
    if int(sweep_requests) < 0:
        raise Exit(f"error: --sweep-requests {sweep_requests}: give a positive number, or 0 for the default", 1)
    if host:
        forwarded = ["--profile", profile, "--concurrency", concurrency, "--workload", workload,
                     "--sweep-workload", sweep_workload,
                     "--slo-p95-e2e", str(slo_p95_e2e), "--max-tokens", str(max_tokens),
                     "--limit", str(limit)]
        forwarded += ["--skip-micro"] * bool(skip_micro) + ["--skip-capacity"] * bool(skip_capacity)
        forwarded += ["--full-sweep"] * bool(full_sweep)
        forwarded += ["--sweep-requests", str(sweep_requests)] * bool(int(sweep_requests))
        path, baseline = fetched_run(RemoteRun(host, remote_dir, tuple(forwarded), ssh_config,
                                         Path(output_dir) if output_dir else None))
    else:
        _sigterm_as_interrupt()
        path, baseline = local_run(runner.AllOptions(
            url=url, profile=profile, levels=_ints(concurrency), capacity_workload=workload,
            sweep_workload=sweep_workload,
            slo_p95_e2e_s=float(slo_p95_e2e), max_tokens=int(max_tokens), capacity_limit=int(limit),
            output_dir=Path(output_dir) if output_dir else None, skip_micro=skip_micro,
            skip_capacity=skip_capacity, net_peers=tuple(p for p in net_peer.split(",") if p),
            full_sweep=bool(full_sweep), target_agents=int(target_agents),
            sweep_requests=int(sweep_requests) or None))
    if baseline.capacity:
        verdict = judge_target(baseline.capacity, int(target_agents))
        print_verdict(verdict, out, path)
        if slo_exit and not verdict.met:
            raise Exit(code=verdict.exit_code)


def fetched_run(run: RemoteRun) -> tuple[Path, Baseline]:
    """bench.all on another host; its output streams as it runs, its summary is printed here."""
    path = run_remote(run, out)
    baseline = load_baseline(path)
    print_summary(baseline, out)
    out.print(f"wrote {path}")
    return path, baseline


def local_run(opts: runner.AllOptions) -> tuple[Path, Baseline]:
    """bench.all here; each part is printed as it is measured."""
    path, baseline = runner.run_all(opts, out)
    for p in baseline.plots:
        out.print(f"plot {p}")
    out.print(f"wrote {path}")
    return path, baseline


def check_workloads(**flags: str) -> None:
    """Before anything is measured: each --*workload flag names a workload."""
    for flag, name in flags.items():
        if name not in WORKLOAD_NAMES:
            raise Exit(f"error: --{flag.replace('_', '-')} {name!r}: choose {' or '.join(WORKLOAD_NAMES)}", 1)


def check_verdict_options(target_agents: int, limit: int, skip_capacity: bool, slo_exit: bool) -> None:
    if target_agents < 1:
        raise Exit(f"error: --target-agents {target_agents}: give at least 1", 1)
    if slo_exit and skip_capacity:
        raise Exit("error: --slo-exit needs the capacity search; drop --skip-capacity", 1)
    if not skip_capacity and limit < target_agents:
        raise Exit(f"error: --limit {limit} is below --target-agents {target_agents}: the capacity "
                   f"search could never reach the target", 1)


@task(help={"before": "baseline JSON to compare from", "after": "baseline JSON to compare to",
            "threshold": "relative change counted as a regression (0.10 = 10%)",
            "run_spread": "how far a whole run's serving figures move between unchanged runs, as the "
                          "standard deviation of their log (0.10 measured on a busy shared VM; "
                          "0.03 suits a dedicated host)"})
@user_errors
def compare(c, before, after, threshold=0.10, run_spread=SERVING_RUN_SPREAD):
    """Verdict per metric between two baselines (improved, regressed, unchanged, inconclusive);
    exit 1 on a regression: significant and beyond the threshold."""
    rows = compare_runs(load_baseline(Path(before)), load_baseline(Path(after)), float(threshold),
                        run_spread=float(run_spread))
    out.print(comparison_table(rows, new_table(out, table_title(before, after, float(threshold)))))
    bad = regressions(rows)
    if bad:
        raise Exit(f"{len(bad)} regression(s): significant and beyond {float(threshold):.0%}", code=1)


@task(help={"path": "baseline JSON file to validate against the schema"})
@user_errors
def validate(c, path):
    """Check a baseline JSON against the schema of its version (bench/schema/baseline-v*.schema.json)."""
    load_baseline(Path(path))
    out.print(f"{path}: valid")


@task(help={"only": "run one check: memory, storage or serving (default: all three)"})
@user_errors
def accuracy(c, only=None):
    """Compare the kit with mbw, fio and llama-server's own counters; exit 1 if out of bounds."""
    names = [only] if only else ["memory", "storage", "serving"]
    failed = []
    for name in names:
        if name not in ("memory", "storage", "serving"):
            raise Exit(f"error: --only {name!r}: choose memory, storage or serving", 2)
        rc = c.run(f"{sys.executable} -m bench.accuracy.{name}", warn=True, pty=False).exited
        if rc:
            failed.append(name)
    if failed:
        raise Exit(f"out of bounds or not runnable: {', '.join(failed)}", code=1)


@task(help={
    "profile": "hardware: dgx-spark, h100, h200 (bench/profiles.yaml) or measured (from --baseline)",
    "model": "catalog model (default: the baseline's with --baseline, else mistral-7b-instruct-v0.3)",
    "format": "its format, deciding the engine unless --engine (default: the baseline's, fp8 for Mistral)",
    "kv_dtype": "KV cache dtype: f16, bf16, fp8, q8_0 or q4_0",
    "engine": "llamacpp or vllm (default: the format's engine; measured: the baseline's)",
    "agents": "target number of concurrent agents", "workload": "agents (the role files) or synthetic",
    "max_tokens": "output tokens per request, for agents a cap below the roles' own (default: the "
                  "baseline's when it ran this workload, else 4096 for agents, 128 for synthetic)",
    "slo_p95_e2e": "SLO: P95 end-to-end latency in seconds",
    "think_s": "seconds an agent thinks between its answer and its next request",
    "baseline": "a bench.all JSON: calibrates --profile measured, and its levels check the model",
    "output_dir": "write the JSON and the plot here (default bench/baselines/predictions/)",
})
@user_errors
def predict(c, profile="dgx-spark", model=None, format=None, kv_dtype="f16",
            engine=None, agents=10, workload="agents", max_tokens=None, slo_p95_e2e=6.0, think_s=0.0,
            baseline=None, output_dir=None):
    """Predict P95 latency, throughput and SLO capacity per concurrency from physics, with the levers."""
    catalog = load_catalog()
    measured = load_baseline(Path(baseline)) if baseline else None
    model, format = requested_model(model, format, measured, catalog, str(baseline or ""))
    tokens = requested_max_tokens(workload, int(max_tokens) if max_tokens is not None else None, measured)
    req = PredictRequest(profile, model, format, kv_dtype, workload, tokens, int(agents),
                         float(slo_p95_e2e), engine, float(think_s))
    pred = predict_from(req, catalog, load_profiles(), list(load_roles().values()), measured,
                        str(baseline or ""))
    print_prediction(pred, out)
    for path in runner.write_prediction_files(pred, Path(output_dir) if output_dir else None):
        out.print(f"wrote {path}")


ns = Collection("bench")
for t in (hw, micro, serve, capacity, compare, validate, accuracy, predict):
    ns.add_task(t)
ns.add_task(all_, name="all")
