//! The committed transaction log `<notify-dir>/transaction`, its UCS index
//! `transaction.index` and the lock `transaction.lock`.
//!
//! [`Journal`] is the daemon's view: it holds the fcntl lock for its whole lifetime (so the
//! C tools and `univention-translog` can tell that a notifier is running) and serves lookups
//! from a ring buffer of the newest transactions, else through `transaction.index`.
//!
//! Start-up does not read the whole log: the index names the offset of a recent transaction
//! (the anchor), the line there must carry that id, and only the lines from the anchor to
//! the end are validated, torn tail cut and index entries written as before. Everything
//! before the anchor was validated when it was appended, and was synced: the committer syncs
//! at least every [`MAX_UNSYNCED`] lines, and the anchor lies further back than that. The
//! open then syncs the file, so lines a crashed process left unsynced are durable before
//! their ids are served. Without a usable index (missing,
//! foreign, no entry that checks out) the log is scanned once from the start and the index
//! rebuilt. Nothing is kept in memory per transaction: every index entry used is checked
//! against the id on its line, and a wrong one is found again by bisecting the log (whose
//! ids ascend) and rewritten.
//!
//! [`scan`] and [`index`] are usable without the lock, for the offline tool.

pub mod index;
pub mod scan;

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use proto::line::{LineError, MAX_LINE_LEN, Transaction};
use thiserror::Error;

use daemon::lock::{FileLock, LockError, lock_path};
use index::{Index, IndexEntry, IndexError, read_full_at};
use scan::{LineChecker, LineScanner, PosReader, content_start, is_blank, parse_line};

/// File name of the committed log inside the notify directory.
pub(crate) const TRANSACTION_FILE: &str = "transaction";
/// File name of the binary index.
pub(crate) const INDEX_FILE: &str = "transaction.index";
/// File name of the lock file.
pub const LOCK_FILE: &str = "transaction.lock";

/// Hint appended to every corruption error: repairing the committed log is an operator
/// decision, as in UCS.
pub(crate) const CHECK_HINT: &str =
    "stop the notifier and run `univention-translog check --fix` to repair it";

/// Tuning of [`Journal::open`], mirroring the notifier's `-C`, `-L` and `-T` options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalOptions {
    /// Transactions kept in memory (`-C`).
    pub ring_size: usize,
    /// Attempts to take `transaction.lock` (`-L`).
    pub lock_attempts: u32,
    /// Pause between lock attempts (`-T`).
    pub lock_delay: Duration,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            ring_size: 1000,
            lock_attempts: 100,
            lock_delay: Duration::from_micros(100),
        }
    }
}

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock the transaction log ({0}); is another notifier running?")]
    Lock(#[from] LockError),
    #[error("the transaction log in {dir} is already open in this process")]
    AlreadyOpen { dir: PathBuf },
    #[error("transaction log {path} is corrupt at line {line_no}: {reason}; {CHECK_HINT}")]
    Corrupt {
        path: PathBuf,
        line_no: u64,
        reason: String,
    },
    #[error(
        "transaction {got} cannot be appended: the log ends at {last}, so {expected} must come next"
    )]
    NotConsecutive { last: u64, expected: u64, got: u64 },
    #[error("transaction {id} cannot be written: {source}")]
    InvalidTransaction {
        id: u64,
        #[source]
        source: LineError,
    },
}

/// Something [`Journal::open`] fixed or tolerated; the daemon logs each one loudly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Repair {
    /// NUL bytes after the last line (delayed allocation after a crash) were cut off.
    TrailingNuls { offset: u64, bytes: u64 },
    /// A last line without `\n` (a torn write that was never synced) was cut off.
    TornLine {
        offset: u64,
        bytes: u64,
        content: String,
    },
    /// Lines holding only NUL bytes or whitespace were skipped; the log was left as is.
    BlankLines { count: u64, first_line_no: u64 },
    /// `transaction.index` was missing or disagreed with the log and was rewritten.
    IndexRebuilt { reason: String },
    /// The index entries of the newest transactions disagreed with the log (the index is
    /// written without fsync) and were rewritten.
    IndexRepaired { reason: String },
}

impl fmt::Display for Repair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Repair::TrailingNuls { offset, bytes } => write!(
                f,
                "truncated {bytes} NUL bytes at the end of the transaction log (offset {offset})"
            ),
            Repair::TornLine {
                offset,
                bytes,
                content,
            } => write!(
                f,
                "truncated an incomplete last line of {bytes} bytes at offset {offset}: {content:?}"
            ),
            Repair::BlankLines {
                count,
                first_line_no,
            } => write!(
                f,
                "ignored {count} blank or NUL-filled lines in the transaction log (first at line {first_line_no})"
            ),
            Repair::IndexRebuilt { reason } => {
                write!(f, "rebuilt the transaction index: {reason}")
            }
            Repair::IndexRepaired { reason } => {
                write!(f, "repaired the end of the transaction index: {reason}")
            }
        }
    }
}

/// Directories with an open [`Journal`] in this process. Record locks never conflict within
/// one process and closing any descriptor of the lock file drops the lock, so a second open
/// here would silently unlock the first.
static OPEN_DIRS: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Removes its directory from [`OPEN_DIRS`] when dropped.
#[derive(Debug)]
struct OpenGuard(PathBuf);

impl OpenGuard {
    fn claim(dir: &Path) -> Result<OpenGuard, JournalError> {
        let key = dir.canonicalize().map_err(|source| JournalError::Io {
            op: "resolve",
            path: dir.to_owned(),
            source,
        })?;
        let mut open = OPEN_DIRS.lock().unwrap_or_else(PoisonError::into_inner);
        if !open.insert(key.clone()) {
            return Err(JournalError::AlreadyOpen {
                dir: dir.to_owned(),
            });
        }
        Ok(OpenGuard(key))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let mut open = OPEN_DIRS.lock().unwrap_or_else(PoisonError::into_inner);
        open.remove(&self.0);
    }
}

/// The committed transaction log, locked for the lifetime of this value.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    index_path: PathBuf,
    file: File,
    /// `None` when the index cannot be written; the log itself is unaffected.
    index: Option<Index>,
    /// Length of the log; the next line goes here.
    len: u64,
    first_id: Option<u64>,
    /// Content offset of the `first_id` line: where a bisection starts.
    first_offset: u64,
    last_id: u64,
    /// The newest transactions, ending at `last_id`.
    ring: VecDeque<Transaction>,
    ring_size: usize,
    repairs: Vec<Repair>,
    // Dropped last: the lock must outlive every use of the files.
    _lock: FileLock,
    _guard: OpenGuard,
}

/// What one pass over (the end of) the log found.
struct Scanned {
    first_id: Option<u64>,
    last_id: u64,
    /// Content offset of each scanned transaction, from `first_id` on.
    offsets: Vec<u64>,
    ring: VecDeque<Transaction>,
    /// End of the last complete line.
    good_len: u64,
    /// A final line without `\n`.
    tail: Option<Tail>,
    /// Line number of the first blank line and how many there were.
    blank: Option<(u64, u64)>,
}

/// A final line without `\n`.
struct Tail {
    offset: u64,
    len: u64,
    nul_prefix: u64,
    /// The stored bytes after `nul_prefix` (a bounded prefix of the rest).
    kept: Vec<u8>,
}

impl Journal {
    /// Opens the log in `dir`, creating missing files; see the module documentation.
    pub fn open(dir: &Path, opts: &JournalOptions) -> Result<Journal, JournalError> {
        let guard = OpenGuard::claim(dir)?;
        let lock = lock_path(&dir.join(LOCK_FILE), opts.lock_attempts, opts.lock_delay)?;
        let path = dir.join(TRANSACTION_FILE);
        let index_path = dir.join(INDEX_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| io_err("open", &path, source))?;

        let index_repair;
        let (scanned, first_offset, index) =
            match open_from_index(&file, &path, &index_path, opts.ring_size)? {
                Some(fast) => {
                    index_repair = fast.repair;
                    (fast.scanned, fast.first_offset, Some(fast.index))
                }
                None => {
                    let scanned = scan_log(&file, &path, 0, opts.ring_size)?.map_err(
                        |(line_no, reason)| JournalError::Corrupt {
                            path: path.clone(),
                            line_no,
                            reason,
                        },
                    )?;
                    let (index, repair) = open_index(
                        &index_path,
                        scanned.first_id,
                        scanned.last_id,
                        &scanned.offsets,
                    );
                    index_repair = repair;
                    let first_offset = scanned.offsets.first().copied().unwrap_or(0);
                    (scanned, first_offset, index)
                }
            };
        let mut repairs = Vec::new();
        if let Some((first_line_no, count)) = scanned.blank {
            repairs.push(Repair::BlankLines {
                count,
                first_line_no,
            });
        }
        let mut len = scanned.good_len;
        if let Some(tail) = &scanned.tail {
            let offset = tail.offset;
            repairs.push(repair_tail(&file, &path, tail)?);
            file.set_len(offset)
                .map_err(|source| io_err("truncate", &path, source))?;
            len = offset;
        }
        // Synced before anything is served: lines a crashed process wrote but never synced
        // are complete in the page cache and read as committed, and the ids served from
        // them must survive a power loss. The cut of a torn tail must survive a second crash
        // before anything new is appended.
        file.sync_data()
            .map_err(|source| io_err("sync", &path, source))?;
        repairs.extend(index_repair);

        Ok(Journal {
            path,
            index_path,
            file,
            index,
            len,
            first_id: scanned.first_id,
            first_offset,
            last_id: scanned.last_id,
            ring: scanned.ring,
            ring_size: opts.ring_size,
            repairs,
            _lock: lock,
            _guard: guard,
        })
    }

    /// The newest transaction ID, 0 when the log is empty.
    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    /// The oldest transaction ID in the log; more than 1 after a prune.
    pub fn first_id(&self) -> Option<u64> {
        self.first_id
    }

    /// Path of the transaction file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends consecutive transactions with one write of all lines, then their index
    /// entries. The first must be `last_id + 1`; an empty log accepts any first ID (e.g. the
    /// log was reset while the listeners' IDs continue). Does not sync; see [`Journal::sync`].
    pub fn append(&mut self, txs: &[Transaction]) -> Result<(), JournalError> {
        let Some(first) = txs.first() else {
            return Ok(());
        };
        let expected = match self.first_id {
            Some(_) => self.last_id.checked_add(1),
            None => Some(first.id.get()),
        };
        let mut buf = Vec::new();
        let mut new_offsets = Vec::with_capacity(txs.len());
        let mut want = expected;
        for tx in txs {
            let id = tx.id.get();
            if want != Some(id) {
                return Err(JournalError::NotConsecutive {
                    last: self.last_id,
                    expected: want.unwrap_or(u64::MAX),
                    got: id,
                });
            }
            tx.validate()
                .map_err(|source| JournalError::InvalidTransaction { id, source })?;
            new_offsets.push(self.len.saturating_add(buf.len() as u64));
            tx.write_line(&mut buf);
            want = id.checked_add(1);
        }

        if let Err(source) = self.file.write_all_at(&buf, self.len) {
            // Undo a partial write so the log keeps ending with a complete line; if even
            // that fails, the next open() cuts the torn line.
            let _ = self.file.set_len(self.len);
            return Err(io_err("append to", &self.path, source));
        }

        let first_id = first.id.get();
        if self.first_id.is_none() {
            self.first_offset = new_offsets.first().copied().unwrap_or(self.len);
        }
        if let Some(index) = &self.index
            && let Err(e) = index.write_entries(first_id, &new_offsets)
        {
            // The index is a cache validated on every use; a failed write must not fail the
            // commit, and the next open() rebuilds it.
            tracing::warn!(error = %e, "cannot update {}", self.index_path.display());
        }

        self.len = self.len.saturating_add(buf.len() as u64);
        self.first_id.get_or_insert(first_id);
        if let Some(last) = txs.last() {
            self.last_id = last.id.get();
        }
        for tx in txs.iter().skip(txs.len().saturating_sub(self.ring_size)) {
            push_ring(&mut self.ring, self.ring_size, tx.clone());
        }
        Ok(())
    }

    /// `fdatasync` of the transaction file, so that announced IDs survive a crash.
    pub fn sync(&self) -> Result<(), JournalError> {
        daemon::failpoint::check("journal-sync")
            .and_then(|()| self.file.sync_data())
            .map_err(|source| io_err("sync", &self.path, source))
    }

    /// The transaction `id`: from the ring buffer, else read at its offset. `None` when it is
    /// outside `[first_id, last_id]` or its line no longer carries that ID.
    pub fn get(&self, id: u64) -> Result<Option<Transaction>, JournalError> {
        let Some(first) = self.first_id else {
            return Ok(None);
        };
        if id < first || id > self.last_id {
            return Ok(None);
        }
        let ring_first = self
            .last_id
            .saturating_sub(self.ring.len() as u64)
            .saturating_add(1);
        if !self.ring.is_empty() && id >= ring_first {
            let slot = usize::try_from(id.saturating_sub(ring_first)).unwrap_or(usize::MAX);
            if let Some(tx) = self.ring.get(slot) {
                return Ok(Some(tx.clone()));
            }
        }
        if let Some(index) = &self.index {
            match index.read_entry(id) {
                Ok(Some(IndexEntry {
                    valid: true,
                    offset,
                })) if offset >= self.first_offset && offset < self.len => {
                    if let Some(tx) = read_tx_at(&self.file, offset, self.len)
                        .map_err(|source| io_err("read", &self.path, source))?
                        && tx.id.get() == id
                    {
                        return Ok(Some(tx));
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the index entry of {id}"),
            }
        }
        // No index, or its entry is wrong: the ids ascend through the log, so bisect it.
        let found = bisect(&self.file, id, self.first_offset, self.len)
            .map_err(|source| io_err("read", &self.path, source))?;
        match found {
            Some((offset, tx)) => {
                if let Some(index) = &self.index {
                    tracing::warn!(
                        "{}: the entry of transaction {id} was wrong; rewriting it",
                        self.index_path.display()
                    );
                    if let Err(e) = index.write_entries(id, &[offset]) {
                        tracing::warn!(error = %e, "cannot update {}", self.index_path.display());
                    }
                }
                Ok(Some(tx))
            }
            None => {
                tracing::warn!(
                    "{}: transaction {id} is not in the log although it lies between {first} and {}",
                    self.path.display(),
                    self.last_id
                );
                Ok(None)
            }
        }
    }

    /// What [`Journal::open`] repaired or tolerated.
    pub fn repairs(&self) -> &[Repair] {
        &self.repairs
    }
}

fn push_ring(ring: &mut VecDeque<Transaction>, size: usize, tx: Transaction) {
    if size == 0 {
        return;
    }
    while ring.len() >= size {
        ring.pop_front();
    }
    ring.push_back(tx);
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> JournalError {
    JournalError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A line that breaks the log's rules: its line number (counted from where the scan began)
/// and why.
type Fault = (u64, String);

/// One sequential pass from the line starting at `start` to the end: validates every line
/// and the ID sequence, records offsets and fills the ring. The outer error is I/O, the inner
/// one a corrupt line.
fn scan_log(
    file: &File,
    path: &Path,
    start: u64,
    ring_size: usize,
) -> Result<Result<Scanned, Fault>, JournalError> {
    let mut scanner = LineScanner::starting_at(PosReader::new(file, start), start, 0);
    let mut out = Scanned {
        first_id: None,
        last_id: 0,
        offsets: Vec::new(),
        ring: VecDeque::with_capacity(ring_size.min(1 << 16)),
        good_len: start,
        tail: None,
        blank: None,
    };
    let mut checker = LineChecker::default();
    let mut buf = Vec::new();
    while let Some(info) = scanner
        .read_line(&mut buf)
        .map_err(|source| io_err("read", path, source))?
    {
        if !info.complete {
            // Only the last line can lack its newline.
            out.tail = Some(Tail {
                offset: info.offset,
                len: info.len,
                nul_prefix: info.nul_prefix,
                kept: std::mem::take(&mut buf),
            });
            break;
        }
        let tx = match checker.check(&info, &buf) {
            Ok(Some(tx)) => tx,
            Ok(None) => {
                let (_, count) = out.blank.get_or_insert((info.line_no, 0));
                *count = count.saturating_add(1);
                out.good_len = info.offset.saturating_add(info.len);
                continue;
            }
            Err(e) => return Ok(Err((info.line_no, e.to_string()))),
        };
        push_ring(&mut out.ring, ring_size, tx);
        out.good_len = info.offset.saturating_add(info.len);
    }
    (out.first_id, out.last_id, out.offsets) = checker.into_parts();
    Ok(Ok(out))
}

/// What [`open_from_index`] found.
struct FastOpen {
    scanned: Scanned,
    first_offset: u64,
    index: Index,
    repair: Option<Repair>,
}

/// How many transactions before the index's last entry the validated tail starts, at least:
/// far enough back to lie before the last `fdatasync` ([`MAX_UNSYNCED`] guarantees it), so
/// that the anchor and everything before it is durable, and only about a megabyte to read.
const TAIL_SPAN: u64 = 16 * 1024;

/// Most transactions appended between two syncs: a larger batch (a gap filled with up to
/// `--max-gap` no-ops) is synced in parts, so no unsynced line lies before the tail the
/// fast open validates.
pub const MAX_UNSYNCED: usize = (TAIL_SPAN / 2) as usize;

/// Opens the log through its index without reading all of it, see the module documentation;
/// `None` when a full scan is needed: no usable index, no entry that checks out, or a tail
/// with blank or corrupt lines (the full scan reports those with exact line numbers).
fn open_from_index(
    file: &File,
    path: &Path,
    index_path: &Path,
    ring_size: usize,
) -> Result<Option<FastOpen>, JournalError> {
    let Ok(index) = Index::open_rw(index_path) else {
        return Ok(None);
    };
    let read_err = |source| io_err("read", path, source);
    let len = file.metadata().map_err(read_err)?.len();

    // The head: the first line must be a transaction whose index entry points at it.
    let mut scanner = LineScanner::new(PosReader::new(file, 0));
    let mut buf = Vec::new();
    let Some(info) = scanner.read_line(&mut buf).map_err(read_err)? else {
        return Ok(None);
    };
    let whole = (buf.len() as u64).saturating_add(info.nul_prefix) == info.len;
    if !info.complete || !whole || is_blank(&buf) {
        return Ok(None);
    }
    let Ok(first) = parse_line(&buf) else {
        return Ok(None);
    };
    let first_id = first.id.get();
    let first_offset = info
        .offset
        .saturating_add(info.nul_prefix)
        .saturating_add(content_start(&buf) as u64);
    let head_entry = IndexEntry {
        valid: true,
        offset: first_offset,
    };
    if !matches!(index.read_entry(first_id), Ok(Some(entry)) if entry == head_entry) {
        return Ok(None);
    }

    // The anchor: a recent entry whose line carries its id; backing off exponentially over
    // entries the log no longer has (the index is not synced, the log's tail may be lost).
    let Ok(index_last) = index.count() else {
        return Ok(None);
    };
    let verified = |id: u64| -> Result<Option<u64>, JournalError> {
        let Ok(Some(IndexEntry {
            valid: true,
            offset,
        })) = index.read_entry(id)
        else {
            return Ok(None);
        };
        if offset < first_offset || offset >= len {
            return Ok(None);
        }
        let tx = read_tx_at(file, offset, len).map_err(read_err)?;
        Ok(tx.filter(|tx| tx.id.get() == id).map(|_| offset))
    };
    let back = TAIL_SPAN.max(ring_size as u64);
    let mut candidate = index_last.saturating_sub(back).max(first_id);
    let mut step = 1u64;
    let (anchor_id, anchor_offset) = loop {
        if candidate <= first_id {
            break (first_id, first_offset);
        }
        if let Some(offset) = verified(candidate)? {
            break (candidate, offset);
        }
        candidate = candidate.saturating_sub(step).max(first_id);
        step = step.saturating_mul(2);
    };

    let Ok(mut scanned) = scan_log(file, path, anchor_offset, ring_size)? else {
        return Ok(None);
    };
    if scanned.blank.is_some() || scanned.first_id != Some(anchor_id) {
        return Ok(None);
    }
    let repair = match index_mismatch(&index, Some(anchor_id), scanned.last_id, &scanned.offsets) {
        Ok(None) => None,
        Ok(Some(reason)) => {
            // Entries behind or ahead of the log after a crash: rewrite the validated range and
            // cut what lies beyond it.
            let fixed = index
                .write_entries(anchor_id, &scanned.offsets)
                .and_then(|()| index.truncate_after(scanned.last_id));
            if let Err(e) = fixed {
                tracing::warn!(error = %e, "cannot repair {}", index_path.display());
            }
            Some(Repair::IndexRepaired { reason })
        }
        Err(_) => return Ok(None),
    };
    scanned.first_id = Some(first_id);
    scanned.offsets = Vec::new();
    Ok(Some(FastOpen {
        scanned,
        first_offset,
        index,
        repair,
    }))
}

/// The transaction on the complete line at `offset` of the first `len` bytes of `file`;
/// `None` when no line's content starts there or it does not parse. The start is checked:
/// the middle of a line (after a digit, or after a space inside a DN) can parse as well.
fn read_tx_at(file: &File, offset: u64, len: u64) -> io::Result<Option<Transaction>> {
    // Bytes before `offset` that decide whether a line's content starts there.
    const BEFORE: u64 = 64;
    // Most lines are short: a small read first, the longest line only when needed.
    const FIRST_READ: usize = 512;
    let from = offset.saturating_sub(BEFORE);
    let lead = usize::try_from(offset.saturating_sub(from)).unwrap_or(0);
    let avail = usize::try_from(len.saturating_sub(from)).unwrap_or(usize::MAX);
    let mut buf = vec![0u8; avail.min(lead.saturating_add(FIRST_READ))];
    let mut got = read_full_at(file, &mut buf, from)?;
    buf.truncate(got);
    let want = avail.min(lead.saturating_add(MAX_LINE_LEN));
    if !buf.get(lead..).unwrap_or_default().contains(&b'\n') && got < want {
        buf.resize(want, 0);
        let more = buf.get_mut(got..).unwrap_or_default();
        got = got.saturating_add(read_full_at(file, more, from.saturating_add(got as u64))?);
        buf.truncate(got);
    }
    let (before, rest) = buf.split_at(lead.min(buf.len()));
    // Only padding may stand between the previous line's `\n` and the content.
    let at_line_start = match before
        .iter()
        .rposition(|&b| b == b'\n' || !scan::is_padding(b))
    {
        None => true,
        Some(i) => before.get(i) == Some(&b'\n'),
    };
    if !at_line_start {
        return Ok(None);
    }
    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    Ok(rest.get(..nl).and_then(|line| parse_line(line).ok()))
}

/// Below this span a bisection reads the lines one by one.
const LINEAR_SPAN: u64 = 16 * 1024;

/// Finds transaction `id` among the lines starting in `[lo, hi)`, where the line at `lo` holds
/// an id not above `id` and the ids ascend: its content offset and the transaction.
fn bisect(
    file: &File,
    id: u64,
    mut lo: u64,
    mut hi: u64,
) -> io::Result<Option<(u64, Transaction)>> {
    let mut window = vec![0u8; 2 * MAX_LINE_LEN + 2];
    while hi.saturating_sub(lo) > LINEAR_SPAN {
        let mid = lo.saturating_add(hi.saturating_sub(lo) / 2);
        let Some((start, line)) = line_after(file, &mut window, mid, hi)? else {
            // No line starts in (mid, hi): the one sought starts at or before mid.
            hi = mid.saturating_add(1);
            continue;
        };
        let Ok(tx) = parse_line(line) else { break };
        match tx.id.get().cmp(&id) {
            std::cmp::Ordering::Equal => return Ok(Some((start, tx))),
            std::cmp::Ordering::Less => lo = start,
            std::cmp::Ordering::Greater => hi = start,
        }
    }
    let mut scanner = LineScanner::starting_at(PosReader::new(file, lo), lo, 0);
    let mut line = Vec::new();
    while let Some(info) = scanner.read_line(&mut line)? {
        if info.offset >= hi || !info.complete {
            break;
        }
        if is_blank(&line) {
            continue;
        }
        let Ok(tx) = parse_line(&line) else {
            continue;
        };
        match tx.id.get().cmp(&id) {
            std::cmp::Ordering::Equal => {
                let offset = info
                    .offset
                    .saturating_add(info.nul_prefix)
                    .saturating_add(content_start(&line) as u64);
                return Ok(Some((offset, tx)));
            }
            std::cmp::Ordering::Greater => break,
            std::cmp::Ordering::Less => {}
        }
    }
    Ok(None)
}

/// The first non-blank line starting in `(from, hi)`: its content offset and its bytes,
/// read into `window` (at least two of the longest lines long). Lines cannot contain `\n`,
/// so a line starts behind one; windows overlap by half so that no line is missed between
/// them, and padding (NUL blocks) is skipped a half window at a time.
fn line_after<'w>(
    file: &File,
    window: &'w mut [u8],
    from: u64,
    hi: u64,
) -> io::Result<Option<(u64, &'w [u8])>> {
    let half = (window.len() / 2).max(1) as u64;
    let mut pos = from;
    while pos < hi {
        let got = read_full_at(file, window, pos)?;
        if let Some((rel, len)) = first_line_in(window.get(..got).unwrap_or_default()) {
            let start = pos.saturating_add(rel as u64);
            if start >= hi {
                return Ok(None);
            }
            return Ok(window.get(rel..rel.saturating_add(len)).map(|l| (start, l)));
        }
        if got < window.len() {
            return Ok(None);
        }
        pos = pos.saturating_add(half);
    }
    Ok(None)
}

/// The first non-blank `\n`-terminated line that starts after the first `\n` of `window`:
/// the position of its content and its length from there.
fn first_line_in(window: &[u8]) -> Option<(usize, usize)> {
    let first_nl = window.iter().position(|&b| b == b'\n')?;
    let mut start = first_nl.saturating_add(1);
    loop {
        let rest = window.get(start..)?;
        let len = rest.iter().position(|&b| b == b'\n')?;
        let line = rest.get(..len)?;
        if !is_blank(line) {
            let skip = content_start(line);
            return Some((start.saturating_add(skip), len.saturating_sub(skip)));
        }
        start = start.saturating_add(len).saturating_add(1);
    }
}

/// Decides how to report a final line without `\n`, refusing to cut more than one torn line
/// (plus any NULs) could hold.
fn repair_tail(file: &File, path: &Path, tail: &Tail) -> Result<Repair, JournalError> {
    let Tail {
        offset,
        len,
        nul_prefix,
        ref kept,
    } = *tail;
    if nul_prefix == len {
        return Ok(Repair::TrailingNuls { offset, bytes: len });
    }
    let stored_end = offset
        .saturating_add(nul_prefix)
        .saturating_add(kept.len() as u64);
    let rest_is_nul = region_is_nul(file, stored_end, offset.saturating_add(len))
        .map_err(|source| io_err("read", path, source))?;
    let content_len = kept.iter().filter(|&&b| b != 0).count();
    if !rest_is_nul || content_len > MAX_LINE_LEN {
        // Far more than one torn line: do not destroy it automatically.
        return Err(JournalError::Corrupt {
            path: path.to_owned(),
            line_no: 0,
            reason: format!(
                "the file ends with {len} bytes at offset {offset} that are not a complete line"
            ),
        });
    }
    let content = String::from_utf8_lossy(scan::trim_line(kept)).into_owned();
    Ok(Repair::TornLine {
        offset,
        bytes: len,
        content,
    })
}

/// Whether `[from, to)` of `file` holds only NUL bytes.
fn region_is_nul(file: &File, from: u64, to: u64) -> io::Result<bool> {
    let mut buf = vec![0u8; scan::BLOCK_SIZE];
    let mut pos = from;
    while pos < to {
        let want = usize::try_from(to.saturating_sub(pos))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let Some(chunk) = buf.get_mut(..want) else {
            break;
        };
        let got = read_full_at(file, chunk, pos)?;
        if got == 0 {
            break;
        }
        if chunk.get(..got).is_some_and(|c| c.iter().any(|&b| b != 0)) {
            return Ok(false);
        }
        pos = pos.saturating_add(got as u64);
    }
    Ok(true)
}

/// Opens the index if it matches the log exactly, otherwise rebuilds it.
fn open_index(
    path: &Path,
    first_id: Option<u64>,
    last_id: u64,
    offsets: &[u64],
) -> (Option<Index>, Option<Repair>) {
    let problem = match Index::open_rw(path) {
        Ok(index) => match index_mismatch(&index, first_id, last_id, offsets) {
            Ok(None) => return (Some(index), None),
            Ok(Some(problem)) => problem,
            Err(e) => e.to_string(),
        },
        Err(IndexError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            "it is missing".to_owned()
        }
        Err(e) => e.to_string(),
    };
    let fresh_install = offsets.is_empty() && !path.exists();
    match Index::rebuild(path, first_id.unwrap_or(1), offsets) {
        Ok(index) => {
            let repair = (!fresh_install).then_some(Repair::IndexRebuilt { reason: problem });
            (Some(index), repair)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot rebuild {}; continuing without it", path.display());
            (None, None)
        }
    }
}

/// Why the index disagrees with the scanned offsets, if it does.
fn index_mismatch(
    index: &Index,
    first_id: Option<u64>,
    last_id: u64,
    offsets: &[u64],
) -> Result<Option<String>, IndexError> {
    let want_size = last_id
        .checked_add(1)
        .and_then(index::entry_position)
        .ok_or(IndexError::IdTooLarge { id: last_id })?;
    let size = index.size()?;
    if size > want_size {
        return Ok(Some(format!(
            "it has entries beyond the last transaction {last_id}"
        )));
    }
    let Some(first) = first_id else {
        return Ok(None);
    };
    let mut problem = None;
    let mut expected = offsets.iter();
    index.for_each_entry(first, offsets.len() as u64, |id, entry| {
        let want = expected.next().copied();
        match (entry, want) {
            (
                Some(IndexEntry {
                    valid: true,
                    offset,
                }),
                Some(want),
            ) if offset == want => true,
            (
                Some(IndexEntry {
                    valid: true,
                    offset,
                }),
                Some(want),
            ) => {
                problem = Some(format!(
                    "the entry for transaction {id} points to offset {offset} instead of {want}"
                ));
                false
            }
            _ => {
                problem = Some(format!(
                    "the entry for transaction {id} is missing or invalid"
                ));
                false
            }
        }
    })?;
    Ok(problem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proto::line::{Command, TransactionId};
    use std::fs;

    fn tx(id: u64, dn: &str, command: Command) -> Transaction {
        Transaction::new(TransactionId(id), dn, command)
    }

    fn user(id: u64) -> Transaction {
        tx(
            id,
            &format!("uid=user{id},cn=users,dc=example,dc=com"),
            Command::Modify,
        )
    }

    fn lines(txs: &[Transaction]) -> String {
        txs.iter().map(Transaction::to_line).collect()
    }

    fn opts(ring_size: usize) -> JournalOptions {
        JournalOptions {
            ring_size,
            lock_attempts: 1,
            lock_delay: Duration::ZERO,
        }
    }

    fn open_with(dir: &Path, content: &[u8], ring_size: usize) -> Result<Journal, JournalError> {
        fs::write(dir.join(TRANSACTION_FILE), content).unwrap();
        Journal::open(dir, &opts(ring_size))
    }

    /// Repairs other than the index rebuild every test file without an index causes.
    fn log_repairs(j: &Journal) -> Vec<Repair> {
        j.repairs()
            .iter()
            .filter(|r| !matches!(r, Repair::IndexRebuilt { .. }))
            .cloned()
            .collect()
    }

    fn log_bytes(dir: &Path) -> Vec<u8> {
        fs::read(dir.join(TRANSACTION_FILE)).unwrap()
    }

    fn index_bytes(dir: &Path) -> Vec<u8> {
        fs::read(dir.join(INDEX_FILE)).unwrap()
    }

    /// The index a fresh journal writes incrementally for `txs`.
    fn reference_index(txs: &[Transaction]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), &opts(0)).unwrap();
        j.append(txs).unwrap();
        drop(j);
        index_bytes(dir.path())
    }

    #[test]
    fn missing_files_are_created_empty() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), &JournalOptions::default()).unwrap();
        assert_eq!(j.last_id(), 0);
        assert_eq!(j.first_id(), None);
        assert_eq!(j.get(0).unwrap(), None);
        assert_eq!(j.get(1).unwrap(), None);
        assert!(j.repairs().is_empty(), "{:?}", j.repairs());
        for name in [TRANSACTION_FILE, INDEX_FILE, LOCK_FILE] {
            assert!(dir.path().join(name).exists(), "{name}");
        }
        assert_eq!(index_bytes(dir.path()), index::MAGIC.to_le_bytes());
    }

    #[test]
    fn empty_file_has_last_id_zero() {
        let dir = tempfile::tempdir().unwrap();
        let j = open_with(dir.path(), b"", 10).unwrap();
        assert_eq!(j.last_id(), 0);
        assert!(j.repairs().is_empty());
    }

    #[test]
    fn last_id_of_complete_logs() {
        let dir = tempfile::tempdir().unwrap();
        let j = open_with(
            dir.path(),
            b"1 cn=foo,dc=example,dc=com a\n2 cn=bar,dc=example,dc=com m\n",
            10,
        )
        .unwrap();
        assert_eq!((j.first_id(), j.last_id()), (Some(1), 2));
        assert_eq!(
            j.get(2).unwrap(),
            Some(tx(2, "cn=bar,dc=example,dc=com", Command::Modify))
        );
        drop(j);

        let j = open_with(dir.path(), b"1 cn=foo,dc=example,dc=com a\n", 10).unwrap();
        assert_eq!(j.last_id(), 1);
        drop(j);
        let j = open_with(dir.path(), b"12 cn=foo,dc=example,dc=com d\n", 10).unwrap();
        assert_eq!((j.first_id(), j.last_id()), (Some(12), 12));
    }

    #[test]
    fn torn_last_line_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let good = lines(&[user(1), user(2)]);
        let mut content = good.clone().into_bytes();
        content.extend_from_slice(b"3 uid=user3,cn=us");
        let j = open_with(dir.path(), &content, 10).unwrap();
        assert_eq!(j.last_id(), 2);
        assert_eq!(
            log_repairs(&j),
            [Repair::TornLine {
                offset: good.len() as u64,
                bytes: 17,
                content: "3 uid=user3,cn=us".into()
            }]
        );
        assert!(j.repairs()[0].to_string().contains("17 bytes"));
        assert_eq!(log_bytes(dir.path()), good.as_bytes());
        drop(j);

        // A whole but unterminated single line ("1 foo" in the C tests) is torn as well.
        let j = open_with(dir.path(), b"1 cn=foo,dc=example,dc=com a", 10).unwrap();
        assert_eq!(j.last_id(), 0);
        assert_eq!(log_bytes(dir.path()), b"");
    }

    #[test]
    fn trailing_nuls_are_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let good = lines(&[user(1)]);
        let mut content = good.clone().into_bytes();
        content.extend_from_slice(&[0; 5000]);
        let mut j = open_with(dir.path(), &content, 10).unwrap();
        assert_eq!(j.last_id(), 1);
        assert_eq!(
            log_repairs(&j),
            [Repair::TrailingNuls {
                offset: good.len() as u64,
                bytes: 5000
            }]
        );
        assert_eq!(log_bytes(dir.path()), good.as_bytes());
        j.append(&[user(2)]).unwrap();
        assert_eq!(log_bytes(dir.path()), lines(&[user(1), user(2)]).as_bytes());
    }

    #[test]
    fn torn_line_followed_by_nuls_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let good = lines(&[user(1)]);
        let mut content = good.clone().into_bytes();
        content.extend_from_slice(b"2 uid=user2,cn=users,dc=example,dc=com m");
        content.extend_from_slice(&[0; 100]);
        let j = open_with(dir.path(), &content, 10).unwrap();
        assert_eq!(j.last_id(), 1);
        assert!(matches!(
            log_repairs(&j)[..],
            [Repair::TornLine { bytes: 140, .. }]
        ));
        assert_eq!(log_bytes(dir.path()), good.as_bytes());
    }

    #[test]
    fn torn_line_followed_by_many_nuls_is_truncated() {
        // Delayed allocation: the page holding the rest of the line and everything after it
        // reads back as zeros.
        let dir = tempfile::tempdir().unwrap();
        let good = lines(&[user(1)]);
        let mut content = good.clone().into_bytes();
        content.extend_from_slice(b"2 uid=use");
        content.extend_from_slice(&[0; 3 * MAX_LINE_LEN]);
        let j = open_with(dir.path(), &content, 10).unwrap();
        assert!(
            matches!(&log_repairs(&j)[..], [Repair::TornLine { content, .. }] if content == "2 uid=use")
        );
        assert_eq!(log_bytes(dir.path()), good.as_bytes());
    }

    #[test]
    fn big_nul_block_before_a_line_is_tolerated() {
        // The C notifier appends after the NUL block, gluing it to its next line.
        let dir = tempfile::tempdir().unwrap();
        let mut content = lines(&[user(1)]).into_bytes();
        content.extend_from_slice(&[0; 3 * MAX_LINE_LEN]);
        content.extend_from_slice(lines(&[user(2)]).as_bytes());
        let j = open_with(dir.path(), &content, 0).unwrap();
        assert_eq!(j.last_id(), 2);
        assert_eq!(j.get(2).unwrap(), Some(user(2)));
    }

    #[test]
    fn huge_unterminated_tail_is_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut content = lines(&[user(1)]).into_bytes();
        content.extend(std::iter::repeat_n(b'x', MAX_LINE_LEN * 3));
        let err = open_with(dir.path(), &content, 10).unwrap_err();
        assert!(matches!(err, JournalError::Corrupt { .. }), "{err}");
        assert_eq!(log_bytes(dir.path()), content);
    }

    #[test]
    fn leading_nul_line_is_accepted() {
        // The `garbage` case of the UCS test suite.
        let dir = tempfile::tempdir().unwrap();
        let j = open_with(dir.path(), b"\x001 dc=example,dc=com a\n", 0).unwrap();
        assert_eq!(j.last_id(), 1);
        assert_eq!(
            j.get(1).unwrap(),
            Some(tx(1, "dc=example,dc=com", Command::Add))
        );
        // The index points past the NUL, where the C tools can parse the line.
        let idx = Index::open(&dir.path().join(INDEX_FILE)).unwrap();
        assert_eq!(
            idx.read_entry(1).unwrap(),
            Some(IndexEntry {
                valid: true,
                offset: 1
            })
        );
        assert!(matches!(j.repairs(), [Repair::IndexRebuilt { .. }]));
    }

    #[test]
    fn blank_lines_are_tolerated() {
        let dir = tempfile::tempdir().unwrap();
        let content = format!("{}\0\0\0\n\n{}", lines(&[user(1)]), lines(&[user(2)]));
        let j = open_with(dir.path(), content.as_bytes(), 0).unwrap();
        assert_eq!(j.last_id(), 2);
        assert_eq!(j.get(1).unwrap(), Some(user(1)));
        assert_eq!(j.get(2).unwrap(), Some(user(2)));
        assert!(j.repairs().contains(&Repair::BlankLines {
            count: 2,
            first_line_no: 2
        }));
    }

    #[test]
    fn log_starting_after_a_prune() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = open_with(dir.path(), b"2 dc=example,dc=com a\n", 0).unwrap();
        assert_eq!((j.first_id(), j.last_id()), (Some(2), 2));
        assert_eq!(j.get(1).unwrap(), None);
        assert_eq!(
            j.get(2).unwrap(),
            Some(tx(2, "dc=example,dc=com", Command::Add))
        );
        j.append(&[user(3)]).unwrap();
        assert!(matches!(
            j.append(&[user(5)]),
            Err(JournalError::NotConsecutive {
                last: 3,
                expected: 4,
                got: 5
            })
        ));
        assert_eq!(j.get(3).unwrap(), Some(user(3)));
        drop(j);
        let j = Journal::open(dir.path(), &opts(0)).unwrap();
        assert_eq!((j.first_id(), j.last_id()), (Some(2), 3));
        assert!(j.repairs().is_empty(), "{:?}", j.repairs());
    }

    #[test]
    fn empty_log_accepts_any_first_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), &opts(4)).unwrap();
        j.append(&[user(40), user(41)]).unwrap();
        assert_eq!((j.first_id(), j.last_id()), (Some(40), 41));
        assert_eq!(j.get(40).unwrap(), Some(user(40)));
    }

    #[test]
    fn deleted_index_is_rebuilt_identically() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), &opts(2)).unwrap();
        j.append(&[user(1)]).unwrap();
        j.append(&[user(2), user(3), user(4)]).unwrap();
        j.append(&[tx(5, "cn=Jürgen Müller,dc=example,dc=com", Command::ModRdn)])
            .unwrap();
        drop(j);
        let incremental = index_bytes(dir.path());
        assert_eq!(incremental.len(), 8 + 9 * 6);

        // A clean reopen trusts the index and repairs nothing.
        let j = Journal::open(dir.path(), &opts(2)).unwrap();
        assert!(j.repairs().is_empty(), "{:?}", j.repairs());
        drop(j);

        fs::remove_file(dir.path().join(INDEX_FILE)).unwrap();
        let j = Journal::open(dir.path(), &opts(2)).unwrap();
        assert!(
            matches!(j.repairs(), [Repair::IndexRebuilt { reason }] if reason.contains("missing"))
        );
        assert_eq!(index_bytes(dir.path()), incremental);
        assert!(!dir.path().join("transaction.index.tmp").exists());
    }

    #[test]
    fn corrupt_indexes_are_rebuilt() {
        let txs: Vec<_> = (1..=6).map(user).collect();
        let good = reference_index(&txs);
        let mut wrong_magic = good.clone();
        wrong_magic[0] ^= 0xff;
        let mut wrong_offset = good.clone();
        wrong_offset[8 + 9 * 4 + 1] ^= 0x10;
        let mut invalid_flag = good.clone();
        invalid_flag[8 + 9 * 6] = 0;
        let mut stale = good.clone();
        stale.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0]);
        let short = good[..good.len() - 4].to_vec();
        let tiny = good[..3].to_vec();
        // Same content in the i386 layout: 4-byte header, 5-byte entries.
        let mut i386 = vec![0xd4, 0xe0, 0x95, 0x33, 0, 0, 0, 0, 0];
        let mut offset = 0u32;
        for t in &txs {
            i386.push(1);
            i386.extend_from_slice(&offset.to_le_bytes());
            offset += t.to_line().len() as u32;
        }
        let garbage: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        for (name, bad) in [
            ("wrong magic", wrong_magic),
            ("wrong offset", wrong_offset),
            ("invalid flag", invalid_flag),
            ("stale entries", stale),
            ("short", short),
            ("tiny", tiny),
            ("i386", i386),
            ("garbage", garbage),
        ] {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join(INDEX_FILE), &bad).unwrap();
            let j = open_with(dir.path(), lines(&txs).as_bytes(), 0).unwrap();
            assert!(
                matches!(
                    j.repairs(),
                    [Repair::IndexRebuilt { .. } | Repair::IndexRepaired { .. }]
                ),
                "{name}: {:?}",
                j.repairs()
            );
            assert_eq!(index_bytes(dir.path()), good, "{name}");
            for t in &txs {
                assert_eq!(j.get(t.id.get()).unwrap().as_ref(), Some(t), "{name}");
            }
        }
    }

    #[test]
    fn non_consecutive_or_invalid_appends_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = open_with(dir.path(), lines(&[user(1), user(2)]).as_bytes(), 10).unwrap();
        let before = log_bytes(dir.path());
        for batch in [
            vec![user(4)],
            vec![user(2)],
            vec![user(1)],
            vec![user(3), user(5)],
        ] {
            let err = j.append(&batch).unwrap_err();
            assert!(matches!(err, JournalError::NotConsecutive { .. }), "{err}");
        }
        let err = j.append(&[tx(3, "cn=a\nb", Command::Add)]).unwrap_err();
        assert!(
            matches!(err, JournalError::InvalidTransaction { id: 3, .. }),
            "{err}"
        );
        assert_eq!(log_bytes(dir.path()), before);
        assert_eq!(j.last_id(), 2);
        j.append(&[]).unwrap();
        j.append(&[user(3)]).unwrap();
        assert_eq!(j.last_id(), 3);
    }

    #[test]
    fn get_from_ring_and_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let txs: Vec<_> = (1..=10).map(user).collect();
        let mut j = open_with(dir.path(), lines(&txs[..4]).as_bytes(), 3).unwrap();
        j.append(&txs[4..7]).unwrap();
        j.append(&txs[7..]).unwrap();
        assert_eq!(j.ring.len(), 3);
        assert_eq!(j.ring.front(), Some(&txs[7]));
        for t in &txs {
            assert_eq!(j.get(t.id.get()).unwrap().as_ref(), Some(t));
        }
        assert_eq!(j.get(0).unwrap(), None);
        assert_eq!(j.get(11).unwrap(), None);
        assert_eq!(j.get(u64::MAX).unwrap(), None);

        // Reads that miss the ring really go to the file: a line overwritten behind the
        // journal's back no longer carries its ID and is reported as unreadable.
        let path = dir.path().join(TRANSACTION_FILE);
        let mut bytes = fs::read(&path).unwrap();
        bytes[0] = b'9';
        fs::write(&path, bytes).unwrap();
        assert_eq!(j.get(1).unwrap(), None);
        assert_eq!(j.get(10).unwrap(), Some(txs[9].clone()));
    }

    #[test]
    fn reopen_after_appends_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let txs: Vec<_> = (1..=50).map(user).collect();
        let mut j = Journal::open(dir.path(), &opts(5)).unwrap();
        for chunk in txs.chunks(7) {
            j.append(chunk).unwrap();
        }
        j.sync().unwrap();
        drop(j);
        let j = Journal::open(dir.path(), &opts(5)).unwrap();
        assert!(j.repairs().is_empty(), "{:?}", j.repairs());
        assert_eq!((j.first_id(), j.last_id()), (Some(1), 50));
        for t in &txs {
            assert_eq!(j.get(t.id.get()).unwrap().as_ref(), Some(t));
        }
        assert_eq!(log_bytes(dir.path()), lines(&txs).as_bytes());
    }

    fn corrupt_at(content: &str) -> (u64, String) {
        let dir = tempfile::tempdir().unwrap();
        let err = open_with(dir.path(), content.as_bytes(), 10).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("univention-translog check --fix"), "{msg}");
        // The committed log is never rewritten on this path.
        assert_eq!(log_bytes(dir.path()), content.as_bytes());
        match err {
            JournalError::Corrupt {
                line_no, reason, ..
            } => (line_no, reason),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn holes_repeats_and_bad_lines_are_refused() {
        let hole = lines(&[user(1), user(3), user(4)]);
        let (line, reason) = corrupt_at(&hole);
        assert_eq!(line, 2);
        assert!(reason.contains("missing"), "{reason}");

        let repeated = lines(&[user(1), user(2), user(2), user(3)]);
        let (line, reason) = corrupt_at(&repeated);
        assert_eq!(line, 3);
        assert!(reason.contains("repeated"), "{reason}");

        let reordered = lines(&[user(2), user(1)]);
        assert_eq!(corrupt_at(&reordered).0, 2);

        let bad = format!("{}1 dc=example\n{}", lines(&[user(1)]), lines(&[user(2)]));
        assert_eq!(corrupt_at(&bad).0, 2);

        let zero = format!("{}0 dc=example,dc=com m\n", lines(&[user(1)]));
        assert_eq!(corrupt_at(&zero).0, 2);

        let long = format!("1 cn={},dc=x m\n", "x".repeat(MAX_LINE_LEN));
        let (line, reason) = corrupt_at(&long);
        assert_eq!(line, 1);
        assert!(reason.contains("bytes long"), "{reason}");
    }

    #[test]
    fn lock_is_held_for_the_journals_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join(LOCK_FILE);
        let j = Journal::open(dir.path(), &opts(0)).unwrap();
        let (mut child, answer) = integration_tests::lockf::python_lockf(&lock, false).unwrap();
        child.wait().unwrap();
        assert_eq!(answer, "busy");
        // A second journal in this process would release the lock when dropped.
        assert!(matches!(
            Journal::open(dir.path(), &opts(0)),
            Err(JournalError::AlreadyOpen { .. })
        ));
        drop(j);
        let (mut child, answer) = integration_tests::lockf::python_lockf(&lock, false).unwrap();
        child.wait().unwrap();
        assert_eq!(answer, "locked");
    }

    #[test]
    fn open_fails_while_another_process_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, answer) =
            integration_tests::lockf::python_lockf(&dir.path().join(LOCK_FILE), true).unwrap();
        assert_eq!(answer, "locked");
        let err = Journal::open(dir.path(), &opts(0)).unwrap_err();
        assert!(
            matches!(err, JournalError::Lock(LockError::Busy { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("another notifier"), "{err}");
        child.kill().unwrap();
        child.wait().unwrap();
        Journal::open(dir.path(), &opts(0)).unwrap();
    }

    /// A log longer than the validated tail, written by the journal itself.
    fn big_journal(dir: &Path, count: u64) -> Vec<Transaction> {
        let txs: Vec<_> = (1..=count).map(user).collect();
        let mut j = Journal::open(dir, &opts(10)).unwrap();
        for chunk in txs.chunks(1000) {
            j.append(chunk).unwrap();
        }
        j.sync().unwrap();
        txs
    }

    const BIG: u64 = 3 * TAIL_SPAN;

    /// Byte offset of `id`'s line in a log of `user` transactions starting at 1.
    fn user_offset(id: u64) -> u64 {
        (1..id).map(|i| user(i).to_line().len() as u64).sum()
    }

    #[test]
    fn big_log_opens_from_the_index_without_reading_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let txs = big_journal(dir.path(), BIG);
        // A line far before the tail carries the wrong id: a full scan would refuse the log,
        // so opening proves that only the tail was read.
        let path = dir.path().join(TRANSACTION_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let at = user_offset(100) as usize;
        assert_eq!(&bytes[at..at + 4], b"100 ");
        bytes[at..at + 3].copy_from_slice(b"900");
        fs::write(&path, &bytes).unwrap();

        let j = Journal::open(dir.path(), &opts(10)).unwrap();
        assert!(j.repairs().is_empty(), "{:?}", j.repairs());
        assert_eq!((j.first_id(), j.last_id()), (Some(1), BIG));
        for id in [1, 99, 101, BIG / 2, BIG - TAIL_SPAN, BIG - 5, BIG] {
            assert_eq!(
                j.get(id).unwrap().as_ref(),
                txs.get(id as usize - 1),
                "{id}"
            );
        }
        assert_eq!(j.get(100).unwrap(), None);
        drop(j);

        // Without the index there is nothing to trust: the full scan finds the bad line.
        fs::remove_file(dir.path().join(INDEX_FILE)).unwrap();
        let err = Journal::open(dir.path(), &opts(10)).unwrap_err();
        assert!(
            matches!(err, JournalError::Corrupt { line_no: 100, .. }),
            "{err}"
        );
    }

    #[test]
    fn index_behind_or_ahead_of_a_big_log_is_repaired_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let txs = big_journal(dir.path(), BIG);
        let good = index_bytes(dir.path());
        let index = dir.path().join(INDEX_FILE);

        // Behind: the last entries never reached the disk (the index is not synced).
        fs::write(&index, &good[..good.len() - 9 * 40 - 3]).unwrap();
        let j = Journal::open(dir.path(), &opts(10)).unwrap();
        assert!(
            matches!(j.repairs(), [Repair::IndexRepaired { reason }] if reason.contains("missing")),
            "{:?}",
            j.repairs()
        );
        assert_eq!(j.last_id(), BIG);
        drop(j);
        assert_eq!(index_bytes(dir.path()), good);

        // Ahead: the log lost its unsynced tail but the index kept entries for it, some
        // pointing past the end, some into it.
        let mut ahead = good.clone();
        for k in 0..50u64 {
            IndexEntry::encode(k * 1000, &mut ahead);
        }
        IndexEntry::encode(user_offset(BIG), &mut ahead);
        fs::write(&index, &ahead).unwrap();
        let j = Journal::open(dir.path(), &opts(10)).unwrap();
        assert!(
            matches!(j.repairs(), [Repair::IndexRepaired { reason }] if reason.contains("beyond")),
            "{:?}",
            j.repairs()
        );
        assert_eq!(j.get(BIG).unwrap().as_ref(), txs.last());
        assert_eq!(j.get(BIG + 1).unwrap(), None);
        drop(j);
        assert_eq!(index_bytes(dir.path()), good);
        let j = Journal::open(dir.path(), &opts(10)).unwrap();
        assert!(j.repairs().is_empty(), "{:?}", j.repairs());
    }

    #[test]
    fn torn_tail_of_a_big_log_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let txs = big_journal(dir.path(), BIG);
        let good = log_bytes(dir.path());
        let mut torn = good.clone();
        torn.extend_from_slice(b"49153 uid=user49153,cn=u");
        torn.extend_from_slice(&[0; 700]);
        fs::write(dir.path().join(TRANSACTION_FILE), &torn).unwrap();
        // The index already has the torn transaction's entry: written before the crash.
        let index = dir.path().join(INDEX_FILE);
        let mut ahead = index_bytes(dir.path());
        IndexEntry::encode(good.len() as u64, &mut ahead);
        fs::write(&index, &ahead).unwrap();

        let mut j = Journal::open(dir.path(), &opts(10)).unwrap();
        assert!(
            matches!(
                j.repairs(),
                [
                    Repair::TornLine { bytes: 724, .. },
                    Repair::IndexRepaired { .. }
                ]
            ),
            "{:?}",
            j.repairs()
        );
        assert_eq!(log_bytes(dir.path()), good);
        assert_eq!(j.last_id(), BIG);
        let next = user(BIG + 1);
        j.append(std::slice::from_ref(&next)).unwrap();
        assert_eq!(j.get(BIG + 1).unwrap(), Some(next.clone()));
        assert_eq!(j.get(BIG).unwrap().as_ref(), txs.last());
        drop(j);
        let j = Journal::open(dir.path(), &opts(10)).unwrap();
        assert!(j.repairs().is_empty(), "{:?}", j.repairs());
        assert_eq!(j.get(BIG + 1).unwrap(), Some(next));
    }

    #[test]
    fn wrong_index_entries_before_the_tail_are_found_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let txs = big_journal(dir.path(), BIG);
        let good = index_bytes(dir.path());
        let mut bad = good.clone();
        let entry = |id: u64| (8 + 9 * id) as usize;
        bad[entry(5)] = 0; // invalid
        // Into the middle of line 1777, whose rest reads as a transaction 777.
        bad[entry(777) + 1..entry(777) + 9].copy_from_slice(&(user_offset(1777) + 1).to_le_bytes());
        bad[entry(778) + 1] ^= 0x40; // into another line
        bad[entry(12_345) + 5] = 0x7f; // points far past the end
        fs::write(dir.path().join(INDEX_FILE), &bad).unwrap();
        let j = Journal::open(dir.path(), &opts(0)).unwrap();
        assert!(j.repairs().is_empty(), "{:?}", j.repairs());
        for id in [5, 777, 778, 12_345, 1, BIG] {
            assert_eq!(
                j.get(id).unwrap().as_ref(),
                txs.get(id as usize - 1),
                "{id}"
            );
        }
        drop(j);
        assert_eq!(index_bytes(dir.path()), good);
    }

    #[test]
    fn a_log_whose_head_disagrees_with_the_index_is_scanned() {
        // A log replaced behind the index's back (e.g. restored without its index).
        let dir = tempfile::tempdir().unwrap();
        big_journal(dir.path(), BIG);
        let other: Vec<_> = (5..=40).map(user).collect();
        fs::write(dir.path().join(TRANSACTION_FILE), lines(&other)).unwrap();
        let j = Journal::open(dir.path(), &opts(0)).unwrap();
        assert!(
            matches!(j.repairs(), [Repair::IndexRebuilt { .. }]),
            "{:?}",
            j.repairs()
        );
        assert_eq!((j.first_id(), j.last_id()), (Some(5), 40));
        drop(j);
        assert_eq!(index_bytes(dir.path()), reference_index(&other));
    }

    /// A log with blank lines and NUL blocks between lines, as the C notifier leaves them.
    fn padded_log(ids: std::ops::RangeInclusive<u64>, pad: &[usize]) -> (Vec<u8>, Vec<u64>) {
        let mut log = Vec::new();
        let mut offsets = Vec::new();
        for (i, id) in ids.enumerate() {
            match pad.get(i % pad.len().max(1)).copied().unwrap_or(0) {
                0 => {}
                1 => log.extend_from_slice(b"\n"),
                n => log.extend(std::iter::repeat_n(0u8, n)),
            }
            offsets.push(log.len() as u64);
            let dn = format!("cn=o{id},{}", "x".repeat((id % 97) as usize));
            log.extend_from_slice(tx(id, &dn, Command::Modify).to_line().as_bytes());
        }
        (log, offsets)
    }

    #[test]
    fn bisection_finds_every_line_around_padding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (log, offsets) = padded_log(7..=3000, &[0, 0, 1, 0, 3 * MAX_LINE_LEN, 0, 5]);
        fs::write(&path, &log).unwrap();
        let file = File::open(&path).unwrap();
        let len = log.len() as u64;
        for (i, &offset) in offsets.iter().enumerate() {
            let id = 7 + i as u64;
            let (found, tx) = bisect(&file, id, offsets[0], len).unwrap().unwrap();
            assert_eq!((found, tx.id.get()), (offset, id));
        }
        assert!(bisect(&file, 6, offsets[0], len).unwrap().is_none());
        assert!(bisect(&file, 3001, offsets[0], len).unwrap().is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]

        #[test]
        fn any_file_content_opens_or_fails_cleanly(
            log in prop::collection::vec(
                prop_oneof![Just(b'\n'), Just(0u8), Just(b' '), Just(b'1'), Just(b'2'), any::<u8>()],
                0..300,
            ),
            index in prop::collection::vec(any::<u8>(), 0..80),
        ) {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join(INDEX_FILE), &index).unwrap();
            if let Ok(j) = open_with(dir.path(), &log, 2) {
                for id in 0..5 {
                    let _ = j.get(id).unwrap();
                }
            }
        }

        #[test]
        fn appends_and_reopens_read_back(
            start in 1u64..1000,
            batches in prop::collection::vec((1usize..20, any::<bool>(), 0usize..4), 1..12),
            ring_size in 0usize..8,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut j = Journal::open(dir.path(), &opts(ring_size)).unwrap();
            let mut all = Vec::new();
            let mut next = start;
            for (len, reopen, cmd) in batches {
                let batch: Vec<_> = (next..next + len as u64)
                    .map(|id| {
                        let command = [Command::Add, Command::Modify, Command::Delete, Command::ModRdn][cmd];
                        tx(id, &format!("cn=o {id},ou=x y,dc=example,dc=com"), command)
                    })
                    .collect();
                j.append(&batch).unwrap();
                next += len as u64;
                all.extend(batch);
                if reopen {
                    drop(j);
                    j = Journal::open(dir.path(), &opts(ring_size)).unwrap();
                    prop_assert!(j.repairs().is_empty(), "{:?}", j.repairs());
                }
            }
            prop_assert_eq!(j.first_id(), Some(start));
            prop_assert_eq!(j.last_id(), next - 1);
            for t in &all {
                let got = j.get(t.id.get()).unwrap();
                prop_assert_eq!(got.as_ref(), Some(t));
            }
            prop_assert_eq!(j.get(start - 1).unwrap(), None);
            prop_assert_eq!(j.get(next).unwrap(), None);
            drop(j);
            prop_assert_eq!(index_bytes(dir.path()), reference_index(&all));
        }
    }
}
