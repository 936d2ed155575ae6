"""One source distribution fetched straight from the package index (the simple API, PEP 691's JSON
or PEP 503's HTML), checked against the index's sha256 and a pinned one where we have it. `pip download`
would first build the sdist's build backend and its dependencies from source to read metadata
that a download does not need: a silent minute for llama-cpp-python on 2 cores."""
from __future__ import annotations

import hashlib
import html
import http.client
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import orjson

from dgxready.errors import DgxReadyError
from dgxready.progress import byte_progress

DEFAULT_INDEX = "https://pypi.org/simple"
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
TIMEOUT_S = 60


class SdistError(DgxReadyError):
    pass


@dataclass(frozen=True)
class IndexFile:
    name: str
    url: str
    sha256: str | None


def index_url() -> str:
    """pip's index (PIP_INDEX_URL), else PyPI's."""
    return (os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/")


def normalised_project(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


HTML_LINK = re.compile(r'<a\s[^>]*href="([^"]+)"[^>]*>\s*([^<]+?)\s*</a>', re.IGNORECASE)


def listed_files(body: bytes, content_type: str, page: str) -> dict[str, IndexFile]:
    """The project page's files: the JSON form (PEP 691), or the HTML one (PEP 503) that an
    older mirror answers with, its hash in the link's #sha256= fragment."""
    if "json" in content_type:
        try:
            listing = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise SdistError(f"{page}: the index's JSON is malformed") from None
        entries = listing.get("files") if isinstance(listing, dict) else None
        return {e["filename"]: IndexFile(e["filename"], urljoin(page, str(e.get("url", ""))),
                                         (e.get("hashes") or {}).get("sha256"))
                for e in entries or [] if isinstance(e, dict) and isinstance(e.get("filename"), str)}
    files = {}
    for href, name in HTML_LINK.findall(body.decode("utf-8", errors="replace")):
        url, _, fragment = html.unescape(href).partition("#")
        digest = fragment.removeprefix("sha256=") if fragment.startswith("sha256=") else None
        files[html.unescape(name)] = IndexFile(html.unescape(name), urljoin(page, url), digest)
    return files


def find_file(project: str, filename: str, index: str) -> IndexFile:
    page = f"{index}/{normalised_project(project)}/"
    request = urllib.request.Request(page, headers={"Accept": f"{SIMPLE_JSON}, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            body, content_type = response.read(), response.headers.get("Content-Type", "")
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise SdistError(f"{page}: the package index did not answer: {exc}") from None
    found = listed_files(body, content_type, page).get(filename)
    if found is None:
        raise SdistError(f"{page}: no file {filename} in the index")
    return found


def download(file: IndexFile, dest: Path, pinned_sha256: str | None = None) -> Path:
    """Into `dest` atomically; a short or altered download leaves nothing behind."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / file.name
    partial = dest / f".{file.name}.{os.getpid()}.partial"
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(file.url, timeout=TIMEOUT_S) as response, \
                open(partial, "wb") as out, byte_progress() as progress:
            size = int(response.headers.get("Content-Length") or 0) or None
            task = progress.add_task(f"download {file.name}", total=size)
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                progress.advance(task, len(chunk))
            received = out.tell()
        if size is not None and received != size:
            raise SdistError(f"{file.url}: {received} of {size} bytes arrived")
        for wanted, whose in ((file.sha256, "the index's"), (pinned_sha256, "the pinned")):
            if wanted and digest.hexdigest() != wanted.lower():
                raise SdistError(f"{file.url}: sha256 {digest.hexdigest()} is not {whose} {wanted}")
        os.replace(partial, target)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise SdistError(f"{file.url}: download failed: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def fetch_sdist(project: str, version: str, dest: Path, pinned_sha256: str | None = None) -> Path:
    """`dest/<project>-<version>.tar.gz` (the name PEP 625 gives), downloaded when missing."""
    filename = f"{normalised_project(project).replace('-', '_')}-{version}.tar.gz"
    cached = dest / filename
    if cached.exists():
        return cached
    return download(find_file(project, filename, index_url()), dest, pinned_sha256)
