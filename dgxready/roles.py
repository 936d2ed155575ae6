"""Role definitions (agents/roles/*.yaml), validated at load, and their system prompts; read by the
multiplexer and by the benchmark's agents workload."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from dgxready.config import load_yaml
from dgxready.errors import ConfigError
from dgxready.settings import REPO_ROOT

ROLES_DIR = REPO_ROOT / "agents" / "roles"
ToolName = Literal["workspace.read", "workspace.write", "taskboard.append", "shell.run", "knowledge.query",
                   "kb.search", "kb.add", "onto.query", "onto.assert"]
TOOLS: tuple[str, ...] = get_args(ToolName)
ClientToolPattern = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:*?\[\]!-]{1,64}$")]
ROLE_ORDER = ("product-manager", "architect-nusy", "architect-systems", "developer",
              "qa-specialist", "ux-researcher", "platform-engineer")

TEAM_HANDBOOK = """\
Team handbook (shared by every role):
- The team runs one DGX Spark host (GB10, 128 GB unified memory) that serves one local LLM to
  all agents through a multiplexer. Capacity is shared: keep answers as short as the task allows.
- The service level objective is ten concurrent agents with P95 end-to-end latency under six
  seconds. Work that risks it must say so.
- Artefacts live in the shared workspace; decisions go on the task board with an owner.
- Never put secrets, tokens or personal data in any artefact, prompt or log.
- When information is missing, ask one precise question instead of guessing.
- Prefer numbers to adjectives, and small reversible steps to big ones."""


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    temperature: float = Field(0.3, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(256, ge=1, le=8192)


class Scheduling(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    weight: float = Field(1.0, gt=0, description="share of tokens under contention")
    priority: int = Field(1, ge=0, le=9, description="lower runs first")


class RateLimit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    requests_per_minute: int = Field(60, ge=1)
    tokens_per_minute: int = Field(30000, ge=1)


class Role(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,40}$")
    title: str
    profile: str
    goal: str
    constraints: list[str] = Field(min_length=1)
    output_format: str
    tools: list[ToolName]
    client_tools: list[ClientToolPattern] = Field(
        default_factory=list, description="fnmatch patterns of the function tools a client may declare "
                                          "and the model may call for this role (default: none)")
    knowledge_notice_tokens: int = Field(
        0, ge=0, le=1024, description="subscribe to shared-knowledge change notices: the next turn's context "
                                      "gets at most this many tokens of what changed (0: no notices)")
    sampling: Sampling = Sampling()
    scheduling: Scheduling = Scheduling()
    rate_limit: RateLimit = RateLimit()

    def system_prompt(self) -> str:
        rules = "\n".join(f"- {c}" for c in self.constraints)
        return (f"You are the {self.title} of the team.\nProfile: {self.profile}\nGoal: {self.goal}\n"
                f"Constraints:\n{rules}\nOutput format: {self.output_format}\n"
                f"Tools you may call: {', '.join(self.tools) or 'none'}.\n\n{TEAM_HANDBOOK}")


def load_role(path: Path) -> Role:
    role = load_yaml(path, Role)
    if role.name != path.stem:
        raise ConfigError(f"{path.name}: name: {role.name!r} differs from the file name")
    return role


def load_roles(directory: Path = ROLES_DIR) -> dict[str, Role]:
    roles = {p.stem: load_role(p) for p in sorted(directory.glob("*.yaml"))}
    missing = [r for r in ROLE_ORDER if r not in roles]
    if directory == ROLES_DIR and missing:
        raise ConfigError(f"{directory}: missing role files: {', '.join(missing)}")
    return {name: roles[name] for name in ROLE_ORDER if name in roles} | roles
