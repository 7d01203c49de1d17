#!/usr/bin/env bash
# Configures a running slapd with cn=config (Debian's default) for the notifier and the
# listener, over ldapi as root (SASL EXTERNAL):
#
#   - loads the accesslog and syncprov modules;
#   - adds the cn=accesslog database (with syncprov, so the notifier can follow it, and
#     unlimited searches for root, the notifier's identity over ldapi);
#   - adds the accesslog overlay to the main database (logops writes, logsuccess TRUE);
#   - adds the cn=translog database, written by root over ldapi, readable by bound users;
#   - adds entryUUID and entryCSN equality indexes to the main database;
#   - with --listener-dn: lets the listener's bind account read the whole main database
#     (userPassword included) without search limits; with --hide: hides a subtree from it
#     (selective replication).
#
#   kit/openldap/apply.sh [--uri URI] [--suffix DN] [--listener-dn DN] [--hide DN]...
#                         [--db-dir DIR] [--dry-run]
#
#   --uri URI          ldapi URI of slapd [$SLAPD_URI, default ldapi:/// (Debian's socket)]
#   --suffix DN        the main database [$SLAPD_SUFFIX, default: the only one there is]
#   --listener-dn DN   the listener's bind account [$UDL_LISTENER_DN]
#   --hide DN          a subtree the listener must not see (repeatable; needs --listener-dn)
#   --db-dir DIR       where the new databases go, as DIR/accesslog and DIR/translog
#                      [default: the main database's directory; owner and mode copied]
#   --dry-run          print the LDIF instead of applying it
#
# Idempotent: it only adds what is missing and prints each step as "added" or "present".
# It never removes or replaces anything: a setting that exists but differs from what the
# notifier needs (e.g. an accesslog overlay logging elsewhere) is reported and left alone
# (exit 1), so running it cannot undo an administrator's configuration.
# Exit status: 0 configured (or already was), 1 a conflicting setting, 2 usage or LDAP error.
set -euo pipefail

ROOT_DN="gidNumber=0+uidNumber=0,cn=peercred,cn=external,cn=auth"
ACCESSLOG=cn=accesslog
TRANSLOG=cn=translog

uri=${SLAPD_URI:-ldapi:///}
suffix=${SLAPD_SUFFIX:-}
listener_dn=${UDL_LISTENER_DN:-}
db_dir=
dry_run=0
hide=()

usage() {
  sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --uri) uri=${2:?--uri needs a value}; shift ;;
    --suffix) suffix=${2:?--suffix needs a value}; shift ;;
    --listener-dn) listener_dn=${2:?--listener-dn needs a value}; shift ;;
    --hide) hide+=("${2:?--hide needs a value}"); shift ;;
    --db-dir) db_dir=${2:?--db-dir needs a value}; shift ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "apply: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

die() {
  echo "apply: error: $*" >&2
  exit 2
}
[[ ${#hide[@]} -eq 0 || -n $listener_dn ]] ||
  die "--hide needs --listener-dn (the account the subtree is hidden from)"
for tool in ldapsearch ldapmodify; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install ldap-utils)"
done

# cn=config as LDIF, one line per value (no wrapping).
search() {
  ldapsearch -LLL -Q -Y EXTERNAL -H "$uri" -o ldif-wrap=no "$@"
}
# The values of attribute $1 in the LDIF on stdin (plain values: everything here is ASCII).
values() {
  sed -n "s/^$1: //Ip"
}
dns() {
  sed -n 's/^dn: //p'
}

changes=0
# Applies the LDIF on stdin (or prints it with --dry-run) and reports step $1 as added.
apply_ldif() {
  local what=$1 ldif
  ldif=$(cat)
  changes=$((changes + 1))
  if [[ $dry_run -eq 1 ]]; then
    echo "apply: $what: would add"
    printf '%s\n\n' "$ldif"
    return
  fi
  if ! ldapmodify -Q -Y EXTERNAL -H "$uri" <<<"$ldif" >/dev/null; then
    printf '%s\n' "$ldif" >&2
    die "$what: ldapmodify failed on the LDIF above"
  fi
  echo "apply: $what: added"
}
present() {
  echo "apply: $1: present"
}
conflict=0
conflicting() {
  echo "apply: $1: CONFLICT, left unchanged: $2" >&2
  conflict=1
}
# An ACL or limit as slapd shows it, for comparison: without its {n} index, lower case,
# single spaces, no quotes, dn.exact spelled dn.base (slapd's canonical name).
normalize() {
  sed -e 's/^{[0-9]*}//' -e 's/"//g' -e 's/dn\.exact=/dn.base=/g' -e 's/[[:space:]]\+/ /g' \
    -e 's/, */,/g' | tr '[:upper:]' '[:lower:]'
}

search -b cn=config -s base dn >/dev/null ||
  die "cannot read cn=config over $uri as root (SASL EXTERNAL); run as root on the slapd host"

# The main database.
if [[ -z $suffix ]]; then
  mapfile -t suffixes < <(search -b cn=config -s one \
    "(&(olcSuffix=*)(!(olcSuffix=$ACCESSLOG))(!(olcSuffix=$TRANSLOG)))" olcSuffix |
    values olcSuffix)
  [[ ${#suffixes[@]} -eq 1 ]] ||
    die "found ${#suffixes[@]} databases (${suffixes[*]:-none}); name one with --suffix"
  suffix=${suffixes[0]}
fi
main_db=$(search -b cn=config -s one "(olcSuffix=$suffix)" dn | dns)
[[ -n $main_db ]] || die "no database with suffix $suffix"
main_entry=$(search -b "$main_db" -s base)
grep -qix 'objectClass: olcMdbConfig' <<<"$main_entry" ||
  die "$main_db is not an mdb database (the kit configures mdb)"
main_dir=$(values olcDbDirectory <<<"$main_entry")
db_dir=${db_dir:-$main_dir}
echo "apply: main database $main_db ($suffix in $main_dir)"

# A database directory like the main one (owner, group, mode): Debian's slapd runs as
# openldap and the AppArmor profile allows the main directory's subtree.
make_db_dir() {
  local dir=$1
  [[ $dry_run -eq 1 || -d $dir ]] && return
  install -d -o "$(stat -c %u "$main_dir")" -g "$(stat -c %g "$main_dir")" \
    -m "$(stat -c %a "$main_dir")" "$dir"
}
database_dn() {
  search -b cn=config -s one "(olcSuffix=$1)" dn | dns
}

# Modules (a slapd with them built in has no module list naming them: nothing to load).
modules=$(search -b cn=config -s one '(objectClass=olcModuleList)' olcModuleLoad)
module_list=$(dns <<<"$modules" | head -n 1)
for module in accesslog syncprov; do
  if values olcModuleLoad <<<"$modules" |
    grep -Eq "^(\{[0-9]+\})?(.*/)?$module(\.la|\.so.*|-[0-9.]+\.so.*)?$"; then
    present "module $module"
  elif [[ -n $module_list ]]; then
    apply_ldif "module $module" <<LDIF
dn: $module_list
changetype: modify
add: olcModuleLoad
olcModuleLoad: $module
LDIF
  else
    apply_ldif "module $module" <<LDIF
dn: cn=module,cn=config
changetype: add
objectClass: olcModuleList
cn: module
olcModulePath: /usr/lib/ldap
olcModuleLoad: $module
LDIF
    module_list=$(search -b cn=config -s one '(objectClass=olcModuleList)' dn | dns | head -n 1)
  fi
done

# cn=accesslog: the change feed the notifier follows with syncrepl (hence syncprov). Root,
# the notifier's identity over ldapi, reads it without search limits.
accesslog_db=$(database_dn "$ACCESSLOG")
if [[ -n $accesslog_db ]]; then
  present "database $ACCESSLOG ($accesslog_db)"
else
  make_db_dir "$db_dir/accesslog"
  apply_ldif "database $ACCESSLOG" <<LDIF
dn: olcDatabase=mdb,cn=config
changetype: add
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: mdb
olcSuffix: $ACCESSLOG
olcRootDN: $ACCESSLOG
olcDbDirectory: $db_dir/accesslog
olcDbMaxSize: 1073741824
olcDbIndex: default eq
olcDbIndex: entryCSN,objectClass,reqEnd,reqResult,reqStart,reqDN eq
olcAccess: to * by dn.exact="$ROOT_DN" read by * none
olcLimits: dn.exact="$ROOT_DN" time=unlimited size=unlimited
LDIF
  accesslog_db=$(database_dn "$ACCESSLOG")
  # A dry run added nothing: show where the overlay would go.
  accesslog_db=${accesslog_db:-"olcDatabase={N}mdb,cn=config"}
fi
if [[ $accesslog_db != *'{N}'* &&
  -n $(search -b "$accesslog_db" -s one '(objectClass=olcSyncProvConfig)' dn | dns) ]]; then
  present "syncprov on $ACCESSLOG"
else
  apply_ldif "syncprov on $ACCESSLOG" <<LDIF
dn: olcOverlay=syncprov,$accesslog_db
changetype: add
objectClass: olcOverlayConfig
objectClass: olcSyncProvConfig
olcOverlay: syncprov
olcSpNoPresent: TRUE
olcSpReloadHint: TRUE
LDIF
fi

# The accesslog overlay on the main database: every successful write is logged.
overlay=$(search -b "$main_db" -s one '(objectClass=olcAccessLogConfig)')
if [[ -z $overlay ]]; then
  apply_ldif "accesslog overlay on $suffix" <<LDIF
dn: olcOverlay=accesslog,$main_db
changetype: add
objectClass: olcOverlayConfig
objectClass: olcAccessLogConfig
olcOverlay: accesslog
olcAccessLogDB: $ACCESSLOG
olcAccessLogOps: writes
olcAccessLogSuccess: TRUE
olcAccessLogPurge: 07+00:00 01+00:00
LDIF
else
  logdb=$(values olcAccessLogDB <<<"$overlay")
  ops=$(values olcAccessLogOps <<<"$overlay" | tr '[:upper:]' '[:lower:]' | tr '\n' ' ')
  success=$(values olcAccessLogSuccess <<<"$overlay")
  problems=()
  [[ ${logdb,,} == "$ACCESSLOG" ]] || problems+=("it logs to '$logdb', not $ACCESSLOG;")
  for op in add delete modify modrdn; do
    if ! [[ " $ops" =~ \ (all|writes|$op)\  ]]; then
      problems+=("olcAccessLogOps '${ops% }' does not log $op;")
    fi
  done
  [[ ${success^^} == TRUE ]] || problems+=("olcAccessLogSuccess is not TRUE;")
  if [[ ${#problems[@]} -eq 0 ]]; then
    present "accesslog overlay on $suffix"
  else
    conflicting "accesslog overlay on $suffix" "${problems[*]}"
  fi
fi

# cn=translog: reqSession=<id> entries, written by the notifier (root over ldapi) and read
# by protocol-3 listeners. nosync as on UCS: the notifier's fsynced log is the truth and
# `univention-translog import` rebuilds this database.
translog_db=$(database_dn "$TRANSLOG")
if [[ -n $translog_db ]]; then
  present "database $TRANSLOG ($translog_db)"
else
  make_db_dir "$db_dir/translog"
  apply_ldif "database $TRANSLOG" <<LDIF
dn: olcDatabase=mdb,cn=config
changetype: add
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: mdb
olcSuffix: $TRANSLOG
olcRootDN: $ROOT_DN
olcDbDirectory: $db_dir/translog
olcDbMaxSize: 1073741824
olcDbNoSync: TRUE
olcDbIndex: objectClass,reqSession eq
olcAccess: to * by dn.exact="$ROOT_DN" write by users read by * none
LDIF
fi

# Equality indexes for the listener's lookups by entryUUID and for entryCSN.
indexes=$(values olcDbIndex <<<"$main_entry" | tr '[:upper:]' '[:lower:]')
for attr in entryUUID entryCSN; do
  if grep -Eq "(^|,)${attr,,}(,| )" <<<"$indexes"; then
    present "index $attr on $suffix"
  else
    apply_ldif "index $attr on $suffix" <<LDIF
dn: $main_db
changetype: modify
add: olcDbIndex
olcDbIndex: $attr eq
LDIF
  fi
done

# The listener's account reads everything (userPassword too: a replica needs it) without
# search limits (a module's first load reads every object). The ACLs go in front of the
# existing ones and end in "by * break", so nobody else's access changes.
if [[ -n $listener_dn ]]; then
  acls=$(values olcAccess <<<"$main_entry" | normalize)
  add_acl() {
    local what=$1 acl=$2
    if grep -qxF "$(normalize <<<"$acl")" <<<"$acls"; then
      present "$what"
    else
      apply_ldif "$what" <<LDIF
dn: $main_db
changetype: modify
add: olcAccess
olcAccess: {0}$acl
LDIF
    fi
  }
  add_acl "read access for $listener_dn" "to * by dn.exact=\"$listener_dn\" read by * break"
  # Each hidden subtree goes in front of the read access above.
  for subtree in "${hide[@]}"; do
    add_acl "$subtree hidden from $listener_dn" \
      "to dn.subtree=\"$subtree\" by dn.exact=\"$listener_dn\" none by * break"
  done
  limit="dn.exact=\"$listener_dn\" time=unlimited size=unlimited"
  if values olcLimits <<<"$main_entry" | normalize | grep -qxF "$(normalize <<<"$limit")"; then
    present "no search limits for $listener_dn"
  else
    apply_ldif "no search limits for $listener_dn" <<LDIF
dn: $main_db
changetype: modify
add: olcLimits
olcLimits: $limit
LDIF
  fi
fi

if [[ $conflict -ne 0 ]]; then
  echo "apply: resolve the conflicts above by hand; none of them was changed" >&2
  exit 1
fi
if [[ $dry_run -eq 1 ]]; then
  echo "apply: dry run: $changes change(s) not applied"
elif [[ $changes -eq 0 ]]; then
  echo "apply: nothing to do, slapd is configured"
else
  echo "apply: $changes change(s) applied"
fi
