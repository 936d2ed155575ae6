"""`promtool test rules` suites, generated from the same thresholds as the rules: for every alert one
test where its bad series make it fire, and one where good series (inside the threshold, or bad for
less than its `for:`) keep it silent."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from agents.metrics import LATENCY_BUCKETS
from dgxready.files import atomic_write_text
from monitoring.prometheus.rules import AlertRule, render_rule_file, rule_set
from monitoring.settings import AlertParams

STEP_S = 60
PER_STEP = 1000  # requests (or observations) per step in the synthetic counters

ENGINE = {"job": "engine", "instance": "127.0.0.1:8080", "backend": "llamacpp", "model": "smollm2-135m"}
EXPORTER = {"job": "dgxready-exporter", "instance": "127.0.0.1:9400"}
NODE = {"job": "node", "instance": "127.0.0.1:9100"}
GPU = {"gpu": "0", "UUID": "GPU-00000000-0000-0000-0000-000000000000", "device": "nvidia0",
       "modelName": "NVIDIA GB10", "Hostname": "spark"} | EXPORTER


@dataclass(frozen=True)
class RuleFiles:
    rules: Path
    tests: Path


@dataclass(frozen=True)
class AlertCase:
    """Input series (name{labels} -> promtool's values notation) that should make `alert` fire, series
    that should not, and the labels the fired alert carries besides alertname and severity."""
    alert: str
    bad: dict[str, str]
    good: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)


def series(name: str, labels: dict[str, str] | None = None) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in (labels or {}).items())
    return f"{name}{{{inner}}}"


def constant(value: float, steps: int) -> str:
    return f"{value:g}x{steps}"


def growing(per_step: float, steps: int) -> str:
    return f"0+{per_step:g}x{steps}"


def window_seconds(window: str) -> int:
    return int(window[:-1]) * {"s": 1, "m": 60, "h": 3600}[window[-1]]


def eval_minutes(params: AlertParams) -> int:
    longest = max(params.short_for_s, params.sustained_for_s)
    return math.ceil((longest + window_seconds(params.window)) / STEP_S) + 2


def bucket_bounds() -> list[str]:
    return [f"{b:g}" for b in LATENCY_BUCKETS] + ["+Inf"]


def histogram(metric: str, observed_le: float, steps: int) -> dict[str, str]:
    """Cumulative buckets of a histogram whose observations all fall in the bucket ending at `observed_le`."""
    out = {}
    for le in bucket_bounds():
        hit = le == "+Inf" or float(le) >= observed_le
        bucket = series(f"{metric}_bucket", {"agent": "developer-1", "le": le})
        out[bucket] = growing(PER_STEP if hit else 0, steps)
    return out


def latency_case(alert: str, metric: str, slo_s: float, steps: int) -> AlertCase:
    """Bad: every observation in the bucket just above the SLO (P95 interpolates above it).
    Good: every observation in the highest bucket still below it."""
    above = [b for b in LATENCY_BUCKETS if b >= slo_s]
    below = [b for b in LATENCY_BUCKETS if b < slo_s]
    bad_le = LATENCY_BUCKETS[LATENCY_BUCKETS.index(above[0]) + 1] if len(above) > 1 else math.inf
    return AlertCase(alert, histogram(metric, bad_le, steps), histogram(metric, below[-1], steps))


def error_case(ratio: float, steps: int) -> AlertCase:
    def requests(failed: int) -> dict[str, str]:
        base, name = {"agent": "developer-1", "backend": "local"}, "dgxready_mux_requests_total"
        return {series(name, base | {"status": "ok"}): growing(PER_STEP - failed, steps),
                series(name, base | {"status": "failed"}): growing(failed, steps)}
    bad = min(PER_STEP, max(1, math.ceil(2 * ratio * PER_STEP)))
    return AlertCase("ErrorRateHigh", requests(bad), requests(math.floor(ratio * PER_STEP / 2)))


def gauge_case(alert: str, metric: str, labels: dict[str, str], bad: float, good: float,
               steps: int) -> AlertCase:
    return AlertCase(alert, {series(metric, labels): constant(bad, steps)},
                     {series(metric, labels): constant(good, steps)}, labels)


def brief_spike(high: float, normal: float, steps: int) -> str:
    """Above the threshold for two steps, then back: shorter than a sustained alert's `for:`."""
    return f"{high:g} {high:g} {normal:g}x{steps}"


def ratio_case(alert: str, part: str, whole: str, labels: dict[str, str], bad_part: float, good_part: float,
               steps: int) -> AlertCase:
    total = 128e9
    return AlertCase(alert,
                     {series(part, labels): constant(bad_part * total, steps),
                      series(whole, labels): constant(total, steps)},
                     {series(part, labels): constant(good_part * total, steps),
                      series(whole, labels): constant(total, steps)}, labels)


def serving_cases(p: AlertParams, n: int) -> list[AlertCase]:
    mux = {"job": "multiplexer", "instance": "127.0.0.1:8090"}
    queue = series("dgxready_mux_queue_depth", mux)
    throttled = "dgxready_mux_rejections_total"
    kv = ENGINE | {"model_name": "smollm2-135m", "engine": "0"}
    return [
        latency_case("SloP95LatencyHigh", "dgxready_mux_request_duration_seconds", p.slo_p95_e2e_s, n),
        latency_case("SloP95TtftHigh", "dgxready_mux_ttft_seconds", p.slo_p95_ttft_s, n),
        error_case(p.error_ratio, n),
        gauge_case("BackendDown", "dgxready_mux_backend_up", mux | {"backend": "local"}, 0, 1, n),
        gauge_case("EngineProcessDown", "dgxready_engine_up", EXPORTER | {"model": "m", "backend": "llamacpp",
                                                                          "port": "8080"}, 0, 1, n),
        gauge_case("MultiplexerUnhealthy", "dgxready_multiplexer_healthy", EXPORTER, 0, 1, n),
        AlertCase("QueueBacklogSustained", {queue: constant(p.queue_depth + 3, n)},
                  {queue: brief_spike(p.queue_depth + 3, p.queue_depth, n)}, mux),
        gauge_case("EngineRequestsWaiting", "llamacpp:requests_deferred", ENGINE, 2, 0, n),
        AlertCase("RequestsThrottled", {series(throttled, mux | {"reason": "queue_full"}): growing(5, n)},
                  {series(throttled, mux | {"reason": "unauthorized"}): growing(5, n)}),
        gauge_case("KvCacheNearlyFull", "vllm:kv_cache_usage_perc", kv, (1 + p.kv_cache_ratio) / 2,
                   p.kv_cache_ratio / 2, n),
    ]


def oom_case(p: AlertParams, n: int) -> AlertCase:
    first_kill = eval_minutes(p) - 1
    name = series("node_vmstat_oom_kill", NODE)
    return AlertCase("HostOomKill", {name: f"0x{first_kill - 1} 1x{n}"}, {name: constant(0, n)}, NODE)


def hardware_cases(p: AlertParams, n: int) -> list[AlertCase]:
    used, free = "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"
    r, store = p.memory_used_ratio, EXPORTER | {"path": "/var/lib/dgxready/models"}

    def framebuffer(used_share: float) -> dict[str, str]:
        return {series(used, GPU): constant(used_share * 1000, n),
                series(free, GPU): constant((1 - used_share) * 1000, n)}
    return [
        gauge_case("GpuTemperatureHigh", "DCGM_FI_DEV_GPU_TEMP", GPU, p.gpu_temp_c + 5, p.gpu_temp_c - 10, n),
        AlertCase("GpuMemoryPressure", framebuffer((1 + r) / 2), framebuffer(r / 2), GPU),
        ratio_case("UnifiedMemoryPressure", "dgxready_unified_memory_available_bytes",
                   "dgxready_unified_memory_total_bytes", EXPORTER, (1 - r) / 2, 0.5, n),
        ratio_case("HostMemoryPressure", "node_memory_MemAvailable_bytes", "node_memory_MemTotal_bytes", NODE,
                   (1 - r) / 2, 0.5, n),
        oom_case(p, n),
        gauge_case("GpuXidError", "DCGM_FI_DEV_XID_ERRORS", GPU, 79, 0, n),
        ratio_case("ModelStoreDiskNearlyFull", "dgxready_model_store_disk_free_bytes",
                   "dgxready_model_store_disk_total_bytes", store, p.disk_free_ratio / 2, 0.5, n),
    ]


def scrape_cases(n: int) -> list[AlertCase]:
    up = series("up", EXPORTER)
    engine_up = {"job": "engine", "instance": ENGINE["instance"]}
    return [
        AlertCase("ExporterMissing", {up: constant(0, n)}, {up: constant(1, n)}),
        gauge_case("ScrapeTargetDown", "up", engine_up, 0, 1, n),
    ]


def alert_cases(params: AlertParams | None = None) -> list[AlertCase]:
    p = params or AlertParams()
    n = eval_minutes(p) + 5
    return serving_cases(p, n) + hardware_cases(p, n) + scrape_cases(n)


def input_series(values: dict[str, str]) -> list[dict[str, str]]:
    return [{"series": name, "values": v} for name, v in values.items()]


def expected_alert(rule: AlertRule, case: AlertCase, runbook_base: str) -> dict:
    return {"exp_labels": case.labels | {"severity": rule.severity},
            "exp_annotations": rule.annotations(runbook_base)}


def case_tests(rule: AlertRule, case: AlertCase, eval_min: int, runbook_base: str) -> list[dict]:
    def test(name: str, values: dict[str, str], expected: list[dict]) -> dict:
        return {"name": name, "interval": f"{STEP_S}s", "input_series": input_series(values),
                "alert_rule_test": [{"eval_time": f"{eval_min}m", "alertname": rule.name,
                                     "exp_alerts": expected}]}
    return [test(f"{rule.name} fires on its bad series", case.bad, [expected_alert(rule, case, runbook_base)]),
            test(f"{rule.name} stays silent on good series", case.good, [])]


def rule_test_suite(rule_file: str, params: AlertParams | None = None,
                    runbook_base: str = "runbooks/alerts.md") -> dict:
    p = params or AlertParams()
    rules, eval_min = rule_set(p), eval_minutes(p)
    tests = [test for case in alert_cases(p)
             for test in case_tests(rules.alert(case.alert), case, eval_min, runbook_base)]
    return {"rule_files": [rule_file], "evaluation_interval": f"{STEP_S}s", "tests": tests}


def render_rule_test_suite(rule_file: str, params: AlertParams | None = None,
                           runbook_base: str = "runbooks/alerts.md") -> str:
    return yaml.safe_dump(rule_test_suite(rule_file, params, runbook_base), sort_keys=False, allow_unicode=True,
                          width=1000)


def write_rule_files(folder: Path, params: AlertParams | None = None,
                     runbook_base: str = "runbooks/alerts.md") -> RuleFiles:
    """rules.yml and its promtool suite rules_test.yml, side by side in `folder`."""
    files = RuleFiles(folder / "rules.yml", folder / "rules_test.yml")
    atomic_write_text(files.rules, render_rule_file(params, runbook_base))
    atomic_write_text(files.tests, render_rule_test_suite(files.rules.name, params, runbook_base))
    return files
