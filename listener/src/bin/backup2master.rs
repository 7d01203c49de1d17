//! `univention-directory-backup2master`: promotes this DC Backup to Primary without
//! renumbering (spec replication.md §1.9). Prints the plan and the checks by default;
//! `--execute` carries it out, step by step, each step recorded in a state file so that a
//! run killed at any point completes when run again (like a UCS join script).
//!
//! Why it works: the Backup's notifier was fed through the cascade with exactly the
//! Primary's ids, and only with changes the local slapd holds (the cascade gate). Once
//! replication and cascade stop and the notifier has taken over the whole cascade, its last
//! id N is the Primary's last id the Backup holds; the intake switches to the local LDAP at
//! N + 1 (accesslog: a stored position at the accesslog's current CSN, so the replicated
//! writes already logged there are never numbered again; UCS translog: the overlay appends
//! to the same queue file).

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser, ValueEnum};
use daemon::paths::QueueFiles;
use daemon::ucr::Ucr;
use listener::cascade::{Cascade, HELD_FILE, read_held};
use listener::tools;

/// Promotes this DC Backup to Primary, keeping the transaction ids (no id reused or
/// skipped, no listener re-initialised). Without --execute only prints the checks and the
/// plan.
#[derive(Debug, Parser)]
#[command(name = "univention-directory-backup2master", version)]
struct Cli {
    /// Carry the plan out (default: print it).
    #[arg(long)]
    execute: bool,
    /// Go on although a check failed (old Primary answering, quarantine, failed.ldif,
    /// held cascade lines); every overridden check is logged as such.
    #[arg(long)]
    force: bool,
    /// Do not stop or restart services: print the systemctl commands instead. The listener
    /// must then be stopped before --execute.
    #[arg(long)]
    no_restart: bool,
    #[arg(long, value_name = "FILE", default_value = daemon::ucr::BASE_CONF)]
    ucr_file: PathBuf,
    /// The listener's cache directory.
    #[arg(
        short = 'c',
        long,
        env = "UDL_CACHE_DIR",
        default_value = "/var/lib/univention-directory-listener"
    )]
    cache_dir: PathBuf,
    /// The LDAP state directory shared by listener (cascade) and notifier.
    #[arg(long, env = "UDN_LDAP_DIR", default_value = "/var/lib/univention-ldap")]
    ldap_dir: PathBuf,
    /// The replication module's state directory (its quarantine).
    #[arg(long, default_value = "/var/lib/univention-directory-replication")]
    replication_state: PathBuf,
    #[arg(
        long,
        default_value = "/var/lib/univention-directory-replication/failed.ldif"
    )]
    failed_ldif: PathBuf,
    /// Where backup2master.log goes.
    #[arg(long, default_value = "/var/log/univention")]
    log_dir: PathBuf,
    /// The old Primary (default: UCR ldap/master).
    #[arg(long, value_name = "HOST")]
    old_primary: Option<String>,
    /// Its LDAP port (default: UCR ldap/master/port, else 7389).
    #[arg(long)]
    old_ldap_port: Option<u16>,
    #[arg(long, default_value_t = 6669)]
    old_notifier_port: u16,
    /// The local notifier's port.
    #[arg(long, default_value_t = 6669)]
    notifier_port: u16,
    /// The local notifier's intake after the promotion: `file` on UCS (slapd's translog
    /// overlay), `accesslog` on stock OpenLDAP (default: UCR notifier/intake, else file).
    #[arg(long, value_enum)]
    intake: Option<Intake>,
    /// The local LDAP server holding cn=accesslog (read with SASL EXTERNAL over ldapi).
    #[arg(long, default_value = "ldapi:///")]
    accesslog_uri: String,
    /// This host's name as the new Primary (default: UCR hostname.domainname).
    #[arg(long)]
    fqdn: Option<String>,
    /// How long to wait for the local notifier to take over the cascade.
    #[arg(long, default_value_t = 120)]
    drain_timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Intake {
    File,
    Accesslog,
}

impl Intake {
    fn name(self) -> &'static str {
        match self {
            Intake::File => "file",
            Intake::Accesslog => "accesslog",
        }
    }
}

const STEPS: [(&str, &str); 6] = [
    (
        "stop-listener",
        "stop the listener: replication and cascade end",
    ),
    (
        "release-held",
        "hand cascade lines held by the quarantine to the notifier (--force only)",
    ),
    (
        "drain-cascade",
        "wait until the local notifier has numbered the whole cascade; record its last id",
    ),
    (
        "switch-intake",
        "point the local notifier's intake at the local LDAP at last id + 1 (accesslog \
         position, or the translog overlay's last_id)",
    ),
    (
        "set-ucr",
        "UCR: ldap/master, ldap/server/type=master, server/role, ldap/translogfile, notifier/intake",
    ),
    (
        "restart-services",
        "restart slapd, notifier and listener as the Primary",
    ),
];

/// Environment variable for tests: SIGKILL this process right after the action of the
/// named step, before it is recorded as done.
const KILL_AFTER: &str = "UDR_BACKUP2MASTER_KILL_AFTER";

struct Run {
    cli: Cli,
    ucr: Ucr,
    log: Option<std::fs::File>,
    state_file: PathBuf,
    /// `step key=value…` lines of completed steps.
    done: Vec<String>,
}

fn main() -> ExitCode {
    if let Some(code) = daemon::man::print_if_requested(Cli::command, daemon::man::SECTION_DAEMON) {
        return code;
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "univention-directory-backup2master: {}",
                daemon::report::chain(&*e)
            );
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ucr = Ucr::load(&cli.ucr_file);
    let state_file = cli.ldap_dir.join("backup2master.state");
    let done = match std::fs::read_to_string(&state_file) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).context(format!("reading {}", state_file.display())),
    };
    let log = if cli.execute {
        // Every line also goes to the journal, where there is one (not in containers
        // without journald): the administrator's record survives the log directory.
        if let Ok(journal) = tracing_journald::layer() {
            use tracing_subscriber::layer::SubscriberExt as _;
            let subscriber = tracing_subscriber::registry()
                .with(journal.with_syslog_identifier("univention-directory-backup2master".into()));
            let _ = tracing::subscriber::set_global_default(subscriber);
        }
        std::fs::create_dir_all(&cli.log_dir).ok();
        let path = cli.log_dir.join("backup2master.log");
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?,
        )
    } else {
        None
    };
    let mut run = Run {
        cli,
        ucr,
        log,
        state_file,
        done,
    };
    run.main()
}

impl Run {
    fn say(&mut self, line: &str) {
        println!("{line}");
        if let Some(log) = self.log.as_mut() {
            tracing::info!("{line}");
            let _ = writeln!(
                log,
                "{} {line}",
                daemon::time::rfc3339(std::time::SystemTime::now())
            );
        }
    }

    fn step_done(&self, step: &str) -> Option<&str> {
        self.done.iter().find_map(|l| {
            let (name, rest) = l.split_once(' ').unwrap_or((l.as_str(), ""));
            (name == step).then_some(rest)
        })
    }

    fn recorded(&self, key: &str) -> Option<String> {
        self.done.iter().find_map(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_owned))
        })
    }

    fn record(&mut self, step: &str, values: &str) -> anyhow::Result<()> {
        if let Ok(target) = std::env::var(KILL_AFTER)
            && target == step
        {
            self.say(&format!("test hook {KILL_AFTER}: killed after {step}"));
            // SAFETY: kill(2) of this process; the point is to stop without any cleanup.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        let line = format!("{step} {values}").trim_end().to_owned();
        self.done.push(line);
        let mut text = self.done.join("\n");
        text.push('\n');
        daemon::fs::write_atomic(&self.state_file, text.as_bytes(), 0o600)?;
        self.say(&format!("step {step}: done {values}"));
        Ok(())
    }

    fn intake(&self) -> Intake {
        self.cli
            .intake
            .unwrap_or(match self.ucr.get("notifier/intake") {
                Some("accesslog") => Intake::Accesslog,
                _ => Intake::File,
            })
    }

    fn fqdn(&self) -> String {
        self.cli.fqdn.clone().unwrap_or_else(|| {
            let host = self
                .ucr
                .get("hostname")
                .map_or_else(daemon::host::hostname, str::to_owned);
            match self.ucr.get("domainname") {
                Some(domain) => format!("{host}.{domain}"),
                None => host,
            }
        })
    }

    fn main(&mut self) -> anyhow::Result<ExitCode> {
        let started = !self.done.is_empty();
        let failed = if started {
            self.say("a promotion is in progress: the checks passed then; continuing it");
            Vec::new()
        } else {
            self.checks()?
        };
        if !failed.is_empty() && !self.cli.force {
            self.say(&format!(
                "REFUSED: {} check(s) failed; fix them, or override with --force",
                failed.len()
            ));
            return Ok(ExitCode::from(2));
        }
        for check in &failed {
            let line = format!("WARNING: --force overrides the failed check: {check}");
            self.say(&line);
        }
        self.say(&format!(
            "plan (intake after promotion: {}, new Primary {}):",
            self.intake().name(),
            self.fqdn()
        ));
        for (i, (step, what)) in STEPS.iter().enumerate() {
            let mark = if self.step_done(step).is_some() {
                "done"
            } else {
                "todo"
            };
            self.say(&format!("  {}. [{mark}] {step}: {what}", i + 1));
        }
        if !self.cli.execute {
            self.say("rehearsal only: nothing changed; run with --execute to promote");
            return Ok(ExitCode::SUCCESS);
        }
        for (step, _) in STEPS {
            if self.step_done(step).is_some() {
                continue;
            }
            match step {
                "stop-listener" => self.stop_listener()?,
                "release-held" => self.release_held()?,
                "drain-cascade" => self.drain_cascade()?,
                "switch-intake" => self.switch_intake()?,
                "set-ucr" => self.set_ucr()?,
                _ => self.restart_services()?,
            }
        }
        let last = self.recorded("last_id").unwrap_or_default();
        self.say(&format!(
            "promotion complete: this host is the Primary; the next write gets id {}. Point \
             the other listeners here (UCR ldap/master, notifier/server) and restart them",
            last.parse::<u64>().map_or(0, |n| n + 1)
        ));
        Ok(ExitCode::SUCCESS)
    }

    /// Every check, printed; the failed ones returned.
    fn checks(&mut self) -> anyhow::Result<Vec<String>> {
        let mut failed = Vec::new();
        self.say("checks:");
        let old = self
            .cli
            .old_primary
            .clone()
            .or_else(|| self.ucr.get("ldap/master").map(str::to_owned));
        let role = self.ucr.get("server/role").unwrap_or("").to_owned();
        if !role.is_empty() && role != listener::config::role::BACKUP {
            failed.push(format!(
                "server/role is {role}, not domaincontroller_backup"
            ));
        }
        match &old {
            Some(old) => {
                let ldap_port = self
                    .cli
                    .old_ldap_port
                    .or_else(|| self.ucr.get_parsed("ldap/master/port"))
                    .unwrap_or(7389);
                for (what, port) in [
                    ("LDAP", ldap_port),
                    ("notifier", self.cli.old_notifier_port),
                ] {
                    if answers(old, port) {
                        failed.push(format!(
                            "the old Primary's {what} at {old}:{port} still answers: two \
                             Primaries would number ids independently"
                        ));
                    } else {
                        self.say(&format!(
                            "  ok: the old Primary's {what} at {old}:{port} does not answer"
                        ));
                    }
                }
            }
            None => failed.push("no old Primary known (UCR ldap/master, --old-primary)".into()),
        }
        // How far behind: the highest id the listener heard from the old Primary (running
        // listener) or processed (stopped), against what the local notifier serves.
        let live = listener::control::status_of(&self.cli.cache_dir)
            .ok()
            .map(|s| s.notifier_id.max(s.processed_id));
        let heard = [
            live,
            listener::daemon::read_upstream_id(&self.cli.cache_dir),
            cache::read_legacy_notifier_id(&self.cli.cache_dir),
        ]
        .into_iter()
        .flatten()
        .max();
        let local = local_last_id(self.cli.notifier_port);
        let held = read_held(&self.cli.cache_dir.join(HELD_FILE))?;
        match (heard, &local) {
            (Some(heard), Ok(local)) => {
                let behind = heard.saturating_sub(*local);
                let line = format!(
                    "  last id heard from the old Primary: {heard}; local notifier: {local}; \
                     behind: {behind} transaction(s){}",
                    if behind > 0 {
                        " (lost unless the old Primary comes back; held by the cascade gate: \
                         see below)"
                    } else {
                        ""
                    }
                );
                self.say(&line);
            }
            (_, Err(e)) => self.say(&format!("  local notifier: {e}")),
            (None, _) => self.say("  last id heard from the old Primary: unknown"),
        }
        let state = &self.cli.replication_state;
        match modules::native::quarantined_changes(state) {
            Ok(0) => self.say("  ok: the replication quarantine is empty"),
            Ok(quarantined) => failed.push(format!(
                "{quarantined} change(s) in the replication quarantine ({}): the local LDAP \
                 lacks them; retry or skip them first",
                state.display()
            )),
            Err(e) => failed.push(format!("the replication quarantine cannot be read: {e}")),
        }
        if !held.is_empty() {
            failed.push(format!(
                "{} cascade line(s) from id {} held back from the local notifier",
                held.len(),
                held[0].id
            ));
        }
        if self.cli.failed_ldif.exists() {
            failed.push(format!(
                "{} exists: replication stopped",
                self.cli.failed_ldif.display()
            ));
        } else {
            self.say("  ok: no failed.ldif");
        }
        for check in &failed {
            let line = format!("  FAILED: {check}");
            self.say(&line);
        }
        Ok(failed)
    }

    fn systemctl(&mut self, args: &[&str]) -> anyhow::Result<()> {
        let line = format!("systemctl {}", args.join(" "));
        if self.cli.no_restart {
            self.say(&format!("  run: {line}"));
            return Ok(());
        }
        self.say(&format!("  running: {line}"));
        let status = Command::new("systemctl")
            .args(args)
            .status()
            .with_context(|| format!("running {line}"))?;
        if !status.success() {
            bail!("{line} failed: {status}");
        }
        Ok(())
    }

    fn stop_listener(&mut self) -> anyhow::Result<()> {
        if tools::listener_running(&self.cli.cache_dir) {
            if self.cli.no_restart {
                bail!(
                    "the listener is running; with --no-restart stop it first: systemctl stop \
                     univention-directory-listener"
                );
            }
            self.systemctl(&["stop", "univention-directory-listener"])?;
            if tools::listener_running(&self.cli.cache_dir) {
                bail!("the listener is still running after systemctl stop");
            }
        }
        self.record("stop-listener", "")
    }

    fn release_held(&mut self) -> anyhow::Result<()> {
        let mut cascade = Cascade::new(&self.cli.ldap_dir, &self.cli.cache_dir)?;
        let n = cascade.held().len();
        if n > 0 {
            // Only reachable with --force: the checks refuse held lines otherwise.
            self.say(&format!(
                "  WARNING: {n} held cascade line(s) go to the notifier although the local \
                 LDAP lacks a change (--force): the id space stays the Primary's"
            ));
            cascade.release()?;
        }
        self.record("release-held", &format!("released={n}"))
    }

    fn drain_cascade(&mut self) -> anyhow::Result<()> {
        let files = QueueFiles::in_ldap_dir(&self.cli.ldap_dir);
        let deadline = Instant::now() + Duration::from_secs(self.cli.drain_timeout);
        loop {
            let pending = [files.queue(), files.queue().with_extension("priv")]
                .iter()
                .any(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0));
            if !pending {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the local notifier has not taken over the cascade in {} within {} s; is \
                     it running?",
                    files.queue().display(),
                    self.cli.drain_timeout
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let last = local_last_id(self.cli.notifier_port)
            .map_err(|e| anyhow::anyhow!("the local notifier: {e}"))?;
        let csn = match self.intake() {
            Intake::Accesslog => accesslog_csn(&self.cli.accesslog_uri)?,
            Intake::File => String::new(),
        };
        self.record("drain-cascade", &format!("last_id={last} csn={csn}"))
    }

    fn switch_intake(&mut self) -> anyhow::Result<()> {
        let last = self.recorded("last_id").context("no recorded last id")?;
        if self.intake() == Intake::File {
            // UCS's translog overlay numbers from this file (a decimal, no newline); on a
            // Backup it is absent or stale.
            let path = self.cli.ldap_dir.join("last_id");
            daemon::fs::write_atomic(&path, last.as_bytes(), 0o644)?;
            self.say(&format!(
                "  {}: slapd's translog overlay continues at id {last} + 1",
                path.display()
            ));
        }
        if self.intake() == Intake::Accesslog {
            let csn = self.recorded("csn").unwrap_or_default();
            let path = self.cli.ldap_dir.join("notify/accesslog.position");
            daemon::fs::write_atomic(&path, format!("csn={csn}\nid={last}\n").as_bytes(), 0o600)?;
            self.say(&format!(
                "  {}: the accesslog intake starts after CSN {csn:?} at id {last}",
                path.display()
            ));
        }
        self.record("switch-intake", "")
    }

    fn set_ucr(&mut self) -> anyhow::Result<()> {
        let fqdn = self.fqdn();
        let translog = self.cli.ldap_dir.join("listener/listener");
        let translog = translog.display().to_string();
        let mut values: Vec<(&str, &str)> = vec![
            ("ldap/master", &fqdn),
            ("ldap/server/type", "master"),
            ("server/role", "domaincontroller_master"),
            ("ldap/translogfile", &translog),
            ("notifier/intake", self.intake().name()),
        ];
        if self.ucr.get("notifier/server").is_some() {
            values.push(("notifier/server", &fqdn));
        }
        let mut shown = String::new();
        for (k, v) in &values {
            let _ = write!(shown, " {k}={v}");
        }
        let ucr_tool = self.cli.ucr_file == Path::new(daemon::ucr::BASE_CONF)
            && Command::new("ucr").arg("--help").output().is_ok();
        if ucr_tool {
            let args: Vec<String> = values.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let status = Command::new("ucr").arg("set").args(&args).status()?;
            if !status.success() {
                bail!("ucr set failed: {status}");
            }
        } else {
            daemon::ucr::set_in_file(&self.cli.ucr_file, &values)?;
        }
        self.record("set-ucr", shown.trim())
    }

    fn restart_services(&mut self) -> anyhow::Result<()> {
        self.systemctl(&["restart", "slapd"])?;
        self.systemctl(&["restart", "univention-directory-notifier"])?;
        self.systemctl(&["restart", "univention-directory-listener"])?;
        self.record("restart-services", "")
    }
}

/// Whether something accepts TCP connections at `host:port` within 3 s.
fn answers(host: &str, port: u16) -> bool {
    let Ok(addrs) = (host, port).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(3)).is_ok())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn local_last_id(port: u16) -> Result<u64, String> {
    let rt = runtime().map_err(|e| e.to_string())?;
    rt.block_on(tools::query_notifier(
        "127.0.0.1",
        port,
        false,
        Duration::from_secs(10),
        &proto::ClientTls::off(),
    ))
    .map_err(|e| format!("cannot ask the local notifier on port {port}: {e}"))
}

/// The newest CSN of `cn=accesslog` (its contextCSN) on the local LDAP server.
fn accesslog_csn(uri: &str) -> anyhow::Result<String> {
    let endpoint = ldap::Endpoint {
        uri: uri.to_owned(),
        auth: ldap::Auth::SaslExternal,
        starttls: ldap::StartTls::Off,
        timeout: Duration::from_secs(30),
    };
    runtime()?.block_on(async {
        let mut ldap = ldap::connect(&endpoint)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to {uri}: {e}"))?;
        let (entries, _) = ldap
            .search(
                "cn=accesslog",
                ldap3::Scope::Base,
                "(objectClass=*)",
                vec!["contextCSN"],
            )
            .await?
            .success()?;
        let _ = ldap.unbind().await;
        let mut newest = String::new();
        for entry in entries {
            let entry = ldap3::SearchEntry::construct(entry);
            for csn in entry.attrs.get("contextCSN").into_iter().flatten() {
                if *csn > newest {
                    newest = csn.clone();
                }
            }
        }
        if newest.is_empty() {
            bail!("cn=accesslog on {uri} has no contextCSN");
        }
        Ok(newest)
    })
}
