"""`model.serve`: verify the model, plan its memory, start the engine, wait until it answers,
and record what runs so that `model.status` and `model.stop` find it."""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from dgxready.errors import DgxReadyError
from dgxready.files import atomic_write_json
from dgxready.progress import console, waiting
from dgxready.settings import Settings, load_settings
from model.backend import BackendChoice, choose_backend
from model.catalog import Catalog, ModelEntry, load_catalog
from model.llamacpp_build import require_binary
from model.memory import DROP_PAGE_CACHE_SH, host_budget
from model.plan import engine_kv_dtype, kv_shape, make_plan, require_fit
from model.procs import (
    ServerFailed,
    is_running,
    launch,
    log_tail,
    port_in_use,
    proc_start_time,
    wait_ready,
)
from model.procs import terminate as terminate_pid
from model.pull import ResolvedFormat, resolve_format, store_for
from model.store import ModelStore


@dataclass(frozen=True)
class ServeRequest:
    model: str
    fmt: str | None = None
    backend: str = "auto"
    host: str | None = None
    port: int | None = None
    parallel: int | None = None
    ctx_per_slot: int | None = None
    kv_dtype: str = "f16"
    extra_args: tuple[str, ...] = ()
    embeddings: bool = False


EMBEDDINGS_POOLING = "mean"


@dataclass(frozen=True)
class ServerState:
    model: str
    fmt: str
    backend: str
    reason: str
    pid: int
    proc_start: int | None
    host: str
    port: int
    parallel: int
    log_path: str
    cmd: list[str]
    started_at: float
    mode: str = "chat"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return is_running(self.pid, self.proc_start)


def state_dir(settings: Settings) -> Path:
    return settings.state_dir / "servers"


def state_path(settings: Settings, port: int) -> Path:
    return state_dir(settings) / f"{port}.json"


def load_states(settings: Settings) -> list[ServerState]:
    states = []
    for path in sorted(state_dir(settings).glob("*.json")):
        try:
            states.append(ServerState(**json.loads(path.read_text())))
        except (ValueError, TypeError) as exc:
            console.print(f"[yellow]{path}: unreadable server record ({exc}); ignoring it")
    return states


def llamacpp_command(binary: str | Path, model_path: str | Path, name: str, host: str, port: int,
                     flags: list[str], extra: tuple[str, ...]) -> list[str]:
    return [str(binary), "-m", str(model_path), "--host", host, "--port", str(port),
            "--alias", name, "--metrics", *flags, *extra]


def vllm_command(choice: BackendChoice, model_dir: str | Path, name: str, host: str, port: int,
                 flags: list[str], mistral_tokenizer: bool, extra: tuple[str, ...]) -> list[str]:
    args = ["--served-model-name", name, "--enable-prefix-caching", *flags]
    if mistral_tokenizer:
        args += ["--tokenizer-mode", "mistral"]
    assert choice.vllm
    if choice.vllm.kind == "venv":
        return [choice.vllm.location, "serve", str(model_dir), "--host", host, "--port", str(port),
                *args, *extra]
    # Keep the NGC image's entrypoint: it turns on CUDA forward compatibility.
    return ["docker", "run", "--rm", "--gpus", "all", "--ipc=host",
            "-p", f"{host}:{port}:8000", "-v", f"{model_dir}:/model:ro", choice.vllm.location,
            "vllm", "serve", "/model", "--host", "0.0.0.0", "--port", "8000", *args, *extra]


def embedding_flags(engine: str, ctx_per_slot: int) -> list[str]:
    """A second instance for /v1/embeddings only: llama-server --embeddings with mean pooling (the
    chat models here have none of their own) and a batch that holds a whole input; vLLM as a
    pooling runner (an embedding model from the catalog)."""
    if engine == "vllm":
        return ["--runner", "pooling"]
    return ["--embeddings", "--pooling", EMBEDDINGS_POOLING, "-b", str(ctx_per_slot), "-ub", str(ctx_per_slot)]


def drop_page_cache() -> str:
    if os.geteuid() != 0:
        return "not root: page cache left as is"
    done = subprocess.run(["sh", "-c", DROP_PAGE_CACHE_SH], capture_output=True, text=True)
    if done.returncode != 0:
        return f"page cache not dropped ({done.stderr.strip()})"
    return "page cache dropped"


@dataclass(frozen=True)
class CatalogView:
    """The catalog entry of the model being served, read once and passed on."""
    catalog: Catalog
    entry: ModelEntry
    store: ModelStore


def settle_backend(req: ServeRequest, choice: BackendChoice, view: CatalogView) -> BackendChoice:
    """Under `auto`, the model decides too: a GGUF-only model or a GGUF format means llama.cpp."""
    if req.backend != "auto" or choice.backend != "vllm":
        return choice
    if req.fmt:
        fmt = resolve_format(view.catalog, view.store, req.model, req.fmt)
        if fmt.spec.engine == "llamacpp":
            return BackendChoice("llamacpp", f"{choice.reason}; but format {req.fmt} is a GGUF")
    elif not view.entry.formats_for("vllm"):
        return BackendChoice("llamacpp", f"{choice.reason}; but {req.model} has no vLLM format")
    return choice


def prepare(req: ServeRequest, settings: Settings, choice: BackendChoice, view: CatalogView):
    resolved: ResolvedFormat = resolve_format(view.catalog, view.store, req.model, req.fmt,
                                              engine=choice.backend)
    if resolved.spec.engine != choice.backend:
        raise DgxReadyError(f"format {resolved.name} is for {resolved.spec.engine}, "
                            f"not {choice.backend}")
    entry_path = view.store.require_verified(req.model, resolved.name, resolved.spec)
    shape = kv_shape(entry_path, view.entry.architecture)
    parallel = req.parallel or settings.serve.parallel
    ctx = req.ctx_per_slot or settings.serve.ctx_per_slot
    kv = engine_kv_dtype(choice.backend, req.kv_dtype)
    plan = require_fit(make_plan(req.model, resolved.name, resolved.spec, shape, parallel,
                                 min(ctx, shape.context_length), kv, host_budget()))
    return resolved, entry_path, plan


def catalog_view(model: str, settings: Settings) -> CatalogView:
    catalog = load_catalog()
    return CatalogView(catalog, catalog.model(model), store_for(settings))


def serve(req: ServeRequest, settings: Settings | None = None) -> ServerState:
    settings = settings or load_settings()
    host = req.host or settings.serve.host
    port = req.port or settings.serve.port
    if port_in_use(host, port):
        owner = next((s for s in load_states(settings) if s.port == port and s.running), None)
        who = f" by {owner.model} ({owner.backend}, pid {owner.pid})" if owner else ""
        raise DgxReadyError(f"port {port} on {host} is already in use{who}; "
                            "pick another with --port or stop it with `invoke model.stop`")
    view = catalog_view(req.model, settings)
    if view.entry.purpose == "embedding" and not req.embeddings:
        raise DgxReadyError(f"{req.model} is an embedding model: serve it with --embeddings")
    choice = settle_backend(req, choose_backend(req.backend, settings.serve.vllm_image), view)
    console.print(f"backend: [bold]{choice.backend}[/] ({choice.reason})")
    resolved, entry_path, plan = prepare(req, settings, choice, view)
    flags = plan.engine_flags + (embedding_flags(choice.backend, plan.ctx) if req.embeddings else [])
    if choice.backend == "llamacpp":
        cmd = llamacpp_command(require_binary("llama-server", settings), entry_path, req.model,
                               host, port, flags, req.extra_args)
    else:
        if plan.budget.kind == "unified":
            console.print(drop_page_cache())
        mistral_tok = any(f.name == "tokenizer.model.v3" for f in resolved.spec.files)
        cmd = vllm_command(choice, entry_path.parent, req.model, host, port, flags,
                           mistral_tok, req.extra_args)
    log = settings.state_dir / "logs" / f"{req.model}-{port}.log"
    proc = launch(cmd, log)
    timeout = settings.serve.startup_timeout_s * (8 if choice.backend == "vllm" else 1)
    try:
        with waiting(f"waiting for {choice.backend} on {host}:{port}"):
            wait_ready(proc, f"http://{host}:{port}", log, timeout)
        state = ServerState(req.model, resolved.name, choice.backend, choice.reason, proc.pid,
                            proc_start_time(proc.pid), host, port, plan.agents, str(log), cmd,
                            time.time(), "embeddings" if req.embeddings else "chat")
        atomic_write_json(state_path(settings, port), asdict(state))
    except BaseException:
        # Ctrl-C while waiting: the server runs in its own process group and would outlive us
        # with no state file to find it by.
        terminate_pid(proc.pid, None)
        raise
    return state


@dataclass(frozen=True)
class ServerStatus:
    state: ServerState
    running: bool
    healthy: bool
    detail: str


def status(settings: Settings | None = None) -> list[ServerStatus]:
    settings = settings or load_settings()
    out = []
    for st in load_states(settings):
        running = st.running
        healthy, detail = False, ""
        if running:
            try:
                r = httpx.get(f"{st.base_url}/health", timeout=3.0)
                healthy, detail = r.status_code == 200, f"/health {r.status_code}"
            except httpx.HTTPError as exc:
                detail = f"/health unreachable: {exc.__class__.__name__}"
        else:
            detail = "process is gone; last log lines:\n" + log_tail(Path(st.log_path), 10)
        out.append(ServerStatus(st, running, healthy, detail))
    return out


def stop(model: str | None = None, port: int | None = None,
         settings: Settings | None = None) -> list[ServerState]:
    """Stop the recorded servers that match; with neither filter, all of them."""
    settings = settings or load_settings()
    stopped = []
    for st in load_states(settings):
        if (model and st.model != model) or (port and st.port != port):
            continue
        terminate_pid(st.pid, st.proc_start)
        state_path(settings, st.port).unlink(missing_ok=True)
        stopped.append(st)
    if not stopped and (model or port):
        raise DgxReadyError(f"no recorded server for {model or ''}{' port ' + str(port) if port else ''}")
    return stopped


__all__ = ["ServeRequest", "ServerState", "ServerFailed", "serve", "status", "stop"]
