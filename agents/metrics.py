"""Prometheus metrics of the multiplexer, named after LiteLLM's. A label value comes only from a
known set (agents of the keys file, roles, the multiplexer's tools, configured backends, the
statuses the multiplexer itself names or an HTTP status) and is `unknown` otherwise, so no client
can mint series; no session id is ever a label. The series every chat request updates are kept
by this module on the event loop's thread, without prometheus_client's lock per update, and
exported through a collector in the same registry."""
from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from dgxready.roles import TOOLS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 6, 8, 12, 20, 40, 80)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)
UNKNOWN = "unknown"
NO_BACKEND = "none"
REQUEST_STATUSES = frozenset({"ok", "retried", "failed", "failed_midstream", "timeout", "client_gone",
                              "bad_answer"})
HTTP_STATUS_RE = re.compile(r"^[1-5][0-9][0-9]$")
CLIENT_TOOL_ACTIONS = frozenset({"dropped", "refused", "blocked"})
KNOWLEDGE_CACHE_EVENTS = frozenset({"hit", "miss", "invalidation"})


@dataclass(frozen=True)
class KnownLabels:
    """The label values the metrics may carry."""
    agents: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    backends: frozenset[str] = frozenset()
    tools: frozenset[str] = field(default_factory=lambda: frozenset(TOOLS))

    def agent(self, name: str) -> str:
        return name if name in self.agents else UNKNOWN

    def role(self, name: str) -> str:
        return name if name in self.roles else UNKNOWN

    def backend(self, name: str) -> str:
        return name if name in self.backends or name == NO_BACKEND else UNKNOWN

    def tool(self, name: str) -> str:
        return name if name in self.tools else UNKNOWN

    @staticmethod
    def status(status: str) -> str:
        return status if status in REQUEST_STATUSES or HTTP_STATUS_RE.match(status) else UNKNOWN


class LoopCounter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopHistogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        running, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append((floatToGoString(bound), running))
        return out


@dataclass
class LoopFamily:
    """A labelled counter (no buckets) or histogram, updated only on the event loop's thread."""
    name: str
    documentation: str
    labelnames: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None
    children: dict[tuple[str, ...], LoopCounter | LoopHistogram] = field(default_factory=dict)

    def labels(self, *values: str) -> LoopCounter | LoopHistogram:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = LoopHistogram(self.buckets) if self.buckets else LoopCounter()
        return child

    def metric(self) -> Metric:
        if self.buckets is None:
            family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for values, child in self.children.items():
                family.add_metric(values, child.value)
            return family
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self.children.items():
            family.add_metric(values, child.cumulative(), child.total)
        return family


@dataclass(eq=False)
class LoopCollector:
    families: list[LoopFamily]

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.metric()


@dataclass(frozen=True)
class AgentSeries:
    """One agent's labelled series, looked up once instead of on every request."""
    queue_wait: LoopHistogram
    ttft: LoopHistogram
    duration: LoopHistogram
    prompt_tokens: LoopCounter
    completion_tokens: LoopCounter

    def answered(self, prompt_tokens: int, completion_tokens: int, ttft_s: float, duration_s: float) -> None:
        self.prompt_tokens.value += prompt_tokens
        self.completion_tokens.value += completion_tokens
        ttft, duration = self.ttft, self.duration  # LoopHistogram.observe, inlined: every answer
        ttft.counts[bisect_left(ttft.bounds, ttft_s)] += 1
        ttft.total += ttft_s
        duration.counts[bisect_left(duration.bounds, duration_s)] += 1
        duration.total += duration_s


class MuxMetrics:
    def __init__(self, known: KnownLabels | None = None) -> None:
        self.known = known or KnownLabels()
        r = self.registry = CollectorRegistry()
        self.requests = LoopFamily("dgxready_mux_requests", "Requests by agent, backend and status",
                                   ("agent", "backend", "status"))
        self.queue_depth = Gauge("dgxready_mux_queue_depth", "Requests waiting for a slot", registry=r)
        self.queue_wait = LoopFamily("dgxready_mux_queue_wait_seconds", "Time waiting for a slot",
                                     ("agent",), LATENCY_BUCKETS)
        self.ttft = LoopFamily("dgxready_mux_ttft_seconds", "Time to first token at the multiplexer",
                               ("agent",), LATENCY_BUCKETS)
        self.duration = LoopFamily("dgxready_mux_request_duration_seconds", "Whole request",
                                   ("agent",), LATENCY_BUCKETS)
        overhead = LoopFamily("dgxready_mux_overhead_seconds",
                              "Time the multiplexer itself adds (excluding queue and backend)",
                              buckets=OVERHEAD_BUCKETS)
        self.overhead = overhead.labels()
        self.inflight = Gauge("dgxready_mux_backend_inflight", "Requests in flight", ["backend"], registry=r)
        self.backend_up = Gauge("dgxready_mux_backend_up", "1 if the backend is healthy", ["backend"],
                                registry=r)
        self.cooldowns = Counter("dgxready_mux_backend_cooldowns", "Backend cooldowns", ["backend"],
                                 registry=r)
        self.rejections = Counter("dgxready_mux_rejections", "Rejected requests by reason", ["reason"],
                                  registry=r)
        self.tokens = LoopFamily("dgxready_mux_tokens", "Tokens by agent and direction", ("agent", "direction"))
        r.register(LoopCollector([self.requests, self.queue_wait, self.ttft, self.duration, overhead,
                                  self.tokens]))
        self.tool_calls = Counter("dgxready_mux_tool_calls", "Tool calls by agent, tool and outcome",
                                  ["agent", "tool", "outcome"], registry=r)
        self.client_tools = Counter("dgxready_mux_client_tools",
                                    "Client-declared tools or model tool calls a role may not use, by "
                                    "role and action (dropped, refused, blocked)", ["role", "action"],
                                    registry=r)
        self.knowledge_cache = Counter("dgxready_mux_knowledge_cache",
                                       "Knowledge answers (search and SPARQL) from the versioned cache: hit, "
                                       "miss, and invalidation (entries dropped when the version moved)",
                                       ["event"], registry=r)
        for event in sorted(KNOWLEDGE_CACHE_EVENTS):
            self.knowledge_cache.labels(event)
        self.start_at_zero()

    def start_at_zero(self) -> None:
        """Every known agent's series exist from the start, at 0: rate() counts no increase for a
        series' first sample, so an agent whose first request created its series would show no
        traffic until its second (an agent of a feature cycle makes one or two)."""
        for agent in sorted(self.known.agents):
            self.agent(agent)
            for backend in sorted(self.known.backends):
                self.request(agent, backend, "ok")

    # Cached by the raw names, which come from bounded sets too: identify() admits only known keys.
    @cache  # noqa: B019 - one MuxMetrics per process; agents and backends are a small fixed set
    def agent(self, name: str) -> AgentSeries:
        name = self.known.agent(name)
        return AgentSeries(self.queue_wait.labels(name), self.ttft.labels(name), self.duration.labels(name),
                           self.tokens.labels(name, "prompt"), self.tokens.labels(name, "completion"))

    @cache  # noqa: B019
    def request(self, agent: str, backend: str, status: str) -> LoopCounter:
        k = self.known
        return self.requests.labels(k.agent(agent), k.backend(backend), k.status(status))

    @cache  # noqa: B019
    def backend_inflight(self, backend: str) -> Gauge:
        return self.inflight.labels(self.known.backend(backend))

    def tool_call(self, agent: str, tool: str, outcome: str) -> Counter:
        return self.tool_calls.labels(self.known.agent(agent), self.known.tool(tool), outcome)

    def knowledge_cache_event(self, event: str, count: int) -> None:
        self.knowledge_cache.labels(event if event in KNOWLEDGE_CACHE_EVENTS else UNKNOWN).inc(count)

    def client_tool(self, role: str, action: str) -> Counter:
        return self.client_tools.labels(self.known.role(role),
                                        action if action in CLIENT_TOOL_ACTIONS else UNKNOWN)
