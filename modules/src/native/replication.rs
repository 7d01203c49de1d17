//! `replication`: writes every change of the Primary into this host's own LDAP server, the
//! job of UCS's `replication.py` on Backup and Replica Directory Nodes (spec
//! replication.md §A), without its silent losses (§B):
//!
//! - binds to the local slapd as the update DN (`cn=update,<base>`) with the password from
//!   `rootpw.conf` (read at every connect, as root);
//! - a change is first written from the listener's old state without reading the local
//!   object: a modify asserting (RFC 4528) the old state's `entryCSN`, which every write of
//!   this module carries from the Primary, or an add when the listener knew no object. If
//!   that is refused, "old" is what the local slapd holds (a base read with `*` and `+`),
//!   so local writes (`univention-passwd` on a Replica) are tolerated; an add becomes a
//!   modify when the object exists, a modify replaces each changed attribute (compared as
//!   value sets) except `uniqueMember`, which gets a delete of the removed and an add of
//!   the new values;
//! - UCS's exclude list (ppolicy and overlay attributes), the `pwdAttribute` rewrite to
//!   `2.5.4.35` (ITS#4025) and `ldap/slave/filter` as the module filter;
//! - deletes of non-leaf objects remove the subtree deepest first;
//! - a move (the listener's `r` then `a`) is a modrdn with `deleteoldrdn` set when a value
//!   of the old RDN is no longer in the object; an object already at the target is written
//!   to the backup directory as LDIF and removed first. The `r` waits in memory for its `a`,
//!   which the listener hands over in the same transaction, so move state is part of the
//!   listener's atomic commit rather than files beside it;
//! - failures that may pass (server down, busy, timeouts, a failed bind) ask the listener to
//!   retry ([`ModuleError::transient`]): its id does not advance;
//! - every change the server refuses goes to the quarantine ([`super::quarantine`]) with the
//!   error and the change as LDIF; later changes of the same object (or below it) queue
//!   behind it in order, everything else goes on. The module is unhealthy while the
//!   quarantine is not empty; `ctrl module replication quarantine list|retry [ID]|skip ID`
//!   shows and resolves it. For UCS compatibility `fallback` (UCR
//!   `ldap/replication/fallback`) selects UCS's behaviour instead: `ldif` appends the
//!   refused change to `failed.ldif` (and, while that file exists, every later change, as
//!   UCS does), which pauses the listener until the operator replayed and removed it;
//!   `restart` asks the listener to exit without committing the transaction;
//! - `clean` + `initialize` (module re-initialisation) rebuild the directory: offline with
//!   `slapadd` when configured ([`offline`]), else online: everything below the base is
//!   removed and the listener's `n` calls add every object again;
//! - `cn=Subschema` (delivered when the Primary's schema id grows) becomes the local schema
//!   file, checked with `slaptest` before it replaces the live one ([`super::schema`]); a
//!   refused schema is reported as the module's problem and not installed.
//!
//! Settings come from UCR (`ldap/base`, `slapd/port`, `ldap/slave/filter`), then from the
//! config file of `replication=@FILE`: `uri` (default `ldap://127.0.0.1:<slapd/port>`, or an
//! `ldapi://` socket), `base`, `bind_dn` (default `cn=update,<base>`), `rootpw_file`
//! (default `/etc/ldap/rootpw.conf`), `state_dir` (the quarantine; default
//! `/var/lib/univention-directory-replication`), `backup_dir` (default
//! `/var/univention-backup/replication`), `exclude` (more attributes never written,
//! space-separated) and `timeout` (seconds per LDAP operation, default 60). Schema:
//! `schema_file` (default `/var/lib/univention-ldap/schema.conf`), `oid_skip` (OIDs never
//! written; default UCS's `/usr/share/univention-ldap/oid_skip` if present, else a list
//! built in), `slapd_conf` (the configuration checked with the new schema, default
//! `/etc/ldap/slapd.conf`), `slaptest` (default `/usr/sbin/slaptest`) and `slapd_restart`
//! (run by `sh -c` after a new schema went live, default `/etc/init.d/slapd restart`).
//! Fallback: `fallback` (`quarantine`, the default, `ldif` or `restart`; also from UCR
//! `ldap/replication/fallback`) and `failed_ldif` (default
//! `/var/lib/univention-directory-replication/failed.ldif`, the listener's default). The
//! offline initialisation's keys are listed in [`offline`].

mod offline;
mod pipeline;

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon::ucr::Ucr;
use ldap::dn::{Ava, depth, first_rdn, first_rdn_avas, parent, same_dn};
use ldap::endpoint::{Auth, Endpoint, Password, StartTls};
use ldap::search::{Lookup, read_entry, subtree_dns};
use ldap::write::{self, Change, ldif};
use ldap::{Ldap, LdapFailure, rc};

use super::quarantine::{Quarantine, Record, now};
use super::schema::{Outcome, SchemaSettings};
use super::{NativeError, config};
use crate::module::{Call, Command, Module, ModuleError, ModuleInfo, ModuleSource, REPLICATION};
use pipeline::{InFlight, WINDOW, WriteLog, relation_key};

pub(super) const DESCRIPTION: &str = "LDAP Replica Node replication";

/// UCS's exclusion list (2023): never written, never compared.
const EXCLUDED: &[&str] = &[
    "subschemaSubentry",
    "hasSubordinates",
    "entryDN",
    "authTimestamp",
    "pwdChangedTime",
    "pwdAccountLockedTime",
    "pwdFailureTime",
    "pwdHistory",
    "pwdGraceUseTime",
    "pwdReset",
    "pwdPolicySubentry",
];

/// The OID of `userPassword`, which ppolicy needs in `pwdAttribute` (ITS#4025).
const USER_PASSWORD_OID: &[u8] = b"2.5.4.35";

const SUBSCHEMA_DN: &str = "cn=Subschema";

pub(super) struct Settings {
    info: ModuleInfo,
    uri: String,
    base: Option<String>,
    bind_dn: Option<String>,
    rootpw_file: PathBuf,
    state_dir: PathBuf,
    backup_dir: PathBuf,
    exclude: Vec<String>,
    timeout: Duration,
    schema: SchemaSettings,
    fallback: Fallback,
    failed_ldif: PathBuf,
    offline: offline::OfflineSettings,
}

/// What becomes of a change the local server refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fallback {
    /// Held in the quarantine; everything else goes on (ours, the default).
    Quarantine,
    /// Appended to `failed.ldif`, which pauses the listener (UCS's default).
    Ldif,
    /// The listener exits without committing, to be restarted (UCS's `restart`).
    Restart,
}

impl Fallback {
    fn parse(value: &str) -> Result<Fallback, String> {
        match value.trim() {
            "quarantine" => Ok(Fallback::Quarantine),
            "ldif" => Ok(Fallback::Ldif),
            "restart" => Ok(Fallback::Restart),
            other => Err(format!(
                "fallback {other:?}: expected quarantine, ldif or restart"
            )),
        }
    }
}

impl Settings {
    /// `replication` alone: everything from UCR.
    pub(super) fn from_ucr(ucr: &Ucr) -> Settings {
        let port = ucr
            .get("slapd/port")
            .and_then(|ports| ports.split(',').next())
            .and_then(|p| p.trim().parse::<u16>().ok())
            .unwrap_or(7389);
        let info = ModuleInfo {
            name: REPLICATION.to_owned(),
            description: DESCRIPTION.to_owned(),
            filter: Some(
                ucr.get("ldap/slave/filter")
                    .unwrap_or("(objectClass=*)")
                    .to_owned(),
            ),
            attributes: Vec::new(),
            handle_every_delete: true,
            // LDAP moves a subtree in one modrdn: the container's move is all it takes.
            handle_subtree_moves: false,
            priority: 0.0,
            source: ModuleSource::Native(REPLICATION.to_owned()),
        };
        Settings {
            info,
            uri: format!("ldap://127.0.0.1:{port}/"),
            base: ucr.get("ldap/base").map(str::to_owned),
            bind_dn: None,
            rootpw_file: PathBuf::from("/etc/ldap/rootpw.conf"),
            state_dir: PathBuf::from("/var/lib/univention-directory-replication"),
            backup_dir: PathBuf::from("/var/univention-backup/replication"),
            exclude: Vec::new(),
            timeout: Duration::from_secs(60),
            schema: SchemaSettings::default(),
            fallback: ucr
                .get("ldap/replication/fallback")
                .and_then(|v| match Fallback::parse(v) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        tracing::warn!(
                            "replication: UCR ldap/replication/fallback: {e}; using quarantine"
                        );
                        None
                    }
                })
                .unwrap_or(Fallback::Quarantine),
            failed_ldif: PathBuf::from("/var/lib/univention-directory-replication/failed.ldif"),
            offline: offline::OfflineSettings::from_ucr(ucr),
        }
    }

    /// `replication=@CONFIG`: UCR, then the file.
    pub(super) fn from_config(path: &Path, ucr: &Ucr) -> Result<Settings, NativeError> {
        let mut settings = Settings::from_ucr(ucr);
        let mut info = settings.info.clone();
        config::read(path, &mut info, |key, value| {
            match key {
                "uri" => settings.uri = value.to_owned(),
                "base" => settings.base = Some(value.to_owned()),
                "bind_dn" => settings.bind_dn = Some(value.to_owned()),
                "rootpw_file" => settings.rootpw_file = PathBuf::from(value),
                "state_dir" => settings.state_dir = PathBuf::from(value),
                "backup_dir" => settings.backup_dir = PathBuf::from(value),
                "exclude" => {
                    settings.exclude = value.split_whitespace().map(str::to_owned).collect();
                }
                "schema_file" => settings.schema.file = PathBuf::from(value),
                "oid_skip" => settings.schema.oid_skip = Some(PathBuf::from(value)),
                "slapd_conf" => settings.schema.slapd_conf = PathBuf::from(value),
                "slaptest" => settings.schema.slaptest = PathBuf::from(value),
                "slapd_restart" => settings.schema.restart = value.to_owned(),
                "fallback" => settings.fallback = Fallback::parse(value)?,
                "failed_ldif" => settings.failed_ldif = PathBuf::from(value),
                "timeout" => {
                    settings.timeout = match value.parse::<u64>() {
                        Ok(secs) if secs > 0 => Duration::from_secs(secs),
                        _ => return Err(format!("{value:?} is not a positive number of seconds")),
                    }
                }
                other => return settings.offline.set(other, value),
            }
            Ok(true)
        })?;
        settings.info = info;
        Ok(settings)
    }
}

/// Why a change did not reach the local server.
enum Failure {
    /// Retry the transaction later.
    Transient(String),
    /// The server refused it: quarantine.
    Refused {
        operation: &'static str,
        error: String,
        ldif: String,
    },
}

use super::quarantine::Attrs;

/// The `r` of a move, waiting for its `a`.
#[derive(Debug, Clone)]
struct PendingMove {
    dn: String,
    uuid: Option<Vec<u8>>,
}

pub(super) struct Replication {
    settings: Settings,
    excluded: HashSet<String>,
    /// `basedn` from `setdata`, when neither UCR nor the config file named the base.
    setdata_base: Option<String>,
    ldap: Option<Ldap>,
    /// For calls made outside a multi-threaded runtime (tests, tools).
    runtime: Option<tokio::runtime::Runtime>,
    quarantine: Quarantine,
    pending_move: Option<PendingMove>,
    /// Why the last schema from the Primary was not installed.
    schema_problem: Option<String>,
    /// A new schema went live but the restart command has not succeeded yet.
    restart_pending: bool,
    /// The listener's account on the Primary (`setdata`), for the offline build.
    account: offline::Account,
    /// What `clean` decided for the next `initialize`.
    plan: Option<offline::Plan>,
    /// After an offline build: the objects whose `n` calls need no write.
    loaded: Option<offline::Loaded>,
    /// Writes sent (or to be sent again) whose result is not in yet, oldest first
    /// ([`pipeline`]).
    in_flight: VecDeque<InFlight>,
    /// `unconfirmed.log`: `in_flight` across a crash.
    log: WriteLog,
    /// Why the oldest write in flight could not be delivered, while it cannot.
    unavailable: Option<String>,
}

impl Replication {
    pub(super) fn new(settings: Settings) -> Result<Replication, NativeError> {
        daemon::fs::create_private_dir(&settings.state_dir).map_err(|source| {
            NativeError::Open {
                path: settings.state_dir.clone(),
                source,
            }
        })?;
        let quarantine =
            Quarantine::open(&settings.state_dir).map_err(|message| NativeError::Config {
                path: settings.state_dir.clone(),
                line: 0,
                message,
            })?;
        let (log, replay) =
            WriteLog::open(&settings.state_dir).map_err(|message| NativeError::Config {
                path: settings.state_dir.clone(),
                line: 0,
                message,
            })?;
        if !replay.is_empty() {
            tracing::warn!(
                "replication: {} change(s) sent before the last stop were never confirmed; \
                 applying them again before anything else",
                replay.len()
            );
        }
        let mut in_flight = VecDeque::with_capacity(replay.len());
        for r in replay {
            let new = r.new_state().map_err(|message| NativeError::Config {
                path: settings.state_dir.clone(),
                line: 0,
                message: format!("unconfirmed.log, transaction {}: {message}", r.id),
            })?;
            in_flight.push_back(InFlight::new(
                r.id,
                &r.dn,
                r.command,
                new,
                Attempt::ReadFirst,
            ));
        }
        let excluded = EXCLUDED
            .iter()
            .copied()
            .chain(settings.exclude.iter().map(String::as_str))
            .map(str::to_ascii_lowercase)
            .collect();
        Ok(Replication {
            settings,
            excluded,
            setdata_base: None,
            ldap: None,
            runtime: None,
            quarantine,
            pending_move: None,
            schema_problem: None,
            restart_pending: false,
            account: offline::Account::default(),
            plan: None,
            loaded: None,
            in_flight,
            log,
            unavailable: None,
        })
    }

    fn base(&self) -> Option<&str> {
        self.settings
            .base
            .as_deref()
            .or(self.setdata_base.as_deref())
    }

    /// Runs LDAP work to completion: on the daemon's runtime when called from its blocking
    /// section (`run_blocking`), else on a runtime of our own.
    fn block_on<T>(&mut self, fut: impl Future<Output = T>) -> Result<T, Failure> {
        if let Ok(handle) = tokio::runtime::Handle::try_current()
            && handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        {
            return Ok(handle.block_on(fut));
        }
        if self.runtime.is_none() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Failure::Transient(format!("cannot start a runtime: {e}")))?;
            self.runtime = Some(runtime);
        }
        match &self.runtime {
            Some(runtime) => Ok(runtime.block_on(fut)),
            None => Err(Failure::Transient("no runtime".into())),
        }
    }

    /// The connection, binding first if needed. Every failure here is transient: the
    /// server is down or the credentials are not (yet) right, which no change can fix.
    fn connection(&mut self) -> Result<Ldap, Failure> {
        if let Some(ldap) = &mut self.ldap
            && !ldap.is_closed()
        {
            return Ok(ldap.clone());
        }
        self.ldap = None;
        let Some(base) = self.base().map(str::to_owned) else {
            return Err(Failure::Transient(
                "no LDAP base: set ldap/base or `base` in the module config".into(),
            ));
        };
        let bind_dn = self
            .settings
            .bind_dn
            .clone()
            .unwrap_or_else(|| format!("cn=update,{base}"));
        let file = self.settings.rootpw_file.clone();
        let password = daemon::privileges::with_root(|| read_rootpw(&file))
            .map_err(|e| Failure::Transient(format!("{}: {e}", file.display())))?;
        let endpoint = Endpoint {
            uri: self.settings.uri.clone(),
            auth: Auth::Simple {
                dn: bind_dn,
                password: Password::Literal(password),
            },
            starttls: StartTls::Off,
            timeout: self.settings.timeout,
        };
        let ldap = self
            .block_on(ldap::connect(&endpoint))?
            .map_err(|e| Failure::Transient(e.to_string()))?;
        tracing::debug!("replication: connected to {}", endpoint.uri);
        self.ldap = Some(ldap.clone());
        Ok(ldap)
    }

    /// Runs one LDAP operation; a transient failure drops the connection.
    fn op<T, Fut>(
        &mut self,
        f: impl FnOnce(Ldap, Duration) -> Fut,
    ) -> Result<Result<T, LdapFailure>, Failure>
    where
        Fut: Future<Output = Result<T, LdapFailure>>,
    {
        let ldap = self.connection()?;
        let timeout = self.settings.timeout;
        match self.block_on(f(ldap, timeout))? {
            Err(e) if e.is_transient() => {
                self.ldap = None;
                Err(Failure::Transient(e.to_string()))
            }
            other => Ok(other),
        }
    }

    /// The local object, excluded attributes removed; `None` if it does not exist.
    fn read(&mut self, dn: &str) -> Result<Option<Attrs>, Failure> {
        let dn_owned = dn.to_owned();
        let lookup =
            self.op(
                |mut ldap, timeout| async move { read_entry(&mut ldap, &dn_owned, timeout).await },
            )?;
        match lookup {
            Ok(Lookup::Found(entry)) => Ok(Some(self.writable(&entry.attrs))),
            Ok(Lookup::Missing) => Ok(None),
            Err(e) => Err(refused("read", &e, String::new())),
        }
    }

    /// What of `attrs` is written: without excluded attributes, `pwdAttribute` rewritten.
    fn writable(&self, attrs: &[(String, Vec<Vec<u8>>)]) -> Attrs {
        writable_attrs(&self.excluded, attrs)
    }

    fn add(&mut self, dn: &str, attrs: &Attrs) -> Result<Result<(), LdapFailure>, Failure> {
        let dn_owned = dn.to_owned();
        let attrs_owned = attrs.clone();
        self.op(|mut ldap, timeout| async move {
            write::add(&mut ldap, &dn_owned, &attrs_owned, timeout).await
        })
    }

    fn modify(&mut self, dn: &str, changes: &[Change]) -> Result<(), Failure> {
        let dn_owned = dn.to_owned();
        let changes_owned = changes.to_vec();
        self.op(|mut ldap, timeout| async move {
            write::modify(&mut ldap, &dn_owned, &changes_owned, timeout).await
        })?
        .map_err(|e| refused("modify", &e, ldif::modify(dn, changes)))
    }

    /// A modify applied only if the local object's `entryCSN` is `csn`.
    fn modify_asserted(
        &mut self,
        dn: &str,
        changes: &[Change],
        csn: &str,
    ) -> Result<Result<(), LdapFailure>, Failure> {
        let (dn_owned, changes_owned, csn_owned) =
            (dn.to_owned(), changes.to_vec(), csn.to_owned());
        self.op(|mut ldap, timeout| async move {
            write::modify_if_equal(
                &mut ldap,
                &dn_owned,
                &changes_owned,
                ("entryCSN", &csn_owned),
                timeout,
            )
            .await
        })
    }

    /// `Ok` if the local object's `entryCSN` is `csn`.
    fn verify(&mut self, dn: &str, csn: &str) -> Result<Result<(), LdapFailure>, Failure> {
        let (dn_owned, csn_owned) = (dn.to_owned(), csn.to_owned());
        self.op(|mut ldap, timeout| async move {
            verified(
                &dn_owned,
                write::holds(&mut ldap, &dn_owned, ("entryCSN", &csn_owned), timeout).await,
            )
        })
    }

    fn delete_one(&mut self, dn: &str) -> Result<Result<(), LdapFailure>, Failure> {
        let dn_owned = dn.to_owned();
        self.op(
            |mut ldap, timeout| async move { write::delete(&mut ldap, &dn_owned, timeout).await },
        )
    }

    /// Deletes `dn` and, if it has children, its subtree deepest first.
    fn delete_recursive(&mut self, dn: &str) -> Result<(), Failure> {
        match self.delete_one(dn)? {
            Ok(()) => return Ok(()),
            Err(LdapFailure::Result {
                rc: rc::NO_SUCH_OBJECT,
                ..
            }) => return Ok(()),
            Err(LdapFailure::Result {
                rc: rc::NOT_ALLOWED_ON_NONLEAF,
                ..
            }) => {}
            Err(e) => return Err(refused("delete", &e, ldif::delete(dn))),
        }
        let dn_owned = dn.to_owned();
        let mut dns = self
            .op(|mut ldap, timeout| async move {
                subtree_dns(&mut ldap, &dn_owned, "(objectClass=*)", timeout).await
            })?
            .map_err(|e| refused("delete", &e, ldif::delete(dn)))?;
        // Deepest first, whatever order the server listed them in.
        dns.sort_by_key(|d| std::cmp::Reverse(depth(d)));
        tracing::info!(
            "replication: deleting {dn} with {} descendants",
            dns.len().saturating_sub(1)
        );
        for child in dns {
            match self.delete_one(&child)? {
                Ok(())
                | Err(LdapFailure::Result {
                    rc: rc::NO_SUCH_OBJECT,
                    ..
                }) => {}
                Err(e) => return Err(refused("delete", &e, ldif::delete(&child))),
            }
        }
        Ok(())
    }

    /// Writes `dn`'s local state as LDIF to the backup directory before it is replaced.
    fn backup(&mut self, dn: &str, attrs: &Attrs) -> Result<(), Failure> {
        let dir = self.settings.backup_dir.clone();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = dir.join(format!(
            "{}.{:09}",
            stamp / 1_000_000_000,
            stamp % 1_000_000_000
        ));
        let text = ldif::add(dn, attrs);
        daemon::fs::create_private_dir(&dir)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                daemon::fs::write_atomic(&path, text.as_bytes(), 0o600).map_err(|e| e.to_string())
            })
            // Without its backup the object is not replaced: retry later.
            .map_err(|e| Failure::Transient(format!("cannot back up {dn}: {e}")))?;
        tracing::warn!(
            "replication: {dn} is in the way; backed up to {}",
            path.display()
        );
        Ok(())
    }

    /// Makes the local object `dn` hold `new`; with `move_from`, the object is first
    /// renamed from there. `expected` is what the listener last handed over for `dn` (its
    /// cache's old state, writable part): when the local object provably still holds it,
    /// the write goes out without reading the object first ([`first_attempt`]).
    fn apply_update(
        &mut self,
        dn: &str,
        new: &Attrs,
        move_from: Option<&str>,
        expected: Option<&Attrs>,
    ) -> Result<(), Failure> {
        let moving = move_from.filter(|from| !same_dn(from, dn));
        if moving.is_none()
            && let Some(expected) = expected
        {
            // Any refusal of the shortcut (assertion failed, object present or missing,
            // anything else) leaves the object untouched: the full path below decides.
            let outcome = match first_attempt(expected, new) {
                Attempt::Add => Some(self.add(dn, new)?),
                Attempt::AssertedModify { changes, csn } => {
                    Some(self.modify_asserted(dn, &changes, &csn)?)
                }
                Attempt::Verify { csn } => Some(self.verify(dn, &csn)?),
                Attempt::ReadFirst | Attempt::Delete => None,
            };
            match outcome {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) => tracing::debug!(
                    "replication: {dn} is not as the listener last saw it ({e}); reading it"
                ),
                None => {}
            }
        }
        if let Some(from) = moving
            && let Some(source) = self.read(from)?
        {
            if let Some(target) = self.read(dn)? {
                self.backup(dn, &target)?;
                self.delete_recursive(dn)?;
            }
            self.rename(from, dn, &source, new)?;
        }
        match self.read(dn)? {
            Some(old) => {
                let changes = modlist(&old, new);
                if !changes.is_empty() {
                    self.modify(dn, &changes)?;
                }
                Ok(())
            }
            None => match self.add(dn, new)? {
                Ok(()) => Ok(()),
                // Someone else created it meanwhile: modify it instead.
                Err(LdapFailure::Result {
                    rc: rc::ALREADY_EXISTS,
                    ..
                }) => match self.read(dn)? {
                    Some(old) => self.modify(dn, &modlist(&old, new)),
                    None => Err(Failure::Transient(format!("{dn} exists and does not"))),
                },
                Err(e) => Err(refused("add", &e, ldif::add(dn, new))),
            },
        }
    }

    /// modrdn `from` → `to`; the old RDN's values go (`deleteoldrdn`) when `new` does not
    /// keep all of them.
    fn rename(&mut self, from: &str, to: &str, source: &Attrs, new: &Attrs) -> Result<(), Failure> {
        let new_rdn = first_rdn(to).to_owned();
        let delete_old = first_rdn_avas(from)
            .unwrap_or_default()
            .iter()
            .any(|ava| !holds(new, ava));
        let superior = match (parent(from), parent(to)) {
            (Some(a), Some(b)) if same_dn(a, b) => None,
            (_, b) => b.map(str::to_owned),
        };
        let record = ldif::rename(from, &new_rdn, delete_old, superior.as_deref());
        let (from_owned, rdn, sup) = (from.to_owned(), new_rdn.clone(), superior.clone());
        let result = self.op(|mut ldap, timeout| async move {
            write::rename(
                &mut ldap,
                &from_owned,
                &rdn,
                delete_old,
                sup.as_deref(),
                timeout,
            )
            .await
        })?;
        match result {
            Ok(()) => {
                tracing::debug!("replication: renamed {from} to {to}");
                Ok(())
            }
            Err(e) => {
                tracing::debug!(
                    "replication: rename of {from} ({} attributes) refused",
                    source.len()
                );
                Err(refused("modrdn", &e, record))
            }
        }
    }

    /// A pending `r` whose `a` never came (the object moved out of the filter): the old
    /// object goes.
    fn flush_pending(&mut self) -> Result<(), Failure> {
        if let Some(pending) = self.pending_move.take() {
            tracing::info!("replication: {} moved out of view; deleting it", pending.dn);
            if let Err(failure) = self.delete_recursive(&pending.dn) {
                self.pending_move = Some(pending);
                return Err(failure);
            }
        }
        Ok(())
    }

    fn quarantine(
        &mut self,
        call: &Call<'_>,
        new: &Attrs,
        move_from: Option<&str>,
        failure: (&str, String, String),
    ) -> Result<(), ModuleError> {
        let (operation, error, ldif) = failure;
        match self.settings.fallback {
            Fallback::Quarantine => {}
            Fallback::Ldif => return self.fall_back_to_ldif(call, operation, &error, &ldif),
            Fallback::Restart => return Err(fall_back_to_restart(call, operation, &error)),
        }
        self.quarantine_change(
            (call.id, call.dn, call.command.to_string()),
            new,
            move_from,
            (operation, error, ldif),
        )
    }

    /// Puts the change `(id, dn, command)` into the quarantine.
    fn quarantine_change(
        &mut self,
        (id, dn, command): (u64, &str, String),
        new: &Attrs,
        move_from: Option<&str>,
        (operation, error, ldif): (&str, String, String),
    ) -> Result<(), ModuleError> {
        tracing::error!(
            "replication: transaction {id} ({command} {dn}) quarantined: {operation} refused: \
             {error}"
        );
        self.quarantine.push(Record {
            id,
            dn: dn.to_owned(),
            command,
            operation: operation.to_owned(),
            error,
            ldif,
            at: now(),
            move_from: move_from.map(str::to_owned),
            new: Record::encode_state(new),
        })
    }

    fn list(&self) -> Result<String, ModuleError> {
        let shown: Vec<serde_json::Value> = self
            .quarantine
            .records()
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.id, "dn": r.dn, "command": r.command, "operation": r.operation,
                    "error": r.error, "at": r.at, "move_from": r.move_from, "ldif": r.ldif,
                })
            })
            .collect();
        serde_json::to_string(&shown).map_err(|e| ModuleError::new(e.to_string()))
    }

    /// Applies the quarantined changes again, in order (all, or record `only` and those
    /// queued behind it); what the server refuses again stays, with the new error.
    fn retry(&mut self, only: Option<u64>) -> Result<String, ModuleError> {
        let selected = |records: &[Record], r: &Record| match only {
            None => true,
            Some(id) => records
                .iter()
                .find(|x| x.id == id)
                .is_some_and(|x| x.id == r.id || x.blocks(&r.dn)),
        };
        let records = self.quarantine.records().to_vec();
        let mut kept: Vec<Record> = Vec::new();
        let mut applied = 0usize;
        let mut transient = None;
        for record in &records {
            let held = transient.is_some()
                || !selected(&records, record)
                || kept.iter().any(|k| {
                    k.blocks(&record.dn) || record.move_from.as_deref().is_some_and(|m| k.blocks(m))
                });
            if held {
                kept.push(record.clone());
                continue;
            }
            let new = record.new_state().map_err(ModuleError::new)?;
            let result = if new.is_empty() {
                self.delete_recursive(&record.dn)
            } else {
                let new = self.writable(&new);
                self.apply_update(&record.dn, &new, record.move_from.as_deref(), None)
            };
            match result {
                Ok(()) => {
                    tracing::info!(
                        "replication: quarantined transaction {} ({}) applied",
                        record.id,
                        record.dn
                    );
                    applied += 1;
                }
                Err(Failure::Refused {
                    operation,
                    error,
                    ldif,
                }) => {
                    kept.push(Record {
                        operation: operation.to_owned(),
                        error,
                        ldif,
                        at: now(),
                        ..record.clone()
                    });
                }
                Err(Failure::Transient(message)) => {
                    transient = Some(message);
                    kept.push(record.clone());
                }
            }
        }
        let left = kept.len();
        self.quarantine.replace(kept)?;
        match transient {
            Some(message) => Err(ModuleError::transient(format!(
                "{applied} applied, {left} still quarantined, stopped: {message}"
            ))),
            None => Ok(format!("{applied} applied, {left} still quarantined")),
        }
    }

    fn skip(&mut self, id: u64) -> Result<String, ModuleError> {
        let mut records = self.quarantine.records().to_vec();
        let before = records.len();
        records.retain(|r| r.id != id);
        if records.len() == before {
            return Err(ModuleError::new(format!("no quarantined transaction {id}")));
        }
        tracing::warn!("replication: quarantined transaction {id} skipped by the operator");
        self.quarantine.replace(records)?;
        Ok(format!(
            "transaction {id} skipped, {} still quarantined",
            self.quarantine.records().len()
        ))
    }

    /// One handler call; `Ok` also when the change went to the quarantine.
    fn handle(&mut self, call: &Call<'_>) -> Result<(), ModuleError> {
        if self.settings.fallback == Fallback::Ldif && self.settings.failed_ldif.exists() {
            return self.append_while_failed(call);
        }
        let transient = |failure: Failure| match failure {
            Failure::Transient(message) => Err(ModuleError::transient(message)),
            Failure::Refused {
                operation, error, ..
            } => Err(ModuleError::new(format!("{operation}: {error}"))),
        };
        // Earlier writes that are done (or failed) are settled first: one the server could
        // not take makes the listener wait here.
        self.collect_finished().map_err(ModuleError::transient)?;
        if call.new.is_empty() {
            if call.command != Command::ModRdn && self.pending_move.is_none() && self.can_pipeline()
            {
                // A delete: after what is in flight of the object or below it.
                self.collect_related(call.dn)
                    .map_err(ModuleError::transient)?;
                if let Some(blocker) = self.quarantine.blocker(call.dn, None).map(|b| b.id) {
                    return self.queue(call, &Vec::new(), None, blocker);
                }
                let entry = InFlight::new(
                    call.id,
                    call.dn,
                    call.command.to_string(),
                    Vec::new(),
                    Attempt::Delete,
                );
                return self.send(entry).map_err(ModuleError::transient);
            }
            self.settle().map_err(ModuleError::transient)?;
            // A stale `r` goes before anything else happens.
            if let Err(failure) = self.flush_pending() {
                return transient(failure);
            }
            if call.command == Command::ModRdn {
                self.pending_move = Some(PendingMove {
                    dn: call.dn.to_owned(),
                    uuid: uuid_of(call.old),
                });
                return Ok(());
            }
            if let Some(blocker) = self.quarantine.blocker(call.dn, None).map(|b| b.id) {
                return self.queue(call, &Vec::new(), None, blocker);
            }
            return match self.delete_recursive(call.dn) {
                Ok(()) => Ok(()),
                Err(Failure::Refused {
                    operation,
                    error,
                    ldif,
                }) => self.quarantine(call, &Vec::new(), None, (operation, error, ldif)),
                Err(failure) => transient(failure),
            };
        }
        if self.pending_move.is_none() && self.can_pipeline() {
            let new = self.writable(call.new);
            let attempt = first_attempt(&self.writable(call.old), &new);

            if attempt != Attempt::ReadFirst {
                self.collect_related(call.dn)
                    .map_err(ModuleError::transient)?;
                if let Some(blocker) = self.quarantine.blocker(call.dn, None).map(|b| b.id) {
                    return self.queue(call, &new, None, blocker);
                }
                let entry = InFlight::new(call.id, call.dn, call.command.to_string(), new, attempt);
                return self.send(entry).map_err(ModuleError::transient);
            }
        }
        self.settle().map_err(ModuleError::transient)?;
        let move_from = match self.pending_move.take() {
            Some(pending) if pending.uuid.is_none() || pending.uuid == uuid_of(call.new) => {
                Some(pending.dn)
            }
            Some(pending) => {
                self.pending_move = Some(pending);
                if let Err(failure) = self.flush_pending() {
                    return transient(failure);
                }
                None
            }
            None => None,
        };
        let new = self.writable(call.new);
        if let Some(blocker) = self
            .quarantine
            .blocker(call.dn, move_from.as_deref())
            .map(|b| b.id)
        {
            return self.queue(call, &new, move_from.as_deref(), blocker);
        }
        let expected = self.writable(call.old);
        match self.apply_update(call.dn, &new, move_from.as_deref(), Some(&expected)) {
            Ok(()) => Ok(()),
            Err(Failure::Refused {
                operation,
                error,
                ldif,
            }) => self.quarantine(call, &new, move_from.as_deref(), (operation, error, ldif)),
            Err(failure) => transient(failure),
        }
    }

    fn queue(
        &mut self,
        call: &Call<'_>,
        new: &Attrs,
        move_from: Option<&str>,
        blocker: u64,
    ) -> Result<(), ModuleError> {
        self.queue_change(
            (call.id, call.dn, call.command.to_string()),
            new,
            move_from,
            blocker,
        )
    }

    /// Puts the change `(id, dn, command)` into the quarantine behind `blocker`.
    fn queue_change(
        &mut self,
        (id, dn, command): (u64, &str, String),
        new: &Attrs,
        move_from: Option<&str>,
        blocker: u64,
    ) -> Result<(), ModuleError> {
        tracing::warn!(
            "replication: transaction {id} ({command} {dn}) queued behind quarantined \
             transaction {blocker}"
        );
        self.quarantine.push(Record {
            id,
            dn: dn.to_owned(),
            command,
            operation: "queued".into(),
            error: format!("waits behind quarantined transaction {blocker}"),
            ldif: String::new(),
            at: now(),
            move_from: move_from.map(str::to_owned),
            new: Record::encode_state(new),
        })
    }
}

/// Pipelined writes ([`pipeline`]).
impl Replication {
    /// Whether writes may stay in flight: results can be collected later only on the
    /// daemon's runtime, and UCS's fallbacks need the refusal while the call still runs.
    fn can_pipeline(&self) -> bool {
        self.settings.fallback == Fallback::Quarantine
            && tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
    }

    /// Logs `entry` and sends its write without waiting for the result.
    fn send(&mut self, mut entry: InFlight) -> Result<(), String> {
        while self.in_flight.len() >= WINDOW {
            self.collect_first()?;
        }
        let ldap = self.connection().map_err(failure_text)?;
        self.log
            .append(&entry.record())
            .map_err(|e| format!("cannot write {}: {e}", self.log.path().display()))?;
        let timeout = self.settings.timeout;
        let (dn, mut ldap) = (entry.dn.clone(), ldap);
        let task = match &entry.attempt {
            Attempt::Add => {
                let new = entry.new.clone();
                tokio::spawn(async move { write::add(&mut ldap, &dn, &new, timeout).await })
            }
            Attempt::AssertedModify { changes, csn } => {
                let (changes, csn) = (changes.clone(), csn.clone());
                tokio::spawn(async move {
                    write::modify_if_equal(&mut ldap, &dn, &changes, ("entryCSN", &csn), timeout)
                        .await
                })
            }
            Attempt::Verify { csn } => {
                let csn = csn.clone();
                tokio::spawn(async move {
                    verified(
                        &dn,
                        write::holds(&mut ldap, &dn, ("entryCSN", &csn), timeout).await,
                    )
                })
            }
            Attempt::Delete => tokio::spawn(async move {
                match write::delete(&mut ldap, &dn, timeout).await {
                    // Already gone: what the delete wanted.
                    Err(LdapFailure::Result {
                        rc: rc::NO_SUCH_OBJECT,
                        ..
                    }) => Ok(()),
                    other => other,
                }
            }),
            // Never sent blind: collected by the full path.
            Attempt::ReadFirst => {
                self.in_flight.push_back(entry);
                return Ok(());
            }
        };
        entry.result = Some(task);
        self.in_flight.push_back(entry);
        Ok(())
    }

    /// Collects the oldest write: its result, or (refused, never sent, or replayed from the
    /// log) the full path: read, compare, write, and the quarantine for what is refused.
    /// `Err` (transient): the write stays first in line, to be sent again.
    fn collect_first(&mut self) -> Result<(), String> {
        let Some(mut entry) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let sent = match entry.result.take() {
            Some(task) => match self.block_on(task) {
                Ok(Ok(result)) => Some(result),
                // The task did not finish (a panic in ldap3, or the runtime shutting down):
                // not known to be applied.
                Ok(Err(e)) => {
                    tracing::warn!("replication: write of {} lost its task: {e}", entry.dn);
                    None
                }
                Err(failure) => {
                    self.in_flight.push_front(entry);
                    return Err(failure_text(failure));
                }
            },
            None => None,
        };
        match sent {
            Some(Ok(())) => {
                self.unavailable = None;
                return Ok(());
            }
            Some(Err(e)) if e.is_transient() => {
                self.ldap = None;
                let message = e.to_string();
                self.in_flight.push_front(entry);
                self.unavailable = Some(message.clone());
                return Err(message);
            }
            Some(Err(e)) => tracing::debug!(
                "replication: {} is not as the listener last saw it ({e}); reading it",
                entry.dn
            ),
            None => {}
        }
        let known = |r: &Record| {
            r.id == entry.id && r.command == entry.command && same_dn(&r.dn, &entry.dn)
        };
        if self.quarantine.records().iter().any(known) {
            // Quarantined before a crash that left it in the log.
            return Ok(());
        }
        let change = (entry.id, entry.dn.as_str(), entry.command.clone());
        let outcome = match self.quarantine.blocker(&entry.dn, None).map(|b| b.id) {
            // Only a change replayed from the log can be older than what blocks it: results
            // are collected in order, so it was applied before the later one was refused.
            // Queued behind it, a retry would write its older state last.
            Some(blocker) if blocker > entry.id => {
                tracing::debug!(
                    "replication: transaction {} ({}) was applied before {blocker} was \
                     quarantined; not replayed",
                    entry.id,
                    entry.dn
                );
                Ok(())
            }
            Some(blocker) => self.queue_change(change, &entry.new, None, blocker),
            None => {
                let applied = if entry.new.is_empty() {
                    // A delete (an object with children, or replayed from the log).
                    self.delete_recursive(&entry.dn)
                } else {
                    self.apply_update(&entry.dn, &entry.new, None, None)
                };
                match applied {
                    Ok(()) => Ok(()),
                    Err(Failure::Refused {
                        operation,
                        error,
                        ldif,
                    }) => {
                        self.quarantine_change(change, &entry.new, None, (operation, error, ldif))
                    }
                    Err(Failure::Transient(message)) => Err(ModuleError::transient(message)),
                }
            }
        };
        match outcome {
            Ok(()) => {
                self.unavailable = None;
                Ok(())
            }
            Err(e) => {
                let message = e.message().to_owned();
                self.in_flight.push_front(entry);
                self.unavailable = Some(message.clone());
                Err(message)
            }
        }
    }

    /// Collects the writes at the front whose results are in (or that wait to be sent
    /// again), without waiting for any still running.
    fn collect_finished(&mut self) -> Result<(), String> {
        while self
            .in_flight
            .front()
            .is_some_and(|f| f.result.as_ref().is_none_or(|t| t.is_finished()))
        {
            self.collect_first()?;
        }
        Ok(())
    }

    /// Collects every write up to the last one `dn` depends on.
    fn collect_related(&mut self, dn: &str) -> Result<(), String> {
        let key = relation_key(dn);
        if let Some(last) = self.in_flight.iter().rposition(|f| f.related(&key)) {
            for _ in 0..=last {
                self.collect_first()?;
            }
        }
        Ok(())
    }

    fn collect_all(&mut self) -> Result<(), String> {
        while !self.in_flight.is_empty() {
            self.collect_first()?;
        }
        Ok(())
    }

    /// Before a write the log does not record (move, read-first update, schema, operator
    /// retry): everything earlier is applied, and the log is emptied, as
    /// replaying it after this write could undo it.
    fn settle(&mut self) -> Result<(), String> {
        self.collect_all()?;
        // Synced before the write it precedes: after a power loss a stale log would replay
        // older states over that write (a move's source added back, say).
        self.log
            .clear()
            .and_then(|()| self.log.sync())
            .map_err(|e| format!("cannot empty {}: {e}", self.log.path().display()))
    }
}

/// A compare's answer as a write's: `false` is a refusal that sends the change down the
/// full path.
fn verified(dn: &str, holds: Result<bool, LdapFailure>) -> Result<(), LdapFailure> {
    match holds {
        Ok(true) => Ok(()),
        Ok(false) => Err(LdapFailure::Result {
            what: format!("compare {dn}"),
            rc: rc::ASSERTION_FAILED,
            message: "the object is not as the listener last saw it".into(),
        }),
        Err(e) => Err(e),
    }
}

fn failure_text(failure: Failure) -> String {
    match failure {
        Failure::Transient(message) => message,
        Failure::Refused {
            operation, error, ..
        } => format!("{operation}: {error}"),
    }
}

/// Schema replication.
impl Replication {
    /// `cn=Subschema`: the Primary's schema becomes the local schema file if slapd accepts
    /// it, then slapd restarts. A schema that cannot be checked or is refused is reported
    /// (log, [`Module::problem`]) and not installed; replication goes on with the old one
    /// (changes that need the new schema are quarantined). Only a failed restart holds the
    /// listener: the call is repeated until slapd restarted.
    fn replicate_schema(&mut self, call: &Call<'_>) -> Result<(), ModuleError> {
        let schema = self.settings.schema.clone();
        let scratch = self.settings.state_dir.join("schema-check");
        let outcome = daemon::privileges::with_root(|| schema.update(call.new, &scratch));
        match outcome {
            Ok(Outcome::Unchanged) if !self.restart_pending => {
                tracing::debug!("replication: schema unchanged");
                self.schema_problem = None;
                return Ok(());
            }
            Ok(Outcome::Unchanged) => {}
            Ok(Outcome::Installed) => {
                tracing::info!(
                    "replication: new schema from the Primary checked and installed in {}",
                    schema.file.display()
                );
                self.schema_problem = None;
                self.restart_pending = true;
            }
            Ok(Outcome::Refused(reason)) | Err(reason) => {
                tracing::error!(
                    "replication: schema from the Primary not installed, {} unchanged: {reason}",
                    schema.file.display()
                );
                self.schema_problem = Some(format!("schema not installed: {reason}"));
                return Ok(());
            }
        }
        // The connection goes down with slapd.
        self.ldap = None;
        daemon::privileges::with_root(|| schema.restart_slapd()).map_err(|e| {
            ModuleError::transient(format!("restarting slapd for the new schema: {e}"))
        })?;
        self.restart_pending = false;
        tracing::info!("replication: slapd restarted with the new schema");
        Ok(())
    }
}

/// UCS's fallbacks for refused changes (`ldap/replication/fallback`).
impl Replication {
    /// `ldif`: the refused change goes to `failed.ldif`; the listener sees the file, does
    /// not commit the transaction and pauses until the operator replayed and removed it.
    fn fall_back_to_ldif(
        &mut self,
        call: &Call<'_>,
        operation: &str,
        error: &str,
        ldif: &str,
    ) -> Result<(), ModuleError> {
        tracing::error!(
            "replication: transaction {} ({} {}): {operation} refused: {error}; written to {}",
            call.id,
            call.command,
            call.dn,
            self.settings.failed_ldif.display()
        );
        self.append_failed_ldif(ldif)
    }

    /// While `failed.ldif` exists every change is appended to it instead of written, as
    /// UCS's module does (its state from the listener's cache, which is all it knows then).
    fn append_while_failed(&mut self, call: &Call<'_>) -> Result<(), ModuleError> {
        let new = self.writable(call.new);
        let old = self.writable(call.old);
        let record = if call.new.is_empty() {
            if call.command == Command::ModRdn {
                self.pending_move = Some(PendingMove {
                    dn: call.dn.to_owned(),
                    uuid: uuid_of(call.old),
                });
                return Ok(());
            }
            ldif::delete(call.dn)
        } else {
            let mut record = String::new();
            if let Some(from) = self.pending_move.take().map(|p| p.dn)
                && !same_dn(&from, call.dn)
            {
                let superior =
                    parent(call.dn).filter(|p| !parent(&from).is_some_and(|f| same_dn(f, p)));
                let delete_old = first_rdn_avas(&from)
                    .unwrap_or_default()
                    .iter()
                    .any(|ava| !holds(&new, ava));
                record = ldif::rename(&from, first_rdn(call.dn), delete_old, superior);
                record.push('\n');
            }
            if old.is_empty() {
                record.push_str(&ldif::add(call.dn, &new));
            } else {
                let changes = modlist(&old, &new);
                if changes.is_empty() {
                    return Ok(());
                }
                record.push_str(&ldif::modify(call.dn, &changes));
            }
            record
        };
        tracing::warn!(
            "replication: {} exists: transaction {} ({} {}) appended to it",
            self.settings.failed_ldif.display(),
            call.id,
            call.command,
            call.dn
        );
        self.append_failed_ldif(&record)
    }

    /// Appends `record` to `failed.ldif` (mode 0600: it holds password hashes), in UCS's
    /// layout: lines folded at 60 columns, a blank line after each record. Synced before
    /// the listener is told (UCS only flushes).
    fn append_failed_ldif(&self, record: &str) -> Result<(), ModuleError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = &self.settings.failed_ldif;
        let text = format!("{}\n", fold_ldif(record));
        daemon::privileges::with_root(|| {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()
        })
        // Not written means not recorded: the transaction is retried.
        .map_err(|e| ModuleError::transient(format!("cannot write {}: {e}", path.display())))
    }
}

/// `restart`: the listener exits without committing, like UCS's `sys.exit(1)`; the
/// transaction is processed again after the restart.
fn fall_back_to_restart(call: &Call<'_>, operation: &str, error: &str) -> ModuleError {
    let message = format!(
        "transaction {} ({} {}): {operation} refused: {error}; ldap/replication/fallback=restart",
        call.id, call.command, call.dn
    );
    tracing::error!("replication: {message}");
    ModuleError::exit_requested(1, message)
}

/// LDIF lines longer than 60 characters folded as UCS's writer does: 60 characters, then
/// continuation lines of a space and up to 60 more. Records are ASCII (other values are
/// base64), so cutting by bytes never splits a character.
fn fold_ldif(record: &str) -> String {
    const COLUMNS: usize = 60;
    let mut out = String::with_capacity(record.len() + record.len() / COLUMNS * 2);
    for line in record.lines() {
        if line.len() <= COLUMNS || !line.is_ascii() {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let (first, mut rest) = line.split_at(COLUMNS);
        out.push_str(first);
        out.push('\n');
        while !rest.is_empty() {
            let (chunk, more) = rest.split_at(rest.len().min(COLUMNS));
            out.push(' ');
            out.push_str(chunk);
            out.push('\n');
            rest = more;
        }
    }
    out
}

/// Module re-initialisation.
impl Replication {
    /// The online `clean`: every local object below the base is deleted (deepest first)
    /// and the quarantine emptied; the `n` calls add everything again.
    fn clean_online(&mut self) -> Result<(), ModuleError> {
        let Some(base) = self.base().map(str::to_owned) else {
            return Err(ModuleError::new("no LDAP base"));
        };
        let base_owned = base.clone();
        let dns = match self.op(|mut ldap, timeout| async move {
            subtree_dns(&mut ldap, &base_owned, "(objectClass=*)", timeout).await
        }) {
            Ok(Ok(dns)) => dns,
            Ok(Err(e)) => return Err(ModuleError::new(e.to_string())),
            Err(Failure::Transient(m) | Failure::Refused { error: m, .. }) => {
                return Err(ModuleError::new(m));
            }
        };
        let mut dns: Vec<String> = dns.into_iter().filter(|d| !same_dn(d, &base)).collect();
        dns.sort_by_key(|d| std::cmp::Reverse(depth(d)));
        tracing::info!(
            "replication: clean: removing {} local objects below {base}",
            dns.len()
        );
        for dn in dns {
            match self.delete_one(&dn) {
                Ok(Ok(())) => {}
                Ok(Err(LdapFailure::Result {
                    rc: rc::NO_SUCH_OBJECT,
                    ..
                })) => {}
                Ok(Err(e)) => return Err(ModuleError::new(e.to_string())),
                Err(Failure::Transient(m) | Failure::Refused { error: m, .. }) => {
                    return Err(ModuleError::new(m));
                }
            }
        }
        self.quarantine.replace(Vec::new())
    }
}

impl Module for Replication {
    fn info(&self) -> &ModuleInfo {
        &self.settings.info
    }

    fn handler(&mut self, call: &Call<'_>) -> Result<(), ModuleError> {
        if call.dn.eq_ignore_ascii_case(SUBSCHEMA_DN) {
            // slapd may restart: what is in flight goes first.
            self.settle().map_err(ModuleError::transient)?;
            return self.replicate_schema(call);
        }
        if self.already_loaded(call) {
            return Ok(());
        }
        // The listener repeats a transiently failed call in place (not the whole
        // transaction), so the `r` this call consumed must be there again for the retry:
        // without it the retried `a` adds the new DN and the old one stays. Repeating a
        // move is safe: a rename already done finds no source and goes on to the update.
        let pending = self.pending_move.clone();
        let result = self.handle(call);
        if result.as_ref().is_err_and(ModuleError::is_transient) {
            self.pending_move = pending;
        }
        result
    }

    fn postrun(&mut self) -> Result<(), ModuleError> {
        if let Err(e) = self.collect_all() {
            tracing::warn!(
                "replication: {} change(s) not confirmed by the local LDAP server yet, \
                 sent again with the next change: {e}",
                self.in_flight.len()
            );
        }
        // Idle: let the server close nothing under us; reconnect at the next change.
        self.ldap = None;
        self.loaded = None;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), ModuleError> {
        // Refusals reach the quarantine before the listener's commits become durable;
        // what the server could not take stays in the log, which is synced.
        if let Err(e) = self.collect_all() {
            tracing::warn!(
                "replication: {} change(s) not confirmed by the local LDAP server yet: {e}",
                self.in_flight.len()
            );
        }
        let path = self.log.path().display().to_string();
        if self.in_flight.is_empty() {
            self.log
                .clear()
                .map_err(|e| ModuleError::new(format!("cannot empty {path}: {e}")))?;
        }
        self.log
            .sync()
            .map_err(|e| ModuleError::new(format!("cannot sync {path}: {e}")))
    }

    fn confirm(&mut self) -> usize {
        if let Err(e) = self.collect_all() {
            tracing::warn!(
                "replication: the local LDAP server has not confirmed every change: {e}"
            );
        }
        self.in_flight.len()
    }

    fn unconfirmed(&self) -> usize {
        self.in_flight.len()
    }

    fn clean(&mut self) -> Result<(), ModuleError> {
        // Whatever was in flight is replaced by the rebuild.
        if let Err(e) = self.collect_all() {
            tracing::warn!("replication: clean: {e}; the rebuild replaces those changes");
        }
        self.in_flight.clear();
        self.log
            .clear()
            .map_err(|e| ModuleError::new(format!("{}: {e}", self.log.path().display())))?;
        self.pending_move = None;
        self.loaded = None;
        match self.plan_initialisation() {
            offline::Plan::Online => self.clean_online(),
            offline::Plan::Offline { .. } => self.quarantine.replace(Vec::new()),
        }
    }

    fn initialize(&mut self) -> Result<(), ModuleError> {
        self.initialize_replica()
    }

    fn setdata(&mut self, key: &str, value: &str) -> Result<(), ModuleError> {
        if key == "basedn" {
            self.setdata_base = Some(value.to_owned());
        }
        self.account.set(key, value);
        Ok(())
    }

    fn quarantined(&self) -> usize {
        self.quarantine.records().len()
    }

    fn problem(&self) -> Option<String> {
        let unconfirmed = self.unavailable.as_ref().map(|why| {
            format!(
                "{} change(s) not confirmed by the local LDAP server: {why}",
                self.in_flight.len()
            )
        });
        match (&self.schema_problem, unconfirmed) {
            (Some(schema), Some(writes)) => Some(format!("{schema}; {writes}")),
            (Some(schema), None) => Some(schema.clone()),
            (None, writes) => writes,
        }
    }

    fn control(&mut self, command: &[&str]) -> Result<String, ModuleError> {
        let id = |arg: &str| {
            arg.parse::<u64>()
                .map_err(|_| ModuleError::new(format!("{arg:?} is not a transaction id")))
        };
        if matches!(command.get(1), Some(&"retry" | &"skip")) {
            // A retry writes without the log, after what was sent earlier; and the log may
            // still hold a skipped change, which its replay at the next start would apply.
            self.settle().map_err(|e| {
                ModuleError::transient(format!(
                    "changes sent earlier are not confirmed by the local LDAP server: {e}"
                ))
            })?;
        }
        match command {
            ["quarantine"] | ["quarantine", "list"] => self.list(),
            ["quarantine", "retry"] => self.retry(None),
            ["quarantine", "retry", arg] => self.retry(Some(id(arg)?)),
            ["quarantine", "skip", arg] => self.skip(id(arg)?),
            _ => Err(ModuleError::new(format!(
                "unknown command {:?}; known: quarantine list, quarantine retry [ID], \
                 quarantine skip ID",
                command.join(" ")
            ))),
        }
    }
}

/// How a change of an object that does not move is first written, before (or instead of)
/// reading the local object.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Attempt {
    /// The listener knew no object: add it; if one is there after all, read it.
    Add,
    /// The modify from the listener's old state, applied only while the local object still
    /// carries the old state's `entryCSN`. Every write of this module carries the
    /// Primary's `entryCSN` and any other write gets a fresh one from the local slapd, so an
    /// equal CSN means the object holds exactly what this module wrote for that state.
    AssertedModify { changes: Vec<Change>, csn: String },
    /// Nothing changed as far as the listener knows (it read a later state at an earlier
    /// change): a compare of the old state's `entryCSN`. Equal means the object holds it;
    /// anything else (a local change got a fresh CSN) reads the object and repairs it.
    Verify { csn: String },
    /// Read the local object and write the difference (no CSN to assert).
    ReadFirst,
    /// A delete of one object (pipelined only): one with children is deleted with its
    /// subtree when its result is collected.
    Delete,
}

fn first_attempt(expected: &Attrs, new: &Attrs) -> Attempt {
    if expected.is_empty() {
        return Attempt::Add;
    }
    let csn = match expected
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("entryCSN"))
        .map(|(_, values)| values.as_slice())
    {
        Some([csn]) => match std::str::from_utf8(csn) {
            Ok(csn) if !csn.is_empty() => csn,
            _ => return Attempt::ReadFirst,
        },
        _ => return Attempt::ReadFirst,
    };
    let changes = modlist(expected, new);
    if changes.is_empty() {
        return Attempt::Verify {
            csn: csn.to_owned(),
        };
    }
    Attempt::AssertedModify {
        changes,
        csn: csn.to_owned(),
    }
}

fn refused(operation: &'static str, error: &LdapFailure, ldif: String) -> Failure {
    Failure::Refused {
        operation,
        error: error.to_string(),
        ldif,
    }
}

fn uuid_of(attrs: &[(String, Vec<Vec<u8>>)]) -> Option<Vec<u8>> {
    attrs
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("entryUUID"))
        .and_then(|(_, values)| values.first())
        .map(|v| v.to_ascii_lowercase())
}

/// Whether `attrs` hold the value of `ava` (attribute names compared without case).
fn holds(attrs: &Attrs, ava: &Ava) -> bool {
    attrs
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case(&ava.attr))
        .any(|(_, values)| values.contains(&ava.value))
}

/// The modify that turns `old` into `new` (both without excluded attributes): value sets
/// compared, so order is no change; new attributes added, vanished ones deleted, changed
/// ones replaced, except `uniqueMember`, whose removed and added values are sent as such
/// (large groups: a replace would rewrite every member).
pub(super) fn modlist(old: &Attrs, new: &Attrs) -> Vec<Change> {
    let find = |attrs: &'_ Attrs, name: &str| -> Option<HashSet<Vec<u8>>> {
        attrs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.iter().cloned().collect())
    };
    let mut changes = Vec::new();
    for (name, values) in new {
        let wanted: HashSet<Vec<u8>> = values.iter().cloned().collect();
        match find(old, name) {
            None => changes.push(Change::Add(name.clone(), values.clone())),
            Some(have) if have == wanted => {}
            Some(have) if name.eq_ignore_ascii_case("uniqueMember") => {
                let gone: Vec<Vec<u8>> = have.difference(&wanted).cloned().collect();
                let added: Vec<Vec<u8>> = values
                    .iter()
                    .filter(|v| !have.contains(*v))
                    .cloned()
                    .collect();
                if !gone.is_empty() {
                    changes.push(Change::Delete(name.clone(), gone));
                }
                if !added.is_empty() {
                    changes.push(Change::Add(name.clone(), added));
                }
            }
            Some(_) => changes.push(Change::Replace(name.clone(), values.clone())),
        }
    }
    for (name, _) in old {
        if find(new, name).is_none() {
            changes.push(Change::Delete(name.clone(), Vec::new()));
        }
    }
    // slapd stamps every modify that does not carry these itself (with the update DN and
    // its own clock): a write carries the Primary's, even unchanged ones.
    if !changes.is_empty() {
        for stamp in MODIFY_STAMPS {
            let named = |c: &Change| match c {
                Change::Add(n, _) | Change::Delete(n, _) | Change::Replace(n, _) => {
                    n.eq_ignore_ascii_case(stamp)
                }
            };
            if changes.iter().any(named) {
                continue;
            }
            if let Some((name, values)) = new.iter().find(|(n, _)| n.eq_ignore_ascii_case(stamp)) {
                changes.push(Change::Replace(name.clone(), values.clone()));
            }
        }
    }
    changes
}

/// What slapd sets on every modify unless the request does.
const MODIFY_STAMPS: [&str; 3] = ["entryCSN", "modifiersName", "modifyTimestamp"];

/// The password of `rootpw.conf`: `rootpw "<password>"` with `\"` and `\\` escaped, as
/// UCS writes it (and reads it: `^rootpw[ \t]+"((?:[^"\\]|\\["\\])+)"`).
pub(super) fn read_rootpw(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("rootpw") else {
            continue;
        };
        if !rest.starts_with([' ', '\t']) {
            continue;
        }
        let Some(quoted) = rest.trim_start_matches([' ', '\t']).strip_prefix('"') else {
            continue;
        };
        let mut password = String::new();
        let mut chars = quoted.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' if !password.is_empty() => return Ok(password),
                '"' => break,
                '\\' => match chars.next() {
                    Some(e @ ('"' | '\\')) => password.push(e),
                    _ => break,
                },
                c => password.push(c),
            }
        }
    }
    Err("no `rootpw \"…\"` line with a password".into())
}

/// What of `attrs` is written (online and offline): without the `excluded` attributes
/// (lower-cased names), `pwdAttribute` rewritten.
fn writable_attrs(excluded: &HashSet<String>, attrs: &[(String, Vec<Vec<u8>>)]) -> Attrs {
    attrs
        .iter()
        .filter(|(name, _)| !excluded.contains(&name.to_ascii_lowercase()))
        .map(|(name, values)| {
            let values = if name.eq_ignore_ascii_case("pwdAttribute") {
                values
                    .iter()
                    .map(|v| {
                        if v.as_slice() == b"userPassword" {
                            USER_PASSWORD_OID.to_vec()
                        } else {
                            v.clone()
                        }
                    })
                    .collect()
            } else {
                values.clone()
            };
            (name.clone(), values)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(list: &[(&str, &[&[u8]])]) -> Attrs {
        list.iter()
            .map(|(n, v)| ((*n).to_owned(), v.iter().map(|x| x.to_vec()).collect()))
            .collect()
    }

    #[test]
    fn the_first_write_skips_the_read_only_when_the_old_state_is_provable() {
        let csn: &[u8] = b"20261206170000.000001Z#000000#000#000000";
        let old = attrs(&[
            ("cn", &[b"a"]),
            ("description", &[b"old"]),
            ("entryCSN", &[csn]),
        ]);
        let new = attrs(&[
            ("cn", &[b"a"]),
            ("description", &[b"new"]),
            ("entryCSN", &[b"20261206170001.000001Z#000000#000#000000"]),
        ]);
        // Known old state with its CSN: the modify from it, asserting the CSN.
        assert_eq!(
            first_attempt(&old, &new),
            Attempt::AssertedModify {
                changes: modlist(&old, &new),
                csn: String::from_utf8_lossy(csn).into_owned(),
            }
        );
        // No old state: add.
        assert_eq!(first_attempt(&Attrs::new(), &new), Attempt::Add);
        // Nothing to assert (no CSN, several, empty or not text): read first.
        let without = attrs(&[("cn", &[b"a"]), ("description", &[b"old"])]);
        assert_eq!(first_attempt(&without, &new), Attempt::ReadFirst);
        let two = attrs(&[("cn", &[b"a"]), ("entryCSN", &[csn, csn])]);
        assert_eq!(first_attempt(&two, &new), Attempt::ReadFirst);
        let empty = attrs(&[("cn", &[b"a"]), ("entryCSN", &[b""])]);
        assert_eq!(first_attempt(&empty, &new), Attempt::ReadFirst);
        let binary = attrs(&[("cn", &[b"a"]), ("entryCSN", &[b"\xff"])]);
        assert_eq!(first_attempt(&binary, &new), Attempt::ReadFirst);
        // Unchanged as far as the listener knows: compare the CSN (a local change, with a
        // fresh CSN, is read and repaired).
        assert_eq!(
            first_attempt(&old, &old),
            Attempt::Verify {
                csn: String::from_utf8_lossy(csn).into_owned()
            }
        );
    }

    #[test]
    fn modlist_uses_sets_and_unique_member_deltas() {
        let old = attrs(&[
            ("cn", &[b"a", b"b"]),
            ("mail", &[b"x"]),
            ("uniqueMember", &[b"u1", b"u2", b"u3"]),
            ("sn", &[b"gone"]),
        ]);
        let new = attrs(&[
            ("cn", &[b"b", b"a"]),
            ("mail", &[b"y"]),
            ("uniqueMember", &[b"u1", b"u3", b"u4"]),
            ("jpegPhoto", &[b"\xff\xd8"]),
        ]);
        assert_eq!(
            modlist(&old, &new),
            vec![
                Change::Replace("mail".into(), vec![b"y".to_vec()]),
                Change::Delete("uniqueMember".into(), vec![b"u2".to_vec()]),
                Change::Add("uniqueMember".into(), vec![b"u4".to_vec()]),
                Change::Add("jpegPhoto".into(), vec![b"\xff\xd8".to_vec()]),
                Change::Delete("sn".into(), vec![]),
            ]
        );
        assert!(modlist(&new, &new).is_empty());
    }

    #[test]
    fn rootpw_as_ucs_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rootpw.conf");
        std::fs::write(&path, "# x\nrootpw \"a\\\"b\\\\c d\"\n").unwrap();
        assert_eq!(read_rootpw(&path).unwrap(), "a\"b\\c d");
        std::fs::write(&path, "rootpwx \"no\"\nrootpw\t\"\"\n").unwrap();
        assert!(read_rootpw(&path).is_err());
    }

    #[test]
    fn settings_from_ucr_and_file() {
        let ucr = Ucr::parse(
            "ldap/base: dc=x,dc=y\nslapd/port: 7389,389\nldap/slave/filter: (!(cn=secret))\n",
        );
        let settings = Settings::from_ucr(&ucr);
        assert_eq!(settings.uri, "ldap://127.0.0.1:7389/");
        assert_eq!(settings.info.filter.as_deref(), Some("(!(cn=secret))"));
        assert_eq!(settings.info.priority, 0.0);
        assert!(settings.info.handle_every_delete);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.conf");
        std::fs::write(
            &path,
            "uri = ldapi:///x\nexclude = memberOf  contextCSN\ntimeout = 5\n",
        )
        .unwrap();
        let settings = Settings::from_config(&path, &ucr).unwrap();
        assert_eq!(settings.uri, "ldapi:///x");
        assert_eq!(settings.exclude, vec!["memberOf", "contextCSN"]);
        assert_eq!(settings.timeout, Duration::from_secs(5));
        assert_eq!(settings.base.as_deref(), Some("dc=x,dc=y"));
        std::fs::write(&path, "timeout = 0\n").unwrap();
        assert!(Settings::from_config(&path, &ucr).is_err());
    }

    #[test]
    fn quarantine_list_and_skip_through_control() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::from_ucr(&Ucr::parse(""));
        settings.state_dir = dir.path().to_owned();
        let mut quarantine = Quarantine::open(dir.path()).unwrap();
        for (id, dn) in [(5, "cn=a,dc=x"), (6, "cn=b,cn=a,dc=x")] {
            quarantine
                .push(Record {
                    id,
                    dn: dn.into(),
                    command: "a".into(),
                    operation: "add".into(),
                    error: "refused".into(),
                    ldif: format!("dn: {dn}\nchangetype: add\n"),
                    at: 1,
                    move_from: None,
                    new: Vec::new(),
                })
                .unwrap();
        }
        let mut module = Replication::new(settings).unwrap();
        assert_eq!(module.quarantined(), 2);
        let list: Vec<serde_json::Value> =
            serde_json::from_str(&module.control(&["quarantine", "list"]).unwrap()).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[1]["dn"], "cn=b,cn=a,dc=x");
        assert_eq!(
            module.control(&["quarantine", "skip", "5"]).unwrap(),
            "transaction 5 skipped, 1 still quarantined"
        );
        assert!(module.control(&["quarantine", "skip", "5"]).is_err());
        assert!(module.control(&["quarantine", "skip", "x"]).is_err());
        assert!(module.control(&["bogus"]).is_err());
        // Durable: a new instance (a restart) sees the same quarantine.
        assert_eq!(Quarantine::open(dir.path()).unwrap().records().len(), 1);
    }

    fn refused(id: u64, dn: &str) -> Record {
        Record {
            id,
            dn: dn.into(),
            command: "m".into(),
            operation: "modify".into(),
            error: "refused".into(),
            ldif: String::new(),
            at: 1,
            move_from: None,
            new: Record::encode_state(&[("cn".into(), vec![b"x".to_vec()])]),
        }
    }

    /// Logs `id` for `dn` in the state directory, as a write sent before a crash.
    fn logged(dir: &std::path::Path, id: u64, dn: &str) {
        let (mut log, _) = WriteLog::open(dir).unwrap();
        let sent = InFlight::new(
            id,
            dn,
            "m".into(),
            vec![("cn".into(), vec![b"x".to_vec()])],
            Attempt::ReadFirst,
        );
        log.append(&sent.record()).unwrap();
    }

    #[test]
    fn a_replayed_change_older_than_its_blocker_is_not_queued_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::from_ucr(&Ucr::parse(""));
        settings.state_dir = dir.path().to_owned();
        // Applied, then a later change of the same object was refused; the crash came
        // before the log was emptied.
        logged(dir.path(), 5, "cn=a,dc=x");
        Quarantine::open(dir.path())
            .unwrap()
            .push(refused(6, "cn=a,dc=x"))
            .unwrap();
        let mut module = Replication::new(settings).unwrap();
        assert_eq!(module.unconfirmed(), 1);
        assert_eq!(module.confirm(), 0);
        let ids: Vec<u64> = module.quarantine.records().iter().map(|r| r.id).collect();
        assert_eq!(ids, [6], "a retry would write 5's older state after 6");
    }

    #[test]
    fn a_skipped_change_is_not_replayed_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let settings = || {
            let mut settings = Settings::from_ucr(&Ucr::parse(""));
            settings.state_dir = dir.path().to_owned();
            settings
        };
        // Sent, then refused twice: quarantined while the log still holds it (no flush
        // since, or one that could not empty the log during an outage).
        logged(dir.path(), 6, "cn=a,dc=x");
        Quarantine::open(dir.path())
            .unwrap()
            .push(refused(6, "cn=a,dc=x"))
            .unwrap();
        {
            let mut module = Replication::new(settings()).unwrap();
            assert_eq!(
                module.control(&["quarantine", "skip", "6"]).unwrap(),
                "transaction 6 skipped, 0 still quarantined"
            );
        }
        let module = Replication::new(settings()).unwrap();
        assert_eq!(
            module.unconfirmed(),
            0,
            "the skipped change would be applied"
        );
    }

    #[test]
    fn writable_drops_excluded_and_rewrites_pwd_attribute() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::from_ucr(&Ucr::parse(""));
        settings.state_dir = dir.path().to_owned();
        settings.exclude = vec!["memberOf".into()];
        let module = Replication::new(settings).unwrap();
        let got = module.writable(&attrs(&[
            ("cn", &[b"a"]),
            ("EntryDN", &[b"cn=a"]),
            ("pwdHistory", &[b"h"]),
            ("memberof", &[b"g"]),
            ("pwdAttribute", &[b"userPassword"]),
        ]));
        assert_eq!(
            got,
            attrs(&[("cn", &[b"a"]), ("pwdAttribute", &[b"2.5.4.35"])])
        );
    }

    #[test]
    fn while_failed_ldif_exists_every_change_is_appended_in_ucs_layout() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::from_ucr(&Ucr::parse("ldap/replication/fallback: ldif\n"));
        assert_eq!(settings.fallback, Fallback::Ldif);
        settings.state_dir = dir.path().join("state");
        settings.failed_ldif = dir.path().join("failed.ldif");
        // A refusal wrote the file: from now on nothing goes to LDAP (none is running).
        std::fs::write(
            &settings.failed_ldif,
            "dn: cn=first,dc=x\nchangetype: delete\n\n",
        )
        .unwrap();
        let mut module = Replication::new(settings).unwrap();
        let long = "x".repeat(150);
        let old = attrs(&[
            ("cn", &[b"a"]),
            ("description", &[b"old"]),
            ("entryUUID", &[b"u1"]),
        ]);
        let new = attrs(&[
            ("cn", &[b"a"]),
            ("description", &[long.as_bytes()]),
            ("entryUUID", &[b"u1"]),
        ]);
        fn call<'a>(dn: &'a str, command: Command, new: &'a Attrs, old: &'a Attrs) -> Call<'a> {
            Call {
                id: 7,
                dn,
                command,
                new,
                old,
                transaction: 7,
                number: 1,
            }
        }
        let (old, new, empty) = (&old, &new, &Attrs::new());
        module
            .handler(&call("cn=a,dc=x", Command::Modify, new, old))
            .unwrap();
        // A move: the `r` waits, its `a` becomes a modrdn (RDN kept) plus the modify.
        module
            .handler(&call("cn=a,dc=x", Command::ModRdn, empty, old))
            .unwrap();
        module
            .handler(&call("cn=a,ou=y,dc=x", Command::Add, new, old))
            .unwrap();
        module
            .handler(&call("cn=b,dc=x", Command::Delete, empty, old))
            .unwrap();
        let text = std::fs::read_to_string(dir.path().join("failed.ldif")).unwrap();
        let records: Vec<&str> = text.split("\n\n").filter(|r| !r.is_empty()).collect();
        assert_eq!(records.len(), 5, "{text}");
        assert!(
            records[1].starts_with("dn: cn=a,dc=x\nchangetype: modify\nreplace: description\n"),
            "{text}"
        );
        assert!(
            records[1].lines().all(|l| l.len() <= 61),
            "folded at 60: {text}"
        );
        assert!(records[1].lines().any(|l| l.starts_with(' ')), "{text}");
        assert_eq!(
            records[2],
            "dn: cn=a,dc=x\nchangetype: modrdn\nnewrdn: cn=a\ndeleteoldrdn: 0\nnewsuperior: ou=y,dc=x"
        );
        assert!(
            records[3].starts_with("dn: cn=a,ou=y,dc=x\nchangetype: modify\n"),
            "{text}"
        );
        assert_eq!(records[4], "dn: cn=b,dc=x\nchangetype: delete");
        assert!(text.ends_with("\n\n"));
    }
}
