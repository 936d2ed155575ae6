"""bench.all on another host over SSH (Fabric): run it there, fetch the JSON and plots back."""
from __future__ import annotations

import shlex
from pathlib import Path, PurePosixPath

from rich.console import Console

from bench.runner import BASELINES, safe_name
from dgxready.errors import DgxReadyError


def run_remote(host: str, remote_dir: str, out: Console, profile: str, concurrency: str,
               workload: str, slo: float, max_tokens: int) -> Path:
    from fabric import Connection
    from invoke.exceptions import UnexpectedExit

    remote_out = f"/tmp/dgxready-bench-{safe_name(host)}"
    args = ["./bootstrap.sh", "invoke", "bench.all", "--profile", profile, "--concurrency",
            concurrency, "--workload", workload, "--slo-p95-e2e", str(slo), "--max-tokens",
            str(max_tokens), "--output-dir", remote_out]
    cd = remote_dir if remote_dir.startswith("~/") and "'" not in remote_dir else shlex.quote(remote_dir)
    cmd = f"rm -rf {shlex.quote(remote_out)} && cd {cd} && {' '.join(shlex.quote(a) for a in args)}"
    local_dir = BASELINES / safe_name(host)
    local_dir.mkdir(parents=True, exist_ok=True)
    try:
        with Connection(host) as conn:
            out.print(f"{host}: running bench.all in {remote_dir}")
            conn.run(cmd, pty=False)
            listing = conn.run(f"cd {shlex.quote(remote_out)} && find . -type f", hide=True).stdout
            fetched = []
            for rel in listing.split():
                rel_path = PurePosixPath(rel)
                dest = local_dir / Path(*rel_path.parts[1:] if rel_path.parts[0] == "." else rel_path.parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                conn.get(f"{remote_out}/{rel_path}", str(dest))
                fetched.append(dest)
    except UnexpectedExit as exc:
        raise DgxReadyError(f"{host}: bench.all failed (exit {exc.result.exited}):\n"
                            f"{exc.result.stderr[-2000:]}") from None
    except OSError as exc:
        raise DgxReadyError(f"{host}: cannot connect: {exc}") from None
    jsons = sorted(p for p in fetched if p.suffix == ".json")
    if not jsons:
        raise DgxReadyError(f"{host}: bench.all wrote no JSON")
    out.print(f"fetched {len(fetched)} files into {local_dir}")
    return jsons[-1]
