"""Backups with the real restic: SQLite captured consistently while it is written, restores that
leave the live state untouched on bad input (a wrong password, a damaged pack, a missing
snapshot, a full filesystem), and the drill against the real multiplexer and llama-server."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from agents.config import BackendConfig
from agents.state import StateStore
from backup.__main__ import seconds_to_next
from backup.capture import MANIFEST, capture, read_manifest, staged_name
from backup.config import BackupConfig, load_backup_config, resolve
from backup.drill import DrillOptions, check_report, run_drill
from backup.ops import restic_for, restore_snapshot, run_backup, verify_snapshot
from backup.restic import BackupError, CorruptRepository, DiskFull, SnapshotNotFound, WrongPassword
from dgxready.errors import ConfigError

pytestmark = pytest.mark.skipif(shutil.which("restic") is None, reason="restic is not installed")
PASSWORD = "correct-horse-battery-staple-7f3a"


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def contents(root: Path) -> dict[str, str]:
    """Files by digest, databases by their SQL dump: a consistent copy of a database holds the
    same rows in other bytes (no WAL, a rollback journal)."""
    out = tree_digest(root)
    for db in root.rglob("*.db"):
        conn = sqlite3.connect(db)
        out[str(db.relative_to(root))] = "\n".join(conn.iterdump())
        conn.close()
    return out


@pytest.fixture
def live(tmp_path, monkeypatch):
    """A state folder like the multiplexer's (sessions, audit, workspace, a transcript, keys), a
    repository and a password file; the environment carries no restic variable."""
    for var in ("RESTIC_REPOSITORY", "RESTIC_PASSWORD", "RESTIC_PASSWORD_FILE"):
        monkeypatch.delenv(var, raising=False)
    state = tmp_path / "state"
    store = StateStore(state / "multiplexer.db")
    for n in range(3):
        store.append_turn("developer-1", "feature-42", [{"role": "user", "content": f"step {n}"},
                                                        {"role": "assistant", "content": f"done {n}"}])
    store.audit("developer-1", "feature-42", "workspace.write", "ok", "{}")
    store.close()
    (state / "runs").mkdir()
    (state / "runs" / "20260101T000000.json").write_text(json.dumps({"records": []}))
    (state / "agent-keys.yaml").write_text("agents: []\n")
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    config = BackupConfig(repository=str(tmp_path / "repo"), password_file=password,
                          databases={"multiplexer": state / "multiplexer.db",
                                     "knowledge": state / "knowledge.db"},
                          paths=[state], staging_dir=tmp_path / "staging", cache_dir=tmp_path / "cache")
    return resolve(config), state


def backed_up(resolved) -> str:
    return run_backup(resolved, restic_for(resolved), say=lambda _: None).snapshot


def test_a_database_written_during_capture_is_copied_consistently_and_never_as_a_live_file(live):
    resolved, state = live
    store = StateStore(state / "multiplexer.db")
    stop = threading.Event()

    def write() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            store.append_turn("qa-1", f"s{n % 5}", [{"role": "user", "content": "x" * 500}])

    writer = threading.Thread(target=write)
    writer.start()
    try:
        manifest = capture(resolved, resolved.staging_dir / "capture")
    finally:
        stop.set()
        writer.join()
        store.close()
    root = resolved.staging_dir / "capture"
    (db,) = manifest.databases()
    assert db.integrity == "ok" and db.path == str((state / "multiplexer.db").resolve())
    assert not list(root.rglob("*-wal")) and not list(root.rglob("*-shm"))
    copy = sqlite3.connect(root / db.staged)
    assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    turns, kept = copy.execute("SELECT sum(turns), (SELECT count(*) FROM session_turns) "
                               "FROM sessions").fetchone()
    assert kept == turns, "the copy holds a session counter that disagrees with its turn rows"
    assert {s.reason for s in manifest.skipped} == {"database knowledge absent"}
    assert read_manifest(root).entries == manifest.entries


def test_a_sqlite_file_found_among_the_paths_is_captured_with_the_backup_api(live):
    resolved, state = live
    extra = sqlite3.connect(state / "runs" / "team.db")
    extra.execute("PRAGMA journal_mode=WAL")
    extra.execute("CREATE TABLE t (x)")
    extra.execute("INSERT INTO t VALUES (1)")
    extra.commit()
    manifest = capture(resolved, resolved.staging_dir / "capture")
    kinds = {Path(e.path).name: e.kind for e in manifest.entries}
    assert kinds["team.db"] == "sqlite" and kinds["multiplexer.db"] == "sqlite"
    assert "team.db-wal" not in kinds and kinds["20260101T000000.json"] == "file"
    extra.close()


def test_restore_swaps_a_destroyed_state_back_and_the_session_is_where_it_was(live):
    resolved, state = live
    before = contents(state)
    snapshot = backed_up(resolved)
    shutil.rmtree(state)
    result = restore_snapshot(resolved, restic_for(resolved), snapshot, say=lambda _: None)
    assert result.problems_in_place == [] and contents(state) == before
    store = StateStore(state / "multiplexer.db")
    assert store.session("developer-1", "feature-42").turns == 3
    assert store.append_turn("developer-1", "feature-42", [{"role": "user", "content": "next"}]) == 4
    store.close()
    verified = verify_snapshot(resolved, restic_for(resolved), snapshot, read_data=True, say=lambda _: None)
    assert verified.databases == {str((state / "multiplexer.db").resolve()): "ok"}


def test_a_wrong_password_is_named_and_leaves_the_live_state_untouched(live, tmp_path):
    resolved, state = live
    snapshot = backed_up(resolved)
    (tmp_path / "wrong").write_text("not-the-password\n")
    wrong = resolve(resolved.config.model_copy(update={"password_file": tmp_path / "wrong"}))
    before = tree_digest(state)
    with pytest.raises(WrongPassword, match="wrong password: the key from password_file .*wrong does not open"):
        restore_snapshot(wrong, restic_for(wrong), snapshot, say=lambda _: None)
    assert tree_digest(state) == before


def test_a_missing_snapshot_is_named_with_the_newest_ones(live):
    resolved, state = live
    snapshot = backed_up(resolved)
    before = tree_digest(state)
    newest = rf"snapshot 'deadbeef' not found in .*repo; newest: {snapshot[:8]}"
    with pytest.raises(SnapshotNotFound, match=newest):
        restore_snapshot(resolved, restic_for(resolved), "deadbeef", say=lambda _: None)
    assert tree_digest(state) == before


def test_a_damaged_pack_is_caught_before_anything_is_swapped_in(live, tmp_path):
    resolved, state = live
    snapshot = backed_up(resolved)
    packs = [p for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file()]
    biggest = max(packs, key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as fh:
        fh.truncate(biggest.stat().st_size // 2)
    state_db = state / "multiplexer.db"
    store = StateStore(state_db)
    store.append_turn("developer-1", "feature-42", [{"role": "user", "content": "after the backup"}])
    store.close()
    before = tree_digest(state)
    with pytest.raises(CorruptRepository, match="the repository is damaged"):
        restore_snapshot(resolved, restic_for(resolved), snapshot, say=lambda _: None)
    assert tree_digest(state) == before
    assert not any(resolved.staging_dir.glob("restore-*")), "the half-restored staging was left behind"


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 2 MiB tmpfs, unmounted at the end."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_under_the_restore_staging_fails_cleanly_and_leaves_the_live_state(live, small_filesystem):
    resolved, state = live
    (state / "runs" / "big.bin").write_bytes(os.urandom(4 << 20))
    snapshot = backed_up(resolved)
    (state / "runs" / "big.bin").unlink()
    before = tree_digest(state)
    cramped = resolve(resolved.config.model_copy(update={"staging_dir": small_filesystem / "staging"}))
    with pytest.raises(DiskFull, match="no space left on device"):
        restore_snapshot(cramped, restic_for(cramped), snapshot, say=lambda _: None)
    assert tree_digest(state) == before
    assert not any((small_filesystem / "staging").glob("restore-*"))


def test_a_full_repository_disk_fails_the_backup_with_a_clear_error(live, small_filesystem):
    resolved, state = live
    (state / "runs" / "big.bin").write_bytes(os.urandom(4 << 20))
    full = resolve(resolved.config.model_copy(update={"repository": str(small_filesystem / "repo")}))
    with pytest.raises(DiskFull, match="no space left on device"):
        run_backup(full, restic_for(full), say=lambda _: None)
    assert not (resolved.staging_dir / "capture").exists(), "the staged copies of keys were left behind"


def test_restore_refuses_while_a_process_holds_the_database_open(live):
    resolved, state = live
    snapshot = backed_up(resolved)
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time; "
                               f"c = sqlite3.connect({str(state / 'multiplexer.db')!r}); "
                               "c.execute('select 1'); print('open', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(BackupError, match=r"is open by pid \d+: stop the multiplexer first"):
            restore_snapshot(resolved, restic_for(resolved), snapshot, say=lambda _: None)
    finally:
        holder.kill()
        holder.wait()


def test_a_bad_backup_config_names_the_file_and_the_field(tmp_path):
    bad = tmp_path / "backup.yaml"
    bad.write_text(yaml.safe_dump({"schedule_minutes": 45, "retention": {"keep_daily": -1}}))
    with pytest.raises(ConfigError) as err:
        load_backup_config(bad)
    assert "backup.yaml: schedule_minutes: 45 minutes: below an hour it must divide 60" in str(err.value)
    assert "backup.yaml: retention.keep_daily: Input should be greater than or equal to 0" in str(err.value)


def test_without_a_password_the_error_says_where_one_may_come_from(live, monkeypatch):
    resolved, _ = live
    none = resolve(resolved.config.model_copy(update={"password_file": None}))
    with pytest.raises(ConfigError, match="password_file: no repository password: set password_file, "
                                          "or RESTIC_PASSWORD_FILE or RESTIC_PASSWORD"):
        restic_for(none)
    monkeypatch.setenv("RESTIC_PASSWORD", PASSWORD)
    creds = restic_for(none).creds
    assert creds.password_source == "$RESTIC_PASSWORD" and PASSWORD not in repr(creds)


def test_staged_names_keep_the_original_absolute_path():
    assert staged_name(Path("/var/lib/x/multiplexer.db")) == "data/var/lib/x/multiplexer.db"
    assert MANIFEST == "MANIFEST.json"


def test_the_drill_restores_the_state_backed_up_under_traffic_and_the_session_continues(
        served, isolated, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("RESTIC_PASSWORD", PASSWORD)
    backend = BackendConfig(name="local", url=served.base_url, max_concurrency=served.parallel)
    options = DrillOptions(agents=3, workdir=tmp_path / "drill", output=tmp_path / "report.json")
    lines: list[str] = []
    report, path = run_drill(BackupConfig(), [backend], options, lines.append)
    assert report["passed"], json.dumps(report, indent=2)
    assert report["backup"]["turns_during_backup"] + report["backup"]["tool_calls_during_backup"] > 0, \
        "nothing was served while the backup ran"
    session = report["verify"]["session"]
    assert session["turns_restored"] >= session["acked_before_backup"] >= 2
    assert session["turns_after_new_turn"] == session["turns_restored"] + 1 and session["history_kept"]
    board = report["verify"]["taskboard"]
    assert board["restored"] >= board["acked_before_backup"] > 0 and board["kept"]
    integrity = report["verify"]["sqlite_integrity"]
    assert integrity["multiplexer.db"] == "ok" and set(integrity.values()) == {"ok"}
    assert report["rto"]["measured_s"] < 3600 and report["rpo"]["implied_s"] == 3600
    assert json.loads(path.read_text()) == report
    assert not (tmp_path / "drill").exists(), "the drill left its password and repository behind"

    captured = capfd.readouterr()
    texts = [captured.out, captured.err, "\n".join(lines), path.read_text()]
    texts += [p.read_text(errors="replace") for p in isolated.state_dir.rglob("*") if p.is_file()
              and p.suffix in (".json", ".log", ".yaml", ".txt")]
    assert not [t for t in texts if PASSWORD in t], "the repository password reached an output or record"


def invoke(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", *args], capture_output=True, text=True, env=env)


def test_the_tasks_never_print_or_record_the_password_or_the_repository_credentials(live, tmp_path):
    resolved, state = live
    config = tmp_path / "backup.yaml"
    config.write_text(yaml.safe_dump(resolved.config.model_dump(mode="json")))
    env = {**os.environ, "DGXREADY_STATE_DIR": str(state), "DGXREADY_CACHE_DIR": str(tmp_path / "cache")}
    runs = [invoke("backup.run", "--config", str(config), "--forget", env=env),
            invoke("backup.verify", "--config", str(config), env=env),
            invoke("backup.restore", "--config", str(config), "--target", str(tmp_path / "out"), env=env)]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    remote = dict(resolved.config.model_dump(mode="json"), repository="rest:http://drill:hunter2-cred@127.0.0.1:9/r")
    config.write_text(yaml.safe_dump(remote))
    failed = invoke("backup.snapshots", "--config", str(config), env=env)
    assert failed.returncode == 1 and "rest:http://drill:***@127.0.0.1:9/r" in failed.stderr
    texts = [r.stdout + r.stderr for r in [*runs, failed]]
    texts += [p.read_text(errors="replace") for p in (state / "backup").rglob("*.json")]
    assert len(texts) > 4 and not [t for t in texts if PASSWORD in t or "hunter2-cred" in t]
    assert (tmp_path / "out" / str(state.resolve() / "agent-keys.yaml").lstrip("/")).exists()


def test_a_drill_report_missing_a_measure_is_refused_with_the_field_named():
    with pytest.raises(BackupError, match=r"drill report: <root>: 'rto' is a required property"):
        check_report({"schema": "dgxready.backup-drill/v1", "started_at": "2026-01-01T00:00:00Z", "host": "h",
                      "backup": {}, "verify": {}, "rpo": {}, "passed": False})


def test_the_schedule_loop_fires_on_wall_clock_multiples_of_the_interval():
    assert seconds_to_next(60, 3600 * 5 + 600) == 3000
    assert seconds_to_next(15, 900 * 3) == 900
