"""A lab of disposable Debian hosts to try provisioning on: a debootstrap rootfs (built once,
cached as a tarball), an overlay per host, and sshd on the host's own loopback address inside its
own mount, UTS and PID namespaces. `ssh root@127.0.0.N` lands in that rootfs. Needs root,
debootstrap and zstd. The hosts share this machine's network, so each host's engine gets its own
port on 127.0.0.1.

    invoke provision.lab-up --count 2 --inventory lab.yaml    # start hosts, write an inventory
    invoke provision.lab-down --inventory lab.yaml            # stop them and delete them
    python -m provision.lab build|up|down                     # the same without invoke"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from fabric import Connection

from dgxready.ports import free_port
from dgxready.settings import load_settings

SUITE = "bookworm"
INCLUDE = "openssh-server,python3,sudo,ca-certificates"


def cache_dir() -> Path:
    return load_settings().cache_dir / "testhosts"


def apt_mirror() -> str:
    """The mirror this machine's apt sources already name; never a hard-coded host."""
    texts = [p.read_text() for p in Path("/etc/apt/sources.list.d").glob("*.sources")]
    for text in texts:
        for stanza in text.split("\n\n"):
            if "Suites:" in stanza and SUITE in stanza and "security" not in stanza:
                m = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                if m:
                    return m.group(1)
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        m = re.search(rf"^deb\s+(\S+)\s+{SUITE}\s", legacy.read_text(), re.M)
        if m:
            return m.group(1)
    raise RuntimeError("no Debian mirror found in /etc/apt/sources.list.d or sources.list")


def base_tarball() -> Path:
    """Build the rootfs once and cache it; later calls return the cached tarball."""
    out = cache_dir() / f"rootfs-{SUITE}.tar.zst"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f"build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={INCLUDE}", SUITE, str(work),
                        apt_mirror()], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["chroot", str(work), "apt-get", "clean"], check=True)
        for key in (work / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        tmp = out.with_suffix(".tmp")
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "--acls", "--one-file-system", "-C", str(work),
                        "-I", "zstd -T0 -3", "-cpf", str(tmp), "."], check=True)
        tmp.replace(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def unpacked_base() -> Path:
    base = cache_dir() / f"base-{SUITE}"
    if (base / "etc/debian_version").exists():
        return base
    tmp = base.with_name(base.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    subprocess.run(["tar", "--numeric-owner", "-I", "zstd", "-xpf", str(base_tarball()), "-C", str(tmp)],
                   check=True)
    tmp.rename(base)
    return base


@dataclass
class TestHost:
    name: str
    address: str
    root: Path
    workdir: Path
    key: Path
    proc: subprocess.Popen | None = None

    def connection(self) -> Connection:
        return Connection(self.address, user="root", connect_kwargs={
            "key_filename": str(self.key), "look_for_keys": False, "allow_agent": False, "timeout": 5})

    def ssh_config_entry(self, user: str = "root") -> str:
        return (f"Host {self.name}\n  HostName {self.address}\n  Port 22\n  User {user}\n"
                f"  IdentityFile {self.key}\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n")

    def start(self) -> None:
        script = (f'R={self.root}; mount -t proc proc $R/proc; '
                  'mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts $R/dev/pts; '
                  'mount --bind $R/dev/pts/ptmx $R/dev/ptmx; mount -t tmpfs -o mode=755 tmpfs $R/run; '
                  'mkdir -m755 $R/run/sshd; hostname "$(cat $R/etc/hostname)"; '
                  'exec chroot $R /usr/sbin/sshd -D -e')
        log = open(self.workdir / "sshd.log", "wb")
        self.proc = subprocess.Popen(["unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child",
                                      "--propagation", "private", "--", "sh", "-ec", script],
                                     stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.address, 22), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name}: sshd did not start: {(self.workdir / 'sshd.log').read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def destroy(self) -> None:
        self.stop()
        subprocess.run(["umount", "-l", str(self.root)], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.workdir, ignore_errors=True)


def make_host(workdir: Path, name: str, address: str) -> TestHost:
    """An overlay over the cached base, with its own keys and sshd config."""
    base = unpacked_base()
    workdir.mkdir(parents=True, exist_ok=True)
    upper, work, root = workdir / "upper", workdir / "work", workdir / "root"
    for d in (upper, work, root):
        d.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={base},upperdir={upper},workdir={work}", str(root)], check=True)
    key = workdir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    ssh = root / "root/.ssh"
    ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copy(f"{key}.pub", ssh / "authorized_keys")
    os.chmod(ssh / "authorized_keys", 0o600)
    (root / "etc/ssh/sshd_config.d/test.conf").write_text(
        f"ListenAddress {address}\nPort 22\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nUseDNS no\n")
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    # The network is the machine's, so the host trusts the CAs the machine trusts locally.
    local_cas = list(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    if local_cas:
        for ca in local_cas:
            shutil.copy(ca, root / "usr/local/share/ca-certificates" / ca.name)
        subprocess.run(["chroot", str(root), "update-ca-certificates"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    (root / "etc/hostname").write_text(name + "\n")
    subprocess.run(["chroot", str(root), "ssh-keygen", "-A"], check=True, stdout=subprocess.DEVNULL)
    return TestHost(name, address, root, workdir, key)


def available() -> str | None:
    """Why test hosts cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("debootstrap", "zstd", "unshare"):
        if not shutil.which(tool):
            return f"needs {tool}"
    return None


def lab_state(inventory: Path) -> Path:
    return inventory.with_suffix(".hosts.json")


def lab_vars() -> dict:
    """Lab hosts share this machine's cores and network: one llama.cpp thread each, and ports
    of their own for the engine (on the shared 127.0.0.1) and the multiplexer."""
    return {"threads": 1, "serve_port": free_port(), "mux_port": free_port()}


def up(count: int, inventory: Path, first_octet: int = 51) -> None:
    lab = cache_dir() / "lab" / inventory.stem
    entries, state = {}, []
    for i in range(count):
        name, address = f"lab{i + 1}", f"127.0.0.{first_octet + i}"
        host = make_host(lab / name, name, address)
        host.start()
        entries[name] = {"address": address, "key": str(host.key), "vars": lab_vars()}
        state.append({"name": name, "pid": host.proc.pid, "root": str(host.root), "workdir": str(host.workdir)})
    inventory.write_text(yaml.safe_dump({"hosts": entries, "groups": {"lab": list(entries)}}))
    lab_state(inventory).write_text(json.dumps(state, indent=2))
    print(f"{count} test hosts up; inventory {inventory}; group 'lab'")


def down(inventory: Path) -> None:
    for h in json.loads(lab_state(inventory).read_text()):
        with_pid = TestHost(h["name"], "", Path(h["root"]), Path(h["workdir"]), Path())
        try:
            os.killpg(h["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
        with_pid.destroy()
    lab_state(inventory).unlink()
    print("test hosts removed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("build", "up", "down"), help="what to do")
    parser.add_argument("--count", type=int, default=2, help="hosts to start with `up`")
    parser.add_argument("--inventory", type=Path, default=Path("lab.yaml"), help="inventory to write/read")
    args = parser.parse_args()
    if args.action == "build":
        print(base_tarball())
    elif args.action == "up":
        up(args.count, args.inventory)
    else:
        down(args.inventory)


if __name__ == "__main__":
    main()
