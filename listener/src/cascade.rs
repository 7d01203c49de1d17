//! Cascading output (`-o`, spec listener.md §7): every transaction, exactly as received
//! from the upstream notifier, appended to `<ldap_dir>/listener/listener` for the notifier
//! of this host (a DC Backup), under the fcntl lock on `listener.lock` that the notifier's
//! queue-file intake also takes. Lines are written before the id is persisted, so a crash
//! can only repeat lines, which the downstream notifier skips by id.
//!
//! Every line is checked with the protocol's own parser before anything is written
//! ([`Line::encode`]): a DN or command from the upstream translog entry that would read back
//! differently (an embedded newline would forge a second line) is refused, and nothing of
//! the batch is written.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon::lock::{LockError, lock_path};
use daemon::paths::QueueFiles;
use proto::{LineError, Transaction};

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
    /// The line as the downstream notifier's queue intake will read it, or why it cannot be
    /// written. The check is the intake's own parser
    /// ([`Transaction::parse_queue_line`]) plus a comparison with what was meant: the parser
    /// splits at the first and last space and strips one `\r`, so a command with a space or
    /// a trailing `\r` would be read back as a different DN or command without any error.
    pub fn encode(&self) -> Result<Vec<u8>, CascadeError> {
        let invalid = |source| CascadeError::InvalidLine {
            id: self.id,
            dn: self.dn.clone(),
            source,
        };
        let bytes = format!("{} {} {}\n", self.id, self.dn, self.command).into_bytes();
        let parsed = Transaction::parse_queue_line(&bytes).map_err(invalid)?;
        let same = parsed.id.get() == self.id
            && parsed.dn == self.dn
            && parsed.command.as_char().to_string() == self.command;
        if !same {
            // The id is plain digits and the DN starts after the first space, so only the
            // command can have shifted the split.
            return Err(invalid(LineError::BadCommand(self.command.clone())));
        }
        Ok(bytes)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CascadeError {
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The upstream transaction cannot be written as a line the downstream notifier reads
    /// back unchanged; retrying does not help until the upstream translog entry is fixed.
    #[error("transaction {id} (DN {dn:?}) cannot be written as a queue line: {source}")]
    InvalidLine {
        id: u64,
        dn: String,
        #[source]
        source: LineError,
    },
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
    /// must never be ahead of the file). If any line is invalid nothing is written.
    pub fn append(&self, lines: &[Line]) -> Result<(), CascadeError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for line in lines {
            buf.extend_from_slice(&line.encode()?);
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

    fn line(id: u64, dn: &str, command: &str) -> Line {
        Line {
            id,
            dn: dn.into(),
            command: command.into(),
        }
    }

    #[test]
    fn lines_that_would_not_read_back_unchanged_are_refused() {
        let refused = [
            // A newline in the DN would forge transaction 9 downstream.
            (
                line(7, "cn=x\n9 cn=admin,dc=X", "m"),
                LineError::EmbeddedNewline,
            ),
            (line(7, "cn=x\0", "m"), LineError::NulByte),
            (line(0, "cn=x", "m"), LineError::ZeroId),
            (line(7, "", "m"), LineError::EmptyDn),
            (line(7, "cn=x", "x"), LineError::BadCommand("x".into())),
            (line(7, "cn=x", ""), LineError::BadCommand(String::new())),
            // `n` never enters a notifier's queue.
            (line(7, "cn=x", "n"), LineError::BadCommand("n".into())),
            // Would be read back as DN "cn=x a" with command "m", or with the `\r` lost.
            (line(7, "cn=x", "a m"), LineError::BadCommand("a m".into())),
            (line(7, "cn=x", "a\r"), LineError::BadCommand("a\r".into())),
            (line(7, "cn=x", "a\n"), LineError::EmbeddedNewline),
        ];
        for (line, want) in refused {
            match line.encode() {
                Err(CascadeError::InvalidLine { id, source, .. }) => {
                    assert_eq!((id, source), (line.id, want), "{line:?}");
                }
                other => panic!("{line:?} gave {other:?}"),
            }
        }
        let long = "c".repeat(proto::MAX_LINE_LEN);
        assert!(matches!(
            line(7, &long, "m").encode(),
            Err(CascadeError::InvalidLine {
                source: LineError::TooLong { .. },
                ..
            })
        ));
        // Spaces, `\r` and non-ASCII inside a DN read back unchanged.
        assert_eq!(
            line(3, " cn=J Ü\r,dc=X ", "r").encode().unwrap(),
            b"3  cn=J \xc3\x9c\r,dc=X  r\n".to_vec()
        );
    }

    #[test]
    fn an_invalid_line_writes_nothing_of_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("listener")).unwrap();
        let cascade = Cascade::new(dir.path());
        cascade.append(&[line(6, "cn=ok,dc=X", "m")]).unwrap();
        let err = cascade
            .append(&[
                line(7, "cn=Old,dc=X", "r"),
                line(8, "cn=New\n9 cn=forged,dc=X", "a"),
            ])
            .unwrap_err();
        assert!(
            err.to_string().contains("transaction 8") && err.to_string().contains("newline"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(cascade.path()).unwrap(),
            "6 cn=ok,dc=X m\n"
        );
    }
}
