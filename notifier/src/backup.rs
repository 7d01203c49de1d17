//! Backups of the notifier's state: the transaction log, its index and the accesslog intake
//! position, as one tar archive with a manifest (`univention-translog backup`).
//!
//! Archive layout, in this order (the reader relies on it to check everything in one pass):
//! `MANIFEST` (text, `Key: value` lines: format and version, tool version, time, host, ids,
//! and `File: <name> <size> <sha256>` per file), `transaction`, `transaction.index`, and
//! `accesslog.position` when the notifier follows `cn=accesslog`.
//!
//! Consistency while the notifier runs: it holds `transaction.lock` for its whole life and
//! only ever appends, so a backup needs no lock. The position is read first (it is stored
//! after the log is synced, so it never runs ahead of the log read next); the log is copied
//! up to its last complete line, which drops a batch being written; the index is generated
//! from the copied log instead of copied, because the live index is written after the log
//! and may lag it. The result is a state the notifier can be in after a crash, which it
//! resumes from exactly (with the accesslog, ids after the position are assigned again, to
//! the same entries). When no notifier runs, the lock is held during the backup so that
//! `univention-translog check --fix`/`prune` cannot rewrite the log meanwhile.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::intake::accesslog::{POSITION_FILE, Position};
use crate::journal::index::{ENTRY_LEN, HEADER_LEN, IndexEntry, MAGIC, entry_position};
use crate::journal::scan::{LineChecker, LineScanner, PosReader};
use crate::journal::{INDEX_FILE, LOCK_FILE, TRANSACTION_FILE};
use daemon::fs::{FileError, TempFile, with_suffix};
use daemon::lock::{FileLock, LockError, lock_path};

/// Name of the manifest entry, always the first in the archive.
pub const MANIFEST: &str = "MANIFEST";
/// The `Format:` value that marks an archive as ours.
pub(crate) const FORMAT_NAME: &str = "univention-translog-backup";
/// The newest archive format this code reads and the one it writes.
pub const FORMAT_VERSION: u32 = 1;
/// Suffix of the files a restore replaces, kept next to them.
pub const BEFORE_RESTORE: &str = ".before-restore";

/// A manifest larger than this is not ours.
const MAX_MANIFEST: u64 = 64 * 1024;
/// A position file larger than this is not one.
const MAX_POSITION: u64 = 64 * 1024;
/// The files a restore replaces, in the order it moves them.
const RESTORED: [&str; 3] = [TRANSACTION_FILE, INDEX_FILE, POSITION_FILE];
/// Index entries generated per write.
const INDEX_CHUNK: usize = 16 * 1024;

#[derive(Debug, Error)]
pub enum BackupError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the notifier is running (it holds {lock}); stop it first")]
    NotifierRunning { lock: PathBuf },
    #[error("cannot take {0}")]
    Lock(#[source] LockError),
    #[error("{path} already exists; choose another name or pass --force")]
    Exists { path: PathBuf },
    #[error("no transaction log in {dir} ({TRANSACTION_FILE} is missing)")]
    NoLog { dir: PathBuf },
    #[error("{path} cannot be backed up: {reason}")]
    Source { path: PathBuf, reason: String },
    #[error("{path} changed while it was being copied; was it rewritten? try again")]
    Changed { path: PathBuf },
    #[error("{path} is not a univention-translog backup: {reason}")]
    NotABackup { path: PathBuf, reason: String },
    #[error(
        "{path} has archive format {found}, but this tool reads format {FORMAT_VERSION} at most; \
         use the univention-translog that wrote it (or a newer one)"
    )]
    UnsupportedFormat { path: PathBuf, found: String },
    #[error("{path} is damaged: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "{path} is left from an earlier restore; move the *{BEFORE_RESTORE} files away \
         (or remove them) first"
    )]
    PreviousRestore { path: PathBuf },
    #[error("{failure}; undoing it failed too ({undo}), check {dir}")]
    NotUndone {
        dir: PathBuf,
        #[source]
        failure: Box<BackupError>,
        undo: String,
    },
}

impl From<FileError> for BackupError {
    fn from(FileError { op, path, source }: FileError) -> BackupError {
        BackupError::Io { op, path, source }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BackupError {
    let path = path.to_owned();
    move |source| BackupError::Io { op, path, source }
}

/// One file in the archive, as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSum {
    pub name: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// The archive's `MANIFEST`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub format_version: u32,
    pub tool_version: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub hostname: String,
    /// Whether a notifier held the lock while the backup was taken.
    pub notifier_running: bool,
    /// 0 when the log holds no transaction.
    pub first_id: u64,
    /// 0 when the log holds no transaction.
    pub last_id: u64,
    /// The id of the accesslog position, if the archive has one.
    pub position_id: Option<u64>,
    pub files: Vec<FileSum>,
}

impl Manifest {
    pub(crate) fn to_text(&self) -> String {
        let yes_no = if self.notifier_running { "yes" } else { "no" };
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(out, "Format: {FORMAT_NAME}");
        let _ = writeln!(out, "Format-Version: {}", self.format_version);
        let _ = writeln!(out, "Tool-Version: {}", self.tool_version);
        let _ = writeln!(out, "Created: {}", self.created);
        let _ = writeln!(out, "Hostname: {}", self.hostname);
        let _ = writeln!(out, "Notifier-Running: {yes_no}");
        let _ = writeln!(out, "First-Id: {}", self.first_id);
        let _ = writeln!(out, "Last-Id: {}", self.last_id);
        if let Some(id) = self.position_id {
            let _ = writeln!(out, "Position-Id: {id}");
        }
        for file in &self.files {
            let _ = writeln!(out, "File: {} {} {}", file.name, file.size, file.sha256);
        }
        out
    }

    /// Parses a manifest, checking the format and its version before anything else so that
    /// a newer archive is refused as such. Unknown keys are ignored: a later tool may add
    /// information without a new format version.
    pub fn parse(path: &Path, text: &str) -> Result<Manifest, BackupError> {
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        let mut files = Vec::new();
        let invalid = |reason: String| BackupError::Invalid {
            path: path.to_owned(),
            reason: format!("MANIFEST: {reason}"),
        };
        for line in text.lines() {
            let Some((key, value)) = line.split_once(": ") else {
                if line.trim().is_empty() {
                    continue;
                }
                return Err(invalid(format!("unreadable line {line:?}")));
            };
            if key == "File" {
                files.push(value);
            } else {
                fields.insert(key, value);
            }
        }
        if fields.get("Format") != Some(&FORMAT_NAME) {
            return Err(BackupError::NotABackup {
                path: path.to_owned(),
                reason: format!("its MANIFEST does not say Format: {FORMAT_NAME}"),
            });
        }
        let version = fields.get("Format-Version").copied().unwrap_or("(none)");
        let format_version = match version.parse::<u32>() {
            Ok(v) if (1..=FORMAT_VERSION).contains(&v) => v,
            _ => {
                return Err(BackupError::UnsupportedFormat {
                    path: path.to_owned(),
                    found: version.to_owned(),
                });
            }
        };
        let text_field = |key: &str| fields.get(key).map(|v| (*v).to_owned()).unwrap_or_default();
        let id_field = |key: &str| -> Result<u64, BackupError> {
            fields
                .get(key)
                .ok_or_else(|| invalid(format!("{key} is missing")))?
                .parse()
                .map_err(|_| invalid(format!("{key} is not a number")))
        };
        let position_id = match fields.get("Position-Id") {
            Some(v) => Some(
                v.parse()
                    .map_err(|_| invalid("Position-Id is not a number".into()))?,
            ),
            None => None,
        };
        let files = files
            .into_iter()
            .map(|value| {
                let parts: Vec<&str> = value.split(' ').collect();
                match parts.as_slice() {
                    [name, size, sum]
                        if sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()) =>
                    {
                        Ok(FileSum {
                            name: (*name).to_owned(),
                            size: size
                                .parse()
                                .map_err(|_| invalid(format!("bad size in File: {value}")))?,
                            sha256: sum.to_ascii_lowercase(),
                        })
                    }
                    _ => Err(invalid(format!("bad File: {value}"))),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Manifest {
            format_version,
            tool_version: text_field("Tool-Version"),
            created: text_field("Created"),
            hostname: text_field("Hostname"),
            notifier_running: fields.get("Notifier-Running") == Some(&"yes"),
            first_id: id_field("First-Id")?,
            last_id: id_field("Last-Id")?,
            position_id,
            files,
        })
    }

    pub fn file(&self, name: &str) -> Option<&FileSum> {
        self.files.iter().find(|f| f.name == name)
    }
}

/// Options of [`create`].
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Replace an existing archive.
    pub force: bool,
    /// Recorded in the manifest.
    pub tool_version: String,
}

/// Writes a backup of the state in `notify_dir` to `archive` (atomically: a temporary file
/// renamed into place) and returns its manifest.
pub fn create(
    notify_dir: &Path,
    archive: &Path,
    opts: &CreateOptions,
) -> Result<Manifest, BackupError> {
    let log_path = notify_dir.join(TRANSACTION_FILE);
    if !log_path.is_file() {
        return Err(BackupError::NoLog {
            dir: notify_dir.to_owned(),
        });
    }
    if !opts.force && archive.exists() {
        return Err(BackupError::Exists {
            path: archive.to_owned(),
        });
    }
    // Held until the archive is written; `None` means a notifier runs (see module docs).
    let lock = match take_lock(notify_dir) {
        Ok(lock) => Some(lock),
        Err(BackupError::NotifierRunning { .. }) => None,
        Err(err) => return Err(err),
    };

    // Position first: it is stored after the log line it refers to.
    let position_path = notify_dir.join(POSITION_FILE);
    let position = match fs::read(&position_path) {
        Ok(bytes) => {
            let parsed = std::str::from_utf8(&bytes)
                .map_err(|_| "it is not UTF-8".to_owned())
                .and_then(Position::parse)
                .map_err(|reason| BackupError::Source {
                    path: position_path.clone(),
                    reason,
                })?;
            Some((bytes, parsed))
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(err) => return Err(io_err("read", &position_path)(err)),
    };

    let log = File::open(&log_path).map_err(io_err("open", &log_path))?;
    let log_meta = log.metadata().map_err(io_err("stat", &log_path))?;
    let snapshot = scan_source(&log, log_meta.len(), &log_path)?;
    if let Some((_, pos)) = &position
        && pos.id > snapshot.last_id
    {
        return Err(BackupError::Source {
            path: position_path,
            reason: format!(
                "it is at transaction {} but the log ends at {}",
                pos.id, snapshot.last_id
            ),
        });
    }

    let index = GeneratedIndex {
        first_id: snapshot.first_id,
        offsets: &snapshot.offsets,
    };
    let mut index_hasher = Sha256::new();
    io::copy(&mut index.reader(), &mut HashWriter(&mut index_hasher))
        .map_err(io_err("hash the index of", &log_path))?;

    let mut files = vec![
        FileSum {
            name: TRANSACTION_FILE.into(),
            size: snapshot.len,
            sha256: hex(&snapshot.sha256),
        },
        FileSum {
            name: INDEX_FILE.into(),
            size: index.len(),
            sha256: hex(&index_hasher.finalize()),
        },
    ];
    if let Some((bytes, _)) = &position {
        files.push(FileSum {
            name: POSITION_FILE.into(),
            size: bytes.len() as u64,
            sha256: hex(&Sha256::digest(bytes)),
        });
    }
    let now = SystemTime::now();
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        tool_version: opts.tool_version.clone(),
        created: daemon::time::rfc3339(now),
        hostname: daemon::host::hostname(),
        notifier_running: lock.is_none(),
        first_id: snapshot.first_id,
        last_id: snapshot.last_id,
        position_id: position.as_ref().map(|(_, p)| p.id),
        files,
    };

    let mtime = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let out = TempFile::create(archive, &format!(".tmp{}", std::process::id()), 0o600)?;
    {
        let mut tar = tar::Builder::new(BufWriter::new(out.file()));
        let text = manifest.to_text();
        let member = |name, size, mode| Member {
            name,
            size,
            mode,
            mtime,
        };
        append(
            &mut tar,
            member(MANIFEST, text.len() as u64, 0o644),
            text.as_bytes(),
            archive,
        )?;

        // Copy exactly the scanned prefix and check that it still hashes the same.
        let mut hasher = Sha256::new();
        let reader = HashReader {
            inner: PosReader::new(&log, 0).take(snapshot.len),
            hasher: &mut hasher,
        };
        let mode = log_meta.mode() & 0o7777;
        append(
            &mut tar,
            member(TRANSACTION_FILE, snapshot.len, mode),
            reader,
            archive,
        )?;
        if hasher.finalize().as_slice() != snapshot.sha256.as_slice() {
            return Err(BackupError::Changed { path: log_path });
        }

        let index_mode = fs::metadata(notify_dir.join(INDEX_FILE)).map_or(0o644, |m| m.mode());
        append(
            &mut tar,
            member(INDEX_FILE, index.len(), index_mode & 0o7777),
            index.reader(),
            archive,
        )?;
        if let Some((bytes, _)) = &position {
            let mode = fs::metadata(&position_path).map_or(0o644, |m| m.mode());
            append(
                &mut tar,
                member(POSITION_FILE, bytes.len() as u64, mode & 0o7777),
                bytes.as_slice(),
                archive,
            )?;
        }
        let writer = tar.into_inner().map_err(io_err("write", archive))?;
        writer
            .into_inner()
            .map_err(|e| io_err("write", archive)(e.into_error()))?;
    }
    out.commit(None)?;
    drop(lock);
    Ok(manifest)
}

/// Checks an archive completely: manifest format and version, every file's size and
/// checksum, the log's syntax and id sequence, the index against the log, and the position
/// against the log.
pub fn verify(archive: &Path) -> Result<Manifest, BackupError> {
    read_archive(archive, None)
}

/// What [`restore`] did.
#[derive(Clone, Debug)]
pub struct Restored {
    pub manifest: Manifest,
    /// Files that were replaced, now named `<name>.before-restore`.
    pub kept: Vec<PathBuf>,
}

/// Replaces the state in `notify_dir` with the archive's, refusing while a notifier holds
/// the lock. Nothing is changed unless the whole archive verifies; replaced files are kept
/// as `<name>.before-restore`, and a restore is refused while such files of an earlier one
/// exist. A file that exists and is restored keeps its owner and mode;
/// a new file gets the mode recorded in the archive.
pub fn restore(notify_dir: &Path, archive: &Path) -> Result<Restored, BackupError> {
    // Check the archive before touching the directory, so a wrong file changes nothing.
    read_manifest_only(archive)?;
    fs::create_dir_all(notify_dir).map_err(io_err("create", notify_dir))?;
    let lock = take_lock(notify_dir)?;
    // The saved files may be the only copy of the state before the first restore.
    for name in RESTORED {
        let aside = with_suffix(&notify_dir.join(name), BEFORE_RESTORE);
        if fs::symlink_metadata(&aside).is_ok() {
            return Err(BackupError::PreviousRestore { path: aside });
        }
    }
    let staged = Staging::new(notify_dir);
    let manifest = read_archive(archive, Some(&staged))?;

    let mut swaps = Vec::new();
    for name in RESTORED {
        let target = notify_dir.join(name);
        let existing = fs::metadata(&target).ok();
        let staged_path = manifest.file(name).map(|_| staged.path(name));
        if let (Some(meta), Some(staged_path)) = (&existing, &staged_path) {
            fs::set_permissions(staged_path, fs::Permissions::from_mode(meta.mode()))
                .map_err(io_err("set the mode of", staged_path))?;
            // Only root can give a file away; the owner is kept where possible.
            let _ = std::os::unix::fs::chown(staged_path, Some(meta.uid()), Some(meta.gid()));
        }
        swaps.push(Swap {
            aside: existing.map(|_| with_suffix(&target, BEFORE_RESTORE)),
            target,
            staged: staged_path,
        });
    }
    let kept = swap_in(notify_dir, &swaps, &mut |from, to| fs::rename(from, to))?;
    if let Ok(dir) = File::open(notify_dir) {
        // Makes the renames durable; failing only weakens crash safety.
        let _ = dir.sync_all();
    }
    drop(lock);
    Ok(Restored { manifest, kept })
}

/// One file of a restore: `target` is moved to `aside` if it exists, and `staged` (if the
/// archive has the file) takes its place.
struct Swap {
    target: PathBuf,
    aside: Option<PathBuf>,
    staged: Option<PathBuf>,
}

/// Moves every existing target aside, and only then every staged file into place, so that
/// a failure never leaves the log and its index from different states: whatever was done
/// is undone before the error is returned. Returns the paths the old files now have.
fn swap_in(
    notify_dir: &Path,
    swaps: &[Swap],
    rename: &mut dyn FnMut(&Path, &Path) -> io::Result<()>,
) -> Result<Vec<PathBuf>, BackupError> {
    let mut moved_aside: Vec<(&Path, &Path)> = Vec::new();
    let mut placed: Vec<&Path> = Vec::new();
    let mut run = || -> Result<(), BackupError> {
        for swap in swaps {
            if let Some(aside) = &swap.aside {
                rename(&swap.target, aside).map_err(io_err("rename", &swap.target))?;
                moved_aside.push((&swap.target, aside));
            }
        }
        for swap in swaps {
            if let Some(staged) = &swap.staged {
                rename(staged, &swap.target).map_err(io_err("rename", staged))?;
                placed.push(&swap.target);
            }
        }
        Ok(())
    };
    let Err(failure) = run() else {
        return Ok(moved_aside
            .into_iter()
            .map(|(_, aside)| aside.to_owned())
            .collect());
    };
    let mut undo = Vec::new();
    for target in placed.into_iter().rev() {
        if let Err(e) = fs::remove_file(target) {
            undo.push(format!("cannot remove {}: {e}", target.display()));
        }
    }
    for (target, aside) in moved_aside.into_iter().rev() {
        if let Err(e) = rename(aside, target) {
            undo.push(format!("cannot rename {}: {e}", aside.display()));
        }
    }
    if undo.is_empty() {
        Err(failure)
    } else {
        Err(BackupError::NotUndone {
            dir: notify_dir.to_owned(),
            failure: Box::new(failure),
            undo: undo.join("; "),
        })
    }
}

fn take_lock(notify_dir: &Path) -> Result<FileLock, BackupError> {
    let path = notify_dir.join(LOCK_FILE);
    match lock_path(&path, 1, Duration::ZERO) {
        Ok(lock) => Ok(lock),
        Err(LockError::Busy { .. }) => Err(BackupError::NotifierRunning { lock: path }),
        Err(err) => Err(BackupError::Lock(err)),
    }
}

/// What the scan of the live log found in its first `limit` bytes.
struct Snapshot {
    /// End of the last complete line: the length to copy.
    len: u64,
    sha256: Vec<u8>,
    first_id: u64,
    last_id: u64,
    offsets: Vec<u64>,
}

/// Validates the live log up to `limit` like the notifier's startup scan and hashes the
/// complete lines; an incomplete last line (a write in progress) is left out.
fn scan_source(log: &File, limit: u64, path: &Path) -> Result<Snapshot, BackupError> {
    let reader = PosReader::new(log, 0).take(limit);
    let mut checker = LineChecker::default();
    let mut hasher = Sha256::new();
    let mut scanner = LineScanner::new(reader);
    let mut buf = Vec::new();
    let mut len = 0;
    while let Some(info) = scanner.read_line(&mut buf).map_err(io_err("read", path))? {
        if !info.complete {
            break;
        }
        checker
            .check(&info, &buf)
            .map_err(|fault| BackupError::Source {
                path: path.to_owned(),
                reason: format!(
                    "line {}: {fault}; stop the notifier and run `univention-translog check` first",
                    info.line_no
                ),
            })?;
        hash_zeros(&mut hasher, info.nul_prefix);
        hasher.update(&buf);
        len = info.offset.saturating_add(info.len);
    }
    let (first_id, last_id, offsets) = checker.into_parts();
    Ok(Snapshot {
        len,
        sha256: hasher.finalize().to_vec(),
        first_id: first_id.unwrap_or(0),
        last_id,
        offsets,
    })
}

fn hash_zeros(hasher: &mut Sha256, mut count: u64) {
    let zeros = [0u8; 4096];
    while count > 0 {
        let n = count.min(zeros.len() as u64) as usize;
        hasher.update(zeros.get(..n).unwrap_or_default());
        count = count.saturating_sub(n as u64);
    }
}

/// The UCS index of a log, generated on the fly: header, holes up to `first_id`, entries.
struct GeneratedIndex<'a> {
    first_id: u64,
    offsets: &'a [u64],
}

impl GeneratedIndex<'_> {
    fn last_id(&self) -> u64 {
        if self.offsets.is_empty() {
            0
        } else {
            self.first_id
                .saturating_add(self.offsets.len() as u64)
                .saturating_sub(1)
        }
    }

    fn len(&self) -> u64 {
        if self.offsets.is_empty() {
            return HEADER_LEN;
        }
        self.last_id()
            .checked_add(1)
            .and_then(entry_position)
            .unwrap_or(u64::MAX)
    }

    /// The index's bytes, generated chunk by chunk rather than held in memory (a pruned
    /// log's index starts with holes for every id below the first).
    fn reader(&self) -> impl Read + '_ {
        let mut chunks: Vec<Box<dyn Read + '_>> = Vec::new();
        chunks.push(Box::new(io::Cursor::new(MAGIC.to_le_bytes())));
        if !self.offsets.is_empty() {
            chunks.push(Box::new(
                io::repeat(0).take(self.first_id.saturating_mul(ENTRY_LEN)),
            ));
            chunks.push(Box::new(EntryReader {
                offsets: self.offsets,
                buf: Vec::new(),
                pos: 0,
            }));
        }
        chunks
            .into_iter()
            .fold(Box::new(io::empty()) as Box<dyn Read + '_>, |acc, next| {
                Box::new(acc.chain(next))
            })
    }
}

/// Encodes index entries for `offsets` as they are read.
struct EntryReader<'a> {
    offsets: &'a [u64],
    buf: Vec<u8>,
    pos: usize,
}

impl Read for EntryReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.buf.len() {
            let take = self.offsets.len().min(INDEX_CHUNK);
            if take == 0 {
                return Ok(0);
            }
            let (chunk, rest) = self.offsets.split_at(take);
            self.offsets = rest;
            self.buf.clear();
            for &offset in chunk {
                IndexEntry::encode(offset, &mut self.buf);
            }
            self.pos = 0;
        }
        let avail = self.buf.get(self.pos..).unwrap_or_default();
        let n = avail.len().min(out.len());
        if let (Some(dst), Some(src)) = (out.get_mut(..n), avail.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.pos = self.pos.saturating_add(n);
        Ok(n)
    }
}

/// Where a restore writes the files it reads, before they are renamed into place.
struct Staging {
    dir: PathBuf,
}

impl Staging {
    fn new(dir: &Path) -> Staging {
        Staging {
            dir: dir.to_owned(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".restore.{name}"))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Whatever was not renamed into place is left over from a failed restore.
        for name in RESTORED {
            let _ = fs::remove_file(self.path(name));
        }
    }
}

/// Reads the first entry only: enough to refuse a foreign or newer archive up front.
fn read_manifest_only(archive: &Path) -> Result<Manifest, BackupError> {
    let file = File::open(archive).map_err(io_err("open", archive))?;
    let mut tar = tar::Archive::new(BufReader::new(file));
    let mut entries = tar.entries().map_err(|e| not_tar(archive, &e))?;
    let first = entries.next().ok_or_else(|| BackupError::NotABackup {
        path: archive.to_owned(),
        reason: "it is empty".into(),
    })?;
    let entry = first.map_err(|e| not_tar(archive, &e))?;
    read_manifest(archive, entry)
}

fn not_tar(archive: &Path, err: &io::Error) -> BackupError {
    // The tar crate quotes the offending header bytes; for a text file that is noise.
    let reason = match err.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::Other => "it is not a tar archive".into(),
        _ => format!("it is not a readable tar archive ({err})"),
    };
    BackupError::NotABackup {
        path: archive.to_owned(),
        reason,
    }
}

fn read_manifest<R: Read>(
    archive: &Path,
    entry: tar::Entry<'_, R>,
) -> Result<Manifest, BackupError> {
    let name = entry_name(&entry);
    if name != MANIFEST {
        return Err(BackupError::NotABackup {
            path: archive.to_owned(),
            reason: format!("its first member is {name:?}, not {MANIFEST}"),
        });
    }
    let mut text = String::new();
    entry
        .take(MAX_MANIFEST)
        .read_to_string(&mut text)
        .map_err(|e| BackupError::NotABackup {
            path: archive.to_owned(),
            reason: format!("its MANIFEST is unreadable ({e})"),
        })?;
    Manifest::parse(archive, &text)
}

fn entry_name<R: Read>(entry: &tar::Entry<'_, R>) -> String {
    entry
        .path()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "(unreadable name)".into())
}

/// One pass over the archive checking everything; with `staging`, each file is also
/// written there.
fn read_archive(archive: &Path, staging: Option<&Staging>) -> Result<Manifest, BackupError> {
    let file = File::open(archive).map_err(io_err("open", archive))?;
    let mut tar = tar::Archive::new(BufReader::new(file));
    let mut entries = tar.entries().map_err(|e| not_tar(archive, &e))?;
    let invalid = |reason: String| BackupError::Invalid {
        path: archive.to_owned(),
        reason,
    };
    let first = entries.next().ok_or_else(|| BackupError::NotABackup {
        path: archive.to_owned(),
        reason: "it is empty".into(),
    })?;
    let manifest = read_manifest(archive, first.map_err(|e| not_tar(archive, &e))?)?;
    for required in [TRANSACTION_FILE, INDEX_FILE] {
        if manifest.file(required).is_none() {
            return Err(invalid(format!("MANIFEST lists no {required}")));
        }
    }

    let mut log: Option<LineChecker> = None;
    let mut seen: Vec<String> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| invalid(format!("truncated or corrupt tar data ({e})")))?;
        let name = entry_name(&entry);
        let Some(sum) = manifest.file(&name) else {
            return Err(invalid(format!("unexpected member {name:?}")));
        };
        if seen.contains(&name) {
            return Err(invalid(format!("{name} appears twice")));
        }
        seen.push(name.clone());
        let mode = entry.header().mode().unwrap_or(0o600) & 0o7777;
        let sink = match staging {
            Some(staging) => Some(create_staged(&staging.path(&name), mode)?),
            None => None,
        };
        let mut reader = CheckedReader {
            inner: entry,
            hasher: Sha256::new(),
            len: 0,
            sink: sink.map(BufWriter::new),
            sink_err: None,
        };
        // Content problems are reported only if the checksum matches: a damaged archive
        // should say so, not that transaction 5 follows transaction 3.
        let content = match name.as_str() {
            TRANSACTION_FILE => check_log(&mut reader).map(|checker| {
                log = Some(checker);
            }),
            INDEX_FILE => match &log {
                Some(checker) => check_index(&mut reader, checker),
                None => Err(format!("{INDEX_FILE} comes before {TRANSACTION_FILE}")),
            },
            POSITION_FILE => check_position(&mut reader, &manifest),
            _ => Ok(()),
        };
        // Drain what the check did not read, so the checksum covers the whole member.
        io::copy(&mut reader, &mut io::sink())
            .map_err(|e| invalid(format!("cannot read {name} ({e})")))?;
        if reader.len != sum.size {
            return Err(invalid(format!(
                "{name} is {} bytes, the MANIFEST says {}",
                reader.len, sum.size
            )));
        }
        let actual = hex(&reader.hasher.clone().finalize());
        if actual != sum.sha256 {
            return Err(invalid(format!(
                "checksum mismatch for {name}: sha256 {actual}, the MANIFEST says {}",
                sum.sha256
            )));
        }
        content.map_err(|reason| invalid(format!("{name}: {reason}")))?;
        if let Some(err) = reader.sink_err.take() {
            return Err(io_err("write", &name_in(staging, &name))(err));
        }
        if let Some(sink) = reader.sink.take() {
            let path = name_in(staging, &name);
            let file = sink
                .into_inner()
                .map_err(|e| io_err("write", &path)(e.into_error()))?;
            file.sync_all().map_err(io_err("sync", &path))?;
        }
    }
    for sum in &manifest.files {
        if !seen.contains(&sum.name) {
            return Err(invalid(format!(
                "{} is listed in the MANIFEST but missing (truncated archive?)",
                sum.name
            )));
        }
    }
    let checker = log.unwrap_or_default();
    let (first, last) = (checker.first_id().unwrap_or(0), checker.last_id());
    if (first, last) != (manifest.first_id, manifest.last_id) {
        return Err(invalid(format!(
            "the log holds transactions {first}..{last}, the MANIFEST says {}..{}",
            manifest.first_id, manifest.last_id
        )));
    }
    if manifest.position_id.is_some() != manifest.file(POSITION_FILE).is_some() {
        return Err(invalid(format!(
            "Position-Id and {POSITION_FILE} must come together"
        )));
    }
    Ok(manifest)
}

fn name_in(staging: Option<&Staging>, name: &str) -> PathBuf {
    staging.map_or_else(|| PathBuf::from(name), |s| s.path(name))
}

fn create_staged(path: &Path, mode: u32) -> Result<File, BackupError> {
    let _ = fs::remove_file(path);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("create", path))?;
    // The umask may have narrowed the recorded mode.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err("set the mode of", path))?;
    Ok(file)
}

fn check_log(reader: &mut impl Read) -> Result<LineChecker, String> {
    let mut checker = LineChecker::default();
    let mut scanner = LineScanner::new(reader);
    let mut buf = Vec::new();
    while let Some(info) = scanner
        .read_line(&mut buf)
        .map_err(|e| format!("cannot read it ({e})"))?
    {
        if !info.complete {
            return Err(format!("line {} has no newline", info.line_no));
        }
        checker
            .check(&info, &buf)
            .map_err(|fault| format!("line {}: {fault}", info.line_no))?;
    }
    Ok(checker)
}

fn check_index(reader: &mut impl Read, log: &LineChecker) -> Result<(), String> {
    let mut header = [0u8; HEADER_LEN as usize];
    reader
        .read_exact(&mut header)
        .map_err(|_| "shorter than its header".to_owned())?;
    if u64::from_le_bytes(header) != MAGIC {
        return Err(format!("wrong magic (expected {MAGIC:#x})"));
    }
    let first = log.first_id().unwrap_or(0);
    let mut id = 0u64;
    let mut entry = [0u8; ENTRY_LEN as usize];
    loop {
        match read_exact_or_eof(reader, &mut entry) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(e),
        }
        let IndexEntry { valid, offset } = IndexEntry::decode(&entry);
        let want = id
            .checked_sub(first)
            .filter(|_| log.first_id().is_some())
            .and_then(|slot| log.offsets().get(usize::try_from(slot).ok()?));
        match want {
            Some(&want) if valid && offset == want => {}
            Some(&want) => {
                return Err(format!(
                    "the entry for transaction {id} does not point to offset {want} in the log"
                ));
            }
            None if valid => {
                return Err(format!(
                    "it has an entry for transaction {id}, which the log does not hold"
                ));
            }
            None => {}
        }
        id = id.saturating_add(1);
    }
    let want_entries = if log.first_id().is_some() {
        log.last_id().saturating_add(1)
    } else {
        0
    };
    if id != want_entries {
        return Err(format!("it has {id} entries, the log needs {want_entries}"));
    }
    Ok(())
}

/// `Ok(false)` at a clean end of input; an error for a partial entry.
fn read_exact_or_eof(reader: &mut impl Read, buf: &mut [u8]) -> Result<bool, String> {
    let mut got = 0;
    while got < buf.len() {
        let Some(rest) = buf.get_mut(got..) else {
            break;
        };
        match reader.read(rest) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err("it ends in the middle of an entry".into()),
            Ok(n) => got = got.saturating_add(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("cannot read it ({e})")),
        }
    }
    Ok(true)
}

fn check_position(reader: &mut impl Read, manifest: &Manifest) -> Result<(), String> {
    let mut text = String::new();
    reader
        .take(MAX_POSITION)
        .read_to_string(&mut text)
        .map_err(|e| format!("unreadable ({e})"))?;
    let position = Position::parse(&text)?;
    if Some(position.id) != manifest.position_id {
        return Err(format!(
            "it is at transaction {}, the MANIFEST says {:?}",
            position.id, manifest.position_id
        ));
    }
    if position.id > manifest.last_id {
        return Err(format!(
            "it is at transaction {}, beyond the log's last transaction {}",
            position.id, manifest.last_id
        ));
    }
    Ok(())
}

/// Hashes, counts and optionally copies what is read through it.
struct CheckedReader<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
    sink: Option<BufWriter<File>>,
    /// A failed copy is reported after the archive checks, which are more useful.
    sink_err: Option<io::Error>,
}

impl<R: Read> Read for CheckedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let data = buf.get(..n).unwrap_or_default();
        self.hasher.update(data);
        self.len = self.len.saturating_add(n as u64);
        if self.sink_err.is_none()
            && let Some(sink) = self.sink.as_mut()
            && let Err(e) = sink.write_all(data)
        {
            self.sink_err = Some(e);
        }
        Ok(n)
    }
}

struct HashReader<'a, R> {
    inner: R,
    hasher: &'a mut Sha256,
}

impl<R: Read> Read for HashReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(buf.get(..n).unwrap_or_default());
        Ok(n)
    }
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Appends one member; `data` must deliver exactly `size` bytes, which the header states
/// up front.
fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    member: Member<'_>,
    data: impl Read,
    archive: &Path,
) -> Result<(), BackupError> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(member.mode);
    header.set_mtime(member.mtime);
    header.set_uid(0);
    header.set_gid(0);
    header.set_size(member.size);
    tar.append_data(&mut header, member.name, data)
        .map_err(io_err("write", archive))
}

/// Header fields of one archive member.
struct Member<'a> {
    name: &'a str,
    size: u64,
    mode: u32,
    mtime: u64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Journal, JournalOptions};
    use proto::line::{Command, Transaction, TransactionId};

    fn opts() -> CreateOptions {
        CreateOptions {
            force: false,
            tool_version: "test".into(),
        }
    }

    /// A notify directory with transactions `first..=last` written by the daemon's journal.
    fn notify_dir(first: u64, last: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), &JournalOptions::default()).unwrap();
        let txs: Vec<Transaction> = (first..=last)
            .map(|id| {
                Transaction::new(
                    TransactionId(id),
                    format!("cn=user {id},dc=example,dc=com"),
                    Command::Modify,
                )
            })
            .collect();
        journal.append(&txs).unwrap();
        journal.sync().unwrap();
        dir
    }

    fn replace_in(path: &Path, from: &[u8], to: &[u8]) {
        let mut bytes = fs::read(path).unwrap();
        let at = bytes
            .windows(from.len())
            .position(|w| w == from)
            .expect("pattern in archive");
        bytes[at..at + to.len()].copy_from_slice(to);
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn backup_verify_restore_round_trip_gives_a_log_the_journal_opens_cleanly() {
        let src = notify_dir(1, 50);
        Position {
            csn: "20240101000000.000000Z#000000#000#000000".into(),
            id: 48,
        }
        .store(&src.path().join(POSITION_FILE))
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        let archive = out.path().join("b.tar");
        let made = create(src.path(), &archive, &opts()).unwrap();
        assert_eq!((made.first_id, made.last_id), (1, 50));
        assert_eq!(made.position_id, Some(48));
        assert!(!made.notifier_running);
        assert_eq!(verify(&archive).unwrap(), made);
        // A plain tar file with the MANIFEST as its first member.
        let bytes = fs::read(&archive).unwrap();
        assert_eq!(&bytes[..9], b"MANIFEST\0");
        assert!(bytes.windows(18).any(|w| w == b"Format-Version: 1\n"));

        let dst = tempfile::tempdir().unwrap();
        let target = dst.path().join("notify");
        let restored = restore(&target, &archive).unwrap();
        assert!(restored.kept.is_empty());
        for name in [TRANSACTION_FILE, INDEX_FILE, POSITION_FILE] {
            assert_eq!(
                fs::read(target.join(name)).unwrap(),
                fs::read(src.path().join(name)).unwrap(),
                "{name}"
            );
        }
        let journal = Journal::open(&target, &JournalOptions::default()).unwrap();
        assert!(journal.repairs().is_empty(), "{:?}", journal.repairs());
        assert_eq!(journal.last_id(), 50);
    }

    #[test]
    fn backups_taken_during_appends_are_consistent_prefixes() {
        use std::sync::atomic::Ordering::Relaxed;
        let src = notify_dir(1, 1);
        // The daemon's write pattern: log lines, then their index entries, no lock shared
        // with the backup (within one process record locks never conflict).
        let mut journal = Journal::open(src.path(), &JournalOptions::default()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let archive = out.path().join("b.tar");
        let forced = CreateOptions {
            force: true,
            ..opts()
        };
        let taken = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let backups = {
            let taken = std::sync::Arc::clone(&taken);
            let dir = src.path().to_owned();
            let archive = archive.clone();
            std::thread::spawn(move || {
                let mut last = 0;
                while taken.load(Relaxed) < 20 {
                    let made = create(&dir, &archive, &forced).unwrap();
                    assert!(made.last_id >= last, "{} < {last}", made.last_id);
                    last = made.last_id;
                    verify(&archive).unwrap();
                    taken.fetch_add(1, Relaxed);
                }
            })
        };
        // Keep appending while the backups run, so they race with the writes; bounded so
        // the log stays small.
        let mut next = 2;
        while taken.load(Relaxed) < 20 && next < 50_000 {
            let txs: Vec<Transaction> = (next..next + 5)
                .map(|id| {
                    Transaction::new(
                        TransactionId(id),
                        format!("cn=user {id},dc=example,dc=com"),
                        Command::Add,
                    )
                })
                .collect();
            journal.append(&txs).unwrap();
            next += 5;
            std::thread::yield_now();
        }
        backups.join().unwrap();
        let dst = tempfile::tempdir().unwrap();
        restore(dst.path(), &archive).unwrap();
        let restored = Journal::open(dst.path(), &JournalOptions::default()).unwrap();
        assert!(restored.repairs().is_empty(), "{:?}", restored.repairs());
    }

    #[test]
    fn a_pruned_log_keeps_its_holes_in_the_index() {
        let src = notify_dir(7, 9);
        let archive = src.path().join("b.tar");
        create(src.path(), &archive, &opts()).unwrap();
        let dst = tempfile::tempdir().unwrap();
        restore(dst.path(), &archive).unwrap();
        assert_eq!(
            fs::read(dst.path().join(INDEX_FILE)).unwrap(),
            fs::read(src.path().join(INDEX_FILE)).unwrap()
        );
        let journal = Journal::open(dst.path(), &JournalOptions::default()).unwrap();
        assert!(journal.repairs().is_empty(), "{:?}", journal.repairs());
        assert_eq!(journal.first_id(), Some(7));
    }

    #[test]
    fn a_torn_tail_and_a_lagging_index_are_left_out() {
        let src = notify_dir(1, 3);
        // A batch being written: its line is incomplete and its index entry not yet there.
        let mut log = OpenOptions::new()
            .append(true)
            .open(src.path().join(TRANSACTION_FILE))
            .unwrap();
        log.write_all(b"4 cn=half").unwrap();
        let archive = src.path().join("b.tar");
        let made = create(src.path(), &archive, &opts()).unwrap();
        assert_eq!(made.last_id, 3);
        let dst = tempfile::tempdir().unwrap();
        restore(dst.path(), &archive).unwrap();
        let text = fs::read_to_string(dst.path().join(TRANSACTION_FILE)).unwrap();
        assert!(
            text.ends_with("3 cn=user 3,dc=example,dc=com m\n"),
            "{text}"
        );
    }

    #[test]
    fn an_empty_log_backs_up() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(TRANSACTION_FILE), b"").unwrap();
        let archive = dir.path().join("b.tar");
        let made = create(dir.path(), &archive, &opts()).unwrap();
        assert_eq!((made.first_id, made.last_id), (0, 0));
        verify(&archive).unwrap();
    }

    #[test]
    fn create_refuses_an_existing_archive_without_force_and_a_corrupt_log() {
        let src = notify_dir(1, 2);
        let archive = src.path().join("b.tar");
        fs::write(&archive, b"keep me").unwrap();
        let err = create(src.path(), &archive, &opts()).unwrap_err();
        assert!(matches!(err, BackupError::Exists { .. }), "{err}");
        assert_eq!(fs::read(&archive).unwrap(), b"keep me");
        let forced = CreateOptions {
            force: true,
            ..opts()
        };
        create(src.path(), &archive, &forced).unwrap();

        fs::write(src.path().join(TRANSACTION_FILE), b"1 a m\n3 b m\n").unwrap();
        let err = create(src.path(), &archive, &forced).unwrap_err();
        assert!(err.to_string().contains("transaction 3 follows"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = create(empty.path(), &archive, &forced).unwrap_err();
        assert!(matches!(err, BackupError::NoLog { .. }), "{err}");
    }

    #[test]
    fn a_position_ahead_of_the_log_is_refused() {
        let src = notify_dir(1, 2);
        Position {
            csn: "x".into(),
            id: 9,
        }
        .store(&src.path().join(POSITION_FILE))
        .unwrap();
        let err = create(src.path(), &src.path().join("b.tar"), &opts()).unwrap_err();
        assert!(err.to_string().contains("log ends at 2"), "{err}");
    }

    #[test]
    fn verify_names_the_damaged_file() {
        let src = notify_dir(1, 20);
        let archive = src.path().join("b.tar");
        create(src.path(), &archive, &opts()).unwrap();
        replace_in(&archive, b"cn=user 7,", b"cn=user 8,");
        let err = verify(&archive).unwrap_err();
        assert!(matches!(err, BackupError::Invalid { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("checksum mismatch for transaction:"),
            "{err}"
        );
        // Nothing is restored from a damaged archive.
        let dst = tempfile::tempdir().unwrap();
        assert!(restore(dst.path(), &archive).is_err());
        assert!(!dst.path().join(TRANSACTION_FILE).exists());
        let leftovers: Vec<_> = fs::read_dir(dst.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != LOCK_FILE)
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn verify_detects_truncation_and_foreign_files() {
        let src = notify_dir(1, 20);
        let archive = src.path().join("b.tar");
        create(src.path(), &archive, &opts()).unwrap();
        let bytes = fs::read(&archive).unwrap();
        fs::write(&archive, &bytes[..1500]).unwrap();
        let err = verify(&archive).unwrap_err();
        assert!(matches!(err, BackupError::Invalid { .. }), "{err}");

        fs::write(&archive, b"hello").unwrap();
        let err = verify(&archive).unwrap_err();
        assert!(matches!(err, BackupError::NotABackup { .. }), "{err}");
    }

    #[test]
    fn newer_formats_are_refused_before_anything_changes() {
        let src = notify_dir(1, 3);
        let archive = src.path().join("b.tar");
        create(src.path(), &archive, &opts()).unwrap();
        replace_in(&archive, b"Format-Version: 1\n", b"Format-Version: 7\n");
        let err = verify(&archive).unwrap_err();
        assert!(
            matches!(&err, BackupError::UnsupportedFormat { found, .. } if found == "7"),
            "{err}"
        );
        let dst = tempfile::tempdir().unwrap();
        let target = dst.path().join("notify");
        let err = restore(&target, &archive).unwrap_err();
        assert!(
            matches!(err, BackupError::UnsupportedFormat { .. }),
            "{err}"
        );
        assert!(!target.exists());
    }

    #[test]
    fn restore_refuses_while_the_lock_is_held_and_keeps_replaced_files() {
        let src = notify_dir(1, 3);
        let archive = src.path().join("b.tar");
        create(src.path(), &archive, &opts()).unwrap();
        let dst = notify_dir(1, 5);
        fs::write(dst.path().join(POSITION_FILE), "csn=y\nid=5\n").unwrap();

        let mut holder = integration_tests::lockf::hold_lockf(&dst.path().join(LOCK_FILE)).unwrap();
        let err = restore(dst.path(), &archive).unwrap_err();
        holder.kill().unwrap();
        holder.wait().unwrap();
        assert!(matches!(err, BackupError::NotifierRunning { .. }), "{err}");
        assert!(err.to_string().contains("stop it first"), "{err}");

        let restored = restore(dst.path(), &archive).unwrap();
        assert_eq!(restored.kept.len(), 3);
        assert!(dst.path().join("transaction.before-restore").exists());
        // The archive has no position: the stale one is moved aside, not left to mislead.
        assert!(!dst.path().join(POSITION_FILE).exists());
        let journal = Journal::open(dst.path(), &JournalOptions::default()).unwrap();
        assert_eq!(journal.last_id(), 3);
    }

    #[test]
    fn a_second_restore_is_refused_and_keeps_the_first_ones_files() {
        let src = notify_dir(1, 3);
        let archive = src.path().join("b.tar");
        create(src.path(), &archive, &opts()).unwrap();
        let dst = notify_dir(1, 5);
        let original = fs::read(dst.path().join(TRANSACTION_FILE)).unwrap();
        restore(dst.path(), &archive).unwrap();

        let err = restore(dst.path(), &archive).unwrap_err();
        assert!(matches!(err, BackupError::PreviousRestore { .. }), "{err}");
        assert!(err.to_string().contains("earlier restore"), "{err}");
        let kept = fs::read(dst.path().join("transaction.before-restore")).unwrap();
        assert_eq!(kept, original);
        assert!(!dst.path().join(".restore.transaction").exists());
    }

    #[test]
    fn a_failed_swap_is_undone() {
        // Fail at each rename in turn: the directory must end up exactly as before.
        for fail_at in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let mut swaps = Vec::new();
            for name in [TRANSACTION_FILE, INDEX_FILE] {
                let target = dir.path().join(name);
                fs::write(&target, format!("old {name}")).unwrap();
                let staged = dir.path().join(format!(".restore.{name}"));
                fs::write(&staged, format!("new {name}")).unwrap();
                swaps.push(Swap {
                    aside: Some(with_suffix(&target, BEFORE_RESTORE)),
                    target,
                    staged: Some(staged),
                });
            }
            let mut calls = 0;
            let mut rename = |from: &Path, to: &Path| {
                calls += 1;
                if calls == fail_at + 1 {
                    return Err(io::Error::other("injected"));
                }
                fs::rename(from, to)
            };
            let result = swap_in(dir.path(), &swaps, &mut rename);
            if fail_at == 4 {
                assert_eq!(result.unwrap().len(), 2);
                continue;
            }
            let err = result.unwrap_err();
            assert!(err.to_string().contains("injected"), "{err}");
            for name in [TRANSACTION_FILE, INDEX_FILE] {
                let text = fs::read_to_string(dir.path().join(name)).unwrap();
                assert_eq!(text, format!("old {name}"), "failing rename {fail_at}");
                let aside = with_suffix(&dir.path().join(name), BEFORE_RESTORE);
                assert!(!aside.exists(), "failing rename {fail_at}");
            }
        }
    }

    #[test]
    fn manifest_round_trips_and_ignores_unknown_keys() {
        let manifest = Manifest {
            format_version: 1,
            tool_version: "0.1.0".into(),
            created: "2024-01-01T00:00:00Z".into(),
            hostname: "primary".into(),
            notifier_running: true,
            first_id: 3,
            last_id: 9,
            position_id: Some(8),
            files: vec![FileSum {
                name: TRANSACTION_FILE.into(),
                size: 10,
                sha256: "ab".repeat(32),
            }],
        };
        let mut text = manifest.to_text();
        text.push_str("Comment: from the future\n");
        assert_eq!(Manifest::parse(Path::new("x"), &text).unwrap(), manifest);
        let err = Manifest::parse(Path::new("x"), "Format: tarball\n").unwrap_err();
        assert!(matches!(err, BackupError::NotABackup { .. }), "{err}");
    }
}
