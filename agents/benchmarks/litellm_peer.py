"""LiteLLM's proxy as a peer in the overhead comparison: `litellm[proxy]`, pinned, in a venv of its
own under the benchmark cache (`~/.cache/dgxready/tools/litellm-<version>/`, reused when a previous
install finished), one worker, one model entry pointing at the instant backend. Everything that
phones home or needs a database stays off: no DATABASE_URL, the local model cost map, telemetry
off, no master key. A benchmark fixture; never imported by the multiplexer."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from dgxready.settings import load_settings

LITELLM_VERSION = "1.106.2"
PROGRESS_EVERY_S = 10.0
QUIET_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",   # no download of the model cost map at import
    "LITELLM_TELEMETRY": "False",
    "LITELLM_LOG": "ERROR",
    "LITELLM_MODE": "PRODUCTION",             # no .env loading
    "DISABLE_ADMIN_UI": "True",
    "STORE_MODEL_IN_DB": "False",
    "DISABLE_SCHEMA_UPDATE": "True",
    "NO_DOCS": "True",
    "NO_REDOC": "True",
}


@dataclass(frozen=True)
class LiteLLMInstall:
    version: str
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def done_marker(self) -> Path:
        return self.root / ".dgxready-installed"

    @property
    def ready(self) -> bool:
        return self.done_marker.exists() and self.python.exists()


def install_dir(version: str = LITELLM_VERSION) -> LiteLLMInstall:
    return LiteLLMInstall(version, load_settings().cache_dir / "tools" / f"litellm-{version}")


def run_with_progress(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    """Runs argv, echoing its output lines, and a line every PROGRESS_EVERY_S while it is silent."""
    started = time.monotonic()
    last = [started]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    stop = threading.Event()

    def ticker() -> None:
        while not stop.wait(1.0):
            if time.monotonic() - last[0] >= PROGRESS_EVERY_S:
                last[0] = time.monotonic()
                print(f"  {what}: still running ({time.monotonic() - started:.0f} s)", flush=True)

    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    try:
        for line in proc.stdout or ():
            last[0] = time.monotonic()
            if line.startswith(" + "):  # one line per installed package: counted in the summary line
                continue
            print(f"  {what}: {line.rstrip()}", flush=True)
    finally:
        stop.set()
        thread.join()
    if proc.wait() != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}")


def uv_binary() -> str | None:
    beside = Path(sys.executable).with_name("uv")
    return str(beside) if beside.exists() else shutil.which("uv")


def ensure_litellm(version: str = LITELLM_VERSION) -> LiteLLMInstall:
    """The pinned LiteLLM proxy in its own venv; installed once, with progress lines."""
    inst = install_dir(version)
    if inst.ready:
        print(f"LiteLLM {version}: reusing {inst.root}", flush=True)
        return inst
    print(f"LiteLLM {version}: installing litellm[proxy]=={version} into {inst.root} (once)", flush=True)
    shutil.rmtree(inst.root, ignore_errors=True)
    inst.root.parent.mkdir(parents=True, exist_ok=True)
    uv = uv_binary()
    spec = f"litellm[proxy]=={version}"
    if uv:
        run_with_progress([uv, "venv", "--python", sys.executable, str(inst.root)], "uv venv")
        run_with_progress([uv, "pip", "install", "--python", str(inst.python), spec], "uv pip install",
                          env={**os.environ, "UV_NO_PROGRESS": "1"})
    else:
        run_with_progress([sys.executable, "-m", "venv", str(inst.root)], "venv")
        run_with_progress([str(inst.python), "-m", "pip", "install", "--progress-bar", "off", spec],
                          "pip install")
    inst.done_marker.write_text(f"{spec}\n")
    return inst


def litellm_config(backend_url: str, master_key: str, model: str = "instant") -> dict:
    """One model entry, OpenAI-compatible, at the instant backend; nothing stored, nothing sent out.
    A master key is required to start (1.106 refuses to run open); without a database it is the
    only key, checked in memory, as the multiplexer checks its agent keys."""
    return {
        "model_list": [{"model_name": model, "litellm_params": {
            "model": f"openai/{model}", "api_base": f"{backend_url}/v1", "api_key": "none"}}],
        "litellm_settings": {"telemetry": False, "drop_params": True, "request_timeout": 120,
                             "turn_off_message_logging": True},
        "general_settings": {"master_key": master_key, "disable_spend_logs": True,
                             "disable_error_logs": True},
    }


def litellm_argv(inst: LiteLLMInstall, config: Path, port: int) -> list[str]:
    return [str(inst.root / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
            "--port", str(port), "--num_workers", "1"]


def start_litellm(inst: LiteLLMInstall, backend_url: str, workdir: Path, port: int, master_key: str
                  ) -> subprocess.Popen:
    """Starts the proxy (one worker); the caller waits for its health and stops it."""
    config = workdir / f"litellm-{port}.yaml"
    config.write_text(yaml.safe_dump(litellm_config(backend_url, master_key)))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTHONPATH")} | QUIET_ENV
    log = (workdir / f"litellm-{port}.log").open("w")
    return subprocess.Popen(litellm_argv(inst, config, port), stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=workdir)
