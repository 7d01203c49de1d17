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
//!
//! The gate (spec replication.md §B.6, UCS rule: never announce what the local LDAP
//! lacks). On a Backup the local notifier serves the local slapd; a transaction's line may
//! only reach it once the local slapd holds the change. While a module holds refused
//! changes in its quarantine (the native `replication` module), the lines of that
//! transaction and of every later one go to `<cache_dir>/cascade.held` instead
//! ([`Cascade::hold`], durable before the id is committed), in order, and reach the queue
//! file only when the quarantine is empty again ([`Cascade::release`]): after a successful
//! retry, or after a skip, by which the operator declares the local object final. The
//! lines are released in both cases, because the id space must stay the Primary's: a
//! missing id would make the local notifier's numbering diverge, and a promoted Backup
//! would hand out ids its listeners already saw. A skipped change's line only says "this
//! DN changed at this id"; listeners of the local notifier read the object from the local
//! LDAP, so they see what it holds, never what it lacks.

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
    #[error("held cascade lines {path}: {source}")]
    Held {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot append to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Lines held back by the gate, in `<cache_dir>/`.
pub const HELD_FILE: &str = "cascade.held";

/// The lines in a held file, in order, without repeats (a transaction redone after a crash
/// between holding and committing is held twice) and without a torn last line (its
/// transaction was not committed and is redone).
pub fn read_held(path: &Path) -> Result<Vec<Line>, CascadeError> {
    read_held_file(path).map(|(lines, _)| lines)
}

/// The held lines and the length of the file without a torn last line.
fn read_held_file(path: &Path) -> Result<(Vec<Line>, u64), CascadeError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(source) => {
            return Err(CascadeError::Held {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut lines: Vec<Line> = Vec::new();
    let mut complete = 0;
    for raw in bytes.split_inclusive(|&b| b == b'\n') {
        if !raw.ends_with(b"\n") {
            break;
        }
        complete += raw.len() as u64;
        let tx = Transaction::parse_queue_line(raw).map_err(|source| CascadeError::Held {
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidData, source),
        })?;
        if lines.last().is_some_and(|last| last.id >= tx.id.get()) {
            continue;
        }
        lines.push(Line {
            id: tx.id.get(),
            dn: tx.dn,
            command: tx.command.as_char().to_string(),
        });
    }
    Ok((lines, complete))
}

#[derive(Debug, Clone)]
pub struct Cascade {
    path: PathBuf,
    lock: PathBuf,
    held_path: PathBuf,
    /// What `held_path` holds.
    held: Vec<Line>,
}

impl Cascade {
    /// The queue file of the local notifier below `ldap_dir`; lines held back by the gate
    /// in `cache_dir`.
    pub fn new(ldap_dir: &Path, cache_dir: &Path) -> Result<Cascade, CascadeError> {
        let files = QueueFiles::in_ldap_dir(ldap_dir);
        let held_path = cache_dir.join(HELD_FILE);
        let (held, complete) = read_held_file(&held_path)?;
        // A torn last line must go before anything is appended behind it.
        if held_path.exists() {
            let held_err = |source| CascadeError::Held {
                path: held_path.clone(),
                source,
            };
            let file = OpenOptions::new()
                .write(true)
                .open(&held_path)
                .map_err(held_err)?;
            if file.metadata().map_err(held_err)?.len() > complete {
                file.set_len(complete).map_err(held_err)?;
                file.sync_data().map_err(held_err)?;
            }
        }
        Ok(Cascade {
            path: files.queue(),
            lock: files.lock(),
            held_path,
            held,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lines held back by the gate, oldest first.
    pub fn held(&self) -> &[Line] {
        &self.held
    }

    /// Writes `lines` through the gate: to the queue file if `open` and nothing is held,
    /// else held back behind what is held already. Held lines are released first when the
    /// gate is open.
    pub fn write(&mut self, lines: &[Line], open: bool) -> Result<(), CascadeError> {
        if open {
            self.release()?;
            self.append(lines)
        } else {
            self.hold(lines)
        }
    }

    /// Appends `lines` to the held file, durably, after checking them like [`Cascade::append`].
    pub fn hold(&mut self, lines: &[Line]) -> Result<(), CascadeError> {
        let last = self.held.last().map_or(0, |l| l.id);
        let fresh: Vec<&Line> = lines.iter().filter(|l| l.id > last).collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for line in &fresh {
            buf.extend_from_slice(&line.encode()?);
        }
        let held_err = |source| CascadeError::Held {
            path: self.held_path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.held_path)
            .map_err(held_err)?;
        file.write_all(&buf).map_err(held_err)?;
        file.sync_data().map_err(held_err)?;
        self.held.extend(fresh.into_iter().cloned());
        Ok(())
    }

    /// Hands every held line to the local notifier and empties the held file; the number of
    /// lines released. A crash between the two repeats lines, which the notifier skips by
    /// id.
    pub fn release(&mut self) -> Result<usize, CascadeError> {
        if self.held.is_empty() {
            return Ok(0);
        }
        self.append(&self.held)?;
        match std::fs::remove_file(&self.held_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CascadeError::Held {
                    path: self.held_path.clone(),
                    source,
                });
            }
        }
        let released = self.held.len();
        self.held.clear();
        Ok(released)
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
        let cascade = Cascade::new(dir.path(), dir.path()).unwrap();
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
    fn held_lines_wait_for_the_gate_and_are_released_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("listener")).unwrap();
        let mut cascade = Cascade::new(dir.path(), dir.path()).unwrap();
        cascade.write(&[line(1, "cn=a,dc=X", "a")], true).unwrap();
        cascade.write(&[line(2, "cn=b,dc=X", "a")], false).unwrap();
        cascade.hold(&[line(3, "cn=c,dc=X", "m")]).unwrap();
        // A redo after a crash holds a line twice; the file keeps it once.
        cascade.hold(&[line(3, "cn=c,dc=X", "m")]).unwrap();
        assert_eq!(
            std::fs::read_to_string(cascade.path()).unwrap(),
            "1 cn=a,dc=X a\n"
        );
        // A restart reads the held lines back, a torn last line dropped.
        let held = dir.path().join(HELD_FILE);
        let mut file = OpenOptions::new().append(true).open(&held).unwrap();
        file.write_all(b"4 cn=d,dc").unwrap();
        let mut cascade = Cascade::new(dir.path(), dir.path()).unwrap();
        assert_eq!(
            cascade.held().iter().map(|l| l.id).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(
            std::fs::read_to_string(&held).unwrap(),
            "2 cn=b,dc=X a\n3 cn=c,dc=X m\n"
        );
        cascade.write(&[line(4, "cn=d,dc=X", "d")], true).unwrap();
        assert_eq!(
            std::fs::read_to_string(cascade.path()).unwrap(),
            "1 cn=a,dc=X a\n2 cn=b,dc=X a\n3 cn=c,dc=X m\n4 cn=d,dc=X d\n"
        );
        assert!(cascade.held().is_empty() && !held.exists());
        assert_eq!(cascade.release().unwrap(), 0);
    }

    #[test]
    fn an_invalid_line_writes_nothing_of_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("listener")).unwrap();
        let cascade = Cascade::new(dir.path(), dir.path()).unwrap();
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
