//! The store: [`Cache`] and its write unit [`Batch`], over LMDB ([`crate::kv`]).
//!
//! Everything lives in one LMDB table under the key prefixes of [`crate::record`], and a set
//! of writes reaches it in one write transaction, so a commit's entries, the entry count and
//! the master record land together (DESIGN.md decision 4).
//! Every commit is first appended to the commit log ([`crate::wal`]), so a process crash
//! loses no commit that returned, without a write transaction (and its sync) per commit.
//!
//! Since the log already holds every commit since the last flush, LMDB need not see each
//! one: commits collect in memory ([`Pending`], read before LMDB) and reach it together, at
//! a flush or when too many collected; a key written by many commits between two flushes is
//! written once.
//!
//! When enough has collected, the writes go to LMDB on a thread of their own ([`Applier`])
//! while commits go on collecting the next set; at most one set is on its way at a time
//! (the next commit to fill up waits for it), so memory stays bounded.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crate::CacheError;
use crate::entry::{CacheEntry, MasterRecord};
use crate::files::{bad_cache_path, bad_cache_reason, is_marked_bad};
use crate::kv::{Store, is_hashed};
use crate::record::{
    COUNT_KEY, ENTRY_PREFIX, MASTER_KEY, SEQ_KEY, UUID_PREFIX, decode_count, decode_entry,
    decode_master, decode_seq, encode_count, encode_entry, encode_master, encode_seq, entry_key,
    key_text,
};
use crate::wal::{Wal, Writes};
use ldap::dn::dn_key;

/// Name of the database directory inside the cache directory (LMDB's `data.mdb` and
/// `lock.mdb`, and the commit log).
pub const DB_DIR: &str = "cache.lmdb";

/// Entries changed per commit by [`Cache::remove_module_everywhere`], bounding the memory of
/// one commit on large caches.
const REMOVE_MODULE_CHUNK: usize = 1000;

/// Collected commits are applied to LMDB before they hold more keys or bytes than this,
/// bounding the memory of [`Pending`] when nobody flushes (a long module initialisation).
/// Each set costs a write transaction with its sync, so a set should not be small either.
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

/// Records per read transaction of a scan, and per write transaction while
/// [`Cache::export_to`] copies: bounds memory, and keeps read transactions short (a long
/// one keeps LMDB from reusing the pages that later writes free).
const SCAN_CHUNK: usize = 1000;

/// The listener cache in `<dir>/cache.lmdb`.
///
/// Reads may happen from any thread at any time. Commits are serialised internally, because a
/// commit reads whether the records it writes exist, to keep the entry count exact.
pub struct Cache {
    db: Arc<Store>,
    /// The commit log; held while a commit computes, logs and applies its changes.
    writer: Mutex<Wal>,
    /// Writes of logged commits not yet applied to LMDB; changed only under `writer`, and
    /// by the applier when it is done with a set.
    pending: Arc<Shared>,
    /// The thread applying a full set of collected writes to LMDB.
    applier: Option<Applier>,
    /// Number of entries (`e:` keys), also stored under `n` by every commit that changes it,
    /// so that opening needs no scan.
    entries: AtomicUsize,
    /// Commits replayed from the commit log at open (lost by LMDB in a crash).
    recovered: usize,
    /// Entries imported from an earlier version's database at open.
    migrated: Option<usize>,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("path", &self.db.path())
            .field("entries", &self.len())
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// Opens or creates `<dir>/cache.lmdb`, creating `dir` (mode 0700) if needed; imports the
    /// database of an earlier version first ([`crate::migrate`]). Refuses with
    /// [`CacheError::BadCache`] while `<dir>/bad_cache` exists, and with
    /// [`CacheError::Store`] while another process or handle has the cache open.
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        if is_marked_bad(dir) {
            return Err(CacheError::BadCache {
                path: bad_cache_path(dir),
                reason: bad_cache_reason(dir),
            });
        }
        create_private_dir(dir)?;
        let migrated = crate::migrate::from_sled(dir)?;
        let path = dir.join(DB_DIR);
        // Created here rather than by LMDB so that it is private too: the cache holds
        // password hashes and other secrets of every replicated object.
        create_private_dir(&path)?;
        let db = Arc::new(Store::open(&path)?);
        let mut wal = Wal::open(&path).map_err(|source| CacheError::Io {
            op: "open",
            path: path.join(crate::wal::WAL_FILE),
            source,
        })?;
        let recovered = recover(&db, &mut wal)?;
        drop_retired_index(&db)?;
        let entries = stored_count(&db)?;
        let pending = Arc::new(Shared::default());
        let applier = Applier::start(Arc::clone(&db), Arc::clone(&pending)).map_err(|source| {
            CacheError::Io {
                op: "start the applier thread for",
                path: path.clone(),
                source,
            }
        })?;
        Ok(Cache {
            db,
            writer: Mutex::new(wal),
            pending,
            applier: Some(applier),
            entries: AtomicUsize::new(entries),
            recovered,
            migrated,
        })
    }

    /// Entries imported at open from the database of an earlier version (`cache.sled`), if
    /// this open imported one.
    pub fn migrated(&self) -> Option<usize> {
        self.migrated
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
    /// process (it is in the commit log); with `durable` it is also synced and survives a
    /// power loss, otherwise that takes the next [`flush`], which allows group commit.
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
        // Under the writer lock: a commit logged after the sync began must stay in the log
        // until the next flush.
        let mut wal = self.lock_writer();
        self.flush_locked(&mut wal)
    }

    /// [`Cache::flush`] for a caller that holds the writer lock.
    fn flush_locked(&self, wal: &mut Wal) -> Result<(), CacheError> {
        self.apply_pending()?;
        self.db.sync()?;
        wal.truncate().map_err(|source| CacheError::Io {
            op: "truncate",
            path: wal.path().to_owned(),
            source,
        })?;
        self.db.release_mapped_pages();
        Ok(())
    }

    /// All entries in key ([`dn_key`]) order. An undecodable record yields an error item and
    /// iteration continues with the next one. The scan reads LMDB in chunks as it goes: a
    /// large commit that another thread makes meanwhile can show in part (the listener
    /// commits on the thread that scans).
    pub fn iter(&self) -> impl Iterator<Item = Result<CacheEntry, CacheError>> + '_ {
        // Scans read LMDB alone: the collected commits go there first.
        let applied = {
            let _writer = self.lock_writer();
            self.apply_pending()
        };
        applied.err().map(Err).into_iter().chain(EntryScan {
            db: &self.db,
            after: None,
            chunk: Vec::new().into_iter(),
            done: false,
        })
    }

    /// The cache keys ([`dn_key`]) of every entry below `dn`, parents before their
    /// children. Keys sort by the whole DN, so a subtree is no key range: this streams over
    /// the entry keys and decodes none of the records (but those of DNs too long to be
    /// their own key); only the matching keys are kept. Callers run it only for entries
    /// that can have children.
    pub fn descendant_keys(&self, dn: &str) -> Result<Vec<String>, CacheError> {
        {
            let _writer = self.lock_writer();
            self.apply_pending()?;
        }
        let mut keys = Vec::new();
        self.db
            .scan_in_chunks(ENTRY_PREFIX, SCAN_CHUNK, |raw_key, value| {
                let key = if is_hashed(raw_key) {
                    dn_key(&decode_entry(raw_key, value)?.dn)
                } else {
                    stored_dn_key(raw_key)?
                };
                if ldap::dn::is_below(&key, dn) {
                    keys.push(key);
                }
                Ok(())
            })?;
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
        let mut after = None;
        loop {
            // The commits below only change entries already visited, so the scan may go on
            // reading LMDB while they are on their way there.
            let records = self
                .db
                .chunk(ENTRY_PREFIX, after.as_deref(), REMOVE_MODULE_CHUNK)?;
            let Some((last, _)) = records.last() else {
                break;
            };
            after = Some(last.clone());
            let mut batch = Batch::default();
            for (raw_key, value) in records {
                let mut entry = decode_entry(&raw_key, &value)?;
                let key = if is_hashed(&raw_key) {
                    dn_key(&entry.dn)
                } else {
                    stored_dn_key(&raw_key)?
                };
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
            }
            self.apply(&mut writer, batch)?;
        }
        drop(writer);
        self.flush()?;
        Ok(changed)
    }

    /// Writes a consistent copy of the database into the cache directory `dir`, which must
    /// be missing or empty (`<dir>/cache.lmdb`, mode 0700), and flushes it; returns what it
    /// holds.
    ///
    /// It holds the state after some commit and never part of one, and the master record in
    /// it matches its entries; commits go on meanwhile. The records are copied without the
    /// writer lock while every commit made meanwhile is also recorded; at the end, briefly
    /// under the lock, those commits are applied to the copy in order, which sets every key
    /// they touched to its value after the last of them (the keys they did not touch never
    /// changed during the copy). This is how tools and backups read the cache while the
    /// listener runs: the store's lock keeps a second process from opening the original.
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
            // The copy reads LMDB: everything committed so far goes there first.
            let mut writer = self.lock_writer();
            self.apply_pending()?;
            writer.start_recording();
        }
        let copied = self.copy_records(&copy);
        let mut writer = self.lock_writer();
        let meanwhile = writer.stop_recording();
        copied?;
        for writes in meanwhile {
            copy.db.apply(&writes)?;
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
        let mut after = None;
        loop {
            let records = self.db.chunk(b"", after.as_deref(), SCAN_CHUNK)?;
            let Some((last, _)) = records.last() else {
                return Ok(());
            };
            after = Some(last.clone());
            copy.db.apply_all(
                records
                    .iter()
                    .map(|(key, value)| (key.as_slice(), Some(value.as_slice()))),
            )?;
        }
    }

    /// Bytes used by the database file.
    pub fn size_on_disk(&self) -> Result<u64, CacheError> {
        self.db.size_on_disk()
    }

    fn lock_writer(&self) -> MutexGuard<'_, Wal> {
        // The guarded state is LMDB's, which a panicking writer cannot leave half-applied.
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The stored value of `key`: a collected commit's write, else one on its way to LMDB,
    /// else LMDB's. The applier forgets a set only after LMDB has it, so a key that is in
    /// neither map is in LMDB.
    fn read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CacheError> {
        {
            let pending = self.lock_pending();
            let write = pending.writes.get(key).or_else(|| {
                pending
                    .applying
                    .as_ref()
                    .and_then(|applying| applying.get(key))
            });
            if let Some(write) = write {
                return Ok(write.clone());
            }
        }
        self.db.get(key)
    }

    fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock()
    }

    /// Applies the collected commits to LMDB in one transaction, then forgets them, after
    /// the set the applier may be applying. The caller holds the writer lock. Readers wait
    /// meanwhile, so none misses a write that is on its way into LMDB.
    fn apply_pending(&self) -> Result<(), CacheError> {
        let mut pending = self.pending.idle()?;
        if pending.writes.is_empty() {
            return Ok(());
        }
        self.db.apply(&pending.writes)?;
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

    /// Computes the writes of `batch` against the current records and collects them as one
    /// commit. The caller holds the writer lock, so the records read here are the ones
    /// being replaced.
    fn apply(&self, wal: &mut Wal, batch: Batch) -> Result<(), CacheError> {
        if let Some(reason) = batch.error {
            return Err(CacheError::Store(reason));
        }
        if batch.ops.is_empty() {
            return Ok(());
        }
        if !batch.unlogged && wal.has_unlogged() {
            // The unlogged commits before it become durable first: replayed after a crash
            // without them, this one would leave a state no sequence of commits had.
            self.flush_locked(wal)?;
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
        self.write(wal, writes, !batch.unlogged)?;
        self.entries.store(entries, Ordering::Relaxed);
        Ok(())
    }

    /// Logs `writes` as the next commit (unless not `logged`), then collects them with its
    /// sequence number, which reaches LMDB in the same transaction as the writes: the open
    /// replays from the commit log every commit above it ([`recover`]).
    fn write(&self, wal: &mut Wal, mut writes: Writes, logged: bool) -> Result<(), CacheError> {
        let seq = logged.then(|| wal.seq() + 1);
        if let Some(seq) = seq {
            writes.insert(SEQ_KEY.to_vec(), Some(encode_seq(seq)));
        }
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
        match seq {
            Some(seq) => wal.append(seq, &writes).map_err(|source| CacheError::Io {
                op: "append to",
                path: wal.path().to_owned(),
                source,
            })?,
            None => wal.skip(&writes),
        }
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
        let old = self.db.get(key).unwrap();
        self.db.apply_all([(key, Some(value))]).unwrap();
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
    /// See [`Batch::unlogged`].
    unlogged: bool,
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

    /// Commits this batch without writing it to the commit log, which saves writing every
    /// value a second time, for bulk loads that end with a durable commit (a module
    /// initialisation). The cost: a process crash before the next flush can lose it. The
    /// next logged commit flushes first, so a crash still leaves the cache as after some
    /// commit, with every logged commit that returned.
    pub fn unlogged(&mut self) {
        self.unlogged = true;
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

/// Writes of commits that are in the commit log but not yet in LMDB: the final value per
/// key (`None` = removed), as after the last of them.
#[derive(Debug, Default)]
struct Pending {
    writes: Writes,
    /// Keys and values held, roughly.
    bytes: usize,
    /// The earlier set the applier is writing to LMDB (older than `writes`).
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

    /// The lock, once the applier has no set on its way to LMDB.
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

/// The thread that applies full sets of collected writes to LMDB, in the order handed over.
struct Applier {
    jobs: SyncSender<Arc<Writes>>,
    thread: JoinHandle<()>,
}

impl Applier {
    fn start(db: Arc<Store>, shared: Arc<Shared>) -> std::io::Result<Applier> {
        let (jobs, queue) = sync_channel::<Arc<Writes>>(1);
        let thread = std::thread::Builder::new()
            .name("cache-apply".into())
            .spawn(move || {
                for set in queue {
                    // A panic (of the storage engine or its bindings) must not end the thread with its
                    // set still marked as on its way: every later wait for it would hang.
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        daemon::failpoint::check(APPLY_FAILPOINT)
                            .map_err(|e| CacheError::Store(e.to_string()))
                            .and_then(|()| panic_failpoint())
                            .and_then(|()| db.apply(&set))
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
    /// Lets the applier finish its set and end before LMDB is closed.
    fn drop(&mut self) {
        if let Some(Applier { jobs, thread }) = self.applier.take() {
            drop(jobs);
            let _ = thread.join();
        }
    }
}

/// Turns a [`Batch`] into key writes, tracking which entries the earlier operations of the
/// same batch leave behind, so that several operations on one DN compose correctly.
struct Plan<'a> {
    cache: &'a Cache,
    /// Whether the entry with this dn_key exists.
    entries: HashMap<String, bool>,
    /// Final value per key (`None` = remove). A BTreeMap writes LMDB in key order.
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

/// Replays the commits LMDB lost in a crash (sequence numbers above its own, without a
/// gap), makes them durable and empties the log; returns how many there were.
fn recover(db: &Store, wal: &mut Wal) -> Result<usize, CacheError> {
    let seq = match db.get(SEQ_KEY)? {
        Some(value) => decode_seq(&value)?,
        None => 0,
    };
    let io = |op, wal: &Wal| {
        let path = wal.path().to_owned();
        move |source| CacheError::Io { op, path, source }
    };
    // Applied in one transaction: the final value of every key.
    let (merged, seq, replayed) = wal.replay_after(seq).map_err(io("read", wal))?;
    if replayed > 0 {
        db.apply(&merged)?;
        db.sync()?;
    }
    wal.truncate().map_err(io("truncate", wal))?;
    wal.set_seq(seq);
    Ok(replayed)
}

/// Removes the entryUUID index records (`u:`) that caches written by earlier versions hold:
/// nothing reads them, and keeping them cost a write per entry.
fn drop_retired_index(db: &Store) -> Result<(), CacheError> {
    let mut retired = Writes::new();
    db.scan(UUID_PREFIX, None, |key, _| {
        retired.insert(key.to_vec(), None);
        Ok(true)
    })?;
    if !retired.is_empty() {
        db.apply(&retired)?;
        db.sync()?;
    }
    Ok(())
}

/// The stored entry count; recounted (a full scan) when the record is missing or unreadable,
/// which it can be because it is derived data.
fn stored_count(db: &Store) -> Result<usize, CacheError> {
    if let Some(value) = db.get(COUNT_KEY)?
        && let Ok(count) = decode_count(&value)
        && let Ok(count) = usize::try_from(count)
    {
        return Ok(count);
    }
    let mut entries = 0;
    db.scan_in_chunks(ENTRY_PREFIX, SCAN_CHUNK, |_, _| {
        entries += 1;
        Ok(())
    })?;
    Ok(entries)
}

/// [`Cache::iter`]: entries read a chunk per read transaction ([`Store::chunk`]), so no
/// transaction stays open while the caller works on an entry.
struct EntryScan<'a> {
    db: &'a Store,
    /// The stored key of the last entry read.
    after: Option<Vec<u8>>,
    chunk: std::vec::IntoIter<crate::kv::Record>,
    done: bool,
}

impl Iterator for EntryScan<'_> {
    type Item = Result<CacheEntry, CacheError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((key, value)) = self.chunk.next() {
                return Some(decode_entry(&key, &value));
            }
            if self.done {
                return None;
            }
            match self
                .db
                .chunk(ENTRY_PREFIX, self.after.as_deref(), SCAN_CHUNK)
            {
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Ok(records) => {
                    // A chunk that ended before the limit ended at the last entry.
                    self.done = records.len() < SCAN_CHUNK;
                    self.after = records.last().map(|(key, _)| key.clone());
                    self.chunk = records.into_iter();
                }
            }
        }
    }
}

/// The dn_key part of a stored entry key that is not hashed ([`is_hashed`]).
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
        assert!(cache.db.chunk(UUID_PREFIX, None, 10).unwrap().is_empty());
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
            cache.db.apply_all([(COUNT_KEY, None)]).unwrap();
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

    /// Commits collected in memory (not yet in LMDB) are what every read sees, scans
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
            // A commit too big to collect goes to LMDB after the collected ones.
            let mut b = cache.batch();
            for i in 0..SCAN_CHUNK + 10 {
                b.put(&entry(&format!("cn=big{i},ou=c"), &format!("big{i}")));
            }
            b.delete("cn=49,ou=c");
            cache.commit(b, false).unwrap();
            put(&cache, &entry("cn=last,ou=c", "last"));
            assert_eq!(cache.len(), 10 + SCAN_CHUNK + 10 - 1 + 1);
            assert_eq!(cache.iter().count(), cache.len());
        }
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.len(), 10 + SCAN_CHUNK + 10);
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

    /// A commit LMDB lost in a crash comes back whole: with its sequence number and part of
    /// its writes undone in LMDB, the open replays the whole commit from the log.
    #[test]
    fn a_commit_lost_in_part_is_replayed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let entries: Vec<CacheEntry> = (0..SCAN_CHUNK * 2)
            .map(|i| entry(&format!("cn={i},ou=b"), &format!("u{i}")))
            .collect();
        {
            let cache = Cache::open(dir.path()).unwrap();
            let mut b = cache.batch();
            for e in &entries {
                b.put(e);
            }
            cache.commit(b, false).unwrap();
            assert_eq!(cache.len(), SCAN_CHUNK * 2);
            assert_eq!(cache.get("cn=7,ou=b").unwrap(), Some(entries[7].clone()));
            cache.iter().count();
            let mut undo = Writes::new();
            undo.insert(SEQ_KEY.to_vec(), Some(encode_seq(0)));
            cache
                .db
                .scan(ENTRY_PREFIX, None, |key, _| {
                    undo.insert(key.to_vec(), None);
                    Ok(true)
                })
                .unwrap();
            let kept: Vec<_> = undo.keys().take(SCAN_CHUNK / 2).cloned().collect();
            for key in kept {
                undo.remove(&key);
            }
            undo.insert(SEQ_KEY.to_vec(), Some(encode_seq(0)));
            cache.db.apply(&undo).unwrap();
            cache.db.sync().unwrap();
        }
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.recovered(), 1);
        assert_eq!(cache.iter().count(), SCAN_CHUNK * 2);
        assert_eq!(cache.get("cn=1999,ou=b").unwrap().unwrap(), entries[1999]);
    }

    /// An unlogged commit is lost with a crash before the next flush, alone; a logged
    /// commit after it flushes it first, so it is never replayed without it.
    #[test]
    fn unlogged_commits_are_flushed_before_a_logged_one() {
        let dir = tempfile::tempdir().unwrap();
        let commit = |cache: &Cache, dn: &str, unlogged: bool| {
            let mut b = cache.batch();
            b.put(&entry(dn, dn));
            if unlogged {
                b.unlogged();
            }
            cache.commit(b, false).unwrap();
        };
        {
            let cache = Cache::open(dir.path()).unwrap();
            commit(&cache, "cn=logged", false);
            commit(&cache, "cn=bulk", true);
            assert_eq!(
                cache.get("cn=bulk").unwrap(),
                Some(entry("cn=bulk", "cn=bulk"))
            );
            commit(&cache, "cn=after", false);
            commit(&cache, "cn=lost", true);
            // Dropped without a flush, as a crash would leave it.
        }
        let cache = Cache::open(dir.path()).unwrap();
        let dns: Vec<_> = cache.iter().map(|e| e.unwrap().dn).collect();
        assert_eq!(dns, ["cn=after", "cn=bulk", "cn=logged"]);
        assert_eq!(cache.len(), 3);
    }

    /// An export sees unlogged commits made while it copies.
    #[test]
    fn an_export_records_unlogged_commits() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("a")).unwrap();
        let mut writer = cache.lock_writer();
        writer.start_recording();
        drop(writer);
        let mut b = cache.batch();
        b.put(&entry("cn=bulk", "u"));
        b.unlogged();
        cache.commit(b, false).unwrap();
        assert_eq!(cache.lock_writer().stop_recording().len(), 1);
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
