//! Cascading output (`-o`, spec listener.md §7): every transaction, exactly as received
//! from the upstream notifier, appended to `<ldap_dir>/listener/listener` for the notifier
//! of this host (a DC Backup), under the fcntl lock on `listener.lock` that the notifier's
//! queue-file intake also takes. Lines are written before the id is persisted, so a crash
//! can only repeat lines, which the downstream notifier skips by id.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon::lock::{LockError, lock_path};
use daemon::paths::QueueFiles;

/// UCS retries the lock every millisecond, 100 times.
const LOCK_ATTEMPTS: u32 = 100;
const LOCK_DELAY: Duration = Duration::from_millis(1);

/// A transaction line as the upstream notifier sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub id: u64,
    pub dn: String,
    pub command: String,
}

impl Line {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(format!("{} {} {}\n", self.id, self.dn, self.command).as_bytes());
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CascadeError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("cannot append to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct Cascade {
    path: PathBuf,
    lock: PathBuf,
}

impl Cascade {
    /// The queue file of the local notifier below `ldap_dir`.
    pub fn new(ldap_dir: &Path) -> Cascade {
        let files = QueueFiles::in_ldap_dir(ldap_dir);
        Cascade {
            path: files.queue(),
            lock: files.lock(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `lines` in one write under the lock, durably (the id persisted after this
    /// must never be ahead of the file).
    pub fn append(&self, lines: &[Line]) -> Result<(), CascadeError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for line in lines {
            line.write(&mut buf);
        }
        let _lock = lock_path(&self.lock, LOCK_ATTEMPTS, LOCK_DELAY)?;
        let write_err = |source| CascadeError::Write {
            path: self.path.clone(),
            source,
        };
        // Reopened every time: the notifier renames the file away and creates a new one.
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(write_err)?;
        file.write_all(&buf).map_err(write_err)?;
        file.sync_data().map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_lines_verbatim_under_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("listener")).unwrap();
        let cascade = Cascade::new(dir.path());
        let line = |id, dn: &str, command: &str| Line {
            id,
            dn: dn.into(),
            command: command.into(),
        };
        cascade
            .append(&[line(7, "cn=Old,dc=X", "r"), line(8, "cn=New,dc=X", "a")])
            .unwrap();
        cascade.append(&[line(9, "cn=J\\2C Ü,dc=X", "m")]).unwrap();
        cascade.append(&[]).unwrap();
        assert_eq!(
            std::fs::read_to_string(cascade.path()).unwrap(),
            "7 cn=Old,dc=X r\n8 cn=New,dc=X a\n9 cn=J\\2C Ü,dc=X m\n"
        );
        assert!(dir.path().join("listener/listener.lock").exists());
    }
}
