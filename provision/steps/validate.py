"""The end-to-end check: the GPU where one is expected, the engine unreachable from outside
the host (or guarded by its API key), and one chat through the multiplexer with an agent key."""
from __future__ import annotations

from provision.core import Changes, Host, Step, StepFailed, changes
from provision.facts import HttpStatus, MultiplexerChat, NvidiaSmi, TcpAccepts
from provision.steps.services import engine_bind, is_loopback, keys_path, mux_host


class Validate(Step):
    name = "validate"
    needs_converged = True

    def check(self, host: Host) -> Changes:
        v = host.vars
        if v.profile != "cpu-only" and not host.fact(NvidiaSmi()).answered:
            raise StepFailed(f"{host.name}: no GPU visible to nvidia-smi: {host.fact(NvidiaSmi()).error}")
        self.check_engine_is_private(host)
        url = f"http://{mux_host(host)}:{v.mux_port}"
        reply = host.fact(MultiplexerChat(f"{v.prefix}/venv/bin/python", url, keys_path(host)))
        if not reply.ok:
            raise StepFailed(f"{host.name}: chat through the multiplexer at {url} failed: {reply.text}")
        return changes()

    def check_engine_is_private(self, host: Host) -> None:
        v = host.vars
        bind = engine_bind(host)
        if is_loopback(bind):
            if host.fact(TcpAccepts(host.address, v.serve_port)):
                raise StepFailed(f"{host.name}: the engine port {v.serve_port} accepts connections at "
                                 f"{host.address}; it should bind {bind} only")
            return
        status = host.fact(HttpStatus(f"http://{bind}:{v.serve_port}/v1/models"))
        if status != 401:
            raise StepFailed(f"{host.name}: the engine at {bind}:{v.serve_port} answered {status} without "
                             "an API key; expected 401")

    def apply(self, host: Host, todo: Changes) -> str:
        return ""
