//! The UCS binary index `transaction.index` in its amd64 layout: an 8-byte header holding the
//! magic `0x3395e0d4` as a little-endian `u64`, then for every ID `n` a 9-byte entry at
//! `8 + 9*n`: `valid: u8` (1 = valid) and the `u64` little-endian offset of the line in
//! `transaction`. Never-written entries (holes) read as zero, i.e. invalid.
//!
//! The index is only a cache: every use is checked against the ID on the line it points at,
//! so it is written without fsync and rebuilt whenever it disagrees with the log.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The header value UCS writes.
pub const MAGIC: u64 = 0x3395_e0d4;
/// Header length on amd64.
pub const HEADER_LEN: u64 = 8;
/// Entry length on amd64.
pub(crate) const ENTRY_LEN: u64 = 9;

/// Entries read or written per I/O call when handling ranges.
const ENTRIES_PER_CHUNK: usize = 16 * 1024;

/// One index entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexEntry {
    /// Only `valid == 1` counts as valid in UCS; any other byte is invalid.
    pub valid: bool,
    /// Offset of the line's start in `transaction`.
    pub offset: u64,
}

impl IndexEntry {
    /// Decodes one on-disk entry (`ENTRY_LEN` bytes).
    pub fn decode(raw: &[u8]) -> IndexEntry {
        let valid = raw.first() == Some(&1);
        let mut le = [0u8; 8];
        if let Some(bytes) = raw.get(1..9) {
            le.copy_from_slice(bytes);
        }
        IndexEntry {
            valid,
            offset: u64::from_le_bytes(le),
        }
    }

    /// Appends the on-disk form of a valid entry pointing at `offset`.
    pub fn encode(offset: u64, out: &mut Vec<u8>) {
        out.push(1);
        out.extend_from_slice(&offset.to_le_bytes());
    }
}

#[derive(Debug, Error)]
pub enum IndexError {
    #[error("cannot {op} index {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("index {path} is shorter than its {HEADER_LEN}-byte header ({size} bytes)")]
    Short { path: PathBuf, size: u64 },
    #[error("index {path} has the wrong magic {found:#x} (expected {MAGIC:#x})")]
    BadMagic { path: PathBuf, found: u64 },
    #[error("transaction ID {id} is too large for an index position")]
    IdTooLarge { id: u64 },
}

/// Byte position of the entry for `id`.
pub(crate) fn entry_position(id: u64) -> Option<u64> {
    id.checked_mul(ENTRY_LEN)?.checked_add(HEADER_LEN)
}

/// The index path belonging to a transaction file: `<file>.index`.
pub fn index_path_for(translog: &Path) -> PathBuf {
    let mut name = translog.as_os_str().to_owned();
    name.push(".index");
    PathBuf::from(name)
}

/// An open index file with a verified header.
#[derive(Debug)]
pub struct Index {
    file: File,
    path: PathBuf,
}

impl Index {
    /// Opens an existing index read-only and checks its header.
    pub fn open(path: &Path) -> Result<Index, IndexError> {
        let file = File::open(path).map_err(|source| io_err("open", path, source))?;
        Index::verify(file, path)
    }

    /// Opens an existing index for reading and writing and checks its header.
    pub(crate) fn open_rw(path: &Path) -> Result<Index, IndexError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| io_err("open", path, source))?;
        Index::verify(file, path)
    }

    fn verify(file: File, path: &Path) -> Result<Index, IndexError> {
        let mut header = [0u8; HEADER_LEN as usize];
        let got = read_full_at(&file, &mut header, 0).map_err(|e| io_err("read", path, e))?;
        if (got as u64) < HEADER_LEN {
            return Err(IndexError::Short {
                path: path.to_owned(),
                size: got as u64,
            });
        }
        let found = u64::from_le_bytes(header);
        if found != MAGIC {
            return Err(IndexError::BadMagic {
                path: path.to_owned(),
                found,
            });
        }
        Ok(Index {
            file,
            path: path.to_owned(),
        })
    }

    /// Creates (or truncates) an index holding only the header.
    pub fn create(path: &Path) -> Result<Index, IndexError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| io_err("create", path, source))?;
        file.write_all(&MAGIC.to_le_bytes())
            .map_err(|source| io_err("write", path, source))?;
        Ok(Index {
            file,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File size in bytes.
    pub fn size(&self) -> Result<u64, IndexError> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| io_err("stat", &self.path, e))
    }

    /// The highest ID that has an entry slot, computed like `univention-translog`:
    /// `(size - header) / entry - 1`, or 0 when there is no entry at all.
    pub fn count(&self) -> Result<u64, IndexError> {
        let entries = self.size()?.saturating_sub(HEADER_LEN) / ENTRY_LEN;
        Ok(entries.saturating_sub(1))
    }

    /// The entry for `id`; `None` when the file ends before it.
    pub fn read_entry(&self, id: u64) -> Result<Option<IndexEntry>, IndexError> {
        let pos = entry_position(id).ok_or(IndexError::IdTooLarge { id })?;
        let mut raw = [0u8; ENTRY_LEN as usize];
        let got =
            read_full_at(&self.file, &mut raw, pos).map_err(|e| io_err("read", &self.path, e))?;
        if (got as u64) < ENTRY_LEN {
            return Ok(None);
        }
        Ok(Some(IndexEntry::decode(&raw)))
    }

    /// Entries for `first ..= first + count - 1`, calling `each(id, entry)` in order; an entry
    /// past the end of the file is reported as `None`. Reads in large chunks.
    pub fn for_each_entry(
        &self,
        first: u64,
        count: u64,
        mut each: impl FnMut(u64, Option<IndexEntry>) -> bool,
    ) -> Result<(), IndexError> {
        let mut id = first;
        let mut left = count;
        let mut buf = Vec::new();
        while left > 0 {
            let n = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(ENTRIES_PER_CHUNK);
            let pos = entry_position(id).ok_or(IndexError::IdTooLarge { id })?;
            buf.resize(n.saturating_mul(ENTRY_LEN as usize), 0);
            let got = read_full_at(&self.file, &mut buf, pos)
                .map_err(|e| io_err("read", &self.path, e))?;
            for (i, raw) in buf.chunks_exact(ENTRY_LEN as usize).enumerate() {
                let end = (i + 1).saturating_mul(ENTRY_LEN as usize);
                let entry = (end <= got).then(|| IndexEntry::decode(raw));
                if !each(id, entry) {
                    return Ok(());
                }
                id = id.saturating_add(1);
            }
            left = left.saturating_sub(n as u64);
        }
        Ok(())
    }

    /// Writes valid entries for the consecutive IDs `first_id, first_id + 1, …` pointing at
    /// `offsets`, with one positioned write per chunk (one for any realistic batch).
    pub(crate) fn write_entries(&self, first_id: u64, offsets: &[u64]) -> Result<(), IndexError> {
        let mut id = first_id;
        let mut buf = Vec::new();
        for chunk in offsets.chunks(ENTRIES_PER_CHUNK) {
            let pos = entry_position(id).ok_or(IndexError::IdTooLarge { id })?;
            buf.clear();
            for &offset in chunk {
                IndexEntry::encode(offset, &mut buf);
            }
            self.file
                .write_all_at(&buf, pos)
                .map_err(|e| io_err("write", &self.path, e))?;
            id = id.saturating_add(chunk.len() as u64);
        }
        Ok(())
    }

    /// Cuts the entries after `last_id`'s (entries of transactions the log no longer has).
    pub(crate) fn truncate_after(&self, last_id: u64) -> Result<(), IndexError> {
        let end = last_id
            .checked_add(1)
            .and_then(entry_position)
            .ok_or(IndexError::IdTooLarge { id: last_id })?;
        if self.size()? > end {
            self.file
                .set_len(end)
                .map_err(|e| io_err("truncate", &self.path, e))?;
        }
        Ok(())
    }

    /// Writes a fresh index for the consecutive IDs starting at `first_id` to `<path>.tmp`
    /// and renames it over `path`, so a reader never sees a half-written index. Entries below
    /// `first_id` (and entry 0) stay holes. Not `daemon::fs::TempFile`: the index keeps the
    /// handle open, and it is derived data (rebuilt from the log), so it needs no fsync.
    pub(crate) fn rebuild(
        path: &Path,
        first_id: u64,
        offsets: &[u64],
    ) -> Result<Index, IndexError> {
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let result = (|| {
            let index = Index::create(&tmp)?;
            if !offsets.is_empty() {
                index.write_entries(first_id, offsets)?;
            }
            fs::rename(&tmp, path).map_err(|e| io_err("rename", path, e))?;
            Ok(Index {
                file: index.file,
                path: path.to_owned(),
            })
        })();
        if result.is_err() {
            // Best effort: the temporary file is useless after a failure.
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> IndexError {
    IndexError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Reads until `buf` is full or EOF; returns the number of bytes read.
pub(crate) fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let Some(rest) = buf.get_mut(done..) else {
            break;
        };
        match file.read_at(rest, offset.saturating_add(done as u64)) {
            Ok(0) => break,
            Ok(n) => done = done.saturating_add(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_ucs_amd64() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("transaction.index");
        let index = Index::create(&path).unwrap();
        index.write_entries(1, &[0, 27]).unwrap();
        let bytes = fs::read(&path).unwrap();
        let mut want = vec![0xd4, 0xe0, 0x95, 0x33, 0, 0, 0, 0];
        want.extend_from_slice(&[0; 9]); // entry 0: hole
        want.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[1, 27, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bytes, want);
        assert_eq!(index.count().unwrap(), 2);
        assert_eq!(
            index.read_entry(2).unwrap(),
            Some(IndexEntry {
                valid: true,
                offset: 27
            })
        );
        assert_eq!(index.read_entry(0).unwrap(), Some(IndexEntry::default()));
        assert_eq!(index.read_entry(3).unwrap(), None);
        assert!(matches!(
            index.read_entry(u64::MAX),
            Err(IndexError::IdTooLarge { .. })
        ));
    }

    #[test]
    fn open_checks_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i");
        assert!(matches!(Index::open(&path), Err(IndexError::Io { .. })));
        fs::write(&path, [0xd4, 0xe0]).unwrap();
        assert!(matches!(
            Index::open(&path),
            Err(IndexError::Short { size: 2, .. })
        ));
        fs::write(&path, [1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
        assert!(matches!(
            Index::open(&path),
            Err(IndexError::BadMagic { .. })
        ));
        fs::write(&path, MAGIC.to_le_bytes()).unwrap();
        let index = Index::open(&path).unwrap();
        assert_eq!(index.count().unwrap(), 0);
        assert_eq!(index.size().unwrap(), 8);
    }

    #[test]
    fn rebuild_is_sparse_below_first_and_ranges_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("transaction.index");
        fs::write(&path, b"garbage").unwrap();
        let index = Index::rebuild(&path, 5, &[0, 10, 20]).unwrap();
        assert!(!dir.path().join("transaction.index.tmp").exists());
        assert_eq!(index.size().unwrap(), 8 + 9 * 8);
        let mut seen = Vec::new();
        index
            .for_each_entry(3, 7, |id, e| {
                seen.push((id, e));
                true
            })
            .unwrap();
        let valid = |offset| {
            Some(IndexEntry {
                valid: true,
                offset,
            })
        };
        assert_eq!(
            seen,
            vec![
                (3, Some(IndexEntry::default())),
                (4, Some(IndexEntry::default())),
                (5, valid(0)),
                (6, valid(10)),
                (7, valid(20)),
                (8, None),
                (9, None),
            ]
        );
    }

    #[test]
    fn thirty_two_bit_layout_is_read_without_panic() {
        // i386: 4-byte header, 5-byte entries. Header plus the zero entry 0 happen to read as
        // the amd64 magic, so the header check passes and the entries must be distrusted.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("transaction.index");
        let mut data = vec![0xd4, 0xe0, 0x95, 0x33];
        data.extend_from_slice(&[0; 5]);
        for offset in [0u32, 22, 44, 0xffff_fff0] {
            data.push(1);
            data.extend_from_slice(&offset.to_le_bytes());
        }
        fs::write(&path, &data).unwrap();
        let index = Index::open(&path).unwrap();
        for id in 0..10 {
            let _ = index.read_entry(id).unwrap();
        }
        index.for_each_entry(0, 100, |_, _| true).unwrap();
    }
}
