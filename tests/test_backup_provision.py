"""The `backup` provisioning step without hosts (captured facts -> typed changes, rendered units
and config), and on a lab host: restic installed, a password made there, a first snapshot taken
as the service user, the schedule running, and a re-run that changes nothing."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from backup.config import BackupConfig, HostBackup, Retention
from provision import facts as F
from provision import lab
from provision.core import Host, run_step
from provision.inventory import HostEntry, HostVars, Target, load_inventory, select
from provision.run import provision
from provision.steps import backup as B
from provision.steps.base import InstallPackages, sha256_text
from provision.steps.services import InstallService, StartService, pidfile, stamp_path

PREFIX = "/opt/dgxready"


def offline(facts: dict, **vars_) -> Host:
    target = Target(name="box", entry=HostEntry(address="127.0.0.61", vars=HostVars(**vars_)))
    return Host.offline(target, facts)


def facts_for(settings: HostBackup, *, restic: bool, password: bool, files: bool, snapshots: int | None,
              systemd: bool, timer_on: bool = False, scheduler: B.ServiceSpec | None = None) -> dict:
    probe = offline({})
    wanted = B.desired_files(probe, settings)
    found = {
        F.DebPackages(("restic",)): {"restic": "0.14.0-1"} if restic else {},
        F.FileExists(B.password_path(probe)): password,
        F.Sha256s(tuple(wanted)): {p: sha256_text(t) for p, t in wanted.items()} if files else {},
        B.snapshots_fact(probe): snapshots,
        F.SystemdIsInit(): systemd,
    }
    if systemd:
        found[F.SystemdUnits((B.TIMER,))] = {B.TIMER: F.UnitState(timer_on, timer_on)}
    else:
        spec = B.scheduler_spec(probe, settings)
        found[F.FileText(stamp_path(probe, B.SCHEDULER))] = scheduler.identity() if scheduler else None
        found[F.Service(B.SCHEDULER, pidfile(probe, B.SCHEDULER))] = F.ServiceProcess(
            42 if scheduler else None, scheduler is not None, spec.argv if scheduler else ())
    return found


def test_a_bare_systemd_host_gets_restic_a_password_the_files_the_timer_and_a_first_backup():
    settings = HostBackup()
    todo = B.BackupStep(settings).check(offline(facts_for(settings, restic=False, password=False, files=False,
                                                          snapshots=None, systemd=True)))
    assert [type(c) for c in todo] == [InstallPackages, B.CreateBackupPassword, B.WriteBackupFiles,
                                       B.EnableTimer, B.RunFirstBackup]
    assert todo.of(InstallPackages)[0].packages == ("restic",)
    assert todo.of(B.EnableTimer)[0].describe() == "enable and start dgxready-backup.timer (hourly)"
    assert "never printed" in todo.of(B.CreateBackupPassword)[0].describe()


def test_a_converged_host_has_nothing_to_do_and_a_new_retention_rewrites_only_the_files():
    settings = HostBackup()
    done = facts_for(settings, restic=True, password=True, files=True, snapshots=3, systemd=True, timer_on=True)
    assert not B.BackupStep(settings).check(offline(done))
    stricter = HostBackup(retention=Retention(keep_hourly=6))
    (write,) = B.BackupStep(stricter).check(offline(done))
    assert write.paths == (B.config_path(offline({})),)


def test_without_systemd_the_schedule_is_a_supervised_process_and_converges_when_it_runs():
    settings = HostBackup(schedule_minutes=30)
    probe = offline({})
    fresh = facts_for(settings, restic=True, password=True, files=True, snapshots=1, systemd=False)
    kinds = [type(c) for c in B.BackupStep(settings).check(offline(fresh))]
    assert kinds == [InstallService, StartService]
    running = facts_for(settings, restic=True, password=True, files=True, snapshots=1, systemd=False,
                        scheduler=B.scheduler_spec(probe, settings))
    assert not B.BackupStep(settings).check(offline(running))
    assert B.scheduler_spec(probe, settings).argv[-3:] == ("schedule", "--config", f"{PREFIX}/etc/backup.yaml")


def test_the_timer_fires_on_the_schedule_and_the_service_backs_up_then_prunes_as_the_service_user():
    host = offline({})
    assert "OnCalendar=hourly\nPersistent=true" in B.timer_text(HostBackup())
    assert "OnCalendar=*-*-* *:00/15:00" in B.timer_text(HostBackup(schedule_minutes=15))
    assert "OnCalendar=*-*-* 00/6:00:00" in B.timer_text(HostBackup(schedule_minutes=360))
    unit = B.service_text(host)
    assert "Type=oneshot\nUser=dgxready\n" in unit
    command = f"{PREFIX}/venv/bin/python -m backup run --config {PREFIX}/etc/backup.yaml --forget"
    assert f"ExecStart={command}\n" in unit
    assert f"Environment=PYTHONPATH={PREFIX}/app" in unit


def test_the_host_config_is_a_valid_backup_config_with_the_retention_and_no_secret():
    settings = HostBackup(repository="sftp:backup@nas:/srv/restic/{host}", retention=Retention(keep_weekly=2))
    text = B.config_text(offline({}, prefix="/srv/dgx"), settings)
    config = BackupConfig.model_validate(yaml.safe_load(text))
    assert config.repository == "sftp:backup@nas:/srv/restic/box"
    assert config.password_file.as_posix() == "/srv/dgx/etc/backup-password"
    assert config.retention.flags() == ["--keep-hourly=24", "--keep-daily=7", "--keep-weekly=2"]
    assert config.databases["multiplexer"].as_posix() == "/srv/dgx/state/multiplexer.db"
    assert "backup-password" in config.exclude and "prometheus" in config.exclude


def test_a_dry_run_lists_the_typed_changes():
    settings = HostBackup()
    facts = facts_for(settings, restic=True, password=False, files=True, snapshots=0, systemd=True,
                      timer_on=True)
    result = run_step(B.BackupStep(settings), offline(facts), True)
    assert result.status == "would change"
    assert result.changes == [f"generate the repository password in {PREFIX}/etc/backup-password (mode 600, "
                              "never printed)", "run a first backup (the repository holds no snapshot)"]


def test_the_snapshot_fact_counts_snapshots_and_reads_a_failure_as_unknown():
    fact = B.snapshots_fact(offline({}))
    assert fact.process(0, 'captured\n[{"id": "a"}, {"id": "b"}]\n') == 2
    assert fact.process(1, "") is None and fact.process(0, "not json") is None
    assert fact.command().startswith("setpriv --reuid dgxready")


def test_a_schedule_that_does_not_divide_the_day_is_refused():
    with pytest.raises(ValueError, match="whole hours dividing 24"):
        HostBackup(schedule_minutes=300)


@pytest.mark.skipif(lab.available() is not None, reason=f"test hosts: {lab.available()}")
def test_a_lab_host_takes_hourly_snapshots_of_its_state_as_the_service_user_and_a_rerun_changes_nothing(
        tmp_path, isolated):
    host = lab.make_host(tmp_path / "hotel", "hotel", "127.0.0.38")
    try:
        host.start()
        inv = tmp_path / "inventory.yaml"
        inv.write_text(yaml.safe_dump({"hosts": {"hotel": {"address": host.address, "key": str(host.key),
                                                           "vars": lab.lab_vars()}}}))
        targets = select(load_inventory(inv), "hotel")
        for step in ("base-packages", "user-ssh", "python-env"):
            record, _ = provision(targets, only=step)
            assert record.results[-1].status in ("changed", "ok"), record.results
        state = host.root / "opt/dgxready/state"
        state.mkdir(parents=True, exist_ok=True)
        (state / "runs").mkdir(exist_ok=True)
        (state / "runs" / "transcript.json").write_text(json.dumps({"turns": 1}))
        first, _ = provision(targets, only="backup")
        (result,) = first.results
        assert result.status == "changed", result
        assert "supervised process with a pidfile" in result.detail
        conn = host.connection()
        listing = conn.run(B.snapshots_fact(offline({})).command(), hide=True, warn=True, in_stream=False)
        assert len(json.loads(listing.stdout.strip().splitlines()[-1])) >= 1
        password = host.root / "opt/dgxready/etc/backup-password"
        assert oct(password.stat().st_mode & 0o777) == "0o600"
        probe = offline({})
        verify = conn.run(B.as_service_user(probe, B.backup_argv(probe, "verify")), hide=True, warn=True,
                          in_stream=False)
        assert verify.ok, verify.stderr
        assert password.read_text().strip() not in verify.stdout + verify.stderr + result.detail
        conn.close()
        again, _ = provision(targets, only="backup")
        assert again.results[0].status == "ok", again.results
    finally:
        host.destroy()


def test_the_hosts_backup_command_imports_nothing_the_host_venv_lacks():
    """The hosts run `python -m backup` from the venv the python-env step pins (not the knowledge
    store's libraries, not invoke, httpx or jsonschema)."""
    probe = ("import sys, backup.__main__; print(' '.join(sorted({m.split('.')[0] for m in sys.modules} | "
             "{m for m in sys.modules if m.startswith('agents.')})))")
    loaded = set(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                check=True).stdout.split())
    agents_modules = {m for m in loaded if m.startswith("agents.")}
    assert agents_modules <= {"agents.config", "agents.sandbox"}
    assert not loaded & {"invoke", "httpx", "jsonschema", "uvicorn", "owlrl", "rdflib", "numpy"}
