#!/usr/bin/env bash
# cargo deny (deny.toml): licences, bans (duplicate versions, wildcards) and sources of
# every dependency, and the RustSec advisories. The advisory database is a git repository
# on github.com; on a machine that cannot reach it the advisories are reported as not
# checked (loudly) instead of failing the whole check.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deny --version >/dev/null 2>&1; then
  cargo install --locked cargo-deny
fi
cargo deny --locked check bans licenses sources
if cargo deny --locked fetch db >/dev/null 2>&1; then
  cargo deny --locked check --disable-fetch advisories
else
  echo "cargo deny: ADVISORIES NOT CHECKED: the RustSec advisory database cannot be fetched from this machine" >&2
fi
