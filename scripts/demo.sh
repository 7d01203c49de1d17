#!/usr/bin/env bash
# Builds the workspace and runs the demo: a private slapd, the notifier and the listener
# with the jsonl module, sample changes made with ldap-utils and the listener's handler
# calls printed as they arrive. `--once` exits after the sample changes; without it the
# stack keeps running for your own changes until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
# The embedded interpreter must be Debian's, so modules see Debian's python3-ldap.
export PYO3_PYTHON=/usr/bin/python3.11

cargo build --workspace --bins --locked
exec target/debug/univention-directory-demo "$@"
