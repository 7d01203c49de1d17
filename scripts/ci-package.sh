#!/usr/bin/env bash
# CI after the test suite (as root, on a throwaway machine): builds the release package,
# installs it, runs --help and --version of every installed binary, checks their man pages
# (installed, found by man, rendered by man -l without warnings), verifies the installed
# units, runs the installed notifier and listener end to end against a private slapd (and
# the installed tools against them), then reinstalls and purges it to exercise the
# maintainer scripts.
# Prints how long each step took.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYO3_PYTHON=/usr/bin/python3.11
PACKAGE=univention-directory-rs

[[ $(id -u) -eq 0 ]] || {
  echo "ci-package: must run as root (installs the package)" >&2
  exit 1
}

# What postinst creates and purge keeps. Left behind on a developer's machine, a `listener`
# user would make the harness's listeners switch their effective uid (`--user listener` is
# the default) and break the next test run, so whatever did not exist before is removed.
STATE_DIRS=(/var/lib/univention-ldap /var/lib/univention-directory-listener
  /var/lib/univention-directory-replication)
had_user=0
getent passwd listener >/dev/null && had_user=1
absent_dirs=()
for dir in "${STATE_DIRS[@]}"; do [[ -e $dir ]] || absent_dirs+=("$dir"); done
package_was_installed=0
dpkg-query -W -f='${Status}' "$PACKAGE" 2>/dev/null | grep -q "install ok installed" &&
  package_was_installed=1

cleanup() {
  if [[ $package_was_installed -eq 0 ]]; then
    dpkg --purge "$PACKAGE" >/dev/null 2>&1 || true
  fi
  if [[ $had_user -eq 0 ]] && getent passwd listener >/dev/null; then
    userdel listener || true
  fi
  for dir in "${absent_dirs[@]}"; do rm -rf "$dir"; done
}
trap cleanup EXIT

timed() {
  local name=$1 start=$SECONDS
  shift
  echo "== $name"
  "$@"
  echo "== $name: $((SECONDS - start)) s"
}

build_package() {
  scripts/package.sh --require-all | tee target/ci-package.out
  deb=$(realpath "$(tail -n 1 target/ci-package.out)")
}

install_package() {
  # dpkg -i as an administrator would; should a Depends (from dpkg-shlibdeps) be missing,
  # apt completes the installation.
  dpkg -i "$deb" || DEBIAN_FRONTEND=noninteractive apt-get -f install -y -q
  dpkg-query -W -f='${Package} ${Version} ${Status}\n' "$PACKAGE"
}

check_binaries() {
  local bins count=0
  mapfile -t bins < <(dpkg -L "$PACKAGE" | grep '^/usr/sbin/')
  for bin in "${bins[@]}"; do
    "$bin" --help >/dev/null || {
      echo "ci-package: $bin --help failed" >&2
      return 1
    }
    count=$((count + 1))
  done
  echo "--help works for $count binaries: ${bins[*]##*/}"
  "/usr/share/$PACKAGE/openldap/apply.sh" --help >/dev/null || {
    echo "ci-package: the installed OpenLDAP kit's apply.sh --help failed" >&2
    return 1
  }
}

check_man_pages() {
  # Every binary has a page, installed by the package, that man finds and renders cleanly.
  local bins count=0 page err
  command -v man >/dev/null || {
    echo "ci-package: man is missing (scripts/setup.sh installs man-db)" >&2
    return 1
  }
  mapfile -t bins < <(dpkg -L "$PACKAGE" | grep '^/usr/sbin/')
  for bin in "${bins[@]}"; do
    name=${bin##*/}
    page=$(dpkg -L "$PACKAGE" | grep -E "^/usr/share/man/man[18]/$name\.[18]\.gz$") || {
      echo "ci-package: no man page for $name in the package" >&2
      return 1
    }
    [[ -f $page ]] || {
      echo "ci-package: $page is listed but not installed (a dpkg path-exclude for /usr/share/man?)" >&2
      return 1
    }
    [[ $(man -w "$name") == "$page" ]] || {
      echo "ci-package: man -w $name does not find $page" >&2
      return 1
    }
    err=$(MANWIDTH=80 man -l "$page" 2>&1 >/dev/null)
    [[ -z $err ]] || {
      echo "ci-package: man -l $page: $err" >&2
      return 1
    }
    MANWIDTH=80 man -l "$page" 2>/dev/null | grep -q "$name" || {
      echo "ci-package: man -l $page does not name $name" >&2
      return 1
    }
    "$bin" --version >/dev/null || {
      echo "ci-package: $bin --version failed" >&2
      return 1
    }
    count=$((count + 1))
  done
  echo "man pages and --version work for $count binaries"
}

check_postinst() {
  getent passwd listener
  [[ $(stat -c %U /var/lib/univention-directory-listener) == listener ]]
  [[ $(stat -c %a /var/lib/univention-directory-listener) == 700 ]]
  [[ -d /var/lib/univention-ldap/notify && -d /usr/lib/univention-directory-listener/system ]]
  grep -qx /etc/default/univention-directory-notifier /var/lib/dpkg/info/$PACKAGE.conffiles
}

run_installed() {
  # --workspace like scripts/test.sh: the same feature set, so nothing is rebuilt.
  UDR_BIN_DIR=/usr/sbin cargo nextest run --locked --workspace --run-ignored only \
    -E 'binary(installed_package)'
}

reinstall_and_purge() {
  # Upgrade path: postinst again with the user and directories already there.
  dpkg -i "$deb"
  dpkg --purge "$PACKAGE"
  ! dpkg-query -W -f='${Status}' "$PACKAGE" 2>/dev/null | grep -q "install ok installed"
  [[ ! -e /usr/sbin/univention-directory-notifier && ! -e /lib/systemd/system/univention-directory-listener.service ]]
}

total=$SECONDS
timed "build the release package" build_package
timed "install $deb" install_package
timed "--help of the installed binaries" check_binaries
timed "man pages and --version of the installed binaries" check_man_pages
timed "postinst: user, directories, conffiles" check_postinst
timed "systemd-analyze verify of the installed units" scripts/verify-units.sh --installed
timed "installed notifier + listener + tools against a private slapd" run_installed
timed "reinstall and purge" reinstall_and_purge
echo "ci-package: all steps passed in $((SECONDS - total)) s"
