"""Facts: one read-only command each and a parser of its output into a typed value. Steps read
them through `Host.fact`, which caches them per host and run."""
from __future__ import annotations

from dataclasses import dataclass

from provision.core import Fact, q


def _lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.strip()]


@dataclass(frozen=True)
class Machine(Fact[str]):
    def command(self) -> str:
        return "uname -m"

    def process(self, code: int, stdout: str) -> str:
        return stdout.strip()


@dataclass(frozen=True)
class SystemdIsInit(Fact[bool]):
    def command(self) -> str:
        return "cat /proc/1/comm"

    def process(self, code: int, stdout: str) -> bool:
        return code == 0 and stdout.strip() == "systemd"


@dataclass(frozen=True)
class DebPackages(Fact[dict[str, str]]):
    """Installed versions of the named packages; a package that is absent or half-installed
    is missing from the answer."""
    names: tuple[str, ...]

    def command(self) -> str:
        fmt = "'${Package} ${Version} ${db:Status-Status}\\n'"
        return f"dpkg-query -W -f={fmt} {q(*self.names)} 2>/dev/null"

    def process(self, code: int, stdout: str) -> dict[str, str]:
        found = {}
        for line in _lines(stdout):
            parts = line.split()
            if len(parts) == 3 and parts[2] == "installed":
                found[parts[0].split(":")[0]] = parts[1]
        return found


@dataclass(frozen=True)
class AptHasPackage(Fact[bool]):
    name: str

    def command(self) -> str:
        return f"apt-cache show {q(self.name)} >/dev/null 2>&1"

    def process(self, code: int, stdout: str) -> bool:
        return code == 0


@dataclass(frozen=True)
class UserExists(Fact[bool]):
    name: str

    def command(self) -> str:
        return f"id -u {q(self.name)}"

    def process(self, code: int, stdout: str) -> bool:
        return code == 0 and stdout.strip().isdigit()


@dataclass(frozen=True)
class IsDirectory(Fact[bool]):
    path: str

    def command(self) -> str:
        return f"test -d {q(self.path)}"

    def process(self, code: int, stdout: str) -> bool:
        return code == 0


@dataclass(frozen=True)
class FileExists(Fact[bool]):
    path: str

    def command(self) -> str:
        return f"test -f {q(self.path)}"

    def process(self, code: int, stdout: str) -> bool:
        return code == 0


@dataclass(frozen=True)
class FileText(Fact["str | None"]):
    """A small file's text (stamps, configs); None when it does not exist."""
    path: str

    def command(self) -> str:
        return f"cat {q(self.path)}"

    def process(self, code: int, stdout: str) -> str | None:
        return stdout if code == 0 else None


@dataclass(frozen=True)
class Sha256s(Fact[dict[str, str]]):
    """sha256 of each named file that exists; absent files are missing from the answer."""
    paths: tuple[str, ...]

    def command(self) -> str:
        return f"sha256sum {q(*self.paths)} 2>/dev/null || true"

    def process(self, code: int, stdout: str) -> dict[str, str]:
        found = {}
        for line in _lines(stdout):
            digest, _, path = line.partition("  ")
            if len(digest) == 64 and path:
                found[path] = digest
        return found


@dataclass(frozen=True)
class CommandExists(Fact[bool]):
    name: str

    def command(self) -> str:
        return f"command -v {q(self.name)}"

    def process(self, code: int, stdout: str) -> bool:
        return code == 0


@dataclass(frozen=True)
class Runs(Fact[bool]):
    """Whether a fixed probe command exits 0 (e.g. `llama-server --version`)."""
    argv: tuple[str, ...]

    def command(self) -> str:
        return f"{q(*self.argv)} >/dev/null 2>&1"

    def process(self, code: int, stdout: str) -> bool:
        return code == 0


@dataclass(frozen=True)
class NvidiaHardware(Fact[bool]):
    def command(self) -> str:
        return ("command -v nvidia-smi >/dev/null || ls /dev/nvidia0 >/dev/null 2>&1 || "
                "grep -qs 0x10de /sys/bus/pci/devices/*/vendor")

    def process(self, code: int, stdout: str) -> bool:
        return code == 0


@dataclass(frozen=True)
class Gpu:
    name: str
    driver: str
    compute_capability: tuple[int, int] | None
    memory_total_bytes: int | None
    memory_free_bytes: int | None


@dataclass(frozen=True)
class NvidiaSmiState:
    answered: bool
    gpus: tuple[Gpu, ...] = ()
    driver_mismatch: bool = False
    error: str = ""


def _mib(text: str) -> int | None:
    text = text.strip()
    return int(float(text)) * 1024 * 1024 if text.replace(".", "", 1).isdigit() else None


@dataclass(frozen=True)
class NvidiaSmi(Fact[NvidiaSmiState]):
    """GPUs as nvidia-smi sees them. On GB10 the memory columns read "[N/A]" or "Not Supported"
    (unified memory): those come back as None."""

    def command(self) -> str:
        return ("nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,memory.free "
                "--format=csv,noheader,nounits 2>&1")

    def process(self, code: int, stdout: str) -> NvidiaSmiState:
        if code != 0:
            text = stdout.strip()
            return NvidiaSmiState(False, driver_mismatch="mismatch" in text.lower(), error=text[-300:])
        gpus = []
        for line in _lines(stdout):
            cols = [c.strip() for c in line.split(",")]
            if len(cols) != 5:
                return NvidiaSmiState(False, error=f"unexpected nvidia-smi line: {line[:200]}")
            major, _, minor = cols[2].partition(".")
            cc = (int(major), int(minor)) if major.isdigit() and minor.isdigit() else None
            gpus.append(Gpu(cols[0], cols[1], cc, _mib(cols[3]), _mib(cols[4])))
        return NvidiaSmiState(bool(gpus), tuple(gpus), error="" if gpus else "nvidia-smi listed no GPU")


@dataclass(frozen=True)
class MemInfo(Fact["tuple[int, int]"]):
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo."""

    def command(self) -> str:
        return "grep -E '^(MemTotal|MemAvailable):' /proc/meminfo"

    def process(self, code: int, stdout: str) -> tuple[int, int]:
        values = {}
        for line in _lines(stdout):
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
        if set(values) != {"MemTotal", "MemAvailable"}:
            raise ValueError(f"/proc/meminfo lacks MemTotal or MemAvailable: {stdout[:200]!r}")
        return values["MemTotal"], values["MemAvailable"]


@dataclass(frozen=True)
class DockerImage(Fact[bool]):
    image: str

    def command(self) -> str:
        return f"docker image inspect {q(self.image)} >/dev/null 2>&1"

    def process(self, code: int, stdout: str) -> bool:
        return code == 0


@dataclass(frozen=True)
class DockerImageLabel(Fact["str | None"]):
    """One label of a local image; None when the image is missing or lacks the label."""
    image: str
    label: str

    def command(self) -> str:
        template = "{{ index .Config.Labels " + f'"{self.label}"' + " }}"
        return f"docker image inspect --format {q(template)} {q(self.image)} 2>/dev/null"

    def process(self, code: int, stdout: str) -> str | None:
        value = stdout.strip()
        return value if code == 0 and value and value != "<no value>" else None


@dataclass(frozen=True)
class PythonDistributions(Fact["dict[str, str] | None"]):
    """name (lower case, dashes) -> version of what a Python environment has; None when its
    interpreter is missing."""
    python: str

    def command(self) -> str:
        probe = "import importlib.metadata as m\nfor d in m.distributions(): print(d.name, d.version)"
        return f"test -x {q(self.python)} && {q(self.python)} -c {q(probe)}"

    def process(self, code: int, stdout: str) -> dict[str, str] | None:
        if code != 0:
            return None
        found = {}
        for line in _lines(stdout):
            name, _, version = line.partition(" ")
            found[name.lower().replace("_", "-")] = version.strip()
        return found


@dataclass(frozen=True)
class ServiceProcess:
    pid: int | None
    alive: bool
    argv: tuple[str, ...] = ()


@dataclass(frozen=True)
class Service(Fact[ServiceProcess]):
    """The main process of a service: systemd's MainPID where PID 1 is systemd, else the pidfile
    of the supervised fallback; with its argv, so a recycled pid is not taken for it."""
    unit: str
    pidfile: str

    def command(self) -> str:
        unit, pidfile = q(self.unit), q(self.pidfile)
        return (f"if [ \"$(cat /proc/1/comm)\" = systemd ]; then "
                f"pid=$(systemctl show -p MainPID --value {unit} 2>/dev/null || true); "
                f"else pid=$(cat {pidfile} 2>/dev/null || true); fi; "
                "echo \"pid=${pid}\"; "
                "if [ -n \"$pid\" ] && [ \"$pid\" != 0 ] && kill -0 \"$pid\" 2>/dev/null; then "
                "echo alive; tr '\\0' '\\n' < /proc/$pid/cmdline; fi")

    def process(self, code: int, stdout: str) -> ServiceProcess:
        lines = stdout.splitlines()
        head = lines[0] if lines else ""
        pid_text = head.removeprefix("pid=").strip()
        pid = int(pid_text) if pid_text.isdigit() and int(pid_text) > 0 else None
        alive = len(lines) > 1 and lines[1] == "alive" and pid is not None
        return ServiceProcess(pid, alive, tuple(lines[2:]) if alive else ())


@dataclass(frozen=True)
class HttpStatus(Fact["int | None"]):
    """The status code of a GET from the host itself; None when nothing answers."""
    url: str

    def command(self) -> str:
        return f"curl -s -o /dev/null -m 5 -w '%{{http_code}}' {q(self.url)}"

    def process(self, code: int, stdout: str) -> int | None:
        text = stdout.strip()
        return int(text) if text.isdigit() and text != "000" else None


@dataclass(frozen=True)
class TcpAccepts(Fact[bool]):
    """Whether a TCP connection from the host to address:port is accepted."""
    address: str
    port: int

    def command(self) -> str:
        target = q(f"exec 3<>/dev/tcp/{self.address}/{self.port}")
        return f"timeout 3 bash -c {target} 2>/dev/null"

    def process(self, code: int, stdout: str) -> bool:
        return code == 0


@dataclass(frozen=True)
class ChatReply:
    ok: bool
    text: str


CHAT_PROBE = """\
import json, sys, urllib.request as u, yaml
url, keys = sys.argv[1], sys.argv[2]
key = yaml.safe_load(open(keys))["agents"][0]["key"]
body = json.dumps({"messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 8}).encode()
req = u.Request(url + "/v1/chat/completions", data=body, headers={
    "Content-Type": "application/json", "Authorization": "Bearer " + key, "X-Session-Id": "dgxready-validate"})
try:
    reply = json.load(u.urlopen(req, timeout=120))
    print(reply["choices"][0]["message"]["content"])
except Exception as exc:
    print(f"{exc.__class__.__name__}: {exc}")
    sys.exit(1)
"""


@dataclass(frozen=True)
class MultiplexerChat(Fact[ChatReply]):
    """One chat completion through the multiplexer with the first agent key on the host; the key
    is read there and never leaves it."""
    python: str
    url: str
    keys_file: str

    def command(self) -> str:
        return f"{q(self.python)} -c {q(CHAT_PROBE)} {q(self.url)} {q(self.keys_file)} 2>&1"

    def process(self, code: int, stdout: str) -> ChatReply:
        return ChatReply(code == 0 and bool(stdout.strip()), stdout.strip()[-300:])


@dataclass(frozen=True)
class UnitState:
    enabled: bool
    active: bool


@dataclass(frozen=True)
class SystemdUnits(Fact[dict[str, UnitState]]):
    """Whether each named systemd unit is enabled and active; a unit systemd does not know is
    neither. Read only where PID 1 is systemd."""
    units: tuple[str, ...]

    def command(self) -> str:
        return (f"for u in {q(*self.units)}; do printf '%s|%s|%s\\n' \"$u\" "
                "\"$(systemctl is-enabled \"$u\" 2>/dev/null || true)\" "
                "\"$(systemctl is-active \"$u\" 2>/dev/null || true)\"; done")

    def process(self, code: int, stdout: str) -> dict[str, UnitState]:
        found = {u: UnitState(False, False) for u in self.units}
        for line in _lines(stdout):
            unit, _, rest = line.partition("|")
            enabled, _, active = rest.partition("|")
            if unit in found:
                found[unit] = UnitState(enabled.strip() in ("enabled", "enabled-runtime"),
                                        active.strip() == "active")
        return found
