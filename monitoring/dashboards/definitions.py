"""The four dashboards: overview (the SLO first), agents, engine and hardware. Every expression
here is sent to a real Prometheus by tests/test_monitoring_dashboards_prometheus.py.

Metric names: the multiplexer's `dgxready_mux_*` (agents/metrics.py), llama.cpp's `llamacpp:*`,
vLLM's `vllm:*`, dcgm-exporter's `DCGM_FI_*` (our exporter uses the same names), node_exporter's
`node_*`, and the exporter's `dgxready_unified_memory_*` and `dgxready_bench_capacity_agents`."""
from __future__ import annotations

from monitoring.capacity import CAPACITY_METRIC
from monitoring.dashboards.model import RATE_INTERVAL, Dashboard, Panel, Query, Row

SLO_S = 6.0
W = RATE_INTERVAL
ROLE_OF_AGENT = '"role", "$1", "agent", "(.+)-[0-9]+"'  # agent names are <role>-<n> (agents/config.py)


def p95(bucket: str, by: str = "") -> str:
    group = f"{by}, le" if by else "le"
    return f"histogram_quantile(0.95, sum by ({group}) (rate({bucket}[{W}])))"


def p95_by_role(bucket: str) -> str:
    return f"histogram_quantile(0.95, sum by (role, le) (label_replace(rate({bucket}[{W}]), {ROLE_OF_AGENT})))"


def by_role(inner: str, extra: str = "") -> str:
    return f"sum by (role{extra}) (label_replace({inner}, {ROLE_OF_AGENT}))"


ERROR_RATIO = (f'(sum(rate(dgxready_mux_requests_total{{status!~"ok|retried"}}[{W}])) or vector(0))'
               f' / sum(rate(dgxready_mux_requests_total{{status!="retried"}}[{W}]))')

OVERVIEW = Dashboard(
    uid="dgxready-overview",
    title="dgxready: overview",
    description="The SLO first: P95 end-to-end latency at the multiplexer against 6 s, then load, "
                "queue and errors, and the capacity the last `invoke bench.all` measured.",
    rows=(
        Row("SLO: P95 end-to-end latency under 6 s", (
            Panel("P95 end-to-end latency and TTFT (multiplexer)", (
                Query(p95("dgxready_mux_request_duration_seconds_bucket"), "P95 end-to-end"),
                Query(p95("dgxready_mux_ttft_seconds_bucket"), "P95 time to first token"),
            ), unit="s", line=SLO_S, width=16,
                description="Above the red line the SLO (P95 < 6 s) is broken."),
            Panel("Capacity (last bench.all)", (
                Query(f"max by (host, workload) ({CAPACITY_METRIC})", "{{host}} {{workload}}"),
            ), kind="stat", width=8, needs="baseline",
                description="Concurrent agents meeting the SLO in the newest baseline under "
                            "bench/baselines/<host>/; compare with the agents now active."),
        )),
        Row("Load", (
            Panel("Requests per second by status", (
                Query(f"sum by (status) (rate(dgxready_mux_requests_total[{W}]))", "{{status}}"),
            ), unit="reqps", width=8),
            Panel("Tokens per second", (
                Query(f"sum by (direction) (rate(dgxready_mux_tokens_total[{W}]))", "{{direction}}"),
            ), unit="short", width=8),
            Panel("Active agents", (
                Query(f'count(sum by (agent) (rate(dgxready_mux_requests_total{{status="ok"}}[{W}])) > 0)',
                      "agents with answered requests"),
            ), unit="short", width=8),
        )),
        Row("Queue and errors", (
            Panel("Queue depth and requests in flight", (
                Query("dgxready_mux_queue_depth", "waiting for a slot"),
                Query("sum(dgxready_mux_backend_inflight)", "in flight at the backends"),
            ), unit="short", width=8),
            Panel("Error ratio", (Query(ERROR_RATIO, "failed / all requests"),),
                  unit="percentunit", line=0.01, width=8,
                  description="Requests that did not end in 200 (retries excluded); alert above 1%."),
            Panel("Rejections (429s and others) per second", (
                Query(f"sum by (reason) (rate(dgxready_mux_rejections_total[{W}])) "
                      f"or on() vector(0)", "{{reason}}"),
            ), unit="reqps", width=8),
        )),
    ),
)

AGENTS = Dashboard(
    uid="dgxready-agents",
    title="dgxready: agents",
    description="Per role and per agent: requests, latency, tokens, and tool calls the role may not make.",
    rows=(
        Row("Per role", (
            Panel("Requests per second by role", (
                Query(by_role(f'rate(dgxready_mux_requests_total{{status="ok"}}[{W}])'), "{{role}}"),
            ), unit="reqps"),
            Panel("P95 end-to-end latency by role", (
                Query(p95_by_role("dgxready_mux_request_duration_seconds_bucket"), "{{role}}"),
            ), unit="s", line=SLO_S),
            Panel("Tokens per second by role", (
                Query(by_role(f"rate(dgxready_mux_tokens_total[{W}])", ", direction"),
                      "{{role}} {{direction}}"),
            ), unit="short"),
            Panel("Denied tool calls by role", (
                Query(by_role(f'increase(dgxready_mux_tool_calls_total{{outcome="denied"}}[{W}])', ", tool"),
                      "{{role}}: {{tool}}"),
            ), unit="short",
                description="A role asking for a tool outside its allowlist (agents/roles/*.yaml)."),
        )),
        Row("Per agent", (
            Panel("P95 end-to-end latency by agent", (
                Query(p95("dgxready_mux_request_duration_seconds_bucket", "agent"), "{{agent}}"),
            ), unit="s", line=SLO_S),
            Panel("P95 queue wait by agent", (
                Query(p95("dgxready_mux_queue_wait_seconds_bucket", "agent"), "{{agent}}"),
            ), unit="s", description="Fair queueing at work: one agent waiting far longer than the rest "
                                     "is starved."),
            Panel("Output tokens per second by agent", (
                Query(f'sum by (agent) (rate(dgxready_mux_tokens_total{{direction="completion"}}[{W}]))',
                      "{{agent}}"),
            ), unit="short"),
            Panel("Tool calls by outcome", (
                Query(f"sum by (outcome) (increase(dgxready_mux_tool_calls_total[{W}]))", "{{outcome}}"),
            ), unit="short"),
        )),
        Row("Events (Loki)", (
            Panel("Multiplexer events", (
                Query('{service="dgxready-mux"} | json | level=~"WARNING|ERROR" or event=~"tool.*"'),
            ), kind="logs", needs="loki", width=24,
                description="Structured log lines; filter by agent or session with | session=\"...\"."),
        )),
    ),
)

ENGINE = Dashboard(
    uid="dgxready-engine",
    title="dgxready: engine",
    description="The inference engine: llama.cpp's llama-server (CPU or CUDA) or vLLM (GPU): requests "
                "running and waiting, KV cache, throughput.",
    rows=(
        Row("llama.cpp", (
            Panel("Requests processing and deferred (llama.cpp)", (
                Query('sum by (instance) (llamacpp:requests_processing)', "{{instance}} processing"),
                Query('sum by (instance) (llamacpp:requests_deferred)', "{{instance}} deferred"),
            ), unit="short",
                description="Deferred requests wait for a free slot (-np); if it lasts, add slots."),
            Panel("Tokens per second (llama.cpp)", (
                Query(f'sum by (instance) (rate(llamacpp:tokens_predicted_total[{W}]))',
                      "{{instance}} generated"),
                Query(f'sum by (instance) (rate(llamacpp:prompt_tokens_total[{W}]))', "{{instance}} prompt"),
            ), unit="short"),
            Panel("KV cache: largest context and busy slots (llama.cpp)", (
                Query('max by (instance) (llamacpp:n_tokens_max)', "{{instance}} largest context (tokens)"),
                Query('max by (instance) (llamacpp:n_busy_slots_per_decode)',
                      "{{instance}} busy slots per decode"),
            ), unit="short",
                description="llama-server has no KV usage gauge (its /slots endpoint has it per slot); the "
                            "largest context seen against ctx/np says how close a slot came to full."),
        )),
        Row("vLLM", (
            Panel("KV cache usage (vLLM)", (
                Query('max by (model_name) (vllm:kv_cache_usage_perc)', "{{model_name}}"),
            ), unit="percentunit", line=0.9, needs="vllm"),
            Panel("Requests running and waiting (vLLM)", (
                Query('sum by (model_name) (vllm:num_requests_running)', "{{model_name}} running"),
                Query('sum by (model_name) (vllm:num_requests_waiting)', "{{model_name}} waiting"),
            ), unit="short", needs="vllm"),
            Panel("P95 latency (vLLM)", (
                Query(p95("vllm:e2e_request_latency_seconds_bucket"), "P95 end-to-end"),
                Query(p95("vllm:time_to_first_token_seconds_bucket"), "P95 TTFT"),
                Query(p95("vllm:request_queue_time_seconds_bucket"), "P95 queue time"),
            ), unit="s", line=SLO_S, needs="vllm"),
            Panel("Prefix cache hit ratio and preemptions (vLLM)", (
                Query(f'sum(rate(vllm:prefix_cache_hits_total[{W}])) '
                      f'/ sum(rate(vllm:prefix_cache_queries_total[{W}]))', "prefix cache hit ratio"),
                Query(f'sum(rate(vllm:num_preemptions_total[{W}]))', "preemptions per second"),
            ), unit="short", needs="vllm"),
            Panel("Tokens per second (vLLM)", (
                Query(f'sum(rate(vllm:generation_tokens_total[{W}]))', "generated"),
                Query(f'sum(rate(vllm:prompt_tokens_total[{W}]))', "prompt"),
            ), unit="short", needs="vllm"),
        )),
        Row("Engine process (exporter)", (
            Panel("Engine up", (Query("dgxready_engine_up", "{{model}} {{backend}} :{{port}}"),),
                  unit="short", width=8),
            Panel("Engine resident memory", (
                Query("dgxready_engine_resident_memory_bytes", "{{model}} {{backend}} :{{port}}"),
            ), unit="bytes", width=8),
            Panel("Engine restarts", (
                Query(f"sum by (model, backend) (increase(dgxready_engine_restarts_total[{W}]))",
                      "{{model}} {{backend}}"),
            ), unit="short", width=8),
        )),
        Row("Backends seen by the multiplexer", (
            Panel("Requests in flight per backend", (
                Query("dgxready_mux_backend_inflight", "{{backend}}"),
            ), unit="short", width=8),
            Panel("Backend up", (Query("dgxready_mux_backend_up", "{{backend}}"),), unit="short", width=8),
            Panel("Backend cooldowns", (
                Query(f"sum by (backend) (increase(dgxready_mux_backend_cooldowns_total[{W}])) "
                      f"or on() vector(0)", "{{backend}}"),
            ), unit="short", width=8),
        )),
    ),
)

HARDWARE = Dashboard(
    uid="dgxready-hardware",
    title="dgxready: hardware",
    description="GPU (dcgm-exporter's names, from dcgm-exporter or our NVML exporter), unified memory "
                "(GB10 reports it from /proc/meminfo), host memory, CPU and disks (node_exporter).",
    rows=(
        Row("GPU", (
            Panel("GPU utilisation", (
                Query("DCGM_FI_DEV_GPU_UTIL", "GPU {{gpu}}"),
            ), unit="percent", needs="gpu", width=8),
            Panel("GPU temperature", (
                Query("DCGM_FI_DEV_GPU_TEMP", "GPU {{gpu}}"),
            ), unit="celsius", line=85, needs="gpu", width=8),
            Panel("GPU power", (
                Query("DCGM_FI_DEV_POWER_USAGE", "GPU {{gpu}}"),
            ), unit="watt", needs="gpu", width=8),
            Panel("GPU framebuffer memory used", (
                Query("DCGM_FI_DEV_FB_USED", "GPU {{gpu}} used"),
                Query("DCGM_FI_DEV_FB_FREE", "GPU {{gpu}} free"),
            ), unit="decmbytes", needs="gpu", width=8,
                description="MiB, as dcgm-exporter reports it; GB10 has no framebuffer of its own "
                            "(see unified memory)."),
            Panel("SM clock", (Query("DCGM_FI_DEV_SM_CLOCK", "GPU {{gpu}}"),),
                  unit="rotmhz", needs="gpu", width=8),
            Panel("XID errors", (Query("DCGM_FI_DEV_XID_ERRORS", "GPU {{gpu}}"),),
                  unit="short", needs="gpu", width=8,
                  description="The last XID error code; any value but 0 is worth a look (dmesg)."),
        )),
        Row("Memory", (
            Panel("Unified memory (GB10)", (
                Query("dgxready_unified_memory_total_bytes", "total"),
                Query("dgxready_unified_memory_available_bytes", "available"),
            ), unit="bytes", needs="gpu",
                description="NVML answers NOT_SUPPORTED for GB10's memory; the exporter reads /proc/meminfo."),
            Panel("Host memory", (
                Query("node_memory_MemTotal_bytes", "total"),
                Query("node_memory_MemAvailable_bytes", "available"),
            ), unit="bytes"),
        )),
        Row("CPU and disk", (
            Panel("CPU busy", (
                Query(f'1 - avg(rate(node_cpu_seconds_total{{mode="idle"}}[{W}]))', "all cores"),
            ), unit="percentunit", width=6),
            Panel("Model store disk used", (
                Query("1 - dgxready_model_store_disk_free_bytes / dgxready_model_store_disk_total_bytes",
                      "{{path}}"),
            ), unit="percentunit", line=0.9, width=6,
                description="The filesystem under the model store (<prefix>/models on a host); alert at 90%."),
            Panel("Filesystems used", (
                Query('1 - node_filesystem_avail_bytes{fstype!~"tmpfs|overlay|squashfs|ramfs"} '
                      '/ node_filesystem_size_bytes{fstype!~"tmpfs|overlay|squashfs|ramfs"}', "{{mountpoint}}"),
            ), unit="percentunit", line=0.9, width=6),
            Panel("Disk throughput", (
                Query(f"sum by (device) (rate(node_disk_read_bytes_total[{W}]))", "{{device}} read"),
                Query(f"sum by (device) (rate(node_disk_written_bytes_total[{W}]))", "{{device}} written"),
            ), unit="Bps", width=6),
        )),
    ),
)

DASHBOARDS: tuple[Dashboard, ...] = (OVERVIEW, AGENTS, ENGINE, HARDWARE)
