"""Run the multiplexer: in the foreground (`invoke agents.serve`, `python -m agents.service`)
or in a background thread (benchmarks)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from agents.config import MuxConfig, load_config, load_keys
from agents.mux import Mux, create_mux
from agents.server import create_app
from agents.state import StateLimits, StateStore
from dgxready.errors import DgxReadyError
from dgxready.gc_settings import settle_gc
from dgxready.logs import setup_logging
from dgxready.roles import Role, load_roles
from dgxready.settings import load_settings
from model.procs import port_in_use

DEFAULT_CONFIG = Path(__file__).with_name("multiplexer.yaml")
SERVICE = "dgxready-mux"  # its log file, <state>/logs/dgxready-mux.jsonl, and its systemd unit


def default_keys_path() -> Path:
    return load_settings().state_dir / "agent-keys.yaml"


def default_db_path() -> Path:
    return load_settings().state_dir / "multiplexer.db"


def state_limits(config: MuxConfig) -> StateLimits:
    return StateLimits(session_max_turns=config.session_max_turns,
                       session_max_bytes=config.session_max_bytes, retention_days=config.retention_days)


def build_mux(config: MuxConfig, roles: dict[str, Role] | None = None) -> Mux:
    """The multiplexer's state for `config`, with the role files' roles unless `roles` are given."""
    roles = roles or load_roles()
    keys = load_keys(config.keys_file or default_keys_path(), set(roles))
    store = StateStore(config.state_db or default_db_path(), state_limits(config))
    return create_mux(config, roles, keys, store)


def build_app(config: MuxConfig, roles: dict[str, Role] | None = None):
    """The app for `config`, with the role files' roles unless `roles` are given."""
    return create_app(build_mux(config, roles))


def listen_options(config: MuxConfig) -> dict:
    """uvicorn's settings for the multiplexer, the service's and a background one's alike."""
    return {"host": config.host, "port": config.port, "log_level": "warning", "access_log": False,
            "timeout_keep_alive": config.keep_alive_s}


def ensure_port_free(config: MuxConfig, source: Path) -> None:
    """Refuses, before anything starts, a port another server holds: uvicorn would only log it."""
    if port_in_use(config.host, config.port):
        raise DgxReadyError(f"{source}: port: {config.port} on {config.host} is already in use (another "
                            "multiplexer?); stop it, or set another port there or with --port")


def serve_forever(config: MuxConfig) -> None:
    app = build_app(config)
    settle_gc()
    setup_logging(SERVICE)
    logging.getLogger("dgxready.mux").info("mux.started", extra={"host": config.host, "port": config.port})
    uvicorn.run(app, **listen_options(config), log_config=None)


@dataclass
class BackgroundMux:
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_background(config: MuxConfig, roles: dict[str, Role] | None = None) -> BackgroundMux:
    app = build_app(config, roles)
    server = uvicorn.Server(uvicorn.Config(app, **listen_options(config), lifespan="on"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError("the multiplexer did not start")
    port = server.servers[0].sockets[0].getsockname()[1]
    return BackgroundMux(server, thread, f"http://{config.host}:{port}")


def main() -> None:
    parser = argparse.ArgumentParser(description="dgxready agent multiplexer")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="multiplexer YAML")
    parser.add_argument("--port", type=int, help="override the port in the config")
    args = parser.parse_args()
    try:
        config = load_config(args.config)
        if args.port is not None:
            config = config.model_copy(update={"port": args.port})
        ensure_port_free(config, args.config)
    except DgxReadyError as exc:
        raise SystemExit(f"error: {exc}") from None
    serve_forever(config)


if __name__ == "__main__":
    main()
