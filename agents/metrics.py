"""Prometheus metrics of the multiplexer, named after LiteLLM's. No session ids in labels."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 6, 8, 12, 20, 40, 80)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


@dataclass(frozen=True)
class AgentSeries:
    """One agent's labelled series, looked up once instead of on every request."""
    queue_wait: Histogram
    ttft: Histogram
    duration: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter


class MuxMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dgxready_mux_requests", "Requests by agent, backend and status",
                                ["agent", "backend", "status"], registry=r)
        self.queue_depth = Gauge("dgxready_mux_queue_depth", "Requests waiting for a slot", registry=r)
        self.queue_wait = Histogram("dgxready_mux_queue_wait_seconds", "Time waiting for a slot",
                                    ["agent"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("dgxready_mux_ttft_seconds", "Time to first token at the multiplexer",
                              ["agent"], buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("dgxready_mux_request_duration_seconds", "Whole request",
                                  ["agent"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("dgxready_mux_overhead_seconds",
                                  "Time the multiplexer itself adds (excluding queue and backend)",
                                  buckets=OVERHEAD_BUCKETS, registry=r)
        self.inflight = Gauge("dgxready_mux_backend_inflight", "Requests in flight", ["backend"], registry=r)
        self.backend_up = Gauge("dgxready_mux_backend_up", "1 if the backend is healthy", ["backend"],
                                registry=r)
        self.cooldowns = Counter("dgxready_mux_backend_cooldowns", "Backend cooldowns", ["backend"],
                                 registry=r)
        self.rejections = Counter("dgxready_mux_rejections", "Rejected requests by reason", ["reason"],
                                  registry=r)
        self.tokens = Counter("dgxready_mux_tokens", "Tokens by agent and direction",
                              ["agent", "direction"], registry=r)
        self.tool_calls = Counter("dgxready_mux_tool_calls", "Tool calls by agent, tool and outcome",
                                  ["agent", "tool", "outcome"], registry=r)

    @cache  # noqa: B019 - one MuxMetrics per process; agents and backends are a small fixed set
    def agent(self, name: str) -> AgentSeries:
        return AgentSeries(self.queue_wait.labels(name), self.ttft.labels(name), self.duration.labels(name),
                           self.tokens.labels(name, "prompt"), self.tokens.labels(name, "completion"))

    @cache  # noqa: B019
    def request(self, agent: str, backend: str, status: str) -> Counter:
        return self.requests.labels(agent, backend, status)

    @cache  # noqa: B019
    def backend_inflight(self, backend: str) -> Gauge:
        return self.inflight.labels(backend)
