#!/usr/bin/env bash
# Builds the Debian package univention-directory-rs from the workspace with dpkg-deb (no
# cargo-deb: compiling it costs minutes of CI on 2 cores, and this is all it would do).
#
#   scripts/package.sh [--no-build] [--require-all] [--out DIR]
#
# The binaries are the workspace's [[bin]] targets (from `cargo metadata`, without the test
# crate), so a new tool is packaged as soon as it has a [[bin]] section. EXPECTED lists the
# full UCS set: one that is not a target yet is reported and left out, or is an error with
# --require-all. A target whose binary is missing after the build is always an error.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE=univention-directory-rs
# Packages whose binaries are not shipped.
SKIP_CRATES=(integration-tests)
# Everything a UCS host has in /usr/sbin from the two UCS packages.
EXPECTED=(
  univention-directory-notifier univention-translog
  univention-directory-listener univention-directory-listener-dump
  univention-directory-listener-verify univention-directory-listener-ctrl get_notifier_id
  univention-directory-backup2master
)

build=1
require_all=0
out=target/debian
while [[ $# -gt 0 ]]; do
  case $1 in
    --no-build) build=0 ;;
    --require-all) require_all=1 ;;
    --out)
      out=$2
      shift
      ;;
    -h | --help)
      sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "package: unknown argument $1" >&2
      exit 2
      ;;
  esac
  shift
done

die() {
  echo "package: error: $*" >&2
  exit 1
}

for tool in cargo dpkg-deb python3; do
  command -v "$tool" >/dev/null || die "$tool is missing (scripts/setup.sh installs what is needed)"
done
export PYO3_PYTHON=${PYO3_PYTHON:-/usr/bin/python3.11}

metadata=$(cargo metadata --no-deps --format-version 1 --locked)
# "<crate> <bin>" per [[bin]] target, then the workspace version on a line of its own.
read_metadata() {
  python3 -c '
import json, sys
skip = set(sys.argv[1].split())
meta = json.load(sys.stdin)
for pkg in meta["packages"]:
    if pkg["name"] in skip:
        continue
    for target in pkg["targets"]:
        if "bin" in target["kind"]:
            print(pkg["name"], target["name"])
' "${SKIP_CRATES[*]}" <<<"$metadata"
}
mapfile -t targets < <(read_metadata)
[[ ${#targets[@]} -gt 0 ]] || die "cargo metadata lists no [[bin]] targets"
version=$(python3 -c '
import json, sys
meta = json.load(sys.stdin)
print(next(p["version"] for p in meta["packages"] if p["name"] == "notifier"))' <<<"$metadata")

crates=()
bins=()
for line in "${targets[@]}"; do
  crates+=("${line%% *}")
  bins+=("${line#* }")
done
mapfile -t crates < <(printf '%s\n' "${crates[@]}" | sort -u)

missing_targets=()
for name in "${EXPECTED[@]}"; do
  printf '%s\n' "${bins[@]}" | grep -qx -- "$name" || missing_targets+=("$name")
done
if [[ ${#missing_targets[@]} -gt 0 ]]; then
  if [[ $require_all -eq 1 ]]; then
    die "not [[bin]] targets of this workspace: ${missing_targets[*]}"
  fi
  echo "package: warning: not [[bin]] targets of this workspace yet, left out: ${missing_targets[*]}" >&2
fi

if [[ $build -eq 1 ]]; then
  args=()
  for crate in "${crates[@]}"; do args+=(-p "$crate"); done
  cargo build --release --locked --bins "${args[@]}"
fi

release=target/release
absent=()
for name in "${bins[@]}"; do
  [[ -x $release/$name ]] || absent+=("$name")
done
[[ ${#absent[@]} -eq 0 ]] || die "binaries missing in $release (build them first or drop --no-build): ${absent[*]}"

arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
install -d "$root/DEBIAN" "$root/usr/sbin" "$root/lib/systemd/system" "$root/etc/default" \
  "$root/usr/lib/univention-directory-listener/system" "$root/usr/share/doc/$PACKAGE"

for name in "${bins[@]}"; do
  install -m 0755 "$release/$name" "$root/usr/sbin/$name"
done
# Man pages: each binary renders its own from its clap definition (daemon::man), with its
# section in the .TH line (8 for the daemons, 1 for the tools), dated like the last commit
# so that a rebuild of the same tree gives the same pages.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH
for name in "${bins[@]}"; do
  page=$("$release/$name" --print-man-page) || die "$name --print-man-page failed"
  section=$(sed -n 's/^\.TH [^ ]* \([0-9]\).*/\1/p' <<<"$page" | head -n 1)
  [[ -n $section ]] || die "the man page of $name has no .TH line with a section"
  install -d "$root/usr/share/man/man$section"
  # -n: no name or time stamp in the gzip header, so the package is reproducible.
  gzip -9n <<<"$page" >"$root/usr/share/man/man$section/$name.$section.gz"
  chmod 0644 "$root/usr/share/man/man$section/$name.$section.gz"
done
install -m 0644 systemd/*.service "$root/lib/systemd/system/"
install -m 0644 systemd/default/univention-directory-notifier \
  systemd/default/univention-directory-listener "$root/etc/default/"
# The Python compatibility packages (univention.*, listener), for module authors' tools and
# for modules that import them outside the daemon.
if [[ -d modules/src/python-lib ]]; then
  install -d "$root/usr/lib/univention-directory-listener/python-lib"
  cp -r modules/src/python-lib/. "$root/usr/lib/univention-directory-listener/python-lib/"
  find "$root/usr/lib/univention-directory-listener/python-lib" \
    \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +
  find "$root/usr/lib/univention-directory-listener/python-lib" -type d -exec chmod 0755 {} +
  find "$root/usr/lib/univention-directory-listener/python-lib" -type f -exec chmod 0644 {} +
fi
install -m 0644 README.md "$root/usr/share/doc/$PACKAGE/README.md"
# The OpenLDAP kit, so an operator who installed only the package can configure slapd.
install -d "$root/usr/share/$PACKAGE/openldap"
install -m 0755 kit/openldap/apply.sh "$root/usr/share/$PACKAGE/openldap/apply.sh"
install -m 0644 kit/openldap/slapd.conf.example "$root/usr/share/$PACKAGE/openldap/slapd.conf.example"
cat >"$root/usr/share/doc/$PACKAGE/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: univention-directory-rs
Comment: A Rust re-implementation of the Univention Directory Notifier and Listener.

Files: *
License: AGPL-3.0-only
 On Debian systems the license text is at https://www.gnu.org/licenses/agpl-3.0.txt
EOF

for script in postinst prerm postrm; do
  install -m 0755 "packaging/maint/$script" "$root/DEBIAN/$script"
done
printf '%s\n' /etc/default/univention-directory-notifier \
  /etc/default/univention-directory-listener >"$root/DEBIAN/conffiles"

# Shared-library dependencies of the binaries; dpkg-shlibdeps wants a debian/control.
depends=
shlib_dir=$stage/shlibs
install -d "$shlib_dir/debian"
printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$PACKAGE" "$PACKAGE" >"$shlib_dir/debian/control"
if command -v dpkg-shlibdeps >/dev/null &&
  shlibs=$(cd "$shlib_dir" && dpkg-shlibdeps -O "${bins[@]/#/$root/usr/sbin/}" 2>"$stage/shlibdeps.err"); then
  depends=${shlibs#shlibs:Depends=}
else
  echo "package: warning: dpkg-shlibdeps failed, using a fixed dependency list:" >&2
  cat "$stage/shlibdeps.err" >&2 2>/dev/null || true
  depends="libc6 (>= 2.36), libgcc-s1, libssl3, libpython3.11"
fi
depends="$depends, passwd"

installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: $PACKAGE
Version: $version
Architecture: $arch
Maintainer: univention-directory-rs developers <noreply@example.invalid>
Installed-Size: $installed_size
Depends: $depends
Recommends: python3-ldap, slapd, ldap-utils
Conflicts: univention-directory-notifier, univention-directory-listener
Replaces: univention-directory-notifier, univention-directory-listener
Provides: univention-directory-notifier, univention-directory-listener
Section: net
Priority: optional
Homepage: https://example.invalid/univention-directory-rs
Description: Univention directory notifier and listener, in Rust
 A drop-in replacement for the UCS replication daemons: the notifier numbers
 every LDAP write as a transaction and serves the ids on TCP 6669, and the
 listener follows them and calls handler modules (Python or native). Also
 runs on stock OpenLDAP by following cn=accesslog.
 .
 Services are installed but neither enabled nor started; see
 /usr/share/doc/$PACKAGE/README.md.
EOF

(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
  xargs -0 md5sum >DEBIAN/md5sums)

mkdir -p "$out"
deb=$out/${PACKAGE}_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz -z6 --build "$root" "$deb" >/dev/null
echo "$deb"
