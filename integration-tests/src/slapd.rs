//! Private slapd instances.
//!
//! A *provider* is configured like a UCS Primary as far as our daemons care: the main
//! database `dc=example,dc=com` with the accesslog overlay (stock OpenLDAP change feed,
//! followed via syncrepl) and a `cn=translog` database written over ldapi by root with
//! SASL EXTERNAL and readable by any bound user (spec/notifier.md §1.6). A host account can
//! read everything except `cn=restricted,…` (selective replication). A *replica* is a plain
//! mdb database for a listener's replication target; [`Slapd::start_replica_of`] starts one
//! configured like a UCS Replica Directory Node (see there), and
//! [`crate::compare`] compares two directories entry by entry.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ldap3::LdapConn;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use tempfile::TempDir;

use crate::directory::Directory;
use crate::net::{free_port, is_listening};
use crate::{HarnessError, Result, io_context, ldap_context};

pub const BASE: &str = "dc=example,dc=com";
pub const ADMIN_DN: &str = "cn=admin,dc=example,dc=com";
pub const ADMIN_PW: &str = "secret";
/// The machine account a listener binds as.
pub const HOST_DN: &str = "cn=host,dc=example,dc=com";
pub const HOST_PW: &str = "hostsecret";
/// A subtree the host account cannot see (selective replication).
pub const RESTRICTED_DN: &str = "cn=restricted,dc=example,dc=com";
/// The identity of root connecting over ldapi with SASL EXTERNAL.
pub const ROOT_PEERCRED: &str = "gidNumber=0+uidNumber=0,cn=peercred,cn=external,cn=auth";
pub const TRANSLOG_BASE: &str = "cn=translog";
/// The identity UCS's replication writes a Replica with: its slapd's `rootdn` and
/// `updatedn` (password in [`Slapd::rootpw_conf_path`]).
pub const UPDATE_DN: &str = "cn=update,dc=example,dc=com";
pub const UPDATE_PW: &str = "updatesecret";
/// The schema files every instance loads (a replica loads its primary's list).
pub const SCHEMA_FILES: &[&str] = &[
    "/etc/ldap/schema/core.schema",
    "/etc/ldap/schema/cosine.schema",
    "/etc/ldap/schema/nis.schema",
    "/etc/ldap/schema/inetorgperson.schema",
];
pub const ACCESSLOG_BASE: &str = "cn=accesslog";

/// [`SCHEMA_FILES`] without `nis.schema`: a replica that refuses the primary's
/// `posixGroup` and `posixAccount` objects, to provoke refused changes.
pub fn schema_without_nis() -> Vec<std::path::PathBuf> {
    SCHEMA_FILES
        .iter()
        .filter(|f| !f.contains("nis"))
        .map(std::path::PathBuf::from)
        .collect()
}

const SLAPD: &str = "/usr/sbin/slapd";
/// The cn=config template Debian's slapd package loads into a fresh `slapd.d` on
/// installation (its postinst fills in the suffix and the admin password).
pub const DEBIAN_INIT_LDIF: &str = "/usr/share/slapd/slapd.init.ldif";
const START_TIMEOUT: Duration = Duration::from_secs(15);
const START_ATTEMPTS: usize = 5;

/// What a slapd instance contains.
#[derive(Debug, Clone)]
pub struct SlapdConfig {
    /// `cn=accesslog` fed by the accesslog overlay (with syncprov on it).
    pub accesslog: bool,
    /// The UCS `cn=translog` database.
    pub translog: bool,
    /// Load the host account and the restricted subtree at first start.
    pub fixture: bool,
    /// `dbnosync` on every database: much faster writes, not crash-safe for the data.
    pub dbnosync: bool,
    /// Log operations (`-d stats`) to `slapd.log`; off for benchmarks.
    pub log_operations: bool,
    /// StartTLS with a throwaway CA and a server certificate for `127.0.0.1` and
    /// `localhost`, generated with `openssl` into `<dir>/tls/` ([`Slapd::ca_cert_path`]).
    pub tls: bool,
    /// Listen on every address, not only 127.0.0.1 (for clients in a network namespace).
    pub listen_all: bool,
    /// Schema files to include, in order ([`SCHEMA_FILES`] by default).
    pub schema: Vec<PathBuf>,
    /// Configure the main database as a UCS Replica of the primary at this URL: rootdn and
    /// updatedn [`UPDATE_DN`], `updateref` to the primary, empty at start (not even the
    /// base entry: replication creates every entry, with the primary's entryUUID).
    pub replica_of: Option<String>,
    /// `size.pr` for the host account: the largest page it may ask for.
    pub host_page_limit: Option<u32>,
    /// The accesslog overlay's `logpurge <age> <interval>` (default a week, daily).
    pub accesslog_purge: Option<&'static str>,
}

fn default_schema() -> Vec<PathBuf> {
    SCHEMA_FILES.iter().map(PathBuf::from).collect()
}

impl SlapdConfig {
    /// Primary-like instance: accesslog, translog, host account, restricted subtree.
    pub fn provider() -> SlapdConfig {
        SlapdConfig {
            accesslog: true,
            translog: true,
            fixture: true,
            dbnosync: false,
            log_operations: true,
            tls: false,
            listen_all: false,
            schema: default_schema(),
            replica_of: None,
            host_page_limit: None,
            accesslog_purge: None,
        }
    }

    /// Plain instance with only the base entry, e.g. a replication target.
    pub fn replica() -> SlapdConfig {
        SlapdConfig {
            accesslog: false,
            translog: false,
            fixture: false,
            dbnosync: false,
            log_operations: true,
            tls: false,
            listen_all: false,
            schema: default_schema(),
            replica_of: None,
            host_page_limit: None,
            accesslog_purge: None,
        }
    }

    /// A UCS-like Replica of `primary` (see [`Slapd::start_replica_of`]): its schema,
    /// `updateref` to its URL, no accesslog or translog.
    pub fn replica_of(primary: &Slapd) -> SlapdConfig {
        SlapdConfig {
            fixture: false,
            schema: primary.config.schema.clone(),
            replica_of: Some(primary.ldap_url()),
            ..SlapdConfig::replica()
        }
    }

    pub fn listen_all(mut self, on: bool) -> SlapdConfig {
        self.listen_all = on;
        self
    }

    pub fn dbnosync(mut self, on: bool) -> SlapdConfig {
        self.dbnosync = on;
        self
    }

    /// A DC Backup's server: a [`SlapdConfig::replica_of`] the primary with the
    /// accesslog overlay (the change feed a promoted Backup's notifier follows) and the
    /// `cn=translog` database its own notifier writes.
    pub fn backup_of(primary: &Slapd) -> SlapdConfig {
        SlapdConfig {
            accesslog: true,
            translog: true,
            ..SlapdConfig::replica_of(primary)
        }
    }

    pub fn accesslog_purge(mut self, age_and_interval: &'static str) -> SlapdConfig {
        self.accesslog_purge = Some(age_and_interval);
        self
    }

    pub fn host_page_limit(mut self, limit: u32) -> SlapdConfig {
        self.host_page_limit = Some(limit);
        self
    }

    pub fn log_operations(mut self, on: bool) -> SlapdConfig {
        self.log_operations = on;
        self
    }
}

/// Where slapd reads its configuration from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConfigSource {
    /// `slapd.conf`, rendered from [`SlapdConfig`] (`-f`).
    File,
    /// A `slapd.d` cn=config directory (`-F`), changed over LDAP at run time.
    Directory,
}

/// A running slapd. Killed on drop; its directory is removed unless the test panicked.
pub struct Slapd {
    dir: Option<TempDir>,
    path: PathBuf,
    port: u16,
    config: SlapdConfig,
    source: ConfigSource,
    child: Option<Child>,
}

impl Slapd {
    /// Starts a fresh instance and loads its fixture.
    pub fn start(config: SlapdConfig) -> Result<Slapd> {
        let dir = tempfile::Builder::new()
            .prefix("slapd-")
            .tempdir_in("/tmp")
            .map_err(io_context("creating the slapd directory"))?;
        let path = dir.path().to_path_buf();
        for sub in ["data", "accesslog", "translog"] {
            fs::create_dir(path.join(sub)).map_err(io_context(format!("creating {sub}")))?;
        }
        if config.tls {
            generate_tls_material(&path.join("tls"))?;
        }
        let mut slapd = Slapd {
            dir: Some(dir),
            path,
            port: 0,
            config,
            source: ConfigSource::File,
            child: None,
        };
        fs::write(slapd.conf_path(), slapd.render_config())
            .map_err(io_context("writing slapd.conf"))?;
        if slapd.config.replica_of.is_some() {
            // As UCS's /etc/ldap/rootpw.conf, read by the replication module.
            let rootpw = format!("rootpw \"{UPDATE_PW}\"\n");
            fs::write(slapd.rootpw_conf_path(), rootpw)
                .map_err(io_context("writing rootpw.conf"))?;
            slapd.spawn_on_free_port()?;
        } else {
            slapd.spawn_on_free_port()?;
            slapd.load_fixture()?;
        }
        Ok(slapd)
    }

    /// Starts a replica of `primary` configured like a UCS Replica Directory Node: the
    /// primary's schema files, the main database [`BASE`] with `rootdn` and `updatedn`
    /// [`UPDATE_DN`] (password [`UPDATE_PW`], also in [`Slapd::rootpw_conf_path`] like
    /// UCS's `/etc/ldap/rootpw.conf`), `updateref` to the primary (any other identity that
    /// writes gets a referral), root over ldapi may manage everything, the same ACLs as the
    /// primary (the host account cannot see [`RESTRICTED_DN`]). The database starts empty:
    /// replication (or [`Slapd::slapadd`] of [`Slapd::slapcat`]) creates every entry,
    /// including the base, with the primary's entryUUID and timestamps, which only the
    /// update DN may write. [`Slapd::admin`] binds as the update DN; compare with
    /// [`crate::compare::Comparison`].
    pub fn start_replica_of(primary: &Slapd) -> Result<Slapd> {
        Slapd::start(SlapdConfig::replica_of(primary))
    }

    /// `rootpw.conf` of a replica: `rootpw "<password>"`, as UCS's `/etc/ldap/rootpw.conf`.
    pub fn rootpw_conf_path(&self) -> PathBuf {
        self.path.join("rootpw.conf")
    }

    /// The `rootdn` of the main database: [`ADMIN_DN`], or [`UPDATE_DN`] on a replica.
    pub fn rootdn(&self) -> &'static str {
        if self.config.replica_of.is_some() {
            UPDATE_DN
        } else {
            ADMIN_DN
        }
    }

    fn rootpw(&self) -> &'static str {
        if self.config.replica_of.is_some() {
            UPDATE_PW
        } else {
            ADMIN_PW
        }
    }

    /// Starts an instance set up the way Debian's slapd package sets up a new server: its
    /// [`DEBIAN_INIT_LDIF`] with [`BASE`] and [`ADMIN_PW`] filled in, loaded into a fresh
    /// `slapd.d` with `slapadd -n0` (cn=config managed by root over ldapi, one mdb database
    /// with Debian's ACLs), then the base entry, the host account and the restricted
    /// subtree. No accesslog, no translog, no host-account ACLs: configuring those is the
    /// job of `kit/openldap/apply.sh`.
    pub fn debian_package() -> Result<Slapd> {
        let dir = tempfile::Builder::new()
            .prefix("slapd-debian-")
            .tempdir_in("/tmp")
            .map_err(io_context("creating the slapd directory"))?;
        let path = dir.path().to_path_buf();
        for sub in ["data", "slapd.d"] {
            fs::create_dir(path.join(sub)).map_err(io_context(format!("creating {sub}")))?;
        }
        let template = fs::read_to_string(DEBIAN_INIT_LDIF).map_err(io_context(format!(
            "reading {DEBIAN_INIT_LDIF} (is slapd installed?)"
        )))?;
        let d = path.display();
        let init = template
            .replace("@SUFFIX@", BASE)
            .replace("@PASSWORD@", ADMIN_PW)
            .replace(
                "olcDbDirectory: /var/lib/ldap",
                &format!("olcDbDirectory: {d}/data"),
            )
            .replace("/var/run/slapd/", &format!("{d}/"));
        // A template that changed shape must fail here, not write into the system's paths.
        if init.contains('@') || init.contains("/var/") {
            return Err(HarnessError::SlapdStart(format!(
                "{DEBIAN_INIT_LDIF} has placeholders or paths this harness does not replace"
            )));
        }
        let init_path = path.join("slapd.init.ldif");
        fs::write(&init_path, init).map_err(io_context("writing slapd.init.ldif"))?;
        let output = Command::new("/usr/sbin/slapadd")
            .args(["-n0", "-F"])
            .arg(path.join("slapd.d"))
            .arg("-l")
            .arg(&init_path)
            .output()
            .map_err(io_context("running slapadd -n0"))?;
        if !output.status.success() {
            return Err(HarnessError::SlapdStart(format!(
                "slapadd -n0 exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        let mut slapd = Slapd {
            dir: Some(dir),
            path,
            port: 0,
            config: SlapdConfig::replica(),
            source: ConfigSource::Directory,
            child: None,
        };
        slapd.config.fixture = true;
        slapd.spawn_on_free_port()?;
        slapd.load_fixture()?;
        Ok(slapd)
    }

    pub fn provider() -> Result<Slapd> {
        Slapd::start(SlapdConfig::provider())
    }

    pub fn replica() -> Result<Slapd> {
        Slapd::start(SlapdConfig::replica())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The instance directory (config, databases, `slapd.log`, ldapi socket).
    pub fn dir(&self) -> &Path {
        &self.path
    }

    pub fn log_path(&self) -> PathBuf {
        self.path.join("slapd.log")
    }

    pub fn conf_path(&self) -> PathBuf {
        self.path.join("slapd.conf")
    }

    /// The `slapd.d` directory of a [`Slapd::debian_package`] instance.
    pub fn conf_dir_path(&self) -> PathBuf {
        self.path.join("slapd.d")
    }

    /// slapd's and the slap tools' option for this instance's configuration.
    fn config_args(&self) -> [std::ffi::OsString; 2] {
        match self.source {
            ConfigSource::File => ["-f".into(), self.conf_path().into()],
            ConfigSource::Directory => ["-F".into(), self.conf_dir_path().into()],
        }
    }

    pub fn ldapi_socket(&self) -> PathBuf {
        self.path.join("ldapi")
    }

    /// `ldap://127.0.0.1:<port>/`
    pub fn ldap_url(&self) -> String {
        format!("ldap://127.0.0.1:{}/", self.port)
    }

    /// `ldapi://<percent-encoded socket path>/`
    pub fn ldapi_url(&self) -> String {
        let socket = self.ldapi_socket();
        let encoded = utf8_percent_encode(&socket.to_string_lossy(), NON_ALPHANUMERIC).to_string();
        format!("ldapi://{encoded}/")
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Bound as the rootdn of the main database ([`Slapd::rootdn`]).
    pub fn admin(&self) -> Result<Directory> {
        self.simple_bind(self.rootdn(), self.rootpw())
    }

    /// Bound as the host (machine) account.
    pub fn host(&self) -> Result<Directory> {
        self.simple_bind(HOST_DN, HOST_PW)
    }

    pub fn simple_bind(&self, dn: &str, password: &str) -> Result<Directory> {
        let mut conn = LdapConn::new(&self.ldap_url())
            .map_err(ldap_context(format!("connecting to {}", self.ldap_url())))?;
        conn.simple_bind(dn, password)
            .and_then(|r| r.success())
            .map_err(ldap_context(format!("binding as {dn}")))?;
        Ok(Directory::new(conn))
    }

    pub fn anonymous(&self) -> Result<Directory> {
        let conn = LdapConn::new(&self.ldap_url())
            .map_err(ldap_context(format!("connecting to {}", self.ldap_url())))?;
        Ok(Directory::new(conn))
    }

    /// Root over ldapi with SASL EXTERNAL, as the notifier writes `cn=translog`.
    pub fn root(&self) -> Result<Directory> {
        let mut conn = LdapConn::new(&self.ldapi_url())
            .map_err(ldap_context(format!("connecting to {}", self.ldapi_url())))?;
        conn.sasl_external_bind()
            .and_then(|r| r.success())
            .map_err(ldap_context("SASL EXTERNAL bind over ldapi"))?;
        Ok(Directory::new(conn))
    }

    /// Kills slapd hard (mdb is crash-safe), as a power cut or OOM kill would.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // The process may already be gone; only the wait result matters.
            let _ = child.kill();
            child
                .wait()
                .map_err(io_context("waiting for slapd to exit"))?;
        }
        Ok(())
    }

    /// SIGTERM and waits up to `timeout` for slapd to shut down cleanly; SIGKILL after that.
    pub fn stop(&mut self, timeout: Duration) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        // Already exited and reaped (e.g. by `is_running`): its pid may belong to another
        // process by now, so it must not be signalled.
        if matches!(child.try_wait(), Ok(Some(_))) {
            self.child = None;
            return Ok(());
        }
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) with the pid of our own child, which has not been reaped (just
            // checked); no memory is involved.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let start = Instant::now();
        while start.elapsed() < timeout {
            if matches!(child.try_wait(), Ok(Some(_))) {
                self.child = None;
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill()
    }

    /// Stops slapd, changes its configuration (e.g. the schema files, or a replica that
    /// becomes a primary as UCR's templates would rewrite it) and starts it again on the
    /// same port and databases.
    pub fn reconfigure(&mut self, change: impl FnOnce(&mut SlapdConfig)) -> Result<()> {
        self.stop(Duration::from_secs(10))?;
        change(&mut self.config);
        fs::write(self.conf_path(), self.render_config())
            .map_err(io_context("writing slapd.conf"))?;
        self.restart()
    }

    pub fn config(&self) -> &SlapdConfig {
        &self.config
    }

    /// Kills and starts slapd again on the same port and databases.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn(self.port) {
                Ok(()) => return Ok(()),
                Err(err) if Instant::now() >= deadline => return Err(err),
                // The old socket may linger briefly; the port is ours, so keep trying it.
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn spawn_on_free_port(&mut self) -> Result<()> {
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_port()?;
            match self.spawn(port) {
                Ok(()) => return Ok(()),
                Err(err @ HarnessError::SlapdStart(_)) if self.port_conflict() => {
                    last_error = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(last_error.unwrap_or_else(|| HarnessError::SlapdStart("no free port".into())))
    }

    fn port_conflict(&self) -> bool {
        fs::read_to_string(self.log_path())
            .map(|log| log.contains("Address already in use"))
            .unwrap_or(false)
    }

    fn spawn(&mut self, port: u16) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io_context("opening slapd.log"))?;
        let log_err = log
            .try_clone()
            .map_err(io_context("duplicating slapd.log"))?;
        let host = if self.config.listen_all {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        let urls = format!("ldap://{host}:{port}/ {}", self.ldapi_url());
        // `-d` keeps slapd in the foreground as our child; level 0 logs nothing.
        let debug = if self.config.log_operations {
            "stats"
        } else {
            "0"
        };
        let mut command = Command::new(SLAPD);
        let mut child = crate::process::apply_process_group(&mut command)
            .args(self.config_args())
            .arg("-h")
            .arg(&urls)
            .arg("-d")
            .arg(debug)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io_context(format!("starting {SLAPD}")))?;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(HarnessError::SlapdStart(format!(
                    "slapd exited with {status}; log {}:\n{}",
                    self.log_path().display(),
                    self.log_tail()
                )));
            }
            if is_listening(port) && UnixStream::connect(self.ldapi_socket()).is_ok() {
                break;
            }
            if start.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HarnessError::SlapdStart(format!(
                    "slapd not listening on port {port} after {START_TIMEOUT:?}; log:\n{}",
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.port = port;
        self.child = Some(child);
        Ok(())
    }

    /// The last lines of slapd.log, for error messages.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn load_fixture(&self) -> Result<()> {
        let mut admin = self.admin()?;
        admin.add(
            BASE,
            &[
                ("objectClass", &["dcObject", "organization"]),
                ("dc", &["example"]),
                ("o", &["Example"]),
            ],
        )?;
        if self.config.fixture {
            admin.add(
                HOST_DN,
                &[
                    (
                        "objectClass",
                        &["applicationProcess", "simpleSecurityObject"],
                    ),
                    ("cn", &["host"]),
                    ("userPassword", &[HOST_PW]),
                ],
            )?;
            admin.add_role(RESTRICTED_DN, "restricted")?;
        }
        Ok(())
    }

    fn render_config(&self) -> String {
        let d = self.path.display();
        let nosync = if self.config.dbnosync {
            "dbnosync\n"
        } else {
            ""
        };
        let tls = if self.config.tls {
            format!(
                "TLSCACertificateFile {d}/tls/ca.pem
TLSCertificateFile {d}/tls/server.pem
TLSCertificateKeyFile {d}/tls/server.key
"
            )
        } else {
            String::new()
        };
        let mut conf: String = self
            .config
            .schema
            .iter()
            .map(|file| format!("include {}\n", file.display()))
            .collect();
        let _ = write!(
            conf,
            "pidfile {d}/slapd.pid
argsfile {d}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload accesslog
moduleload syncprov
sizelimit unlimited
{tls}
database config
rootdn \"{ROOT_PEERCRED}\"
"
        );
        if self.config.translog {
            // As UCS: written by root over ldapi, readable by any bound user, hidden from
            // anonymous, and `nosync` (spec/notifier.md §1.6): the notifier's fsynced log is
            // the source of truth and `univention-translog import` rebuilds this database.
            let _ = write!(
                conf,
                "
database mdb
suffix \"{TRANSLOG_BASE}\"
rootdn \"{ROOT_PEERCRED}\"
directory {d}/translog
maxsize 1073741824
dbnosync
index objectClass,reqSession eq
access to * by dn.exact=\"{ROOT_PEERCRED}\" write by users read by * none
"
            );
        }
        if self.config.accesslog {
            // Must be defined before the database that logs into it.
            let _ = write!(
                conf,
                "
database mdb
suffix \"{ACCESSLOG_BASE}\"
rootdn \"{ACCESSLOG_BASE}\"
directory {d}/accesslog
maxsize 1073741824
{nosync}index default eq
index entryCSN,objectClass,reqEnd,reqResult,reqStart,reqDN eq
access to * by dn.exact=\"{ADMIN_DN}\" read by dn.exact=\"{ROOT_PEERCRED}\" read by * none
limits dn.exact=\"{ADMIN_DN}\" time=unlimited size=unlimited
overlay syncprov
syncprov-nopresent TRUE
syncprov-reloadhint TRUE
"
            );
        }
        let (rootdn, rootpw) = (self.rootdn(), self.rootpw());
        let _ = write!(
            conf,
            "
database mdb
suffix \"{BASE}\"
rootdn \"{rootdn}\"
rootpw {rootpw}
directory {d}/data
maxsize 4294967296
{nosync}index objectClass eq
index entryCSN,entryUUID eq
index uid,cn eq
access to dn.subtree=\"{RESTRICTED_DN}\" by dn.exact=\"{ROOT_PEERCRED}\" manage by dn.exact=\"{HOST_DN}\" none by users read by * none
access to attrs=userPassword by dn.exact=\"{ROOT_PEERCRED}\" manage by self write by anonymous auth by * none
access to * by dn.exact=\"{ROOT_PEERCRED}\" manage by users read by * none
"
        );
        if let Some(limit) = self.config.host_page_limit {
            let _ = writeln!(conf, "limits dn.exact=\"{HOST_DN}\" size.pr={limit}");
        }
        if let Some(primary) = &self.config.replica_of {
            // `updatedn` makes the database a shadow (the update DN may write entryUUID,
            // entryCSN, timestamps); `updateref` must follow it.
            let _ = write!(conf, "updatedn \"{UPDATE_DN}\"\nupdateref \"{primary}\"\n");
        }
        if self.config.accesslog {
            let purge = self.config.accesslog_purge.unwrap_or("07+00:00 01+00:00");
            let _ = write!(
                conf,
                "overlay syncprov
syncprov-checkpoint 100 10
overlay accesslog
logdb {ACCESSLOG_BASE}
logops writes
logsuccess TRUE
logpurge {purge}
"
            );
        }
        conf
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        let _ = self.kill();
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!(
                "test failed: slapd directory kept for diagnosis at {} (slapd.conf, slapd.log)",
                kept.display()
            );
        }
    }
}

/// Bulk loading for benchmarks: `slapadd` is one to two orders of magnitude faster than
/// LDAP adds, and writes no accesslog entries, so the notifier sees no transactions for the
/// loaded entries (as after a UCS Primary's initial `slapadd`).
impl Slapd {
    /// The main database as LDIF (`slapcat -b BASE`, every user and operational attribute),
    /// read while slapd runs (mdb readers do not block it). With [`Slapd::slapadd`] on a
    /// [`Slapd::start_replica_of`] instance this makes an exact copy.
    pub fn slapcat(&self) -> Result<String> {
        let output = Command::new("/usr/sbin/slapcat")
            .args(self.config_args())
            .args(["-b", BASE])
            .output()
            .map_err(io_context("running slapcat"))?;
        if !output.status.success() {
            return Err(HarnessError::SlapdStart(format!(
                "slapcat exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        String::from_utf8(output.stdout)
            .map_err(|e| HarnessError::SlapdStart(format!("slapcat output is not UTF-8: {e}")))
    }

    /// Stops slapd, adds `ldif` (entries in LDIF, parents before children) to the main
    /// database with `slapadd -q` and starts slapd again on the same port. slapadd fills
    /// in `entryUUID`, `entryCSN` and the timestamps.
    pub fn slapadd(&mut self, ldif: &str) -> Result<()> {
        let file = self.path.join("bulk.ldif");
        fs::write(&file, ldif).map_err(io_context("writing the bulk LDIF"))?;
        self.stop(Duration::from_secs(30))?;
        let output = Command::new("/usr/sbin/slapadd")
            .args(self.config_args())
            .args(["-b", BASE, "-q", "-l"])
            .arg(&file)
            .output()
            .map_err(io_context("running slapadd"));
        let _ = fs::remove_file(&file);
        let started = self.restart();
        let output = output?;
        if !output.status.success() {
            return Err(HarnessError::SlapdStart(format!(
                "slapadd exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        started
    }
}

/// TLS (StartTLS on the `ldap://` port) for [`SlapdConfig::tls`].
impl SlapdConfig {
    pub fn tls(mut self, on: bool) -> SlapdConfig {
        self.tls = on;
        self
    }
}

impl Slapd {
    /// The throwaway CA that signed the server certificate of a [`SlapdConfig::tls`]
    /// instance (PEM): what a client must trust, e.g. via `SSL_CERT_FILE`.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.path.join("tls/ca.pem")
    }

    /// `ldap://localhost:<port>/`, the other name the TLS server certificate carries.
    pub fn ldap_url_localhost(&self) -> String {
        format!("ldap://localhost:{}/", self.port)
    }
}

/// Writes `ca.pem` (a self-signed CA), `server.pem` (signed by it, subjectAltName
/// `IP:127.0.0.1, DNS:localhost`) and `server.key` into `dir`, with the `openssl` tool.
/// EC P-256 keys: generated in milliseconds.
fn generate_tls_material(dir: &Path) -> Result<()> {
    fs::create_dir(dir).map_err(io_context("creating the TLS directory"))?;
    fs::write(
        dir.join("ca.cnf"),
        "[req]
distinguished_name = dn
prompt = no
[dn]
CN = univention-directory-listener test CA
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
",
    )
    .map_err(io_context("writing ca.cnf"))?;
    fs::write(
        dir.join("server.ext"),
        "basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1,DNS:localhost
",
    )
    .map_err(io_context("writing server.ext"))?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509", "-config", "ca.cnf", "-extensions", "v3_ca"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "30"],
        ]
        .concat(),
    )?;
    openssl(
        dir,
        &[
            &["req", "-new", "-config", "ca.cnf", "-subj", "/CN=127.0.0.1"][..],
            &ec,
            &["-keyout", "server.key", "-out", "server.csr"],
        ]
        .concat(),
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "2",
            "-days",
            "30",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    )
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(io_context("running openssl (is it installed?)"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(HarnessError::SlapdStart(format!(
            "openssl {} exited with {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}
