"""Backups on the host: restic from the distribution, a password generated on the host (mode 600,
never printed, never leaving it), a backup.yaml for the host's paths, and a dgxready-backup
service run by a timer (hourly by default, so the RPO is at most an hour) that backs up and
then applies the retention (`restic forget --prune` with the keep-* counts). Where PID 1 is not
systemd the units are still installed and `python -m backup schedule` runs as a supervised
process with a pidfile instead of the timer. A first backup runs at once, so a host that
converged has a snapshot to restore."""
from __future__ import annotations

import json
from dataclasses import dataclass

import yaml

from backup.config import HOURLY, HostBackup
from model.systemd import systemd_quote
from provision.core import Changes, Fact, Host, Step, StepFailed, changes, q
from provision.facts import DebPackages, FileExists, Sha256s, SystemdIsInit, SystemdUnits
from provision.steps.base import InstallPackages, apt_install, sha256_text, upload_text
from provision.steps.services import ServiceSpec, install_service, service_changes, start_service, stop_service

UNIT = "dgxready-backup"
TIMER = f"{UNIT}.timer"
SCHEDULER = "dgxready-backup-schedule"
# Left out of the host's backup: the repository's own password, and Prometheus' and
# Alertmanager's live stores (they rebuild; their files change while being read).
HOST_EXCLUDE = ("servers", "logs", "*.pid", "*.tmp", ".*.partial", "backup-password", "prometheus",
                "alertmanager", "*.identity")


def config_path(host: Host) -> str:
    return f"{host.vars.prefix}/etc/backup.yaml"


def password_path(host: Host) -> str:
    return f"{host.vars.prefix}/etc/backup-password"


def backup_dir(host: Host) -> str:
    return f"{host.vars.prefix}/backup"


def service_path(name: str) -> str:
    return f"/etc/systemd/system/{name}"


def python(host: Host) -> str:
    return f"{host.vars.prefix}/venv/bin/python"


def environment(host: Host) -> dict[str, str]:
    prefix = host.vars.prefix
    return {"PYTHONPATH": f"{prefix}/app", "DGXREADY_STATE_DIR": f"{prefix}/state",
            "DGXREADY_CACHE_DIR": f"{prefix}/backup/cache", "HOME": f"{prefix}/backup"}


def repository(host: Host, settings: HostBackup) -> str:
    return settings.repository.replace("{prefix}", host.vars.prefix).replace("{host}", host.name)


def config_text(host: Host, settings: HostBackup) -> str:
    """backup.yaml on the host: its state (the multiplexer's and the knowledge store's databases
    through the backup API), its configs and keys; the weights when asked."""
    prefix = host.vars.prefix
    paths = [f"{prefix}/state", f"{prefix}/etc", *([f"{prefix}/models"] if settings.weights else [])]
    doc = {"repository": repository(host, settings), "password_file": password_path(host),
           "databases": {"multiplexer": f"{prefix}/state/multiplexer.db",
                         "knowledge": f"{prefix}/state/knowledge.db"},
           "paths": paths, "exclude": list(HOST_EXCLUDE), "staging_dir": f"{prefix}/backup/staging",
           "cache_dir": f"{prefix}/backup/cache", "schedule_minutes": settings.schedule_minutes,
           "retention": settings.retention.model_dump()}
    return yaml.safe_dump(doc, sort_keys=False)


def on_calendar(minutes: int) -> str:
    if minutes == HOURLY:
        return "hourly"
    if minutes < HOURLY:
        return f"*-*-* *:00/{minutes}:00"
    return f"*-*-* 00/{minutes // HOURLY}:00:00"


def backup_argv(host: Host, action: str = "run") -> tuple[str, ...]:
    extra = ("--forget",) if action == "run" else ()
    return (python(host), "-m", "backup", action, "--config", config_path(host), *extra)


def service_text(host: Host) -> str:
    env = "".join(f"Environment={systemd_quote(f'{k}={v}')}\n" for k, v in environment(host).items())
    return ("[Unit]\nDescription=dgxready backup (restic) and retention\n"
            "After=network-online.target\nWants=network-online.target\n\n"
            f"[Service]\nType=oneshot\nUser={host.vars.service_user}\n{env}"
            f"ExecStart={' '.join(systemd_quote(a) for a in backup_argv(host))}\n"
            "Nice=10\nIOSchedulingClass=idle\n")


def timer_text(settings: HostBackup) -> str:
    return (f"[Unit]\nDescription=dgxready backup every {settings.schedule_minutes} minutes\n\n"
            f"[Timer]\nOnCalendar={on_calendar(settings.schedule_minutes)}\nPersistent=true\n"
            f"AccuracySec=1min\nUnit={UNIT}.service\n\n[Install]\nWantedBy=timers.target\n")


def desired_files(host: Host, settings: HostBackup) -> dict[str, str]:
    return {config_path(host): config_text(host, settings), service_path(f"{UNIT}.service"): service_text(host),
            service_path(TIMER): timer_text(settings)}


def scheduler_spec(host: Host, settings: HostBackup) -> ServiceSpec:
    """The timer's stand-in where PID 1 is not systemd."""
    return ServiceSpec(SCHEDULER, f"dgxready backup every {settings.schedule_minutes} minutes",
                       backup_argv(host, "schedule"), host.vars.service_user, "", environment=environment(host),
                       files={config_path(host): config_text(host, settings)})


def as_service_user(host: Host, argv: tuple[str, ...]) -> str:
    env = [f"{k}={v}" for k, v in environment(host).items()]
    user = q(host.vars.service_user)
    return (f"setpriv --reuid {user} --regid \"$(id -g {user})\" --init-groups -- "
            f"env {q(*env)} {q(*argv)}")


@dataclass(frozen=True)
class BackupSnapshots(Fact["int | None"]):
    """How many dgxready snapshots the host's repository holds, read as the service user with the
    host's config; None when that cannot be read (no venv, no restic, no repository yet)."""
    command_line: str

    def command(self) -> str:
        return f"{self.command_line} 2>/dev/null"

    def process(self, code: int, stdout: str) -> int | None:
        if code != 0:
            return None
        try:
            return len(json.loads(stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            return None


def snapshots_fact(host: Host) -> BackupSnapshots:
    return BackupSnapshots(as_service_user(host, backup_argv(host, "snapshots")))


@dataclass(frozen=True)
class CreateBackupPassword:
    path: str

    def describe(self) -> str:
        return f"generate the repository password in {self.path} (mode 600, never printed)"


@dataclass(frozen=True)
class WriteBackupFiles:
    paths: tuple[str, ...]

    def describe(self) -> str:
        return "write " + ", ".join(self.paths)


@dataclass(frozen=True)
class EnableTimer:
    schedule: str

    def describe(self) -> str:
        return f"enable and start {TIMER} ({self.schedule})"


@dataclass(frozen=True)
class RunFirstBackup:
    def describe(self) -> str:
        return "run a first backup (the repository holds no snapshot)"


class BackupStep(Step):
    name = "backup"

    def __init__(self, settings: HostBackup):
        self.settings = settings

    def file_changes(self, host: Host) -> WriteBackupFiles | None:
        wanted = desired_files(host, self.settings)
        have = host.fact(Sha256s(tuple(wanted)))
        stale = tuple(p for p, text in wanted.items() if have.get(p) != sha256_text(text))
        return WriteBackupFiles(stale) if stale else None

    def schedule_changes(self, host: Host) -> Changes:
        if host.fact(SystemdIsInit()):
            state = host.fact(SystemdUnits((TIMER,)))[TIMER]
            return changes(None if state.enabled and state.active else
                           EnableTimer(on_calendar(self.settings.schedule_minutes)))
        return service_changes(host, scheduler_spec(host, self.settings))

    def check(self, host: Host) -> Changes:
        restic = None if "restic" in host.fact(DebPackages(("restic",))) else InstallPackages(("restic",))
        password = password_path(host)
        secret = None if host.fact(FileExists(password)) else CreateBackupPassword(password)
        first = None if (host.fact(snapshots_fact(host)) or 0) > 0 else RunFirstBackup()
        return Changes((*changes(restic, secret, self.file_changes(host)).items,
                        *self.schedule_changes(host).items, *changes(first).items))

    def apply(self, host: Host, todo: Changes) -> str:
        for packages in todo.of(InstallPackages):
            apt_install(host, packages.packages)
        self.make_folders(host)
        for secret in todo.of(CreateBackupPassword):
            self.make_password(host, secret.path)
        for path, text in desired_files(host, self.settings).items():
            upload_text(host, path, text, "0640" if path == config_path(host) else "0644",
                        owner=f"root:{host.vars.service_user}" if path == config_path(host) else None)
        how = self.schedule(host)
        if todo.of(RunFirstBackup) or todo.of(WriteBackupFiles):
            code, out, err = host.sh(as_service_user(host, backup_argv(host)), check=False)
            if code != 0:
                raise StepFailed(f"{host.name}: backup: the first backup failed: {(err or out).strip()[-600:]}")
        return how

    def make_folders(self, host: Host) -> None:
        user = q(host.vars.service_user)
        host.sh(f"install -d -m 0700 -o {user} {q(backup_dir(host))} && "
                f"install -d -o {user} {q(host.vars.prefix + '/state')} {q(host.vars.prefix + '/run')} "
                f"{q(host.vars.prefix + '/log')}")

    def make_password(self, host: Host, path: str) -> None:
        partial = q(path + ".partial")
        host.sh(f"install -d -m 0755 \"$(dirname {q(path)})\" && umask 077 && "
                f"head -c 48 /dev/urandom | base64 | tr -d '/+=\\n' > {partial} && "
                f"chown {q(host.vars.service_user)} {partial} && chmod 0600 {partial} && "
                f"mv -f {partial} {q(path)}")

    def schedule(self, host: Host) -> str:
        if host.fact(SystemdIsInit()):
            host.sh(f"systemctl daemon-reload && systemctl enable --now {q(TIMER)}")
            return f"{TIMER} enabled"
        spec = scheduler_spec(host, self.settings)
        if service_changes(host, spec):
            install_service(host, spec)
            stop_service(host, SCHEDULER)
            start_service(host, spec)
        return ("PID 1 is not systemd: timer installed; the backup schedule runs as a supervised process "
                "with a pidfile")

    def undo(self, host: Host) -> str | None:
        if host.fact(SystemdIsInit()):
            host.sh(f"systemctl disable --now {q(TIMER)} 2>/dev/null || true")
        stop_service(host, SCHEDULER)
        files = [*desired_files(host, self.settings), service_path(f"{SCHEDULER}.service"),
                 f"{host.vars.prefix}/etc/{SCHEDULER}.identity"]
        host.sh(f"rm -f {q(*files)}")
        return f"stopped the backup schedule and removed its units; kept {backup_dir(host)} and the password"
