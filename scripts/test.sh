#!/usr/bin/env bash
# Sets everything up and runs every check and test of the workspace: formatting, clippy,
# unit tests, and the end-to-end tests that start private slapd instances and the real
# binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
# The embedded interpreter must be Debian's, so modules see Debian's python3-ldap.
export PYO3_PYTHON=/usr/bin/python3.11

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# End-to-end tests start the real binaries from target/debug.
cargo build --workspace --bins --locked
# systemd-analyze verify of systemd/*.service (ExecStart pointed at target/debug).
scripts/verify-units.sh
# CI gives the decoder's mutation test (ldap/tests/fuzz_decode.rs) a minute; 5 s otherwise.
if [[ "${CI:-}" == "true" ]]; then
  export UDR_FUZZ_SECONDS="${UDR_FUZZ_SECONDS:-60}"
fi
cargo nextest run --workspace --locked --no-fail-fast "$@"
