//! `univention-directory-listener-ctrl`: status, modules, resync, the notifier's ids, and
//! backup/restore of the listener state (spec listener.md §6.6).

use daemon::fs::{TempFile, with_suffix};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::{CommandFactory, Parser, Subcommand};
use daemon::ucr::Ucr;
use listener::backup;
use listener::config::{DEFAULT_CACHE_DIR, DEFAULT_FAILED_LDIF};
use listener::control::{self, Status};
use listener::dispatch::{self, STATE_DIR};
use listener::tools::{self, ModuleEntry};
use serde::Serialize;

const AFTER_HELP: &str = "\
Output formats:
  status    blocks \"Listener status:\", \"Current Notifier ID on <host>:\", \"Last Notifier
            ID processed by local Listener:\", \"Lag:\", \"failed.ldif:\", then \"Modules:\"
            with \"<state>\\t<name>\\t<file>\\t<condition>[, N calls, N failures][, last
            error N s ago in <call>: <its last line>]\" per module; each value indented by
            one space. A module call running longer than the listener's --blocked-after
            adds \" blocked: module M in F for DN since N s\" under the listener's state.
            --json: one JSON object (see README).
  modules   \"Modules:\", then \"<state>\\t<name>\\t<file>\" per module (state 3 = ready,
            - = no state file; file - = known only by its state file)
  notifier-id   the id alone
  quarantine list   the replication module's quarantined changes as a JSON array
            (id, dn, command, operation, error, at, move_from, ldif)
  quarantine retry|skip, module   the module's answer, one line
Colours only on a terminal (and not with NO_COLOR).

Exit status: 0 success (status: healthy); 1 failure (status: not running, paused or
retrying a transaction, failed.ldif present, a module not ready, failing, holding
quarantined changes, failed to initialise or to load, a module call blocked, or the
notifier unreachable; backup verify: damaged; restore/resync refused); 2 usage error or
unknown module.";

/// Controls the Univention Directory Listener.
#[derive(Debug, Parser)]
#[command(name = "univention-directory-listener-ctrl", version, after_help = AFTER_HELP)]
struct Cli {
    /// Cache directory.
    #[arg(
        short = 'c',
        long,
        value_name = "DIR",
        env = "UDL_CACHE_DIR",
        default_value = DEFAULT_CACHE_DIR,
        global = true
    )]
    cache_dir: PathBuf,
    /// Module directory or file, for `modules` and `resync` while the listener is stopped;
    /// repeatable.
    #[arg(short = 'm', long = "modules-dir", value_name = "PATH", global = true)]
    module_dirs: Vec<PathBuf>,
    /// The replication stop file, for `status` while the listener is stopped (a running
    /// listener reports its own).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_FAILED_LDIF, global = true)]
    failed_ldif: PathBuf,
    /// Notifier host (default: UCR notifier/server, else ldap/master).
    #[arg(long, value_name = "HOST", global = true)]
    notifier_host: Option<String>,
    /// Notifier port (default: UCR notifier/server/port, else 6669).
    #[arg(long, value_name = "PORT", global = true)]
    notifier_port: Option<u16>,
    /// systemd unit of the listener.
    #[arg(
        long,
        value_name = "UNIT",
        default_value = "univention-directory-listener",
        global = true
    )]
    unit: String,
    #[command(flatten)]
    tls: listener::config::NotifierTlsArgs,
    /// UCR file to read defaults from.
    #[arg(long, value_name = "FILE", default_value = daemon::ucr::BASE_CONF, global = true)]
    ucr_file: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Whether the listener runs, how far it is behind the notifier, and its modules.
    Status {
        /// One JSON object, for monitoring.
        #[arg(long)]
        json: bool,
    },
    /// The modules with state, name and file (native modules included while it runs).
    Modules,
    /// Re-initialises modules: stops the listener, removes their states, starts it.
    Resync {
        /// Module names.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// Only remove the states (the listener must be stopped); for use without systemd.
        #[arg(long)]
        no_restart: bool,
    },
    /// The notifier's current transaction id (like get_notifier_id).
    NotifierId {
        /// Notifier host.
        host: Option<String>,
        /// The schema id instead.
        #[arg(short = 's', long)]
        schema: bool,
    },
    /// Backup and restore of the listener state (cache, module states, notifier id).
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Changes the local LDAP server refused, held by the `replication` module.
    #[command(subcommand)]
    Quarantine(QuarantineCmd),
    /// Sends an operator command to a module of the running listener.
    Module {
        /// Module name.
        name: String,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum QuarantineCmd {
    /// Lists the quarantined changes, oldest first.
    List,
    /// Applies quarantined changes again, in order: all, or ID and those queued behind it.
    Retry { id: Option<u64> },
    /// Drops the quarantined change ID for good (those queued behind it stay).
    Skip { id: u64 },
}

#[derive(Debug, Subcommand)]
enum BackupCmd {
    /// Writes a consistent backup to FILE (also while the listener runs).
    Create { file: PathBuf },
    /// Checks FILE completely and prints what it holds.
    Verify { file: PathBuf },
    /// Replaces the listener state with FILE; refused while the listener runs. The replaced
    /// cache stays as cache.lmdb.before-restore in the cache directory (an older one goes).
    Restore { file: PathBuf },
}

const NOTIFIER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `resync` waits for a stopped listener to release its lock.
const STOP_WAIT: Duration = Duration::from_secs(300);

fn main() -> ExitCode {
    if let Some(code) = daemon::man::print_if_requested(Cli::command, daemon::man::SECTION_TOOL) {
        return code;
    }
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "univention-directory-listener-ctrl: {}",
                daemon::report::chain(&*e)
            );
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let ucr = Ucr::load(&cli.ucr_file);
    match &cli.command {
        Cmd::Status { json } => status(cli, &ucr, *json),
        Cmd::Modules => {
            let colour = tools::colour_stdout();
            print_modules(&modules(cli)?, colour);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Resync { names, no_restart } => resync(cli, names, *no_restart),
        Cmd::NotifierId { host, schema } => {
            let host = host.clone().or_else(|| cli.notifier_host.clone());
            let (host, port) = notifier_target(cli, &ucr, host);
            let tls = cli.tls.resolve(&ucr)?;
            let id = runtime()?.block_on(tools::query_notifier(
                &host,
                port,
                *schema,
                NOTIFIER_TIMEOUT,
                &tls,
            ))?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Backup(BackupCmd::Create { file }) => backup_create(cli, file),
        Cmd::Backup(BackupCmd::Verify { file }) => backup_verify(file),
        Cmd::Backup(BackupCmd::Restore { file }) => backup_restore(cli, file),
        Cmd::Quarantine(command) => {
            let words: Vec<String> = match command {
                QuarantineCmd::List => vec!["quarantine".into(), "list".into()],
                QuarantineCmd::Retry { id } => ["quarantine".to_owned(), "retry".to_owned()]
                    .into_iter()
                    .chain(id.map(|id| id.to_string()))
                    .collect(),
                QuarantineCmd::Skip { id } => {
                    vec!["quarantine".into(), "skip".into(), id.to_string()]
                }
            };
            module_command(cli, "replication", &words)
        }
        Cmd::Module { name, command } => module_command(cli, name, command),
    }
}

/// A module command through the control socket of the running listener.
fn module_command(cli: &Cli, name: &str, command: &[String]) -> anyhow::Result<ExitCode> {
    let answer = listener::control::module_command(&cli.cache_dir, name, command)?;
    println!("{answer}");
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn notifier_target(cli: &Cli, ucr: &Ucr, host: Option<String>) -> (String, u16) {
    (
        host.unwrap_or_else(|| listener::config::default_notifier_host(ucr)),
        listener::config::notifier_port(cli.notifier_port, ucr),
    )
}

fn module_dirs(cli: &Cli) -> Vec<PathBuf> {
    if cli.module_dirs.is_empty() {
        vec![PathBuf::from(tools::DEFAULT_MODULE_DIR)]
    } else {
        cli.module_dirs.clone()
    }
}

fn states(cli: &Cli) -> anyhow::Result<BTreeMap<String, u32>> {
    let dir = cli.cache_dir.join(STATE_DIR);
    dispatch::read_states(&dir).with_context(|| format!("reading {}", dir.display()))
}

/// The running listener's status, `None` when it does not run. `running` is what the
/// caller found with [`tools::listener_running`], so its report never contradicts this.
fn live_status(cli: &Cli, running: bool) -> anyhow::Result<Option<Status>> {
    if !running {
        return Ok(None);
    }
    Ok(Some(control::status_of(&cli.cache_dir).with_context(
        || "the listener runs but its control socket does not answer",
    )?))
}

/// The running listener's modules, or the module files and state files.
fn modules(cli: &Cli) -> anyhow::Result<Vec<ModuleEntry>> {
    let states = states(cli)?;
    // A listener that does not answer yet: fall back to the files.
    let live = live_status(cli, tools::listener_running(&cli.cache_dir)).unwrap_or_default();
    Ok(module_listing(cli, live.as_ref(), &states))
}

fn module_listing(
    cli: &Cli,
    live: Option<&Status>,
    states: &BTreeMap<String, u32>,
) -> Vec<ModuleEntry> {
    tools::list_modules(
        live.map(|s| s.modules.as_slice()),
        &module_dirs(cli),
        states,
    )
}

const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const RESET: &str = "\x1b[0m";

fn paint(text: &str, good: bool, colour: bool) -> String {
    if colour {
        format!("{}{text}{RESET}", if good { GREEN } else { RED })
    } else {
        text.to_owned()
    }
}

fn print_modules(modules: &[ModuleEntry], colour: bool) {
    println!("Modules:");
    for m in modules {
        let state = m.state.map_or_else(|| "-".to_owned(), |s| s.to_string());
        let line = format!("{state}\t{}\t{}", m.name, m.file);
        if m.state == Some(3) || !colour {
            println!("{line}");
        } else {
            println!("{}", paint(&line, false, true));
        }
    }
}

#[derive(Debug, Serialize)]
struct StatusReport {
    healthy: bool,
    listener: ListenerReport,
    notifier: NotifierReport,
    processed_id: Option<u64>,
    lag: Option<u64>,
    seconds_since_progress: Option<u64>,
    failed_ldif: control::FailedLdif,
    modules: Vec<ModuleEntry>,
    /// The module call running now (running listener only).
    current_call: Option<control::CurrentCall>,
    /// The listener's `--blocked-after`, seconds.
    blocked_after: Option<f64>,
    /// Transactions held back from the local notifier until the local LDAP holds them.
    cascade_held: Option<control::CascadeHeld>,
}

#[derive(Debug, Serialize)]
struct ListenerReport {
    running: bool,
    pid: Option<u32>,
    state: Option<String>,
    cache_entries: Option<usize>,
}

#[derive(Debug, Serialize)]
struct NotifierReport {
    host: String,
    port: u16,
    id: Option<u64>,
    error: Option<String>,
}

fn status(cli: &Cli, ucr: &Ucr, json: bool) -> anyhow::Result<ExitCode> {
    let (host, port) = notifier_target(cli, ucr, cli.notifier_host.clone());
    // A TLS setting that cannot be loaded is reported like an unreachable notifier.
    let notifier = match cli.tls.resolve(ucr) {
        Ok(tls) => runtime()?
            .block_on(tools::query_notifier(
                &host,
                port,
                false,
                NOTIFIER_TIMEOUT,
                &tls,
            ))
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let running = tools::listener_running(&cli.cache_dir);
    let live = live_status(cli, running);
    let now = SystemTime::now();
    let (live, live_error) = match live {
        Ok(live) => (live, None),
        Err(e) => (None, Some(daemon::report::chain(&*e))),
    };
    let processed_id = match &live {
        Some(s) => Some(s.processed_id),
        None => cache::read_legacy_notifier_id(&cli.cache_dir),
    };
    let last_progress = match &live {
        Some(s) => s.last_progress,
        None => std::fs::metadata(cli.cache_dir.join(cache::NOTIFIER_ID_FILE))
            .and_then(|m| m.modified())
            .ok()
            .map(daemon::time::unix_seconds),
    };
    let notifier_id = notifier.as_ref().ok().copied();
    let lag = match (notifier_id, processed_id) {
        (Some(n), Some(p)) => Some(n.saturating_sub(p)),
        _ => None,
    };
    let states = states(cli)?;
    let modules = module_listing(cli, live.as_ref(), &states);
    // A running listener says which file pauses it (its own --failed-ldif); this tool's
    // option only stands in for a stopped listener, or the two would contradict each other.
    let failed_ldif = match &live {
        Some(s) => s.failed_ldif.clone(),
        None => control::FailedLdif {
            present: cli.failed_ldif.exists(),
            path: cli.failed_ldif.clone(),
        },
    };
    // Retrying a transaction (a module's server down, LDAP unreachable) is no progress
    // either.
    let paused = live
        .as_ref()
        .is_some_and(|s| s.state.starts_with("paused") || s.state.starts_with("retrying"));
    let current_call = live.as_ref().and_then(|s| s.current_call.clone());
    let blocked = current_call.as_ref().is_some_and(|c| c.blocked);
    let cascade_held = live.as_ref().and_then(|s| s.cascade_held.clone());
    let healthy = running
        && live_error.is_none()
        && cascade_held.is_none()
        && !paused
        && !blocked
        && !failed_ldif.present
        && notifier_id.is_some()
        && modules.iter().all(|m| m.healthy);
    let report = StatusReport {
        healthy,
        listener: ListenerReport {
            running,
            pid: live.as_ref().map(|s| s.pid),
            state: live
                .as_ref()
                .map(|s| s.state.clone())
                .or(live_error)
                .or_else(|| {
                    (!running)
                        .then(|| listener::daemon::read_exit_request(&cli.cache_dir))
                        .flatten()
                        .map(|why| format!("stopped: {why}"))
                }),
            cache_entries: live.as_ref().map(|s| s.cache_entries),
        },
        notifier: NotifierReport {
            host: host.clone(),
            port,
            id: notifier_id,
            error: notifier.as_ref().err().cloned(),
        },
        processed_id,
        lag,
        seconds_since_progress: last_progress
            .map(|t| daemon::time::unix_seconds(now).saturating_sub(t)),
        failed_ldif,
        modules,
        current_call,
        blocked_after: live.as_ref().map(|s| s.blocked_after),
        cascade_held,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_status(&report, tools::colour_stdout());
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_status(r: &StatusReport, colour: bool) {
    println!("Listener status:");
    let listener = match (&r.listener.pid, &r.listener.state) {
        (Some(pid), Some(state)) => format!("running (pid {pid}): {state}"),
        (None, Some(problem)) if r.listener.running => format!("running, but {problem}"),
        _ if r.listener.running => "running".to_owned(),
        (None, Some(stopped)) => format!("not running, {stopped}"),
        _ => "not running".to_owned(),
    };
    let good = r.listener.running && !listener.contains("paused");
    println!(" {}", paint(&listener, good, colour));
    if let Some(call) = r.current_call.as_ref().filter(|c| c.blocked) {
        let target = call
            .dn
            .as_ref()
            .map(|dn| format!(" for {dn}"))
            .unwrap_or_default();
        let line = format!(
            "blocked: module {} in {}{target} since {:.0} s (limit {:.0} s)",
            call.module,
            call.function,
            call.seconds,
            r.blocked_after.unwrap_or_default()
        );
        println!(" {}", paint(&line, false, colour));
    }
    if let Some(held) = &r.cascade_held {
        let line = format!(
            "cascade held back: {} transaction(s) from id {} wait for the quarantine \
             (the local LDAP lacks a change; the local notifier gets them after retry or skip)",
            held.transactions, held.from_id
        );
        println!(" {}", paint(&line, false, colour));
    }
    println!("Current Notifier ID on \"{}\":", r.notifier.host);
    match (&r.notifier.id, &r.notifier.error) {
        (Some(id), _) => println!(" {id}"),
        (None, error) => println!(
            " {}",
            paint(
                &format!("unknown: {}", error.as_deref().unwrap_or("")),
                false,
                colour
            )
        ),
    }
    println!("Last Notifier ID processed by local Listener:");
    let processed = r
        .processed_id
        .map_or_else(|| "unknown".to_owned(), |id| id.to_string());
    println!(
        " {}",
        paint(
            &processed,
            r.processed_id.is_some() && r.processed_id == r.notifier.id,
            colour
        )
    );
    println!("Lag:");
    let lag = r
        .lag
        .map_or_else(|| "unknown".to_owned(), |l| format!("{l} transactions"));
    let since = r.seconds_since_progress.map_or_else(
        || "no progress recorded".to_owned(),
        |s| format!("last progress {s} s ago"),
    );
    println!(" {lag}, {since}");
    println!("failed.ldif:");
    let failed = if r.failed_ldif.present {
        format!(
            "present: {} (replication stopped)",
            r.failed_ldif.path.display()
        )
    } else {
        format!("absent ({})", r.failed_ldif.path.display())
    };
    println!(" {}", paint(&failed, !r.failed_ldif.present, colour));
    print_module_health(&r.modules, colour);
}

/// Longest last error shown in the text output; `--json` has all of it.
const ERROR_SHOWN: usize = 160;

/// The modules as `modules` lists them plus a fourth column: condition, counters and the
/// last error.
fn print_module_health(modules: &[ModuleEntry], colour: bool) {
    let now = daemon::time::unix_seconds(SystemTime::now());
    println!("Modules:");
    for m in modules {
        let state = m.state.map_or_else(|| "-".to_owned(), |s| s.to_string());
        let mut health = m.condition.clone();
        if let (Some(calls), Some(failures)) = (m.calls, m.failures) {
            health.push_str(&format!(", {calls} calls, {failures} failures"));
        }
        if let Some(run) = m.consecutive_failures.filter(|n| *n > 0) {
            health.push_str(&format!(" ({run} in a row)"));
        }
        if let Some(retries) = m.retries.filter(|n| *n > 0) {
            health.push_str(&format!(", {retries} retries"));
        }
        if let Some(problem) = &m.problem {
            health.push_str(&format!(", problem: {}", shorten(problem)));
        }
        if let Some(at) = m.next_init {
            health.push_str(&format!(", next attempt in {} s", at.saturating_sub(now)));
        }
        if let Some(error) = &m.last_error {
            health.push_str(&format!(
                ", last error {} s ago in {}: {}",
                now.saturating_sub(error.at),
                error.call,
                shorten(&error.message)
            ));
        }
        let line = format!("{state}\t{}\t{}\t{health}", m.name, m.file);
        if m.healthy || !colour {
            println!("{line}");
        } else {
            println!("{}", paint(&line, false, true));
        }
    }
}

/// The line of an error message that says what went wrong (a traceback's last one), cut
/// to [`ERROR_SHOWN`] characters.
fn shorten(message: &str) -> String {
    let line = message
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default();
    if line.chars().count() > ERROR_SHOWN {
        let cut: String = line.chars().take(ERROR_SHOWN).collect();
        format!("{cut}…")
    } else {
        line.to_owned()
    }
}

fn systemctl(args: &[&str]) -> Option<bool> {
    Command::new("systemctl")
        .args(args)
        .stdin(Stdio::null())
        .status()
        .ok()
        .map(|s| s.success())
}

fn resync(cli: &Cli, names: &[String], no_restart: bool) -> anyhow::Result<ExitCode> {
    let modules = modules(cli)?;
    let unknown: Vec<&String> = names
        .iter()
        .filter(|n| !modules.iter().any(|m| &m.name == *n))
        .collect();
    if !unknown.is_empty() {
        let list: Vec<&str> = unknown.iter().map(|s| s.as_str()).collect();
        eprintln!("Unknown module(s): {}", list.join(", "));
        print_modules(&modules, tools::colour_stdout());
        return Ok(ExitCode::from(2));
    }
    let running = tools::listener_running(&cli.cache_dir);
    let restart = running && !no_restart;
    if running && no_restart {
        bail!(
            "the listener is running on {} (it holds cache.lock): stop it first, or leave out \
             --no-restart to have it stopped and started through systemd",
            cli.cache_dir.display()
        );
    }
    if restart {
        if systemctl(&["is-active", "--quiet", &cli.unit]) != Some(true) {
            bail!(
                "the listener is running, but not as the active systemd unit {}: stop it \
                 yourself, then use --no-restart",
                cli.unit
            );
        }
        println!("Stopping {}", cli.unit);
        if systemctl(&["stop", &cli.unit]) != Some(true) {
            bail!("systemctl stop {} failed", cli.unit);
        }
    }
    // Wait for the lock, then hold it so that nothing starts while the states go.
    let deadline = Instant::now() + STOP_WAIT;
    let lock = loop {
        if let Some(lock) = tools::try_lock(&cli.cache_dir)? {
            break lock;
        }
        if Instant::now() >= deadline {
            bail!("the listener did not stop within {STOP_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let dir = cli.cache_dir.join(STATE_DIR);
    for name in names {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => println!("Module {name}: state removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!("Module {name}: no state (not initialised yet)");
            }
            Err(e) => return Err(e).with_context(|| format!("removing the state of {name}")),
        }
    }
    drop(lock);
    if restart {
        println!("Starting {}", cli.unit);
        if systemctl(&["start", &cli.unit]) != Some(true) {
            bail!("systemctl start {} failed", cli.unit);
        }
    } else {
        println!("The modules are re-initialised when the listener starts next.");
    }
    Ok(ExitCode::SUCCESS)
}

fn backup_create(cli: &Cli, file: &Path) -> anyhow::Result<ExitCode> {
    let access = tools::open_state(&cli.cache_dir)?;
    // A leftover of an interrupted run is replaced; the target appears only when complete.
    let _ = std::fs::remove_file(with_suffix(file, ".tmp"));
    let out = TempFile::create(file, ".tmp", 0o600)?;
    let mut writer = BufWriter::new(out.file());
    let origin = backup::Origin {
        host: daemon::host::hostname(),
        cache_dir: std::path::absolute(&cli.cache_dir).unwrap_or_else(|_| cli.cache_dir.clone()),
        created: daemon::time::unix_seconds(SystemTime::now()),
    };
    let header = backup::write(&mut writer, access.dir(), origin)
        .and_then(|header| {
            writer.flush()?;
            Ok(header)
        })
        .context("writing the backup")?;
    drop(writer);
    out.commit(None)?;
    println!(
        "Backup of {} written to {}: transaction {}, schema {}, {} entries, {} module(s){}",
        cli.cache_dir.display(),
        file.display(),
        header.notifier_id,
        header.schema_id,
        header.entries,
        header.modules.len(),
        if access.is_snapshot() {
            " (snapshot of the running listener)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn open_backup(file: &Path) -> anyhow::Result<BufReader<File>> {
    Ok(BufReader::new(
        File::open(file).with_context(|| format!("opening {}", file.display()))?,
    ))
}

fn backup_verify(file: &Path) -> anyhow::Result<ExitCode> {
    match backup::read(open_backup(file)?, |_| Ok(())) {
        Ok(h) => {
            let modules: Vec<String> = h.modules.iter().map(|(n, s)| format!("{n}={s}")).collect();
            println!(
                "OK: {} format {} by {} {}, of {} on {} at {}: transaction {}, schema {}, {} \
                 entries, modules: {}",
                file.display(),
                h.format,
                h.producer,
                h.version,
                h.cache_dir.display(),
                h.host,
                daemon::time::rfc3339(UNIX_EPOCH + Duration::from_secs(h.created)),
                h.notifier_id,
                h.schema_id,
                h.entries,
                if modules.is_empty() {
                    "none".to_owned()
                } else {
                    modules.join(" ")
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("FAILED: {}: {e}", file.display());
            Ok(ExitCode::from(1))
        }
    }
}

fn backup_restore(cli: &Cli, file: &Path) -> anyhow::Result<ExitCode> {
    daemon::fs::create_private_dir(&cli.cache_dir)
        .with_context(|| format!("creating {}", cli.cache_dir.display()))?;
    let Some(lock) = tools::try_lock(&cli.cache_dir)? else {
        bail!(
            "the listener is running on {} (it holds cache.lock): stop it before restoring",
            cli.cache_dir.display()
        );
    };
    // restore verifies the whole file before it swaps anything in.
    let header = backup::restore(open_backup(file)?, &cli.cache_dir)
        .with_context(|| format!("{} cannot be restored", file.display()))?;
    if let Err(e) = chown_like_parent(&cli.cache_dir) {
        eprintln!("warning: {}", daemon::report::chain(&*e));
    }
    drop(lock);
    println!(
        "Restored {} into {}: transaction {}, schema {}, {} entries, {} module state(s)",
        file.display(),
        cli.cache_dir.display(),
        header.notifier_id,
        header.schema_id,
        header.entries,
        header.modules.len()
    );
    std::io::stdout().flush()?;
    Ok(ExitCode::SUCCESS)
}

/// The restored files belong to the owner of the cache directory (the listener user), as
/// the replaced ones did.
fn chown_like_parent(cache_dir: &Path) -> anyhow::Result<()> {
    for path in [
        cache_dir.join(cache::DB_DIR),
        cache_dir.join(STATE_DIR),
        cache_dir.join(cache::NOTIFIER_ID_FILE),
    ] {
        chown_tree(&path, cache_dir)?;
    }
    Ok(())
}

fn chown_tree(path: &Path, like: &Path) -> anyhow::Result<()> {
    tools::give_to_owner_of(path, like)?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), like)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_shortened_to_its_last_line() {
        let traceback = "Traceback (most recent call last):\n  File \"m.py\", line 3\n\
                         ValueError: boom\n\n";
        assert_eq!(shorten(traceback), "ValueError: boom");
        assert_eq!(shorten(""), "");
        let long = "x".repeat(ERROR_SHOWN + 5);
        let short = shorten(&long);
        assert_eq!(short.chars().count(), ERROR_SHOWN + 1);
        assert!(short.ends_with('…'));
    }
}
