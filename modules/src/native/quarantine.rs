//! The replication module's quarantine: changes the local LDAP server refused for good
//! (schema, constraint or object-class violations, …), kept with everything needed to
//! apply them later, in the order they came.
//!
//! One JSON file, replaced atomically and durably ([`daemon::fs::write_atomic`]) before the
//! handler returns, so a change is in the quarantine before the listener commits its id. A
//! crash between the two redoes the transaction: the record is found by (id, DN, command)
//! and not added twice, so the quarantine and the listener's id never disagree.

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

impl Quarantine {
    /// Opens `<dir>/quarantine.json`; a missing file is an empty quarantine.
    pub fn open(dir: &Path) -> Result<Quarantine, String> {
        let path = dir.join("quarantine.json");
        let records = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{}: not a quarantine file: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Ok(Quarantine { path, records })
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

    /// Adds `record` durably, unless this change is already there (a transaction redone
    /// after a crash).
    pub fn push(&mut self, record: Record) -> Result<(), ModuleError> {
        let known = self.records.iter().any(|r| {
            r.id == record.id && r.command == record.command && dn_key(&r.dn) == dn_key(&record.dn)
        });
        if known {
            return Ok(());
        }
        self.records.push(record);
        self.save()
    }

    /// Replaces all records (after a retry or skip) durably.
    pub fn replace(&mut self, records: Vec<Record>) -> Result<(), ModuleError> {
        self.records = records;
        self.save()
    }

    fn save(&self) -> Result<(), ModuleError> {
        let json = serde_json::to_vec_pretty(&self.records)
            .map_err(|e| ModuleError::new(format!("cannot encode the quarantine: {e}")))?;
        // Not writable now means not recorded: the transaction must be retried, never
        // acknowledged without its change.
        daemon::fs::write_atomic(&self.path, &json, 0o600)
            .map_err(|e| ModuleError::transient(format!("cannot write the quarantine: {e}")))
    }
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
}
