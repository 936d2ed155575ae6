"""One chat completion through the openai SDK against a served model."""
from __future__ import annotations

import time
from dataclasses import dataclass

from dgxready.errors import DgxReadyError
from dgxready.settings import load_settings


@dataclass(frozen=True)
class ChatReply:
    model: str
    text: str
    completion_tokens: int
    seconds: float


def default_base_url() -> str:
    from model.serve import status

    live = [s for s in status(load_settings()) if s.healthy]
    if not live:
        raise DgxReadyError("no healthy server is recorded; start one with `invoke model.serve "
                            "NAME` or pass --url")
    return live[0].state.base_url


def chat_once(url: str | None, prompt: str, max_tokens: int = 64) -> ChatReply:
    import openai

    base = (url or default_base_url()).rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    client = openai.OpenAI(base_url=base, api_key="not-needed", max_retries=0, timeout=120)
    try:
        model = client.models.list().data[0].id
        started = time.perf_counter()
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0.2,
        )
    except openai.APIConnectionError as exc:
        raise DgxReadyError(f"{base}: cannot connect ({exc.__cause__ or exc})") from None
    except openai.APIStatusError as exc:
        raise DgxReadyError(f"{base}: HTTP {exc.status_code}: {exc.message}") from None
    text = resp.choices[0].message.content or ""
    tokens = resp.usage.completion_tokens if resp.usage else 0
    if not text or not tokens:
        raise DgxReadyError(f"{base}: the server answered with no content (finish_reason "
                            f"{resp.choices[0].finish_reason!r})")
    return ChatReply(resp.model, text.strip(), tokens, time.perf_counter() - started)
