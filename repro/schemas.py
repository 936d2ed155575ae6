"""`python -m repro.schemas`: rewrite the committed JSON Schemas of the repro documents from their
models (tests/test_repro_env.py fails while a committed schema and its model disagree)."""
from __future__ import annotations

from repro.environment import ENVIRONMENT
from repro.gate import GATE_STATUS
from repro.run import RUN_RECORD

KINDS = (ENVIRONMENT, RUN_RECORD, GATE_STATUS)


def main() -> None:
    for kind in KINDS:
        print(f"wrote {kind.write_schema()}")


if __name__ == "__main__":
    main()
