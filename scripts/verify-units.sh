#!/usr/bin/env bash
# Checks the systemd units with `systemd-analyze verify`. Any message counts as a failure:
# verify exits 0 on an unknown or misspelt directive, which it only prints.
#
#   scripts/verify-units.sh [--bin-dir DIR]   the units in systemd/, before installation
#   scripts/verify-units.sh --installed       the installed units, as they are
#
# verify also checks that ExecStart's binary exists. Before installation the units are
# checked from a temporary copy whose /usr/sbin/ paths point at DIR (default target/debug);
# a temporary --root is not an option, as verify then resolves every unit and helper
# (sysinit.target, /bin/kill) inside it. The installed check covers the real paths.
set -euo pipefail
cd "$(dirname "$0")/.."

units=(univention-directory-notifier.service univention-directory-listener.service)
mode=repo
bin_dir="${CARGO_TARGET_DIR:-target}/debug"
while [[ $# -gt 0 ]]; do
  case $1 in
    --installed) mode=installed ;;
    --bin-dir)
      bin_dir=$2
      shift
      ;;
    *)
      echo "verify-units: unknown argument $1" >&2
      exit 2
      ;;
  esac
  shift
done

command -v systemd-analyze >/dev/null || {
  echo "verify-units: systemd-analyze is missing (package systemd)" >&2
  exit 1
}

files=()
if [[ $mode == installed ]]; then
  for unit in "${units[@]}"; do files+=("/lib/systemd/system/$unit"); done
else
  bin_dir=$(realpath "$bin_dir")
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  for unit in "${units[@]}"; do
    sed "s#/usr/sbin/#$bin_dir/#g" "systemd/$unit" >"$tmp/$unit"
    files+=("$tmp/$unit")
  done
fi

status=0
output=$(systemd-analyze verify "${files[@]}" 2>&1) || status=$?
if [[ $status -ne 0 || -n $output ]]; then
  echo "verify-units: systemd-analyze verify failed (exit $status):" >&2
  echo "$output" >&2
  exit 1
fi
echo "verify-units: ${units[*]} OK ($mode)"
