"""bench.all on another host over SSH (Fabric): run it there, fetch the JSON and plots back."""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rich.console import Console

from bench.runner import BASELINES, safe_name
from dgxready.errors import DgxReadyError


@dataclass(frozen=True)
class RemoteRun:
    host: str
    remote_dir: str = "~/dgxready"
    bench_args: tuple[str, ...] = ()
    ssh_config: str | None = None
    local_dir: Path | None = None


def remote_command(run: RemoteRun, remote_out: str) -> str:
    args = ["./bootstrap.sh", "invoke", "bench.all", *run.bench_args, "--output-dir", remote_out]
    home_relative = run.remote_dir.startswith("~/")
    cd = ("~/" + shlex.quote(run.remote_dir[2:])) if home_relative else shlex.quote(run.remote_dir)
    return f"rm -rf {shlex.quote(remote_out)} && cd {cd} && {' '.join(shlex.quote(a) for a in args)}"


def run_remote(run: RemoteRun, out: Console) -> Path:
    from fabric import Config, Connection
    from invoke.exceptions import UnexpectedExit
    from paramiko.ssh_exception import SSHException

    remote_out = f"/tmp/dgxready-bench-{safe_name(run.host)}"
    local_dir = run.local_dir or BASELINES / safe_name(run.host)
    config = Config(runtime_ssh_path=run.ssh_config) if run.ssh_config else None
    fetched: list[Path] = []
    try:
        with Connection(run.host, config=config) as conn:
            out.print(f"{run.host}: running bench.all in {run.remote_dir}")
            conn.run(remote_command(run, remote_out), pty=False)
            listing = conn.run(f"cd {shlex.quote(remote_out)} && find . -type f", hide=True).stdout
            for rel in listing.split():
                parts = PurePosixPath(rel).parts
                parts = parts[1:] if parts and parts[0] == "." else parts
                if any(p in ("", "..") for p in parts):
                    continue
                dest = local_dir.joinpath(*parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                conn.get(f"{remote_out}/{'/'.join(parts)}", str(dest))
                fetched.append(dest)
    except UnexpectedExit as exc:
        raise DgxReadyError(f"{run.host}: bench.all failed (exit {exc.result.exited}):\n"
                            f"{(exc.result.stderr or exc.result.stdout)[-2000:]}") from None
    except (OSError, SSHException) as exc:
        raise DgxReadyError(f"{run.host}: cannot connect: {exc}") from None
    jsons = sorted(p for p in fetched if p.suffix == ".json")
    if not jsons:
        raise DgxReadyError(f"{run.host}: bench.all wrote no JSON")
    out.print(f"fetched {len(fetched)} files from {run.host} into {local_dir}")
    return jsons[-1]
