"""The team runner: role agents run a feature development cycle through the multiplexer, each
in its own session, concurrently within a stage: PM spec -> architects -> developers -> QA ->
UX -> platform. Artefacts pass through the shared workspace tool; the transcript is saved."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from agents.config import AgentIdentity
from dgxready.errors import DgxReadyError
from dgxready.files import atomic_write_text

STAGES = ("product-manager", ("architect-nusy", "architect-systems"), "developer", "qa-specialist",
          "ux-researcher", "platform-engineer")
READS = {"product-manager": [], "architect-nusy": ["spec.md"], "architect-systems": ["spec.md"],
         "developer": ["spec.md", "design-systems.md"], "qa-specialist": ["spec.md", "code.md"],
         "ux-researcher": ["spec.md"], "platform-engineer": ["design-systems.md", "test-plan.md"]}
WRITES = {"product-manager": "spec.md", "architect-nusy": "design-nusy.md",
          "architect-systems": "design-systems.md", "developer": "code.md",
          "qa-specialist": "test-plan.md", "ux-researcher": "ux-review.md",
          "platform-engineer": "rollout.md"}


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
    output: str = ""
    error: str | None = None


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


async def tool(client: httpx.AsyncClient, url: str, key: str, session: str, name: str, args: dict) -> dict:
    r = await client.post(f"{url}/v1/tools/call", json={"tool": name, "args": args, "session": session},
                          headers={"Authorization": f"Bearer {key}"})
    return r.json()


async def one_agent(client, url, ident: AgentIdentity, rec: AgentRecord, feature: str,
                    max_tokens: int) -> None:
    context = []
    for path in READS[ident.role]:
        got = await tool(client, url, ident.key, rec.session, "workspace.read", {"path": path})
        rec.tool_calls[f"read {path}"] = got.get("outcome", "?")
        if got.get("ok") and got["result"]["content"]:
            context.append(f"--- {path} ---\n{got['result']['content'][:1500]}")
    prompt = f"{feature}\n\n" + "\n\n".join(context) + "\n\nDo your part now."
    started = time.perf_counter()
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens}
    text = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
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
    out = WRITES[ident.role]
    res = await tool(client, url, ident.key, rec.session, "workspace.write",
                     {"path": out, "append": f"\n## {ident.name}\n{rec.output}\n"})
    rec.tool_calls[f"write {out}"] = res.get("outcome", "?")
    res = await tool(client, url, ident.key, rec.session, "taskboard.append",
                     {"item": f"{ident.name} finished {out}"})
    rec.tool_calls["taskboard"] = res.get("outcome", "?")


async def run_cycle(url: str, team: list[AgentIdentity], feature: str, max_tokens: int,
                    run_id: str) -> list[AgentRecord]:
    records: list[AgentRecord] = []
    limits = httpx.Limits(max_connections=len(team) * 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        for stage_no, stage in enumerate(STAGES):
            roles = stage if isinstance(stage, tuple) else (stage,)
            members = [a for a in team if a.role in roles]
            batch = [AgentRecord(a.name, a.role, f"{run_id}-{a.name}", stage_no) for a in members]
            await asyncio.gather(*(one_agent(client, url, a, r, feature, max_tokens)
                                   for a, r in zip(members, batch, strict=True)))
            records += batch
    return records


def run_team(url: str, team: list[AgentIdentity], out_path: Path, feature: str, max_tokens: int = 96,
             scenario: str = "feature-cycle") -> TeamRun:
    if scenario != "feature-cycle":
        raise DgxReadyError(f"--scenario {scenario!r}: only feature-cycle exists")
    run_id = time.strftime("%Y%m%dT%H%M%S")
    started = time.perf_counter()
    records = asyncio.run(run_cycle(url, team, feature, max_tokens, run_id))
    run = TeamRun(scenario, feature, len(team), run_id, time.perf_counter() - started, records)
    atomic_write_text(out_path, json.dumps(asdict(run) | {"p95_latency_s": run.p95_latency_s}, indent=2))
    return run
