"""The header reader against gguf-py's own reader, on the real default model, and on truncated
and foreign files."""
from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

from dgxready.errors import DgxReadyError
from model.gguf_meta import read_metadata


@pytest.fixture(scope="module")
def gguf_file(session_store) -> Path:
    return next(session_store.rglob("*.gguf"))


def test_scalars_match_gguf_py_on_the_default_model(gguf_file):
    ours = read_metadata(gguf_file)
    theirs = GGUFReader(gguf_file).fields
    header = {k for k in theirs if k.startswith("GGUF.")}
    assert header == {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, field in theirs.items():
        if key in header:
            continue
        value = field.contents()
        if isinstance(value, list):
            assert key not in ours
        elif isinstance(value, float):
            assert ours[key] == pytest.approx(value)
        else:
            assert ours[key] == value, key


def test_a_truncated_file_is_named_not_crashed_on(gguf_file, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_file.read_bytes()[:5000])
    with pytest.raises(DgxReadyError, match="cut.gguf: truncated or corrupt GGUF header"):
        read_metadata(cut)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    other = tmp_path / "model.gguf"
    other.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(DgxReadyError, match="model.gguf: not a GGUF file"):
        read_metadata(other)
