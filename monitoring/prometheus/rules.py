"""Recording rules for the SLO figures and the alert rules, defined once here and rendered as a
Prometheus rule file. Every alert links to its section of runbooks/alerts.md."""
from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from monitoring.settings import AlertParams

RECORDING_GROUP = "dgxready-slo"
ALERT_GROUP = "dgxready-alerts"
EXPORTER_JOB = "dgxready-exporter"
# Final outcomes that are failures (a "retried" attempt is not an outcome; 4xx are the client's).
ERROR_STATUSES = "failed|failed_midstream|timeout|bad_answer|5.."
THROTTLE_REASONS = "queue_full|agent_queue_full|rate_limited"

P95_E2E = "dgxready:mux_request_duration_seconds:p95"
P95_TTFT = "dgxready:mux_ttft_seconds:p95"
P95_QUEUE_WAIT = "dgxready:mux_queue_wait_seconds:p95"
ERROR_RATIO = "dgxready:mux_error_ratio"
REQUEST_RATE = "dgxready:mux_requests:rate"
COMPLETION_TOKEN_RATE = "dgxready:mux_completion_tokens:rate"
THROTTLED_RATE = "dgxready:mux_throttled_requests:rate"


@dataclass(frozen=True)
class RecordingRule:
    record: str
    expr: str


@dataclass(frozen=True)
class AlertRule:
    name: str
    expr: str
    for_s: float
    severity: str
    summary: str

    @property
    def anchor(self) -> str:
        """The GitHub-style anchor of this alert's `## Name` heading in runbooks/alerts.md."""
        return self.name.lower()

    def runbook_url(self, base: str) -> str:
        return f"{base}#{self.anchor}"

    def annotations(self, runbook_base: str) -> dict[str, str]:
        return {"summary": self.summary, "runbook_url": self.runbook_url(runbook_base)}


@dataclass(frozen=True)
class PromQLExpression:
    """One expression of the rule file, named by the rule it belongs to."""
    rule: str
    expr: str
    is_recording: bool


@dataclass(frozen=True)
class RuleSet:
    recording: list[RecordingRule] = field(default_factory=list)
    alerts: list[AlertRule] = field(default_factory=list)

    def alert(self, name: str) -> AlertRule:
        return next(a for a in self.alerts if a.name == name)


def p95(histogram: str, window: str) -> str:
    return f"histogram_quantile(0.95, sum by (le) (rate({histogram}_bucket[{window}])))"


def recording_rules(window: str) -> list[RecordingRule]:
    requests = "dgxready_mux_requests_total"
    return [
        RecordingRule(P95_E2E, p95("dgxready_mux_request_duration_seconds", window)),
        RecordingRule(P95_TTFT, p95("dgxready_mux_ttft_seconds", window)),
        RecordingRule(P95_QUEUE_WAIT, p95("dgxready_mux_queue_wait_seconds", window)),
        RecordingRule(ERROR_RATIO,
                      f'(sum(rate({requests}{{status=~"{ERROR_STATUSES}"}}[{window}])) or vector(0))'
                      f' / sum(rate({requests}{{status!="retried"}}[{window}]))'),
        RecordingRule(REQUEST_RATE, f'sum(rate({requests}{{status!="retried"}}[{window}]))'),
        RecordingRule(COMPLETION_TOKEN_RATE,
                      f'sum(rate(dgxready_mux_tokens_total{{direction="completion"}}[{window}]))'),
        RecordingRule(THROTTLED_RATE, f'sum(rate(dgxready_mux_rejections_total{{reason=~"{THROTTLE_REASONS}"}}'
                                      f'[{window}])) or vector(0)'),
    ]


def used_ratio(used: str, free: str) -> str:
    return f"{used} / ({used} + {free})"


def serving_alerts(p: AlertParams) -> list[AlertRule]:
    short, sustained = p.short_for_s, p.sustained_for_s
    return [
        AlertRule("SloP95LatencyHigh", f"{P95_E2E} > {p.slo_p95_e2e_s:g}", short, "critical",
                  f"P95 end-to-end latency at the multiplexer is above the {p.slo_p95_e2e_s:g} s SLO"),
        AlertRule("SloP95TtftHigh", f"{P95_TTFT} > {p.slo_p95_ttft_s:g}", short, "critical",
                  f"P95 time to first token at the multiplexer is above the {p.slo_p95_ttft_s:g} s SLO"),
        AlertRule("ErrorRateHigh", f"{ERROR_RATIO} > {p.error_ratio:g}", short, "critical",
                  f"more than {100 * p.error_ratio:g}% of requests through the multiplexer fail"),
        AlertRule("BackendDown", "dgxready_mux_backend_up == 0", short, "critical",
                  "the multiplexer has taken an inference backend out of rotation"),
        AlertRule("EngineProcessDown", "dgxready_engine_up == 0", short, "critical",
                  "a recorded inference engine process is not running"),
        AlertRule("MultiplexerUnhealthy", "dgxready_multiplexer_healthy == 0", short, "critical",
                  "the multiplexer's /health does not answer ok"),
        AlertRule("QueueBacklogSustained", f"dgxready_mux_queue_depth > {p.queue_depth:g}", sustained,
                  "warning", "requests keep waiting in the multiplexer's queue: demand exceeds capacity"),
        AlertRule("EngineRequestsWaiting", "llamacpp:requests_deferred > 0 or vllm:num_requests_waiting > 0",
                  sustained, "warning", "the engine keeps requests waiting for a free slot"),
        AlertRule("RequestsThrottled", f"{THROTTLED_RATE} > 0", sustained, "warning",
                  "the multiplexer keeps answering 429 (queue full or rate limited)"),
        AlertRule("KvCacheNearlyFull", f"vllm:kv_cache_usage_perc > {p.kv_cache_ratio:g}", sustained, "warning",
                  f"vLLM's KV cache is more than {100 * p.kv_cache_ratio:g}% full"),
    ]


def hardware_alerts(p: AlertParams) -> list[AlertRule]:
    sustained, ratio = p.sustained_for_s, p.memory_used_ratio
    framebuffer = used_ratio("DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE")
    unified = "1 - dgxready_unified_memory_available_bytes / dgxready_unified_memory_total_bytes"
    host = "1 - node_memory_MemAvailable_bytes / node_memory_MemTotal_bytes"
    return [
        AlertRule("GpuTemperatureHigh", f"DCGM_FI_DEV_GPU_TEMP > {p.gpu_temp_c:g}", sustained, "warning",
                  f"a GPU is hotter than {p.gpu_temp_c:g} °C"),
        AlertRule("GpuMemoryPressure", f"{framebuffer} > {ratio:g}",
                  sustained, "warning", f"more than {100 * ratio:g}% of a GPU's framebuffer is in use"),
        AlertRule("UnifiedMemoryPressure", f"{unified} > {ratio:g}", sustained, "warning",
                  f"more than {100 * ratio:g}% of the unified (CPU+GPU) memory is in use"),
        AlertRule("HostMemoryPressure", f"{host} > {ratio:g}", sustained, "warning",
                  f"more than {100 * ratio:g}% of the host's memory is in use"),
        AlertRule("HostOomKill", f"increase(node_vmstat_oom_kill[{p.window}]) > 0", 0, "warning",
                  "the kernel's OOM killer has killed a process"),
        AlertRule("GpuXidError", "DCGM_FI_DEV_XID_ERRORS != 0", 0, "critical",
                  "a GPU reported an XID error"),
        AlertRule("ModelStoreDiskNearlyFull",
                  f"dgxready_model_store_disk_free_bytes / dgxready_model_store_disk_total_bytes"
                  f" < {p.disk_free_ratio:g}", sustained, "warning",
                  f"the model store's disk has less than {100 * p.disk_free_ratio:g}% free"),
    ]


def scrape_alerts(p: AlertParams) -> list[AlertRule]:
    return [
        AlertRule("ExporterMissing", f'absent(up{{job="{EXPORTER_JOB}"}} == 1)', p.short_for_s, "warning",
                  "the dgxready exporter is not scraped: GPU, engine and disk alerts are blind"),
        AlertRule("ScrapeTargetDown", "up == 0", p.short_for_s, "warning",
                  "Prometheus cannot scrape one of its targets"),
    ]


def rule_set(params: AlertParams | None = None) -> RuleSet:
    p = params or AlertParams()
    return RuleSet(recording_rules(p.window), serving_alerts(p) + hardware_alerts(p) + scrape_alerts(p))


def all_expressions(params: AlertParams | None = None) -> list[PromQLExpression]:
    """Every PromQL expression in the rule file: recording rules first, then alerts."""
    rules = rule_set(params)
    return ([PromQLExpression(r.record, r.expr, True) for r in rules.recording]
            + [PromQLExpression(a.name, a.expr, False) for a in rules.alerts])


def duration(seconds: float) -> str:
    return f"{seconds:g}s"


def rule_file(params: AlertParams | None = None, runbook_base: str = "runbooks/alerts.md") -> dict:
    rules = rule_set(params)
    return {"groups": [
        {"name": RECORDING_GROUP, "rules": [{"record": r.record, "expr": r.expr} for r in rules.recording]},
        {"name": ALERT_GROUP, "rules": [
            {"alert": a.name, "expr": a.expr, "for": duration(a.for_s), "labels": {"severity": a.severity},
             "annotations": a.annotations(runbook_base)} for a in rules.alerts]},
    ]}


def render_rule_file(params: AlertParams | None = None, runbook_base: str = "runbooks/alerts.md") -> str:
    return yaml.safe_dump(rule_file(params, runbook_base), sort_keys=False, allow_unicode=True, width=1000)
