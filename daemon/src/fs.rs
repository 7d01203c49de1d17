//! Replacing a file atomically: write `<target><suffix>`, sync it, rename it over the target,
//! sync the directory. Every state file of both daemons and their tools is written this way
//! ([`write_atomic`], [`TempFile`]), so a crash leaves the old or the new content, never a
//! torn or empty file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
#[error("cannot {op} {path}: {source}")]
pub struct FileError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl From<FileError> for io::Error {
    /// Keeps the kind (disk full stays disk full) and the message with the path.
    fn from(e: FileError) -> io::Error {
        io::Error::new(e.source.kind(), e)
    }
}

/// `map_err` adapter: `.map_err(file_err("read", &path))?` gives "cannot read <path>: …".
pub fn file_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FileError {
    let path = path.to_owned();
    move |source| FileError { op, path, source }
}

/// `path` with `suffix` appended to its file name.
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A file written next to its target and renamed into place by [`TempFile::commit`];
/// dropped before that, it is removed.
pub struct TempFile {
    path: PathBuf,
    target: PathBuf,
    file: File,
    committed: bool,
}

impl TempFile {
    /// Creates `<target><suffix>` with `mode`; fails if it exists.
    pub fn create(target: &Path, suffix: &str, mode: u32) -> Result<TempFile, FileError> {
        TempFile::create_as(target, target, suffix, mode)
    }

    /// Creates `<temp_base><suffix>` as the temporary file for `target`.
    fn create_as(
        target: &Path,
        temp_base: &Path,
        suffix: &str,
        mode: u32,
    ) -> Result<TempFile, FileError> {
        let path = with_suffix(temp_base, suffix);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(file_err("create", &path))?;
        Ok(TempFile {
            path,
            target: target.to_owned(),
            file,
            committed: false,
        })
    }

    /// Creates `<target><suffix>` as a replacement for `target`, with its mode and, where
    /// permitted, its owner. A leftover of an interrupted run is removed first.
    pub fn replacing(target: &Path, suffix: &str) -> Result<TempFile, FileError> {
        TempFile::replacing_as(target, target, suffix)
    }

    fn replacing_as(target: &Path, temp_base: &Path, suffix: &str) -> Result<TempFile, FileError> {
        let old = fs::metadata(target).ok();
        let mode = old.as_ref().map_or(0o644, |m| m.mode() & 0o7777);
        let _ = fs::remove_file(with_suffix(temp_base, suffix));
        let new = TempFile::create_as(target, temp_base, suffix, mode)?;
        if let Some(m) = &old {
            // Only root can give a file away (the listener's files belong to slapd's user).
            let _ = std::os::unix::fs::fchown(&new.file, Some(m.uid()), Some(m.gid()));
            // The mode given to open() was narrowed by the umask.
            new.file
                .set_permissions(fs::Permissions::from_mode(mode))
                .map_err(file_err("set the mode of", &new.path))?;
        }
        Ok(new)
    }

    /// Where the data is written until the commit.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Syncs the file and renames it over the target; with `keep_old`, an existing target
    /// is first renamed to `<target><keep_old>`.
    pub fn commit(mut self, keep_old: Option<&str>) -> Result<(), FileError> {
        self.file.sync_all().map_err(file_err("sync", &self.path))?;
        if let Some(suffix) = keep_old {
            match fs::rename(&self.target, with_suffix(&self.target, suffix)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(file_err("rename", &self.target)(e));
                }
                _ => {}
            }
        }
        fs::rename(&self.path, &self.target).map_err(file_err("rename", &self.path))?;
        self.committed = true;
        sync_parent(&self.target);
        Ok(())
    }
}

/// Hands `path` to the owner of `like` where they differ, when running as root (nobody else
/// may change an owner): files a root tool or import creates for a daemon that runs as its
/// own user.
pub fn give_to_owner_of(path: &Path, like: &Path) -> Result<(), FileError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let owner = fs::metadata(like).map_err(file_err("read the owner of", like))?;
    let meta = fs::metadata(path).map_err(file_err("read the owner of", path))?;
    if (meta.uid(), meta.gid()) != (owner.uid(), owner.gid()) {
        std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid()))
            .map_err(file_err("change the owner of", path))?;
    }
    Ok(())
}

/// Syncs the directory holding `path`, which makes a rename or create in it durable;
/// failing only weakens crash safety, so it is not an error.
pub fn sync_parent(path: &Path) {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
}

/// Replaces `path` with `data` atomically and durably: `.<name>.tmp` next to it is written,
/// fsynced and renamed over `path`, then the directory is fsynced. A new file gets `mode`;
/// an existing one keeps its mode and, where permitted, its owner.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), FileError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let suffix_target = path.with_file_name(format!(".{name}"));
    let new = if path.exists() {
        TempFile::replacing_as(path, &suffix_target, ".tmp")?
    } else {
        let _ = fs::remove_file(with_suffix(&suffix_target, ".tmp"));
        TempFile::create_as(path, &suffix_target, ".tmp", mode)?
    };
    (&new.file)
        .write_all(data)
        .map_err(file_err("write", &new.path))?;
    new.commit(None)
}

/// A failed [`append_whole`].
#[derive(Debug)]
pub struct AppendError {
    /// Why the write failed.
    pub error: io::Error,
    /// Why what it wrote could not be cut off again: the file then ends in a partial record.
    pub cut: Option<io::Error>,
}

/// Appends `record` in one write to `file`, opened with `O_APPEND` and holding `len` bytes
/// of whole records. A write that fails part way (a full disk) is cut back to `len`: logs
/// are read up to their first torn record, so one left in place would hide every record
/// appended after it. The failpoint `failpoint` ([`crate::failpoint`]) makes the write stop
/// half-way and fail.
pub fn append_whole(
    mut file: &File,
    len: u64,
    record: &[u8],
    failpoint: &str,
) -> Result<(), AppendError> {
    let written = match crate::failpoint::check(failpoint) {
        Ok(()) => file.write_all(record),
        Err(e) => file
            .write_all(record.get(..record.len() / 2).unwrap_or_default())
            .and(Err(e)),
    };
    written.map_err(|error| AppendError {
        error,
        cut: file.set_len(len).err(),
    })
}

/// Writes `n` in decimal without newline, atomically ([`write_atomic`], mode 0600): the UCS
/// format of `notifier_id`, the module state files and the schema id file.
pub fn write_decimal(path: &Path, n: u64) -> Result<(), FileError> {
    write_atomic(path, n.to_string().as_bytes(), 0o600)
}

/// The number in a file written by [`write_decimal`]; `None` if it is missing or not a
/// decimal number (surrounding whitespace, as written by hand or by old tools, is accepted).
pub fn read_decimal(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Creates `dir` and its missing parents with mode 0700 (caches and module states hold
/// password hashes and other secrets of replicated objects).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_replaces_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("log");
        fs::write(&target, "old").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o640)).unwrap();
        let new = TempFile::replacing(&target, ".new").unwrap();
        assert_eq!(new.path(), dir.path().join("log.new"));
        new.file().write_all(b"new").unwrap();
        new.commit(Some(".bak")).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "new");
        assert_eq!(
            fs::read_to_string(dir.path().join("log.bak")).unwrap(),
            "old"
        );
        let mode = fs::metadata(&target).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o640);
        assert!(!dir.path().join("log.new").exists());
    }

    #[test]
    fn dropped_without_commit_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("archive");
        let new = TempFile::create(&target, ".tmp1", 0o600).unwrap();
        assert!(TempFile::create(&target, ".tmp1", 0o600).is_err());
        drop(new);
        assert!(!dir.path().join("archive.tmp1").exists());
        assert!(!target.exists());
    }

    #[test]
    fn write_atomic_replaces_and_keeps_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write_atomic(&path, b"1", 0o600).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        write_decimal(&path, 42).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"42");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        assert_eq!(read_decimal(&path), Some(42));
        // The temporary file is renamed away, not left behind; it is hidden meanwhile.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state"]);
        // A leftover of a crashed writer does not block the next write.
        fs::write(dir.path().join(".state.tmp"), "junk").unwrap();
        write_decimal(&path, 7).unwrap();
        assert_eq!(read_decimal(&path), Some(7));
        assert!(write_decimal(&dir.path().join("missing/x"), 1).is_err());
    }

    #[test]
    fn read_decimal_tolerates_whitespace_and_rejects_junk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        assert_eq!(read_decimal(&path), None);
        for (text, expected) in [
            ("17\n", Some(17)),
            ("", None),
            ("12abc", None),
            ("-1", None),
        ] {
            fs::write(&path, text).unwrap();
            assert_eq!(read_decimal(&path), expected, "{text:?}");
        }
    }
}
