#!/usr/bin/env bash
# Reproducibility run: serve the default model, answer ten fixed prompts at temperature 0 with a
# fixed seed on one llama-server slot, one request at a time, and record the answers' sha256 with
# the environment JSON. The first run records the reference and reproduces it on a fresh server;
# every later run is compared with it. Exit 0 reproduced, 1 an answer changed (the prompt is
# named), 2 the run itself failed. All the work is in repro/run.py; flags: --out, --port,
# --new-reference (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${VIRTUAL_ENV:-}" ]]; then
    python=python                  # an activated venv, or a nox session's
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python        # the checkout's, made by ./bootstrap.sh
else
    python=python3
fi
exec "$python" -m repro.run "$@"
