//! Read-only access to the transaction file and its index, the atomic replacement of files
//! and the lock check shared by the modifying sub-commands.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use daemon::fs::TempFile;
use daemon::lock::{FileLock, LockError, lock_path};
use notifier::journal::LOCK_FILE;
use notifier::journal::index::{Index, index_path_for};
use notifier::journal::scan::{LineScanner, PosReader, is_blank, line_id, parse_line, trim_line};
use proto::line::{MAX_LINE_LEN, Transaction};

use crate::log::{debug, info, warning};

/// First tail block read when looking for the last line; doubled until a line is found.
const TAIL_BLOCK: u64 = 64 * 1024;

/// The transaction file opened for reading, with its first and last IDs.
pub struct Translog {
    pub path: PathBuf,
    pub file: File,
    pub size: u64,
    /// 0 when the file holds no transaction.
    pub first: u64,
    pub last: u64,
}

impl Translog {
    pub fn open(path: &Path) -> Result<Translog> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let size = file
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?
            .len();
        let mut translog = Translog {
            path: path.to_owned(),
            file,
            size,
            first: 0,
            last: 0,
        };
        translog.first = translog.find_first()?;
        translog.last = translog.find_last()?;
        if translog.last < translog.first {
            // Out of order; report what the ends say rather than a negative count.
            warning!(
                "{}: last transaction {} is below the first {}; run `univention-translog check`",
                path.display(),
                translog.last,
                translog.first
            );
        }
        Ok(translog)
    }

    /// Number of transactions the ends imply.
    pub fn count(&self) -> u64 {
        if self.last == 0 || self.last < self.first {
            0
        } else {
            self.last - self.first + 1
        }
    }

    fn find_first(&self) -> Result<u64> {
        for line in LineScanner::new(self.reader_at(0)) {
            let line = line.with_context(|| format!("cannot read {}", self.path.display()))?;
            if !line.complete {
                break;
            }
            if is_blank(&line.bytes) {
                continue;
            }
            return line_id(trim_line(&line.bytes)).with_context(|| {
                format!(
                    "{}:{}: cannot parse the first transaction; run `univention-translog check`",
                    self.path.display(),
                    line.line_no
                )
            });
        }
        Ok(0)
    }

    /// The ID of the last complete, non-blank line, reading blocks backwards from the end.
    fn find_last(&self) -> Result<u64> {
        let mut block = TAIL_BLOCK;
        loop {
            let start = self.size.saturating_sub(block);
            let len = usize::try_from(self.size - start).context("tail block too large")?;
            let mut buf = vec![0u8; len];
            self.file
                .read_exact_at(&mut buf, start)
                .with_context(|| format!("cannot read {}", self.path.display()))?;
            // Drop an unterminated last line (torn write or an append in progress).
            let end = buf.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            let complete = buf.get(..end).unwrap_or_default();
            let mut lines: Vec<&[u8]> = complete.split(|&b| b == b'\n').collect();
            if start > 0 && !lines.is_empty() {
                // The first piece may be the tail of a line that starts before the block.
                lines.remove(0);
            }
            for line in lines.iter().rev() {
                if !is_blank(line)
                    && let Some(id) = line_id(trim_line(line))
                {
                    return Ok(id);
                }
            }
            if start == 0 {
                return Ok(0);
            }
            block = block.saturating_mul(4);
        }
    }

    /// The transaction `id`: through the index if it is valid for it, else by a scan.
    pub fn lookup(&self, index: Option<&Index>, id: u64) -> Result<Option<Transaction>> {
        if let Some(index) = index {
            match index.read_entry(id) {
                Ok(Some(entry)) if entry.valid => {
                    if let Some(tx) = self.read_at(entry.offset)?
                        && tx.id.get() == id
                    {
                        return Ok(Some(tx));
                    }
                    debug!("index entry for {id} is stale; scanning");
                }
                Ok(_) => debug!("index has no valid entry for {id}; scanning"),
                Err(e) => debug!("{e}; scanning"),
            }
        }
        self.scan_for(id)
    }

    /// Parses the line starting at `offset`; `None` if there is none or it does not parse.
    pub fn read_at(&self, offset: u64) -> Result<Option<Transaction>> {
        if offset >= self.size {
            return Ok(None);
        }
        let mut buf = vec![0u8; MAX_LINE_LEN + 1];
        let mut got = 0;
        while got < buf.len() {
            let Some(rest) = buf.get_mut(got..) else {
                break;
            };
            let n = self
                .file
                .read_at(rest, offset + got as u64)
                .with_context(|| format!("cannot read {}", self.path.display()))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        Ok(parse_line(buf.get(..nl).unwrap_or_default()).ok())
    }

    /// A reader starting at byte `pos`.
    pub fn reader_at(&self, pos: u64) -> PosReader<'_> {
        PosReader::new(&self.file, pos)
    }

    fn scan_for(&self, id: u64) -> Result<Option<Transaction>> {
        for line in LineScanner::new(self.reader_at(0)) {
            let line = line.with_context(|| format!("cannot read {}", self.path.display()))?;
            if line.complete && line_id(trim_line(&line.bytes)) == Some(id) {
                return Ok(parse_line(&line.bytes).ok());
            }
        }
        Ok(None)
    }

    /// A scanner positioned at transaction `id` if the index knows it, else at the start.
    pub fn scanner_from(
        &self,
        index: Option<&Index>,
        id: u64,
    ) -> Result<LineScanner<PosReader<'_>>> {
        let mut start = 0;
        if let Some(index) = index
            && let Ok(Some(entry)) = index.read_entry(id)
            && entry.valid
            && self
                .read_at(entry.offset)?
                .is_some_and(|tx| tx.id.get() == id)
        {
            start = entry.offset;
        }
        info!("reading {} from offset {start}", self.path.display());
        Ok(LineScanner::starting_at(self.reader_at(start), start, 0))
    }
}

/// Opens the index of `translog` if it exists with a valid header.
pub fn open_index(translog: &Path) -> Option<Index> {
    let path = index_path_for(translog);
    match Index::open(&path) {
        Ok(index) => Some(index),
        Err(e) => {
            info!("{e}");
            None
        }
    }
}

/// Removes the index of `translog`; it is rebuilt by the notifier at its next start.
pub fn remove_index(translog: &Path, dry_run: bool) -> Result<()> {
    let path = index_path_for(translog);
    info!("Removing {} ...", path.display());
    if dry_run {
        return Ok(());
    }
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// `/var/lib/univention-ldap` for the default transaction file: the parent of its `notify`
/// directory.
pub fn ldap_dir(translog: &Path) -> PathBuf {
    let notify = parent_dir(translog);
    match notify.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => notify.join(".."),
    }
}

/// Why the log may not be modified now.
pub enum LockOutcome {
    Held(FileLock),
    Refused(String),
}

/// Takes `transaction.lock` next to `translog` once; a running notifier holds it.
pub fn lock_translog(translog: &Path) -> Result<LockOutcome> {
    let path = parent_dir(translog).join(LOCK_FILE);
    match lock_path(&path, 1, Duration::ZERO) {
        Ok(lock) => Ok(LockOutcome::Held(lock)),
        Err(LockError::Busy { .. }) => Ok(LockOutcome::Refused(format!(
            "the notifier is running and holds {}; stop it first",
            path.display()
        ))),
        Err(e) => Err(e).context("cannot check whether the notifier is running"),
    }
}

/// Suffix of the replacement for a log while it is written.
pub const NEW_SUFFIX: &str = ".new";
/// Suffix the replaced log keeps.
pub const BAK_SUFFIX: &str = ".bak";

/// Replaces `path` with `content` atomically, keeping the old file as `path.bak`.
pub fn replace_file(path: &Path, content: &[u8]) -> Result<()> {
    let new = TempFile::replacing(path, NEW_SUFFIX)?;
    debug!("writing {}", new.path().display());
    new.file()
        .write_all(content)
        .with_context(|| format!("cannot write {}", new.path().display()))?;
    new.commit(Some(BAK_SUFFIX))?;
    Ok(())
}
