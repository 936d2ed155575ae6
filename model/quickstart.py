"""The first-run job until the benchmark kit lands: default model, served, one chat, stopped."""
from __future__ import annotations

from rich.console import Console

from dgxready.settings import load_settings
from model.catalog import load_catalog
from model.chat import chat_once
from model.llamacpp_build import build_llamacpp
from model.pull import pull
from model.serve import ServeRequest, serve, stop


def quickstart(port: int, out: Console) -> None:
    settings = load_settings()
    name = load_catalog().default
    build = build_llamacpp(settings)
    out.print(f"llama.cpp build: {build.root}")
    result = pull(name, engine="llamacpp", settings=settings)
    out.print(f"model: {name} ({result.fmt}) in {result.directory}")
    state = serve(ServeRequest(model=name, fmt=result.fmt, port=port), settings)
    try:
        out.print(f"serving at {state.base_url}/v1 ({state.backend}: {state.reason})")
        reply = chat_once(state.base_url, "Introduce yourself in one sentence.", 48)
        out.print(f"[bold]{reply.model}[/] answered {reply.completion_tokens} tokens in "
                  f"{reply.seconds:.2f} s: {reply.text}")
    finally:
        stop(port=port, settings=settings)
        out.print("server stopped")
