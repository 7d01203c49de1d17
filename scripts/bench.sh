#!/usr/bin/env bash
# Runs a benchmark against release builds: scripts/bench.sh notifier
# Benchmarks print figures and ratios against references measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PYO3_PYTHON=/usr/bin/python3.11
cargo build --release --workspace --bins --locked
for bench in "${@:-notifier}"; do
  cargo bench --locked -p integration-tests --bench "$bench"
  # The decode-cost row of the listener's figures: allocations per attribute value.
  if [[ "$bench" == listener ]]; then
    cargo bench --locked -p ldap --bench decode
  fi
done
