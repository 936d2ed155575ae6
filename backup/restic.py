"""restic behind one class: the repository and its password reach restic through its own
environment variables (a password file where there is one), never through argv, and every line
of restic's output we pass on is scrubbed of them. restic's failures become named errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from backup.config import BackupConfig, data_home
from dgxready.errors import ConfigError, DgxReadyError

RESTIC_VARIABLES = ("RESTIC_REPOSITORY", "RESTIC_REPOSITORY_FILE", "RESTIC_PASSWORD", "RESTIC_PASSWORD_FILE",
                    "RESTIC_PASSWORD_COMMAND")
TAG = "dgxready"
REDACTED = "***"


class BackupError(DgxReadyError):
    """A backup, restore or verification failed; the message says where and why."""


class WrongPassword(BackupError):
    pass


class NoRepository(BackupError):
    pass


class CorruptRepository(BackupError):
    pass


class SnapshotNotFound(BackupError):
    pass


class DiskFull(BackupError):
    pass


@dataclass(frozen=True)
class Credentials:
    """The repository and where its password comes from; `secrets` are the strings no output
    may show (the password, and any user:password inside the repository URL)."""
    repository: str
    env: dict[str, str] = field(repr=False)
    password_source: str
    secrets: tuple[str, ...] = field(repr=False)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    @property
    def shown(self) -> str:
        return self.redact(self.repository)


def url_secrets(repository: str) -> tuple[str, ...]:
    """The userinfo of a URL repository (rest:https://user:pass@host/, s3:https://...)."""
    rest = repository.split(":", 1)[1] if re.match(r"^(rest|s3|swift|azure|gs|b2|rclone):", repository) else ""
    found = urlsplit(rest).password if "://" in rest else None
    user = urlsplit(rest).username if "://" in rest else None
    return tuple(s for s in (found, f"{user}:{found}" if user and found else None) if s)


def read_password_file(path: Path, what: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if not text:
        raise ConfigError(f"{what}: {path} is empty")
    return text


def credentials(config: BackupConfig, source: str = "backup.yaml") -> Credentials:
    """Repository: the config's, else $RESTIC_REPOSITORY, else <data dir>/dgxready/restic.
    Password: the config's password_file, else $RESTIC_PASSWORD_FILE, else $RESTIC_PASSWORD."""
    environ = os.environ
    repository = config.repository or environ.get("RESTIC_REPOSITORY") or str(data_home() / "dgxready/restic")
    env = {"RESTIC_REPOSITORY": repository}
    if config.password_file:
        password = read_password_file(config.password_file, f"{source}: password_file")
        env["RESTIC_PASSWORD_FILE"], shown = str(config.password_file), f"password_file {config.password_file}"
    elif environ.get("RESTIC_PASSWORD_FILE"):
        path = Path(environ["RESTIC_PASSWORD_FILE"])
        password = read_password_file(path, "$RESTIC_PASSWORD_FILE")
        env["RESTIC_PASSWORD_FILE"], shown = str(path), "$RESTIC_PASSWORD_FILE"
    elif environ.get("RESTIC_PASSWORD"):
        password = environ["RESTIC_PASSWORD"]
        env["RESTIC_PASSWORD"], shown = password, "$RESTIC_PASSWORD"
    else:
        raise ConfigError(f"{source}: password_file: no repository password: set password_file, "
                          "or RESTIC_PASSWORD_FILE or RESTIC_PASSWORD in the environment")
    return Credentials(repository, env, shown, (password, *url_secrets(repository)))


@dataclass(frozen=True)
class Snapshot:
    id: str
    short_id: str
    time: str
    hostname: str
    tags: tuple[str, ...]


def classify(creds: Credentials, what: str, code: int, output: str) -> BackupError:
    """Which failure restic's output names (read as restic wrote it); the message shows its last
    lines with the secrets taken out."""
    text = output
    tail = creds.redact(" | ".join(line for line in text.strip().splitlines()[-4:]))
    where = f"restic {what} ({creds.shown})"
    if "wrong password or no key found" in text:
        return WrongPassword(f"{where}: wrong password: the key from {creds.password_source} does not open "
                             "this repository")
    if "Is there a repository at the following location" in text or "unable to open config file" in text:
        return NoRepository(f"{where}: no repository there: {tail}")
    if "no matching ID found" in text or "no snapshot found" in text:
        return SnapshotNotFound(f"{where}: no such snapshot: {tail}")
    if "no space left on device" in text:
        return DiskFull(f"{where}: no space left on device: {tail}")
    if re.search(r"repository contains errors|unexpected file size|ciphertext verification failed|"
                 r"pack .* (does not|contain)|invalid data returned|load pack", text):
        return CorruptRepository(f"{where}: the repository is damaged: {tail}")
    return BackupError(f"{where}: exit {code}: {tail}")


class Restic:
    def __init__(self, binary: str, creds: Credentials, cache_dir: Path):
        self.binary = binary
        self.creds = creds
        self.cache_dir = cache_dir

    def env(self) -> dict[str, str]:
        clean = {k: v for k, v in os.environ.items() if k not in RESTIC_VARIABLES}
        return clean | self.creds.env

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "--cache-dir", str(self.cache_dir), *args]

    def run(self, what: str, *args: str, cwd: Path | None = None,
            on_line: Callable[[str], None] | None = None) -> str:
        """restic with our environment; stdout line by line to `on_line`, stderr kept for the error."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(self.argv(*args), cwd=cwd, env=self.env(), stdout=subprocess.PIPE,
                                        stderr=err, stdin=subprocess.DEVNULL, text=True)
            except FileNotFoundError:
                raise BackupError(f"{self.binary}: not installed (apt-get install restic)") from None
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if on_line:
                    on_line(line)
            code = proc.wait()
            err.seek(0)
            stderr = err.read().decode(errors="replace")
        if code != 0:
            raise classify(self.creds, what, code, "".join(lines[-20:]) + stderr)
        return "".join(lines)

    def exists(self) -> bool:
        try:
            self.run("cat config", "cat", "config")
        except NoRepository:
            return False
        return True

    def init(self) -> None:
        self.run("init", "init")

    def backup(self, source: Path, host: str, on_status: Callable[[dict], None]) -> dict:
        """Snapshot what is under `source` (stored relative to it); the summary restic printed."""
        summary: dict = {}

        def line(text: str) -> None:
            try:
                doc = json.loads(text)
            except ValueError:
                return
            if doc.get("message_type") == "status":
                on_status(doc)
            elif doc.get("message_type") == "summary":
                summary.update(doc)

        self.run("backup", "backup", ".", "--json", "--tag", TAG, "--host", host, cwd=source, on_line=line)
        if "snapshot_id" not in summary:
            raise BackupError(f"restic backup ({self.creds.shown}): no snapshot id in restic's summary")
        return summary

    def snapshots(self) -> list[Snapshot]:
        docs = json.loads(self.run("snapshots", "snapshots", "--json", "--tag", TAG) or "[]")
        return [Snapshot(d["id"], d["short_id"], d["time"], d.get("hostname", ""), tuple(d.get("tags") or ()))
                for d in docs]

    def find(self, snapshot: str) -> Snapshot:
        """`latest` or an id (a prefix is enough); a named error listing the newest ones otherwise."""
        snaps = self.snapshots()
        if snapshot == "latest" and snaps:
            return snaps[-1]
        is_id = re.match(r"^[0-9a-f]{4,64}$", snapshot)
        found = [s for s in snaps if s.id.startswith(snapshot)] if is_id else []
        if len(found) == 1:
            return found[0]
        newest = ", ".join(f"{s.short_id} ({s.time[:19]})" for s in snaps[-3:]) or "none"
        why = "matches several" if found else "not found"
        raise SnapshotNotFound(f"snapshot {snapshot!r} {why} in {self.creds.shown}; newest: {newest}")

    def check(self, read_data: bool = False) -> None:
        self.run("check", "check", *(["--read-data"] if read_data else []))

    def restore(self, snapshot: Snapshot, target: Path) -> None:
        self.run("restore", "restore", snapshot.id, "--target", str(target))

    def forget(self, host: str, flags: list[str]) -> str:
        return self.run("forget", "forget", "--tag", TAG, "--host", host, "--prune", *flags)
