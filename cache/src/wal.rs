//! The commit log that makes every commit survive a process crash at the cost of one
//! `write(2)`.
//!
//! Commits collect in memory and reach LMDB in sets (see [`crate::store`]), so a SIGKILL, an
//! OOM kill or an abort would lose the commits since the last set; a write transaction per
//! commit would cost a sync each. Instead every commit first appends its final key/value
//! writes to `<cache.lmdb>/commits.log` in one `write`: once that returns the kernel holds
//! the record, whatever happens to the process. A flush makes LMDB durable and empties the
//! log. Opening replays the records LMDB lacks (each set stores the sequence number of its
//! last commit under `s`), in order, up to the first torn or missing one. A power loss can
//! still take the writes since the last flush (at most the flush interval): the log itself
//! is never fsynced.
//!
//! Record: `UDLW` | seq (u64 LE) | payload length (u32 LE) | CRC-32 of seq and payload |
//! payload = per write: key length (u32 LE), key, 0 (remove) or 1 + value length (u32 LE)
//! + value.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// The file inside the database directory, so it always travels with its database.
pub(crate) const WAL_FILE: &str = "commits.log";
const MAGIC: &[u8; 4] = b"UDLW";
/// Failpoint ([`daemon::failpoint`]) that makes an append write half its record and fail.
pub const APPEND_FAILPOINT: &str = "cache-log-append";
const HEADER_LEN: usize = 4 + 8 + 4 + 4;

/// The final state of the keys one commit touches (`None` = removed).
pub(crate) type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

#[derive(Debug)]
pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    /// Sequence number of the last commit.
    seq: u64,
    /// Bytes appended since the last truncation.
    len: u64,
    /// While an export copies the database: every commit's writes, in order.
    recording: Option<Vec<Writes>>,
    /// Why a partial record could not be cut off after a failed append; appends are
    /// refused until a truncation empties the file.
    torn: Option<String>,
    /// Whether a commit since the last truncation was not logged ([`Wal::skip`]).
    unlogged: bool,
}

impl Wal {
    /// Opens (creating, mode 0600) the log in the database directory `db_dir`.
    pub(crate) fn open(db_dir: &Path) -> io::Result<Wal> {
        let path = db_dir.join(WAL_FILE);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)?;
        let len = file.metadata()?.len();
        Ok(Wal {
            file,
            path,
            seq: 0,
            len,
            recording: None,
            torn: None,
            unlogged: false,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    pub(crate) fn set_seq(&mut self, seq: u64) {
        self.seq = seq;
    }

    /// The records in the file, in order, up to the first one that is torn or damaged.
    pub(crate) fn records(&mut self) -> io::Result<Vec<(u64, Writes)>> {
        let mut bytes = Vec::new();
        (&self.file).read_to_end(&mut bytes)?;
        let mut records = Vec::new();
        let mut rest = bytes.as_slice();
        while let Some((seq, writes, tail)) = decode(rest) {
            records.push((seq, writes));
            rest = tail;
        }
        Ok(records)
    }

    /// The commits after `seq` that the log holds without a gap, merged in order into the
    /// final value of every key they touch; the sequence number of the last of them and
    /// how many there were.
    pub(crate) fn replay_after(&mut self, mut seq: u64) -> io::Result<(Writes, u64, usize)> {
        let mut merged = Writes::new();
        let mut replayed = 0;
        for (record_seq, writes) in self.records()? {
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
        Ok((merged, seq, replayed))
    }

    /// Appends the record of commit `seq` in one write; the caller applies the writes only
    /// after this returned. A write that fails part way (a full disk) leaves no partial
    /// record behind: the replay stops at the first torn record, so one left in place would
    /// hide every later commit.
    pub(crate) fn append(&mut self, seq: u64, writes: &Writes) -> io::Result<()> {
        if let Some(reason) = &self.torn {
            return Err(io::Error::other(format!(
                "{} ends in a partial record that could not be cut off ({reason}); commits \
                 wait for the next flush to empty it",
                self.path.display()
            )));
        }
        let record = encode(seq, writes);
        if let Err(failed) =
            daemon::fs::append_whole(&self.file, self.len, &record, APPEND_FAILPOINT)
        {
            self.torn = failed.cut.map(|cut| cut.to_string());
            return Err(failed.error);
        }
        self.len += record.len() as u64;
        self.seq = seq;
        // Only a logged commit goes into an export's copy.
        if let Some(recorded) = &mut self.recording {
            recorded.push(writes.clone());
        }
        Ok(())
    }

    /// Notes a commit that is not logged (`Batch::unlogged`), and records its writes for a
    /// running export.
    pub(crate) fn skip(&mut self, writes: &Writes) {
        self.unlogged = true;
        if let Some(recorded) = &mut self.recording {
            recorded.push(writes.clone());
        }
    }

    /// Whether a commit since the last truncation was not logged.
    pub(crate) fn has_unlogged(&self) -> bool {
        self.unlogged
    }

    /// From now on, keeps a copy of every logged commit's writes (see `Cache::export_to`).
    pub(crate) fn start_recording(&mut self) {
        self.recording = Some(Vec::new());
    }

    #[cfg(test)]
    pub(crate) fn is_recording(&self) -> bool {
        self.recording.is_some()
    }

    /// The commits recorded since [`Wal::start_recording`]; recording ends.
    pub(crate) fn stop_recording(&mut self) -> Vec<Writes> {
        self.recording.take().unwrap_or_default()
    }

    /// Empties the log once everything in it is durable in LMDB.
    pub(crate) fn truncate(&mut self) -> io::Result<()> {
        if self.len > 0 || self.torn.is_some() {
            self.file.set_len(0)?;
            self.len = 0;
            self.torn = None;
        }
        self.unlogged = false;
        Ok(())
    }
}

fn encode(seq: u64, writes: &Writes) -> Vec<u8> {
    let payload_len: usize = writes
        .iter()
        .map(|(k, v)| 4 + k.len() + 1 + v.as_ref().map_or(0, |v| 4 + v.len()))
        .sum();
    let mut record = Vec::with_capacity(HEADER_LEN + payload_len);
    record.extend_from_slice(MAGIC);
    record.extend_from_slice(&seq.to_le_bytes());
    record.extend_from_slice(&len32(payload_len).to_le_bytes());
    record.extend_from_slice(&[0; 4]);
    for (key, value) in writes {
        record.extend_from_slice(&len32(key.len()).to_le_bytes());
        record.extend_from_slice(key);
        match value {
            None => record.push(0),
            Some(value) => {
                record.push(1);
                record.extend_from_slice(&len32(value.len()).to_le_bytes());
                record.extend_from_slice(value);
            }
        }
    }
    let crc = checksum(seq, &record[HEADER_LEN..]);
    record[16..20].copy_from_slice(&crc.to_le_bytes());
    record
}

/// Lengths above 4 GiB cannot occur (a value is one LDAP entry); saturating keeps the
/// record's checksum from ever matching a truncated length.
fn len32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&seq.to_le_bytes());
    crc.update(payload);
    crc.finalize()
}

/// One record from the front of `bytes`, and what follows it; `None` when the front is not
/// a complete, intact record.
fn decode(bytes: &[u8]) -> Option<(u64, Writes, &[u8])> {
    let header = bytes.get(..HEADER_LEN)?;
    if header.get(..4)? != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(header.get(4..12)?.try_into().ok()?);
    let payload_len = u32::from_le_bytes(header.get(12..16)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header.get(16..20)?.try_into().ok()?);
    let payload = bytes.get(HEADER_LEN..HEADER_LEN.checked_add(payload_len)?)?;
    if checksum(seq, payload) != crc {
        return None;
    }
    let mut writes = Writes::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let (key, tail) = take_sized(rest)?;
        let (tag, tail) = tail.split_first()?;
        let (value, tail) = match tag {
            0 => (None, tail),
            1 => {
                let (value, tail) = take_sized(tail)?;
                (Some(value.to_vec()), tail)
            }
            _ => return None,
        };
        writes.insert(key.to_vec(), value);
        rest = tail;
    }
    Some((seq, writes, bytes.get(HEADER_LEN + payload_len..)?))
}

/// A u32-length-prefixed byte string from the front of `bytes`.
fn take_sized(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let value = bytes.get(4..4usize.checked_add(len)?)?;
    Some((value, bytes.get(4 + len..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writes(pairs: &[(&str, Option<&str>)]) -> Writes {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec())))
            .collect()
    }

    #[test]
    fn a_failed_append_is_neither_kept_nor_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        wal.start_recording();
        wal.append(1, &writes(&[("a", Some("1"))])).unwrap();
        // A file that takes no writes (and no truncation): every append fails.
        wal.file = File::open(dir.path().join(WAL_FILE)).unwrap();
        assert!(wal.append(2, &writes(&[("b", Some("2"))])).is_err());
        // What it may have written could not be cut off either: refused until emptied.
        let refused = wal.append(2, &writes(&[("b", Some("2"))])).unwrap_err();
        assert!(refused.to_string().contains("partial record"), "{refused}");
        assert_eq!(wal.seq(), 1);
        assert_eq!(wal.stop_recording(), vec![writes(&[("a", Some("1"))])]);
        assert_eq!(wal.records().unwrap().len(), 1);
    }

    #[test]
    fn records_round_trip_and_stop_at_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        let first = writes(&[("e:a", Some("1")), ("u:x", None)]);
        let second = writes(&[("m", Some("")), ("e:b", Some("22"))]);
        wal.append(1, &first).unwrap();
        wal.append(2, &second).unwrap();
        assert_eq!(wal.seq(), 2);
        let mut reopened = Wal::open(dir.path()).unwrap();
        assert_eq!(
            reopened.records().unwrap(),
            [(1, first.clone()), (2, second)]
        );

        // A torn last record (power loss in the middle of a write) ends the log there.
        let len = std::fs::metadata(wal.path()).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(wal.path())
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let mut torn = Wal::open(dir.path()).unwrap();
        assert_eq!(torn.records().unwrap(), [(1, first)]);

        // Garbage is no record at all.
        std::fs::write(wal.path(), b"garbage garbage garbage garbage").unwrap();
        assert!(Wal::open(dir.path()).unwrap().records().unwrap().is_empty());

        wal.truncate().unwrap();
        assert_eq!(std::fs::metadata(wal.path()).unwrap().len(), 0);
    }

    #[test]
    fn a_flipped_byte_fails_the_checksum() {
        let mut record = encode(7, &writes(&[("e:a", Some("value"))]));
        assert!(decode(&record).is_some());
        let last = record.len() - 1;
        record[last] ^= 1;
        assert!(decode(&record).is_none());
    }
}
