"""A throwaway sshd on a loopback address, for driving Fabric against a real SSH server."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


@dataclass
class LocalSshd:
    address: str
    port: int
    key: Path
    ssh_config: Path
    proc: subprocess.Popen

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_sshd(workdir: Path, alias: str, address: str = "127.0.0.1") -> LocalSshd:
    if not Path(SSHD).exists():
        raise RuntimeError("openssh-server is not installed (bootstrap.sh installs it for nox)")
    workdir.mkdir(parents=True, exist_ok=True)
    key, host_key = workdir / "id_ed25519", workdir / "host_ed25519"
    for k in (key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
    auth = workdir / "authorized_keys"
    shutil.copy(f"{key}.pub", auth)
    os.chmod(auth, 0o600)
    with socket.socket() as s:
        s.bind((address, 0))
        port = s.getsockname()[1]
    cfg = workdir / "sshd_config"
    cfg.write_text(f"ListenAddress {address}\nPort {port}\nHostKey {host_key}\n"
                   f"AuthorizedKeysFile {auth}\nPidFile {workdir}/sshd.pid\nPermitRootLogin prohibit-password\n"
                   "PasswordAuthentication no\nUsePAM no\nStrictModes no\nUseDNS no\n"
                   "Subsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stderr=open(workdir / "sshd.log", "wb"))
    client_cfg = workdir / "ssh_config"
    user = os.environ.get("USER", "root")
    client_cfg.write_text(f"Host {alias}\n  HostName {address}\n  Port {port}\n  User {user}\n"
                          f"  IdentityFile {key}\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return LocalSshd(address, port, key, client_cfg, proc)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"sshd did not start: {(workdir / 'sshd.log').read_text()}")
