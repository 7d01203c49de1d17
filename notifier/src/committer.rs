//! The one path by which a transaction becomes visible: `cn=translog` entry, then the log
//! line and index entry, then `fdatasync`, then the new last id is published to clients.
//! A crash anywhere before the publish loses nothing the intake has acknowledged, because
//! intakes acknowledge (remove `listener.priv`, store the accesslog position) only after
//! `commit` returns.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use proto::{Command, Transaction, TransactionId};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::journal::{Journal, JournalError, MAX_UNSYNCED};
use crate::metrics::Metrics;
use crate::translog::TranslogWriter;
use daemon::backoff::Backoff;
use daemon::systemd::Heartbeat;

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("transaction log: {0}")]
    Journal(#[from] JournalError),
    /// After a failed fsync the kernel may report a later one as successful although the
    /// data is gone: the ids would be announced and, after a crash, reused for other
    /// writes. Nothing is announced; the daemon exits and its start-up scan of the log
    /// decides what stays.
    #[error(
        "cannot sync the transaction log ({0}); exiting without announcing: the start-up \
         scan of the log decides what stays"
    )]
    SyncFailed(JournalError),
    #[error("the transaction log lock is poisoned by an earlier panic")]
    Poisoned,
    #[error("background task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("shutting down")]
    Shutdown,
}

/// A transaction slapd refused in `cn=translog`, replaced by a harmless no-op modify so the
/// id sequence stays gap-free for listeners.
#[derive(Debug, Clone)]
pub struct Replaced {
    pub original: Transaction,
    pub reason: String,
}

pub struct Committer {
    journal: Arc<RwLock<Journal>>,
    translog: Option<TranslogWriter>,
    published: watch::Sender<u64>,
    /// DN of the no-op transactions used to fill gaps (normally the LDAP base).
    filler_dn: Option<String>,
    metrics: Arc<Metrics>,
    /// Beaten by every commit and by the intakes while they wait for work; the watchdog
    /// is fed only while it beats.
    heartbeat: Heartbeat,
}

impl Committer {
    pub fn new(
        journal: Arc<RwLock<Journal>>,
        translog: Option<TranslogWriter>,
        published: watch::Sender<u64>,
        filler_dn: Option<String>,
        metrics: Arc<Metrics>,
        heartbeat: Heartbeat,
    ) -> Committer {
        Committer {
            journal,
            translog,
            published,
            filler_dn,
            metrics,
            heartbeat,
        }
    }

    /// The intakes beat it while they wait for changes.
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heartbeat
    }

    /// The last committed (and announced) id.
    pub fn last_id(&self) -> u64 {
        *self.published.borrow()
    }

    /// A no-op modify for `id`, used for gaps and for rejected transactions; it makes
    /// listeners re-read an existing object, which changes nothing.
    pub fn filler(&self, id: u64, near: &str) -> Transaction {
        Transaction {
            id: TransactionId(id),
            dn: self.filler_dn.clone().unwrap_or_else(|| near.to_owned()),
            command: Command::Modify,
        }
    }

    /// Commits consecutive transactions starting at `last_id() + 1`, retrying storage and
    /// LDAP trouble with backoff until it succeeds or `shutdown` fires. Returns what had to
    /// be replaced.
    pub async fn commit(
        &mut self,
        mut txs: Vec<Transaction>,
        shutdown: &CancellationToken,
    ) -> Result<Vec<Replaced>, CommitError> {
        if txs.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let replaced = match self.translog.take() {
            Some(mut writer) => {
                // Retrying an unreachable or refusing slapd is a legitimate wait.
                let heartbeat = self.heartbeat.clone();
                let result = tokio::select! {
                    replaced = heartbeat.waiting(async {
                        self.find_filler_dn(&mut writer).await;
                        self.write_translog(&mut writer, &mut txs).await
                    }) => Ok(replaced),
                    _ = shutdown.cancelled() => Err(CommitError::Shutdown),
                };
                self.translog = Some(writer);
                result?
            }
            None => Vec::new(),
        };
        let count = txs.len();
        // Shared with the blocking task, so a retry needs no copy of the batch.
        let txs: Arc<[Transaction]> = txs.into();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let last = loop {
            match self.append_and_sync(Arc::clone(&txs)).await {
                Ok(last) => break last,
                Err(err @ CommitError::SyncFailed(_)) => return Err(err),
                Err(err) => {
                    tracing::error!("cannot commit {} transactions: {err}; retrying", txs.len());
                    tokio::select! {
                        _ = backoff.wait() => {}
                        _ = shutdown.cancelled() => return Err(CommitError::Shutdown),
                    }
                }
            }
        };
        self.published.send_replace(last);
        self.heartbeat.beat();
        self.metrics.record_commit(last, count, started.elapsed());
        Ok(replaced)
    }

    /// Without `--ldap-base` (or UCR `ldap/base`) the no-op transactions are named after
    /// the server's data base; asked until found.
    async fn find_filler_dn(&mut self, writer: &mut TranslogWriter) {
        if self.filler_dn.is_some() {
            return;
        }
        match writer.data_base().await {
            Ok(Some(base)) => {
                tracing::info!(
                    "LDAP base {base} (the server's naming context) names no-op transactions"
                );
                self.filler_dn = Some(base);
            }
            Ok(None) => tracing::warn!(
                "cannot tell the LDAP base from the server's naming contexts; give --ldap-base"
            ),
            Err(e) => tracing::debug!("naming contexts: {e}"),
        }
    }

    /// Writes the translog entries; a transaction slapd rejects is replaced by a no-op,
    /// and while even the no-op is rejected nothing is committed: an id is never announced
    /// without its entry (protocol-3 listeners would wait for it for ever). Returns only
    /// when every entry exists (the caller gives up on shutdown).
    async fn write_translog(
        &self,
        writer: &mut TranslogWriter,
        txs: &mut [Transaction],
    ) -> Vec<Replaced> {
        let mut replaced = Vec::new();
        let mut rejections = writer.write(txs).await;
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        while !rejections.is_empty() {
            let mut retry = Vec::new();
            let mut stalled = Vec::new();
            for rejection in rejections {
                let Some(tx) = txs.iter_mut().find(|tx| tx.id.get() == rejection.id) else {
                    continue;
                };
                let filler = self.filler(rejection.id, &tx.dn);
                self.metrics.translog_rejected();
                if *tx == filler {
                    stalled.push(format!("{tx} ({})", rejection.reason));
                } else {
                    tracing::error!(
                        "slapd rejected the translog entry for transaction {tx}: {}; \
                         committing it as the no-op {filler} instead",
                        rejection.reason
                    );
                    replaced.push(Replaced {
                        original: std::mem::replace(tx, filler),
                        reason: rejection.reason,
                    });
                }
                retry.push(tx.clone());
            }
            if !stalled.is_empty() {
                let why = format!(
                    "nothing is announced: slapd rejects the translog entry of the no-op \
                     {}; fix the LDAP base (--ldap-base, UCR ldap/base) or slapd's \
                     cn=translog database",
                    stalled.join(", ")
                );
                tracing::error!("{why}");
                self.metrics.set_translog_stalled(true);
                daemon::systemd::status(&format!("stalled: {why}"));
                backoff.wait().await;
            }
            rejections = writer.write(&retry).await;
        }
        self.metrics.set_translog_stalled(false);
        replaced
    }

    async fn append_and_sync(&self, txs: Arc<[Transaction]>) -> Result<u64, CommitError> {
        let journal = Arc::clone(&self.journal);
        tokio::task::spawn_blocking(move || {
            // An earlier attempt may have appended part of this batch before failing; ids
            // are consecutive, so what is already there is a prefix.
            let last = journal.read().map_err(|_| CommitError::Poisoned)?.last_id();
            let done = txs.iter().take_while(|tx| tx.id.get() <= last).count();
            let rest = txs.get(done..).unwrap_or_default();
            // Synced in parts: the open trusts the log before its last MAX_UNSYNCED lines
            // (and synced once even when an earlier attempt appended it all).
            for part in rest
                .chunks(MAX_UNSYNCED)
                .chain(rest.is_empty().then_some(rest))
            {
                journal
                    .write()
                    .map_err(|_| CommitError::Poisoned)?
                    .append(part)?;
                // Synced under the read lock so clients can still look up older
                // transactions.
                let journal = journal.read().map_err(|_| CommitError::Poisoned)?;
                journal.sync().map_err(CommitError::SyncFailed)?;
            }
            Ok(journal.read().map_err(|_| CommitError::Poisoned)?.last_id())
        })
        .await?
    }
}
