//! The offline initial build (module re-initialisation without one LDAP add per object):
//! with the local slapd stopped, the Primary's objects are streamed as LDIF into
//! `slapadd -q`, the database file is synced, slapd is started again and the listener goes
//! on from its id.
//!
//! - The objects come from one paged search of the Primary as the listener's account (the
//!   `setdata` bind DN and password), with the module's filter and `*` + `+`, converted by
//!   the online path's [`writable_attrs`] (exclusions, `pwdAttribute`), so the operational
//!   attributes (entryUUID, entryCSN, timestamps, creator and modifier) arrive as the
//!   Primary has them. Parents go before their children; an object whose parent is not in
//!   the result (hidden, filtered, vanished during the scan) is left out, and the
//!   listener's `n` call for it takes the online path (as it would have).
//! - The mark "initialised" is the listener's module state, which it writes only after the
//!   whole pass: a crash anywhere in the build leaves the module uninitialised and the next
//!   start rebuilds the replica from scratch (stop, remove the database files, load).
//! - A failed `slapadd` (its exit status and standard error are reported), an unreachable
//!   Primary or a failed stop leave an empty database behind and slapd started again; with
//!   `initialize = offline` the initialisation fails (and the listener retries it with
//!   backoff), with `auto` the module falls back to the online path.
//! - The `n` calls that follow a bulk load in the same pass (same id) need no write for
//!   the objects just loaded: the replica holds the Primary's state at the load, which is
//!   at least as new as the listener's id, and the transactions after that id bring
//!   it up to date, exactly as after an online pass.
//!
//! Config keys: `initialize` (`online`, `offline` or `auto`, the default: offline when
//! `slapd_stop` and `slapd_start` are set, `slapadd` is executable and the listener binds
//! with a DN and password), `slapd_stop` and `slapd_start` (shell commands, e.g.
//! `systemctl stop slapd`), `slapadd` (default `/usr/sbin/slapadd`), `slapd_config` (a
//! `slapd.conf` file, or a `slapd.d` directory; default `/etc/ldap/slapd.conf`),
//! `database_dir` (default `/var/lib/univention-ldap/ldap`, UCS's), `primary_uri` (default
//! `ldap://<the listener's ldapserver>:<ldap/master/port, 7389>/`), `primary_starttls`
//! (`off`, `try`, `require`; default `off`) and `start_timeout` (seconds slapd may take to
//! answer after `slapd_start`, default 120).

use std::collections::{HashMap, HashSet};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use daemon::privileges::with_root;
use daemon::ucr::Ucr;
use ldap::dn::{dn_key, parent};
use ldap::endpoint::{Auth, Endpoint, Password, StartTls};
use ldap::search::subtree_dns;
use ldap::write::ldif;
use ldap::{ALL_ATTRS, Ldap, PagedSearch, RawEntry, Scope};

use super::{Failure, Replication, writable_attrs};
use crate::module::{Call, Command, ModuleError};

/// Entries per page of the Primary search.
const PAGE_SIZE: i32 = 1000;
/// Test seam (debug builds): a line `slapadd` cannot parse in the streamed LDIF.
const BROKEN_LDIF_FAILPOINT: &str = "replication-offline-ldif";
/// The files of an mdb database.
const DATABASE_FILES: [&str; 2] = ["data.mdb", "lock.mdb"];

/// `initialize = …`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Online,
    Offline,
    Auto,
}

pub(super) struct OfflineSettings {
    mode: Mode,
    slapd_stop: Option<String>,
    slapd_start: Option<String>,
    slapadd: PathBuf,
    slapd_config: PathBuf,
    database_dir: PathBuf,
    primary_uri: Option<String>,
    primary_port: u16,
    primary_starttls: StartTls,
    start_timeout: Duration,
}

impl OfflineSettings {
    pub(super) fn from_ucr(ucr: &Ucr) -> OfflineSettings {
        OfflineSettings {
            mode: Mode::Auto,
            slapd_stop: None,
            slapd_start: None,
            slapadd: PathBuf::from("/usr/sbin/slapadd"),
            slapd_config: PathBuf::from("/etc/ldap/slapd.conf"),
            database_dir: PathBuf::from("/var/lib/univention-ldap/ldap"),
            primary_uri: None,
            primary_port: ucr.get_parsed("ldap/master/port").unwrap_or(7389),
            primary_starttls: StartTls::Off,
            start_timeout: Duration::from_secs(120),
        }
    }

    /// One key of the module's config file; `Ok(false)` for keys that are not ours.
    pub(super) fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
        match key {
            "initialize" => {
                self.mode = match value {
                    "online" => Mode::Online,
                    "offline" => Mode::Offline,
                    "auto" => Mode::Auto,
                    _ => return Err(format!("{value:?} is not online, offline or auto")),
                }
            }
            "slapd_stop" => self.slapd_stop = Some(value.to_owned()),
            "slapd_start" => self.slapd_start = Some(value.to_owned()),
            "slapadd" => self.slapadd = PathBuf::from(value),
            "slapd_config" => self.slapd_config = PathBuf::from(value),
            "database_dir" => self.database_dir = PathBuf::from(value),
            "primary_uri" => self.primary_uri = Some(value.to_owned()),
            "primary_starttls" => {
                self.primary_starttls = match value {
                    "off" => StartTls::Off,
                    "try" => StartTls::Try,
                    "require" => StartTls::Require,
                    _ => return Err(format!("{value:?} is not off, try or require")),
                }
            }
            "start_timeout" => {
                self.start_timeout = match value.parse::<u64>() {
                    Ok(secs) if secs > 0 => Duration::from_secs(secs),
                    _ => return Err(format!("{value:?} is not a positive number of seconds")),
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// The listener's account on the Primary, from `setdata`.
#[derive(Debug, Default)]
pub(super) struct Account {
    bind_dn: Option<String>,
    bind_pw: Option<String>,
    server: Option<String>,
}

impl Account {
    pub(super) fn set(&mut self, key: &str, value: &str) {
        match key {
            "binddn" => self.bind_dn = Some(value.to_owned()),
            "bindpw" => self.bind_pw = Some(value.to_owned()),
            "ldapserver" => self.server = Some(value.to_owned()),
            _ => {}
        }
    }
}

/// What `clean` decided for the `initialize` that follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plan {
    Online,
    /// `forced`: `initialize = offline`, no fallback.
    Offline {
        forced: bool,
    },
}

/// The objects a bulk load wrote, whose `n` calls of the same pass (one id) need no write.
#[derive(Debug)]
pub(super) struct Loaded {
    id: Option<u64>,
    keys: HashSet<String>,
}

/// How streaming the Primary's objects into `slapadd` ended badly.
enum StreamError {
    Primary(String),
    /// Writing to `slapadd` failed: it probably exited; its own report says why.
    Pipe(io::Error),
}

impl Replication {
    /// Why the offline build cannot run here, if it cannot.
    fn offline_unavailable(&self) -> Option<String> {
        let o = &self.settings.offline;
        if o.slapd_stop.is_none() || o.slapd_start.is_none() {
            return Some("`slapd_stop` and `slapd_start` are not both configured".into());
        }
        let executable = std::fs::metadata(&o.slapadd)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if !executable {
            return Some(format!("{} is not an executable", o.slapadd.display()));
        }
        if self.account.bind_dn.is_none() || self.account.bind_pw.is_none() {
            return Some("the listener binds to the Primary without a DN and password".into());
        }
        None
    }

    /// Called by `clean`: which initialisation follows.
    pub(super) fn plan_initialisation(&mut self) -> Plan {
        let plan = match self.settings.offline.mode {
            Mode::Online => Plan::Online,
            Mode::Offline => Plan::Offline { forced: true },
            Mode::Auto => match self.offline_unavailable() {
                None => Plan::Offline { forced: false },
                Some(why) => {
                    tracing::info!("replication: initialising online: {why}");
                    Plan::Online
                }
            },
        };
        self.plan = Some(plan);
        plan
    }

    /// `initialize`: the offline build if `clean` planned it, with the online fallback.
    pub(super) fn initialize_replica(&mut self) -> Result<(), ModuleError> {
        self.loaded = None;
        let Some(Plan::Offline { forced }) = self.plan.take() else {
            return Ok(());
        };
        match self.build_offline() {
            Ok(loaded) => {
                self.loaded = Some(loaded);
                Ok(())
            }
            Err(e) if forced => Err(ModuleError::new(format!(
                "offline initialisation failed: {e}"
            ))),
            Err(e) => {
                tracing::warn!(
                    "replication: offline initialisation failed, initialising online \
                     instead: {e}"
                );
                self.clean_online()
            }
        }
    }

    /// Whether `call` is the `n` call of an object the bulk load of this pass wrote.
    pub(super) fn already_loaded(&mut self, call: &Call<'_>) -> bool {
        let Some(loaded) = self.loaded.as_mut() else {
            return false;
        };
        if call.command != Command::Init || loaded.id.is_some_and(|id| id != call.id) {
            // The initialisation pass is over: from now on every call writes.
            self.loaded = None;
            return false;
        }
        loaded.id = Some(call.id);
        loaded.keys.remove(&dn_key(call.dn))
    }

    fn primary_endpoint(&self) -> Result<Endpoint, String> {
        let o = &self.settings.offline;
        let uri = match (&o.primary_uri, &self.account.server) {
            (Some(uri), _) => uri.clone(),
            (None, Some(host)) => format!("ldap://{host}:{}/", o.primary_port),
            (None, None) => {
                return Err("no Primary: neither `primary_uri` nor the listener's server".into());
            }
        };
        let (Some(dn), Some(pw)) = (&self.account.bind_dn, &self.account.bind_pw) else {
            return Err("the listener binds to the Primary without a DN and password".into());
        };
        Ok(Endpoint {
            uri,
            auth: Auth::Simple {
                dn: dn.clone(),
                password: Password::Literal(pw.clone()),
            },
            starttls: o.primary_starttls,
            timeout: self.settings.timeout,
        })
    }

    fn build_offline(&mut self) -> Result<Loaded, String> {
        if let Some(why) = self.offline_unavailable() {
            return Err(why);
        }
        let base = self.base().ok_or("no LDAP base")?.to_owned();
        let filter = self
            .settings
            .info
            .filter
            .clone()
            .unwrap_or_else(|| "(objectClass=*)".into());
        let endpoint = self.primary_endpoint()?;
        let timeout = self.settings.timeout;
        let started = Instant::now();
        // The Primary is read before the local server stops: if it cannot be, the replica
        // keeps serving.
        let (base_q, filter_q) = (base.clone(), filter.clone());
        let (primary, dns) = self
            .block_on(async move {
                let mut ldap = ldap::connect(&endpoint).await?;
                let dns = subtree_dns(&mut ldap, &base_q, &filter_q, timeout).await?;
                Ok::<_, ldap::LdapFailure>((ldap, dns))
            })
            .map_err(failure_text)?
            .map_err(|e| format!("reading the Primary: {e}"))?;
        let expected: HashSet<String> = dns.iter().map(|dn| dn_key(dn)).collect();
        drop(dns);
        tracing::info!(
            "replication: offline initialisation of {} objects: stopping the local slapd",
            expected.len()
        );
        self.ldap = None;
        if let Err(e) = self.stop_local() {
            // Whatever the stop command did, the replica must serve again.
            if self.local_answers().is_err()
                && let Err(start) = self.start_local()
            {
                tracing::error!("replication: {start}");
            }
            return Err(e);
        }
        let loaded = self.load(primary, &base, &filter, expected);
        if loaded.is_err() {
            // Never leave a half-loaded database: the replica starts empty and is rebuilt.
            if let Err(e) = self.remove_database() {
                tracing::error!("replication: {e}");
            }
        }
        let restarted = self.start_local();
        let loaded = loaded?;
        restarted?;
        tracing::info!(
            "replication: offline initialisation loaded {} objects in {:.1}s",
            loaded.keys.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(loaded)
    }

    /// Removes the database files and streams the Primary's objects into `slapadd`.
    fn load(
        &mut self,
        mut primary: Ldap,
        base: &str,
        filter: &str,
        expected: HashSet<String>,
    ) -> Result<Loaded, String> {
        self.remove_database()?;
        let o = &self.settings.offline;
        let config_flag = if o.slapd_config.is_dir() { "-F" } else { "-f" };
        let mut command = Process::new(&o.slapadd);
        command
            .arg("-q")
            .arg(config_flag)
            .arg(&o.slapd_config)
            .args(["-b", base])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let shown = format!(
            "{} -q {config_flag} {}",
            o.slapadd.display(),
            o.slapd_config.display()
        );
        let mut child = with_root(|| command.spawn()).map_err(|e| format!("{shown}: {e}"))?;
        tracing::info!("replication: local slapd stopped, loading with {shown}");
        // Read concurrently: a chatty slapadd must not block on a full pipe.
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        });
        let Some(stdin) = child.stdin.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{shown}: no standard input"));
        };
        let excluded = self.excluded.clone();
        let timeout = self.settings.timeout;
        let (base_q, filter_q) = (base.to_owned(), filter.to_owned());
        let streamed = self
            .block_on(async move {
                let mut out = io::BufWriter::with_capacity(1 << 16, stdin);
                let result = stream(
                    &mut primary,
                    &base_q,
                    &filter_q,
                    &expected,
                    &excluded,
                    &mut out,
                    timeout,
                )
                .await;
                let flushed = out.flush().map_err(StreamError::Pipe);
                // Dropping the writer closes slapadd's standard input: it finishes.
                drop(out);
                let _ = primary.unbind().await;
                result.and_then(|loaded| flushed.map(|()| loaded))
            })
            .map_err(failure_text);
        let streamed = match streamed {
            Ok(streamed) => streamed,
            Err(e) => Err(StreamError::Primary(e)),
        };
        if matches!(streamed, Err(StreamError::Primary(_))) {
            // Half an LDIF must not be loaded: slapadd goes before it reads the end.
            let _ = child.kill();
        }
        let status = child.wait().map_err(|e| format!("{shown}: {e}"))?;
        let report = stderr
            .and_then(|reader| reader.join().ok())
            .unwrap_or_default();
        let report = report.trim();
        let loaded = match streamed {
            Err(StreamError::Primary(e)) => return Err(format!("reading the Primary: {e}")),
            Err(StreamError::Pipe(e)) if status.success() => {
                return Err(format!("writing to {shown}: {e}"));
            }
            // slapadd stopped reading: its exit status and report say why.
            Err(StreamError::Pipe(_)) => None,
            Ok(loaded) => Some(loaded),
        };
        if !status.success() {
            return Err(format!("{shown} exited with {status}: {report}"));
        }
        let Some(loaded) = loaded else {
            return Err(format!("{shown} stopped reading: {report}"));
        };
        self.sync_database()?;
        Ok(loaded)
    }

    fn run_command(&self, key: &str, command: &str) -> Result<(), String> {
        let output = with_root(|| {
            Process::new("/bin/sh")
                .args(["-c", command])
                .stdin(Stdio::null())
                .output()
        })
        .map_err(|e| format!("{key} {command:?}: {e}"))?;
        if output.status.success() {
            return Ok(());
        }
        Err(format!(
            "{key} {command:?} exited with {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }

    /// Whether the local slapd accepts the update DN's bind now.
    fn local_answers(&mut self) -> Result<(), String> {
        self.ldap = None;
        let result = self.connection().map(drop).map_err(failure_text);
        self.ldap = None;
        result
    }

    fn stop_local(&mut self) -> Result<(), String> {
        let command = self.settings.offline.slapd_stop.clone().unwrap_or_default();
        self.run_command("slapd_stop", &command)?;
        // slapadd beside a running slapd would load a database the server does not see.
        if self.local_answers().is_ok() {
            return Err(format!(
                "the local slapd still answers after slapd_stop {command:?}"
            ));
        }
        Ok(())
    }

    fn start_local(&mut self) -> Result<(), String> {
        let command = self
            .settings
            .offline
            .slapd_start
            .clone()
            .unwrap_or_default();
        self.run_command("slapd_start", &command)?;
        let limit = self.settings.offline.start_timeout;
        let deadline = Instant::now() + limit;
        let mut pause = Duration::from_millis(10);
        loop {
            match self.local_answers() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "the local slapd does not answer {limit:?} after slapd_start \
                         {command:?}: {e}"
                    ));
                }
                Err(_) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    fn remove_database(&self) -> Result<(), String> {
        let dir = &self.settings.offline.database_dir;
        for name in DATABASE_FILES {
            let path = dir.join(name);
            match with_root(|| std::fs::remove_file(&path)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot remove {}: {e}", path.display())),
            }
        }
        Ok(())
    }

    /// `slapadd -q` leaves the writing to the page cache; the module is marked initialised
    /// after this returns, so the data must be on disk first.
    fn sync_database(&self) -> Result<(), String> {
        let dir = &self.settings.offline.database_dir;
        let sync = |path: &Path| {
            std::fs::File::open(path)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("cannot sync {}: {e}", path.display()))
        };
        with_root(|| {
            sync(&dir.join(DATABASE_FILES[0]))?;
            sync(dir)
        })
    }
}

fn failure_text(failure: Failure) -> String {
    match failure {
        Failure::Transient(m) | Failure::Refused { error: m, .. } => m,
    }
}

/// Streams the paged search as LDIF content records into `out`, parents first; objects
/// whose parent is not part of the result are left out.
async fn stream(
    primary: &mut Ldap,
    base: &str,
    filter: &str,
    expected: &HashSet<String>,
    excluded: &HashSet<String>,
    out: &mut impl io::Write,
    timeout: Duration,
) -> Result<Loaded, StreamError> {
    let primary_error = |e: ldap::LdapFailure| StreamError::Primary(e.to_string());
    let base_key = dn_key(base);
    let mut done: HashSet<String> = HashSet::with_capacity(expected.len());
    let mut waiting: HashMap<String, Vec<RawEntry>> = HashMap::new();
    let mut left_out = 0usize;
    if daemon::failpoint::check(BROKEN_LDIF_FAILPOINT).is_err() {
        out.write_all(b"dn: cn=failpoint,")
            .and_then(|()| out.write_all(base.as_bytes()))
            .and_then(|()| out.write_all(b"\nthis line is no attribute\n\n"))
            .map_err(StreamError::Pipe)?;
    }
    let mut search = PagedSearch::start(
        primary,
        base,
        Scope::Subtree,
        filter,
        &ALL_ATTRS,
        PAGE_SIZE,
        timeout,
    )
    .await
    .map_err(primary_error)?;
    while let Some(raw) = search.next().await.map_err(primary_error)? {
        let key = dn_key(&raw.dn);
        if key != base_key
            && let Some(parent_key) = parent(&raw.dn).map(dn_key)
            && !done.contains(&parent_key)
        {
            if expected.contains(&parent_key) {
                waiting.entry(parent_key).or_default().push(raw);
            } else {
                tracing::debug!("replication: {} left to the online path: no parent", raw.dn);
                left_out += 1;
            }
            continue;
        }
        let mut ready = vec![raw];
        while let Some(raw) = ready.pop() {
            let record = ldif::entry(&raw.dn, &writable_attrs(excluded, &raw.attrs));
            out.write_all(record.as_bytes())
                .map_err(StreamError::Pipe)?;
            let key = dn_key(&raw.dn);
            if let Some(children) = waiting.remove(&key) {
                ready.extend(children);
            }
            done.insert(key);
        }
    }
    search.finish().await.map_err(primary_error)?;
    // Children of parents that vanished during the scan.
    left_out += waiting.values().map(Vec::len).sum::<usize>();
    if left_out > 0 {
        tracing::info!(
            "replication: {left_out} objects without their parent left to the online path"
        );
    }
    Ok(Loaded {
        id: None,
        keys: done,
    })
}

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use super::*;

    fn module(config: &str) -> (tempfile::TempDir, Replication) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.conf");
        std::fs::write(&path, config).unwrap();
        let ucr = Ucr::parse("ldap/base: dc=x\nldap/master/port: 17389\n");
        let mut settings = Settings::from_config(&path, &ucr).unwrap();
        settings.state_dir = dir.path().join("state");
        (dir, Replication::new(settings).unwrap())
    }

    fn call<'a>(id: u64, dn: &'a str, command: Command) -> Call<'a> {
        Call {
            id,
            dn,
            command,
            new: &[],
            old: &[],
            transaction: id,
            number: 1,
        }
    }

    #[test]
    fn settings_and_the_plan() {
        let (_dir, mut m) = module("");
        assert_eq!(m.settings.offline.mode, Mode::Auto);
        assert_eq!(m.settings.offline.primary_port, 17389);
        // auto without commands: online, and says why.
        assert!(m.offline_unavailable().unwrap().contains("slapd_stop"));
        assert_eq!(m.plan_initialisation(), Plan::Online);

        let (_dir, mut m) = module(
            "slapd_stop = true\nslapd_start = true\nslapadd = /bin/true\nprimary_starttls = \
             require\nstart_timeout = 5\n",
        );
        assert_eq!(m.settings.offline.primary_starttls, StartTls::Require);
        assert_eq!(m.settings.offline.start_timeout, Duration::from_secs(5));
        // The listener's account is still unknown.
        assert!(m.offline_unavailable().unwrap().contains("without a DN"));
        for (key, value) in [
            ("binddn", "cn=h,dc=x"),
            ("bindpw", "pw"),
            ("ldapserver", "p"),
        ] {
            m.account.set(key, value);
        }
        assert_eq!(m.offline_unavailable(), None);
        assert_eq!(m.plan_initialisation(), Plan::Offline { forced: false });
        assert_eq!(m.primary_endpoint().unwrap().uri, "ldap://p:17389/");

        let (_dir, mut m) = module("initialize = offline\n");
        assert_eq!(m.plan_initialisation(), Plan::Offline { forced: true });
        // Forced offline without its commands fails the initialisation, no fallback.
        let e = m.initialize_replica().unwrap_err();
        assert!(e.message().contains("offline initialisation failed"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.conf");
        for bad in [
            "initialize = sometimes\n",
            "start_timeout = 0\n",
            "primary_starttls = yes\n",
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(
                Settings::from_config(&path, &Ucr::parse("")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_the_n_calls_of_the_load_pass_are_skipped() {
        let (_dir, mut m) = module("");
        let loaded = || Loaded {
            id: None,
            keys: ["cn=a,dc=x", "cn=b,dc=x"]
                .iter()
                .map(|d| dn_key(d))
                .collect(),
        };
        m.loaded = Some(loaded());
        assert!(m.already_loaded(&call(7, "CN=A,dc=x", Command::Init)));
        // Not loaded (no parent in the result): written online.
        assert!(!m.already_loaded(&call(7, "cn=c,dc=x", Command::Init)));
        // A missing parent fetched by a later transaction is written, whatever was loaded.
        assert!(!m.already_loaded(&call(8, "cn=b,dc=x", Command::Init)));
        assert!(m.loaded.is_none());

        m.loaded = Some(loaded());
        assert!(!m.already_loaded(&call(7, "cn=a,dc=x", Command::Modify)));
        assert!(!m.already_loaded(&call(7, "cn=b,dc=x", Command::Init)));
    }
}
