//! The replication module's quarantine: changes the local LDAP server refused for good
//! (schema, constraint or object-class violations, …), kept with everything needed to
//! apply them later, in the order they came.
//!
//! Stored as `quarantine.log`, one JSON record per line. A new record is appended and
//! synced before the handler returns, so a change is in the quarantine before the listener
//! commits its id (one small write however many records queue, where rewriting the whole
//! file cost ~100 ms per record once thousands had queued). Retries and skips rewrite the
//! file whole, atomically ([`daemon::fs::write_atomic`]: written beside, synced, renamed
//! over; a crash leaves the old log or the new one). A crash in the middle of an append
//! leaves a torn last line: it was never acknowledged, so opening drops it (the listener
//! redoes that transaction). A crash between append and commit redoes the transaction: the record
//! is found by (id, DN, command) and not added twice, so the quarantine and the listener's
//! id never disagree.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ldap::dn::{dn_key, is_below};
use serde::{Deserialize, Serialize};

use crate::module::ModuleError;

/// Attributes as exact bytes, in order.
pub type Attrs = Vec<(String, Vec<Vec<u8>>)>;

/// One held-back change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The listener's transaction id.
    pub id: u64,
    pub dn: String,
    /// The listener command (`a`, `m`, `d`, `n`, `r`).
    pub command: String,
    /// What was attempted: "add", "modify", "delete", "modrdn", or "queued" for a change
    /// held back only because an earlier one of the same object is quarantined.
    pub operation: String,
    /// The LDAP server's refusal (or the id of the record this one waits behind).
    pub error: String,
    /// The attempted change as LDIF (empty for queued changes).
    pub ldif: String,
    /// Unix time of the refusal.
    pub at: u64,
    /// For the add of a move: the DN the object had before (renamed on retry).
    #[serde(default)]
    pub move_from: Option<String>,
    /// The object's new state (empty for a delete), values base64: what a retry applies.
    #[serde(default)]
    pub new: Vec<(String, Vec<String>)>,
}

impl Record {
    pub fn new_state(&self) -> Result<Attrs, String> {
        self.new
            .iter()
            .map(|(name, values)| {
                let values = values
                    .iter()
                    .map(|v| STANDARD.decode(v).map_err(|e| format!("{name}: {e}")))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((name.clone(), values))
            })
            .collect()
    }

    pub fn encode_state(new: &[(String, Vec<Vec<u8>>)]) -> Vec<(String, Vec<String>)> {
        new.iter()
            .map(|(name, values)| {
                (
                    name.clone(),
                    values.iter().map(|v| STANDARD.encode(v)).collect(),
                )
            })
            .collect()
    }

    /// Whether a later change of `dn` must wait behind this record: same object, or below
    /// it (a child cannot be written before its parent).
    pub fn blocks(&self, dn: &str) -> bool {
        let key = dn_key(dn);
        let mine = [Some(self.dn.as_str()), self.move_from.as_deref()];
        mine.into_iter()
            .flatten()
            .any(|own| dn_key(own) == key || is_below(dn, own))
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug)]
pub struct Quarantine {
    path: PathBuf,
    records: Vec<Record>,
}

/// The file name of the log in the state directory.
const LOG: &str = "quarantine.log";
/// The earlier format, one JSON array rewritten per record: read once, then replaced.
const OLD_JSON: &str = "quarantine.json";

impl Quarantine {
    /// Opens `<dir>/quarantine.log`; a missing file is an empty quarantine. A torn last
    /// line (a crash during an append) is cut off; anything else unreadable is an error.
    pub fn open(dir: &Path) -> Result<Quarantine, String> {
        let path = dir.join(LOG);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Quarantine::from_old_json(dir, path);
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let (records, good) = parse_log(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut quarantine = Quarantine { path, records };
        if good < bytes.len() {
            tracing::warn!(
                "{}: dropping a torn last record ({} bytes) left by a crash during an append",
                quarantine.path.display(),
                bytes.len() - good
            );
            quarantine.compact().map_err(|e| e.to_string())?;
        }
        Ok(quarantine)
    }

    /// How many changes the quarantine in `dir` holds, read without changing anything (for
    /// tools that must not repair another process's files).
    pub fn count(dir: &Path) -> Result<usize, String> {
        let path = dir.join(LOG);
        match std::fs::read(&path) {
            Ok(bytes) => parse_log(&bytes)
                .map(|(records, _)| records.len())
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let old = dir.join(OLD_JSON);
                match std::fs::read(&old) {
                    Ok(bytes) => serde_json::from_slice::<Vec<Record>>(&bytes)
                        .map(|records| records.len())
                        .map_err(|e| format!("{}: not a quarantine file: {e}", old.display())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
                    Err(e) => Err(format!("cannot read {}: {e}", old.display())),
                }
            }
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    fn from_old_json(dir: &Path, path: PathBuf) -> Result<Quarantine, String> {
        let old = dir.join(OLD_JSON);
        let records: Vec<Record> = match std::fs::read(&old) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{}: not a quarantine file: {e}", old.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", old.display())),
        };
        let mut quarantine = Quarantine { path, records };
        if !quarantine.records.is_empty() {
            quarantine.compact().map_err(|e| e.to_string())?;
            std::fs::remove_file(&old)
                .map_err(|e| format!("cannot remove {}: {e}", old.display()))?;
        }
        Ok(quarantine)
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The first record a change of `dn` (or of `also`, the source of a move) must wait
    /// behind.
    pub fn blocker(&self, dn: &str, also: Option<&str>) -> Option<&Record> {
        self.records
            .iter()
            .find(|r| r.blocks(dn) || also.is_some_and(|a| r.blocks(a)))
    }

    /// Adds `record` durably (appended to the log and synced), unless this change is
    /// already there (a transaction redone after a crash).
    pub fn push(&mut self, record: Record) -> Result<(), ModuleError> {
        let known = self.records.iter().any(|r| {
            r.id == record.id && r.command == record.command && dn_key(&r.dn) == dn_key(&record.dn)
        });
        if known {
            return Ok(());
        }
        let mut line = serde_json::to_vec(&record)
            .map_err(|e| ModuleError::new(format!("cannot encode the quarantine: {e}")))?;
        line.push(b'\n');
        self.append(&line)
            // Not written now means not recorded: the transaction must be retried, never
            // acknowledged without its change.
            .map_err(|e| {
                ModuleError::transient(format!("cannot write {}: {e}", self.path.display()))
            })?;
        self.records.push(record);
        Ok(())
    }

    fn append(&self, line: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let new = !self.path.exists();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        file.write_all(line)?;
        file.sync_data()?;
        if new && let Some(dir) = self.path.parent() {
            // The new file's name must survive a crash too.
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Replaces all records (after a retry or skip) durably: the log is rewritten.
    pub fn replace(&mut self, records: Vec<Record>) -> Result<(), ModuleError> {
        let old = std::mem::replace(&mut self.records, records);
        if let Err(e) = self.compact() {
            self.records = old;
            return Err(e);
        }
        Ok(())
    }

    /// Rewrites the log with exactly the live records, atomically.
    fn compact(&mut self) -> Result<(), ModuleError> {
        let mut text = Vec::new();
        for record in &self.records {
            serde_json::to_writer(&mut text, record)
                .map_err(|e| ModuleError::new(format!("cannot encode the quarantine: {e}")))?;
            text.push(b'\n');
        }
        daemon::fs::write_atomic(&self.path, &text, 0o600).map_err(|e| {
            ModuleError::transient(format!("cannot write {}: {e}", self.path.display()))
        })?;
        Ok(())
    }
}

/// The records of a log and the length of its intact part. Only the last line may be
/// incomplete (no newline) or unreadable: an append torn by a crash.
pub(super) fn parse_log(bytes: &[u8]) -> Result<(Vec<Record>, usize), String> {
    let mut records = Vec::new();
    let mut good = 0;
    let mut rest = bytes;
    let mut number = 0;
    while !rest.is_empty() {
        number += 1;
        let (line, complete) = match rest.iter().position(|b| *b == b'\n') {
            Some(end) => (&rest[..end], true),
            None => (rest, false),
        };
        let last = !complete || line.len() + 1 == rest.len();
        match serde_json::from_slice::<Record>(line) {
            Ok(record) if complete => records.push(record),
            Ok(_) => break,
            Err(_) if last => break,
            Err(e) => return Err(format!("line {number} is not a quarantine record: {e}")),
        }
        good += line.len() + 1;
        rest = &rest[line.len() + 1..];
    }
    Ok((records, good))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, dn: &str) -> Record {
        Record {
            id,
            dn: dn.into(),
            command: "a".into(),
            operation: "add".into(),
            error: "refused".into(),
            ldif: String::new(),
            at: 0,
            move_from: None,
            new: Record::encode_state(&[("cn".into(), vec![b"\xff".to_vec()])]),
        }
    }

    #[test]
    fn durable_deduplicated_and_blocking_below() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Quarantine::open(dir.path()).unwrap();
        assert!(q.records().is_empty());
        q.push(record(5, "cn=x,dc=y")).unwrap();
        q.push(record(5, "CN=X,dc=y")).unwrap();
        assert_eq!(q.records().len(), 1);
        let q = Quarantine::open(dir.path()).unwrap();
        assert_eq!(q.records().len(), 1);
        assert_eq!(
            q.records()[0].new_state().unwrap(),
            vec![("cn".to_owned(), vec![b"\xff".to_vec()])]
        );
        assert!(q.blocker("cn=X,dc=y", None).is_some());
        assert!(q.blocker("uid=a,cn=x,dc=y", None).is_some());
        assert!(q.blocker("cn=xx,dc=y", None).is_none());
        assert!(q.blocker("cn=z,dc=y", Some("cn=x,dc=y")).is_some());
    }

    #[test]
    fn a_torn_last_append_is_dropped_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Quarantine::open(dir.path()).unwrap();
        q.push(record(1, "cn=a,dc=y")).unwrap();
        q.push(record(2, "cn=b,dc=y")).unwrap();
        let path = dir.path().join(LOG);
        let intact = std::fs::read(&path).unwrap();
        // A crash in the middle of the third append: half a line, no newline.
        let mut third = serde_json::to_vec(&record(3, "cn=c,dc=y")).unwrap();
        third.truncate(third.len() / 2);
        let mut torn = intact.clone();
        torn.extend_from_slice(&third);
        std::fs::write(&path, &torn).unwrap();
        let mut q = Quarantine::open(dir.path()).unwrap();
        assert_eq!(q.records().len(), 2);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            intact,
            "the torn tail is cut off"
        );
        // The redone transaction appends cleanly after it.
        q.push(record(3, "cn=c,dc=y")).unwrap();
        let q = Quarantine::open(dir.path()).unwrap();
        let ids: Vec<u64> = q.records().iter().map(|r| r.id).collect();
        assert_eq!(ids, [1, 2, 3]);
        // A damaged line before the last is not a torn append: refused, nothing guessed.
        let mut bad = b"{not json}\n".to_vec();
        bad.extend_from_slice(&intact);
        std::fs::write(&path, &bad).unwrap();
        assert!(Quarantine::open(dir.path()).unwrap_err().contains("line 1"));
    }

    #[test]
    fn appends_are_one_line_each_and_replace_compacts_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG);
        let mut q = Quarantine::open(dir.path()).unwrap();
        for id in 0..200 {
            let before = std::fs::metadata(&path).map_or(0, |m| m.len());
            q.push(record(id, &format!("cn=u{id},dc=y"))).unwrap();
            let line = serde_json::to_vec(&record(id, &format!("cn=u{id},dc=y"))).unwrap();
            // Appended, not rewritten.
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                before + line.len() as u64 + 1
            );
        }
        let kept: Vec<Record> = q
            .records()
            .iter()
            .filter(|r| r.id % 10 == 0)
            .cloned()
            .collect();
        q.replace(kept).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 20);
        assert!(!dir.path().join(format!(".{LOG}.tmp")).exists());
        let reopened = Quarantine::open(dir.path()).unwrap();
        assert_eq!(reopened.records(), q.records());
    }

    #[test]
    fn the_earlier_json_file_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let old = vec![record(7, "cn=x,dc=y")];
        std::fs::write(
            dir.path().join(OLD_JSON),
            serde_json::to_vec_pretty(&old).unwrap(),
        )
        .unwrap();
        let q = Quarantine::open(dir.path()).unwrap();
        assert_eq!(q.records(), &old[..]);
        assert!(!dir.path().join(OLD_JSON).exists());
        assert_eq!(Quarantine::open(dir.path()).unwrap().records(), &old[..]);
    }

    #[test]
    fn count_reads_either_format_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Quarantine::count(dir.path()), Ok(0));
        let old = vec![record(7, "cn=x,dc=y"), record(8, "cn=z,dc=y")];
        std::fs::write(dir.path().join(OLD_JSON), serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(Quarantine::count(dir.path()), Ok(2));
        assert!(dir.path().join(OLD_JSON).exists(), "count must not migrate");
        let mut q = Quarantine::open(dir.path()).unwrap();
        q.push(record(9, "cn=w,dc=y")).unwrap();
        let log = dir.path().join(LOG);
        let mut torn = std::fs::read(&log).unwrap();
        torn.extend_from_slice(b"{\"id\":10");
        std::fs::write(&log, &torn).unwrap();
        assert_eq!(Quarantine::count(dir.path()), Ok(3));
        assert_eq!(std::fs::read(&log).unwrap(), torn, "count must not repair");
    }
}
