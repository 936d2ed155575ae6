"""Fetch a provisioned host's agent keys to the controller, only when asked, with mode 600."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from paramiko.ssh_exception import SSHException

from dgxready.errors import DgxReadyError
from dgxready.settings import load_settings
from provision.inventory import Target
from provision.run import connect
from provision.steps.services import keys_path_for


def fetch_keys(target: Target, output: Path | None = None) -> Path:
    output = output or load_settings().state_dir / "keys" / f"{target.name}-agent-keys.yaml"
    output.parent.mkdir(parents=True, exist_ok=True)
    remote = keys_path_for(target.entry.vars.prefix)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    os.close(fd)
    try:
        with connect(target) as conn:
            conn.get(remote, tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, output)
    except (OSError, SSHException) as exc:
        raise DgxReadyError(f"{target.name}: cannot fetch {remote}: {exc}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return output
