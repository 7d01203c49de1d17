//! `check [--fix]`: consistency of the committed log, the notifier's queue files and
//! `last_id` (spec/notifier.md §7.2).
//!
//! What is checked follows the notifier's intake. The UCS queue-file intake (Primary and
//! Backup): the log, the queue files and, on a Primary, the overlay's `last_id`. The
//! accesslog intake (stock OpenLDAP, no UCS role): the log and the stored accesslog
//! position; it has no queue files and no `last_id`, so reporting those would be noise.
//!
//! The three transaction files form one chain: `transaction` (committed), then
//! `listener.priv` (the notifier's left-over work queue) if present, then `listener` (pending
//! lines from slapd). Problems are classified by the fix that removes them: *sort* and *fill*
//! for the committed log, *renum* for the queue files, *syntax* for anything that needs an
//! administrator. Fixed contents are built in memory, re-checked, and only then written
//! with the `.new`/`.bak` rename.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use daemon::lock::{LockError, lock_path};
use daemon::paths::QueueFiles;
use notifier::journal::scan::{LineScanner, is_blank, line_id, trim_line};
use proto::line::MAX_LINE_LEN;

use crate::Exit;
use crate::files::{LockOutcome, lock_translog, parent_dir, remove_index, replace_file};
use crate::log::{debug, error, info, warning};
use ldap::dn::is_dn;
use notifier::config::IntakeKind;
use notifier::intake::accesslog::Position;

pub const PRIMARY: &str = "domaincontroller_master";
pub const BACKUP: &str = "domaincontroller_backup";

const HELP_RESET: &str = "See <https://help.univention.com/t/how-to-reset-listener-notifier-replication/11710> for more details.";
const HELP_RERUN: &str =
    "You can re-run this tool with the option \"--fix\" in order to try to fix this issue.";
const HELP_FIX: &str = "See <https://help.univention.com/t/problem-umc-diagnostic-module-complains-about-problems-with-udn-replication/11707/1> for more details.";

/// Holes larger than this are not filled with dummy lines: a reset is the saner repair.
const MAX_FILL: u64 = 10_000_000;

/// How long to wait for `listener.lock`, which slapd holds briefly while appending.
const LISTENER_LOCK_ATTEMPTS: u32 = 100;
const LISTENER_LOCK_DELAY: Duration = Duration::from_millis(10);

pub struct CheckOptions {
    pub translog: PathBuf,
    pub fix: bool,
    pub dry_run: bool,
    pub base: String,
    pub role: Option<String>,
    pub listener: PathBuf,
    pub listener_priv: PathBuf,
    pub last_file: PathBuf,
    pub skip_services: bool,
    /// The notifier's intake: given, or detected by its stored accesslog position.
    pub intake: IntakeKind,
    /// `<notify dir>/accesslog.position`.
    pub position_file: PathBuf,
}

impl CheckOptions {
    /// Whether this host's notifier owns its log: a Primary, or any notifier following its
    /// own server's accesslog (there is no role on stock OpenLDAP). Only then may the log
    /// be repaired here; elsewhere it is a copy and the host must be re-joined.
    fn owns_the_log(&self) -> bool {
        self.intake == IntakeKind::Accesslog || self.role.as_deref() == Some(PRIMARY)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The committed log: may be sorted and filled, never renumbered.
    Translog,
    /// `listener.priv` / `listener`: may be renumbered.
    Pending,
}

/// What a reported problem needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// Reported only (`fix=False` in UCS).
    Nothing,
    Sort,
    Fill,
    Renum,
    /// Cannot be repaired automatically.
    Syntax,
}

#[derive(Clone, Debug, Default)]
struct Report {
    needs_fixing: bool,
    sort: bool,
    fill: bool,
    renum: bool,
    syntax: bool,
    /// ID of the last valid line, or the chain's start if there is none.
    last_tid: u64,
    last_line: String,
}

struct Checker<'a> {
    kind: Kind,
    name: &'a str,
    translog_name: &'a str,
    base: &'a str,
    report: Report,
    seen_record: bool,
}

impl Checker<'_> {
    fn problem(&mut self, lnr: u64, raw: &str, msg: &str, need: Need) {
        error!("{}:{lnr}:{raw:?}: {msg}", self.name);
        let r = &mut self.report;
        r.needs_fixing |= need != Need::Nothing;
        match need {
            Need::Nothing => {}
            Need::Sort => r.sort = true,
            Need::Fill => r.fill = true,
            Need::Renum => r.renum = true,
            Need::Syntax => r.syntax = true,
        }
    }

    fn line(&mut self, lnr: u64, nul_prefix: u64, bytes: &[u8], complete: bool, truncated: bool) {
        let raw_text = String::from_utf8_lossy(bytes);
        let raw = raw_text.as_ref();
        let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        if !complete {
            self.problem(lnr, raw, "Missing newline line", Need::Nothing);
        }
        let no_ws = body.trim_ascii();
        if no_ws.len() != body.len() {
            self.problem(lnr, raw, "Extra whitespace", Need::Nothing);
        }
        if nul_prefix > 0 || no_ws.first() == Some(&0) || no_ws.last() == Some(&0) {
            self.problem(lnr, raw, "Binary zeros", Need::Nothing);
        }
        let line = trim_line(bytes);
        if line.is_empty() {
            // A blank or NUL-only line carries nothing; the notifier skips it too.
            self.problem(lnr, raw, "Empty line", Need::Nothing);
            return;
        }
        if truncated || line.len() >= MAX_LINE_LEN {
            self.problem(lnr, raw, "Line too long", Need::Syntax);
            return;
        }
        let Some(first) = line.iter().position(|&b| b == b' ') else {
            self.problem(lnr, raw, "Invalid line", Need::Syntax);
            self.report.last_line = String::from_utf8_lossy(line).into_owned();
            return;
        };
        let last = line.iter().rposition(|&b| b == b' ').unwrap_or(first);
        let tid_text = line.get(..first).unwrap_or_default();
        let (dn, cmd): (&[u8], &[u8]) = if first == last {
            self.problem(lnr, raw, "Invalid line", Need::Syntax);
            (line.get(first + 1..).unwrap_or_default(), b"")
        } else {
            (
                line.get(first + 1..last).unwrap_or_default(),
                line.get(last + 1..).unwrap_or_default(),
            )
        };
        let tid = line_id(tid_text).filter(|&t| t > 0);
        let line_text = String::from_utf8_lossy(line).into_owned();
        let Some(tid) = tid else {
            // Queue lines can be renumbered; a committed line cannot.
            let need = match self.kind {
                Kind::Pending => Need::Renum,
                Kind::Translog => Need::Syntax,
            };
            self.problem(lnr, raw, "Invalid transaction id", need);
            self.report.last_line = line_text;
            return;
        };
        if !matches!(cmd, b"r" | b"d" | b"a" | b"m") {
            self.problem(lnr, raw, "Invalid command", Need::Syntax);
        }
        match std::str::from_utf8(dn) {
            Ok(dn) if !dn.is_empty() => {
                if !is_dn(dn) {
                    self.problem(lnr, raw, "Invalid dn", Need::Nothing);
                } else if !ends_with_ignore_case(dn, self.base) {
                    self.problem(lnr, raw, "Foreign dn", Need::Nothing);
                }
            }
            _ => self.problem(lnr, raw, "Invalid dn", Need::Syntax),
        }
        self.chain(lnr, raw, tid);
        self.seen_record = true;
        self.report.last_tid = tid;
        self.report.last_line = line_text;
    }

    fn chain(&mut self, lnr: u64, raw: &str, tid: u64) {
        let prev = self.report.last_tid;
        let prev_line = self.report.last_line.clone();
        match self.kind {
            Kind::Translog => {
                if !self.seen_record {
                    info!("{}:{lnr}: Starts with: {raw:?}", self.name);
                } else if tid <= prev {
                    self.problem(
                        lnr,
                        raw,
                        &format!("Repeated line after {prev_line:?}"),
                        Need::Sort,
                    );
                } else if tid != prev + 1 {
                    self.problem(lnr, raw, &format!("Hole after {prev_line:?}"), Need::Fill);
                }
            }
            Kind::Pending => {
                if prev.checked_add(1) == Some(tid) {
                } else if tid <= prev {
                    self.problem(
                        lnr,
                        raw,
                        &format!("Repeated line {prev_line:?}"),
                        Need::Renum,
                    );
                } else if !self.seen_record {
                    let msg = format!("Not continuous with {}: {prev_line:?}", self.translog_name);
                    self.problem(lnr, raw, &msg, Need::Renum);
                } else {
                    self.problem(lnr, raw, &format!("Hole after {prev_line:?}"), Need::Renum);
                }
            }
        }
    }
}

fn ends_with_ignore_case(dn: &str, base: &str) -> bool {
    dn.len() >= base.len()
        && dn
            .as_bytes()
            .get(dn.len() - base.len()..)
            .is_some_and(|tail| tail.eq_ignore_ascii_case(base.as_bytes()))
}

/// Checks one file's content, continuing the chain after `prev_tid`/`prev_line`.
fn check_content(
    reader: impl Read,
    kind: Kind,
    name: &str,
    translog_name: &str,
    base: &str,
    prev_tid: u64,
    prev_line: &str,
) -> io::Result<Report> {
    info!("Reading {name} ...");
    let mut checker = Checker {
        kind,
        name,
        translog_name,
        base,
        report: Report {
            last_tid: prev_tid,
            last_line: prev_line.to_owned(),
            ..Report::default()
        },
        seen_record: false,
    };
    let mut scanner = LineScanner::new(reader).with_max_keep(MAX_LINE_LEN * 2);
    let mut buf = Vec::new();
    while let Some(info) = scanner.read_line(&mut buf)? {
        let truncated = (buf.len() as u64).saturating_add(info.nul_prefix) < info.len;
        checker.line(
            info.line_no,
            info.nul_prefix,
            &buf,
            info.complete,
            truncated,
        );
    }
    info!("Reading {name} done");
    Ok(checker.report)
}

fn check_file(
    path: &Path,
    kind: Kind,
    opts: &CheckOptions,
    prev_tid: u64,
    prev_line: &str,
) -> Result<Report> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    check_content(
        file,
        kind,
        &path.display().to_string(),
        &opts.translog.display().to_string(),
        &opts.base,
        prev_tid,
        prev_line,
    )
    .with_context(|| format!("cannot read {}", path.display()))
}

/// The content lines of a file: trimmed, blank lines dropped.
fn content_lines(data: &[u8]) -> Vec<&[u8]> {
    data.split(|&b| b == b'\n')
        .filter(|l| !is_blank(l))
        .map(trim_line)
        .collect()
}

/// The numeric sort key of `sort -k1n`: the leading decimal number, 0 if there is none.
/// Compared as digit strings so any length works.
fn numeric_key(line: &[u8]) -> &[u8] {
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(line.len());
    let digits = line.get(..digits_end).unwrap_or_default();
    let zeros = digits.iter().take_while(|&&b| b == b'0').count();
    digits.get(zeros..).unwrap_or_default()
}

fn rest_key(line: &[u8]) -> &[u8] {
    match line.iter().position(|&b| b == b' ') {
        Some(p) => line.get(p + 1..).unwrap_or_default(),
        None => b"",
    }
}

fn sort_key_cmp(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let (na, nb) = (numeric_key(a), numeric_key(b));
    na.len()
        .cmp(&nb.len())
        .then_with(|| na.cmp(nb))
        .then_with(|| rest_key(a).cmp(rest_key(b)))
}

/// What `sort -k1n -k2 -u` does to the committed log: ordered by ID, then by the rest of
/// the line; lines equal in both keys are kept once.
fn sort_unique(data: &[u8]) -> Vec<u8> {
    let mut lines = content_lines(data);
    lines.sort_by(|a, b| sort_key_cmp(a, b));
    lines.dedup_by(|a, b| sort_key_cmp(a, b).is_eq());
    join_lines(&lines)
}

fn join_lines(lines: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for l in lines {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    out
}

/// Inserts `<id> <base> m` for every ID missing between consecutive lines.
fn fill_holes(data: &[u8], base: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(data.len());
    let mut next: Option<u64> = None;
    let mut filled: u64 = 0;
    for line in content_lines(data) {
        if let (Some(n), Some(id)) = (next, line_id(line))
            && id > n
        {
            filled = filled.saturating_add(id - n);
            if filled > MAX_FILL {
                return Err(format!(
                    "more than {MAX_FILL} transactions are missing; filling them is not sensible"
                ));
            }
            for missing in n..id {
                info!("Filling {missing} ...");
                let _ = writeln!(ByteWriter(&mut out), "{missing} {base} m");
            }
        }
        if let Some(id) = line_id(line) {
            next = id.checked_add(1);
        }
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    Ok(out)
}

/// Rewrites every line with consecutive IDs after `prev`, keeping DN and command.
fn renumber(data: &[u8], prev: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut tid = prev;
    for line in content_lines(data) {
        let (Some(first), Some(last)) = (
            line.iter().position(|&b| b == b' '),
            line.iter().rposition(|&b| b == b' '),
        ) else {
            out.extend_from_slice(line);
            out.push(b'\n');
            continue;
        };
        tid = tid.saturating_add(1);
        debug!("Renum {:?} to {tid} ...", String::from_utf8_lossy(line));
        let _ = write!(ByteWriter(&mut out), "{tid}");
        out.extend_from_slice(line.get(first..last).unwrap_or_default());
        out.extend_from_slice(line.get(last..).unwrap_or_default());
        out.push(b'\n');
    }
    out
}

/// `fmt::Write` into a byte buffer.
struct ByteWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for ByteWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn print_rerun_help() {
    println!();
    println!("{HELP_RERUN}");
    println!("{HELP_FIX}");
}

/// Replaces `path` unless this is a dry run.
fn write_fixed(path: &Path, content: &[u8], dry_run: bool) -> Result<()> {
    if dry_run {
        info!("(dry run) not replacing {}", path.display());
        return Ok(());
    }
    replace_file(path, content)
}

/// Fixes the committed log; returns its final report, or the exit status to stop with.
fn fix_translog(opts: &CheckOptions, report: Report) -> Result<Result<Report, Exit>> {
    let path = &opts.translog;
    let name = path.display().to_string();
    if report.syntax {
        println!("- contains unparseable lines!");
        println!();
        println!("{HELP_RESET}");
        return Ok(Err(Exit::Problem));
    }
    let mut data = fs::read(path).with_context(|| format!("cannot read {name}"))?;
    let mut report = report;
    let mut changed = false;
    if report.sort {
        info!("Sorting ...");
        println!("- the transactions are not sorted uniquely");
        let sorted = sort_unique(&data);
        let again = check_content(&sorted[..], Kind::Translog, &name, &name, &opts.base, 0, "")?;
        if again.sort {
            println!("- still contains duplicate transactions after unique sorting!");
            println!("UCS Primary must be reset and all other UCS systems must be re-joined!");
            println!();
            println!("{HELP_RESET}");
            return Ok(Err(Exit::Problem));
        }
        if !opts.fix {
            print_rerun_help();
            return Ok(Err(Exit::Problem));
        }
        data = sorted;
        report = again;
        changed = true;
    }
    if report.fill {
        info!("Filling holes ...");
        println!("- missing transactions in sequence");
        if !opts.fix {
            print_rerun_help();
            return Ok(Err(Exit::Problem));
        }
        if opts.base.is_empty() {
            println!("- cannot fill holes without an LDAP base (--base)");
            return Ok(Err(Exit::Problem));
        }
        let filled = match fill_holes(&data, &opts.base) {
            Ok(filled) => filled,
            Err(why) => {
                println!("- {why}");
                println!();
                println!("{HELP_RESET}");
                return Ok(Err(Exit::Problem));
            }
        };
        let again = check_content(&filled[..], Kind::Translog, &name, &name, &opts.base, 0, "")?;
        if again.sort || again.fill || again.syntax {
            // Cannot happen for a sorted file; refuse rather than write something odd.
            println!("- filling the holes did not produce a consecutive log");
            println!();
            println!("{HELP_RESET}");
            return Ok(Err(Exit::Problem));
        }
        data = filled;
        report = again;
        changed = true;
    }
    if changed {
        write_fixed(path, &data, opts.dry_run)?;
        remove_index(path, opts.dry_run)?;
    }
    Ok(Ok(report))
}

/// Fixes a queue file; returns its final report, or the exit status to stop with.
fn fix_pending(
    opts: &CheckOptions,
    path: &Path,
    report: Report,
    prev_tid: u64,
    prev_line: &str,
) -> Result<Result<Report, Exit>> {
    if report.syntax {
        println!("- contains unparseable lines!");
        println!();
        println!("{HELP_RESET}");
        return Ok(Err(Exit::Problem));
    }
    if !report.renum {
        return Ok(Ok(report));
    }
    info!("Renumbering ...");
    println!("- pending transactions are not consecutive");
    if !opts.fix {
        print_rerun_help();
        return Ok(Err(Exit::Problem));
    }
    let name = path.display().to_string();
    let data = fs::read(path).with_context(|| format!("cannot read {name}"))?;
    let renumbered = renumber(&data, prev_tid);
    let translog_name = opts.translog.display().to_string();
    let again = check_content(
        &renumbered[..],
        Kind::Pending,
        &name,
        &translog_name,
        &opts.base,
        prev_tid,
        prev_line,
    )?;
    if again.renum || again.syntax {
        println!("- renumbering did not produce consecutive transactions");
        println!();
        println!("{HELP_RESET}");
        return Ok(Err(Exit::Problem));
    }
    // slapd appends to the listener file under listener.lock; hold it while replacing.
    let _listener_lock = if opts.dry_run {
        None
    } else {
        let lock = QueueFiles::in_dir(&parent_dir(path)).lock();
        match lock_path(&lock, LISTENER_LOCK_ATTEMPTS, LISTENER_LOCK_DELAY) {
            Ok(l) => Some(l),
            Err(LockError::Busy { .. }) => {
                println!(
                    "- {} is held by slapd or the notifier; stop them first",
                    lock.display()
                );
                return Ok(Err(Exit::Problem));
            }
            Err(e) => return Err(e).context("cannot lock the listener files"),
        }
    };
    write_fixed(path, &renumbered, opts.dry_run)?;
    Ok(Ok(again))
}

/// Prints the header for a file that needs fixing; `Some(exit)` when this role cannot fix.
fn needs_fixing_header(opts: &CheckOptions, path: &Path) -> Option<Exit> {
    println!();
    println!("{} needs fixing:", path.display());
    if !opts.owns_the_log() {
        println!("This UCS system must be re-joined!");
        println!();
        println!("{HELP_FIX}");
        return Some(Exit::Problem);
    }
    None
}

/// Compares `last_id` with the chain's last ID and rewrites it with `--fix`.
fn check_last(opts: &CheckOptions, last_tid: u64) -> Result<Exit> {
    let path = &opts.last_file;
    let problem = match fs::read(path) {
        Err(e) => Some(format!("should be {last_tid}, but cannot be read: {e}")),
        Ok(data) => {
            let text = String::from_utf8_lossy(&data);
            let text = text.trim();
            if text.is_empty() {
                Some(format!("should be {last_tid}, but is empty"))
            } else {
                match text.parse::<u64>() {
                    Ok(tid) if tid == last_tid => None,
                    Ok(tid) => Some(format!("should be {last_tid}, but is {tid}")),
                    Err(_) => Some(format!("should be {last_tid}, but is {text:?}")),
                }
            }
        }
    };
    let Some(problem) = problem else {
        return Ok(Exit::Ok);
    };
    error!("{}: Invalid last id: {problem}", path.display());
    if !opts.fix {
        println!();
        println!("{} needs manual fixing!", path.display());
        print_rerun_help();
        return Ok(Exit::Problem);
    }
    if opts.dry_run {
        info!("(dry run) not updating {}", path.display());
    } else {
        // Written in place like UCS, so slapd's overlay keeps owning the file.
        fs::write(path, last_tid.to_string())
            .with_context(|| format!("cannot write {}", path.display()))?;
        debug!("{}: Updated to: {last_tid}", path.display());
    }
    Ok(Exit::Ok)
}

/// Compares the stored accesslog position with the log's last id. The position is stored
/// after each commit, so a crash in between leaves it behind (the notifier skips the
/// replayed ids); ahead of the log it means committed transactions were lost.
fn check_position(opts: &CheckOptions, last_tid: u64) -> Result<Exit> {
    let path = &opts.position_file;
    let position = match Position::load(path) {
        Ok(Some(position)) => position,
        Ok(None) => {
            warning!(
                "{} does not exist: the notifier has not started on this log yet",
                path.display()
            );
            return Ok(Exit::Ok);
        }
        Err(e) => {
            error!("{e}");
            return Ok(Exit::Problem);
        }
    };
    if position.id > last_tid {
        error!(
            "{}: position at id {} (CSN {:?}) is ahead of the log, which ends at {last_tid}: \
             committed transactions are missing from {}",
            path.display(),
            position.id,
            position.csn,
            opts.translog.display()
        );
        println!();
        println!("{} needs manual fixing!", opts.translog.display());
        println!("{HELP_RESET}");
        return Ok(Exit::Problem);
    }
    info!(
        "{}: position at id {} (CSN {:?}), the log ends at {last_tid}",
        path.display(),
        position.id,
        position.csn
    );
    Ok(Exit::Ok)
}

pub fn run(opts: &CheckOptions) -> Result<Exit> {
    let accesslog = opts.intake == IntakeKind::Accesslog;
    if !accesslog && !matches!(opts.role.as_deref(), Some(PRIMARY | BACKUP)) {
        // Exit non-zero: a monitor calling this must not read "nothing checked" as "fine".
        println!(
            "This command is only for UCS Primary and Backup Nodes, or a notifier following \
             cn=accesslog (found by {}, or --intake accesslog); nothing was checked.",
            opts.position_file.display()
        );
        return Ok(Exit::Problem);
    }
    if opts.fix && !opts.skip_services {
        warning!(
            "this tool does not stop services: slapd, univention-directory-notifier and \
             univention-directory-listener must be stopped while --fix rewrites the files"
        );
    }
    let _lock = if opts.fix && !opts.dry_run {
        match lock_translog(&opts.translog)? {
            LockOutcome::Held(lock) => Some(lock),
            LockOutcome::Refused(why) => {
                eprintln!("univention-translog: {why}");
                return Ok(Exit::Problem);
            }
        }
    } else {
        None
    };

    let translog = &opts.translog;
    let mut report = if translog.exists() {
        check_file(translog, Kind::Translog, opts, 0, "")?
    } else {
        warning!(
            "{} does not exist; treating it as empty",
            translog.display()
        );
        Report::default()
    };
    if report.needs_fixing {
        if let Some(exit) = needs_fixing_header(opts, translog) {
            return Ok(exit);
        }
        report = match fix_translog(opts, report)? {
            Ok(r) => r,
            Err(exit) => return Ok(exit),
        };
    }

    if accesslog {
        for path in [&opts.listener_priv, &opts.listener] {
            if fs::metadata(path).is_ok_and(|m| m.len() > 0) {
                warning!(
                    "{} has content, but the accesslog intake never reads it",
                    path.display()
                );
            }
        }
        return check_position(opts, report.last_tid);
    }

    let (mut prev_tid, mut prev_line) = (report.last_tid, report.last_line);
    for path in [&opts.listener_priv, &opts.listener] {
        if !path.exists() {
            info!("{} does not exist", path.display());
            continue;
        }
        let report = check_file(path, Kind::Pending, opts, prev_tid, &prev_line)?;
        let report = if report.needs_fixing {
            if let Some(exit) = needs_fixing_header(opts, path) {
                return Ok(exit);
            }
            match fix_pending(opts, path, report, prev_tid, &prev_line)? {
                Ok(r) => r,
                Err(exit) => return Ok(exit),
            }
        } else {
            report
        };
        prev_tid = report.last_tid;
        prev_line = report.last_line;
    }

    if opts.role.as_deref() == Some(PRIMARY) {
        return check_last(opts, prev_tid);
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_numerically_and_uniquely() {
        let data = b"10 dc=x m\n2 dc=x m\n1 dc=x a\n2 dc=x m\n\0\n1 dc=y a\n";
        assert_eq!(
            sort_unique(data),
            b"1 dc=x a\n1 dc=y a\n2 dc=x m\n10 dc=x m\n".to_vec()
        );
        assert_eq!(
            sort_unique(b"01 dc=x a\n1 dc=x a\n"),
            b"01 dc=x a\n".to_vec()
        );
    }

    #[test]
    fn fills_and_renumbers() {
        assert_eq!(
            fill_holes(b"1 dc=x a\n4 dc=x m\n", "dc=b").unwrap(),
            b"1 dc=x a\n2 dc=b m\n3 dc=b m\n4 dc=x m\n".to_vec()
        );
        assert!(fill_holes(b"1 dc=x a\n99999999999 dc=x m\n", "dc=b").is_err());
        assert_eq!(
            renumber(b"<TransID> dc=x m\n0 cn=a b,dc=x a\n", 7),
            b"8 dc=x m\n9 cn=a b,dc=x a\n".to_vec()
        );
    }

    #[test]
    fn arbitrary_content_never_panics() {
        use proptest::prelude::*;
        proptest!(|(data in prop::collection::vec(
            prop_oneof![Just(b'\n'), Just(0u8), Just(b' '), Just(b'1'), any::<u8>()],
            0..200,
        ))| {
            let _ = check_content(&data[..], Kind::Translog, "t", "t", "dc=x", 0, "").unwrap();
            let _ = check_content(&data[..], Kind::Pending, "l", "t", "", 3, "x").unwrap();
            let _ = sort_unique(&data);
            let _ = renumber(&data, 0);
        });
    }

    #[test]
    fn base_suffix_ignores_case() {
        assert!(ends_with_ignore_case(
            "cn=a,DC=Example,dc=com",
            "dc=example,dc=com"
        ));
        assert!(!ends_with_ignore_case("dc=com", "dc=example,dc=com"));
        assert!(ends_with_ignore_case("anything", ""));
    }
}
