//! Cache writes of the transactions not yet committed, readable before the commit: a move
//! stores the moved entry and then compares LDAP against it within the same transaction.

use std::collections::HashMap;
use std::sync::Arc;

use cache::{Batch, Cache, CacheEntry, CacheError, MasterRecord};
use ldap::dn::dn_key;

pub struct Staged {
    cache: Arc<Cache>,
    /// Latest staged state per cache key, for reads.
    overlay: HashMap<String, Overlay>,
    batch: Batch,
}

enum Overlay {
    /// The entry (`None` = deleted).
    Entry(Option<CacheEntry>),
    /// Only in the batch, encoded: the descendants of a moved container, which can be
    /// 100,000 entries and are not read again in their transaction, so a decoded copy of
    /// each would only double the memory.
    InBatch,
}

impl Staged {
    pub fn new(cache: Arc<Cache>) -> Staged {
        let batch = cache.batch();
        Staged {
            cache,
            overlay: HashMap::new(),
            batch,
        }
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// The entry for `dn` as it will be after the staged writes.
    pub fn get(&self, dn: &str) -> Result<Option<CacheEntry>, CacheError> {
        match self.overlay.get(&dn_key(dn)) {
            Some(Overlay::Entry(staged)) => Ok(staged.clone()),
            Some(Overlay::InBatch) => match self.batch.staged(dn)? {
                Some(staged) => Ok(staged),
                None => self.cache.get(dn),
            },
            None => self.cache.get(dn),
        }
    }

    pub fn put(&mut self, entry: CacheEntry) {
        self.batch.put(&entry);
        self.overlay
            .insert(dn_key(&entry.dn), Overlay::Entry(Some(entry)));
    }

    /// Like [`Staged::put`], keeping only the encoded copy (see [`Overlay::InBatch`]).
    pub fn put_encoded(&mut self, entry: &CacheEntry) {
        self.batch.put(entry);
        self.overlay.insert(dn_key(&entry.dn), Overlay::InBatch);
    }

    /// Like [`Staged::put_encoded`] for an entry the cache does not hold yet (see
    /// [`Batch::put_new`]).
    pub fn put_new(&mut self, entry: &CacheEntry) {
        self.batch.put_new(entry);
        self.overlay.insert(dn_key(&entry.dn), Overlay::InBatch);
    }

    pub fn delete(&mut self, dn: &str) {
        self.batch.delete(dn);
        self.overlay.insert(dn_key(dn), Overlay::Entry(None));
    }

    /// Drops everything staged (a transaction that failed half way).
    pub(crate) fn discard(&mut self) {
        self.batch = self.cache.batch();
        self.overlay.clear();
    }

    /// Everything staged plus `master`, as one batch for [`Cache::commit`].
    pub(crate) fn take_batch(&mut self, master: MasterRecord) -> Batch {
        let mut batch = std::mem::replace(&mut self.batch, self.cache.batch());
        batch.set_master(master);
        self.overlay.clear();
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dn: &str) -> CacheEntry {
        CacheEntry {
            dn: dn.into(),
            attributes: vec![("cn".into(), vec![b"x".to_vec()])],
            modules: vec!["m".into()],
        }
    }

    #[test]
    fn reads_see_staged_writes_until_committed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open(dir.path()).unwrap());
        let mut staged = Staged::new(Arc::clone(&cache));
        staged.put(entry("cn=A,dc=x"));
        assert_eq!(staged.get("cn=a,dc=x").unwrap(), Some(entry("cn=A,dc=x")));
        assert_eq!(cache.get("cn=a,dc=x").unwrap(), None);
        staged.delete("CN=a,dc=x");
        assert_eq!(staged.get("cn=a,dc=x").unwrap(), None);
        staged.put(entry("cn=b,dc=x"));
        staged.put_encoded(&entry("cn=C,dc=x"));
        assert_eq!(staged.get("cn=c,dc=x").unwrap(), Some(entry("cn=C,dc=x")));
        let batch = staged.take_batch(MasterRecord {
            notifier_id: 9,
            schema_id: 1,
        });
        cache.commit(batch, false).unwrap();
        assert_eq!(cache.get("cn=b,dc=x").unwrap(), Some(entry("cn=b,dc=x")));
        assert_eq!(cache.get("cn=a,dc=x").unwrap(), None);
        assert_eq!(cache.master().unwrap().unwrap().notifier_id, 9);
        assert_eq!(staged.get("cn=b,dc=x").unwrap(), Some(entry("cn=b,dc=x")));
    }
}
