"""Render a systemd unit for a server command; provisioning installs it on remote hosts."""
from __future__ import annotations

import re

from dgxready.errors import DgxReadyError

_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.@-]{1,200}$")


def systemd_quote(arg: str) -> str:
    """Quote one ExecStart argument: systemd splits on spaces, expands % and $, and takes
    C-style escapes inside double quotes."""
    if any(c in arg for c in "\n\r\0"):
        raise DgxReadyError(f"unit argument {arg!r} holds a line break or NUL")
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"' if not arg or re.search(r'[\s"\'\\;]', arg) else escaped


def render_unit(name: str, description: str, cmd: list[str], user: str | None = None,
                environment: dict[str, str] | None = None, after: tuple[str, ...] = ("network-online.target",),
                restart_sec: int = 5) -> str:
    if not _UNIT_NAME.match(name):
        raise DgxReadyError(f"unit name {name!r}: use letters, digits and :_.@- only")
    if "\n" in description:
        raise DgxReadyError("unit description: one line only")
    lines = [
        "[Unit]",
        f"Description={description}",
        f"After={' '.join(after)}",
        f"Wants={' '.join(after)}",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={' '.join(systemd_quote(a) for a in cmd)}",
        "Restart=on-failure",
        f"RestartSec={restart_sec}",
        "TimeoutStopSec=30",
        "KillMode=control-group",
    ]
    if user:
        lines.append(f"User={user}")
    for key, value in (environment or {}).items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise DgxReadyError(f"unit environment: bad variable name {key!r}")
        lines.append(f"Environment={systemd_quote(f'{key}={value}')}")
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)
