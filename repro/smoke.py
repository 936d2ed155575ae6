"""`nox -s smoke`: the shortest end-to-end proof on this machine. Pull the embedded default
model, serve it with llama-server, send one chat completion through the openai SDK, stop."""
from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console

from dgxready.errors import DgxReadyError
from dgxready.ports import free_port
from model.quickstart import quickstart


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    args = parser.parse_args(argv)
    out = Console()
    started = time.perf_counter()
    try:
        quickstart(args.port or free_port(), out)
    except DgxReadyError as exc:
        out.print(f"[red]smoke failed:[/] {exc}")
        return 1
    out.print(f"[green]smoke passed[/] in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
