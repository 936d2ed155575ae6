"""The systemd unit for serving a model with llama-server, with this machine's paths."""
from __future__ import annotations

from dgxready.settings import load_settings
from model.catalog import load_catalog
from model.llamacpp_build import require_binary
from model.memory import host_budget
from model.plan import make_plan, require_fit, shape_from_catalog
from model.pull import resolve_format, store_for
from model.serve import llamacpp_command
from model.systemd import render_unit


def llamacpp_unit_for(name: str, port: int, user: str | None = None, fmt: str | None = None,
                      host: str = "127.0.0.1") -> str:
    settings = load_settings()
    store = store_for(settings)
    resolved = resolve_format(load_catalog(), store, name, fmt, engine="llamacpp")
    arch = load_catalog().model(name).architecture
    plan = require_fit(make_plan(name, resolved.name, resolved.spec, shape_from_catalog(arch),
                                 settings.serve.parallel, settings.serve.ctx_per_slot, "f16",
                                 host_budget()))
    model_path = store.file_path(name, resolved.name, resolved.spec.entry_file)
    cmd = llamacpp_command(require_binary("llama-server", settings), model_path, name, host, port,
                           plan.engine_flags, ())
    return render_unit(f"dgxready-llama-{name}", f"dgxready llama-server for {name} on :{port}",
                       cmd, user=user)
