#!/usr/bin/env bash
# The test command: what README.md tells you to run and what CI (.ci/run)
# runs, so the two cannot drift apart. Installs what the tests need first
# (real Prometheus, vmagent, ClickHouse; idempotent, fast when present).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"   # clickhouse-server lives in /usr/sbin
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

cargo fmt --all --check
cargo clippy --locked --all-targets --all-features -- -D warnings
# nextest does not run doctests; the docs build with no broken links.
cargo test --locked --workspace --doc
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --all-features
# Unit and integration tests; each test is its own process (distinct ports
# and temp dirs), and every test runs even after one fails.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo nextest run --locked --workspace --no-fail-fast 2>&1 | tee "$log"

# Load-test smoke: rwgate alone behind k6 against an nginx sink for ~15 s;
# fails if any request fails, nothing is forwarded, or p99 passes 1 s. Run
# with Remote-Write 1.0 bodies, then 2.0 (k6 also checks the Written headers
# against what it sent). The full rwgate-vs-vmagent comparison is
# loadtest/compare.sh (docs/PERFORMANCE.md).
bash loadtest/compare.sh --smoke
bash loadtest/compare.sh --smoke --protocol=2.0

# The suite's counts as the last line (any failure has already stopped us).
passed=$(grep -E '^ *Summary ' "$log" | tail -n 1 | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || true)
echo "tests: ${passed:-0} passed, 0 failed"
