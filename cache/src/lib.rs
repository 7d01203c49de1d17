//! The listener cache: the last known state of every replicated LDAP object (attributes as
//! exact bytes, plus the modules that handled it) and the master record (last notifier id,
//! schema id), kept in LMDB.
//!
//! The change engine reads the old state of an object here, runs the handler modules, and
//! then commits the new state, the module list and the notifier id as one atomic [`Batch`]
//! (DESIGN.md decision 4). Only this crate knows the storage engine; records carry a format
//! version byte so the engine can be swapped by export/import (decision 5), as it was from
//! sled to LMDB ([`migrate`]). The UCS LMDB format is not reused.
//!
//! Layout of the cache directory (`/var/lib/univention-directory-listener`):
//! - `cache.lmdb/` — the database ([`Cache`]): LMDB's `data.mdb` and `lock.mdb`, and the
//!   commit log `commits.log`,
//! - `bad_cache` — corruption marker ([`mark_bad`]); its presence makes [`Cache::open`] fail,
//! - `notifier_id` — the legacy last id for monitoring ([`write_legacy_notifier_id`]).

mod entry;
mod files;
mod kv;
pub mod ldif;
mod migrate;
mod record;
mod store;
mod wal;

use std::io;
use std::path::PathBuf;

pub use entry::{Attributes, CacheEntry, MasterRecord};
pub use files::{
    BAD_CACHE_FILE, NOTIFIER_ID_FILE, is_marked_bad, mark_bad, read_legacy_notifier_id,
    write_legacy_notifier_id,
};
pub use migrate::SLED_DIR;
pub use store::{APPLY_FAILPOINT, APPLY_PANIC_FAILPOINT, Batch, Cache, DB_DIR, Exported};
pub use wal::APPEND_FAILPOINT;

/// glibc's mmap threshold while a process uses a cache ([`bound_heap`]).
const MMAP_THRESHOLD: i32 = 256 * 1024;

/// Keeps large short-lived buffers out of the heap: glibc raises its mmap threshold (up to
/// 32 MiB) whenever such a buffer is freed and then serves them from the heap, where freed
/// ones stay resident. Measured with sled, the store of earlier versions, whose node buffers
/// of a few hundred KiB made `-i` over 50,000 entries peak at 119 MB instead of 54 MB; it
/// still matters for the commit log's records of large commits and for the import of such
/// a cache ([`migrate`]). Call at the start of a process that uses a cache, before it starts
/// threads.
pub fn bound_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; no memory is touched.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An error of the storage engine, as text so that its types stay private.
    #[error("cache database error: {0}")]
    Store(String),
    /// A record that cannot be decoded: the caller marks the cache bad ([`mark_bad`]) and
    /// exits 3, as UCS does on a cache parse error.
    #[error("corrupt cache record {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
    /// `bad_cache` exists: an earlier run found the cache corrupt.
    #[error("the listener cache is marked bad by {path}: {reason}")]
    BadCache { path: PathBuf, reason: String },
    /// A record written by a newer (or unknown) format version.
    #[error("cache record {key:?} has format version {version}; this build reads version 1")]
    UnsupportedVersion { key: String, version: u8 },
}
