"""The provisioning steps, in order. Each reads facts on the host, says what would change, and
only then acts; undo exists where the earlier state can be restored."""
from __future__ import annotations

import hashlib
import io
import platform
from dataclasses import dataclass
from pathlib import Path

from provision.core import Change, Host, StepFailed, q

BASE_PACKAGES = ("ca-certificates", "curl", "libgomp1", "python3-venv", "procps", "sudo")
SSHD_HARDENING = ("PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                  "PermitRootLogin prohibit-password\nX11Forwarding no\n")
SSHD_CONF = "/etc/ssh/sshd_config.d/50-dgxready.conf"
LLAMA_BINARIES = ("llama-server", "llama-quantize", "llama-bench")
HOST_PYTHON_PACKAGES = ("numpy", "httpx", "pyyaml", "nvidia-ml-py")


@dataclass(frozen=True)
class Artifacts:
    """What the controller ships: its llama.cpp build and the verified model file."""
    llama_bin_dir: Path
    machine: str
    model_path: Path
    model_sha256: str
    model_rel: str
    sdist: Path | None = None


def write_remote(host: Host, path: str, text: str, mode: str = "0644") -> None:
    tmp = f"{path}.dgxready-tmp"
    host.sh(f"install -d -m 0755 {q(str(Path(path).parent))}")
    host.conn.put(io.BytesIO(text.encode()), tmp)
    host.sh(f"chmod {q(mode)} {q(tmp)} && mv -f {q(tmp)} {q(path)}")


def remote_sha256(host: Host, path: str) -> str | None:
    code, out, _ = host.sh(f"sha256sum {q(path)} 2>/dev/null", check=False)
    return out.split()[0] if code == 0 and out else None


def is_systemd(host: Host) -> bool:
    if "systemd" not in host.facts:
        host.facts["systemd"] = host.sh("cat /proc/1/comm", check=False)[1].strip() == "systemd"
    return host.facts["systemd"]


def has_nvidia_gpu(host: Host) -> bool:
    return host.ok("command -v nvidia-smi >/dev/null || ls /dev/nvidia0 >/dev/null 2>&1 || "
                   "grep -qs 0x10de /sys/bus/pci/devices/*/vendor")


class BasePackages:
    name = "base-packages"

    def skip_reason(self, host: Host) -> str | None:
        return None

    def check(self, host: Host) -> Change:
        wanted = [*BASE_PACKAGES, "libssl3", "libssl3t64"]
        listing = host.sh("dpkg-query -W -f='${Package} ${Status}\\n' " + q(*wanted) + " 2>/dev/null",
                          check=False)[1]
        installed = {line.split()[0] for line in listing.splitlines() if line.endswith("ok installed")}
        missing = [p for p in BASE_PACKAGES if p not in installed]
        if not installed & {"libssl3", "libssl3t64"}:
            t64 = host.ok("apt-cache show libssl3t64 >/dev/null 2>&1")
            missing.append("libssl3t64" if t64 else "libssl3")
        return Change(tuple(f"install {p}" for p in missing))

    def apply(self, host: Host, change: Change) -> str:
        pkgs = [c.removeprefix("install ") for c in change.items]
        host.sh("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                f"--no-install-recommends {q(*pkgs)} >/dev/null")
        return ""

    def verify(self, host: Host) -> None:
        if self.check(host):
            raise StepFailed(f"{host.name}: packages still missing: {self.check(host).describe()}")

    def undo(self, host: Host) -> str | None:
        return None


class UserAndSsh:
    name = "user-ssh"

    def skip_reason(self, host: Host) -> str | None:
        return None

    def check(self, host: Host) -> Change:
        v = host.vars
        items = []
        if not host.ok(f"id -u {q(v.service_user)} >/dev/null 2>&1"):
            items.append(f"create user {v.service_user}")
        if not host.ok(f"test -d {q(v.prefix)}"):
            items.append(f"create {v.prefix}")
        if remote_sha256(host, SSHD_CONF) != hashlib.sha256(SSHD_HARDENING.encode()).hexdigest():
            items.append(f"write {SSHD_CONF} (no passwords, root by key only)")
        return Change(tuple(items))

    def apply(self, host: Host, change: Change) -> str:
        v = host.vars
        marker = f"{v.prefix}/.created-user"
        if any(i.startswith("create user") for i in change.items):
            host.sh(f"useradd --system --home-dir {q(v.prefix)} --shell /usr/sbin/nologin "
                    f"{q(v.service_user)} && install -d {q(v.prefix)} && touch {q(marker)}")
        host.sh(f"install -d -m 0755 {q(v.prefix)}")
        if any(i.startswith("write") for i in change.items):
            backup = f"{SSHD_CONF}.dgxready-backup"
            host.sh(f"if test -f {q(SSHD_CONF)}; then cp -p {q(SSHD_CONF)} {q(backup)}; fi")
            write_remote(host, SSHD_CONF, SSHD_HARDENING)
            if not host.ok("/usr/sbin/sshd -t"):
                host.sh(f"if test -f {q(backup)}; then mv -f {q(backup)} {q(SSHD_CONF)}; "
                        f"else rm -f {q(SSHD_CONF)}; fi")
                raise StepFailed(f"{host.name}: sshd -t rejected the hardening; restored the old file")
            if is_systemd(host):
                host.sh("systemctl reload ssh || systemctl reload sshd")
                return "sshd reloaded"
            return "no systemd: sshd reads it at its next start"
        return ""

    def verify(self, host: Host) -> None:
        if self.check(host):
            raise StepFailed(f"{host.name}: {self.check(host).describe()}")

    def undo(self, host: Host) -> str | None:
        v = host.vars
        marker = f"{v.prefix}/.created-user"
        host.sh(f"rm -f {q(SSHD_CONF)}; if test -f {q(SSHD_CONF + '.dgxready-backup')}; then "
                f"mv -f {q(SSHD_CONF + '.dgxready-backup')} {q(SSHD_CONF)}; fi")
        if host.ok(f"test -f {q(marker)}"):
            host.sh(f"userdel {q(v.service_user)} && rm -f {q(marker)}")
            return f"removed {SSHD_CONF} and user {v.service_user}"
        return f"removed {SSHD_CONF}"


class NvidiaDriver:
    name = "nvidia-driver"

    def skip_reason(self, host: Host) -> str | None:
        if host.vars.profile == "cpu-only":
            return "profile cpu-only: no GPU expected"
        if not has_nvidia_gpu(host):
            return "no NVIDIA GPU on the host (no nvidia-smi, /dev/nvidia0 or PCI vendor 0x10de)"
        return None

    def check(self, host: Host) -> Change:
        query = "nvidia-smi --query-gpu=name,driver_version --format=csv,noheader"
        code, out, err = host.sh(query, check=False)
        if "mismatch" in (out + err).lower():
            raise StepFailed(f"{host.name}: driver/NVML version mismatch: reboot the host")
        if code == 0:
            return Change()
        if host.vars.profile == "dgx-spark":
            raise StepFailed(f"{host.name}: DGX OS should ship the driver, but nvidia-smi fails: {err[-300:]}")
        return Change(("install the distribution's NVIDIA driver",))

    def apply(self, host: Host, change: Change) -> str:
        host.sh("if command -v ubuntu-drivers >/dev/null; then ubuntu-drivers install; else "
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nvidia-driver; fi")
        return "a reboot may be needed before the driver loads"

    def verify(self, host: Host) -> None:
        if not host.ok("nvidia-smi -L"):
            raise StepFailed(f"{host.name}: nvidia-smi does not answer yet (reboot?)")

    def undo(self, host: Host) -> str | None:
        return None


class Docker:
    name = "docker"

    def skip_reason(self, host: Host) -> str | None:
        if host.vars.profile == "cpu-only":
            return "profile cpu-only: containers not used"
        return None

    def check(self, host: Host) -> Change:
        items = []
        if not host.ok("command -v docker >/dev/null"):
            items.append("install docker.io")
        if has_nvidia_gpu(host) and not host.ok("command -v nvidia-ctk >/dev/null"):
            items.append("NVIDIA Container Toolkit")
        return Change(tuple(items))

    def apply(self, host: Host, change: Change) -> str:
        if "install docker.io" in change.items:
            host.sh("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io")
        if "NVIDIA Container Toolkit" in change.items:
            if not host.ok("apt-cache show nvidia-container-toolkit >/dev/null 2>&1"):
                raise StepFailed(f"{host.name}: nvidia-container-toolkit is not in the host's apt sources; "
                                 "add NVIDIA's repository (DGX OS has it)")
            host.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nvidia-container-toolkit && "
                    "nvidia-ctk runtime configure --runtime=docker")
        return ""

    def verify(self, host: Host) -> None:
        if not host.ok("docker --version >/dev/null"):
            raise StepFailed(f"{host.name}: docker does not run")

    def undo(self, host: Host) -> str | None:
        return None


class PythonEnv:
    name = "python-env"

    def __init__(self, versions: dict[str, str]):
        self.pins = [f"{p}=={versions[p]}" for p in HOST_PYTHON_PACKAGES if p in versions]

    def skip_reason(self, host: Host) -> str | None:
        return None

    def venv(self, host: Host) -> str:
        return f"{host.vars.prefix}/venv"

    def check(self, host: Host) -> Change:
        py = f"{self.venv(host)}/bin/python"
        if not host.ok(f"test -x {q(py)}"):
            return Change((f"create {self.venv(host)} with {', '.join(self.pins)}",))
        probe = "import importlib.metadata as m\nfor d in m.distributions(): print(d.name + '==' + d.version)"
        frozen = host.sh(f"{q(py)} -c {q(probe)}", check=False)[1].lower().replace("_", "-")
        missing = [p for p in self.pins if p.lower() not in frozen.split()]
        return Change(tuple(f"install {p}" for p in missing))

    def apply(self, host: Host, change: Change) -> str:
        host.sh(f"python3 -m venv {q(self.venv(host))} && {q(self.venv(host) + '/bin/pip')} install -q "
                f"--disable-pip-version-check {q(*self.pins)}")
        return ""

    def verify(self, host: Host) -> None:
        if self.check(host):
            raise StepFailed(f"{host.name}: python env incomplete: {self.check(host).describe()}")

    def undo(self, host: Host) -> str | None:
        host.sh(f"rm -rf {q(self.venv(host))}")
        return f"removed {self.venv(host)}"


class LlamaCpp:
    """Ship the controller's build when the host has the same architecture (as a fleet ships
    build artefacts), or build on the host from the same pinned sdist when it does not, or when
    the host's vars say `llamacpp: build`."""
    name = "llama.cpp"

    def __init__(self, art: Artifacts):
        self.art = art
        self.digests = {b: hashlib.sha256((art.llama_bin_dir / b).read_bytes()).hexdigest()
                        for b in LLAMA_BINARIES}

    def skip_reason(self, host: Host) -> str | None:
        return None

    def mode(self, host: Host) -> str:
        if "machine" not in host.facts:
            host.facts["machine"] = host.sh("uname -m")[1].strip()
        if host.vars.llamacpp == "auto":
            return "ship" if host.facts["machine"] == self.art.machine else "build"
        return host.vars.llamacpp

    def stamp(self, host: Host) -> str:
        return f"{host.vars.prefix}/bin/.llama-build"

    def check(self, host: Host) -> Change:
        bindir = f"{host.vars.prefix}/bin"
        if self.mode(host) == "build":
            want = self.art.sdist.name if self.art.sdist else "?"
            have = host.sh(f"cat {q(self.stamp(host))} 2>/dev/null", check=False)[1].strip()
            present = host.ok(" && ".join(f"test -x {q(bindir + '/' + b)}" for b in LLAMA_BINARIES))
            return Change() if present and have == want else Change((f"build from {want} on the host",))
        listing = host.sh(f"cd {q(bindir)} 2>/dev/null && sha256sum {q(*LLAMA_BINARIES)} 2>/dev/null",
                          check=False)[1]
        found = {line.split()[1]: line.split()[0] for line in listing.splitlines() if len(line.split()) == 2}
        stale = [b for b in LLAMA_BINARIES if found.get(b) != self.digests[b]]
        return Change(tuple(f"ship {b}" for b in stale))

    def apply(self, host: Host, change: Change) -> str:
        bindir = f"{host.vars.prefix}/bin"
        host.sh(f"install -d {q(bindir)}")
        if self.mode(host) == "build":
            return self.build(host, bindir)
        for item in change.items:
            b = item.removeprefix("ship ")
            tmp = f"{bindir}/.{b}.partial"
            host.put(self.art.llama_bin_dir / b, tmp)
            host.sh(f"chmod 0755 {q(tmp)} && mv -f {q(tmp)} {q(bindir + '/' + b)}")
        return f"shipped the controller's {self.art.machine} build"

    def build(self, host: Host, bindir: str) -> str:
        from model.llamacpp_build import BASE_FLAGS, TARGETS

        if not self.art.sdist:
            raise StepFailed(f"{host.name}: no llama-cpp-python sdist on the controller to build from")
        src = f"{host.vars.prefix}/src"
        top = self.art.sdist.name.removesuffix(".tar.gz")
        host.sh("command -v cmake >/dev/null && command -v g++ >/dev/null || (apt-get update -qq && "
                "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake build-essential >/dev/null)")
        host.sh(f"install -d {q(src)}")
        host.put(self.art.sdist, f"{src}/{self.art.sdist.name}")
        cuda = ""
        cc = host.sh("nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1",
                     check=False)[1].strip()
        if cc and host.ok("command -v nvcc >/dev/null || test -x /usr/local/cuda/bin/nvcc"):
            from model.llamacpp_build import cuda_architecture

            major, minor = (int(x) for x in cc.split("."))
            cuda = q("-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architecture(major, minor)}")
        vendored = q(top + "/vendor/llama.cpp")
        host.sh(f"cd {q(src)} && rm -rf llama.cpp build && mkdir llama.cpp && "
                f"tar -xzf {q(self.art.sdist.name)} -C llama.cpp --strip-components=3 {vendored} && "
                f"export PATH=$PATH:/usr/local/cuda/bin && "
                f"cmake -S llama.cpp -B build {q(*BASE_FLAGS)} {cuda} >/dev/null && "
                f"cmake --build build --target {q(*TARGETS)} -j \"$(nproc)\" >/dev/null")
        for b in LLAMA_BINARIES:
            host.sh(f"install -m 0755 {q(src + '/build/bin/' + b)} {q(bindir + '/.' + b + '.partial')} && "
                    f"mv -f {q(bindir + '/.' + b + '.partial')} {q(bindir + '/' + b)}")
        host.sh(f"printf %s {q(self.art.sdist.name)} > {q(self.stamp(host))}")
        return "built on the host" + (" with CUDA" if cuda else "")

    def verify(self, host: Host) -> None:
        code, out, err = host.sh(f"{q(host.vars.prefix + '/bin/llama-server')} --version 2>&1", check=False)
        if code != 0:
            raise StepFailed(f"{host.name}: llama-server does not run there: {(out + err)[-300:]}")

    def undo(self, host: Host) -> str | None:
        host.sh(f"rm -f {' '.join(q(host.vars.prefix + '/bin/' + b) for b in LLAMA_BINARIES)} "
                f"{q(self.stamp(host))}")
        return "removed the llama.cpp binaries"


class Vllm:
    name = "vllm"

    def __init__(self, image: str):
        self.image = image

    def skip_reason(self, host: Host) -> str | None:
        if host.vars.profile == "cpu-only":
            return "profile cpu-only: llama.cpp serves instead"
        return None

    def check(self, host: Host) -> Change:
        if host.ok(f"docker image inspect {q(self.image)} >/dev/null 2>&1"):
            return Change()
        return Change((f"docker pull {self.image}",))

    def apply(self, host: Host, change: Change) -> str:
        host.sh(f"docker pull {q(self.image)} >/dev/null")
        return ""

    def verify(self, host: Host) -> None:
        if self.check(host):
            raise StepFailed(f"{host.name}: image {self.image} missing after pull")

    def undo(self, host: Host) -> str | None:
        return None


class Model:
    name = "model"

    def __init__(self, art: Artifacts):
        self.art = art

    def skip_reason(self, host: Host) -> str | None:
        return None

    def path(self, host: Host) -> str:
        return f"{host.vars.prefix}/models/{self.art.model_rel}"

    def check(self, host: Host) -> Change:
        if remote_sha256(host, self.path(host)) == self.art.model_sha256:
            return Change()
        return Change((f"ship {self.art.model_rel} (sha256 {self.art.model_sha256[:12]}…)",))

    def apply(self, host: Host, change: Change) -> str:
        final = self.path(host)
        partial = f"{final}.partial"
        host.sh(f"install -d {q(str(Path(final).parent))}")
        host.put(self.art.model_path, partial)
        got = remote_sha256(host, partial)
        if got != self.art.model_sha256:
            host.sh(f"rm -f {q(partial)}")
            raise StepFailed(f"{host.name}: model upload corrupted: expected sha256 {self.art.model_sha256}, "
                             f"found {got}")
        host.sh(f"mv -f {q(partial)} {q(final)}")
        return "verified on the host"

    def verify(self, host: Host) -> None:
        if self.check(host):
            raise StepFailed(f"{host.name}: model does not verify")

    def undo(self, host: Host) -> str | None:
        host.sh(f"rm -f {q(self.path(host))}")
        return f"removed {self.path(host)}"


class Services:
    """llama-server as a systemd unit; where PID 1 is not systemd (containers, the test hosts),
    the unit is still installed and the server runs as a supervised process with a pidfile."""
    name = "services"
    unit_path = "/etc/systemd/system/dgxready-llama.service"

    def __init__(self, art: Artifacts):
        self.art = art

    def skip_reason(self, host: Host) -> str | None:
        return None

    def command(self, host: Host) -> list[str]:
        v = host.vars
        bind = v.serve_host or host.target.entry.address
        return [f"{v.prefix}/bin/llama-server", "-m", f"{v.prefix}/models/{self.art.model_rel}",
                "--host", bind, "--port", str(v.serve_port), "--alias", v.model, "--metrics",
                "-np", str(v.parallel), "-c", str(v.parallel * v.ctx_per_slot), "-ngl",
                "0" if v.profile == "cpu-only" else "999", *(["-t", str(v.threads)] if v.threads else [])]

    def unit(self, host: Host) -> str:
        from model.systemd import render_unit

        return render_unit("dgxready-llama", f"dgxready llama-server ({host.vars.model})",
                           self.command(host), user=host.vars.service_user)

    def pidfile(self, host: Host) -> str:
        return f"{host.vars.prefix}/run/llama-server.pid"

    def running(self, host: Host) -> bool:
        if is_systemd(host):
            return host.ok("systemctl is-active --quiet dgxready-llama")
        pid = q(self.pidfile(host))
        expected = q(" ".join(self.command(host)))
        return host.ok(f"test -f {pid} && kill -0 \"$(cat {pid})\" && "
                       f"test \"$(tr '\\0' ' ' < /proc/$(cat {pid})/cmdline | sed 's/ $//')\" = {expected}")

    def server_pid(self, host: Host) -> str:
        if is_systemd(host):
            return host.sh("systemctl show -p MainPID --value dgxready-llama", check=False)[1].strip()
        return host.sh(f"cat {q(self.pidfile(host))} 2>/dev/null", check=False)[1].strip()

    def check(self, host: Host) -> Change:
        items = []
        if remote_sha256(host, self.unit_path) != hashlib.sha256(self.unit(host).encode()).hexdigest():
            items.append(f"install {self.unit_path}")
        if not self.running(host):
            items.append("start llama-server")
        else:
            model = f"{host.vars.prefix}/models/{self.art.model_rel}"
            pid = self.server_pid(host)
            # A handler, as Ansible would run it: the model changed under a running server.
            newer = f"test \"$(stat -c %Y {q(model)})\" -gt \"$(date -d \"$(ps -o lstart= -p {pid})\" +%s)\""
            if pid.isdigit() and host.ok(newer):
                items.append("restart llama-server (the model file changed)")
        return Change(tuple(items))

    def apply(self, host: Host, change: Change) -> str:
        v = host.vars
        write_remote(host, self.unit_path, self.unit(host))
        host.sh(f"install -d -o {q(v.service_user)} {q(v.prefix + '/run')} {q(v.prefix + '/log')}")
        self.stop(host)
        if v.profile == "dgx-spark":
            # Unified memory: the page cache competes with the GPU, so NVIDIA drops it first.
            host.sh("sync && echo 3 > /proc/sys/vm/drop_caches")
        if is_systemd(host):
            host.sh("systemctl daemon-reload && systemctl enable --now dgxready-llama")
            return "systemd unit enabled"
        log = f"{v.prefix}/log/llama-server.log"
        user = q(v.service_user)
        # setpriv execs in place (runuser would fork), so the pidfile names llama-server itself.
        host.sh(f"setsid setpriv --reuid {user} --regid \"$(id -g {user})\" --init-groups -- "
                f"{q(*self.command(host))} > {q(log)} 2>&1 < /dev/null & echo $! > {q(self.pidfile(host))}")
        return "PID 1 is not systemd: unit installed, server runs as a supervised process with a pidfile"

    def stop(self, host: Host) -> None:
        if is_systemd(host):
            host.sh("systemctl stop dgxready-llama 2>/dev/null || true")
            return
        pid = q(self.pidfile(host))
        host.sh(f"if test -f {pid}; then kill \"$(cat {pid})\" 2>/dev/null || true; "
                f"for i in $(seq 50); do kill -0 \"$(cat {pid})\" 2>/dev/null || break; sleep 0.1; done; "
                f"rm -f {pid}; fi")

    def verify(self, host: Host) -> None:
        url = f"http://{host.vars.serve_host or host.target.entry.address}:{host.vars.serve_port}/health"
        if not host.ok(f"for i in $(seq 120); do curl -fsS {q(url)} >/dev/null 2>&1 && exit 0; sleep 0.5; "
                       f"done; exit 1"):
            tail = host.sh(f"tail -n 15 {q(host.vars.prefix + '/log/llama-server.log')} 2>/dev/null",
                           check=False)[1]
            raise StepFailed(f"{host.name}: llama-server not healthy at {url}:\n{tail}")

    def undo(self, host: Host) -> str | None:
        self.stop(host)
        if is_systemd(host):
            host.sh("systemctl disable dgxready-llama 2>/dev/null || true")
        host.sh(f"rm -f {q(self.unit_path)}")
        return "stopped llama-server and removed its unit"


class Validate:
    name = "validate"

    def skip_reason(self, host: Host) -> str | None:
        return None

    def check(self, host: Host) -> Change:
        v = host.vars
        if v.profile != "cpu-only":
            code, out, _ = host.sh("nvidia-smi -L && nvidia-smi | grep -o 'CUDA Version: [0-9.]*'", check=False)
            if code != 0:
                raise StepFailed(f"{host.name}: no GPU visible to nvidia-smi")
        base = f"http://{v.serve_host or host.target.entry.address}:{v.serve_port}"
        probe = ("import json,sys,urllib.request as u\n"
                 "b=sys.argv[1]\n"
                 "assert u.urlopen(b+'/health',timeout=10).status==200\n"
                 "req=u.Request(b+'/v1/chat/completions',data=json.dumps({'messages':[{'role':'user',"
                 "'content':'Say OK.'}],'max_tokens':8}).encode(),\n"
                 "  headers={'Content-Type':'application/json'})\n"
                 "r=json.load(u.urlopen(req,timeout=120))\n"
                 "t=r['choices'][0]['message']['content']\n"
                 "assert t.strip(), r\n"
                 "print(t)\n")
        code, out, err = host.sh(f"python3 -c {q(probe)} {q(base)}", check=False)
        if code != 0:
            raise StepFailed(f"{host.name}: validation chat request to {base} failed: {err[-400:]}")
        return Change()

    def apply(self, host: Host, change: Change) -> str:
        return ""

    def verify(self, host: Host) -> None:
        pass

    def undo(self, host: Host) -> str | None:
        return None


def controller_machine() -> str:
    return platform.machine()
