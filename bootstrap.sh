#!/usr/bin/env bash
# Set up what dgxready needs on a fresh Debian/Ubuntu machine (build tools, a pinned uv, the
# locked Python environment in .venv, with uv linked into .venv/bin), then run the given command
# inside that environment:
#   ./bootstrap.sh invoke quickstart      ./bootstrap.sh nox
set -euo pipefail
cd "$(dirname "$0")"

UV_VERSION=0.13.8
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/dgxready"

say() { printf 'bootstrap: %s\n' "$*" >&2; }

python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { say "Python >= 3.10 is required (found $(python3 --version 2>&1))"; exit 1; }

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null && command -v make >/dev/null || missing+=(build-essential)
command -v git >/dev/null || missing+=(git)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
# The test suite drives a real sshd and builds Debian test hosts with debootstrap; the sshd
# package must not start a system-wide daemon here.
if [ "${1:-}" = nox ]; then
  [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v zstd >/dev/null || missing+=(zstd)
  # The storage step's tests build arrays of loop devices (they skip where the kernel has no md).
  command -v mdadm >/dev/null || missing+=(mdadm)
  # The monitoring tests run real Prometheus, Alertmanager and node_exporter (started by the tests,
  # never as system services).
  command -v prometheus >/dev/null || missing+=(prometheus)
  command -v prometheus-alertmanager >/dev/null || missing+=(prometheus-alertmanager)
  command -v prometheus-node-exporter >/dev/null || missing+=(prometheus-node-exporter)
  # The multiplexer runs shell.run's commands in a bubblewrap sandbox.
  command -v bwrap >/dev/null || missing+=(bubblewrap)
  # The backup tests snapshot, damage and restore real restic repositories.
  command -v restic >/dev/null || missing+=(restic)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo); else
    say "missing packages: ${missing[*]}; install them with apt-get and run again"; exit 1
  fi
  say "installing ${missing[*]}"
  "${sudo[@]}" apt-get update -qq
  no_start=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${sudo[@]}" chmod +x /usr/sbin/policy-rc.d
    no_start=1
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ $no_start = 1 ]; then "${sudo[@]}" rm -f /usr/sbin/policy-rc.d; fi
fi

uv_bin="$CACHE/bin/uv"
if [ "$(uv --version 2>/dev/null | cut -d' ' -f2)" = "$UV_VERSION" ]; then
  uv_bin="$(command -v uv)"
elif [ ! -x "$uv_bin" ] || [ "$("$uv_bin" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  say "installing uv $UV_VERSION into $CACHE/tools"
  python3 -m venv --clear "$CACHE/tools/uv-$UV_VERSION"
  "$CACHE/tools/uv-$UV_VERSION/bin/python" -m pip install -q "uv==$UV_VERSION"
  mkdir -p "$CACHE/bin"
  ln -sf "$CACHE/tools/uv-$UV_VERSION/bin/uv" "$uv_bin"
fi
export PATH="$(dirname "$uv_bin"):$PATH"

uv sync --frozen --group dev -q
# After `. .venv/bin/activate`, nox (whose sessions are uv venvs) and `uv` itself need uv on PATH.
ln -sfn "$(readlink -f "$uv_bin")" .venv/bin/uv
[ $# -eq 0 ] && { say "environment ready: .venv"; exit 0; }
exec uv run --frozen "$@"
