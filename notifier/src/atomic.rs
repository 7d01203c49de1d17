//! Replacing a file atomically: write `<target><suffix>`, sync it, rename it over the target.
//! Shared by the backup (archives) and `univention-translog` (rewritten logs), so that both
//! clean up, sync and keep owners the same way.

use std::fs::{self, File, OpenOptions};
use std::io;
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

fn file_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FileError {
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
        let path = with_suffix(target, suffix);
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
        let old = fs::metadata(target).ok();
        let mode = old.as_ref().map_or(0o644, |m| m.mode() & 0o7777);
        let _ = fs::remove_file(with_suffix(target, suffix));
        let new = TempFile::create(target, suffix, mode)?;
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
        if let Some(dir) = self.target.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            // Makes the rename durable; failing only weakens crash safety.
            if let Ok(dir) = File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    }
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
    use std::io::Write;

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
}
