//! The storage engine: one LMDB environment (heed) holding one unnamed key/value table. The
//! only module that knows LMDB.
//!
//! - **Atomic sets.** [`Store::apply`] writes a whole set of key writes in one LMDB write
//!   transaction: a crash (of the process or the machine) leaves all of it or none.
//! - **Durability.** The environment is opened with `MDB_NOMETASYNC`: every write
//!   transaction syncs its data pages, the meta page that makes it current waits for the
//!   next transaction or [`Store::sync`]. A power loss can undo the last transaction, never
//!   corrupt the file (LMDB keeps the previous snapshot's pages until a later meta page is
//!   on disk). The commit log in front of the store ([`crate::wal`]) replays what was undone.
//! - **One owner.** LMDB lets several processes share an environment, but the cache keeps
//!   commits in memory before they reach the store, so a second user would read stale
//!   state or write behind the first one's back. The directory is therefore locked
//!   (`flock`) for as long as the store is open, by this and any other process.
//! - **Mapped pages.** LMDB reads through a shared read-only map of `data.mdb`. On each
//!   page fault the kernel maps up to 64 KiB of neighbouring pages that are in the page
//!   cache (fault-around, which `MDB_NORDAHEAD` does not stop), so random lookups soon have
//!   the whole file in the listener's RSS, counted as its memory though it is page cache.
//!   [`Store::release_mapped_pages`] drops the mappings (not the cached pages) at each
//!   flush, so RSS shows what the process uses, not the size of the cache.
//! - **Long keys.** LMDB keys are at most 511 bytes. A longer key (a DN of ~500 bytes) is
//!   stored as its first [`KEPT`] bytes, the byte 0xFF (which no UTF-8 key contains) and the
//!   first 16 bytes of its SHA-256: stored keys of different keys differ, short keys are
//!   stored as they are. [`Store`] maps keys on the way in ([`stored_key`]); scans return
//!   stored keys, and the entry records carry their DN, which gives the key back.

use std::borrow::Cow;
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};

use heed::types::Bytes;
use heed::{Database, Env, EnvFlags, EnvOpenOptions, MdbError, WithoutTls};
use sha2::{Digest as _, Sha256};

use crate::CacheError;
use crate::wal::Writes;

/// LMDB's key size limit with its default build (`mdb_env_get_maxkeysize`).
const MAX_KEY: usize = 511;
/// Bytes of a long key kept in front of its hash (see the module documentation).
pub(crate) const KEPT: usize = 480;
const HASH_MARK: u8 = 0xff;
const HASH_BYTES: usize = 16;

/// Address space reserved for the database file. LMDB maps the whole file and cannot grow
/// past this without reopening; reserving costs no memory (only pages read or written are
/// resident) and a cache of this size would hold hundreds of millions of entries.
const MAP_SIZE: usize = if usize::BITS >= 64 {
    (usize::MAX >> 24) + 1 // 1 TiB
} else {
    1 << 30
};
/// Smaller reservations tried in turn when the address space is limited (`ulimit -v`,
/// systemd's `LimitAS=`): 64 GiB, then 8 GiB on 64-bit.
const FALLBACK_MAP_SIZES: [usize; 2] = [MAP_SIZE >> 4, MAP_SIZE >> 7];

/// The key `key` is stored under.
pub(crate) fn stored_key(key: &[u8]) -> Cow<'_, [u8]> {
    if key.len() <= MAX_KEY {
        return Cow::Borrowed(key);
    }
    let mut stored = Vec::with_capacity(KEPT + 1 + HASH_BYTES);
    stored.extend_from_slice(&key[..KEPT]);
    stored.push(HASH_MARK);
    stored.extend_from_slice(&Sha256::digest(key)[..HASH_BYTES]);
    Cow::Owned(stored)
}

/// Whether `stored` is the stored form of a longer key, whose text it does not hold.
pub(crate) fn is_hashed(stored: &[u8]) -> bool {
    stored.len() == KEPT + 1 + HASH_BYTES && stored[KEPT] == HASH_MARK
}

/// A stored key and its value, copied out of the store.
pub(crate) type Record = (Vec<u8>, Vec<u8>);

/// An open LMDB environment, locked for this process.
pub(crate) struct Store {
    env: Env<WithoutTls>,
    table: Database<Bytes, Bytes>,
    path: PathBuf,
    /// Address and length of LMDB's map of `data.mdb`, if found.
    map: Option<(usize, usize)>,
    /// Holds the directory's `flock` until the store is dropped (after `env`).
    _lock: File,
}

impl Store {
    /// Opens or creates the environment in the existing directory `path`.
    pub(crate) fn open(path: &Path) -> Result<Store, CacheError> {
        let lock = File::open(path).map_err(|source| CacheError::Io {
            op: "open",
            path: path.to_owned(),
            source,
        })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(CacheError::Store(format!(
                    "{} is in use: another listener, tool or cache handle has it open",
                    path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(CacheError::Io {
                    op: "lock",
                    path: path.to_owned(),
                    source,
                });
            }
        }
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options.max_dbs(0);
        // SAFETY: NO_META_SYNC keeps the file consistent (see the module documentation).
        unsafe {
            options.flags(EnvFlags::NO_META_SYNC);
        }
        let mut sizes = std::iter::once(MAP_SIZE)
            .chain(FALLBACK_MAP_SIZES)
            .peekable();
        let env = loop {
            let Some(size) = sizes.next() else {
                unreachable!("the sizes end only after an error returned");
            };
            options.map_size(size);
            // SAFETY: the directory lock above keeps every other process and handle out of
            // the files LMDB maps, which is what `open` requires.
            match unsafe { options.open(path) } {
                Ok(env) => break env,
                Err(heed::Error::Io(e))
                    if e.raw_os_error() == Some(libc::ENOMEM) && sizes.peek().is_some() => {}
                Err(e) => return Err(store_error(e)),
            }
        };
        // Reader slots of a process that died with a read transaction open.
        env.clear_stale_readers().map_err(store_error)?;
        let mut txn = env.write_txn().map_err(store_error)?;
        let table = env
            .create_database::<Bytes, Bytes>(&mut txn, None)
            .map_err(store_error)?;
        txn.commit().map_err(store_error)?;
        let map = find_map(&path.join("data.mdb"));
        Ok(Store {
            env,
            table,
            path: path.to_owned(),
            map,
            _lock: lock,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The value stored under `key`.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CacheError> {
        let txn = self.env.read_txn().map_err(store_error)?;
        let value = self
            .table
            .get(&txn, &stored_key(key))
            .map_err(store_error)?;
        Ok(value.map(<[u8]>::to_vec))
    }

    /// Writes `writes` in one transaction.
    pub(crate) fn apply(&self, writes: &Writes) -> Result<(), CacheError> {
        self.apply_all(writes.iter().map(|(k, v)| (k.as_slice(), v.as_deref())))
    }

    /// Writes the pairs in one transaction (`None` removes the key).
    pub(crate) fn apply_all<'a>(
        &self,
        writes: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) -> Result<(), CacheError> {
        let mut txn = self.env.write_txn().map_err(store_error)?;
        for (key, value) in writes {
            let key = stored_key(key);
            match value {
                Some(value) => self.table.put(&mut txn, &key, value),
                None => self.table.delete(&mut txn, &key).map(drop),
            }
            .map_err(store_error)?;
        }
        txn.commit().map_err(store_error)
    }

    /// Makes every transaction so far durable (the meta page included).
    pub(crate) fn sync(&self) -> Result<(), CacheError> {
        self.env.force_sync().map_err(store_error)
    }

    /// Calls `visit` with the stored key and value of every record whose stored key starts
    /// with `prefix` and comes after `after`, in key order, in one read transaction, until
    /// `visit` returns `false`.
    pub(crate) fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        mut visit: impl FnMut(&[u8], &[u8]) -> Result<bool, CacheError>,
    ) -> Result<(), CacheError> {
        let txn = self.env.read_txn().map_err(store_error)?;
        let from = after.unwrap_or(prefix);
        // LMDB refuses an empty key, also as a range bound.
        let start = if from.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Included(from)
        };
        let range = (start, Bound::Unbounded::<&[u8]>);
        for item in self.table.range(&txn, &range).map_err(store_error)? {
            let (key, value) = item.map_err(store_error)?;
            if after.is_some_and(|after| key == after) {
                continue;
            }
            if !key.starts_with(prefix) || !visit(key, value)? {
                break;
            }
        }
        Ok(())
    }

    /// Calls `visit` with every record whose stored key starts with `prefix`, in key order,
    /// in a new read transaction every `chunk` records: a long read transaction keeps LMDB
    /// from reusing the pages that writes meanwhile free.
    pub(crate) fn scan_in_chunks(
        &self,
        prefix: &[u8],
        chunk: usize,
        mut visit: impl FnMut(&[u8], &[u8]) -> Result<(), CacheError>,
    ) -> Result<(), CacheError> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let mut seen = 0;
            let mut last = None;
            self.scan(prefix, after.as_deref(), |key, value| {
                visit(key, value)?;
                seen += 1;
                if seen < chunk {
                    return Ok(true);
                }
                last = Some(key.to_vec());
                Ok(false)
            })?;
            match last {
                Some(last) => after = Some(last),
                None => return Ok(()),
            }
        }
    }

    /// Up to `limit` records after `after` (see [`Store::scan`]), copied out: for scans that
    /// hand records to their caller one at a time without holding a transaction open.
    pub(crate) fn chunk(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Record>, CacheError> {
        let mut records = Vec::new();
        self.scan(prefix, after, |key, value| {
            records.push((key.to_vec(), value.to_vec()));
            Ok(records.len() < limit)
        })?;
        Ok(records)
    }

    /// Unmaps the pages of the database file this process has mapped; the next read maps
    /// them again from the page cache.
    pub(crate) fn release_mapped_pages(&self) {
        if let Some((addr, len)) = self.map {
            // SAFETY: the range is LMDB's shared, read-only map of the file, which stays
            // mapped as long as `env` lives. MADV_DONTNEED on a shared file mapping only
            // drops page table entries: a later access reads the same bytes from the page
            // cache, also for a reader that holds a slice into the map meanwhile.
            unsafe {
                libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED);
            }
        }
    }

    /// Bytes used by the database file.
    pub(crate) fn size_on_disk(&self) -> Result<u64, CacheError> {
        self.env.real_disk_size().map_err(store_error)
    }
}

/// The address range of this process's map of `data_file`, read from `/proc/self/maps`.
fn find_map(data_file: &Path) -> Option<(usize, usize)> {
    let data_file = data_file.canonicalize().ok()?;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        // start-end perms offset dev inode path
        let mut fields = line.splitn(6, ' ');
        let range = fields.next()?;
        let perms = fields.next()?;
        let path = fields.nth(3)?.trim_start();
        if !perms.ends_with('s') || Path::new(path) != data_file {
            return None;
        }
        let (start, end) = range.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        Some((start, end.checked_sub(start)?))
    })
}

/// heed errors become text so that no heed type leaks into the API; LMDB's corruption
/// reports map to [`CacheError::Corrupt`] so the caller marks the cache bad.
fn store_error(error: heed::Error) -> CacheError {
    match error {
        // Not MDB_PANIC (an earlier I/O error, the file intact) nor MDB_VERSION_MISMATCH
        // (often the lock file only): rebuilding the cache would not be the cure.
        heed::Error::Mdb(
            e @ (MdbError::Corrupted | MdbError::PageNotFound | MdbError::Invalid),
        ) => CacheError::Corrupt {
            key: crate::DB_DIR.to_owned(),
            reason: e.to_string(),
        },
        other => CacheError::Store(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_stored_as_they_are() {
        let key = vec![b'k'; MAX_KEY];
        assert_eq!(stored_key(&key).as_ref(), key.as_slice());
        assert!(!is_hashed(&key));
    }

    #[test]
    fn long_keys_keep_a_prefix_and_differ_by_their_hash() {
        let a = [vec![b'a'; 600], b"x".to_vec()].concat();
        let b = [vec![b'a'; 600], b"y".to_vec()].concat();
        let (sa, sb) = (stored_key(&a).into_owned(), stored_key(&b).into_owned());
        assert_ne!(sa, sb);
        assert!(sa.len() <= MAX_KEY);
        assert_eq!(&sa[..KEPT], &a[..KEPT]);
        assert!(is_hashed(&sa) && is_hashed(&sb));
        // A stored key maps to itself, so keys read back by a scan can be written again.
        assert_eq!(stored_key(&sa).as_ref(), sa.as_slice());
    }

    #[test]
    fn long_keys_are_written_read_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let long = vec![b'e'; 2000];
        let mut writes = Writes::new();
        writes.insert(long.clone(), Some(b"value".to_vec()));
        writes.insert(b"short".to_vec(), Some(b"other".to_vec()));
        store.apply(&writes).unwrap();
        assert_eq!(store.get(&long).unwrap().as_deref(), Some(&b"value"[..]));
        let mut seen = Vec::new();
        store
            .scan(b"", None, |key, _| {
                seen.push(is_hashed(key));
                Ok(true)
            })
            .unwrap();
        assert_eq!(seen, [true, false]);
        writes.clear();
        writes.insert(long.clone(), None);
        store.apply(&writes).unwrap();
        assert_eq!(store.get(&long).unwrap(), None);
    }

    #[test]
    fn scans_resume_after_a_key_and_stop_at_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let writes: Writes = ["a", "e:1", "e:2", "e:3", "f"]
            .iter()
            .map(|k| (k.as_bytes().to_vec(), Some(k.as_bytes().to_vec())))
            .collect();
        store.apply(&writes).unwrap();
        let keys = |after: Option<&[u8]>, limit| {
            store
                .chunk(b"e:", after, limit)
                .unwrap()
                .into_iter()
                .map(|(k, _)| String::from_utf8(k).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(None, 10), ["e:1", "e:2", "e:3"]);
        assert_eq!(keys(None, 2), ["e:1", "e:2"]);
        assert_eq!(keys(Some(b"e:2"), 10), ["e:3"]);
        assert_eq!(keys(Some(b"e:3"), 10), Vec::<String>::new());
    }

    fn rss_file_kb() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("RssFile:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn mapped_pages_are_released_and_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.map.is_some(), "the map of data.mdb is found");
        let writes: Writes = (0..4000u32)
            .map(|i| (format!("k{i:05}").into_bytes(), Some(vec![i as u8; 2000])))
            .collect();
        store.apply(&writes).unwrap();
        let read_all = || {
            for (key, value) in &writes {
                assert_eq!(store.get(key).unwrap().as_ref(), value.as_ref());
            }
        };
        read_all();
        let mapped = rss_file_kb();
        store.release_mapped_pages();
        // About 8 MB were mapped; other tests' threads may map files meanwhile.
        assert!(
            rss_file_kb() + 4000 < mapped,
            "{} → {}",
            mapped,
            rss_file_kb()
        );
        read_all();
    }

    const LIMITED_CHILD: &str = "CACHE_KV_LIMITED_CHILD";

    /// Under an address space limit (`ulimit -v`) that the 1 TiB map exceeds, the store
    /// opens with a smaller one. Run in a child process, which the limit would otherwise
    /// affect as a whole.
    #[test]
    fn opens_under_an_address_space_limit() {
        let name = "kv::tests::opens_under_an_address_space_limit";
        if let Ok(dir) = std::env::var(LIMITED_CHILD) {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let vm_kb: u64 = status
                .lines()
                .find(|l| l.starts_with("VmSize:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .unwrap()
                .parse()
                .unwrap();
            // Room for 8 GiB more, not for 64 GiB.
            let limit = vm_kb * 1024 + (32 << 30);
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: setrlimit only reads the struct passed.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rlimit) }, 0);
            let store = Store::open(Path::new(&dir)).unwrap();
            let mut writes = Writes::new();
            writes.insert(b"k".to_vec(), Some(b"v".to_vec()));
            store.apply(&writes).unwrap();
            assert_eq!(store.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--nocapture"])
            .env(LIMITED_CHILD, dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the child ran the test: {text}");
    }

    #[test]
    fn a_second_open_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("is in use"), "{err}");
        drop(first);
        Store::open(dir.path()).unwrap();
    }
}
