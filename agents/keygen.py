"""`python -m agents.keygen`: write one API key per agent to a file of mode 600, printing names
and roles only. Provisioning runs it on the host, so the keys are made where they are used."""
from __future__ import annotations

import argparse
import os
import pwd
from pathlib import Path

from agents.config import write_keys
from dgxready.roles import ROLE_ORDER


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10, help="number of agents (the seven roles, then more)")
    parser.add_argument("--output", type=Path, required=True, help="keys file to write (mode 600)")
    parser.add_argument("--owner", help="user who will own the file (the service user)")
    args = parser.parse_args()
    keys = write_keys(args.output, args.count, ROLE_ORDER)
    if args.owner:
        user = pwd.getpwnam(args.owner)
        os.chown(args.output, user.pw_uid, user.pw_gid)
    for agent in keys.agents:
        print(f"{agent.name} {agent.role}")


if __name__ == "__main__":
    main()
