//! The sled-backed store: [`Cache`] and its write unit [`Batch`].
//!
//! Everything lives in sled's default tree under the key prefixes of [`crate::record`], so
//! one `sled::Batch` covers entries, the entry count and the master record: a crash leaves
//! either all of a commit or none of it (DESIGN.md decision 4).
//! Every commit is first appended to the commit log ([`crate::wal`]), so a process crash
//! loses no commit that returned, without an fsync per commit.
//!
//! Since the log already holds every commit since the last flush, sled need not see each
//! one: commits collect in memory ([`Pending`], read before sled) and reach sled together,
//! at a flush or when too many collected. Measured with sled 0.34.7, a commit of one user
//! entry applied to sled on its own cost ~85 µs of CPU and ~10 KB written (its fragments
//! and page rewrites, the master record and sequence number rewritten every time); a key
//! written by many commits between two flushes is now written to sled once.
//!
//! When enough has collected, the writes go to sled on a thread of their own ([`Applier`])
//! while commits go on collecting the next set; at most one set is on its way at a time
//! (the next commit to fill up waits for it), so memory stays bounded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::CacheError;
use crate::entry::{CacheEntry, MasterRecord};
use crate::files::{bad_cache_path, bad_cache_reason, is_marked_bad};
use crate::record::{
    COUNT_KEY, ENTRY_PREFIX, MASTER_KEY, SEQ_KEY, UUID_PREFIX, decode_count, decode_entry,
    decode_master, decode_seq, encode_count, encode_entry, encode_master, encode_seq, entry_key,
    key_text,
};
use crate::wal::{Wal, Writes};
use ldap::dn::dn_key;

/// Name of the sled database directory inside the cache directory.
pub const DB_DIR: &str = "cache.sled";

/// sled's page cache. Its default (1 GiB) would dominate the listener's memory; the working
/// set of the change engine is the few entries of the current transactions, and a full scan
/// (dump, module initialisation) is sequential, so a small cache costs little speed.
///
/// Caveat, measured with sled 0.34.7: pages brought in by *reads* are not held to this
/// bound. Reading every entry of a 100k-entry cache (75 MB of records) leaves about 80-95 MB
/// resident even with an 8 MiB capacity; writes stay near the bound. Hence no scan on open.
const PAGE_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// Entries changed per commit by [`Cache::remove_module_everywhere`], bounding the memory of
/// one sled batch on large caches.
const REMOVE_MODULE_CHUNK: usize = 1000;

/// Writes per sled batch when a commit is applied. sled 0.34 holds about 5 KB per
/// operation of a batch until the batch is applied: measured, re-keying 20,000 entries of
/// ~1 KB (40,000 writes) grew the RSS by 196 MB in one sled batch and by 7 MB in batches
/// of 1,000. See [`Cache::write`] for why the commit stays atomic.
const APPLY_CHUNK: usize = 1000;

/// Collected commits are applied to sled before they hold more keys or bytes than this,
/// bounding the memory of [`Pending`] when nobody flushes (a long module initialisation).
/// At 8,192 keys / 16 MiB `-i` over 100,000 entries peaked at 110 MB (sled's pages on top
/// of the collected writes); catch-up gains nothing beyond a few thousand keys.
const PENDING_KEYS: usize = 2048;
const PENDING_BYTES: usize = 4 * 1024 * 1024;

/// Failpoint ([`daemon::failpoint`]) that fails the applier's next set.
pub const APPLY_FAILPOINT: &str = "cache-apply";
/// Failpoint that makes the applier panic on its next set, as the storage engine might.
pub const APPLY_PANIC_FAILPOINT: &str = "cache-apply-panic";

/// [`APPLY_PANIC_FAILPOINT`]: failpoints fire in debug builds only.
fn panic_failpoint() -> Result<(), CacheError> {
    if daemon::failpoint::check(APPLY_PANIC_FAILPOINT).is_err() {
        #[allow(clippy::panic)]
        {
            panic!("failpoint {APPLY_PANIC_FAILPOINT}");
        }
    }
    Ok(())
}

/// Records per sled batch while [`Cache::export_to`] copies, bounding its memory.
const EXPORT_CHUNK: usize = 1000;

/// How long [`Cache::open`] waits for sled's file lock. sled releases the lock of a dropped
/// database only when its I/O threads let go of the file, a moment after the drop, so a
/// reopen in the same process can briefly find it taken.
const LOCK_WAIT: Duration = Duration::from_secs(1);
const LOCK_POLL: Duration = Duration::from_millis(10);

/// Databases open in this process. sled's lock cannot tell a second open in this process
/// from the delayed release described at [`LOCK_WAIT`], so this set does.
static OPEN_DIRS: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Removes its path from [`OPEN_DIRS`] when dropped.
struct OpenGuard(PathBuf);

impl OpenGuard {
    fn claim(path: &Path) -> Result<OpenGuard, CacheError> {
        let key = path.canonicalize().map_err(|source| CacheError::Io {
            op: "resolve",
            path: path.to_owned(),
            source,
        })?;
        let mut open = OPEN_DIRS.lock().unwrap_or_else(PoisonError::into_inner);
        if !open.insert(key.clone()) {
            return Err(CacheError::Store(format!(
                "{} is already open in this process",
                path.display()
            )));
        }
        Ok(OpenGuard(key))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let mut open = OPEN_DIRS.lock().unwrap_or_else(PoisonError::into_inner);
        open.remove(&self.0);
    }
}

/// The listener cache in `<dir>/cache.sled`.
///
/// Reads may happen from any thread at any time. Commits are serialised internally, because a
/// commit reads whether the records it writes exist, to keep the entry count exact.
pub struct Cache {
    db: sled::Db,
    path: PathBuf,
    /// The commit log; held while a commit computes, logs and applies its changes.
    writer: Mutex<Wal>,
    /// Writes of logged commits not yet applied to sled; changed only under `writer`, and
    /// by the applier when it is done with a set.
    pending: Arc<Shared>,
    /// The thread applying a full set of collected writes to sled.
    applier: Option<Applier>,
    /// Number of entries (`e:` keys), also stored under `n` by every commit that changes it:
    /// sled only counts by scanning, and a scan makes sled 0.34 keep every page it read in
    /// memory, whatever its cache capacity.
    entries: AtomicUsize,
    /// Commits replayed from the commit log at open (lost by sled in a crash).
    recovered: usize,
    // Dropped after `db`.
    _guard: OpenGuard,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("path", &self.path)
            .field("entries", &self.len())
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// Opens or creates `<dir>/cache.sled`, creating `dir` (mode 0700) if needed. Refuses with
    /// [`CacheError::BadCache`] while `<dir>/bad_cache` exists.
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        if is_marked_bad(dir) {
            return Err(CacheError::BadCache {
                path: bad_cache_path(dir),
                reason: bad_cache_reason(dir),
            });
        }
        create_private_dir(dir)?;
        let path = dir.join(DB_DIR);
        // Created here rather than by sled so that it is private too: the cache holds
        // password hashes and other secrets of every replicated object.
        create_private_dir(&path)?;
        let guard = OpenGuard::claim(&path)?;
        let db = open_db(&path)?;
        let mut wal = Wal::open(&path).map_err(|source| CacheError::Io {
            op: "open",
            path: path.join(crate::wal::WAL_FILE),
            source,
        })?;
        let recovered = recover(&db, &mut wal)?;
        drop_retired_index(&db)?;
        let entries = stored_count(&db)?;
        let pending = Arc::new(Shared::default());
        let applier =
            Applier::start(db.clone(), Arc::clone(&pending)).map_err(|source| CacheError::Io {
                op: "start the applier thread for",
                path: path.clone(),
                source,
            })?;
        Ok(Cache {
            db,
            path,
            writer: Mutex::new(wal),
            pending,
            applier: Some(applier),
            entries: AtomicUsize::new(entries),
            recovered,
            _guard: guard,
        })
    }

    /// Commits a crash had left only in the commit log, replayed when the cache was opened.
    pub fn recovered(&self) -> usize {
        self.recovered
    }

    /// The entry cached for `dn` (compared by [`dn_key`]).
    pub fn get(&self, dn: &str) -> Result<Option<CacheEntry>, CacheError> {
        self.get_by_key(&dn_key(dn))
    }

    /// The master record; `None` on a fresh cache.
    pub fn master(&self) -> Result<Option<MasterRecord>, CacheError> {
        match self.read(MASTER_KEY)? {
            None => Ok(None),
            Some(value) => decode_master(&value).map(Some),
        }
    }

    /// An empty batch; fill it and hand it to [`Cache::commit`].
    pub fn batch(&self) -> Batch {
        Batch::default()
    }

    /// Applies `batch` atomically: its entries and the master record become visible together
    /// and survive a crash together. Once it returns, the commit survives a crash of the
    /// process (it is in the commit log); with `durable` it is also flushed (fsync) and
    /// survives a power loss, otherwise that takes the next [`flush`] (or sled's background
    /// flush), which allows group commit.
    ///
    /// [`flush`]: Cache::flush
    pub fn commit(&self, batch: Batch, durable: bool) -> Result<(), CacheError> {
        let mut writer = self.lock_writer();
        self.apply(&mut writer, batch)?;
        drop(writer);
        if durable {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes every commit so far durable and empties the commit log.
    pub fn flush(&self) -> Result<(), CacheError> {
        // Under the writer lock: a commit logged after sled's flush began must stay in the
        // log until the next flush.
        let mut wal = self.lock_writer();
        self.apply_pending()?;
        self.db.flush().map_err(store_error)?;
        wal.truncate().map_err(|source| CacheError::Io {
            op: "truncate",
            path: wal.path().to_owned(),
            source,
        })
    }

    /// All entries in key ([`dn_key`]) order. An undecodable record yields an error item and
    /// iteration continues with the next one. The scan reads sled as it goes: a large commit
    /// that another thread makes meanwhile can show in part (the listener commits on the
    /// thread that scans).
    pub fn iter(&self) -> impl Iterator<Item = Result<CacheEntry, CacheError>> + '_ {
        // Scans read sled alone: the collected commits go there first.
        let applied = {
            let _writer = self.lock_writer();
            self.apply_pending()
        };
        applied
            .err()
            .map(Err)
            .into_iter()
            .chain(self.db.scan_prefix(ENTRY_PREFIX).map(|item| {
                let (key, value) = item.map_err(store_error)?;
                decode_entry(&key, &value)
            }))
    }

    /// The cache keys ([`dn_key`]) of every entry below `dn`, parents before their
    /// children. Keys sort by the whole DN, so a subtree is no key range: this streams over
    /// the entry keys and decodes none of the records; only the matching keys are kept.
    /// Callers run it only for entries that can have children.
    pub fn descendant_keys(&self, dn: &str) -> Result<Vec<String>, CacheError> {
        {
            let _writer = self.lock_writer();
            self.apply_pending()?;
        }
        let mut keys = Vec::new();
        for raw_key in self.db.scan_prefix(ENTRY_PREFIX).keys() {
            let raw_key = raw_key.map_err(store_error)?;
            let key = stored_dn_key(&raw_key)?;
            if ldap::dn::is_below(&key, dn) {
                keys.push(key);
            }
        }
        keys.sort_by_cached_key(|key| ldap::dn::depth(key));
        Ok(keys)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes `module` from every entry and deletes the entries whose module list is then
    /// empty, including entries no module had handled (spec listener.md §3.9 step 2).
    /// Returns how many entries were changed or deleted. Commits in chunks and flushes at the
    /// end; repeating it after a crash finishes the job.
    pub fn remove_module_everywhere(&self, module: &str) -> Result<usize, CacheError> {
        let mut writer = self.lock_writer();
        self.apply_pending()?;
        let mut changed = 0;
        let mut batch = Batch::default();
        for item in self.db.scan_prefix(ENTRY_PREFIX) {
            let (raw_key, value) = item.map_err(store_error)?;
            let mut entry = decode_entry(&raw_key, &value)?;
            let key = stored_dn_key(&raw_key)?;
            let had = entry.has_module(module);
            entry.remove_module(module);
            if entry.modules.is_empty() {
                batch.ops.push(Op::Delete { key });
            } else if had {
                batch.push_put(key, &entry, false);
            } else {
                continue;
            }
            changed += 1;
            if batch.len() >= REMOVE_MODULE_CHUNK {
                self.apply(&mut writer, std::mem::take(&mut batch))?;
            }
        }
        self.apply(&mut writer, batch)?;
        drop(writer);
        self.flush()?;
        Ok(changed)
    }

    /// Deletes all entries and the master record in one atomic batch, then
    /// flushes: the cache is as fresh, so a crash cannot leave an id without its entries.
    pub fn clear(&self) -> Result<(), CacheError> {
        let mut writer = self.lock_writer();
        self.apply_pending()?;
        let mut writes = Writes::new();
        for key in self.db.iter().keys() {
            writes.insert(key.map_err(store_error)?.to_vec(), None);
        }
        writes.insert(
            COUNT_KEY.to_vec(),
            Some(encode_count(0).map_err(CacheError::Store)?),
        );
        self.write(&mut writer, writes)?;
        self.entries.store(0, Ordering::Relaxed);
        drop(writer);
        self.flush()
    }

    /// Writes a consistent copy of the database into the cache directory `dir`, which must
    /// be missing or empty (`<dir>/cache.sled`, mode 0700), and flushes it; returns what it
    /// holds.
    ///
    /// It holds the state after some commit and never part of one, and the master record in
    /// it matches its entries; commits go on meanwhile. The records are copied without the
    /// writer lock while every commit made meanwhile is also recorded; at the end, briefly
    /// under the lock, those commits are applied to the copy in order, which sets every key
    /// they touched to its value after the last of them (the keys they did not touch never
    /// changed during the copy). This is how tools and backups read the cache while the
    /// listener runs: sled's file lock keeps a second process from opening the original.
    pub fn export_to(&self, dir: &Path) -> Result<Exported, CacheError> {
        // Checked and opened before taking the writer lock, so commits wait for the copy only.
        match std::fs::read_dir(dir) {
            Ok(mut listing) => {
                if listing.next().is_some() {
                    return Err(CacheError::Store(format!(
                        "cannot export into {}: it is not empty",
                        dir.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CacheError::Io {
                    op: "read",
                    path: dir.to_owned(),
                    source,
                });
            }
        }
        let copy = Cache::open(dir)?;
        {
            // The copy reads sled: everything committed so far goes there first.
            let mut writer = self.lock_writer();
            self.apply_pending()?;
            writer.start_recording();
        }
        let copied = self.copy_records(&copy);
        let mut writer = self.lock_writer();
        let meanwhile = writer.stop_recording();
        copied?;
        for writes in meanwhile {
            copy.db.apply_batch(to_batch(writes)).map_err(store_error)?;
        }
        let exported = Exported {
            entries: self.len(),
            master: self.master()?,
        };
        drop(writer);
        copy.flush()?;
        Ok(exported)
    }

    /// Copies every record into `copy`, in chunks, without the writer lock.
    fn copy_records(&self, copy: &Cache) -> Result<(), CacheError> {
        let mut batch = sled::Batch::default();
        let mut pending = 0;
        for item in self.db.iter() {
            let (key, value) = item.map_err(store_error)?;
            batch.insert(key, value);
            pending += 1;
            if pending >= EXPORT_CHUNK {
                copy.db
                    .apply_batch(std::mem::take(&mut batch))
                    .map_err(store_error)?;
                pending = 0;
            }
        }
        copy.db.apply_batch(batch).map_err(store_error)
    }

    /// Bytes used by the database files.
    pub fn size_on_disk(&self) -> Result<u64, CacheError> {
        self.db.size_on_disk().map_err(store_error)
    }

    fn lock_writer(&self) -> MutexGuard<'_, Wal> {
        // The guarded state is sled's, which a panicking writer cannot leave half-applied.
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The stored value of `key`: a collected commit's write, else one on its way to sled,
    /// else sled's. The applier forgets a set only after sled has it, so a key that is in
    /// neither map is in sled.
    fn read(&self, key: &[u8]) -> Result<Option<sled::IVec>, CacheError> {
        {
            let pending = self.lock_pending();
            let write = pending.writes.get(key).or_else(|| {
                pending
                    .applying
                    .as_ref()
                    .and_then(|applying| applying.get(key))
            });
            if let Some(write) = write {
                return Ok(write.as_deref().map(sled::IVec::from));
            }
        }
        self.db.get(key).map_err(store_error)
    }

    fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock()
    }

    /// Applies the collected commits to sled, the sequence number with the last chunk (see
    /// [`Cache::write`]), then forgets them, after the set the applier may be applying. The
    /// caller holds the writer lock. Readers wait meanwhile, so none misses a write that is
    /// on its way into sled.
    fn apply_pending(&self) -> Result<(), CacheError> {
        let mut pending = self.pending.idle()?;
        if pending.writes.is_empty() {
            return Ok(());
        }
        apply_chunked(&self.db, &pending.writes)?;
        pending.writes = Writes::new();
        pending.bytes = 0;
        Ok(())
    }

    /// Hands the collected commits to the applier, once it is done with the previous set.
    /// The caller holds the writer lock.
    fn hand_off(&self) -> Result<(), CacheError> {
        let Some(applier) = &self.applier else {
            return self.apply_pending();
        };
        let set = {
            let mut pending = self.pending.idle()?;
            let set = Arc::new(std::mem::take(&mut pending.writes));
            pending.bytes = 0;
            pending.applying = Some(Arc::clone(&set));
            set
        };
        if applier.jobs.send(set).is_err() {
            // It ends only when the cache is dropped (a panic becomes a failed set); if it
            // did, its set stays readable and the commit log replays it at the next open.
            let reason = "the thread applying commits to the cache has ended".to_owned();
            self.lock_pending().failed = Some(reason.clone());
            self.pending.applied.notify_all();
            return Err(CacheError::Store(reason));
        }
        Ok(())
    }

    fn get_by_key(&self, key: &str) -> Result<Option<CacheEntry>, CacheError> {
        let key = entry_key(key);
        match self.read(&key)? {
            None => Ok(None),
            Some(value) => decode_entry(&key, &value).map(Some),
        }
    }

    /// Computes the writes of `batch` against the current records and applies them as one
    /// sled batch. The caller holds the writer lock, so the records read here are the ones
    /// being replaced.
    fn apply(&self, wal: &mut Wal, batch: Batch) -> Result<(), CacheError> {
        if let Some(reason) = batch.error {
            return Err(CacheError::Store(reason));
        }
        if batch.ops.is_empty() {
            return Ok(());
        }
        let mut plan = Plan::new(self);
        for op in batch.ops {
            plan.add(op)?;
        }
        let (mut writes, delta) = plan.finish();
        let entries = self.entries.load(Ordering::Relaxed);
        let entries = if delta >= 0 {
            entries.saturating_add(delta.unsigned_abs())
        } else {
            entries.saturating_sub(delta.unsigned_abs())
        };
        if delta != 0 {
            // In the same batch, so the stored count is exact after a crash too.
            let value = encode_count(entries as u64).map_err(CacheError::Store)?;
            writes.insert(COUNT_KEY.to_vec(), Some(value));
        }
        self.write(wal, writes)?;
        self.entries.store(entries, Ordering::Relaxed);
        Ok(())
    }

    /// Logs `writes` as the next commit, then collects them with its sequence number.
    ///
    /// A set reaches sled in chunks of [`APPLY_CHUNK`], the sequence number with the last
    /// one: a commit's atomicity then comes from the commit log, which holds the whole
    /// commit before anything is applied, so a crash between chunks leaves sled's sequence
    /// number below the commit's and the open replays all of it ([`recover`]).
    fn write(&self, wal: &mut Wal, mut writes: Writes) -> Result<(), CacheError> {
        let seq = wal.seq() + 1;
        writes.insert(SEQ_KEY.to_vec(), Some(encode_seq(seq)));
        let bytes: usize = writes
            .iter()
            .map(|(key, value)| key.len() + value.as_ref().map_or(0, Vec::len))
            .sum();
        // Refused before it is logged when the applier failed, and a commit that fills the
        // set waits for the applier's previous one first: so a commit that returns an error
        // was not logged, and the next open does not replay it.
        let fills = {
            let pending = self.lock_pending();
            if let Some(reason) = &pending.failed {
                return Err(CacheError::Store(reason.clone()));
            }
            pending.writes.len() + writes.len() >= PENDING_KEYS
                || pending.bytes + bytes >= PENDING_BYTES
        };
        if fills {
            drop(self.pending.idle()?);
        }
        wal.append(seq, &writes).map_err(|source| CacheError::Io {
            op: "append to",
            path: wal.path().to_owned(),
            source,
        })?;
        // A big commit (a subtree move, or a thousand objects of an initialisation) fills
        // the set at once and goes to the applier with it.
        let mut pending = self.lock_pending();
        pending.bytes += bytes;
        pending.writes.extend(writes);
        let full = pending.writes.len() >= PENDING_KEYS || pending.bytes >= PENDING_BYTES;
        drop(pending);
        if full { self.hand_off() } else { Ok(()) }
    }

    /// Writes raw bytes under a raw key, to plant corrupt records in tests.
    #[cfg(test)]
    pub(crate) fn put_raw(&self, key: &[u8], value: &[u8]) {
        let _writer = self.lock_writer();
        self.apply_pending().unwrap();
        let old = self.db.insert(key, value).unwrap();
        if key.starts_with(ENTRY_PREFIX) && old.is_none() {
            self.entries.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What [`Cache::export_to`] copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    pub entries: usize,
    /// `None` for a cache that never committed a master record.
    pub master: Option<MasterRecord>,
}

/// The writes of one transaction (or a group of them), applied by [`Cache::commit`].
///
/// Operations apply in the order they were added, so `put` then `delete` of the same DN
/// deletes it, and a rename can be written as `put(new)` + `delete(old)` in either order.
#[derive(Debug, Default)]
pub struct Batch {
    ops: Vec<Op>,
    /// The first entry that could not be encoded; reported by `commit`, which then writes
    /// nothing, so a batch is never applied partially.
    error: Option<String>,
}

#[derive(Debug)]
enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        /// Stored with [`Batch::put_new`]: the commit does not read the record it replaces.
        new: bool,
    },
    Delete {
        key: String,
    },
    SetMaster(MasterRecord),
}

impl Batch {
    /// Stores `entry` under [`dn_key`] of its DN, replacing what was there.
    pub fn put(&mut self, entry: &CacheEntry) {
        self.push_put(dn_key(&entry.dn), entry, false);
    }

    /// Like [`Batch::put`] for an entry the cache does not hold (outside this batch): the
    /// commit then skips the read a put costs (whether the record exists, for the count),
    /// which a bulk load into an empty cache would spend on every entry. If the cache did
    /// hold the DN after all, the stored entry count is one too high: the caller must know.
    pub fn put_new(&mut self, entry: &CacheEntry) {
        self.push_put(dn_key(&entry.dn), entry, true);
    }

    /// Deletes the entry cached for `dn`, if any.
    pub fn delete(&mut self, dn: &str) {
        self.ops.push(Op::Delete { key: dn_key(dn) });
    }

    /// Sets the master record (last notifier id and schema id).
    pub fn set_master(&mut self, master: MasterRecord) {
        self.ops.push(Op::SetMaster(master));
    }

    /// Number of operations added.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The entry this batch leaves under `dn`: `Some(None)` if it deletes it, `None` if the
    /// batch does not touch it. Searches backwards through the operations: meant for the
    /// rare read of an entry staged without a decoded copy, not for every read.
    pub fn staged(&self, dn: &str) -> Result<Option<Option<CacheEntry>>, CacheError> {
        let wanted = dn_key(dn);
        for op in self.ops.iter().rev() {
            match op {
                Op::Put { key, value, .. } if *key == wanted => {
                    return decode_entry(&entry_key(key), value).map(|e| Some(Some(e)));
                }
                Op::Delete { key } if *key == wanted => return Ok(Some(None)),
                _ => {}
            }
        }
        Ok(None)
    }

    fn push_put(&mut self, key: String, entry: &CacheEntry, new: bool) {
        // Encoded now, so the batch does not hold a second copy of the entry.
        match encode_entry(entry) {
            Ok(value) => self.ops.push(Op::Put { key, value, new }),
            Err(e) => {
                if self.error.is_none() {
                    self.error = Some(format!("cannot encode the entry {}: {e}", entry.dn));
                }
            }
        }
    }
}

/// Writes of commits that are in the commit log but not yet in sled: the final value per
/// key (`None` = removed), as after the last of them.
#[derive(Debug, Default)]
struct Pending {
    writes: Writes,
    /// Keys and values held, roughly.
    bytes: usize,
    /// The earlier set the applier is writing to sled (older than `writes`).
    applying: Option<Arc<Writes>>,
    /// Why the applier could not write its set; every later write fails with it (the
    /// commit log still holds the set: the next open replays it).
    failed: Option<String>,
}

/// [`Pending`] and the signal that the applier is done with its set.
#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Pending>,
    applied: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Only ever replaced or extended whole under the lock; a panic cannot half-change it.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lock, once the applier has no set on its way to sled.
    fn idle(&self) -> Result<MutexGuard<'_, Pending>, CacheError> {
        let mut pending = self.lock();
        loop {
            if let Some(reason) = &pending.failed {
                return Err(CacheError::Store(reason.clone()));
            }
            if pending.applying.is_none() {
                return Ok(pending);
            }
            pending = self
                .applied
                .wait(pending)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// The thread that applies full sets of collected writes to sled, in the order handed over.
struct Applier {
    jobs: SyncSender<Arc<Writes>>,
    thread: JoinHandle<()>,
}

impl Applier {
    fn start(db: sled::Db, shared: Arc<Shared>) -> std::io::Result<Applier> {
        let (jobs, queue) = sync_channel::<Arc<Writes>>(1);
        let thread = std::thread::Builder::new()
            .name("cache-apply".into())
            .spawn(move || {
                for set in queue {
                    // A panic (sled 0.34 asserts internally) must not end the thread with its
                    // set still marked as on its way: every later wait for it would hang.
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        daemon::failpoint::check(APPLY_FAILPOINT)
                            .map_err(|e| CacheError::Store(e.to_string()))
                            .and_then(|()| panic_failpoint())
                            .and_then(|()| apply_chunked(&db, &set))
                    }))
                    .unwrap_or_else(|panic| {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        Err(CacheError::Store(format!(
                            "the storage engine panicked: {what}"
                        )))
                    });
                    let mut pending = shared.lock();
                    match result {
                        Ok(()) => pending.applying = None,
                        // Kept in `applying`, so reads still find the writes.
                        Err(e) => {
                            let reason = match e {
                                CacheError::Store(reason) => reason,
                                other => other.to_string(),
                            };
                            pending.failed = Some(format!("cannot apply commits: {reason}"));
                        }
                    }
                    drop(pending);
                    shared.applied.notify_all();
                }
            })?;
        Ok(Applier { jobs, thread })
    }
}

impl Drop for Cache {
    /// Lets the applier finish its set and end before sled is closed.
    fn drop(&mut self) {
        if let Some(Applier { jobs, thread }) = self.applier.take() {
            drop(jobs);
            let _ = thread.join();
        }
    }
}

/// Turns a [`Batch`] into sled writes, tracking which entries the earlier operations of the
/// same batch leave behind, so that several operations on one DN compose correctly.
struct Plan<'a> {
    cache: &'a Cache,
    /// Whether the entry with this dn_key exists.
    entries: HashMap<String, bool>,
    /// Final value per key (`None` = remove). A BTreeMap keeps the sled batch deterministic.
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    delta: isize,
}

impl<'a> Plan<'a> {
    fn new(cache: &'a Cache) -> Plan<'a> {
        Plan {
            cache,
            entries: HashMap::new(),
            writes: BTreeMap::new(),
            delta: 0,
        }
    }

    fn add(&mut self, op: Op) -> Result<(), CacheError> {
        match op {
            Op::Put { key, value, new } => {
                let present = match self.entries.get(&key) {
                    None if new => false,
                    _ => self.exists(&key)?,
                };
                if !present {
                    self.delta += 1;
                }
                self.writes.insert(entry_key(&key), Some(value));
                self.entries.insert(key, true);
            }
            Op::Delete { key } => {
                if self.exists(&key)? {
                    self.delta -= 1;
                    self.writes.insert(entry_key(&key), None);
                    self.entries.insert(key, false);
                }
            }
            Op::SetMaster(master) => {
                let value = encode_master(master).map_err(CacheError::Store)?;
                self.writes.insert(MASTER_KEY.to_vec(), Some(value));
            }
        }
        Ok(())
    }

    fn finish(self) -> (Writes, isize) {
        (self.writes, self.delta)
    }

    fn exists(&mut self, key: &str) -> Result<bool, CacheError> {
        if let Some(&present) = self.entries.get(key) {
            return Ok(present);
        }
        let present = self.cache.read(&entry_key(key))?.is_some();
        self.entries.insert(key.to_owned(), present);
        Ok(present)
    }
}

/// Applies `writes` in sled batches of [`APPLY_CHUNK`], the sequence number with the last:
/// until that one is applied, sled's sequence number says the writes are still to be
/// replayed from the commit log.
fn apply_chunked(db: &sled::Db, writes: &Writes) -> Result<(), CacheError> {
    let mut chunk = sled::Batch::default();
    let mut in_chunk = 0;
    for (key, value) in writes.iter().filter(|(k, _)| k.as_slice() != SEQ_KEY) {
        match value {
            Some(value) => chunk.insert(key.as_slice(), value.as_slice()),
            None => chunk.remove(key.as_slice()),
        }
        in_chunk += 1;
        if in_chunk >= APPLY_CHUNK {
            db.apply_batch(std::mem::take(&mut chunk))
                .map_err(store_error)?;
            in_chunk = 0;
        }
    }
    match writes.get(SEQ_KEY) {
        Some(Some(value)) => chunk.insert(SEQ_KEY, value.as_slice()),
        Some(None) => chunk.remove(SEQ_KEY),
        None => {}
    }
    db.apply_batch(chunk).map_err(store_error)
}

/// The sled batch of `writes`.
fn to_batch(writes: Writes) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for (key, value) in writes {
        match value {
            Some(value) => batch.insert(key, value),
            None => batch.remove(key),
        }
    }
    batch
}

/// Replays the commits sled lost in a crash (sequence numbers above its own, without a
/// gap), makes them durable and empties the log; returns how many there were.
fn recover(db: &sled::Db, wal: &mut Wal) -> Result<usize, CacheError> {
    let mut seq = match db.get(SEQ_KEY).map_err(store_error)? {
        Some(value) => decode_seq(&value)?,
        None => 0,
    };
    let io = |op, wal: &Wal| {
        let path = wal.path().to_owned();
        move |source| CacheError::Io { op, path, source }
    };
    let records = wal.records().map_err(io("read", wal))?;
    let mut replayed = 0;
    // Merged in order, then applied in a few chunks with the sequence number last (as
    // `Cache::apply_pending`): the final value of every key, without one sled batch per
    // record (thousands of small batches at an open have stalled sled 0.34).
    let mut merged = Writes::new();
    for (record_seq, writes) in records {
        if record_seq <= seq {
            continue;
        }
        if record_seq != seq + 1 {
            break;
        }
        merged.extend(writes);
        seq = record_seq;
        replayed += 1;
    }
    if replayed > 0 {
        apply_chunked(db, &merged)?;
        db.flush().map_err(store_error)?;
    }
    wal.truncate().map_err(io("truncate", wal))?;
    wal.set_seq(seq);
    Ok(replayed)
}

/// Removes the entryUUID index records (`u:`) that caches written by earlier versions hold:
/// nothing reads them, and keeping them cost a write per entry. In chunks, so the removal
/// needs little memory; a crash in between leaves the rest for the next open.
fn drop_retired_index(db: &sled::Db) -> Result<(), CacheError> {
    let mut removed = 0;
    loop {
        let mut batch = sled::Batch::default();
        let mut keys = 0;
        for key in db.scan_prefix(UUID_PREFIX).keys().take(APPLY_CHUNK) {
            batch.remove(key.map_err(store_error)?);
            keys += 1;
        }
        if keys == 0 {
            break;
        }
        db.apply_batch(batch).map_err(store_error)?;
        removed += keys;
    }
    if removed > 0 {
        db.flush().map_err(store_error)?;
    }
    Ok(())
}

/// The stored entry count; recounted (a full scan) when the record is missing or unreadable,
/// which it can be because it is derived data.
fn stored_count(db: &sled::Db) -> Result<usize, CacheError> {
    if let Some(value) = db.get(COUNT_KEY).map_err(store_error)?
        && let Ok(count) = decode_count(&value)
        && let Ok(count) = usize::try_from(count)
    {
        return Ok(count);
    }
    let mut entries = 0;
    for key in db.scan_prefix(ENTRY_PREFIX).keys() {
        key.map_err(store_error)?;
        entries += 1;
    }
    Ok(entries)
}

fn open_db(path: &Path) -> Result<sled::Db, CacheError> {
    let config = sled::Config::new()
        .path(path)
        .cache_capacity(PAGE_CACHE_BYTES);
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
            Err(e) => return Err(store_error(e)),
        }
    }
}

/// The dn_key part of a stored entry key.
fn stored_dn_key(raw_key: &[u8]) -> Result<String, CacheError> {
    let rest = raw_key.strip_prefix(ENTRY_PREFIX).unwrap_or(raw_key);
    String::from_utf8(rest.to_vec()).map_err(|_| CacheError::Corrupt {
        key: key_text(raw_key),
        reason: "the key is not UTF-8".into(),
    })
}

fn create_private_dir(dir: &Path) -> Result<(), CacheError> {
    daemon::fs::create_private_dir(dir).map_err(|source| CacheError::Io {
        op: "create",
        path: dir.to_owned(),
        source,
    })
}

/// sled errors become text so that no sled type leaks into the API; sled's own corruption
/// report maps to [`CacheError::Corrupt`] so the caller marks the cache bad.
fn store_error(error: sled::Error) -> CacheError {
    match error {
        // sled's own text for these prints a backtrace with Debug formatting.
        sled::Error::Corruption { at, .. } => CacheError::Corrupt {
            key: DB_DIR.to_owned(),
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
    use crate::record::FORMAT_VERSION;

    fn entry(dn: &str, uuid: &str) -> CacheEntry {
        CacheEntry {
            dn: dn.into(),
            attributes: vec![("entryUUID".into(), vec![uuid.as_bytes().to_vec()])],
            modules: vec!["m".into()],
        }
    }

    fn put(cache: &Cache, e: &CacheEntry) {
        let mut b = cache.batch();
        b.put(e);
        cache.commit(b, false).unwrap();
    }

    #[test]
    fn corrupt_entry_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        put(&cache, &entry("cn=ok", "1"));
        cache.put_raw(b"e:cn=bad", &[FORMAT_VERSION, 0xfd, 0xff, 0xff]);
        let err = cache.get("CN=Bad").unwrap_err();
        assert!(
            matches!(&err, CacheError::Corrupt { key, .. } if key == "e:cn=bad"),
            "{err}"
        );
        // Iteration reports the bad record and goes on.
        let items: Vec<_> = cache.iter().collect();
        assert_eq!(items.len(), 2);
        assert!(matches!(items[0], Err(CacheError::Corrupt { .. })));
        assert_eq!(items[1].as_ref().unwrap().dn, "cn=ok");
        // remove_module_everywhere cannot work around it either.
        assert!(matches!(
            cache.remove_module_everywhere("m"),
            Err(CacheError::Corrupt { .. })
        ));
    }

    #[test]
    fn unknown_version_byte_is_unsupported_version() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let mut value = encode_entry(&entry("cn=new", "1")).unwrap();
        value[0] = 9;
        cache.put_raw(b"e:cn=new", &value);
        let err = cache.get("cn=new").unwrap_err();
        assert!(
            matches!(&err, CacheError::UnsupportedVersion { key, version: 9 } if key == "e:cn=new"),
            "{err}"
        );
        cache.put_raw(MASTER_KEY, &[2, 0, 0]);
        assert!(matches!(
            cache.master(),
            Err(CacheError::UnsupportedVersion { version: 2, .. })
        ));
    }

    #[test]
    fn corrupt_master_record_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        cache.put_raw(MASTER_KEY, &[FORMAT_VERSION, 1]);
        assert!(matches!(cache.master(), Err(CacheError::Corrupt { .. })));
        cache.put_raw(MASTER_KEY, &[]);
        assert!(matches!(cache.master(), Err(CacheError::Corrupt { .. })));
    }

    #[test]
    fn overwriting_or_deleting_a_corrupt_record_repairs_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        cache.put_raw(b"e:cn=a", b"\x01garbage");
        cache.put_raw(b"e:cn=b", b"\x01garbage");
        put(&cache, &entry("cn=A", "u-a"));
        assert_eq!(cache.get("cn=a").unwrap().unwrap().dn, "cn=A");
        let mut b = cache.batch();
        b.delete("cn=b");
        cache.commit(b, false).unwrap();
        assert_eq!(cache.get("cn=b").unwrap(), None);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn index_records_of_earlier_versions_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = Cache::open(dir.path()).unwrap();
            put(&cache, &entry("cn=a", "u-a"));
            // More than one chunk of them, some undecodable.
            for i in 0..2_500 {
                cache.put_raw(format!("u:u-{i}").as_bytes(), b"\x01\x04cn=a");
            }
            cache.put_raw(b"u:bad", b"\xff");
            cache.flush().unwrap();
        }
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.db.scan_prefix(UUID_PREFIX).count(), 0);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get("cn=a").unwrap().unwrap().dn, "cn=a");
    }

    #[test]
    fn entry_count_is_stored_and_recounted_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = Cache::open(dir.path()).unwrap();
            let mut b = cache.batch();
            for i in 0..5 {
                b.put(&entry(&format!("cn={i}"), &format!("u{i}")));
            }
            b.delete("cn=0");
            cache.commit(b, true).unwrap();
            assert_eq!(cache.len(), 4);
            let stored = cache.read(COUNT_KEY).unwrap().unwrap();
            assert_eq!(decode_count(&stored).unwrap(), 4);
            // A commit that changes no count leaves the record alone.
            put(&cache, &entry("cn=1", "u1"));
            assert_eq!(
                decode_count(&cache.read(COUNT_KEY).unwrap().unwrap()).unwrap(),
                4
            );
            cache.flush().unwrap();
            cache.db.remove(COUNT_KEY).unwrap();
            cache.flush().unwrap();
        }
        {
            let cache = Cache::open(dir.path()).unwrap();
            assert_eq!(cache.len(), 4);
            cache.put_raw(COUNT_KEY, b"\x01");
            cache.flush().unwrap();
        }
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.len(), 4);
        cache.clear().unwrap();
        assert_eq!(
            decode_count(&cache.read(COUNT_KEY).unwrap().unwrap()).unwrap(),
            0
        );
    }

    #[test]
    fn export_copies_entries_count_and_master() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("a")).unwrap();
        let mut b = cache.batch();
        for i in 0..2500 {
            b.put(&entry(&format!("cn={i}"), &format!("u{i}")));
        }
        b.set_master(MasterRecord {
            notifier_id: 42,
            schema_id: 7,
        });
        cache.commit(b, false).unwrap();
        let target = dir.path().join("b");
        let exported = cache.export_to(&target).unwrap();
        assert_eq!(exported.entries, 2500);
        assert_eq!(exported.master.unwrap().notifier_id, 42);
        // The original goes on being usable, and the copy does not follow it.
        put(&cache, &entry("cn=later", "u-later"));
        let copy = Cache::open(&target).unwrap();
        assert_eq!(copy.len(), 2500);
        assert_eq!(
            copy.master().unwrap(),
            Some(MasterRecord {
                notifier_id: 42,
                schema_id: 7
            })
        );
        assert_eq!(copy.get("cn=17").unwrap().unwrap(), entry("cn=17", "u17"));
        assert_eq!(copy.get("cn=later").unwrap(), None);
        assert_eq!(copy.iter().count(), 2500);
        // A second export into a cache that holds data is refused.
        drop(copy);
        assert!(matches!(
            cache.export_to(&target),
            Err(CacheError::Store(_))
        ));
    }

    /// A snapshot of a large cache does not stop commits: they go on while the records are
    /// copied, and the copy still ends up exactly at the state after the last of them.
    #[test]
    fn commits_go_on_during_an_export_and_the_copy_includes_them() {
        let dir = tempfile::tempdir().unwrap();
        let cache = std::sync::Arc::new(Cache::open(&dir.path().join("a")).unwrap());
        for chunk in 0..100 {
            let mut b = cache.batch();
            for i in 0..1000 {
                let n = chunk * 1000 + i;
                b.put(&entry(&format!("cn={n}"), &format!("u{n}")));
            }
            cache.commit(b, false).unwrap();
        }
        let target = dir.path().join("b");
        let exporter = {
            let cache = std::sync::Arc::clone(&cache);
            let target = target.clone();
            std::thread::spawn(move || {
                let exported = cache.export_to(&target).unwrap();
                (exported, std::time::Instant::now())
            })
        };
        while !cache.lock_writer().is_recording() {
            std::thread::yield_now();
        }
        for n in 0..20u64 {
            let mut b = cache.batch();
            b.put(&entry(&format!("cn=during{n}"), &format!("d{n}")));
            b.delete("cn=7");
            b.set_master(MasterRecord {
                notifier_id: 100 + n,
                schema_id: 1,
            });
            cache.commit(b, false).unwrap();
        }
        let committed = std::time::Instant::now();
        let (exported, finished) = exporter.join().unwrap();
        assert!(
            committed < finished,
            "the commits waited for the export to finish"
        );
        assert_eq!(exported.master.unwrap().notifier_id, 119);
        assert_eq!(exported.entries, 100_000 - 1 + 20);
        let copy = Cache::open(&target).unwrap();
        assert_eq!(copy.master().unwrap().unwrap().notifier_id, 119);
        assert_eq!(copy.get("cn=during19").unwrap().unwrap().dn, "cn=during19");
        assert_eq!(copy.get("cn=7").unwrap(), None);
        assert_eq!(
            copy.get("cn=during3").unwrap().unwrap(),
            entry("cn=during3", "d3")
        );
        assert_eq!(copy.len(), 100_000 - 1 + 20);
    }

    #[test]
    fn descendants_are_found_parents_first_and_batches_can_be_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let mut b = cache.batch();
        for dn in [
            "uid=z,ou=b,ou=c,dc=x",
            "ou=b,ou=c,dc=x",
            "uid=a,ou=c,dc=x",
            "ou=c,dc=x",
            "ou=cc,dc=x",
            "uid=q,ou=cc,dc=x",
        ] {
            b.put(&entry(dn, dn));
        }
        assert_eq!(
            b.staged("OU=C,dc=x").unwrap().unwrap().unwrap().dn,
            "ou=c,dc=x"
        );
        b.delete("ou=c,dc=x");
        assert_eq!(b.staged("ou=c,dc=x").unwrap(), Some(None));
        assert_eq!(b.staged("ou=none").unwrap(), None);
        b.put(&entry("ou=c,dc=x", "c"));
        cache.commit(b, false).unwrap();
        let keys = cache.descendant_keys("OU=C,dc=x").unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[2], "uid=z,ou=b,ou=c,dc=x");
        assert!(keys[..2].contains(&"ou=b,ou=c,dc=x".to_owned()));
        assert!(
            cache
                .descendant_keys("uid=q,ou=cc,dc=x")
                .unwrap()
                .is_empty()
        );
    }

    /// Commits collected in memory (not yet in sled) are what every read sees, scans
    /// included; a big commit after them lands on top of them; and dropped without a flush,
    /// as a crash would, they all come back from the commit log.
    #[test]
    fn collected_commits_are_read_back_and_replayed_after_a_drop() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = Cache::open(dir.path()).unwrap();
            for i in 0..50u64 {
                let mut b = cache.batch();
                b.put(&entry(&format!("cn={i},ou=c"), &format!("u{i}")));
                if i >= 10 {
                    b.delete(&format!("cn={},ou=c", i - 10));
                }
                b.set_master(MasterRecord {
                    notifier_id: i,
                    schema_id: 0,
                });
                cache.commit(b, false).unwrap();
            }
            assert!(!cache.lock_pending().writes.is_empty(), "nothing collected");
            assert_eq!(cache.get("cn=5,ou=c").unwrap(), None);
            assert_eq!(
                cache.get("cn=45,ou=c").unwrap(),
                Some(entry("cn=45,ou=c", "u45"))
            );
            assert_eq!(cache.master().unwrap().unwrap().notifier_id, 49);
            assert_eq!(cache.descendant_keys("ou=c").unwrap().len(), 10);
            // A commit too big to collect goes to sled after the collected ones.
            let mut b = cache.batch();
            for i in 0..APPLY_CHUNK + 10 {
                b.put(&entry(&format!("cn=big{i},ou=c"), &format!("big{i}")));
            }
            b.delete("cn=49,ou=c");
            cache.commit(b, false).unwrap();
            put(&cache, &entry("cn=last,ou=c", "last"));
            assert_eq!(cache.len(), 10 + APPLY_CHUNK + 10 - 1 + 1);
            assert_eq!(cache.iter().count(), cache.len());
        }
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.len(), 10 + APPLY_CHUNK + 10);
        assert_eq!(cache.iter().count(), cache.len());
        assert_eq!(cache.get("cn=49,ou=c").unwrap(), None);
        assert_eq!(
            cache.get("cn=48,ou=c").unwrap(),
            Some(entry("cn=48,ou=c", "u48"))
        );
        assert_eq!(
            cache.get("cn=last,ou=c").unwrap(),
            Some(entry("cn=last,ou=c", "last"))
        );
        assert_eq!(cache.master().unwrap().unwrap().notifier_id, 49);
    }

    /// A commit applied in several sled batches is still all-or-nothing after a crash: with
    /// only its first chunk applied (the sequence number comes with the last), the open
    /// replays the whole commit from the log.
    #[test]
    fn a_commit_applied_in_chunks_is_replayed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let entries: Vec<CacheEntry> = (0..APPLY_CHUNK * 2)
            .map(|i| entry(&format!("cn={i},ou=b"), &format!("u{i}")))
            .collect();
        {
            let cache = Cache::open(dir.path()).unwrap();
            let mut b = cache.batch();
            for e in &entries {
                b.put(e);
            }
            cache.commit(b, false).unwrap();
            assert_eq!(cache.len(), APPLY_CHUNK * 2);
            assert_eq!(cache.get("cn=7,ou=b").unwrap(), Some(entries[7].clone()));
            // Undo all but the first chunk's writes in sled, as a crash between chunks
            // would leave them; the commit log still holds the commit.
            let mut batch = sled::Batch::default();
            batch.insert(SEQ_KEY, encode_seq(0));
            for key in cache
                .db
                .scan_prefix(ENTRY_PREFIX)
                .keys()
                .skip(APPLY_CHUNK / 2)
            {
                batch.remove(key.unwrap());
            }
            cache.db.apply_batch(batch).unwrap();
            cache.db.flush().unwrap();
        }
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.recovered(), 1);
        assert_eq!(cache.iter().count(), APPLY_CHUNK * 2);
        assert_eq!(cache.get("cn=1999,ou=b").unwrap().unwrap(), entries[1999]);
    }

    /// The unread puts of a bulk load leave exactly what reading puts would: the entries and
    /// their count (also after a reopen), also when the same batch puts a DN twice.
    #[test]
    fn put_new_stores_like_put_without_reading() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = Cache::open(dir.path()).unwrap();
            let mut b = cache.batch();
            b.put_new(&entry("cn=a", "U1"));
            b.put_new(&entry("cn=b", "u2"));
            // The same DN again in the batch: replaces, not counted twice.
            b.put(&entry("CN=A", "u3"));
            b.put_new(&entry("cn=c", "u2"));
            cache.commit(b, true).unwrap();
            assert_eq!(cache.len(), 3);
            assert_eq!(cache.get("cn=a").unwrap(), Some(entry("CN=A", "u3")));
            assert_eq!(cache.get("cn=c").unwrap(), Some(entry("cn=c", "u2")));

            let mut b = cache.batch();
            b.put_new(&entry("cn=d", "u4"));
            b.delete("cn=b");
            cache.commit(b, true).unwrap();
            assert_eq!(cache.len(), 3);
            assert_eq!(cache.get("cn=d").unwrap(), Some(entry("cn=d", "u4")));
        }
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.len(), 3);
        let dns: Vec<String> = cache.iter().map(|e| e.unwrap().dn).collect();
        assert_eq!(dns, ["CN=A", "cn=c", "cn=d"]);
    }
}
