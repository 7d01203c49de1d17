//! The `nats` module's outbox: messages handed to NATS whose acknowledgement has not come
//! back yet, in the order they were published.
//!
//! One append-only file. A message is appended with one `write(2)` before the handler
//! returns, so once the listener commits the transaction the message survives a crash of
//! the process (like the listener's own commit log). [`Outbox::sync`] makes it survive a
//! power loss; the listener calls it before it makes its own commits durable.
//! Acknowledged messages are dropped from the front ([`Outbox::acknowledge`]): when all
//! are acknowledged the file is truncated, otherwise it is rewritten with the rest once the
//! acknowledged part is large (temp file, fsync, rename: a crash leaves the old or the new
//! file, both valid). Opening reads every whole record up to the first torn or damaged one
//! (a crash in the middle of an append) and cuts the file there.
//!
//! Record: `UDNO` | body length (u32 LE) | CRC-32 of the body (u32 LE) | body = id length
//! (u16 LE), id, subject length (u16 LE), subject, payload.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;

const MAGIC: &[u8; 4] = b"UDNO";
const HEADER_LEN: usize = 4 + 4 + 4;
/// Acknowledged bytes at the front before the file is rewritten without them.
const COMPACT_BYTES: u64 = 4 << 20;

/// One message as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Message {
    pub id: String,
    pub subject: String,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error)]
#[error("outbox {}: cannot {op}: {source}", path.display())]
pub(super) struct OutboxError {
    op: &'static str,
    path: PathBuf,
    source: io::Error,
}

#[derive(Debug)]
pub(super) struct Outbox {
    path: PathBuf,
    file: File,
    /// Bytes of whole records in the file.
    len: u64,
    /// The messages not yet acknowledged, oldest first, with their record sizes.
    pending: VecDeque<(Message, u64)>,
    /// Size of the acknowledged records still at the front of the file.
    acknowledged_bytes: u64,
    /// Whether something was appended since the last sync.
    unsynced: bool,
    /// Why appends are refused until the file is rewritten or emptied: a partial record
    /// could not be cut off, or the rewritten file could not be reopened.
    broken: Option<String>,
}

/// Failpoint ([`daemon::failpoint`]) that makes an append write half its record and fail.
pub(super) const APPEND_FAILPOINT: &str = "nats-outbox-append";

impl Outbox {
    /// Opens (or creates) the outbox at `path` and reads the messages it holds.
    pub(super) fn open(path: &Path) -> Result<Outbox, OutboxError> {
        let err = |op| {
            let path = path.to_owned();
            move |source| OutboxError { op, path, source }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(err("open"))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(err("read"))?;
        let (pending, whole) = decode(&data);
        if whole < data.len() {
            tracing::warn!(
                "nats: outbox {}: cutting a torn or damaged record at byte {whole} (of {})",
                path.display(),
                data.len()
            );
            file.set_len(whole as u64).map_err(err("truncate"))?;
            file.sync_data().map_err(err("sync"))?;
        }
        Ok(Outbox {
            path: path.to_owned(),
            file,
            len: whole as u64,
            pending: pending.into(),
            acknowledged_bytes: 0,
            unsynced: false,
            broken: None,
        })
    }

    fn err(&self, op: &'static str) -> impl FnOnce(io::Error) -> OutboxError + '_ {
        move |source| OutboxError {
            op,
            path: self.path.clone(),
            source,
        }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// The messages not yet acknowledged, oldest first.
    pub(super) fn pending(&self) -> impl ExactSizeIterator<Item = &Message> {
        self.pending.iter().map(|(message, _)| message)
    }

    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    /// The id of the newest message, if any is pending.
    pub(super) fn last_id(&self) -> Option<&str> {
        self.pending.back().map(|(m, _)| m.id.as_str())
    }

    /// Appends `message` in one write: once this returns it survives a crash of the process.
    /// A write that fails part way (a full disk) is cut off again: opening stops at the
    /// first torn record, so one left in place would hide every later message.
    pub(super) fn append(&mut self, message: Message) -> Result<(), OutboxError> {
        if let Some(reason) = &self.broken {
            return Err(OutboxError {
                op: "append to",
                path: self.path.clone(),
                source: io::Error::other(format!("{reason}; appends wait until it is rewritten")),
            });
        }
        let record = encode(&message);
        if let Err(failed) =
            daemon::fs::append_whole(&self.file, self.len, &record, APPEND_FAILPOINT)
        {
            if let Some(cut) = failed.cut {
                self.broken = Some(format!("a partial record could not be cut off: {cut}"));
            }
            return Err(OutboxError {
                op: "append to",
                path: self.path.clone(),
                source: failed.error,
            });
        }
        self.len += record.len() as u64;
        self.pending.push_back((message, record.len() as u64));
        self.unsynced = true;
        Ok(())
    }

    /// Forgets the `count` oldest messages (acknowledged by the stream). Infallible, so the
    /// caller's count of acknowledged messages always moves with it; the file shrinks in
    /// [`Outbox::shrink`].
    pub(super) fn acknowledge(&mut self, count: usize) {
        for (_, size) in self.pending.drain(..count.min(self.pending.len())) {
            self.acknowledged_bytes += size;
        }
    }

    /// Drops acknowledged records from the file when that is cheap or due; a failure is
    /// retried at the next call.
    pub(super) fn shrink(&mut self) -> Result<(), OutboxError> {
        if self.broken.is_some() {
            // The open file may be the replaced one: only a rewrite and reopen mends it.
            return self.compact();
        }
        if self.acknowledged_bytes == 0 {
            return Ok(());
        }
        if self.pending.is_empty() {
            // Every message in the file is in the stream: an empty file is as good, and a
            // crash before the truncation only re-publishes duplicates the stream drops.
            self.file.set_len(0).map_err(self.err("truncate"))?;
            self.len = 0;
            self.acknowledged_bytes = 0;
            // Made durable with the next sync (before the listener's next flush): after a
            // power loss the acknowledged messages would otherwise come back, and a restart
            // beyond the stream's duplicate window would store them twice.
            self.unsynced = true;
        } else if self.acknowledged_bytes >= COMPACT_BYTES {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the file with the pending messages only (atomically and durably).
    fn compact(&mut self) -> Result<(), OutboxError> {
        let mut data = Vec::new();
        for (message, _) in &self.pending {
            data.extend_from_slice(&encode(message));
        }
        daemon::fs::write_atomic(&self.path, &data, 0o600).map_err(|e| OutboxError {
            op: "rewrite",
            path: self.path.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        // Until the new file is open, appends would go to the replaced one.
        self.broken = Some("the rewritten file is not open yet".to_owned());
        self.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(self.err("reopen"))?;
        self.len = data.len() as u64;
        self.acknowledged_bytes = 0;
        self.unsynced = false;
        self.broken = None;
        Ok(())
    }

    /// Makes every append so far survive a power loss.
    pub(super) fn sync(&mut self) -> Result<(), OutboxError> {
        if self.unsynced {
            self.file.sync_data().map_err(self.err("sync"))?;
            self.unsynced = false;
        }
        Ok(())
    }
}

fn encode(message: &Message) -> Vec<u8> {
    let id = &message.id.as_bytes()[..message.id.len().min(usize::from(u16::MAX))];
    let subject = &message.subject.as_bytes()[..message.subject.len().min(usize::from(u16::MAX))];
    let body_len = 2 + id.len() + 2 + subject.len() + message.payload.len();
    let mut record = Vec::with_capacity(HEADER_LEN + body_len);
    record.extend_from_slice(MAGIC);
    record.extend_from_slice(&u32::try_from(body_len).unwrap_or(u32::MAX).to_le_bytes());
    record.extend_from_slice(&[0; 4]);
    let body_start = record.len();
    for part in [id, subject] {
        record.extend_from_slice(&(part.len() as u16).to_le_bytes());
        record.extend_from_slice(part);
    }
    record.extend_from_slice(&message.payload);
    let crc = crc32fast::hash(&record[body_start..]);
    record[8..12].copy_from_slice(&crc.to_le_bytes());
    record
}

/// The whole records at the start of `data` (with their sizes) and where they end.
fn decode(data: &[u8]) -> (Vec<(Message, u64)>, usize) {
    let mut messages = Vec::new();
    let mut at = 0;
    while let Some((message, size)) = decode_one(&data[at..]) {
        messages.push((message, size as u64));
        at += size;
    }
    (messages, at)
}

fn decode_one(data: &[u8]) -> Option<(Message, usize)> {
    let header = data.get(..HEADER_LEN)?;
    if &header[..4] != MAGIC {
        return None;
    }
    let body_len = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[8..12].try_into().ok()?);
    let body = data.get(HEADER_LEN..HEADER_LEN.checked_add(body_len)?)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    let mut rest = body;
    let mut part = || -> Option<String> {
        let len = usize::from(u16::from_le_bytes(rest.get(..2)?.try_into().ok()?));
        let text = std::str::from_utf8(rest.get(2..2 + len)?).ok()?.to_owned();
        rest = &rest[2 + len..];
        Some(text)
    };
    let id = part()?;
    let subject = part()?;
    let payload = Bytes::copy_from_slice(rest);
    Some((
        Message {
            id,
            subject,
            payload,
        },
        HEADER_LEN + body_len,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: usize) -> Message {
        Message {
            id: format!("dc=x:{n}:1"),
            subject: "udl.a".to_owned(),
            payload: Bytes::from(format!("{{\"n\":{n}}}").repeat(n % 7 + 1)),
        }
    }

    fn ids(outbox: &Outbox) -> Vec<String> {
        outbox.pending().map(|m| m.id.clone()).collect()
    }

    /// Set in the child of [`a_failed_append_is_cut_off`].
    const APPEND_CHILD_ENV: &str = "NATS_OUTBOX_APPEND_CHILD";

    /// Runs only inside the child: three appends, the second failing half-way.
    #[test]
    fn append_child() {
        let Some(path) = std::env::var_os(APPEND_CHILD_ENV) else {
            return;
        };
        let mut outbox = Outbox::open(path.as_ref()).unwrap();
        outbox.append(message(1)).unwrap();
        assert!(outbox.append(message(2)).is_err());
        outbox.append(message(3)).unwrap();
    }

    /// A record written half-way before an error is cut off: left in place, it would hide
    /// every later message at the next open.
    #[test]
    fn a_failed_append_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nats.outbox");
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "native::outbox::tests::append_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(APPEND_CHILD_ENV, &path)
            .env(daemon::failpoint::ENV, format!("{APPEND_FAILPOINT}=2*1"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(ids(&Outbox::open(&path).unwrap()), ["dc=x:1:1", "dc=x:3:1"]);
    }

    /// An outbox whose file could not be mended refuses appends, and the next shrink
    /// rewrites it from the pending messages.
    #[test]
    fn a_broken_outbox_refuses_appends_until_shrink_rewrites_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nats.outbox");
        let mut outbox = Outbox::open(&path).unwrap();
        outbox.append(message(1)).unwrap();
        // A file that takes neither the write nor the cut.
        outbox.file = File::open(&path).unwrap();
        assert!(outbox.append(message(2)).is_err());
        outbox.file = OpenOptions::new().append(true).open(&path).unwrap();
        let refused = outbox.append(message(3)).unwrap_err();
        assert!(
            refused.to_string().contains("could not be cut off"),
            "{refused}"
        );
        outbox.shrink().unwrap();
        outbox.append(message(4)).unwrap();
        drop(outbox);
        assert_eq!(ids(&Outbox::open(&path).unwrap()), ["dc=x:1:1", "dc=x:4:1"]);
    }

    #[test]
    fn reopen_returns_what_was_appended_and_not_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nats.outbox");
        let mut outbox = Outbox::open(&path).unwrap();
        for n in 1..=5 {
            outbox.append(message(n)).unwrap();
        }
        outbox.acknowledge(2);
        outbox.shrink().unwrap();
        outbox.sync().unwrap();
        drop(outbox);
        // The acknowledged records stay in the file until it is shrunk: reopening
        // re-publishes them (the stream drops the duplicates), never loses a later one.
        let mut outbox = Outbox::open(&path).unwrap();
        let got: Vec<Message> = outbox.pending().cloned().collect();
        assert_eq!(got, (1..=5).map(message).collect::<Vec<_>>());
        assert_eq!(outbox.last_id(), Some("dc=x:5:1"));
        outbox.acknowledge(5);
        outbox.shrink().unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            0,
            "all acknowledged"
        );
        outbox.append(message(6)).unwrap();
        drop(outbox);
        assert_eq!(ids(&Outbox::open(&path).unwrap()), ["dc=x:6:1"]);
    }

    #[test]
    fn a_torn_or_damaged_tail_is_cut_and_later_appends_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nats.outbox");
        let mut outbox = Outbox::open(&path).unwrap();
        for n in 1..=3 {
            outbox.append(message(n)).unwrap();
        }
        drop(outbox);
        let whole = std::fs::read(&path).unwrap();
        let third = encode(&message(3)).len();
        // Every cut inside the third record leaves the first two.
        for cut in (whole.len() - third + 1)..whole.len() {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let mut outbox = Outbox::open(&path).unwrap();
            assert_eq!(ids(&outbox), ["dc=x:1:1", "dc=x:2:1"], "cut at {cut}");
            assert_eq!(
                std::fs::metadata(&path).unwrap().len() as usize,
                whole.len() - third,
                "the torn record is cut off"
            );
            outbox.append(message(4)).unwrap();
            drop(outbox);
            assert_eq!(
                ids(&Outbox::open(&path).unwrap()),
                ["dc=x:1:1", "dc=x:2:1", "dc=x:4:1"]
            );
        }
        // A flipped payload byte in the second record: the CRC stops reading there.
        let mut damaged = whole.clone();
        let second_end = whole.len() - third;
        damaged[second_end - 1] ^= 0x40;
        std::fs::write(&path, &damaged).unwrap();
        assert_eq!(ids(&Outbox::open(&path).unwrap()), ["dc=x:1:1"]);
    }

    #[test]
    fn compaction_keeps_the_pending_messages_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nats.outbox");
        let mut outbox = Outbox::open(&path).unwrap();
        let big = Message {
            id: "dc=x:1:1".to_owned(),
            subject: "udl.m".to_owned(),
            payload: Bytes::from(vec![b'x'; 64 << 10]),
        };
        let count = (COMPACT_BYTES / (64 << 10)) as usize + 2;
        for n in 0..count {
            outbox
                .append(Message {
                    id: format!("dc=x:{n}:1"),
                    ..big.clone()
                })
                .unwrap();
        }
        outbox.acknowledge(count - 2);
        outbox.shrink().unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(
            size < 2 * (70 << 10),
            "rewritten without the acknowledged: {size}"
        );
        outbox.append(message(99)).unwrap();
        drop(outbox);
        let expected = [
            format!("dc=x:{}:1", count - 2),
            format!("dc=x:{}:1", count - 1),
            "dc=x:99:1".to_owned(),
        ];
        assert_eq!(ids(&Outbox::open(&path).unwrap()), expected);
    }
}
