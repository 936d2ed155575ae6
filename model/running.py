"""One way to start a model for the length of a `with` block: build llama.cpp when needed, pull,
serve on a free port, and stop the server whatever happens inside the block."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dgxready.ports import free_port
from dgxready.progress import console
from dgxready.settings import Settings, load_settings
from model.catalog import load_catalog
from model.llamacpp_build import build_llamacpp
from model.pull import pull, resolve_format, store_for
from model.serve import ServeRequest, ServerState, serve, stop


@dataclass(frozen=True)
class RunningModel:
    state: ServerState
    weight_bytes: int
    model_path: Path

    @property
    def base_url(self) -> str:
        return self.state.base_url


@contextlib.contextmanager
def running_model(name: str | None = None, *, parallel: int | None = None, ctx_per_slot: int | None = None,
                  backend: str = "auto", port: int | None = None, extra_args: tuple[str, ...] = (),
                  settings: Settings | None = None, embeddings: bool = False) -> Iterator[RunningModel]:
    """Serve `name` (default: the catalog's default model) and stop it when the block ends; with
    `embeddings`, as an instance that answers /v1/embeddings only."""
    settings = settings or load_settings()
    catalog = load_catalog()
    name = name or catalog.default
    if backend != "vllm":
        build_llamacpp(settings)
    result = pull(name, engine="vllm" if backend == "vllm" else "llamacpp", settings=settings)
    store = store_for(settings)
    spec = resolve_format(catalog, store, name, result.fmt).spec
    state = serve(ServeRequest(model=name, fmt=result.fmt, backend=backend, port=port or free_port(),
                               parallel=parallel, ctx_per_slot=ctx_per_slot, extra_args=extra_args,
                               embeddings=embeddings), settings)
    console.print(f"started {state.backend} for {name} at {state.base_url}")
    try:
        yield RunningModel(state, spec.weight_bytes, store.file_path(name, result.fmt, spec.entry_file))
    finally:
        stop(port=state.port, settings=settings)
        console.print(f"stopped the server on port {state.port}")
