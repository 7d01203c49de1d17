//! Command line and UCR defaults of `univention-directory-notifier`.
//!
//! Precedence: command line, then UCR `notifier/*` variables from
//! `/etc/univention/base.conf`, then the UCS defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use daemon::ucr::Ucr;
use ldap::{Auth, Password};

use crate::server::access::{self, Cidr};
use crate::server::tls::{TlsFiles, TlsPolicy};

/// UCS's machine certificates: `<dir>/<fqdn>/cert.pem` and `private.key`, and the domain CA.
pub const UCS_SSL_DIR: &str = "/etc/univention/ssl";
pub const UCS_CA_FILE: &str = "/etc/univention/ssl/ucsCA/CAcert.pem";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IntakeKind {
    /// The UCS translog overlay's queue file `<ldap-dir>/listener/listener`.
    File,
    /// Stock OpenLDAP: follow `cn=accesslog` with a syncrepl search.
    Accesslog,
}

/// Univention Directory Notifier: numbers every LDAP write as a transaction `ID DN CMD`,
/// keeps the transaction log and its index, writes `reqSession=ID,cn=translog`, and serves
/// the ids to listeners on TCP port 6669 (protocol 2 GET_DN, protocol 3 WAIT_ID).
///
/// Defaults come from UCR (`/etc/univention/base.conf`) when it exists: notifier/debug/level,
/// notifier/cache/size, notifier/lock/count, notifier/lock/time, notifier/protocol/version,
/// ldap/base, notifier/tls/policy, notifier/tls/certificate, notifier/tls/key,
/// notifier/tls/ca, notifier/allow, notifier/intake, hostname, domainname.
#[derive(Debug, Parser)]
#[command(
    name = "univention-directory-notifier",
    version,
    // Like getopt, a repeated option takes the last value.
    args_override_self = true
)]
pub struct Cli {
    /// Stay in the foreground (always the case under systemd).
    #[arg(short = 'F')]
    pub foreground: bool,
    /// Debug level 0-4 (ERROR, WARN, PROCESS, INFO, ALL); SIGUSR1/SIGUSR2 raise/lower it.
    #[arg(short = 'd', value_name = "LEVEL", value_parser = clap::value_parser!(u8).range(0..=4))]
    pub debug: Option<u8>,
    /// Number of recent transactions kept in memory.
    #[arg(short = 'C', value_name = "N")]
    pub cache_size: Option<usize>,
    /// Attempts to take a lock before giving up for now.
    #[arg(short = 'L', value_name = "N")]
    pub lock_count: Option<u32>,
    /// Microseconds between lock attempts.
    #[arg(short = 'T', value_name = "USEC")]
    pub lock_time: Option<u64>,
    /// Minimum protocol version accepted from clients (1-3).
    #[arg(short = 'v', value_name = "VERSION", value_parser = clap::value_parser!(u32).range(1..=3))]
    pub min_version: Option<u32>,
    /// Deprecated UCS option; ignored.
    #[arg(short = 'o', hide = true)]
    pub deprecated_o: bool,
    /// Deprecated UCS option; ignored.
    #[arg(short = 'r', hide = true)]
    pub deprecated_r: bool,
    /// Deprecated UCS option; ignored.
    #[arg(short = 's', hide = true)]
    pub deprecated_s: bool,
    /// Deprecated UCS option; ignored.
    #[arg(short = 'S', hide = true, value_name = "X")]
    pub deprecated_big_s: Option<String>,

    /// TCP port for listeners.
    #[arg(long, default_value_t = 6669)]
    pub port: u16,
    /// Address to listen on (default: dual-stack any, falling back to IPv4 any).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::IpAddr>,
    /// Directory holding listener/, notify/ and schema/id/.
    #[arg(
        long,
        value_name = "DIR",
        env = "UDN_LDAP_DIR",
        default_value = "/var/lib/univention-ldap"
    )]
    pub ldap_dir: PathBuf,
    /// Where transactions come from (default: UCR notifier/intake, which a promotion sets,
    /// else file).
    #[arg(long, value_enum)]
    pub intake: Option<IntakeKind>,
    /// LDAP server holding cn=accesslog (accesslog intake).
    #[arg(long, value_name = "URI", default_value = "ldapi:///")]
    pub accesslog_uri: String,
    /// Base of the access log.
    #[arg(long, value_name = "DN", default_value = "cn=accesslog")]
    pub accesslog_base: String,
    /// Simple-bind DN for the accesslog connection (default: SASL EXTERNAL over ldapi).
    #[arg(long, value_name = "DN")]
    pub accesslog_bind_dn: Option<String>,
    /// File whose first line is the accesslog bind password.
    #[arg(long, value_name = "FILE")]
    pub accesslog_password_file: Option<PathBuf>,
    /// With no stored position, replay the retained access log instead of starting after
    /// its newest entry.
    #[arg(long)]
    pub accesslog_replay: bool,
    /// LDAP server holding cn=translog, written with SASL EXTERNAL.
    #[arg(long, value_name = "URI", default_value = "ldapi:///")]
    pub translog_uri: String,
    /// Base of the translog database.
    #[arg(long, value_name = "DN", default_value = "cn=translog")]
    pub translog_base: String,
    /// Do not write cn=translog (only protocol-2 listeners can then follow).
    #[arg(long)]
    pub no_translog: bool,
    /// LDAP base; DN of the no-op transactions that fill gaps (default: UCR ldap/base).
    #[arg(long, value_name = "DN")]
    pub ldap_base: Option<String>,
    /// Serve Prometheus metrics on this address; a bare port (9669) means 127.0.0.1:9669.
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = daemon::metrics::parse_address)]
    pub metrics: Option<SocketAddr>,
    /// PID file.
    #[arg(long, value_name = "FILE", default_value = "/var/run/udsnotifier.pid")]
    pub pid_file: PathBuf,
    /// Log to this file (reopened on SIGHUP) instead of stderr; ignored under journald.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Maximum simultaneous client connections.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub max_connections: usize,
    /// Drop a client that has not read its answers for this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub client_write_timeout: f64,
    /// Close a connection that has not completed its handshake within this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub handshake_timeout: f64,
    /// Close a connection that waits for nothing and sends nothing for this many seconds;
    /// one with a pending WAIT_ID or GET_DN stays however long it waits.
    #[arg(long, value_name = "SECONDS", default_value_t = 900.0)]
    pub idle_timeout: f64,
    /// Connections one client address may hold at once, so one host cannot lock others out.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_connections_per_address: usize,
    /// Seconds between safety polls of the queue and schema files (inotify does the rest).
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    pub poll_interval: f64,
    /// Largest id jump in the queue file filled with no-ops; larger jumps are quarantined.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub max_gap: u64,
    /// File intake: say at level 2 which queue file is waited on after this many seconds
    /// without a transaction, and again every as many seconds; 0: never.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600.0)]
    pub idle_report: f64,
    /// TLS policy on the client port: optional (STARTTLS offered when a certificate is
    /// available, plain clients served too), required (every client upgrades before any
    /// request), client-cert (and presents a certificate issued by --tls-ca). UCR:
    /// notifier/tls/policy.
    #[arg(long, value_enum, value_name = "POLICY")]
    pub tls_policy: Option<TlsPolicy>,
    /// Certificate (PEM chain) offered with STARTTLS. UCR: notifier/tls/certificate;
    /// default /etc/univention/ssl/<fqdn>/cert.pem, used when it exists.
    #[arg(long, value_name = "FILE")]
    pub tls_certificate: Option<PathBuf>,
    /// Private key of the certificate. UCR: notifier/tls/key; default
    /// /etc/univention/ssl/<fqdn>/private.key.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates client certificates must chain to (policy client-cert). UCR:
    /// notifier/tls/ca; default /etc/univention/ssl/ucsCA/CAcert.pem.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Admit clients only from these address blocks (ADDR/PREFIX, comma-separated,
    /// repeatable), in plain text and TLS alike; default: all. UCR: notifier/allow.
    #[arg(long, value_name = "CIDR[,CIDR...]")]
    pub allow: Vec<String>,
    /// UCR file to read defaults from.
    #[arg(long, value_name = "FILE", default_value = daemon::ucr::BASE_CONF)]
    pub ucr_file: PathBuf,
}

/// Everything the daemon needs, resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub foreground: bool,
    pub debug_level: u8,
    pub cache_size: usize,
    pub lock_attempts: u32,
    pub lock_delay: Duration,
    pub min_version: u32,
    pub port: u16,
    pub listen: Option<SocketAddr>,
    pub ldap_dir: PathBuf,
    pub intake: IntakeKind,
    pub accesslog_uri: String,
    pub accesslog_base: String,
    pub accesslog_auth: Auth,
    pub accesslog_replay: bool,
    pub translog: Option<(String, String)>,
    pub ldap_base: Option<String>,
    pub metrics: Option<SocketAddr>,
    pub pid_file: PathBuf,
    pub log_file: Option<PathBuf>,
    pub max_connections: usize,
    pub client_write_timeout: Duration,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections_per_address: usize,
    pub poll_interval: Duration,
    /// Zero: no idle reports.
    pub idle_report: Duration,
    pub max_gap: u64,
    pub tls_policy: TlsPolicy,
    /// `None`: STARTTLS is not offered.
    pub tls: Option<TlsFiles>,
    pub allow: Vec<Cidr>,
    /// Deprecated options given, to warn about once logging is up.
    pub ignored_options: Vec<&'static str>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the password file {path}: {source}")]
    PasswordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid value for {option}: {reason}")]
    Invalid {
        option: &'static str,
        reason: String,
    },
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

/// The TLS policy and files. A certificate named on the command line or in UCR must load; the
/// UCS default is used only when it exists, so a host without one keeps serving plain text.
fn tls(cli: &Cli, ucr: &Ucr) -> Result<(TlsPolicy, Option<TlsFiles>), ConfigError> {
    let policy = match cli.tls_policy {
        Some(policy) => policy,
        None => match ucr.get("notifier/tls/policy") {
            None | Some("") => TlsPolicy::default(),
            Some(text) => <TlsPolicy as clap::ValueEnum>::from_str(text, true).map_err(|_| {
                ConfigError::Invalid {
                    option: "notifier/tls/policy",
                    reason: format!("{text:?}: expected optional, required or client-cert"),
                }
            })?,
        },
    };
    let path = |given: &Option<PathBuf>, key: &str| {
        given
            .clone()
            .or_else(|| ucr.get(key).filter(|v| !v.is_empty()).map(PathBuf::from))
    };
    let explicit = path(&cli.tls_certificate, "notifier/tls/certificate");
    let machine_dir = PathBuf::from(UCS_SSL_DIR).join(fqdn(ucr));
    let certificate = match explicit {
        Some(file) => file,
        None => {
            let default = machine_dir.join("cert.pem");
            if !default.exists() && !policy.requires_tls() {
                return Ok((policy, None));
            }
            default
        }
    };
    let key =
        path(&cli.tls_key, "notifier/tls/key").unwrap_or_else(|| machine_dir.join("private.key"));
    let ca = path(&cli.tls_ca, "notifier/tls/ca");
    let ca = match (ca, policy) {
        (Some(ca), _) => Some(ca),
        (None, TlsPolicy::ClientCert) => Some(PathBuf::from(UCS_CA_FILE)),
        (None, _) => None,
    };
    Ok((
        policy,
        Some(TlsFiles {
            certificate,
            key,
            ca,
        }),
    ))
}

fn allow_list(cli: &Cli, ucr: &Ucr) -> Result<Vec<Cidr>, ConfigError> {
    let (option, text) = if cli.allow.is_empty() {
        (
            "notifier/allow",
            ucr.get("notifier/allow").unwrap_or_default().to_owned(),
        )
    } else {
        ("--allow", cli.allow.join(","))
    };
    access::parse_list(&text).map_err(|reason| ConfigError::Invalid { option, reason })
}

fn seconds(option: &'static str, value: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(value).map_err(|err| ConfigError::Invalid {
        option,
        reason: err.to_string(),
    })
}

impl Config {
    pub fn resolve(cli: Cli, ucr: &Ucr) -> Result<Config, ConfigError> {
        let min_version = cli
            .min_version
            .or_else(|| {
                ucr.get_parsed::<u32>("notifier/protocol/version")
                    .filter(|v| (1..=3).contains(v))
            })
            .unwrap_or(2);
        let password = cli
            .accesslog_password_file
            .as_deref()
            .map(|path| {
                Password::from_file(path).map_err(|source| ConfigError::PasswordFile {
                    path: path.to_owned(),
                    source,
                })
            })
            .transpose()?;
        // Like the tools: a bind DN means a simple bind, else SASL EXTERNAL (over ldapi).
        let accesslog_auth = match cli.accesslog_bind_dn.clone() {
            Some(dn) => Auth::for_tool(&cli.accesslog_uri, Some(dn), password),
            None => Auth::SaslExternal,
        };
        let (tls_policy, tls) = tls(&cli, ucr)?;
        let allow = allow_list(&cli, ucr)?;
        let mut ignored_options = Vec::new();
        for (given, name) in [
            (cli.deprecated_o, "-o"),
            (cli.deprecated_r, "-r"),
            (cli.deprecated_s, "-s"),
            (cli.deprecated_big_s.is_some(), "-S"),
        ] {
            if given {
                ignored_options.push(name);
            }
        }
        Ok(Config {
            foreground: cli.foreground,
            debug_level: cli
                .debug
                .or_else(|| ucr.get_parsed::<u8>("notifier/debug/level"))
                .unwrap_or(2)
                .min(4),
            cache_size: cli
                .cache_size
                .or_else(|| ucr.get_parsed("notifier/cache/size"))
                .unwrap_or(1000),
            lock_attempts: cli
                .lock_count
                .or_else(|| ucr.get_parsed("notifier/lock/count"))
                .unwrap_or(100),
            lock_delay: Duration::from_micros(
                cli.lock_time
                    .or_else(|| ucr.get_parsed("notifier/lock/time"))
                    .unwrap_or(100),
            ),
            min_version,
            port: cli.port,
            listen: cli.listen.map(|ip| SocketAddr::new(ip, cli.port)),
            ldap_dir: cli.ldap_dir,
            intake: cli.intake.unwrap_or(match ucr.get("notifier/intake") {
                Some("accesslog") => IntakeKind::Accesslog,
                _ => IntakeKind::File,
            }),
            accesslog_uri: cli.accesslog_uri,
            accesslog_base: cli.accesslog_base,
            accesslog_auth,
            accesslog_replay: cli.accesslog_replay,
            translog: (!cli.no_translog).then_some((cli.translog_uri, cli.translog_base)),
            ldap_base: cli
                .ldap_base
                .or_else(|| ucr.get("ldap/base").map(str::to_owned)),
            metrics: cli.metrics,
            pid_file: cli.pid_file,
            log_file: cli.log_file,
            max_connections: cli.max_connections.max(1),
            client_write_timeout: seconds("--client-write-timeout", cli.client_write_timeout)?,
            handshake_timeout: seconds("--handshake-timeout", cli.handshake_timeout)?,
            idle_timeout: seconds("--idle-timeout", cli.idle_timeout)?,
            max_connections_per_address: cli.max_connections_per_address.max(1),
            poll_interval: seconds("--poll-interval", cli.poll_interval)?,
            idle_report: seconds("--idle-report", cli.idle_report)?,
            max_gap: cli.max_gap,
            tls_policy,
            tls,
            allow,
            ignored_options,
        })
    }

    pub fn notify_dir(&self) -> PathBuf {
        self.ldap_dir.join(daemon::paths::NOTIFY_DIR)
    }

    pub fn listener_dir(&self) -> PathBuf {
        daemon::paths::QueueFiles::in_ldap_dir(&self.ldap_dir)
            .dir()
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(
            std::iter::once("univention-directory-notifier").chain(args.iter().copied()),
        )
        .unwrap()
    }

    #[test]
    fn ucs_options_parse() {
        let cli = parse(&[
            "-F", "-d", "3", "-C", "500", "-L", "7", "-T", "250", "-v", "3", "-o", "-S", "x",
        ]);
        let config = Config::resolve(cli, &Ucr::default()).unwrap();
        assert!(config.foreground);
        assert_eq!(config.debug_level, 3);
        assert_eq!(config.cache_size, 500);
        assert_eq!(config.lock_attempts, 7);
        assert_eq!(config.lock_delay, Duration::from_micros(250));
        assert_eq!(config.min_version, 3);
        assert_eq!(config.ignored_options, ["-o", "-S"]);
        assert_eq!(config.port, 6669);
    }

    #[test]
    fn version_outside_one_to_three_is_rejected() {
        let err = Cli::try_parse_from(["udn", "-v", "4"]).unwrap_err();
        assert!(err.to_string().contains("-v"), "{err}");
    }

    #[test]
    fn ucr_supplies_defaults_and_the_command_line_wins() {
        let ucr = Ucr::parse(
            "notifier/debug/level: 1\nnotifier/cache/size: 42\nnotifier/protocol/version: 3\nldap/base: dc=x\n",
        );
        let config = Config::resolve(parse(&[]), &ucr).unwrap();
        assert_eq!(config.debug_level, 1);
        assert_eq!(config.cache_size, 42);
        assert_eq!(config.min_version, 3);
        assert_eq!(config.ldap_base.as_deref(), Some("dc=x"));
        let config = Config::resolve(parse(&["-C", "7", "-v", "2"]), &ucr).unwrap();
        assert_eq!(config.cache_size, 7);
        assert_eq!(config.min_version, 2);
        assert_eq!(config.intake, IntakeKind::File);
        // A promotion sets the intake in UCR; the command line still wins.
        let promoted = Ucr::parse("notifier/intake: accesslog\n");
        let config = Config::resolve(parse(&[]), &promoted).unwrap();
        assert_eq!(config.intake, IntakeKind::Accesslog);
        let config = Config::resolve(parse(&["--intake", "file"]), &promoted).unwrap();
        assert_eq!(config.intake, IntakeKind::File);
    }

    #[test]
    fn tls_files_and_policy_from_flags_and_ucr() {
        let ucr = Ucr::parse(
            "hostname: primary\ndomainname: example.test\nnotifier/tls/policy: required\n\
             notifier/allow: 10.0.0.0/8 192.0.2.1\n",
        );
        let config = Config::resolve(parse(&[]), &ucr).unwrap();
        assert_eq!(config.tls_policy, TlsPolicy::Required);
        let files = config.tls.unwrap();
        assert_eq!(
            files.certificate,
            PathBuf::from("/etc/univention/ssl/primary.example.test/cert.pem")
        );
        assert_eq!(
            files.key,
            PathBuf::from("/etc/univention/ssl/primary.example.test/private.key")
        );
        assert_eq!(files.ca, None);
        assert_eq!(config.allow.len(), 2);

        let config = Config::resolve(
            parse(&[
                "--tls-policy",
                "client-cert",
                "--tls-certificate",
                "/c.pem",
                "--tls-key",
                "/k.pem",
                "--allow",
                "::1",
            ]),
            &ucr,
        )
        .unwrap();
        assert_eq!(config.tls_policy, TlsPolicy::ClientCert);
        let files = config.tls.unwrap();
        assert_eq!(files.certificate, PathBuf::from("/c.pem"));
        assert_eq!(files.ca, Some(PathBuf::from(UCS_CA_FILE)));
        assert_eq!(config.allow.len(), 1);

        let bad = Ucr::parse("notifier/tls/policy: maybe\n");
        let err = Config::resolve(parse(&[]), &bad).unwrap_err();
        assert!(err.to_string().contains("notifier/tls/policy"), "{err}");
        let err = Config::resolve(parse(&["--allow", "10.0.0.0/99"]), &Ucr::default()).unwrap_err();
        assert!(err.to_string().contains("--allow"), "{err}");
    }

    #[test]
    fn defaults_match_ucs() {
        let config = Config::resolve(parse(&[]), &Ucr::default()).unwrap();
        assert_eq!(config.min_version, 2);
        assert_eq!(config.cache_size, 1000);
        assert_eq!(config.lock_attempts, 100);
        assert_eq!(config.lock_delay, Duration::from_micros(100));
        assert_eq!(config.pid_file, PathBuf::from("/var/run/udsnotifier.pid"));
        assert!(config.translog.is_some());
        assert_eq!(config.tls_policy, TlsPolicy::Optional);
        assert!(config.allow.is_empty());
    }
}
