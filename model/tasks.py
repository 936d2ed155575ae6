"""Invoke tasks for model prep and serving: thin shells over model.* functions."""
from __future__ import annotations

from invoke import Collection, task
from invoke.exceptions import Exit
from rich.table import Table

from dgxready.cli import out, user_errors
from dgxready.settings import load_settings
from model import llamacpp_build
from model import serve as serving
from model.backend import choose_backend
from model.catalog import load_catalog
from model.chat import chat_once
from model.memory import host_budget
from model.plan import engine_kv_dtype, kv_shape, make_plan, require_fit
from model.pull import pull as pull_model
from model.pull import resolve_format, store_for
from model.quantize import quantize as quantize_model
from model.store import FileState

FORMAT_HELP = "catalog format (default: the first one for the engine this host would use)"


@task
@user_errors
def list_(c):
    """Show the catalog and which formats are present in the model store."""
    settings = load_settings()
    store, catalog = store_for(settings), load_catalog()
    table = Table(title=f"model store: {settings.models_dir}")
    for col in ("model", "format", "engine", "quant", "size", "present"):
        table.add_column(col)
    for name, entry in catalog.models.items():
        formats = dict(entry.formats) | store.local_formats(name)
        for fmt, spec in formats.items():
            have, total = store.presence(name, fmt, spec)
            mark = "yes" if have == total else ("no" if have == 0 else f"partial {have}/{total}")
            default = " (default)" if name == catalog.default and fmt == next(iter(formats)) else ""
            table.add_row(name + default, fmt, spec.engine, spec.quantization or "",
                          f"{spec.weight_bytes / 1e9:.2f} GB", mark)
    out.print(table)


@task(help={"name": "model name from model/models.yaml", "format": FORMAT_HELP})
@user_errors
def pull(c, name, format=None):
    """Download a model into the store, verify its sha256, and move it in atomically."""
    engine = None if format else choose_backend("auto", load_settings().serve.vllm_image).backend
    result = pull_model(name, format, engine=engine)
    out.print(f"{result.model} ({result.fmt}): fetched {len(result.fetched)}, already present "
              f"{len(result.already_present)} -> {result.directory}")


@task(help={"name": "model name", "format": "format to check (default: every present format)"})
@user_errors
def verify(c, name, format=None):
    """Re-hash a model's files; a mismatching file is quarantined. Exit 1 if any is not ok."""
    settings = load_settings()
    store, catalog = store_for(settings), load_catalog()
    entry = catalog.model(name)
    formats = [format] if format else [
        f for f, spec in (dict(entry.formats) | store.local_formats(name)).items()
        if store.presence(name, f, spec)[0] > 0
    ]
    if not formats:
        raise Exit(f"error: {name} has no format in the store; run `invoke model.pull {name}`", 1)
    bad = 0
    for fmt in formats:
        resolved = resolve_format(catalog, store, name, fmt)
        for check in store.verify(name, fmt, resolved.spec):
            bad += check.state is not FileState.OK
            colour = "green" if check.state is FileState.OK else "red"
            out.print(f"[{colour}]{fmt}: {check.describe()}")
    if bad:
        raise Exit(f"{bad} file(s) failed verification", code=1)


@task(help={
    "name": "model name",
    "type": "llama.cpp quantization type, e.g. Q4_K_M or Q8_0",
    "source_format": "GGUF format to start from (default: the first GGUF format)",
})
@user_errors
def quantize(c, name, type, source_format=None):
    """Quantize (or requantize) a GGUF with llama-quantize; the result becomes a local format."""
    result = quantize_model(name, type, source_format)
    out.print(f"{result.model}: format {result.fmt} -> {result.path} "
              f"({result.size / 1e6:.1f} MB, sha256 {result.sha256})")


@task(help={
    "name": "model name",
    "agents": "concurrent sequences (agents) to hold KV cache for",
    "ctx": "context length per sequence, in tokens",
    "kv_dtype": "KV cache dtype: f16, fp8 (vLLM), q8_0 or q4_0 (llama.cpp)",
    "format": FORMAT_HELP,
    "backend": "plan for auto, vllm or llamacpp",
})
@user_errors
def plan(c, name, agents=10, ctx=4096, kv_dtype="f16", format=None, backend="auto"):
    """Add up weights, KV cache and overhead against this host's memory; print engine flags."""
    settings = load_settings()
    catalog, store = load_catalog(), store_for(settings)
    engine = backend if backend != "auto" else choose_backend("auto", settings.serve.vllm_image).backend
    resolved = resolve_format(catalog, store, name, format, engine=None if format else engine)
    entry_path = store.file_path(name, resolved.name, resolved.spec.entry_file)
    shape = kv_shape(entry_path, catalog.model(name).architecture)
    kv = engine_kv_dtype(resolved.spec.engine, kv_dtype)
    p = make_plan(name, resolved.name, resolved.spec, shape, agents, ctx, kv, host_budget())
    table = Table(title=f"memory plan: {name} ({resolved.name}, {resolved.spec.engine}); "
                        f"architecture from {shape.source}")
    table.add_column("item")
    table.add_column("bytes", justify="right")
    for k, v in p.rows():
        table.add_row(k, v)
    out.print(table)
    require_fit(p)
    out.print(f"[green]fits[/]: {resolved.spec.engine} flags: {' '.join(p.engine_flags)}")


@task(help={
    "name": "model name",
    "backend": "auto (vLLM on a CUDA GPU with vLLM present, else llama.cpp), vllm or llamacpp",
    "port": "port to listen on (default from dgxready.yaml: 8080)",
    "host": "address to bind (default 127.0.0.1)",
    "parallel": "parallel sequences: llama-server -np, vLLM --max-num-seqs",
    "ctx": "context per sequence, in tokens",
    "format": FORMAT_HELP,
    "kv_dtype": "KV cache dtype: f16, fp8 (vLLM), q8_0 or q4_0 (llama.cpp)",
    "embeddings": "a second instance for /v1/embeddings only (llama-server --embeddings, vLLM pooling "
                  "runner), for the agents' knowledge store",
})
@user_errors
def serve(c, name, backend="auto", port=None, host=None, parallel=None, ctx=None, format=None,
          kv_dtype="f16", embeddings=False):
    """Verify, plan and start the inference server; wait until /health and /v1/models answer."""
    state = serving.serve(serving.ServeRequest(
        model=name, fmt=format, backend=backend, host=host, port=int(port) if port else None,
        parallel=int(parallel) if parallel else None, ctx_per_slot=int(ctx) if ctx else None,
        kv_dtype=kv_dtype, embeddings=bool(embeddings),
    ))
    out.print(f"[green]serving[/] {state.model} ({state.fmt}) with {state.backend} at "
              f"{state.base_url}/v1 (pid {state.pid}, {state.parallel} slots, log {state.log_path})")


@task
@user_errors
def status(c):
    """Show the servers model.serve started, and whether they are alive and healthy."""
    table = Table(title="servers")
    for col in ("model", "format", "backend", "url", "pid", "state"):
        table.add_column(col)
    rows = serving.status()
    for s in rows:
        state = "healthy" if s.healthy else ("running, " + s.detail if s.running else "dead")
        table.add_row(s.state.model, s.state.fmt, s.state.backend, s.state.base_url,
                      str(s.state.pid), state)
    out.print(table)
    for s in rows:
        if not s.running:
            out.print(f"[red]{s.state.model} on port {s.state.port}: {s.detail}")


@task(help={"name": "stop only this model's servers", "port": "stop only the server on this port"})
@user_errors
def stop(c, name=None, port=None):
    """Stop servers started by model.serve (all of them unless filtered)."""
    alive = {s.port: s.running for s in serving.load_states(load_settings())}
    stopped = serving.stop(name, int(port) if port else None)
    for st in stopped:
        if alive.get(st.port):
            out.print(f"stopped {st.model} on {st.base_url} (pid {st.pid})")
        else:
            out.print(f"forgot {st.model} on {st.base_url}: pid {st.pid} had already exited")
    if not stopped:
        out.print("no servers were running")


@task(help={"force": "rebuild even if a cached build exists"})
@user_errors
def build_llamacpp(c, force=False):
    """Build llama-server, llama-quantize and llama-bench from the pinned llama-cpp-python sdist."""
    build = llamacpp_build.build_llamacpp(force=force)
    out.print(f"llama.cpp {build.spec.key} (commit {build.llama_cpp_commit or '?'}) in {build.root}")


@task(help={
    "url": "OpenAI-compatible base URL (default: the running model.serve server)",
    "prompt": "user message to send",
    "max_tokens": "maximum tokens to generate",
})
@user_errors
def chat(c, url=None, prompt="Say hello to the platform team in one sentence.", max_tokens=64):
    """Send one chat completion through the openai SDK and print the answer."""
    reply = chat_once(url, prompt, int(max_tokens))
    out.print(f"[bold]{reply.model}[/] ({reply.completion_tokens} tokens, {reply.seconds:.2f} s): "
              f"{reply.text}")


@task(help={
    "name": "model name",
    "port": "port the unit's server listens on",
    "user": "user the service runs as",
    "format": FORMAT_HELP,
    "output": "write the unit here instead of printing it",
})
@user_errors
def unit(c, name, port=8080, user=None, format=None, output=None):
    """Render the systemd unit that serves a model with llama-server on a host."""
    from model.unit import llamacpp_unit_for

    text = llamacpp_unit_for(name, int(port), user, format)
    if output:
        from pathlib import Path

        from dgxready.files import atomic_write_text

        atomic_write_text(Path(output), text)
        out.print(f"wrote {output}")
    else:
        print(text, end="")


ns = Collection("model")
ns.add_task(list_, name="list")
for t in (pull, verify, quantize, plan, serve, status, stop, build_llamacpp, chat, unit):
    ns.add_task(t)
