"""The operations: back up (capture, snapshot, optionally apply the retention), verify a
snapshot (restic check, then a restore into staging checked against its manifest), and restore
(the same, then the files swapped into place only once all of them passed). Bad input leaves
the live state as it was: nothing at the live paths changes before every check has passed."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from backup.capture import Manifest, capture, fresh_private_dir, read_manifest, verify_files, verify_tree
from backup.config import Resolved
from backup.restic import BackupError, Credentials, DiskFull, Restic, Snapshot, credentials
from dgxready.files import atomic_write_json
from dgxready.progress import byte_progress, waiting

Say = Callable[[str], None]


def restic_for(resolved: Resolved, source: str = "backup.yaml") -> Restic:
    return Restic(resolved.config.restic, credentials(resolved.config, source), resolved.cache_dir)


@contextlib.contextmanager
def exclusive(resolved: Resolved) -> Iterator[None]:
    """One backup, restore or verify at a time per staging folder (the timer and a person)."""
    resolved.staging_dir.mkdir(parents=True, exist_ok=True)
    with open(resolved.staging_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(f"{resolved.staging_dir}: another backup, restore or verify is running") from None
        yield


@dataclass(frozen=True)
class BackupResult:
    snapshot: str
    seconds: float
    capture_seconds: float
    files: int
    databases: dict[str, str]
    bytes: int
    added_bytes: int
    skipped: list[str]
    forgot: bool


def snapshot_with_progress(restic: Restic, source: Path, total: int) -> dict:
    with byte_progress() as progress:
        task = progress.add_task("restic backup", total=total or None)
        summary = restic.backup(source, socket.gethostname(),
                                lambda s: progress.update(task, completed=s.get("bytes_done", 0)))
        progress.update(task, completed=total)
    return summary


def run_backup(resolved: Resolved, restic: Restic, forget: bool = False, say: Say = print) -> BackupResult:
    started = time.monotonic()
    root = resolved.staging_dir / "capture"
    with exclusive(resolved):
        try:
            with waiting("capturing databases and files"):
                manifest = capture(resolved, root)
            captured = time.monotonic() - started
            say(f"captured {len(manifest.entries)} files ({manifest.total_bytes / 1e6:.1f} MB) "
                f"in {captured:.1f} s")
            if not restic.exists():
                say(f"initialising the repository {restic.creds.shown}")
                restic.init()
            summary = snapshot_with_progress(restic, root, manifest.total_bytes)
            if forget:
                with waiting("restic forget --prune (retention)"):
                    restic.forget(socket.gethostname(), resolved.config.retention.flags())
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return BackupResult(snapshot=summary["snapshot_id"], seconds=time.monotonic() - started,
                        capture_seconds=captured, files=len(manifest.entries),
                        databases={e.path: e.integrity or "" for e in manifest.databases()},
                        bytes=manifest.total_bytes, added_bytes=int(summary.get("data_added", 0)),
                        skipped=[f"{s.path}: {s.reason}" for s in manifest.skipped], forgot=forget)


def record_run(folder: Path, kind: str, doc: dict, creds: Credentials) -> Path:
    """A run record: what was done and the repository as shown (redacted), never a secret."""
    path = folder / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{kind}-{os.getpid()}.json"
    atomic_write_json(path, {"kind": kind, "repository": creds.shown, **doc})
    return path


@dataclass(frozen=True)
class Restored:
    """A snapshot restored into staging and checked against its manifest."""
    snapshot: Snapshot
    root: Path
    manifest: Manifest
    seconds: float


def restore_to_staging(resolved: Resolved, restic: Restic, snapshot: str, read_data: bool,
                       say: Say) -> Restored:
    started = time.monotonic()
    with waiting("restic check"):
        restic.check(read_data)
    snap = restic.find(snapshot)
    root = fresh_private_dir(resolved.staging_dir / f"restore-{snap.short_id}")
    try:
        with waiting(f"restoring snapshot {snap.short_id} into {root}"):
            restic.restore(snap, root)
        manifest = read_manifest(root)
        problems = verify_tree(root, manifest)
        if problems:
            raise BackupError(f"snapshot {snap.short_id}: {len(problems)} files fail verification: "
                              + "; ".join(problems[:5]))
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    say(f"snapshot {snap.short_id}: {len(manifest.entries)} files verified (sha256, integrity_check)")
    return Restored(snap, root, manifest, time.monotonic() - started)


@dataclass(frozen=True)
class VerifyResult:
    snapshot: str
    files: int
    databases: dict[str, str]
    bytes: int
    read_data: bool
    seconds: float


def verify_snapshot(resolved: Resolved, restic: Restic, snapshot: str = "latest", read_data: bool = False,
                    say: Say = print) -> VerifyResult:
    started = time.monotonic()
    with exclusive(resolved):
        restored = restore_to_staging(resolved, restic, snapshot, read_data, say)
        shutil.rmtree(restored.root, ignore_errors=True)
    m = restored.manifest
    return VerifyResult(restored.snapshot.short_id, len(m.entries),
                        {e.path: e.integrity or "" for e in m.databases()}, m.total_bytes, read_data,
                        time.monotonic() - started)


def holders_of(paths: set[Path]) -> dict[Path, int]:
    """Which of `paths` some process holds open (a running multiplexer), from /proc/*/fd."""
    held: dict[Path, int] = {}
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            target = Path(os.readlink(fd))
        except OSError:
            continue
        if target in paths and int(fd.parent.parent.name) != os.getpid():
            held[target] = int(fd.parent.parent.name)
    return held


@dataclass
class Swap:
    """Every file copied beside its destination first (so a full disk fails before anything
    moved), then each renamed over its destination."""
    pairs: list[tuple[Path, Path, int]]
    temps: list[Path] = field(default_factory=list)
    made_dirs: list[Path] = field(default_factory=list)

    def temp_for(self, dest: Path) -> Path:
        return dest.with_name(f".{dest.name}.dgxready-restore")

    def make_parent(self, dest: Path) -> None:
        missing = [p for p in reversed(dest.parents) if not p.exists()]
        for p in missing:
            p.mkdir()
            self.made_dirs.append(p)

    def prepare(self) -> None:
        try:
            for staged, dest, mode in self.pairs:
                self.make_parent(dest)
                temp = self.temp_for(dest)
                self.temps.append(temp)
                shutil.copyfile(staged, temp)
                os.chmod(temp, mode)
                with open(temp, "rb") as fh:
                    os.fsync(fh.fileno())
        except OSError as exc:
            self.abandon()
            where = exc.filename or "a destination folder"
            if exc.errno == errno.ENOSPC:
                raise DiskFull(f"restore: no space left on device at {where}; "
                               "the live files are unchanged") from None
            raise BackupError(f"restore: {where}: {exc.strerror}; the live files are unchanged") from None

    def abandon(self) -> None:
        for temp in self.temps:
            temp.unlink(missing_ok=True)
        for d in reversed(self.made_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()

    def commit(self, databases: set[Path]) -> None:
        for _, dest, _ in self.pairs:
            if dest in databases:
                # A stale WAL beside a replaced database would be replayed into it.
                for suffix in ("-wal", "-shm", "-journal"):
                    Path(f"{dest}{suffix}").unlink(missing_ok=True)
            os.replace(self.temp_for(dest), dest)


@dataclass(frozen=True)
class RestoreResult:
    snapshot: str
    files: int
    bytes: int
    target: str
    databases: dict[str, str]
    seconds: float
    problems_in_place: list[str]


def destination(entry_path: str, target: Path | None) -> Path:
    return target / entry_path.lstrip("/") if target else Path(entry_path)


def restore_snapshot(resolved: Resolved, restic: Restic, snapshot: str = "latest", target: Path | None = None,
                     say: Say = print) -> RestoreResult:
    """Restore into staging, verify, then swap into the original paths (or under `target`)."""
    started = time.monotonic()
    with exclusive(resolved):
        restored = restore_to_staging(resolved, restic, snapshot, False, say)
        try:
            m = restored.manifest
            pairs = [(restored.root / e.staged, destination(e.path, target), e.mode) for e in m.entries]
            databases = {destination(e.path, target) for e in m.databases()}
            held = holders_of(databases)
            if held:
                open_by = ", ".join(f"{p} is open by pid {pid}" for p, pid in held.items())
                raise BackupError(f"restore: {open_by}: stop the multiplexer first; "
                                  "the live files are unchanged")
            swap = Swap(pairs)
            swap.prepare()
            swap.commit(databases)
        finally:
            shutil.rmtree(restored.root, ignore_errors=True)
        problems = verify_files(m, lambda e: destination(e.path, target))
    if problems:
        say(f"after the swap, {len(problems)} files differ from the manifest: " + "; ".join(problems[:5]))
    return RestoreResult(restored.snapshot.short_id, len(m.entries), m.total_bytes,
                         str(target) if target else "original paths",
                         {e.path: e.integrity or "" for e in m.databases()}, time.monotonic() - started,
                         problems)
