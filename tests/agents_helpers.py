"""Shared plumbing for the multiplexer tests: real llama-servers and a multiplexer in a thread."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from agents.config import BackendConfig, KeysFile, MuxConfig, write_keys
from agents.service import BackgroundMux, start_background
from dgxready.roles import ROLE_ORDER


@dataclass
class MuxUnderTest:
    mux: BackgroundMux
    keys: KeysFile
    config: MuxConfig

    @property
    def url(self) -> str:
        return self.mux.url

    def key(self, role: str, n: int = 1) -> str:
        return [a.key for a in self.keys.agents if a.role == role][n - 1]

    def headers(self, key: str, session: str | None = None) -> dict:
        h = {"Authorization": f"Bearer {key}"}
        if session:
            h["X-Session-Id"] = session
        return h


def start_mux(tmp: Path, backends: list[tuple[str, str, int]], agents: int = 10,
              backend_kind: str = "llamacpp", **overrides) -> MuxUnderTest:
    keys = write_keys(tmp / "keys.yaml", agents, ROLE_ORDER)
    config = MuxConfig(port=0, backends=[BackendConfig(name=n, url=u, max_concurrency=c, kind=backend_kind)
                                         for n, u, c in backends],
                       keys_file=tmp / "keys.yaml", state_db=tmp / "mux.db",
                       **({"health_interval_s": 0.5, "cooldown_s": 2.0} | overrides))
    return MuxUnderTest(start_background(config), keys, config)


def chat(url: str, key: str, content: str, session: str | None = None, max_tokens: int = 8,
         system: str | None = "Reply in one short sentence.", timeout: float = 120) -> httpx.Response:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": content}]
    headers = {"Authorization": f"Bearer {key}"} | ({"X-Session-Id": session} if session else {})
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=timeout,
                      json={"model": "any", "messages": messages, "max_tokens": max_tokens})
