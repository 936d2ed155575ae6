"""The host itself: packages, the service user and sshd, the NVIDIA driver, docker, and the
Python environment with the toolkit's code that the multiplexer runs from."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from provision.core import Changes, Host, Step, StepFailed, changes, q
from provision.facts import (
    AptHasPackage,
    CommandExists,
    DebPackages,
    FileText,
    IsDirectory,
    NvidiaHardware,
    NvidiaSmi,
    PythonDistributions,
    Sha256s,
    SystemdIsInit,
    UserExists,
)
from provision.steps.base import InstallPackages, apt_install, sha256_text, upload_file, upload_text

# bubblewrap: the multiplexer's shell.run sandbox.
BASE_PACKAGES = ("ca-certificates", "curl", "libgomp1", "python3-venv", "procps", "sudo", "bubblewrap")
SSL_PACKAGES = ("libssl3", "libssl3t64")
SSHD_HARDENING = ("PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                  "PermitRootLogin prohibit-password\nX11Forwarding no\n")
SSHD_CONF = "/etc/ssh/sshd_config.d/50-dgxready.conf"


class BasePackages(Step):
    name = "base-packages"

    def check(self, host: Host) -> Changes:
        installed = host.fact(DebPackages((*BASE_PACKAGES, *SSL_PACKAGES)))
        missing = [p for p in BASE_PACKAGES if p not in installed]
        if not set(installed) & set(SSL_PACKAGES):
            missing.append("libssl3t64" if host.fact(AptHasPackage("libssl3t64")) else "libssl3")
        return changes(InstallPackages(tuple(missing)) if missing else None)

    def apply(self, host: Host, todo: Changes) -> str:
        for c in todo.of(InstallPackages):
            apt_install(host, c.packages)
        return ""


@dataclass(frozen=True)
class CreateUser:
    name: str

    def describe(self) -> str:
        return f"create user {self.name}"


@dataclass(frozen=True)
class CreateDirectory:
    path: str

    def describe(self) -> str:
        return f"create {self.path}"


@dataclass(frozen=True)
class WriteSshdHardening:
    def describe(self) -> str:
        return f"write {SSHD_CONF} (no passwords, root by key only)"


class UserAndSsh(Step):
    name = "user-ssh"

    def check(self, host: Host) -> Changes:
        v = host.vars
        conf = host.fact(Sha256s((SSHD_CONF,))).get(SSHD_CONF)
        return changes(
            None if host.fact(UserExists(v.service_user)) else CreateUser(v.service_user),
            None if host.fact(IsDirectory(v.prefix)) else CreateDirectory(v.prefix),
            None if conf == sha256_text(SSHD_HARDENING) else WriteSshdHardening(),
        )

    def marker(self, host: Host) -> str:
        return f"{host.vars.prefix}/.created-user"

    def apply(self, host: Host, todo: Changes) -> str:
        v = host.vars
        for user in todo.of(CreateUser):
            host.sh(f"useradd --system --home-dir {q(v.prefix)} --shell /usr/sbin/nologin {q(user.name)} && "
                    f"install -d {q(v.prefix)} && touch {q(self.marker(host))}")
        host.sh(f"install -d -m 0755 {q(v.prefix)}")
        if todo.of(WriteSshdHardening):
            return self.harden_sshd(host)
        return ""

    def harden_sshd(self, host: Host) -> str:
        backup = f"{SSHD_CONF}.dgxready-backup"
        host.sh(f"if test -f {q(SSHD_CONF)}; then cp -p {q(SSHD_CONF)} {q(backup)}; fi")
        upload_text(host, SSHD_CONF, SSHD_HARDENING)
        if not host.ok("/usr/sbin/sshd -t"):
            host.sh(f"if test -f {q(backup)}; then mv -f {q(backup)} {q(SSHD_CONF)}; "
                    f"else rm -f {q(SSHD_CONF)}; fi")
            raise StepFailed(f"{host.name}: sshd -t rejected the hardening; restored the old file")
        if host.fact(SystemdIsInit()):
            host.sh("systemctl reload ssh || systemctl reload sshd")
            return "sshd reloaded"
        return "no systemd: sshd reads it at its next start"

    def undo(self, host: Host) -> str | None:
        v = host.vars
        backup = SSHD_CONF + ".dgxready-backup"
        host.sh(f"rm -f {q(SSHD_CONF)}; if test -f {q(backup)}; then mv -f {q(backup)} {q(SSHD_CONF)}; fi")
        if host.ok(f"test -f {q(self.marker(host))}"):
            host.sh(f"userdel {q(v.service_user)} && rm -f {q(self.marker(host))}")
            return f"removed {SSHD_CONF} and user {v.service_user}"
        return f"removed {SSHD_CONF}"


@dataclass(frozen=True)
class InstallDriver:
    def describe(self) -> str:
        return "install the distribution's NVIDIA driver"


class NvidiaDriver(Step):
    name = "nvidia-driver"

    def skip_reason(self, host: Host) -> str | None:
        if host.vars.profile == "cpu-only":
            return "profile cpu-only: no GPU expected"
        if not host.fact(NvidiaHardware()):
            return "no NVIDIA GPU on the host (no nvidia-smi, /dev/nvidia0 or PCI vendor 0x10de)"
        return None

    def check(self, host: Host) -> Changes:
        smi = host.fact(NvidiaSmi())
        if smi.driver_mismatch:
            raise StepFailed(f"{host.name}: driver/NVML version mismatch: reboot the host")
        if smi.answered:
            return changes()
        if host.vars.profile == "dgx-spark":
            raise StepFailed(f"{host.name}: DGX OS should ship the driver, but nvidia-smi fails: {smi.error}")
        return changes(InstallDriver())

    def apply(self, host: Host, todo: Changes) -> str:
        host.sh("if command -v ubuntu-drivers >/dev/null; then ubuntu-drivers install; else "
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nvidia-driver; fi")
        return "a reboot may be needed before the driver loads"


@dataclass(frozen=True)
class InstallContainerToolkit:
    def describe(self) -> str:
        return "install the NVIDIA Container Toolkit"


class Docker(Step):
    name = "docker"

    def skip_reason(self, host: Host) -> str | None:
        if host.vars.profile == "cpu-only":
            return "profile cpu-only: containers not used"
        return None

    def check(self, host: Host) -> Changes:
        toolkit = host.fact(NvidiaHardware()) and not host.fact(CommandExists("nvidia-ctk"))
        return changes(None if host.fact(CommandExists("docker")) else InstallPackages(("docker.io",)),
                       InstallContainerToolkit() if toolkit else None)

    def apply(self, host: Host, todo: Changes) -> str:
        for c in todo.of(InstallPackages):
            apt_install(host, c.packages)
        if todo.of(InstallContainerToolkit):
            if not host.fact(AptHasPackage("nvidia-container-toolkit")):
                raise StepFailed(f"{host.name}: nvidia-container-toolkit is not in the host's apt sources; "
                                 "add NVIDIA's repository (DGX OS has it)")
            apt_install(host, ("nvidia-container-toolkit",))
            host.sh("nvidia-ctk runtime configure --runtime=docker")
        return ""


@dataclass(frozen=True)
class AppBundle:
    """The toolkit's own code that runs on the host (the multiplexer), as one tarball."""
    tarball: Path
    sha256: str


@dataclass(frozen=True)
class CreateVenv:
    path: str

    def describe(self) -> str:
        return f"create {self.path}"


@dataclass(frozen=True)
class PipInstall:
    pins: tuple[str, ...]

    def describe(self) -> str:
        return "pip install " + ", ".join(self.pins)


@dataclass(frozen=True)
class ShipApp:
    sha256: str

    def describe(self) -> str:
        return f"ship the toolkit's code (sha256 {self.sha256[:12]}…)"


class PythonEnv(Step):
    """A venv with the runtime pins the multiplexer needs, and the toolkit's code beside it."""
    name = "python-env"

    def __init__(self, pins: tuple[str, ...], app: AppBundle):
        self.pins = pins
        self.app = app

    @staticmethod
    def venv(host: Host) -> str:
        return f"{host.vars.prefix}/venv"

    @staticmethod
    def app_dir(host: Host) -> str:
        return f"{host.vars.prefix}/app"

    def stamp(self, host: Host) -> str:
        return f"{self.app_dir(host)}/.bundle-sha256"

    def check(self, host: Host) -> Changes:
        have = host.fact(PythonDistributions(f"{self.venv(host)}/bin/python"))
        missing = self.pins if have is None else tuple(
            p for p in self.pins if have.get(p.split("==")[0].lower()) != p.split("==")[1])
        shipped = (host.fact(FileText(self.stamp(host))) or "").strip()
        return changes(CreateVenv(self.venv(host)) if have is None else None,
                       PipInstall(missing) if missing else None,
                       None if shipped == self.app.sha256 else ShipApp(self.app.sha256))

    def apply(self, host: Host, todo: Changes) -> str:
        venv = self.venv(host)
        if todo.of(CreateVenv):
            host.sh(f"python3 -m venv {q(venv)}")
        for c in todo.of(PipInstall):
            host.sh(f"{q(venv + '/bin/pip')} install -q --disable-pip-version-check {q(*c.pins)}")
        if todo.of(ShipApp):
            self.ship_app(host)
        return ""

    def ship_app(self, host: Host) -> None:
        app = self.app_dir(host)
        remote = f"{host.vars.prefix}/.app.tar.gz"
        upload_file(host, self.app.tarball, remote, sha256=self.app.sha256)
        host.sh(f"rm -rf {q(app + '.new')} && install -d {q(app + '.new')} && "
                f"tar -xzf {q(remote)} -C {q(app + '.new')} && printf %s {q(self.app.sha256)} > "
                f"{q(app + '.new/.bundle-sha256')} && rm -rf {q(app + '.old')} && "
                f"if test -d {q(app)}; then mv {q(app)} {q(app + '.old')}; fi && "
                f"mv {q(app + '.new')} {q(app)} && "
                f"rm -rf {q(app + '.old')} {q(remote)}")

    def undo(self, host: Host) -> str | None:
        host.sh(f"rm -rf {q(self.venv(host))} {q(self.app_dir(host))}")
        return f"removed {self.venv(host)} and {self.app_dir(host)}"
