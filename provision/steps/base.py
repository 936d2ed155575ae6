"""What every step shares: apt installs and atomic uploads, each written once."""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from provision.core import Host, StepFailed, q


@dataclass(frozen=True)
class InstallPackages:
    packages: tuple[str, ...]

    def describe(self) -> str:
        return "install " + ", ".join(self.packages)


def apt_install(host: Host, packages: tuple[str, ...] | list[str]) -> None:
    host.sh("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
            f"--no-install-recommends {q(*packages)} >/dev/null")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _prepare(host: Host, parent: str, partial: str, mode: str) -> None:
    # The partial file takes its final mode before a byte arrives, so a secret is never readable.
    host.sh(f"install -d -m 0755 {q(parent)} && rm -f {q(partial)} && "
            f"install -m {q(mode)} /dev/null {q(partial)}")


def _place(host: Host, partial: str, final: str, mode: str, owner: str | None, sha256: str | None) -> None:
    if sha256 is not None:
        got = host.sh(f"sha256sum {q(partial)}")[1].split()[0]
        if got != sha256:
            host.sh(f"rm -f {q(partial)}")
            raise StepFailed(f"{host.name}: upload of {final} corrupted: expected sha256 {sha256}, found {got}")
    chown = f"chown {q(owner)} {q(partial)} && " if owner else ""
    host.sh(f"{chown}chmod {q(mode)} {q(partial)} && mv -f {q(partial)} {q(final)}")


def upload_file(host: Host, local: Path, remote: str, mode: str = "0644", sha256: str | None = None,
                owner: str | None = None) -> None:
    """Upload to a `.partial` name beside the target, re-hash there when a digest is given, then
    move into place: a half-sent file never carries the final name."""
    parent = str(PurePosixPath(remote).parent)
    partial = f"{parent}/.{PurePosixPath(remote).name}.partial"
    _prepare(host, parent, partial, mode)
    host.conn.put(str(local), partial)
    _place(host, partial, remote, mode, owner, sha256)


def upload_text(host: Host, remote: str, text: str, mode: str = "0644", owner: str | None = None) -> None:
    parent = str(PurePosixPath(remote).parent)
    partial = f"{parent}/.{PurePosixPath(remote).name}.partial"
    _prepare(host, parent, partial, mode)
    host.conn.put(io.BytesIO(text.encode()), partial)
    _place(host, partial, remote, mode, owner, sha256_text(text))
