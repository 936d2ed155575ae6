"""Seeded workloads for the serving benchmark.

`synthetic`: random prompts and output lengths (ignore_eos, so outputs have the asked length).
`agents`: the seven roles, each with its long system prompt shared by its turns, multi-turn."""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from dgxready.roles import Role, load_roles

# The longest answer a request asks for when nothing says otherwise.
DEFAULT_MAX_TOKENS = 128
WORDS = ("latency throughput memory cache token agent model server queue batch kernel driver "
         "prompt context budget host metric alert deploy rollback schema plan test load slot "
         "stream request decode prefill bandwidth compute unified graph node rule").split()

FEATURE_TASKS = (
    "Feature request: add per-agent token budgets to the multiplexer.",
    "Feature request: alert when P95 latency approaches the SLO.",
    "Feature request: let agents share a knowledge base of past decisions.",
    "Feature request: nightly benchmark runs with a regression report.",
)
FOLLOW_UPS = (
    "Refine that: what is the riskiest part, and how do we test it?",
    "Now list the three next concrete steps, with owners.",
    "Summarise your answer in five bullet points for the task board.",
)


@dataclass(frozen=True)
class RequestSpec:
    messages: list[dict]
    max_tokens: int
    ignore_eos: bool
    temperature: float = 0.0
    role: str | None = None


@dataclass(frozen=True)
class SyntheticWorkload:
    seed: int = 0
    input_words: tuple[int, int] = (64, 256)
    output_tokens: tuple[int, int] = (96, 128)
    system_prompt: str | None = None
    name: str = "synthetic"
    round_index: int = 0

    def session(self, index: int) -> SyntheticSession:
        return SyntheticSession(self, random.Random(f"{self.seed}:{self.round_index}:{index}"))

    def describe(self) -> dict:
        return {"name": self.name, "seed": self.seed, "input_words": list(self.input_words),
                "output_tokens": list(self.output_tokens), "ignore_eos": True}


@dataclass
class SyntheticSession:
    workload: SyntheticWorkload
    rng: random.Random

    def next_request(self) -> RequestSpec:
        n_in = self.rng.randint(*self.workload.input_words)
        n_out = self.rng.randint(*self.workload.output_tokens)
        text = " ".join(self.rng.choice(WORDS) for _ in range(n_in))
        prompt = f"Write a detailed technical note about: {text}"
        sys_prompt = self.workload.system_prompt
        system = [{"role": "system", "content": sys_prompt}] if sys_prompt else []
        return RequestSpec(system + [{"role": "user", "content": prompt}], n_out, ignore_eos=True)

    def observe(self, reply: str) -> None:
        pass


@dataclass(frozen=True)
class AgentsWorkload:
    seed: int = 0
    max_tokens: int = DEFAULT_MAX_TOKENS
    turns_per_conversation: int = 4
    roles: tuple[Role, ...] = field(default_factory=lambda: tuple(load_roles().values()))
    name: str = "agents"
    round_index: int = 0

    def session(self, index: int) -> AgentSession:
        return AgentSession(self, self.roles[index % len(self.roles)],
                            random.Random(f"{self.seed}:{self.round_index}:{index}"))

    def describe(self) -> dict:
        return {"name": self.name, "seed": self.seed, "max_tokens": self.max_tokens,
                "turns_per_conversation": self.turns_per_conversation,
                "roles": [r.name for r in self.roles], "ignore_eos": False}


@dataclass
class AgentSession:
    workload: AgentsWorkload
    role: Role
    rng: random.Random
    history: list[dict] = field(default_factory=list)

    def next_request(self) -> RequestSpec:
        if not self.history or len(self.history) >= 1 + 2 * self.workload.turns_per_conversation:
            self.history = [{"role": "system", "content": self.role.system_prompt()},
                            {"role": "user", "content": self.rng.choice(FEATURE_TASKS)}]
        else:
            self.history.append({"role": "user", "content": self.rng.choice(FOLLOW_UPS)})
        max_tokens = min(self.role.sampling.max_tokens, self.workload.max_tokens)
        return RequestSpec(list(self.history), max_tokens, ignore_eos=False,
                           temperature=self.role.sampling.temperature, role=self.role.name)

    def observe(self, reply: str) -> None:
        self.history.append({"role": "assistant", "content": reply})


Workload = SyntheticWorkload | AgentsWorkload


def for_round(workload: Workload, round_index: int) -> Workload:
    """The workload with sessions of its own for one level or round of a run. With the same
    sessions, a level would repeat the last level's prompts, which the engine still holds in its
    prefix cache (llama-server's slots, vLLM's automatic prefix caching), and answer them faster
    than new ones."""
    return replace(workload, round_index=round_index)


WORKLOAD_NAMES = ("synthetic", "agents")


def make_workload(name: str, seed: int = 0, max_tokens: int = DEFAULT_MAX_TOKENS) -> Workload:
    if name == "synthetic":
        return SyntheticWorkload(seed=seed, output_tokens=(max(1, max_tokens * 3 // 4), max_tokens))
    if name == "agents":
        return AgentsWorkload(seed=seed, max_tokens=max_tokens)
    raise ValueError(f"--workload {name!r}: choose synthetic or agents")
