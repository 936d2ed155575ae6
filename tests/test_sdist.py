"""model.sdist against a real HTTP package index on 127.0.0.1 serving the simple API's JSON form."""
from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from model import sdist

PAYLOAD = b"llama.cpp sources " * 5000


class Index(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    listed_sha256: str | None = None
    cut_short = False
    html_only = False

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/simple/llama-cpp-python/":
            entries = [{"filename": name, "url": f"../../files/{name}",
                        "hashes": {"sha256": self.listed_sha256 or hashlib.sha256(data).hexdigest()}}
                       for name, data in self.files.items()]
            body = orjson.dumps({"meta": {"api-version": "1.1"}, "files": entries})
            kind = sdist.SIMPLE_JSON
            if self.html_only:
                kind = "text/html"
                body = "".join(f'<a href="{e["url"]}#sha256={e["hashes"]["sha256"]}">{e["filename"]}</a><br/>'
                               for e in entries).encode()
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        name = self.path.rsplit("/", 1)[-1]
        if not self.path.startswith("/files/") or name not in self.files:
            self.send_error(404)
            return
        data = self.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if self.cut_short else data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def index(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[Index]]:
    handler = type("Handler", (Index,), {"files": {"llama_cpp_python-9.9.9.tar.gz": PAYLOAD}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/simple/")
    yield handler
    server.shutdown()
    server.server_close()


def test_an_sdist_is_found_by_its_pep625_name_and_downloaded_whole(index: type[Index], tmp_path: Path) -> None:
    got = sdist.fetch_sdist("llama_cpp.python", "9.9.9", tmp_path)
    assert got == tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    assert got.read_bytes() == PAYLOAD
    assert [p.name for p in tmp_path.iterdir()] == [got.name]


def test_a_mirror_that_answers_only_html_serves_the_sdist_too(index: type[Index], tmp_path: Path) -> None:
    index.html_only = True
    assert sdist.fetch_sdist("llama-cpp-python", "9.9.9", tmp_path).read_bytes() == PAYLOAD
    index.listed_sha256 = "0" * 64
    (tmp_path / "llama_cpp_python-9.9.9.tar.gz").unlink()
    with pytest.raises(sdist.SdistError, match="is not the index's"):
        sdist.fetch_sdist("llama-cpp-python", "9.9.9", tmp_path)


def test_a_cached_sdist_is_not_fetched_again(index: type[Index], tmp_path: Path) -> None:
    (tmp_path / "llama_cpp_python-9.9.9.tar.gz").write_bytes(b"kept")
    index.files = {}
    assert sdist.fetch_sdist("llama-cpp-python", "9.9.9", tmp_path).read_bytes() == b"kept"


@pytest.mark.parametrize("fault", ["short", "index_hash", "pinned_hash"])
def test_a_damaged_download_leaves_nothing_and_names_the_url(index: type[Index], tmp_path: Path,
                                                             fault: str) -> None:
    index.cut_short = fault == "short"
    index.listed_sha256 = "0" * 64 if fault == "index_hash" else None
    pinned = "f" * 64 if fault == "pinned_hash" else None
    with pytest.raises(sdist.SdistError, match="files/llama_cpp_python-9.9.9.tar.gz"):
        sdist.fetch_sdist("llama-cpp-python", "9.9.9", tmp_path, pinned)
    assert list(tmp_path.iterdir()) == []


def test_a_version_the_index_lacks_is_named(index: type[Index], tmp_path: Path) -> None:
    with pytest.raises(sdist.SdistError, match="no file llama_cpp_python-1.0.0.tar.gz"):
        sdist.fetch_sdist("llama-cpp-python", "1.0.0", tmp_path)


def test_an_index_that_does_not_answer_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    with pytest.raises(sdist.SdistError, match="127.0.0.1:9/simple/llama-cpp-python/: the package index"):
        sdist.fetch_sdist("llama-cpp-python", "9.9.9", tmp_path)
