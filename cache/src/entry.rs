//! What the cache stores about one LDAP object, and the master record.

/// Attributes in server order, values as exact bytes, as LDAP sent them.
///
/// Handler modules see these bytes unchanged, and the change engine compares value lists
/// positionally (spec listener.md §3.4), so neither attribute nor value order may change
/// between a store and a load.
pub use ldap::decode::Attributes;

/// One cached LDAP object: its attributes at the last processed transaction plus the modules
/// that handled it or are up to date for it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheEntry {
    /// The DN as LDAP spelled it (the cache key is [`crate::dn_key`] of it).
    pub dn: String,
    pub attributes: Attributes,
    /// Module names in insertion order, without duplicates.
    pub modules: Vec<String>,
}

impl CacheEntry {
    /// The values of `attr`, its name compared ASCII-case-insensitively (LDAP attribute
    /// descriptions are case-insensitive and ASCII by definition).
    pub fn values(&self, attr: &str) -> Option<&[Vec<u8>]> {
        ldap::decode::values_of(&self.attributes, attr)
    }

    /// The first `entryUUID` value, if present and UTF-8 (it is always ASCII in practice).
    pub fn entry_uuid(&self) -> Option<&str> {
        let first = self.values("entryUUID")?.first()?;
        std::str::from_utf8(first).ok()
    }

    pub fn has_module(&self, name: &str) -> bool {
        self.modules.iter().any(|m| m == name)
    }

    /// Appends `name` unless it is already listed (the list keeps insertion order).
    pub fn add_module(&mut self, name: &str) {
        if !self.has_module(name) {
            self.modules.push(name.to_owned());
        }
    }

    pub fn remove_module(&mut self, name: &str) {
        self.modules.retain(|m| m != name);
    }
}

/// The listener's progress: the last fully processed notifier id and the schema id it has
/// seen. Committed in the same batch as the entries the transaction changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MasterRecord {
    pub notifier_id: u64,
    pub schema_id: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> CacheEntry {
        CacheEntry {
            dn: "cn=x".into(),
            attributes: vec![
                (
                    "objectClass".into(),
                    vec![b"top".to_vec(), b"person".to_vec()],
                ),
                (
                    "entryUUID".into(),
                    vec![b"0b7c6e4a-1f2d-103c-8e1a-5d2f7f1c9a10".to_vec()],
                ),
            ],
            modules: vec![],
        }
    }

    #[test]
    fn values_match_names_case_insensitively() {
        let e = entry();
        assert_eq!(e.values("OBJECTCLASS").map(<[_]>::len), Some(2));
        assert_eq!(e.values("objectclass"), e.values("objectClass"));
        assert_eq!(e.values("cn"), None);
        assert_eq!(e.entry_uuid(), Some("0b7c6e4a-1f2d-103c-8e1a-5d2f7f1c9a10"));
        assert_eq!(CacheEntry::default().entry_uuid(), None);
    }

    #[test]
    fn entry_uuid_ignores_non_utf8_and_empty_lists() {
        let mut e = entry();
        e.attributes[1].1 = vec![vec![0xff]];
        assert_eq!(e.entry_uuid(), None);
        e.attributes[1].1.clear();
        assert_eq!(e.entry_uuid(), None);
    }

    #[test]
    fn module_list_keeps_order_without_duplicates() {
        let mut e = entry();
        e.add_module("replication");
        e.add_module("nfs-shares");
        e.add_module("replication");
        e.add_module("a");
        assert_eq!(e.modules, ["replication", "nfs-shares", "a"]);
        assert!(e.has_module("nfs-shares"));
        e.remove_module("nfs-shares");
        e.remove_module("missing");
        assert_eq!(e.modules, ["replication", "a"]);
        assert!(!e.has_module("nfs-shares"));
    }
}
