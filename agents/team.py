"""The team runner: role agents run a feature development cycle through the multiplexer, each
in its own session, concurrently within a stage: PM spec -> architects -> developers -> QA ->
UX -> platform. Each step reads the documents the steps before it handed off, asks the shared
knowledge (kb.search) about the feature, writes its own document with the knowledge it drew on
cited at its end, and announces it on the task board; the architects also publish their designs
to the knowledge (kb.add), where the later stages' searches find them. A hand-off or a knowledge
call that is denied or empty fails the run, named by stage, agent and tool, and the stages after
it do not run. Documents live under runs/<run id>/ in the shared workspace; the transcript is
saved."""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from agents.config import AgentIdentity
from dgxready.errors import DgxReadyError
from dgxready.files import atomic_write_text


@dataclass(frozen=True)
class Step:
    """What one role does in the cycle: the documents it reads, the one it writes, and whether
    it publishes that one to the shared knowledge."""
    role: str
    reads: tuple[str, ...]
    writes: str
    publishes: bool = False

    @property
    def tools(self) -> set[str]:
        always = {"workspace.write", "taskboard.append", "kb.search"}
        reading = {"workspace.read"} if self.reads else set()
        return always | reading | ({"kb.add"} if self.publishes else set())


CYCLE: tuple[tuple[Step, ...], ...] = (
    (Step("product-manager", (), "spec.md"),),
    (Step("architect-nusy", ("spec.md",), "design-nusy.md", publishes=True),
     Step("architect-systems", ("spec.md",), "design-systems.md", publishes=True)),
    (Step("developer", ("spec.md", "design-systems.md", "design-nusy.md"), "code.md"),),
    (Step("qa-specialist", ("spec.md", "code.md"), "test-plan.md"),),
    (Step("ux-researcher", ("spec.md", "code.md"), "ux-review.md"),),
    (Step("platform-engineer", ("design-systems.md", "test-plan.md", "ux-review.md"), "rollout.md"),),
)
STEPS = {step.role: step for stage in CYCLE for step in stage}
CONTEXT_CHARS = 1500
KNOWLEDGE_HITS = 3
KNOWLEDGE_CHARS = 400


@dataclass(frozen=True)
class HandoffFailure:
    stage: int
    role: str
    agent: str
    tool: str
    path: str | None
    reason: str

    def __str__(self) -> str:
        target = f" {self.path}" if self.path else ""
        return f"stage {self.stage} {self.role} ({self.agent}): {self.tool}{target}: {self.reason}"


@dataclass
class AgentRecord:
    agent: str
    role: str
    session: str
    stage: int
    latency_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: dict[str, str] = field(default_factory=dict)
    citations: list[str] = field(default_factory=list)
    output: str = ""
    error: str | None = None
    failures: list[HandoffFailure] = field(default_factory=list)

    def fail(self, tool: str, path: str | None, reason: str) -> None:
        self.failures.append(HandoffFailure(self.stage, self.role, self.agent, tool, path, reason))


@dataclass
class TeamRun:
    scenario: str
    feature: str
    agents: int
    started_at: str
    wall_s: float
    records: list[AgentRecord]

    @property
    def p95_latency_s(self) -> float:
        lat = sorted(r.latency_s for r in self.records if not r.error)
        return lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))] if lat else float("nan")

    @property
    def failures(self) -> list[HandoffFailure]:
        return [f for r in self.records for f in r.failures]

    @property
    def ok(self) -> bool:
        return not self.failures and not any(r.error for r in self.records)


@dataclass(frozen=True)
class Cycle:
    """One run's shared settings: where its documents live and what each agent is asked."""
    url: str
    run_id: str
    feature: str
    max_tokens: int

    def path(self, document: str) -> str:
        return f"runs/{self.run_id}/{document}"


async def tool(client: httpx.AsyncClient, url: str, key: str, session: str, name: str, args: dict) -> dict:
    r = await client.post(f"{url}/v1/tools/call", json={"tool": name, "args": args, "session": session},
                          headers={"Authorization": f"Bearer {key}"})
    return r.json()


def refusal(got: dict) -> str:
    return f"{got.get('outcome', '?')}: {got.get('error') or 'no reason given'}"


async def read_handoffs(client, cycle: Cycle, ident: AgentIdentity, rec: AgentRecord, step: Step) -> list[str]:
    context = []
    for document in step.reads:
        path = cycle.path(document)
        got = await tool(client, cycle.url, ident.key, rec.session, "workspace.read", {"path": path})
        rec.tool_calls[f"read {document}"] = got.get("outcome", "?")
        content = (got.get("result") or {}).get("content", "") if got.get("ok") else ""
        if not got.get("ok"):
            rec.fail("workspace.read", path, refusal(got))
        elif not content.strip():
            rec.fail("workspace.read", path, "empty: nothing was handed off")
        else:
            context.append(f"--- {document} ---\n{content[:CONTEXT_CHARS]}")
    return context


async def consult_knowledge(client, cycle: Cycle, ident: AgentIdentity, rec: AgentRecord) -> list[str]:
    """The shared knowledge's best chunks about the feature, as prompt context; their citations
    are kept for the document's end. No hits is an answer; a refused search fails the step."""
    got = await tool(client, cycle.url, ident.key, rec.session, "kb.search",
                     {"query": cycle.feature, "limit": KNOWLEDGE_HITS})
    rec.tool_calls["kb.search"] = got.get("outcome", "?")
    if not got.get("ok"):
        rec.fail("kb.search", None, refusal(got))
        return []
    hits = (got.get("result") or {}).get("results") or []
    rec.citations = [hit["citation"] for hit in hits]
    return [f"--- team knowledge: {hit['citation']} ---\n{hit['text'][:KNOWLEDGE_CHARS]}" for hit in hits]


async def publish(client, cycle: Cycle, ident: AgentIdentity, rec: AgentRecord, step: Step) -> None:
    path = cycle.path(step.writes)
    text = f"# {step.writes} by {ident.name}\n\nFor: {cycle.feature}\n\n{rec.output}"
    res = await tool(client, cycle.url, ident.key, rec.session, "kb.add", {"source": path, "text": text})
    rec.tool_calls["kb.add"] = res.get("outcome", "?")
    if not res.get("ok"):
        rec.fail("kb.add", path, refusal(res))


def with_sources(output: str, citations: list[str]) -> str:
    return output + ("\n\nSources: " + "; ".join(citations) if citations else "")


async def ask_model(client, cycle: Cycle, ident: AgentIdentity, rec: AgentRecord, prompt: str) -> None:
    started = time.perf_counter()
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": cycle.max_tokens}
    text = []
    async with client.stream("POST", f"{cycle.url}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {ident.key}", "X-Session-Id": rec.session}
                             ) as resp:
        if resp.status_code != 200:
            rec.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("error"):
                rec.error = chunk["error"]["message"]
            for ch in chunk.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    rec.ttft_s = rec.ttft_s or time.perf_counter() - started
                    text.append(piece)
            if chunk.get("usage"):
                rec.prompt_tokens = chunk["usage"]["prompt_tokens"]
                rec.completion_tokens = chunk["usage"]["completion_tokens"]
    rec.latency_s = time.perf_counter() - started
    rec.output = "".join(text)


async def hand_off(client, cycle: Cycle, ident: AgentIdentity, rec: AgentRecord, step: Step) -> None:
    path = cycle.path(step.writes)
    if not rec.output.strip():
        rec.fail("workspace.write", path, "the model wrote nothing to hand off")
        return
    document = f"\n## {ident.name}\n{with_sources(rec.output, rec.citations)}\n"
    res = await tool(client, cycle.url, ident.key, rec.session, "workspace.write",
                     {"path": path, "append": document})
    rec.tool_calls[f"write {step.writes}"] = res.get("outcome", "?")
    if not res.get("ok"):
        rec.fail("workspace.write", path, refusal(res))
        return
    res = await tool(client, cycle.url, ident.key, rec.session, "taskboard.append",
                     {"item": f"{ident.name} finished {path}"})
    rec.tool_calls["taskboard"] = res.get("outcome", "?")
    if not res.get("ok"):
        rec.fail("taskboard.append", None, refusal(res))


async def one_agent(client, cycle: Cycle, ident: AgentIdentity, rec: AgentRecord) -> None:
    step = STEPS[ident.role]
    context = await read_handoffs(client, cycle, ident, rec, step)
    context += await consult_knowledge(client, cycle, ident, rec)
    prompt = f"{cycle.feature}\n\n" + "\n\n".join(context) + "\n\nDo your part now."
    await ask_model(client, cycle, ident, rec, prompt)
    if rec.error is None:
        await hand_off(client, cycle, ident, rec, step)
    if rec.error is None and step.publishes and not rec.failures:
        await publish(client, cycle, ident, rec, step)


async def run_cycle(cycle: Cycle, team: list[AgentIdentity]) -> list[AgentRecord]:
    """The stages in order, each stage's agents at once; stops after a stage that failed."""
    records: list[AgentRecord] = []
    limits = httpx.Limits(max_connections=len(team) * 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        for stage_no, stage in enumerate(CYCLE, start=1):
            roles = {step.role for step in stage}
            members = [a for a in team if a.role in roles]
            batch = [AgentRecord(a.name, a.role, f"{cycle.run_id}-{a.name}", stage_no) for a in members]
            await asyncio.gather(*(one_agent(client, cycle, a, r) for a, r in zip(members, batch, strict=True)))
            records += batch
            if any(r.failures or r.error for r in batch):
                break
    return records


def run_team(url: str, team: list[AgentIdentity], out_path: Path, feature: str, max_tokens: int = 96,
             scenario: str = "feature-cycle") -> TeamRun:
    if scenario != "feature-cycle":
        raise DgxReadyError(f"--scenario {scenario!r}: only feature-cycle exists")
    started_at = time.strftime("%Y%m%dT%H%M%S")
    cycle = Cycle(url, f"{started_at}-{secrets.token_hex(3)}", feature, max_tokens)
    started = time.perf_counter()
    records = asyncio.run(run_cycle(cycle, team))
    run = TeamRun(scenario, feature, len(team), cycle.run_id, time.perf_counter() - started, records)
    atomic_write_text(out_path, json.dumps(asdict(run) | {"p95_latency_s": run.p95_latency_s,
                                                          "failures": [str(f) for f in run.failures]},
                                           indent=2))
    return run
