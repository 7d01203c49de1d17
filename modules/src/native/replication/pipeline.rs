//! Pipelined replica writes: a change whose write needs no read of the local object (an
//! add, a modify asserting the old `entryCSN`, a compare of it when nothing changed, a
//! delete) is sent and the handler returns; the
//! result is collected later, in order. The listener commits the transaction meanwhile, so
//! until the result is in, the change is the module's to deliver:
//!
//! - every sent change is first appended to `unconfirmed.log` in the state directory (one
//!   `write`, no sync: like the listener's own commit log it must survive a crash of the
//!   process, and [`Module::sync`] syncs it before the listener's commits become durable);
//!   at the next start the module applies what the log holds again (read, compare, write:
//!   idempotent) before any new change, so a crash with writes in flight loses nothing;
//! - results are collected before anything that depends on them: a write of the same
//!   object, an ancestor or a descendant waits for the earlier one, and every other kind of
//!   change (move, one that reads first, schema) and an operator's retry wait for all;
//!   `sync` (before every cache flush), `confirm` (before a Backup's cascade line) and
//!   `postrun` collect everything;
//! - a refused write is then handled as if refused at once (read, modlist, write; what is
//!   refused again goes to the quarantine with its transaction id, DN, operation, error and
//!   LDIF) before the listener's flush makes its commit durable;
//! - a write that failed because the server went away stays queued and is sent again
//!   (before any later change) once the server is back; meanwhile every handler call fails
//!   transiently, so the listener waits, and the log keeps the change across restarts.
//!
//! The log is emptied whenever nothing is in flight before a write that is not logged (a
//! move, a read-first update): replaying an older change after a later unlogged one could
//! undo it.
//!
//! [`Module::sync`]: crate::module::Module::sync

use std::fs::File;
use std::path::{Path, PathBuf};

use ldap::LdapFailure;
use ldap::dn::dn_key;

use super::super::quarantine::{Attrs, Record, parse_log};
use super::Attempt;

/// At most this many writes in flight; the oldest is collected before one more is sent.
pub(super) const WINDOW: usize = 64;

/// The file name of the log in the state directory.
const LOG: &str = "unconfirmed.log";

/// Failpoint ([`daemon::failpoint`]) that makes an append write half its line and fail.
pub const LOG_APPEND_FAILPOINT: &str = "replication-log-append";

/// A change handed to the server (or to be handed again) whose result is not in yet.
pub(super) struct InFlight {
    pub id: u64,
    pub dn: String,
    pub command: String,
    pub new: Attrs,
    /// What was sent; [`Attempt::ReadFirst`] for a change replayed from the log.
    pub attempt: Attempt,
    /// The running write; `None` when it must be (re)sent.
    pub result: Option<tokio::task::JoinHandle<Result<(), LdapFailure>>>,
    /// [`relation_key`] of `dn`.
    key: String,
}

impl InFlight {
    pub fn new(id: u64, dn: &str, command: String, new: Attrs, attempt: Attempt) -> InFlight {
        InFlight {
            id,
            dn: dn.to_owned(),
            command,
            new,
            attempt,
            result: None,
            key: relation_key(dn),
        }
    }

    pub fn record(&self) -> Record {
        Record {
            id: self.id,
            dn: self.dn.clone(),
            command: self.command.clone(),
            operation: "unconfirmed".into(),
            error: String::new(),
            ldif: String::new(),
            at: 0,
            move_from: None,
            new: Record::encode_state(&self.new),
        }
    }

    /// Whether a change of the object with relation key `key` must wait for this one: the
    /// same object, an ancestor or a descendant (a child is not written before its parent,
    /// nor a parent deleted before its children).
    pub fn related(&self, key: &str) -> bool {
        related(&self.key, key)
    }
}

/// A DN lower-cased without spaces: equal for every spelling of one DN that the listener
/// hands over, and a suffix of its descendants' keys. Removing spaces may make unrelated
/// DNs look related, which only costs a wait, never a missed dependency.
pub(super) fn relation_key(dn: &str) -> String {
    let mut key = dn_key(dn);
    key.retain(|c| c != ' ');
    key
}

fn related(a: &str, b: &str) -> bool {
    let below = |child: &str, parent: &str| {
        child.len() > parent.len()
            && child.ends_with(parent)
            && child.as_bytes()[child.len() - parent.len() - 1] == b','
    };
    a == b || below(a, b) || below(b, a)
}

/// `unconfirmed.log`: the changes sent but not known to be applied, one JSON record per line.
pub(super) struct WriteLog {
    path: PathBuf,
    file: Option<File>,
    /// Bytes in the file.
    len: u64,
    /// Written or cut since the last sync.
    dirty: bool,
    /// A failed append left a partial line that could not be cut off: appends are refused
    /// until [`WriteLog::clear`] empties the file.
    torn: bool,
}

impl WriteLog {
    /// Opens the log in `dir` and returns the changes it holds (a torn last line, from a
    /// crash during an append, is dropped: that transaction was not committed).
    pub fn open(dir: &Path) -> Result<(WriteLog, Vec<Record>), String> {
        let path = dir.join(LOG);
        let (records, len) = match std::fs::read(&path) {
            Ok(bytes) => {
                let (records, good) =
                    parse_log(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
                (records, good as u64)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let mut log = WriteLog {
            path,
            file: None,
            len,
            dirty: false,
            torn: false,
        };
        // The torn tail goes before anything is appended behind it.
        log.file()
            .and_then(|f| f.set_len(len))
            .map_err(|e| format!("cannot open {}: {e}", log.path.display()))?;
        Ok((log, records))
    }

    fn file(&mut self) -> std::io::Result<&mut File> {
        use std::os::unix::fs::OpenOptionsExt as _;
        if self.file.is_none() {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)?;
            self.file = Some(file);
        }
        self.file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("log not open"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` with one `write` (not synced). A write that fails part way (a full
    /// disk) is cut off again: the next line would continue it, and a damaged line that is
    /// not the last one stops the module from loading.
    pub fn append(&mut self, record: &Record) -> std::io::Result<()> {
        if self.torn {
            return Err(std::io::Error::other(format!(
                "{} ends in a partial line that could not be cut off",
                self.path.display()
            )));
        }
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let len = self.len;
        if let Err(failed) =
            daemon::fs::append_whole(self.file()?, len, &line, LOG_APPEND_FAILPOINT)
        {
            self.torn = failed.cut.is_some();
            return Err(failed.error);
        }
        self.len += line.len() as u64;
        self.dirty = true;
        Ok(())
    }

    /// Empties the log (every change in it is confirmed).
    pub fn clear(&mut self) -> std::io::Result<()> {
        if self.len > 0 || self.torn {
            self.file()?.set_len(0)?;
            self.len = 0;
            self.torn = false;
            self.dirty = true;
        }
        Ok(())
    }

    /// Makes the log durable.
    pub fn sync(&mut self) -> std::io::Result<()> {
        if self.dirty {
            self.file()?.sync_all()?;
            if let Some(dir) = self.path.parent() {
                // The file's name must survive a power loss too.
                File::open(dir)?.sync_all()?;
            }
            self.dirty = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn related_means_same_ancestor_or_descendant() {
        let k = |dn: &str| relation_key(dn);
        assert!(related(&k("uid=a,ou=P,dc=x"), &k("UID=a, ou=p,dc=x")));
        assert!(related(&k("uid=a,ou=p,dc=x"), &k("ou=p,dc=x")));
        assert!(related(&k("ou=p,dc=x"), &k("cn=c,uid=a,ou=p,dc=x")));
        assert!(!related(&k("uid=a,ou=p,dc=x"), &k("uid=b,ou=p,dc=x")));
        assert!(!related(&k("uid=a,ou=p,dc=x"), &k("xou=p,dc=x")));
        assert!(!related(&k("ou=p,dc=x"), &k("ou=q,dc=x")));
    }

    /// Set in the child of [`a_failed_append_is_cut_off`].
    const APPEND_CHILD_ENV: &str = "REPLICATION_APPEND_CHILD_DIR";

    fn logged(id: u64) -> Record {
        InFlight::new(
            id,
            &format!("cn=e{id},dc=x"),
            "m".into(),
            vec![("cn".into(), vec![format!("e{id}").into_bytes()])],
            Attempt::ReadFirst,
        )
        .record()
    }

    /// Runs only inside the child: three appends, the second failing half-way.
    #[test]
    fn append_child() {
        let Some(dir) = std::env::var_os(APPEND_CHILD_ENV) else {
            return;
        };
        let (mut log, _) = WriteLog::open(dir.as_ref()).unwrap();
        log.append(&logged(1)).unwrap();
        assert!(log.append(&logged(2)).is_err());
        log.append(&logged(3)).unwrap();
    }

    /// A line written half-way before an error is cut off, so the next append starts a line
    /// of its own and the log still loads.
    #[test]
    fn a_failed_append_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "native::replication::pipeline::tests::append_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(APPEND_CHILD_ENV, dir.path())
            .env(
                daemon::failpoint::ENV,
                format!("{LOG_APPEND_FAILPOINT}=2*1"),
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let (_, records) = WriteLog::open(dir.path()).unwrap();
        assert_eq!(records.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn the_log_keeps_appends_drops_a_torn_tail_and_clears() {
        let dir = tempfile::tempdir().unwrap();
        let entry = logged;
        let (mut log, records) = WriteLog::open(dir.path()).unwrap();
        assert!(records.is_empty());
        log.append(&entry(1)).unwrap();
        log.append(&entry(2)).unwrap();
        drop(log);
        // A crash in the middle of the third append.
        let path = dir.path().join(LOG);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{\"id\":3,\"dn");
        std::fs::write(&path, bytes).unwrap();
        let (mut log, records) = WriteLog::open(dir.path()).unwrap();
        assert_eq!(records.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(records[1].new_state().unwrap()[0].1, vec![b"e2".to_vec()]);
        log.append(&entry(4)).unwrap();
        log.sync().unwrap();
        let (_, records) = WriteLog::open(dir.path()).unwrap();
        assert_eq!(
            records.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![1, 2, 4]
        );
        log.clear().unwrap();
        log.append(&entry(5)).unwrap();
        let (_, records) = WriteLog::open(dir.path()).unwrap();
        assert_eq!(records.iter().map(|r| r.id).collect::<Vec<_>>(), vec![5]);
    }
}
