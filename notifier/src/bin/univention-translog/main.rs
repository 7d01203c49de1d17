//! `univention-translog`: inspect and repair the notifier's transaction log, and keep
//! `cn=translog` in LDAP in step with it. A reimplementation of the UCS Python tool.

mod backup;
mod check;
mod files;
mod ldap;
mod log;
mod prune;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand};
use daemon::paths::QueueFiles;
use daemon::ucr::Ucr;
use notifier::config::IntakeKind;
use notifier::intake::accesslog::POSITION_FILE;

use crate::files::{Translog, ldap_dir, open_index, parent_dir};
use crate::log::error;

/// The notifier's directory, as its `--ldap-dir`; the log is `notify/transaction` in it.
const DEFAULT_LDAP_DIR: &str = "/var/lib/univention-ldap";

const AFTER_HELP: &str = "\
Output formats:
  stat     one \"Name: value\" line each: Index.file, Index.size, Index.count, Index.okay,
           Translog.file, Translog.size, Translog.first, Translog.last, Translog.count,
           and, when LDAP is reachable, Ldap.last and Ldap.okay (okay is \"yes\" or \"no\")
  lookup   Transaction(tid=<id>, dn='<dn>', command='<c>')
  ldap     tid=<reqSession> dn=<reqDN> command=<reqType>
  index    \"%8d[x]: offset\" per entry, x for valid entries and a space otherwise

Modifying sub-commands (check --fix, prune) refuse to run while the notifier holds
transaction.lock. Services are never stopped or started by this tool.

Exit status: 0 success, 1 problems found or operation refused (check: also when nothing
applies to this host), 2 usage or I/O error
(backup: see `univention-translog backup --help`).";

#[derive(Parser, Debug)]
#[command(
    name = "univention-translog",
    version,
    about = "Univention Directory Notifier transaction log admin command",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Transaction file [default: <LDAP_DIR>/notify/transaction]
    #[arg(
        short = 'T',
        long,
        value_name = "FILENAME",
        env = "UDN_TRANSLOG_FILE",
        global = true
    )]
    translog_file: Option<PathBuf>,
    /// The notifier's directory (its --ldap-dir), where the transaction file is found
    #[arg(
        long,
        value_name = "LDAP_DIR",
        env = "UDN_LDAP_DIR",
        default_value = DEFAULT_LDAP_DIR,
        global = true
    )]
    ldap_dir: PathBuf,
    /// LDAP URL of the cn=translog database; ldapi:/// means /var/run/slapd/ldapi
    #[arg(
        short = 'H',
        long,
        value_name = "URL",
        default_value = "ldapi:///",
        env = "UDN_TRANSLOG_URI",
        global = true
    )]
    translog_ldap: String,
    /// LDAP base of the translog entries
    #[arg(
        short = 'B',
        long,
        value_name = "DN",
        default_value = "cn=translog",
        global = true
    )]
    translog_base: String,
    /// Bind DN for a simple bind (default: SASL EXTERNAL over ldapi, anonymous otherwise)
    #[arg(short = 'D', long = "binddn", value_name = "DN", global = true)]
    bind_dn: Option<String>,
    /// Password for the simple bind
    #[arg(short = 'w', long = "bindpw", value_name = "PASSWORD", global = true)]
    bind_pw: Option<String>,
    /// Ignore existing or missing LDAP entries
    #[arg(short = 'l', long, global = true)]
    lenient: bool,
    /// Increase verbosity (-v info, -vv debug)
    #[arg(short = 'v', long = "verbose", action = ArgAction::Count, global = true)]
    verbose: u8,
    /// Do not modify anything
    #[arg(short = 'n', long, global = true)]
    dry_run: bool,
    /// Time stamp for reqStart of imported entries [now, UTC, YYYYmmddHHMMSSZ]
    #[arg(short = 'd', long, value_name = "TIMESTAMP", global = true, value_parser = parse_datetime)]
    datetime: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show statistics of the transaction file, its index and cn=translog
    Stat,
    /// Look up transactions in the transaction file (through the index)
    Lookup {
        /// Transaction IDs
        #[arg(required = true, value_name = "TID")]
        ids: Vec<u64>,
    },
    /// Look up transactions in LDAP (reqSession=TID,<base>)
    Ldap {
        /// Transaction IDs
        #[arg(required = true, value_name = "TID")]
        ids: Vec<u64>,
    },
    /// Dump the index file
    Index {
        /// First transaction ID to dump
        #[arg(short = 'm', long, default_value_t = 1)]
        min: u64,
        /// Last transaction ID to dump [last entry of the index]
        #[arg(short = 'M', long)]
        max: Option<u64>,
    },
    /// Check (and with --fix repair) the transaction, listener and last_id files
    Check(CheckArgs),
    /// Remove old transactions from the transaction file and from cn=translog
    Prune {
        /// Oldest transaction ID to keep; negative: keep the last |TID| transactions
        #[arg(value_name = "TID", allow_negative_numbers = true)]
        id: i64,
        /// Server role [UCR server/role]
        #[arg(short = 'r', long, value_name = "ROLE")]
        role: Option<String>,
    },
    /// Add the newest transactions of the transaction file to cn=translog
    Import {
        /// Number of most recent transactions to import
        #[arg(short = 'c', long, default_value_t = 100_000)]
        count: u64,
        /// First transaction ID to import
        #[arg(short = 'm', long)]
        min: Option<u64>,
        /// Last transaction ID to import
        #[arg(short = 'M', long)]
        max: Option<u64>,
    },
    /// Back up, verify and restore the transaction log, its index and the intake position
    #[command(subcommand, after_help = backup::AFTER_HELP)]
    Backup(backup::BackupCmd),
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// Try to fix issues (the notifier must be stopped)
    #[arg(short = 'f', long)]
    fix: bool,
    /// LDAP base [UCR ldap/base]
    #[arg(short = 'b', long, value_name = "DN")]
    base: Option<String>,
    /// Server role [UCR server/role]
    #[arg(short = 'r', long, value_name = "ROLE")]
    role: Option<String>,
    /// Listener file [<ldap-dir>/listener/listener, ldap-dir = parent of the notify dir]
    #[arg(short = 'L', long, value_name = "FILENAME")]
    listener_file: Option<PathBuf>,
    /// Notifier's private listener file [<ldap-dir>/listener/listener.priv]
    #[arg(short = 'P', long, value_name = "FILENAME")]
    listener_private_file: Option<PathBuf>,
    /// last_id file [<ldap-dir>/last_id]
    #[arg(short = 'I', long, value_name = "FILENAME")]
    last_file: Option<PathBuf>,
    /// Do not warn that services must be stopped (they are never stopped by this tool)
    #[arg(short = 'S', long)]
    skip_services: bool,
    /// The notifier's intake [accesslog if <notify dir>/accesslog.position exists, else
    /// file]: accesslog checks the log and that position instead of the queue files and
    /// last_id, and needs no server role
    #[arg(long, value_enum, value_name = "INTAKE")]
    intake: Option<IntakeKind>,
}

fn parse_datetime(s: &str) -> Result<String, String> {
    let ok = s.len() == 15 && s.ends_with('Z') && s.bytes().take(14).all(|b| b.is_ascii_digit());
    if ok {
        Ok(s.to_owned())
    } else {
        Err("expected YYYYmmddHHMMSSZ".to_owned())
    }
}

/// Exit status of a sub-command that ran to completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Ok,
    /// Problems found or operation refused.
    Problem,
    /// Usage or I/O error (reported by the sub-command itself).
    Error,
    /// Refused because the notifier is running.
    Running,
    /// Unknown or newer archive format.
    Format,
}

fn main() -> ExitCode {
    if let Some(code) = daemon::man::print_if_requested(Cli::command, daemon::man::SECTION_TOOL) {
        return code;
    }
    let cli = Cli::parse();
    log::init(cli.verbose);
    let result = run(cli);
    let _ = std::io::stdout().flush();
    match result {
        Ok(Exit::Ok) => ExitCode::SUCCESS,
        Ok(Exit::Problem) => ExitCode::from(1),
        Ok(Exit::Error) => ExitCode::from(2),
        Ok(Exit::Running) => ExitCode::from(3),
        Ok(Exit::Format) => ExitCode::from(4),
        Err(e) => {
            error!("{}", daemon::report::chain(&*e));
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<Exit> {
    let translog_file = cli
        .translog_file
        .clone()
        .unwrap_or_else(|| cli.ldap_dir.join("notify").join("transaction"));
    let ucr = Ucr::load_default();
    let role_default = || ucr.get("server/role").map(str::to_owned);
    let conn = ldap::ConnOptions {
        url: cli.translog_ldap.clone(),
        base: cli.translog_base.clone(),
        bind_dn: cli.bind_dn.clone(),
        bind_pw: cli.bind_pw.clone(),
        lenient: cli.lenient,
        dry_run: cli.dry_run,
        datetime: cli.datetime.clone(),
    };
    match cli.command {
        Cmd::Stat => stat(&translog_file, &conn),
        Cmd::Lookup { ids } => lookup(&translog_file, &ids),
        Cmd::Ldap { ids } => ldap::lookup(&conn, &ids),
        Cmd::Index { min, max } => dump_index(&translog_file, min, max),
        Cmd::Check(args) => {
            let ldap_dir = ldap_dir(&translog_file);
            let position_file = parent_dir(&translog_file).join(POSITION_FILE);
            let intake = args.intake.unwrap_or(if position_file.exists() {
                IntakeKind::Accesslog
            } else {
                IntakeKind::File
            });
            let opts = check::CheckOptions {
                translog: translog_file.clone(),
                fix: args.fix,
                dry_run: cli.dry_run,
                base: args
                    .base
                    .or_else(|| ucr.get("ldap/base").map(str::to_owned))
                    .unwrap_or_default(),
                role: args.role.or_else(role_default),
                listener: args
                    .listener_file
                    .unwrap_or_else(|| QueueFiles::in_ldap_dir(&ldap_dir).queue()),
                listener_priv: args
                    .listener_private_file
                    .unwrap_or_else(|| QueueFiles::in_ldap_dir(&ldap_dir).private()),
                last_file: args.last_file.unwrap_or_else(|| ldap_dir.join("last_id")),
                skip_services: args.skip_services,
                intake,
                position_file,
            };
            check::run(&opts)
        }
        Cmd::Prune { id, role } => {
            let role = role.or_else(role_default);
            prune::run(&translog_file, id, role.as_deref(), &conn)
        }
        Cmd::Import { count, min, max } => ldap::import(&translog_file, &conn, count, min, max),
        Cmd::Backup(cmd) => backup::run(cmd, &translog_file, cli.dry_run),
    }
}

fn stat(path: &std::path::Path, conn: &ldap::ConnOptions) -> Result<Exit> {
    let translog = Translog::open(path)?;
    let index_path = notifier::journal::index::index_path_for(path);
    let (size, count) = match open_index(path) {
        Some(index) => (index.size()?, index.count()?),
        None => (
            std::fs::metadata(&index_path).map(|m| m.len()).unwrap_or(0),
            0,
        ),
    };
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    println!("Index.file: {}", index_path.display());
    println!("Index.size: {size}");
    println!("Index.count: {count}");
    println!("Index.okay: {}", yes_no(count == translog.last));
    println!("Translog.file: {}", path.display());
    println!("Translog.size: {}", translog.size);
    println!("Translog.first: {}", translog.first);
    println!("Translog.last: {}", translog.last);
    println!("Translog.count: {}", translog.count());
    let _ = std::io::stdout().flush();
    match ldap::last_present(conn, translog.first, translog.last) {
        Ok(last) => {
            println!("Ldap.last: {last}");
            println!("Ldap.okay: {}", yes_no(last == translog.last));
        }
        Err(e) => crate::log::warning!(
            "LDAP not reachable, skipping Ldap.*: {}",
            daemon::report::chain(&*e)
        ),
    }
    Ok(Exit::Ok)
}

fn lookup(path: &std::path::Path, ids: &[u64]) -> Result<Exit> {
    let translog = Translog::open(path)?;
    let index = open_index(path);
    let mut exit = Exit::Ok;
    for &id in ids {
        match translog.lookup(index.as_ref(), id)? {
            Some(tx) => println!(
                "Transaction(tid={}, dn={}, command={})",
                tx.id,
                py_repr(&tx.dn),
                py_repr(&tx.command.to_string())
            ),
            None => {
                error!("transaction {id} not found in {}", path.display());
                exit = Exit::Problem;
            }
        }
    }
    Ok(exit)
}

/// Python's `repr()` of a string, as the Python tool printed its named tuple.
fn py_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

fn dump_index(path: &std::path::Path, min: u64, max: Option<u64>) -> Result<Exit> {
    let index_path = notifier::journal::index::index_path_for(path);
    let index = match notifier::journal::index::Index::open(&index_path) {
        Ok(index) => index,
        Err(e) => {
            error!("{e}");
            return Ok(Exit::Problem);
        }
    };
    let count = index.count()?;
    let end = max.unwrap_or(count).min(count);
    if min > end {
        return Ok(Exit::Ok);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut result = Ok(());
    index.for_each_entry(min, end - min + 1, |id, entry| {
        let entry = entry.unwrap_or_default();
        let mark = if entry.valid { 'x' } else { ' ' };
        result = writeln!(out, "{id:8}[{mark}]: {}", entry.offset);
        result.is_ok()
    })?;
    result?;
    out.flush()?;
    Ok(Exit::Ok)
}
