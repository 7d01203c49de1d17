#!/usr/bin/env bash
# Installs what building and testing needs on Debian 12 (run as root): only the packages
# that are missing, and no upgrade of anything already installed. With everything present
# it does not run apt at all, so running it again changes nothing.
set -euo pipefail

# The README's package list (section "Two commands") is this list; a test keeps them equal.
packages=(
  slapd ldap-utils          # the real LDAP server every end-to-end test starts privately
  python3-ldap              # `import ldap` inside Python listener modules (Debian's python3.11)
  libldap2-dev libsasl2-dev # python-ldap headers, as on UCS
  libpython3.11-dev         # pyo3 links Debian's libpython3.11
  libssl-dev pkg-config     # ldap3's TLS (StartTLS to LDAP)
  build-essential ca-certificates
  systemd                   # systemd-analyze verify of the units (scripts/verify-units.sh)
  man-db                    # man -l renders the man pages (scripts/ci-package.sh)
  nats-server               # the nats module's tests start private JetStream servers
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [[ ${#missing[@]} -gt 0 ]]; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing packages (${missing[*]}); run as root or install them first" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -q
  # Only the missing ones, and --no-upgrade: an installed package (systemd, libc…) is never
  # upgraded as a side effect. Debian's slapd postinst starts a system instance; our tests
  # never use it.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-upgrade "${missing[@]}"
else
  echo "setup: all ${#packages[@]} packages present"
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install a Rust toolchain (rustup, Rust >= 1.95) first" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
