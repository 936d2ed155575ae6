"""The question the kit answers: does this host serve the target number of agents within the SLO?"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bench.labels import agents_meet, workload_label
from bench.serving import CapacityResult


def predict_command(baseline: str, verdict: SloVerdict | None = None) -> str:
    """bench.predict on the run's own question: its workload, output cap, target and SLO."""
    cmd = f"invoke bench.predict --profile measured --baseline {baseline}"
    if verdict is None:
        return cmd
    cmd += (f" --workload {verdict.workload_name} --agents {verdict.target_agents}"
            f" --slo-p95-e2e {verdict.slo_p95_e2el_s:g}")
    return cmd + (f" --max-tokens {verdict.max_tokens}" if verdict.max_tokens else "")


def tuning_hint(baseline: str = "FILE", verdict: SloVerdict | None = None) -> str:
    """Where to look next; `baseline` is the run's JSON when it is known."""
    return (f"`{predict_command(baseline, verdict)}` for the levers ranked by their "
            "predicted effect, and runbooks/serving.md, row 'P95 latency above the SLO'; sized by "
            "`invoke model.plan NAME --agents N`: a quantized format (`invoke model.quantize`), "
            "fewer concurrent agents, shorter outputs (`--max-tokens`, the roles' max_tokens)")

Outcome = Literal["met", "not met", "undecided"]


@dataclass(frozen=True)
class SloVerdict:
    """`capacity_low`..`capacity_high` is the range of agent counts the measurement cannot tell
    apart (both equal to `capacity` for a search without confidence bounds)."""
    target_agents: int
    slo_p95_e2el_s: float
    capacity: int
    capacity_low: int
    capacity_high: int
    workload: str
    workload_name: str = "agents"
    max_tokens: int | None = None

    @property
    def outcome(self) -> Outcome:
        if self.capacity_low >= self.target_agents:
            return "met"
        if self.capacity_high < self.target_agents:
            return "not met"
        return "undecided"

    @property
    def met(self) -> bool:
        return self.outcome == "met"

    @property
    def exit_code(self) -> int:
        """For CI: only an SLO met with confidence passes."""
        return 0 if self.met else 1

    @property
    def capacity_text(self) -> str:
        if self.capacity_low == self.capacity_high:
            return f"{self.capacity}"
        return f"{self.capacity} (range {self.capacity_low}-{self.capacity_high})"

    @property
    def headline(self) -> str:
        measured = (f"{agents_meet(self.capacity_text)} P95 E2EL <= {self.slo_p95_e2el_s:g} s "
                    f"({self.workload})")
        if self.outcome == "met":
            return f"The {self.target_agents}-agent SLO is met on this host: {measured}"
        if self.outcome == "not met" and self.capacity_high == 0:
            return (f"The {self.target_agents}-agent SLO is not met on this host: not even one agent "
                    f"meets P95 E2EL <= {self.slo_p95_e2el_s:g} s ({self.workload})")
        if self.outcome == "not met":
            return f"The {self.target_agents}-agent SLO is not met on this host: only {measured}"
        return (f"The {self.target_agents}-agent SLO is undecided on this host: {measured}, and "
                f"{self.target_agents} lies within what the measurement cannot tell apart")


def judge_target(capacity: CapacityResult, target_agents: int) -> SloVerdict:
    low, high = capacity.bounds
    return SloVerdict(
        target_agents=target_agents, slo_p95_e2el_s=capacity.slo_p95_e2el_s,
        capacity=capacity.max_concurrency_meeting_slo, capacity_low=low, capacity_high=high,
        workload=workload_label(capacity.workload),
        workload_name=str(capacity.workload.get("name", "agents")), max_tokens=output_cap(capacity.workload),
    )


def output_cap(workload: dict) -> int | None:
    """The longest answer a workload asks for: agents' max_tokens, synthetic's output range's top."""
    cap = workload.get("max_tokens") or max(workload.get("output_tokens") or [0])
    return int(cap) or None
