//! Command line, UCR defaults and server selection of `univention-directory-listener`.
//!
//! Precedence: command line, then UCR variables from `/etc/univention/base.conf` (spec
//! listener.md §8.1), then the UCS defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser};
use daemon::ucr::Ucr;
use ldap::{Auth, Password, StartTls};
use proto::{ClientTls, ClientTlsFiles, TlsError, TlsMode};

pub const DEFAULT_CACHE_DIR: &str = "/var/lib/univention-directory-listener";
pub const DEFAULT_LDAP_DIR: &str = "/var/lib/univention-ldap";
pub const DEFAULT_FAILED_LDIF: &str = "/var/lib/univention-directory-replication/failed.ldif";
pub(crate) const DEFAULT_NOTIFIER_PORT: u16 = 6669;

/// Univention Directory Listener: follows the notifier's transactions in order, fetches each
/// changed object from LDAP, compares it with the local cache and calls the handler modules
/// (Python files from the -m directories, or built-in native modules).
///
/// Defaults come from UCR (/etc/univention/base.conf) when it exists: server/role,
/// ldap/master, ldap/backup, notifier/server, ldap/base, listener/*.
#[derive(Debug, Parser)]
#[command(
    name = "univention-directory-listener",
    version,
    // -h is the LDAP host, as in UCS; help stays available as --help.
    disable_help_flag = true,
    // Like getopt, a repeated option takes the last value.
    args_override_self = true
)]
pub struct Cli {
    /// Print help.
    #[arg(long, action = ArgAction::Help)]
    pub help: Option<bool>,
    /// Debug level 0-4 (ERROR, WARN, PROCESS, INFO, ALL); SIGUSR1/SIGUSR2 raise/lower it.
    #[arg(short = 'd', value_name = "LEVEL", value_parser = clap::value_parser!(u8).range(0..=4))]
    pub debug: Option<u8>,
    /// Stay in the foreground (always the case: run it under systemd).
    #[arg(short = 'F')]
    pub foreground: bool,
    /// LDAP URI (default ldap://<host>:<port>).
    #[arg(short = 'H', value_name = "URI")]
    pub uri: Option<String>,
    /// LDAP host; also the notifier host, like UCS.
    #[arg(short = 'h', value_name = "HOST")]
    pub host: Option<String>,
    /// LDAP port.
    #[arg(short = 'p', value_name = "PORT")]
    pub port: Option<u16>,
    /// LDAP base DN (default: UCR ldap/base).
    #[arg(short = 'b', value_name = "BASE")]
    pub base: Option<String>,
    /// Bind DN.
    #[arg(short = 'D', value_name = "DN")]
    pub bind_dn: Option<String>,
    /// Bind password (visible in the process list: prefer -y).
    #[arg(short = 'w', value_name = "PASSWORD")]
    pub password: Option<String>,
    /// Read the bind password from the first line of FILE (re-read when a bind fails, as
    /// machine passwords rotate).
    #[arg(short = 'y', value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Simple bind (default: SASL).
    #[arg(short = 'x')]
    pub simple: bool,
    /// StartTLS; twice (-ZZ) to require it.
    #[arg(short = 'Z', action = ArgAction::Count)]
    pub starttls: u8,
    /// SASL mechanism (only EXTERNAL is supported).
    #[arg(short = 'Y', value_name = "MECH")]
    pub sasl_mech: Option<String>,
    /// SASL authorisation id (not used by EXTERNAL).
    #[arg(short = 'U', value_name = "NAME")]
    pub sasl_authzid: Option<String>,
    /// SASL realm (not used by EXTERNAL).
    #[arg(short = 'R', value_name = "REALM")]
    pub sasl_realm: Option<String>,
    /// Module directory or single module file; repeatable, order kept.
    #[arg(short = 'm', value_name = "PATH", action = ArgAction::Append)]
    pub modules: Vec<PathBuf>,
    /// Only use the DC Backup notifiers (do not add ldap/master to the candidates).
    #[arg(short = 'B')]
    pub backup_only: bool,
    /// Cache directory.
    #[arg(short = 'c', value_name = "DIR", env = "UDL_CACHE_DIR", default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// LDAP state directory: schema/id/id, cascade file listener/listener.
    #[arg(short = 'l', value_name = "DIR", default_value = DEFAULT_LDAP_DIR)]
    pub ldap_dir: PathBuf,
    /// Start from scratch: purge the cache and all module states, initialise every module.
    #[arg(short = 'g')]
    pub purge: bool,
    /// Like -g, initialise the modules, then exit.
    #[arg(short = 'i')]
    pub init_only: bool,
    /// Initialise the modules that are not ready, keeping the cache, then exit.
    #[arg(short = 'P')]
    pub init_keep_cache: bool,
    /// Write every transaction to <ldap-dir>/listener/listener for a local notifier.
    #[arg(short = 'o')]
    pub cascade: bool,

    /// Notifier host (default: the LDAP host).
    #[arg(long, value_name = "HOST")]
    pub notifier_host: Option<String>,
    /// Notifier port (default: UCR notifier/server/port, else 6669).
    #[arg(long, value_name = "PORT")]
    pub notifier_port: Option<u16>,
    /// Notifier protocol: 3 (WAIT_ID + cn=translog) or 2 (GET_DN).
    #[arg(long, value_name = "VERSION", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(2..=3))]
    pub protocol: u32,
    /// Idle seconds before postrun runs and LDAP connections close.
    #[arg(long, value_name = "SECS", default_value_t = 15.0)]
    pub postrun_delay: f64,
    /// Seconds between ALIVE probes of the notifier connection while waiting for the next
    /// transaction (UCS: 300); a probe unanswered for --alive-timeout marks the connection
    /// dead, and it is replaced.
    #[arg(long, value_name = "SECS", default_value_t = 3.0)]
    pub alive_interval: f64,
    /// Seconds an ALIVE probe, a connect or a handshake with the notifier may take.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub alive_timeout: f64,
    /// Seconds to wait for a notifier reply (other than a pending WAIT_ID).
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    pub notifier_timeout: f64,
    /// Seconds at most between two syncs of the cache: every commit survives a crash of
    /// the process at once, a power loss can take the commits of this last interval.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub sync_interval: f64,
    /// Seconds allowed per LDAP operation.
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    pub ldap_timeout: f64,
    /// Seconds a stop request waits for a module call that does not return; then the
    /// listener exits without finishing that transaction (it is redone at the next start).
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub stop_timeout: f64,
    /// Seconds before a module whose initialisation failed is tried again; the wait
    /// doubles per failure up to an hour.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub init_retry: f64,
    /// Seconds a module call may run before the status reports it as blocked (and
    /// unhealthy).
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub blocked_after: f64,
    /// Serve Prometheus metrics on this address; a bare port (9670) means 127.0.0.1:9670.
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = daemon::metrics::parse_address)]
    pub metrics: Option<SocketAddr>,
    /// Built-in module: jsonl=FILE, exec=COMMAND, or KIND=@CONFIG-FILE; repeatable.
    #[arg(long = "native-module", value_name = "NAME[=ARG]", action = ArgAction::Append)]
    pub native_modules: Vec<String>,
    /// Replication stops while this file exists.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_FAILED_LDIF)]
    pub failed_ldif: PathBuf,
    /// Base of the translog entries (protocol 3).
    #[arg(long, value_name = "DN", default_value = "cn=translog")]
    pub translog_base: String,
    /// Local LDAP server for the parent checks of replicating roles (backup, replica).
    #[arg(long, value_name = "URI", default_value = "ldap://localhost:389/")]
    pub local_ldap: String,
    /// User whose effective uid/gid the daemon takes when started as root.
    #[arg(long, value_name = "NAME", default_value = "listener")]
    pub user: String,
    /// Log to this file (reopened on SIGHUP) instead of stderr; ignored under journald.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    #[command(flatten)]
    pub notifier_tls: NotifierTlsArgs,
    /// UCR file to read defaults from.
    #[arg(long, value_name = "FILE", default_value = daemon::ucr::BASE_CONF)]
    pub ucr_file: PathBuf,
}

/// What the process does after startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    Daemon,
    /// -i / -P: initialise modules, then exit.
    InitOnly,
}

/// Server roles, as UCR `server/role` names them.
pub mod role {
    pub(crate) const MASTER: &str = "domaincontroller_master";
    pub const BACKUP: &str = "domaincontroller_backup";
    pub(crate) const SLAVE: &str = "domaincontroller_slave";
}

/// Everything the daemon needs, resolved from the command line and UCR.
#[derive(Debug, Clone)]
pub struct Config {
    pub debug: u8,
    pub ldap: LdapTarget,
    pub base: String,
    pub auth: Auth,
    pub starttls: StartTls,
    pub protocol: u32,
    pub notifier_tls: ClientTls,
    pub module_paths: Vec<PathBuf>,
    pub native_modules: Vec<String>,
    pub cache_dir: PathBuf,
    pub ldap_dir: PathBuf,
    pub purge: bool,
    pub mode: RunMode,
    pub cascade: bool,
    pub postrun_delay: Duration,
    pub alive_interval: Duration,
    pub alive_timeout: Duration,
    pub notifier_timeout: Duration,
    pub ldap_timeout: Duration,
    pub sync_interval: Duration,
    pub stop_timeout: Duration,
    pub init_retry: Duration,
    pub blocked_after: Duration,
    pub scan_timeout: Duration,
    pub ldap_retries: u32,
    pub metrics: Option<SocketAddr>,
    pub failed_ldif: PathBuf,
    pub freespace_mib: u64,
    pub translog_base: String,
    pub role: Option<String>,
    pub cache_filter: Option<String>,
    pub memberuid_skip: bool,
    pub uniquemember_skip: bool,
    pub local_ldap: String,
    pub user: String,
    pub log_file: Option<PathBuf>,
    pub ucr_file: PathBuf,
    pub ucr: Ucr,
}

/// Which LDAP server and notifier to follow: fixed by the command line, or chosen from UCR
/// again after every connection failure (spec §1.4).
#[derive(Debug, Clone)]
pub enum LdapTarget {
    Fixed(Server),
    Select(Candidates),
}

/// One LDAP server with its notifier (always on the same host, spec §1.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub uri: String,
    pub host: String,
    pub notifier_host: String,
    pub notifier_port: u16,
}

/// The candidate list of spec §1.4 for roles other than master and backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidates {
    /// (host, LDAP port).
    pub hosts: Vec<(String, u16)>,
    pub notifier_port: u16,
    pub notifier_host_override: Option<String>,
}

impl Candidates {
    /// A random candidate (UCS picks randomly to spread replicas over the backups).
    pub fn pick(&self, seed: u64) -> Option<Server> {
        if self.hosts.is_empty() {
            return None;
        }
        let index = (seed % self.hosts.len() as u64) as usize;
        let (host, port) = self.hosts.get(index)?;
        Some(Server {
            uri: format!("ldap://{host}:{port}/"),
            host: host.clone(),
            notifier_host: self
                .notifier_host_override
                .clone()
                .unwrap_or_else(|| host.clone()),
            notifier_port: self.notifier_port,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no LDAP server: give -h HOST or -H URI, or set UCR ldap/master (and server/role) in {0}"
    )]
    NoServer(String),
    #[error("no LDAP base: give -b BASE or set UCR ldap/base")]
    NoBase,
    #[error("SASL mechanism {0} is not supported; use -Y EXTERNAL over ldapi:// or -x")]
    SaslMech(String),
    #[error("cannot read the password file {path}: {source}")]
    PasswordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the URI {0:?} names no host; add -h HOST or --notifier-host")]
    NoNotifierHost(String),
    #[error("{option} must be a positive number of seconds, not {value}")]
    Duration { option: &'static str, value: f64 },
    #[error("{option}: {reason}")]
    Invalid {
        option: &'static str,
        reason: String,
    },
    #[error("TLS to the notifier: {0}")]
    NotifierTls(#[from] TlsError),
}

/// UCS's machine certificates (`<dir>/<fqdn>/cert.pem`, `private.key`) and the domain CA.
pub const UCS_SSL_DIR: &str = "/etc/univention/ssl";
pub const UCS_CA_FILE: &str = "/etc/univention/ssl/ucsCA/CAcert.pem";

/// How the listener and the tools talk TLS to the notifier (STARTTLS on 6669).
#[derive(Debug, Clone, Default, Args)]
pub struct NotifierTlsArgs {
    /// STARTTLS to the notifier: off (UCS), try (plain text only when the notifier does not
    /// offer STARTTLS, never after a failed TLS handshake) or required. UCR:
    /// listener/notifier/tls.
    #[arg(long = "notifier-tls", value_name = "off|try|required", global = true)]
    pub mode: Option<TlsMode>,
    /// CA certificates the notifier's certificate must chain to. UCR:
    /// listener/notifier/tls/ca; default /etc/univention/ssl/ucsCA/CAcert.pem.
    #[arg(long = "notifier-tls-ca", value_name = "FILE", global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate for a notifier that requires one. UCR:
    /// listener/notifier/tls/certificate; default the machine certificate
    /// /etc/univention/ssl/<fqdn>/cert.pem when it and its key exist.
    #[arg(long = "notifier-tls-certificate", value_name = "FILE", global = true)]
    pub certificate: Option<PathBuf>,
    /// Private key of the client certificate. UCR: listener/notifier/tls/key; default
    /// /etc/univention/ssl/<fqdn>/private.key.
    #[arg(long = "notifier-tls-key", value_name = "FILE", global = true)]
    pub key: Option<PathBuf>,
    /// Name the notifier's certificate must carry (default: the notifier host as
    /// connected to). UCR: listener/notifier/tls/name.
    #[arg(long = "notifier-tls-name", value_name = "NAME", global = true)]
    pub server_name: Option<String>,
}

impl NotifierTlsArgs {
    /// The settings with UCR defaults, files loaded (so later privilege drops do not matter).
    pub fn resolve(&self, ucr: &Ucr) -> Result<ClientTls, ConfigError> {
        let mode = match self.mode {
            Some(mode) => mode,
            None => match ucr.get("listener/notifier/tls") {
                None | Some("") => TlsMode::Off,
                Some(text) => text.parse().map_err(|reason| ConfigError::Invalid {
                    option: "listener/notifier/tls",
                    reason,
                })?,
            },
        };
        if mode == TlsMode::Off {
            return Ok(ClientTls::off());
        }
        let path = |given: &Option<PathBuf>, key: &str| {
            given
                .clone()
                .or_else(|| ucr.get(key).filter(|v| !v.is_empty()).map(PathBuf::from))
        };
        let ca = path(&self.ca, "listener/notifier/tls/ca")
            .unwrap_or_else(|| PathBuf::from(UCS_CA_FILE));
        let certificate = path(&self.certificate, "listener/notifier/tls/certificate");
        let key = path(&self.key, "listener/notifier/tls/key");
        let identity = match (certificate, key) {
            (Some(certificate), Some(key)) => Some((certificate, key)),
            (Some(_), None) | (None, Some(_)) => return Err(TlsError::HalfIdentity.into()),
            (None, None) => {
                let dir = PathBuf::from(UCS_SSL_DIR).join(fqdn(ucr));
                let (certificate, key) = (dir.join("cert.pem"), dir.join("private.key"));
                (certificate.exists() && key.exists()).then_some((certificate, key))
            }
        };
        let server_name = self.server_name.clone().or_else(|| {
            ucr.get("listener/notifier/tls/name")
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        });
        Ok(ClientTls::new(
            mode,
            &ClientTlsFiles {
                ca,
                identity,
                server_name,
            },
        )?)
    }
}

/// The machine's name as UCS spells its certificate directory: UCR hostname.domainname.
fn fqdn(ucr: &Ucr) -> String {
    let host = ucr
        .get("hostname")
        .map_or_else(daemon::host::hostname, str::to_owned);
    match ucr.get("domainname") {
        Some(domain) if !domain.is_empty() && !host.contains('.') => format!("{host}.{domain}"),
        _ => host,
    }
}

fn seconds(option: &'static str, value: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or(ConfigError::Duration { option, value })
}

/// The host part of an `ldap://` / `ldaps://` URI.
pub(crate) fn uri_host(uri: &str) -> Option<String> {
    let rest = uri
        .strip_prefix("ldap://")
        .or_else(|| uri.strip_prefix("ldaps://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    (!host.is_empty()).then(|| host.to_owned())
}

impl Config {
    pub fn from_cli(cli: Cli) -> Result<Config, ConfigError> {
        let ucr = Ucr::load(&cli.ucr_file);
        Config::resolve(cli, ucr)
    }

    pub fn resolve(cli: Cli, ucr: Ucr) -> Result<Config, ConfigError> {
        let debug = cli
            .debug
            .or_else(|| ucr.get_parsed("listener/debug/level"))
            .unwrap_or(2)
            .min(4);
        let base = cli
            .base
            .clone()
            .or_else(|| ucr.get("ldap/base").map(str::to_owned))
            .ok_or(ConfigError::NoBase)?;
        let notifier_port = notifier_port(cli.notifier_port, &ucr);
        let ldap = ldap_target(&cli, &ucr, notifier_port)?;
        let auth = auth(&cli)?;
        let starttls = StartTls::from_z_count(cli.starttls);
        let notifier_tls = cli.notifier_tls.resolve(&ucr)?;
        let mode = if cli.init_only || cli.init_keep_cache {
            RunMode::InitOnly
        } else {
            RunMode::Daemon
        };
        let role = ucr.get("server/role").map(str::to_owned);
        Ok(Config {
            debug,
            ldap,
            base,
            auth,
            starttls,
            protocol: cli.protocol,
            notifier_tls,
            module_paths: cli.modules,
            native_modules: cli.native_modules,
            cache_dir: cli.cache_dir,
            ldap_dir: cli.ldap_dir,
            purge: cli.purge || cli.init_only,
            mode,
            // A promoted Backup keeps its -o in UDL_OPTS until the templates are redone: on a
            // Primary the local notifier numbers slapd's own changes, and a cascade would
            // announce every transaction a second time.
            cascade: cli.cascade && role.as_deref() != Some(role::MASTER),
            postrun_delay: seconds("--postrun-delay", cli.postrun_delay)?,
            alive_interval: seconds("--alive-interval", cli.alive_interval)?,
            alive_timeout: seconds("--alive-timeout", cli.alive_timeout)?,
            notifier_timeout: seconds("--notifier-timeout", cli.notifier_timeout)?,
            ldap_timeout: seconds("--ldap-timeout", cli.ldap_timeout)?,
            sync_interval: seconds("--sync-interval", cli.sync_interval)?,
            stop_timeout: seconds("--stop-timeout", cli.stop_timeout)?,
            init_retry: seconds("--init-retry", cli.init_retry)?,
            blocked_after: seconds("--blocked-after", cli.blocked_after)?,
            scan_timeout: Duration::from_secs(
                ucr.get_parsed("listener/timeout/scans").unwrap_or(7200),
            ),
            ldap_retries: ucr.get_parsed("listener/ldap/retries").unwrap_or(5),
            metrics: cli.metrics,
            failed_ldif: cli.failed_ldif,
            freespace_mib: ucr.get_parsed("listener/freespace").unwrap_or(0),
            translog_base: cli.translog_base,
            role,
            cache_filter: ucr.get("listener/cache/filter").map(str::to_owned),
            memberuid_skip: ucr.is_true("listener/memberuid/skip"),
            uniquemember_skip: ucr.is_true("listener/uniquemember/skip"),
            local_ldap: cli.local_ldap,
            user: cli.user,
            log_file: cli.log_file,
            ucr_file: cli.ucr_file,
            ucr,
        })
    }

    pub fn is_master(&self) -> bool {
        self.role.as_deref() == Some(role::MASTER)
    }

    /// Backup and replica directory nodes check parents in their local LDAP (spec §3.6).
    pub fn checks_parents(&self) -> bool {
        matches!(self.role.as_deref(), Some(role::BACKUP | role::SLAVE))
    }
}

/// The notifier port: the given one, else UCR `notifier/server/port`, else 6669.
pub fn notifier_port(given: Option<u16>, ucr: &Ucr) -> u16 {
    given
        .or_else(|| {
            ucr.get_parsed::<u16>("notifier/server/port")
                .filter(|p| *p > 0)
        })
        .unwrap_or(DEFAULT_NOTIFIER_PORT)
}

/// The notifier host the operator tools ask by default: UCR `notifier/server`, else
/// `ldap/master` (what UCS's `listener-ctrl status` asks), else `localhost`.
pub fn default_notifier_host(ucr: &Ucr) -> String {
    ucr.get("notifier/server")
        .or_else(|| ucr.get("ldap/master"))
        .unwrap_or("localhost")
        .to_owned()
}

fn auth(cli: &Cli) -> Result<Auth, ConfigError> {
    if !cli.simple {
        let mech = cli.sasl_mech.as_deref().unwrap_or("EXTERNAL");
        if !mech.eq_ignore_ascii_case("EXTERNAL") {
            return Err(ConfigError::SaslMech(mech.to_owned()));
        }
        return Ok(Auth::SaslExternal);
    }
    let Some(dn) = cli.bind_dn.clone() else {
        return Ok(Auth::Anonymous);
    };
    let password = match (&cli.password_file, &cli.password) {
        (Some(path), _) => {
            Password::from_file(path).map_err(|source| ConfigError::PasswordFile {
                path: path.clone(),
                source,
            })?
        }
        (None, Some(pw)) => Password::Literal(pw.clone()),
        (None, None) => Password::Literal(String::new()),
    };
    Ok(Auth::Simple { dn, password })
}

fn ldap_target(cli: &Cli, ucr: &Ucr, notifier_port: u16) -> Result<LdapTarget, ConfigError> {
    if cli.host.is_some() || cli.uri.is_some() {
        let port = cli.port.unwrap_or(389);
        let (uri, host) = match (&cli.uri, &cli.host) {
            (Some(uri), Some(host)) => (uri.clone(), host.clone()),
            (Some(uri), None) => (uri.clone(), uri_host(uri).unwrap_or_default()),
            (None, Some(host)) => (format!("ldap://{host}:{port}/"), host.clone()),
            (None, None) => (String::new(), String::new()),
        };
        let notifier_host = cli.notifier_host.clone().unwrap_or_else(|| host.clone());
        if notifier_host.is_empty() {
            return Err(ConfigError::NoNotifierHost(uri));
        }
        return Ok(LdapTarget::Fixed(Server {
            uri,
            host,
            notifier_host,
            notifier_port,
        }));
    }
    let port_of = |key: &str| {
        cli.port
            .or_else(|| ucr.get_parsed::<u16>(key).filter(|p| *p > 0))
            .unwrap_or(389)
    };
    let fixed = |host: &str, port: u16| {
        LdapTarget::Fixed(Server {
            uri: format!("ldap://{host}:{port}/"),
            host: host.to_owned(),
            notifier_host: cli.notifier_host.clone().unwrap_or_else(|| host.to_owned()),
            notifier_port,
        })
    };
    if let Some(host) = ucr.get("notifier/server") {
        return Ok(fixed(host, port_of("ldap/master/port")));
    }
    let Some(master) = ucr.get("ldap/master") else {
        return Err(ConfigError::NoServer(cli.ucr_file.display().to_string()));
    };
    let role = ucr.get("server/role").unwrap_or_default();
    if role == role::MASTER || role == role::BACKUP {
        return Ok(fixed(master, port_of("ldap/master/port")));
    }
    let backup_port = port_of("ldap/backup/port");
    let mut hosts: Vec<(String, u16)> = ucr
        .get("ldap/backup")
        .unwrap_or_default()
        .split_whitespace()
        .take(128)
        .map(|h| (h.to_owned(), backup_port))
        .collect();
    if !cli.backup_only || hosts.is_empty() {
        hosts.push((master.to_owned(), port_of("ldap/master/port")));
    }
    Ok(LdapTarget::Select(Candidates {
        hosts,
        notifier_port,
        notifier_host_override: cli.notifier_host.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut argv = vec!["univention-directory-listener"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap()
    }

    fn resolve(args: &[&str], ucr: &str) -> Result<Config, ConfigError> {
        Config::resolve(cli(args), Ucr::parse(ucr))
    }

    #[test]
    fn notifier_tls_from_flags_and_ucr() {
        let base = ["-h", "m", "-b", "dc=x", "-x"];
        let config = resolve(&base, "").unwrap();
        assert_eq!(config.notifier_tls.mode(), TlsMode::Off);
        // Off loads nothing, so missing files do not matter.
        let config = resolve(
            &[&base[..], &["--notifier-tls-ca", "/nonexistent"]].concat(),
            "",
        )
        .unwrap();
        assert_eq!(config.notifier_tls.mode(), TlsMode::Off);

        let err = resolve(&base, "listener/notifier/tls: sometimes\n").unwrap_err();
        assert!(
            err.to_string().starts_with("listener/notifier/tls: "),
            "{err}"
        );
        let err = resolve(
            &base,
            "listener/notifier/tls: try\nlistener/notifier/tls/ca: /nonexistent/ca.pem\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let err = resolve(
            &[
                &base[..],
                &[
                    "--notifier-tls",
                    "required",
                    "--notifier-tls-certificate",
                    "/c.pem",
                ],
            ]
            .concat(),
            "",
        )
        .unwrap_err();
        assert!(
            matches!(err, ConfigError::NotifierTls(TlsError::HalfIdentity)),
            "{err:?}"
        );
    }

    #[test]
    fn ucs_join_command_line_parses() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("machine.secret");
        std::fs::write(&secret, "s3cret\nignored\n").unwrap();
        let secret = secret.display().to_string();
        let config = resolve(
            &[
                "-F",
                "-d",
                "3",
                "-h",
                "master.example.com",
                "-b",
                "dc=example,dc=com",
                "-m",
                "/usr/lib/univention-directory-listener/system",
                "-m",
                "/opt/x.py",
                "-c",
                "/tmp/cache",
                "-o",
                "-ZZ",
                "-x",
                "-D",
                "cn=host,dc=example,dc=com",
                "-y",
                &secret,
            ],
            "",
        )
        .unwrap();
        assert_eq!(config.debug, 3);
        assert_eq!(config.starttls, StartTls::Require);
        assert!(config.cascade);
        assert_eq!(config.module_paths.len(), 2);
        let LdapTarget::Fixed(server) = &config.ldap else {
            panic!("fixed server expected")
        };
        assert_eq!(server.uri, "ldap://master.example.com:389/");
        assert_eq!(server.notifier_host, "master.example.com");
        assert_eq!(server.notifier_port, 6669);
        let Auth::Simple { dn, password } = &config.auth else {
            panic!("simple bind expected")
        };
        assert_eq!(dn, "cn=host,dc=example,dc=com");
        assert_eq!(password.current(), "s3cret");
        assert!(!format!("{:?}", config.auth).contains("s3cret"));
    }

    #[test]
    fn a_promoted_backup_ignores_its_cascade_option() {
        let args = ["-x", "-H", "ldap://10.0.0.5:7389/", "-b", "dc=x", "-o"];
        let backup = resolve(&args, "server/role: domaincontroller_backup\n").unwrap();
        assert!(backup.cascade);
        let primary = resolve(&args, "server/role: domaincontroller_master\n").unwrap();
        assert!(!primary.cascade);
    }

    #[test]
    fn notifier_host_comes_from_the_uri_when_no_host_is_given() {
        let config = resolve(&["-x", "-H", "ldap://10.0.0.5:7389/", "-b", "dc=x"], "").unwrap();
        let LdapTarget::Fixed(server) = &config.ldap else {
            panic!()
        };
        assert_eq!(server.notifier_host, "10.0.0.5");
        assert_eq!(uri_host("ldap://[::1]:389/").as_deref(), Some("::1"));
        assert_eq!(uri_host("ldapi:///"), None);
        assert!(matches!(
            resolve(&["-H", "ldapi:///", "-b", "dc=x"], ""),
            Err(ConfigError::NoNotifierHost(_))
        ));
        assert!(
            resolve(
                &["-H", "ldapi:///", "-b", "dc=x", "--notifier-host", "m"],
                ""
            )
            .is_ok()
        );
    }

    #[test]
    fn init_flags_and_defaults() {
        let c = resolve(&["-i", "-h", "m", "-b", "dc=x", "-x"], "").unwrap();
        assert_eq!(c.mode, RunMode::InitOnly);
        assert!(c.purge);
        let c = resolve(&["-P", "-h", "m", "-b", "dc=x", "-x"], "").unwrap();
        assert_eq!(c.mode, RunMode::InitOnly);
        assert!(!c.purge);
        assert_eq!(c.postrun_delay, Duration::from_secs(15));
        assert_eq!(c.alive_interval, Duration::from_secs(3));
        assert_eq!(c.alive_timeout, Duration::from_secs(5));
        assert_eq!(c.protocol, 3);
        assert!(matches!(c.auth, Auth::Anonymous));
        assert!(resolve(&["-h", "m", "-x"], "").is_err());
        assert!(resolve(&["-h", "m", "-b", "dc=x", "-Y", "GSSAPI"], "").is_err());
        assert!(resolve(&["-h", "m", "-b", "dc=x", "--postrun-delay", "0"], "").is_err());
    }

    #[test]
    fn ucr_supplies_defaults() {
        let ucr = "ldap/base: dc=ucs,dc=test\nlistener/debug/level: 4\nserver/role: domaincontroller_backup\n\
                   ldap/master: primary.ucs.test\nldap/master/port: 7389\nlistener/freespace: 10\n\
                   listener/cache/filter: (objectClass=person)\nlistener/memberuid/skip: yes\n";
        let c = resolve(&[], ucr).unwrap();
        assert_eq!(c.base, "dc=ucs,dc=test");
        assert_eq!(c.debug, 4);
        assert_eq!(c.freespace_mib, 10);
        assert!(c.checks_parents());
        assert!(c.memberuid_skip);
        assert!(!c.uniquemember_skip);
        assert_eq!(c.cache_filter.as_deref(), Some("(objectClass=person)"));
        let LdapTarget::Fixed(server) = &c.ldap else {
            panic!()
        };
        assert_eq!(server.uri, "ldap://primary.ucs.test:7389/");
    }

    #[test]
    fn replicas_choose_among_backups_and_master() {
        let ucr = "ldap/base: dc=x\nserver/role: domaincontroller_slave\nldap/master: m\n\
                   ldap/backup: b1 b2\nnotifier/server/port: 7000\n";
        let c = resolve(&[], ucr).unwrap();
        let LdapTarget::Select(candidates) = &c.ldap else {
            panic!()
        };
        let hosts: Vec<_> = candidates.hosts.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(hosts, ["b1", "b2", "m"]);
        assert_eq!(candidates.pick(4).unwrap().host, "b2");
        assert_eq!(candidates.pick(4).unwrap().notifier_port, 7000);
        let c = resolve(&["-B"], ucr).unwrap();
        let LdapTarget::Select(candidates) = &c.ldap else {
            panic!()
        };
        assert_eq!(candidates.hosts.len(), 2);
        // notifier/server wins over everything else.
        let c = resolve(&[], &format!("{ucr}notifier/server: n1\n")).unwrap();
        let LdapTarget::Fixed(server) = &c.ldap else {
            panic!()
        };
        assert_eq!(server.host, "n1");
        assert_eq!(server.notifier_port, 7000);
        assert!(matches!(
            resolve(&[], "ldap/base: dc=x\n"),
            Err(ConfigError::NoServer(_))
        ));
    }

    #[test]
    fn tools_find_the_notifier_like_the_listener() {
        let ucr = Ucr::parse("ldap/master: m\nnotifier/server/port: 7000\n");
        assert_eq!(default_notifier_host(&ucr), "m");
        assert_eq!(notifier_port(None, &ucr), 7000);
        assert_eq!(notifier_port(Some(1), &ucr), 1);
        let ucr = Ucr::parse("ldap/master: m\nnotifier/server: n\n");
        assert_eq!(default_notifier_host(&ucr), "n");
        assert_eq!(notifier_port(None, &ucr), 6669);
        assert_eq!(default_notifier_host(&Ucr::parse("")), "localhost");
    }

    #[test]
    fn repeated_options_take_the_last_value_but_modules_accumulate() {
        let c = resolve(
            &[
                "-h", "a", "-h", "b", "-b", "dc=x", "-x", "-m", "m1", "-m", "m2",
            ],
            "",
        )
        .unwrap();
        let LdapTarget::Fixed(server) = &c.ldap else {
            panic!()
        };
        assert_eq!(server.host, "b");
        assert_eq!(c.module_paths, [PathBuf::from("m1"), PathBuf::from("m2")]);
    }
}
