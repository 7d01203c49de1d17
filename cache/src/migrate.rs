//! Import of the sled database earlier versions kept (`cache.sled/`, with its commit log).
//!
//! The records keep their format ([`crate::record`]); only the engine changes (DESIGN.md
//! decision 5). The import is crash-safe and never removes data it has not imported:
//! 1. `cache.lmdb.import/` is filled, and its files and directory are synced;
//! 2. `cache.sled/` is renamed to `cache.sled.imported/`;
//! 3. `cache.lmdb.import/` is renamed to `cache.lmdb/`: the import takes effect;
//! 4. `cache.sled.imported/` is removed.
//!
//! An open after a crash before step 3 puts `cache.sled/` back and imports again; after
//! step 3 it removes what is left. `cache.sled/` beside `cache.lmdb/` is never a leftover
//! (a downgrade and upgrade again, or an old copy put back by hand): the open refuses it
//! instead of guessing which one is current.

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use crate::CacheError;
use crate::kv::Store;
use crate::record::{ENTRY_PREFIX, SEQ_KEY, UUID_PREFIX, decode_seq};
use crate::store::DB_DIR;
use crate::wal::{Wal, Writes};

/// The database directory of earlier versions.
pub const SLED_DIR: &str = "cache.sled";
/// Where the import is built before it takes effect.
const IMPORT_DIR: &str = "cache.lmdb.import";
/// Where the imported database waits for its removal.
const IMPORTED_DIR: &str = "cache.sled.imported";
/// Records per write transaction of the import.
const IMPORT_CHUNK: usize = 1000;

/// How long the import waits for sled's file lock, which sled releases a moment after its
/// database is dropped.
const LOCK_WAIT: Duration = Duration::from_secs(1);
const LOCK_POLL: Duration = Duration::from_millis(10);

/// Imports `<dir>/cache.sled` into `<dir>/cache.lmdb` if there is one to import, or finishes
/// an import a crash cut short; returns the number of entries imported.
pub(crate) fn from_sled(dir: &Path) -> Result<Option<usize>, CacheError> {
    let old = dir.join(SLED_DIR);
    let imported = dir.join(IMPORTED_DIR);
    let import = dir.join(IMPORT_DIR);
    let new = dir.join(DB_DIR);
    if ![&old, &imported, &import].iter().any(|path| path.exists()) {
        return Ok(None);
    }
    let _lock = lock(dir)?;
    if new.exists() {
        if old.exists() {
            return Err(CacheError::Store(format!(
                "{dir} holds both {SLED_DIR} (the cache of an earlier version) and {DB_DIR}; \
                 move away the one that is not current",
                dir = dir.display()
            )));
        }
        // A crash after the import took effect.
        for leftover in [&imported, &import] {
            if leftover.exists() {
                remove_dir(leftover)?;
            }
        }
        return Ok(None);
    }
    // A crash before the import took effect: start again from the old database.
    if imported.exists() && !old.exists() {
        std::fs::rename(&imported, &old).map_err(io("rename", &imported))?;
    }
    if import.exists() {
        remove_dir(&import)?;
    }
    if !old.exists() {
        return Ok(None);
    }
    daemon::fs::create_private_dir(&import).map_err(io("create", &import))?;
    let entries = {
        let db = open_sled(&old)?;
        let store = Store::open(&import)?;
        let entries = copy(&db, &old, &store)?;
        store.sync()?;
        entries
    };
    // Every file the cache needs exists now and belongs to the old database's owner: a tool
    // run as root may be the first to open the cache after an upgrade, and the listener
    // runs as its own user.
    drop(Wal::open(&import).map_err(io("create", &import.join(crate::wal::WAL_FILE)))?);
    give_to_owner_of(&import, &old)?;
    sync_tree(&import)?;
    std::fs::rename(&old, &imported).map_err(io("rename", &old))?;
    daemon::fs::sync_parent(&imported);
    std::fs::rename(&import, &new).map_err(io("rename", &import))?;
    daemon::fs::sync_parent(&new);
    remove_dir(&imported)?;
    Ok(Some(entries))
}

/// Keeps a second process from importing at the same time.
fn lock(dir: &Path) -> Result<File, CacheError> {
    let file = File::open(dir).map_err(io("open", dir))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(CacheError::Store(format!(
            "another process is importing the cache in {}",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(source)) => Err(io("lock", dir)(source)),
    }
}

/// Syncs `dir` and the files in it.
fn sync_tree(dir: &Path) -> Result<(), CacheError> {
    for item in std::fs::read_dir(dir).map_err(io("read", dir))? {
        let path = item.map_err(io("read", dir))?.path();
        File::open(&path)
            .and_then(|file| file.sync_all())
            .map_err(io("sync", &path))?;
    }
    File::open(dir)
        .and_then(|file| file.sync_all())
        .map_err(io("sync", dir))
}

/// Copies sled's records, with the commits its log holds beyond them, and returns the number
/// of entries.
fn copy(db: &sled::Db, old: &Path, store: &Store) -> Result<usize, CacheError> {
    let mut chunk = Writes::new();
    for item in db.iter() {
        let (key, value) = item.map_err(sled_error)?;
        if key.starts_with(UUID_PREFIX) {
            continue;
        }
        chunk.insert(key.to_vec(), Some(value.to_vec()));
        if chunk.len() >= IMPORT_CHUNK {
            store.apply(&std::mem::take(&mut chunk))?;
        }
    }
    store.apply(&chunk)?;

    // The commits sled lacks, as the open of earlier versions replayed them.
    let seq = match db.get(SEQ_KEY).map_err(sled_error)? {
        Some(value) => decode_seq(&value)?,
        None => 0,
    };
    let log = old.join(crate::wal::WAL_FILE);
    let mut wal = Wal::open(old).map_err(io("open", &log))?;
    let (replayed, _, _) = wal.replay_after(seq).map_err(io("read", &log))?;
    store.apply(&replayed)?;
    let mut entries = 0;
    store.scan(ENTRY_PREFIX, None, |_, _| {
        entries += 1;
        Ok(true)
    })?;
    Ok(entries)
}

fn open_sled(path: &Path) -> Result<sled::Db, CacheError> {
    let config = sled::Config::new().path(path);
    let mut waited = Duration::ZERO;
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            // sled 0.34 reports a taken lock only as text (ErrorKind::Other).
            Err(sled::Error::Io(e))
                if waited < LOCK_WAIT && e.to_string().contains("could not acquire lock") =>
            {
                std::thread::sleep(LOCK_POLL);
                waited += LOCK_POLL;
            }
            Err(e) => return Err(sled_error(e)),
        }
    }
}

/// Gives `dir` and the files in it to the owner of `like` ([`daemon::fs::give_to_owner_of`]).
fn give_to_owner_of(dir: &Path, like: &Path) -> Result<(), CacheError> {
    let mut paths = vec![dir.to_owned()];
    for item in std::fs::read_dir(dir).map_err(io("read", dir))? {
        paths.push(item.map_err(io("read", dir))?.path());
    }
    for path in paths {
        daemon::fs::give_to_owner_of(&path, like).map_err(|e| CacheError::Io {
            op: e.op,
            path: e.path,
            source: e.source,
        })?;
    }
    Ok(())
}

fn remove_dir(path: &Path) -> Result<(), CacheError> {
    std::fs::remove_dir_all(path).map_err(io("remove", path))
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.to_owned();
    move |source| CacheError::Io { op, path, source }
}

/// sled's corruption report maps to [`CacheError::Corrupt`], so the caller marks the cache
/// bad; its own text for it prints a backtrace.
fn sled_error(error: sled::Error) -> CacheError {
    match error {
        sled::Error::Corruption { at, .. } => CacheError::Corrupt {
            key: SLED_DIR.to_owned(),
            reason: match at {
                Some(at) => format!("corrupted data at {at}"),
                None => "corrupted data".to_owned(),
            },
        },
        sled::Error::Io(e) => CacheError::Store(e.to_string()),
        other => CacheError::Store(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{COUNT_KEY, encode_count, encode_entry, encode_seq, entry_key};
    use crate::{Cache, CacheEntry, MasterRecord};

    fn entry(dn: &str) -> CacheEntry {
        CacheEntry {
            dn: dn.into(),
            attributes: vec![("cn".into(), vec![dn.as_bytes().to_vec()])],
            modules: vec!["m".into()],
        }
    }

    /// A cache directory as earlier versions left it after a crash: two entries, a retired
    /// index record and sequence number 1 in sled, and a commit 2 only in the commit log
    /// (adds a third entry, deletes the first, sets the master record).
    fn sled_cache(dir: &Path) {
        let old = dir.join(SLED_DIR);
        let db = sled::open(&old).unwrap();
        for dn in ["cn=a", "cn=b"] {
            db.insert(entry_key(dn), encode_entry(&entry(dn)).unwrap())
                .unwrap();
        }
        db.insert(COUNT_KEY, encode_count(2).unwrap()).unwrap();
        db.insert(SEQ_KEY, encode_seq(1)).unwrap();
        db.insert(b"u:uuid-a", b"\x01\x04cn=a".to_vec()).unwrap();
        db.flush().unwrap();
        drop(db);
        let mut wal = Wal::open(&old).unwrap();
        let mut writes = Writes::new();
        writes.insert(
            entry_key("cn=c"),
            Some(encode_entry(&entry("cn=c")).unwrap()),
        );
        writes.insert(entry_key("cn=a"), None);
        writes.insert(COUNT_KEY.to_vec(), Some(encode_count(2).unwrap()));
        let master = MasterRecord {
            notifier_id: 42,
            schema_id: 7,
        };
        writes.insert(
            crate::record::MASTER_KEY.to_vec(),
            Some(crate::record::encode_master(master).unwrap()),
        );
        writes.insert(SEQ_KEY.to_vec(), Some(encode_seq(2)));
        wal.append(2, &writes).unwrap();
    }

    fn assert_imported(cache: &Cache) {
        let dns: Vec<_> = cache.iter().map(|e| e.unwrap().dn).collect();
        assert_eq!(dns, ["cn=b", "cn=c"]);
        assert_eq!(cache.len(), 2);
        assert_eq!(
            cache.master().unwrap(),
            Some(MasterRecord {
                notifier_id: 42,
                schema_id: 7
            })
        );
    }

    #[test]
    fn an_earlier_versions_cache_is_imported_with_its_logged_commits() {
        let dir = tempfile::tempdir().unwrap();
        sled_cache(dir.path());
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.migrated(), Some(2));
        assert_imported(&cache);
        assert!(!dir.path().join(SLED_DIR).exists());
        assert!(!dir.path().join(IMPORT_DIR).exists());
        // Commits go on from the imported state, and the next open imports nothing.
        let mut batch = cache.batch();
        batch.put(&entry("cn=d"));
        cache.commit(batch, false).unwrap();
        drop(cache);
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.migrated(), None);
        assert_eq!(cache.len(), 3);
        assert!(cache.get("cn=d").unwrap().is_some());
    }

    /// A partial copy that never took effect, as a crash during step 1 leaves it.
    fn partial_import(dir: &Path) {
        let import = dir.join(IMPORT_DIR);
        std::fs::create_dir(&import).unwrap();
        let partial = Store::open(&import).unwrap();
        let mut writes = Writes::new();
        writes.insert(
            entry_key("cn=zombie"),
            Some(encode_entry(&entry("cn=zombie")).unwrap()),
        );
        partial.apply(&writes).unwrap();
    }

    #[test]
    fn an_import_cut_short_during_the_copy_is_done_again() {
        let dir = tempfile::tempdir().unwrap();
        sled_cache(dir.path());
        partial_import(dir.path());
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.migrated(), Some(2));
        assert_imported(&cache);
    }

    #[test]
    fn an_import_cut_short_after_setting_the_old_database_aside_is_done_again() {
        let dir = tempfile::tempdir().unwrap();
        sled_cache(dir.path());
        partial_import(dir.path());
        std::fs::rename(dir.path().join(SLED_DIR), dir.path().join(IMPORTED_DIR)).unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.migrated(), Some(2));
        assert_imported(&cache);
        assert!(!dir.path().join(IMPORTED_DIR).exists());
    }

    #[test]
    fn an_import_that_took_effect_is_not_repeated() {
        let dir = tempfile::tempdir().unwrap();
        sled_cache(dir.path());
        drop(Cache::open(dir.path()).unwrap());
        // What a crash between step 3 and 4 leaves: the set-aside old database.
        sled_cache(&dir.path().join("stale"));
        std::fs::rename(
            dir.path().join("stale").join(SLED_DIR),
            dir.path().join(IMPORTED_DIR),
        )
        .unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.migrated(), None);
        assert!(!dir.path().join(IMPORTED_DIR).exists());
        assert_imported(&cache);
    }

    /// An old database beside the current one is no leftover of an import: the open
    /// refuses to guess and removes neither.
    #[test]
    fn an_old_database_beside_the_current_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        sled_cache(dir.path());
        drop(Cache::open(dir.path()).unwrap());
        sled_cache(dir.path());
        let err = Cache::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("move away"), "{err}");
        assert!(dir.path().join(SLED_DIR).exists());
        std::fs::remove_dir_all(dir.path().join(SLED_DIR)).unwrap();
        assert_imported(&Cache::open(dir.path()).unwrap());
    }

    #[test]
    fn a_corrupt_earlier_database_is_reported_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(SLED_DIR);
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("conf"), b"\xff\xff not a sled config").unwrap();
        std::fs::write(old.join("db"), b"\xff\xff\xff\xff garbage").unwrap();
        let err = Cache::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, CacheError::Corrupt { .. } | CacheError::Store(_)),
            "{err}"
        );
        assert!(
            old.join("db").exists(),
            "the old database stays for inspection"
        );
        assert!(!dir.path().join(DB_DIR).exists());
    }
}
