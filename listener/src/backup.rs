//! Backup files of the listener state (`univention-directory-listener-ctrl backup`): the
//! cache with its module lists, the master record (notifier and schema id) and the module
//! states, in one text file that does not depend on the storage engine.
//!
//! Format 1:
//!
//! ```text
//! # univention-directory-listener backup
//! # {"format":1,"producer":…,"version":…,"created":…,"host":…,"cache_dir":…,
//! #  "notifier_id":…,"schema_id":…,"entries":…,"modules":{"name":3,…}}   (one line)
//! <one LDIF record per cache entry, as univention-directory-listener-dump writes them>
//! # end entries=<n> crc32=<8 hex digits>
//! ```
//!
//! The CRC-32 covers every line of the records (not the comments). A reader refuses a
//! `format` above [`FORMAT`] (written by a newer version) and a file whose count or CRC do
//! not match (truncated or altered).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use cache::ldif::{Item, LdifError, Reader, write_entry};
use cache::{Cache, CacheError, MasterRecord};
use serde::{Deserialize, Serialize};

use crate::dispatch::{STATE_DIR, read_states, write_state};

/// First line of every backup.
pub const MAGIC: &str = "univention-directory-listener backup";
/// The format this build writes and the newest it reads.
pub(crate) const FORMAT: u32 = 1;
/// Entries per cache commit while restoring.
const RESTORE_CHUNK: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    pub producer: String,
    pub version: String,
    /// Unix time of the snapshot.
    pub created: u64,
    pub host: String,
    pub cache_dir: PathBuf,
    pub notifier_id: u64,
    pub schema_id: u64,
    pub entries: usize,
    pub modules: BTreeMap<String, u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    File(#[from] daemon::fs::FileError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Ldif(#[from] LdifError),
    #[error("not a listener backup: {0}")]
    NotABackup(String),
    #[error(
        "the backup has format {found}, written by a newer version ({producer} {version}); \
         this build reads format {FORMAT} and older"
    )]
    NewerFormat {
        found: u32,
        producer: String,
        version: String,
    },
    #[error("damaged backup: {0}")]
    Damaged(String),
}

/// Where a backup comes from, for its header.
#[derive(Debug, Clone)]
pub struct Origin {
    pub host: String,
    pub cache_dir: PathBuf,
    pub created: u64,
}

/// Writes the backup of the state in `state_dir` (a stopped listener's cache directory or a
/// snapshot) to `out`. A corrupt cache record fails the backup: it could not be restored.
pub fn write(
    out: &mut impl Write,
    state_dir: &Path,
    origin: Origin,
) -> Result<Header, BackupError> {
    let cache = Cache::open(state_dir)?;
    let master = cache.master()?.unwrap_or(MasterRecord {
        notifier_id: cache::read_legacy_notifier_id(state_dir).unwrap_or(0),
        schema_id: 0,
    });
    let header = Header {
        format: FORMAT,
        producer: "univention-directory-listener-ctrl".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        created: origin.created,
        host: origin.host,
        cache_dir: origin.cache_dir,
        notifier_id: master.notifier_id,
        schema_id: master.schema_id,
        entries: cache.len(),
        modules: read_states(&state_dir.join(STATE_DIR))?,
    };
    let json = serde_json::to_string(&header).map_err(io::Error::other)?;
    writeln!(out, "# {MAGIC}\n# {json}")?;
    let mut crc = crc32fast::Hasher::new();
    let mut count = 0usize;
    let mut text = String::new();
    for entry in cache.iter() {
        text.clear();
        write_entry(&mut text, &entry?);
        crc.update(text.as_bytes());
        out.write_all(text.as_bytes())?;
        count += 1;
    }
    writeln!(out, "# end entries={count} crc32={:08x}", crc.finalize())?;
    out.flush()?;
    if count != header.entries {
        return Err(BackupError::Damaged(format!(
            "the cache counted {} entries but {count} were read",
            header.entries
        )));
    }
    Ok(header)
}

/// Reads a whole backup, checking header, records, count and CRC, and hands every entry
/// to `each`. Returns the header.
pub fn read(
    input: impl BufRead,
    mut each: impl FnMut(cache::CacheEntry) -> Result<(), BackupError>,
) -> Result<Header, BackupError> {
    let mut reader = Reader::new(input);
    // A wrong file fails to parse long before the header: say so rather than name its
    // first unreadable line.
    let not_a_backup = |e: LdifError| match e {
        LdifError::Syntax { .. } => BackupError::NotABackup(e.to_string()),
        LdifError::Io(_) => BackupError::Ldif(e),
    };
    match reader.next_item().map_err(not_a_backup)? {
        Some(Item::Comment(magic)) if magic == MAGIC => {}
        _ => {
            return Err(BackupError::NotABackup(format!(
                "the first line is not \"# {MAGIC}\""
            )));
        }
    }
    let header = match reader.next_item().map_err(not_a_backup)? {
        Some(Item::Comment(json)) => parse_header(&json)?,
        _ => return Err(BackupError::NotABackup("no header line".into())),
    };
    let mut count = 0usize;
    let trailer = loop {
        match reader.next_item()? {
            Some(Item::Entry(entry)) => {
                count += 1;
                each(entry)?;
            }
            Some(Item::Comment(trailer)) => break trailer,
            None => {
                return Err(BackupError::Damaged(format!(
                    "truncated after {count} entries (no end line)"
                )));
            }
        }
    };
    let checksum = reader.checksum();
    if let Some(extra) = reader.next_item()? {
        return Err(BackupError::Damaged(format!(
            "data after the end line: {extra:?}"
        )));
    }
    let expected = format!("end entries={count} crc32={checksum:08x}");
    if trailer != expected {
        return Err(BackupError::Damaged(format!(
            "the end line says {trailer:?}, the records give {expected:?}"
        )));
    }
    if count != header.entries {
        return Err(BackupError::Damaged(format!(
            "the header announces {} entries, the file holds {count}",
            header.entries
        )));
    }
    Ok(header)
}

fn parse_header(json: &str) -> Result<Header, BackupError> {
    // The version fields first, so a newer format is named as such even if the rest of its
    // header no longer fits this build's idea of it.
    #[derive(Deserialize)]
    struct Version {
        format: u32,
        #[serde(default)]
        producer: String,
        #[serde(default)]
        version: String,
    }
    let version: Version = serde_json::from_str(json)
        .map_err(|e| BackupError::NotABackup(format!("bad header: {e}")))?;
    if version.format > FORMAT {
        return Err(BackupError::NewerFormat {
            found: version.format,
            producer: version.producer,
            version: version.version,
        });
    }
    serde_json::from_str(json).map_err(|e| BackupError::NotABackup(format!("bad header: {e}")))
}

/// Suffix of the replaced cache database that [`restore`] keeps in the cache directory:
/// `cache.lmdb.before-restore`, or `cache.sled.before-restore` when it replaced a database
/// of an earlier version not yet imported.
pub const BEFORE_RESTORE: &str = ".before-restore";

/// Replaces the listener state in `cache_dir` with the backup: a new cache is built next
/// to the old one and swapped in (the old one stays as `<name>`[`BEFORE_RESTORE`],
/// replacing an older one of that name), then the module states and `notifier_id` are
/// replaced and a `bad_cache` marker is removed. The caller holds `cache.lock`. The whole
/// file is read and checked (entries, count, checksum) into the new cache before the swap,
/// so a damaged file leaves the old cache in place.
pub fn restore(input: impl BufRead, cache_dir: &Path) -> Result<Header, BackupError> {
    let work = tempfile::Builder::new()
        .prefix(".restore-")
        .tempdir_in(cache_dir)?;
    let fresh = Cache::open(work.path())?;
    let mut batch = fresh.batch();
    let header = read(input, |entry| {
        batch.put(&entry);
        if batch.len() >= RESTORE_CHUNK {
            fresh.commit(std::mem::take(&mut batch), false)?;
        }
        Ok(())
    })?;
    batch.set_master(MasterRecord {
        notifier_id: header.notifier_id,
        schema_id: header.schema_id,
    });
    fresh.commit(batch, true)?;
    drop(fresh);

    let live = cache_dir.join(cache::DB_DIR);
    // The database being replaced: an earlier version's one, which the next open would
    // import, when there is no current one.
    let replaced = [cache::DB_DIR, cache::SLED_DIR]
        .into_iter()
        .find(|name| cache_dir.join(name).exists());
    // Kept in the cache directory, not in the work directory that is removed at the end:
    // the replaced cache outlives a crash halfway through and an unwanted restore.
    let kept = replaced.map(|name| {
        let from = cache_dir.join(name);
        let to = cache_dir.join(format!("{name}{BEFORE_RESTORE}"));
        (from, to)
    });
    if let Some((from, to)) = &kept {
        match fs::remove_dir_all(to) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        fs::rename(from, to)?;
    }
    if let Err(e) = fs::rename(work.path().join(cache::DB_DIR), &live) {
        // Put the old cache back rather than leave none.
        if let Some((from, to)) = &kept {
            let _ = fs::rename(to, from);
        }
        return Err(e.into());
    }
    let states = cache_dir.join(STATE_DIR);
    daemon::fs::create_private_dir(&states)?;
    for name in read_states(&states)?.keys() {
        fs::remove_file(states.join(name))?;
    }
    for (name, state) in &header.modules {
        write_state(&states, name, *state)?;
    }
    cache::write_legacy_notifier_id(cache_dir, header.notifier_id)?;
    match fs::remove_file(cache_dir.join(cache::BAD_CACHE_FILE)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cache::CacheEntry;

    fn kept_name() -> String {
        format!("{}{BEFORE_RESTORE}", cache::DB_DIR)
    }

    fn seed(dir: &Path) {
        let cache = Cache::open(dir).unwrap();
        let mut b = cache.batch();
        for i in 0..1500 {
            b.put(&CacheEntry {
                dn: format!("cn=Ä{i},dc=x"),
                attributes: vec![
                    ("cn".into(), vec![format!("Ä{i}").into_bytes()]),
                    ("jpegPhoto".into(), vec![vec![0xff; 100]]),
                ],
                modules: vec!["m".into()],
            });
        }
        b.set_master(MasterRecord {
            notifier_id: 77,
            schema_id: 5,
        });
        cache.commit(b, true).unwrap();
        fs::create_dir_all(dir.join(STATE_DIR)).unwrap();
        fs::write(dir.join(STATE_DIR).join("m"), "3").unwrap();
    }

    fn origin() -> Origin {
        Origin {
            host: "h".into(),
            cache_dir: "/var/lib/univention-directory-listener".into(),
            created: 1,
        }
    }

    #[test]
    fn write_read_restore_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        seed(&source);
        let mut file = Vec::new();
        let header = write(&mut file, &source, origin()).unwrap();
        assert_eq!(header.entries, 1500);
        assert_eq!(header.notifier_id, 77);
        let mut seen = 0;
        let read_header = read(&file[..], |_| {
            seen += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(read_header, header);
        assert_eq!(seen, 1500);

        // Restore over another cache: everything is replaced.
        let target = dir.path().join("target");
        {
            let other = Cache::open(&target).unwrap();
            let mut b = other.batch();
            b.put(&CacheEntry {
                dn: "cn=stale".into(),
                ..CacheEntry::default()
            });
            other.commit(b, true).unwrap();
        }
        fs::create_dir_all(target.join(STATE_DIR)).unwrap();
        fs::write(target.join(STATE_DIR).join("gone"), "3").unwrap();
        cache::mark_bad(&target, "test").unwrap();
        restore(&file[..], &target).unwrap();
        let restored = Cache::open(&target).unwrap();
        let original = {
            // The source is still open-able: compare every entry.
            let src = Cache::open(&source).unwrap();
            src.iter().map(Result::unwrap).collect::<Vec<_>>()
        };
        assert_eq!(
            restored.iter().map(Result::unwrap).collect::<Vec<_>>(),
            original
        );
        assert_eq!(restored.master().unwrap().unwrap().notifier_id, 77);
        assert_eq!(restored.get("cn=stale").unwrap(), None);
        assert_eq!(
            read_states(&target.join(STATE_DIR)).unwrap(),
            BTreeMap::from([("m".to_owned(), 3)])
        );
        assert_eq!(cache::read_legacy_notifier_id(&target), Some(77));
        assert!(!cache::is_marked_bad(&target));
        // No work directory is left behind.
        let leftovers: Vec<_> = fs::read_dir(&target)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".restore-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // The replaced cache is kept in the cache directory.
        drop(restored);
        let kept = |name: &str| {
            let dir = dir.path().join(name);
            fs::create_dir(&dir).unwrap();
            fs::rename(target.join(kept_name()), dir.join(cache::DB_DIR)).unwrap();
            Cache::open(&dir).unwrap()
        };
        assert!(kept("kept1").get("cn=stale").unwrap().is_some());
        // An older kept copy is replaced by the next restore.
        fs::create_dir(target.join(kept_name())).unwrap();
        fs::write(target.join(kept_name()).join("older"), "x").unwrap();
        restore(&file[..], &target).unwrap();
        assert_eq!(kept("kept2").len(), 1500);
    }

    /// Restoring over an earlier version's database that was never imported keeps it
    /// under its own name; the next open does not import it over the restored cache.
    #[test]
    fn a_restore_over_an_earlier_versions_database_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        seed(&source);
        let mut file = Vec::new();
        write(&mut file, &source, origin()).unwrap();
        let target = dir.path().join("target");
        let old = target.join(cache::SLED_DIR);
        fs::create_dir_all(&old).unwrap();
        fs::write(old.join("db"), "earlier version").unwrap();
        restore(&file[..], &target).unwrap();
        let kept = target.join(format!("{}{BEFORE_RESTORE}", cache::SLED_DIR));
        assert_eq!(fs::read(kept.join("db")).unwrap(), b"earlier version");
        assert!(!old.exists());
        let restored = Cache::open(&target).unwrap();
        assert_eq!(restored.migrated(), None);
        assert_eq!(restored.len(), 1500);
    }

    #[test]
    fn damage_and_newer_formats_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        seed(dir.path());
        let mut file = Vec::new();
        write(&mut file, dir.path(), origin()).unwrap();
        let text = String::from_utf8(file).unwrap();
        let ok = |t: &str| read(t.as_bytes(), |_| Ok(()));
        assert!(ok(&text).is_ok());
        // Truncated: no end line.
        let cut = &text[..text.len() / 2];
        let cut = &cut[..cut.rfind("\n\n").unwrap() + 2];
        assert!(matches!(ok(cut), Err(BackupError::Damaged(_))));
        // One value changed (same length, still valid base64: only the CRC notices).
        let changed = text.replacen("jpegPhoto:: //", "jpegPhoto:: +/", 1);
        assert_ne!(changed, text);
        assert!(matches!(ok(&changed), Err(BackupError::Damaged(_))));
        // A newer format.
        let newer = text.replacen("\"format\":1", "\"format\":2,\"future\":[1]", 1);
        let err = ok(&newer).unwrap_err();
        assert!(
            matches!(err, BackupError::NewerFormat { found: 2, .. }),
            "{err}"
        );
        // Not a backup at all.
        assert!(matches!(
            ok("dn: cn=x\n\n"),
            Err(BackupError::NotABackup(_))
        ));
    }

    #[test]
    fn junk_and_endless_lines_are_not_a_backup() {
        let junk: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        let err = read(&junk[..], |_| Ok(())).unwrap_err();
        assert!(matches!(err, BackupError::NotABackup(_)), "{err}");
        // A file without line ends is refused, not read into memory whole.
        let endless = io::BufReader::new(io::repeat(b'#'));
        let err = read(endless, |_| Ok(())).unwrap_err();
        assert!(matches!(err, BackupError::NotABackup(_)), "{err}");
        assert!(err.to_string().contains("longer than"), "{err}");
    }
}
