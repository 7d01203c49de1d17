//! Intake from the UCS queue file `<ldap-dir>/listener/listener` written by slapd's translog
//! overlay (or a cascading listener), spec/notifier.md §1.4.
//!
//! The file is taken over by renaming it to `listener.priv` under the fcntl lock on
//! `listener.lock` and recreating it with the same mode and owner; the private file is
//! drained, committed, and only then removed, so a crash at any point replays it and ids at
//! or below the last committed one are skipped. Unlike UCS, a malformed line never aborts:
//! it is appended to `listener.quarantine` with a loud error, and a gap in the ids is filled
//! with no-op transactions (what `univention-translog check --fix` does).

use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Read as _, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use inotify::{Inotify, WatchMask};
use proto::{LineError, MAX_LINE_LEN, Transaction};
use tokio_util::sync::CancellationToken;

use crate::committer::{CommitError, Committer, Replaced};
use crate::metrics::Metrics;
use daemon::fs::{FileError, file_err};
use daemon::lock::{LockError, lock_path, try_lock_file};
use daemon::paths::QueueFiles;

/// Transactions committed together: one translog pipeline round and one fdatasync.
const BATCH_SIZE: usize = 1024;
/// Retry delay while another process holds a lock we need.
const BUSY_RETRY: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Commit(#[from] CommitError),
}

#[derive(Debug, Clone)]
pub struct QueueFileConfig {
    /// `<ldap-dir>/listener`
    pub dir: PathBuf,
    pub lock_attempts: u32,
    pub lock_delay: Duration,
    /// Safety net in case an inotify event is missed.
    pub poll_interval: Duration,
    /// A larger jump in ids is quarantined instead of filled: it is garbage, not a gap.
    pub max_gap: u64,
    /// After this long without a transaction, say (again) which file is waited on; zero:
    /// never.
    pub idle_report: Duration,
}

pub struct QueueFileIntake {
    config: QueueFileConfig,
    metrics: Arc<Metrics>,
}

enum Drain {
    /// Nothing left to read.
    Empty,
    /// Another process holds a lock; try again shortly.
    Busy,
}

impl QueueFileIntake {
    pub fn new(config: QueueFileConfig, metrics: Arc<Metrics>) -> QueueFileIntake {
        QueueFileIntake { config, metrics }
    }

    fn files(&self) -> QueueFiles {
        QueueFiles::in_dir(&self.config.dir)
    }

    fn queue_path(&self) -> PathBuf {
        self.files().queue()
    }

    fn private_path(&self) -> PathBuf {
        self.files().private()
    }

    fn lock_path(&self) -> PathBuf {
        self.files().lock()
    }

    pub(crate) fn quarantine_path(&self) -> PathBuf {
        self.config.dir.join("listener.quarantine")
    }

    /// Follows the queue until `shutdown`; returns early only on errors it cannot wait out.
    pub async fn run(
        self,
        committer: &mut Committer,
        shutdown: CancellationToken,
    ) -> Result<(), QueueError> {
        fs::create_dir_all(&self.config.dir).map_err(file_err("create", &self.config.dir))?;
        let inotify =
            Inotify::init().map_err(file_err("initialise inotify for", &self.config.dir))?;
        inotify
            .watches()
            .add(
                &self.config.dir,
                WatchMask::MODIFY
                    | WatchMask::CLOSE_WRITE
                    | WatchMask::MOVED_TO
                    | WatchMask::CREATE,
            )
            .map_err(file_err("watch", &self.config.dir))?;
        let mut events = inotify
            .into_event_stream([0u8; 4096])
            .map_err(file_err("read inotify events for", &self.config.dir))?;
        // Without this nothing in the log tells an operator what the notifier waits for.
        tracing::info!(
            "waiting for transactions in {} (appended by slapd's translog overlay or a \
             cascading listener)",
            self.queue_path().display()
        );
        let mut idle = IdleReport::new(self.config.idle_report, committer.last_id());
        loop {
            committer.heartbeat().beat();
            let wait = match self.drain(committer, &shutdown).await {
                Ok(Drain::Empty) => self.config.poll_interval,
                Ok(Drain::Busy) => BUSY_RETRY,
                Err(QueueError::Commit(CommitError::Shutdown)) => return Ok(()),
                Err(err) => return Err(err),
            };
            if let Some(quiet) = idle.due(committer.last_id(), Instant::now()) {
                tracing::info!(
                    "no new transaction in {} for {} s (last id {}); slapd's translog \
                     overlay appends there",
                    self.queue_path().display(),
                    quiet.as_secs(),
                    committer.last_id()
                );
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                event = events.next() => {
                    if let Some(Err(err)) = event {
                        tracing::warn!("inotify on {}: {err}", self.config.dir.display());
                    }
                }
                _ = tokio::time::sleep(wait.min(committer.heartbeat().idle_interval())) => {}
            }
        }
    }

    /// Drains the private file, then takes over the queue, until both are empty.
    async fn drain(
        &self,
        committer: &mut Committer,
        shutdown: &CancellationToken,
    ) -> Result<Drain, QueueError> {
        loop {
            if shutdown.is_cancelled() {
                return Err(CommitError::Shutdown.into());
            }
            if non_empty(&self.private_path())? {
                if let Drain::Busy = self.drain_private(committer, shutdown).await? {
                    return Ok(Drain::Busy);
                }
                continue;
            }
            if !non_empty(&self.queue_path())? {
                return Ok(Drain::Empty);
            }
            if !self.take_over()? {
                return Ok(Drain::Busy);
            }
        }
    }

    /// Renames the queue to the private file under `listener.lock` and recreates it with
    /// the same mode and owner ("some tools expect the file to exist"). False when the lock
    /// is busy.
    fn take_over(&self) -> Result<bool, QueueError> {
        let _lock = match lock_path(
            &self.lock_path(),
            self.config.lock_attempts,
            self.config.lock_delay,
        ) {
            Ok(lock) => lock,
            Err(LockError::Busy { .. }) => return Ok(false),
            Err(err) => return Err(err.into()),
        };
        let queue = self.queue_path();
        let meta = fs::metadata(&queue).map_err(file_err("read the metadata of", &queue))?;
        if meta.len() == 0 {
            return Ok(true);
        }
        fs::rename(&queue, self.private_path()).map_err(file_err("rename", &queue))?;
        let mode = meta.mode() & 0o7777;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(mode)
            .open(&queue)
            .map_err(file_err("recreate", &queue))?;
        // The umask may have narrowed the mode; the owner matters for slapd's overlay.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(file_err("set the mode of", &queue))?;
        std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()))
            .map_err(file_err("set the owner of", &queue))?;
        Ok(true)
    }

    async fn drain_private(
        &self,
        committer: &mut Committer,
        shutdown: &CancellationToken,
    ) -> Result<Drain, QueueError> {
        let path = self.private_path();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(file_err("open", &path))?;
        if !try_lock_file(&file).map_err(file_err("lock", &path))? {
            tracing::warn!("{} is locked by another process; waiting", path.display());
            return Ok(Drain::Busy);
        }
        let mut reader = BufReader::with_capacity(256 * 1024, &file);
        let mut next_id = committer.last_id() + 1;
        let mut batch: Vec<Transaction> = Vec::with_capacity(BATCH_SIZE);
        let mut raw = Vec::new();
        let mut line_no = 0u64;
        loop {
            let read = read_bounded_line(&mut reader, &mut raw).map_err(file_err("read", &path))?;
            match read {
                Read::End => break,
                Read::Line => {}
                Read::TooLong => {
                    line_no += 1;
                    self.quarantine_too_long(&mut reader, &raw, line_no, &path)?;
                    continue;
                }
            }
            line_no += 1;
            if raw.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            match Transaction::parse_queue_line(&raw) {
                Ok(tx) => self.accept(tx, &raw, line_no, &mut next_id, &mut batch, committer)?,
                Err(err) => self.quarantine(&raw, line_no, &err)?,
            }
            if batch.len() >= BATCH_SIZE {
                self.commit(committer, std::mem::take(&mut batch), shutdown)
                    .await?;
            }
        }
        self.commit(committer, batch, shutdown).await?;
        // Everything in the file is durable in the log now: acknowledge by removing it.
        fs::remove_file(&path).map_err(file_err("remove", &path))?;
        drop(file);
        Ok(Drain::Empty)
    }

    fn accept(
        &self,
        tx: Transaction,
        raw: &[u8],
        line_no: u64,
        next_id: &mut u64,
        batch: &mut Vec<Transaction>,
        committer: &Committer,
    ) -> Result<(), QueueError> {
        let id = tx.id.get();
        if id < *next_id {
            tracing::debug!("skipping old transaction {id} (already committed)");
            return Ok(());
        }
        if id > *next_id {
            let gap = id - *next_id;
            if gap > self.config.max_gap {
                let reason = format!(
                    "id {id} jumps {gap} ids past the expected {}; more than --max-gap {}",
                    *next_id, self.config.max_gap
                );
                return self.quarantine_line(raw, line_no, &reason);
            }
            tracing::warn!(
                "transactions {}..{} are missing from the queue; filling them with no-op modifies",
                *next_id,
                id - 1
            );
            for missing in *next_id..id {
                batch.push(committer.filler(missing, &tx.dn));
            }
            self.metrics.filled(gap);
        }
        *next_id = id + 1;
        batch.push(tx);
        Ok(())
    }

    async fn commit(
        &self,
        committer: &mut Committer,
        batch: Vec<Transaction>,
        shutdown: &CancellationToken,
    ) -> Result<(), QueueError> {
        self.metrics.set_intake_lag(batch.len() as u64);
        let replaced = committer.commit(batch, shutdown).await?;
        self.metrics.set_intake_lag(0);
        for Replaced { original, reason } in replaced {
            self.metrics.filled(1);
            self.quarantine_line(original.to_line().as_bytes(), 0, &reason)?;
        }
        Ok(())
    }

    fn quarantine(&self, raw: &[u8], line_no: u64, err: &LineError) -> Result<(), QueueError> {
        self.quarantine_line(raw, line_no, &err.to_string())
    }

    fn open_quarantine(&self) -> Result<(fs::File, PathBuf), QueueError> {
        let path = self.quarantine_path();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(file_err("open", &path))?;
        Ok((file, path))
    }

    /// Quarantines a line longer than [`MAX_LINE_LEN`] of which `prefix` has been read: the
    /// rest is copied through a fixed buffer, so a huge line never has to fit in memory, and
    /// the whole line is kept for the administrator like any other malformed one.
    fn quarantine_too_long(
        &self,
        reader: &mut impl BufRead,
        prefix: &[u8],
        line_no: u64,
        source: &Path,
    ) -> Result<(), QueueError> {
        let (mut file, path) = self.open_quarantine()?;
        file.write_all(prefix).map_err(file_err("write", &path))?;
        let mut len = prefix.len();
        let mut ended = false;
        while !ended {
            let chunk = reader.fill_buf().map_err(file_err("read", source))?;
            if chunk.is_empty() {
                break;
            }
            let take = match chunk.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    ended = true;
                    pos + 1
                }
                None => chunk.len(),
            };
            let part = chunk.get(..take).unwrap_or(chunk);
            file.write_all(part).map_err(file_err("write", &path))?;
            len = len.saturating_add(take);
            reader.consume(take);
        }
        if !ended {
            file.write_all(b"\n").map_err(file_err("write", &path))?;
            len = len.saturating_add(1);
        }
        file.sync_data().map_err(file_err("sync", &path))?;
        self.metrics.quarantined();
        let err = LineError::TooLong {
            len,
            max: MAX_LINE_LEN,
        };
        tracing::error!(
            "invalid transaction line {line_no} ({err}): starts {:?}; moved to {}",
            String::from_utf8_lossy(prefix.get(..80).unwrap_or(prefix)),
            path.display()
        );
        Ok(())
    }

    /// Appends the raw line to the quarantine file (durably: the queue it came from is
    /// about to be removed) and says so loudly.
    fn quarantine_line(&self, raw: &[u8], line_no: u64, reason: &str) -> Result<(), QueueError> {
        let (mut file, path) = self.open_quarantine()?;
        let mut line = raw.to_vec();
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        file.write_all(&line).map_err(file_err("write", &path))?;
        file.sync_data().map_err(file_err("sync", &path))?;
        self.metrics.quarantined();
        tracing::error!(
            "invalid transaction line {line_no} ({reason}): {:?}; moved to {}",
            String::from_utf8_lossy(raw.strip_suffix(b"\n").unwrap_or(raw)),
            path.display()
        );
        Ok(())
    }
}

/// When to say that nothing arrives: after `every` without a new last id, then again
/// every `every` while it stays so.
struct IdleReport {
    every: Duration,
    last_id: u64,
    since: Instant,
    reported: Option<Instant>,
}

impl IdleReport {
    fn new(every: Duration, last_id: u64) -> IdleReport {
        IdleReport {
            every,
            last_id,
            since: Instant::now(),
            reported: None,
        }
    }

    /// How long it has been quiet, when a report is due now.
    fn due(&mut self, last_id: u64, now: Instant) -> Option<Duration> {
        if last_id != self.last_id {
            self.last_id = last_id;
            self.since = now;
            self.reported = None;
            return None;
        }
        if self.every.is_zero() {
            return None;
        }
        let from = self.reported.unwrap_or(self.since);
        if now.saturating_duration_since(from) < self.every {
            return None;
        }
        self.reported = Some(now);
        Some(now.saturating_duration_since(self.since))
    }
}

/// What [`read_bounded_line`] found.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    End,
    /// A whole line (the last one possibly without its newline) is in the buffer.
    Line,
    /// The buffer holds the first [`MAX_LINE_LEN`] bytes of a longer line; the rest is
    /// still unread.
    TooLong,
}

/// Reads one line into `raw` (cleared first), but never more than [`MAX_LINE_LEN`] bytes:
/// a queue file holding one huge line without a newline must not exhaust memory. A line of
/// exactly `MAX_LINE_LEN` bytes without its newline is too long as well, because the
/// newline counts towards the limit.
fn read_bounded_line(reader: &mut impl BufRead, raw: &mut Vec<u8>) -> io::Result<Read> {
    raw.clear();
    let limit = u64::try_from(MAX_LINE_LEN).unwrap_or(u64::MAX);
    let n = reader.take(limit).read_until(b'\n', raw)?;
    Ok(if n == 0 {
        Read::End
    } else if raw.len() >= MAX_LINE_LEN && raw.last() != Some(&b'\n') {
        Read::TooLong
    } else {
        Read::Line
    })
}

fn non_empty(path: &Path) -> Result<bool, QueueError> {
    match fs::metadata(path) {
        Ok(meta) => Ok(meta.len() > 0),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(file_err("read the metadata of", path)(err).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endless line without a newline: reading it unbounded (`read_until`) never returns
    /// and eats all memory; the bounded read stops after `MAX_LINE_LEN` bytes.
    #[test]
    fn an_endless_line_is_read_only_up_to_the_limit() {
        let mut endless = BufReader::new(io::repeat(b'x'));
        let mut raw = Vec::new();
        assert_eq!(
            read_bounded_line(&mut endless, &mut raw).unwrap(),
            Read::TooLong
        );
        assert_eq!(raw.len(), MAX_LINE_LEN);
    }

    #[test]
    fn idle_reports_after_each_quiet_interval_and_reset_on_progress() {
        let every = Duration::from_secs(10);
        let mut idle = IdleReport::new(every, 5);
        let t0 = idle.since;
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(idle.due(5, at(9)), None);
        assert_eq!(idle.due(5, at(10)), Some(Duration::from_secs(10)));
        assert_eq!(idle.due(5, at(15)), None);
        assert_eq!(idle.due(5, at(21)), Some(Duration::from_secs(21)));
        // A transaction arrived: quiet again from then on.
        assert_eq!(idle.due(6, at(22)), None);
        assert_eq!(idle.due(6, at(31)), None);
        assert_eq!(idle.due(6, at(32)), Some(Duration::from_secs(10)));
        let mut never = IdleReport::new(Duration::ZERO, 1);
        assert_eq!(never.due(1, at(1000)), None);
    }

    #[test]
    fn lines_up_to_the_limit_are_whole() {
        let exact = format!("1 cn={} m\n", "x".repeat(MAX_LINE_LEN - 8));
        assert_eq!(exact.len(), MAX_LINE_LEN);
        let unterminated = "x".repeat(MAX_LINE_LEN - 1);
        let text = format!("{exact}2 cn=y a\n{unterminated}");
        let mut reader = BufReader::with_capacity(64, text.as_bytes());
        let mut raw = Vec::new();
        let mut got = Vec::new();
        loop {
            let read = read_bounded_line(&mut reader, &mut raw).unwrap();
            if read == Read::End {
                break;
            }
            got.push((read, raw.len()));
        }
        assert_eq!(
            got,
            [
                (Read::Line, MAX_LINE_LEN),
                (Read::Line, 9),
                (Read::Line, MAX_LINE_LEN - 1)
            ]
        );
        // Without its newline a line of MAX_LINE_LEN bytes would be MAX_LINE_LEN + 1 long.
        let full = "x".repeat(MAX_LINE_LEN);
        let mut reader = BufReader::new(full.as_bytes());
        assert_eq!(
            read_bounded_line(&mut reader, &mut raw).unwrap(),
            Read::TooLong
        );
    }
}
