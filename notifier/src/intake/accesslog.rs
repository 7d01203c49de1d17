//! Intake from stock OpenLDAP: follows `cn=accesslog` with a syncrepl refreshAndPersist
//! search and turns each successful write into transactions (add → `a`, modify → `m`,
//! delete → `d`, modrdn → `r` for the old DN then `a` for the new DN).
//!
//! Exactly once across crashes: after every commit the position `(csn, id)` — the CSN of
//! the last accesslog entry committed and the last id it produced — is stored atomically.
//! On restart the follower resumes after that CSN and assigns ids from `id + 1` again; ids
//! the log already holds (a crash between commit and position save) are skipped. The
//! accesslog is append-only and replays in the same order, so the same entries get the
//! same ids.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ldap::decode::{BerError, RawEntry, SyncEntryState, parse_entry, parse_sync_info, sync_state};
use ldap3::controls::{RefreshMode, SyncRequest};
use ldap3::{Ldap, LdapError, Scope};
use proto::{Command, Transaction, TransactionId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::committer::{CommitError, Committer};
use crate::metrics::Metrics;
use daemon::backoff::Backoff;
use daemon::fs::{FileError, file_err};
use ldap::{Endpoint, connect};

/// File name of the stored position inside the notify directory.
pub const POSITION_FILE: &str = "accesslog.position";

const FILTER: &str = "(&(objectClass=auditWriteObject)(reqResult=0))";
const ATTRS: [&str; 6] = [
    "reqType",
    "reqDN",
    "reqNewRDN",
    "reqNewSuperior",
    "reqNewDN",
    "entryCSN",
];
/// Accesslog entries read ahead of the committer; bounds memory during a big replay.
const QUEUE_DEPTH: usize = 8192;
/// Transactions committed together.
const BATCH_SIZE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum AccesslogError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("invalid position file {path}: {reason}")]
    Position { path: PathBuf, reason: String },
    #[error(transparent)]
    Commit(#[from] CommitError),
}

#[derive(Debug, Clone)]
pub struct AccesslogConfig {
    pub endpoint: Endpoint,
    pub base: String,
    /// Without a stored position: replay the retained log instead of starting at its end.
    pub replay: bool,
    pub position_file: PathBuf,
}

/// Where the follower stands: everything up to `csn` is committed, ending at `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Empty: before the first retained entry.
    pub csn: String,
    pub id: u64,
}

impl Position {
    pub fn load(path: &Path) -> Result<Option<Position>, AccesslogError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(file_err("read", path)(err).into()),
        };
        Position::parse(&text)
            .map(Some)
            .map_err(|reason| AccesslogError::Position {
                path: path.to_owned(),
                reason,
            })
    }

    /// Parses the `csn=…` and `id=…` lines of a position file.
    pub fn parse(text: &str) -> Result<Position, String> {
        let mut csn = None;
        let mut id = None;
        for line in text.lines() {
            match line.split_once('=') {
                Some(("csn", value)) => csn = Some(value.to_owned()),
                Some(("id", value)) => {
                    id = Some(value.parse().map_err(|_| "id is not a number".to_owned())?)
                }
                _ => {}
            }
        }
        match (csn, id) {
            (Some(csn), Some(id)) => Ok(Position { csn, id }),
            _ => Err("expected csn=… and id=… lines".to_owned()),
        }
    }

    /// Writes atomically ([`daemon::fs::write_atomic`]) so a crash leaves the old or the new.
    pub fn store(&self, path: &Path) -> Result<(), AccesslogError> {
        let text = format!("csn={}\nid={}\n", self.csn, self.id);
        daemon::fs::write_atomic(path, text.as_bytes(), 0o600)?;
        Ok(())
    }
}

/// One accesslog entry, reduced to what becomes transactions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedWrite {
    pub csn: String,
    pub changes: Vec<(String, Command)>,
}

/// Maps an accesslog entry to its changes. Unusable entries yield no changes (and a
/// warning): the mapping must be deterministic, because replays rely on it.
pub(crate) fn changes_of(entry: &RawEntry) -> Result<LoggedWrite, String> {
    let csn = entry.first_str("entryCSN").ok_or("no entryCSN")?.to_owned();
    let dn = entry.first_str("reqDN").ok_or("no reqDN")?.to_owned();
    let changes = match entry.first_str("reqType").ok_or("no reqType")? {
        "add" => vec![(dn, Command::Add)],
        "modify" => vec![(dn, Command::Modify)],
        "delete" => vec![(dn, Command::Delete)],
        "modrdn" => {
            let new_dn = match entry.first_str("reqNewDN") {
                Some(new_dn) => new_dn.to_owned(),
                None => {
                    let rdn = entry
                        .first_str("reqNewRDN")
                        .ok_or("modrdn without reqNewRDN")?;
                    let superior = entry
                        .first_str("reqNewSuperior")
                        .map(str::to_owned)
                        .or_else(|| ldap::dn::parent(&dn).map(str::to_owned));
                    match superior {
                        Some(superior) if !superior.is_empty() => format!("{rdn},{superior}"),
                        _ => rdn.to_owned(),
                    }
                }
            };
            vec![(dn, Command::ModRdn), (new_dn, Command::Add)]
        }
        other => return Err(format!("unknown reqType {other:?}")),
    };
    Ok(LoggedWrite { csn, changes })
}

enum Event {
    Write(LoggedWrite),
    Failed(String),
}

pub struct AccesslogIntake {
    config: AccesslogConfig,
    metrics: Arc<Metrics>,
}

impl AccesslogIntake {
    pub fn new(config: AccesslogConfig, metrics: Arc<Metrics>) -> AccesslogIntake {
        AccesslogIntake { config, metrics }
    }

    pub async fn run(
        self,
        committer: &mut Committer,
        shutdown: CancellationToken,
    ) -> Result<(), AccesslogError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut position = self
            .initial_position(committer, &shutdown, &mut backoff)
            .await?;
        let Some(mut current) = position.take() else {
            return Ok(());
        };
        let mut retention_checked = false;
        loop {
            let mut ldap = match connect(&self.config.endpoint).await {
                Ok(ldap) => ldap,
                Err(err) => {
                    tracing::error!(
                        "cannot connect to the accesslog at {}: {err}; retrying",
                        self.config.endpoint.uri
                    );
                    if !self.pause(committer, &mut backoff, &shutdown).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            if !retention_checked {
                match retention_gap(&mut ldap, &self.config.base, &current.csn).await {
                    Ok(None) => {}
                    Ok(Some(newest)) => tracing::error!(
                        "the access log no longer holds the last write the notifier read \
                         (CSN {}) but has newer ones (up to {newest}): writes in between may \
                         have been purged (logpurge) before the notifier read them, and then \
                         they are missing from the transaction log; compare the listeners' \
                         caches with the directory (univention-directory-listener-verify)",
                        current.csn
                    ),
                    // Not worth a retry loop: only a warning depends on it.
                    Err(err) => tracing::warn!("cannot check the access log's retention: {err}"),
                }
                retention_checked = true;
            }
            tracing::info!(
                "following {} after CSN {:?} (last id {})",
                self.config.base,
                current.csn,
                current.id
            );
            let (tx, mut rx) = mpsc::channel(QUEUE_DEPTH);
            let follower = tokio::spawn(follow(
                ldap,
                self.config.base.clone(),
                current.csn.clone(),
                tx,
            ));
            let outcome = self
                .consume(&mut rx, &mut current, committer, &shutdown, &mut backoff)
                .await;
            follower.abort();
            match outcome {
                Ok(true) => {
                    if !self.pause(committer, &mut backoff, &shutdown).await {
                        return Ok(());
                    }
                }
                Ok(false) => return Ok(()),
                Err(AccesslogError::Commit(CommitError::Shutdown)) => return Ok(()),
                Err(err) => return Err(err),
            }
        }
    }

    /// Sleeps before a reconnect; false when shutting down instead.
    async fn pause(
        &self,
        committer: &Committer,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> bool {
        tokio::select! {
            _ = committer.heartbeat().waiting(backoff.wait()) => true,
            _ = shutdown.cancelled() => false,
        }
    }

    /// The stored position, or a new one: after the newest retained entry, or before the
    /// oldest with `replay`. `None` when shut down while waiting for LDAP.
    async fn initial_position(
        &self,
        committer: &Committer,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<Option<Position>, AccesslogError> {
        let last_id = committer.last_id();
        if let Some(mut position) = Position::load(&self.config.position_file)? {
            if position.id > last_id {
                tracing::warn!(
                    "accesslog position claims id {} but the log ends at {last_id}; continuing from {last_id}",
                    position.id
                );
                position.id = last_id;
            }
            return Ok(Some(position));
        }
        let csn = if self.config.replay {
            tracing::info!("no stored accesslog position: replaying the retained access log");
            String::new()
        } else {
            loop {
                match self.newest_csn().await {
                    Ok(csn) => break csn,
                    Err(err) => {
                        // Named here: a failed bind's error does not say which server.
                        tracing::error!(
                            "cannot read the accesslog's contextCSN from {}: {err}; retrying",
                            self.config.endpoint.uri
                        );
                        if !self.pause(committer, backoff, shutdown).await {
                            return Ok(None);
                        }
                    }
                }
            }
        };
        let position = Position { csn, id: last_id };
        position.store(&self.config.position_file)?;
        tracing::info!("starting at accesslog CSN {:?}", position.csn);
        Ok(Some(position))
    }

    async fn newest_csn(&self) -> Result<String, String> {
        let mut ldap = connect(&self.config.endpoint)
            .await
            .map_err(|e| e.to_string())?;
        let newest = newest_context_csn(&mut ldap, &self.config.base).await;
        let _ = ldap.unbind().await;
        newest
    }

    /// Commits what the follower delivers. `Ok(true)`: the connection was lost, reconnect;
    /// `Ok(false)`: shutdown.
    async fn consume(
        &self,
        rx: &mut mpsc::Receiver<Event>,
        position: &mut Position,
        committer: &mut Committer,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<bool, AccesslogError> {
        let heartbeat = committer.heartbeat().clone();
        loop {
            let first = tokio::select! {
                event = heartbeat.waiting(rx.recv()) => event,
                _ = shutdown.cancelled() => return Ok(false),
            };
            let mut writes = Vec::new();
            let mut failure = None;
            let mut count = 0;
            let mut next = first;
            loop {
                match next {
                    Some(Event::Write(write)) => {
                        count += write.changes.len();
                        writes.push(write);
                    }
                    Some(Event::Failed(reason)) => failure = Some(reason),
                    None => failure = Some("the syncrepl search ended".to_owned()),
                }
                if failure.is_some() || count >= BATCH_SIZE {
                    break;
                }
                next = match rx.try_recv() {
                    Ok(event) => Some(event),
                    Err(_) => break,
                };
            }
            self.metrics.set_intake_lag(rx.len() as u64 + count as u64);
            if !writes.is_empty() {
                self.commit(writes, position, committer, shutdown).await?;
                backoff.reset();
            }
            if let Some(reason) = failure {
                tracing::error!("lost the accesslog follow: {reason}; reconnecting");
                return Ok(true);
            }
        }
    }

    async fn commit(
        &self,
        writes: Vec<LoggedWrite>,
        position: &mut Position,
        committer: &mut Committer,
        shutdown: &CancellationToken,
    ) -> Result<(), AccesslogError> {
        let already = committer.last_id();
        let mut next_id = position.id;
        let mut txs = Vec::new();
        let mut last_csn = position.csn.clone();
        for write in writes {
            for (dn, command) in write.changes {
                next_id += 1;
                // Committed before a crash that lost the position update.
                if next_id > already {
                    txs.push(Transaction {
                        id: TransactionId(next_id),
                        dn,
                        command,
                    });
                }
            }
            last_csn = write.csn;
        }
        committer.commit(txs, shutdown).await?;
        *position = Position {
            csn: last_csn,
            id: next_id,
        };
        position.store(&self.config.position_file)?;
        self.metrics.set_intake_lag(0);
        Ok(())
    }
}

/// Whether writes after `csn` may have been purged from the access log before they were
/// read: the entry of `csn` is gone although newer ones exist (purging removes the oldest
/// entries first, so while that entry is there nothing after it is gone). Returns the
/// log's newest CSN then.
async fn retention_gap(ldap: &mut Ldap, base: &str, csn: &str) -> Result<Option<String>, String> {
    if csn.is_empty() {
        return Ok(None);
    }
    let newest = newest_context_csn(ldap, base).await?;
    if newest.as_str() <= csn {
        return Ok(None);
    }
    let filter = format!("(entryCSN={})", ldap3::ldap_escape(csn));
    let (found, _) = ldap
        .search(base, Scope::Subtree, &filter, vec!["1.1"])
        .await
        .and_then(|r| r.success())
        .map_err(|e| e.to_string())?;
    Ok(found.is_empty().then_some(newest))
}

/// The newest `contextCSN` of the access log's base entry (empty when it has none).
async fn newest_context_csn(ldap: &mut Ldap, base: &str) -> Result<String, String> {
    let (entries, _) = ldap
        .search(base, Scope::Base, "(objectClass=*)", vec!["contextCSN"])
        .await
        .and_then(|r| r.success())
        .map_err(|e| e.to_string())?;
    // CSNs start with a generalized time, so they order as strings.
    Ok(entries
        .into_iter()
        .filter_map(|e| parse_entry(e).ok())
        .flat_map(|e| {
            e.values("contextCSN")
                .unwrap_or_default()
                .iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap_or_default())
}

/// Runs the syncrepl search and forwards writes in log order until it fails.
async fn follow(mut ldap: Ldap, base: String, csn: String, tx: mpsc::Sender<Event>) {
    let failure = match follow_inner(&mut ldap, &base, &csn, &tx).await {
        Ok(()) => "the server ended the syncrepl search".to_owned(),
        Err(reason) => reason,
    };
    let _ = tx.send(Event::Failed(failure)).await;
}

async fn follow_inner(
    ldap: &mut Ldap,
    base: &str,
    csn: &str,
    tx: &mpsc::Sender<Event>,
) -> Result<(), String> {
    let cookie = (!csn.is_empty()).then(|| format!("rid=000,csn={csn}").into_bytes());
    let mut stream = ldap
        .with_controls(SyncRequest {
            mode: RefreshMode::RefreshAndPersist,
            cookie,
            reload_hint: false,
        })
        .streaming_search(base, Scope::Subtree, FILTER, ATTRS.to_vec())
        .await
        .map_err(|e: LdapError| e.to_string())?;
    while let Some(message) = stream.next().await.map_err(|e| e.to_string())? {
        if message.is_intermediate() {
            if let Ok(Some(info)) = parse_sync_info(&message)
                && info.refresh_done
            {
                tracing::debug!("accesslog refresh phase done; following live");
            }
            continue;
        }
        if message.is_ref() {
            continue;
        }
        let state = sync_state(&message).map_err(|e: BerError| e.to_string())?;
        // Deletions are logpurge expiring old entries, and present messages name entries
        // that did not change: neither is a write.
        if let Some(state) = &state
            && matches!(
                state.state,
                SyncEntryState::Delete | SyncEntryState::Present
            )
        {
            continue;
        }
        let entry = parse_entry(message).map_err(|e| e.to_string())?;
        match changes_of(&entry) {
            Ok(write) => {
                if tx.send(Event::Write(write)).await.is_err() {
                    return Ok(());
                }
            }
            Err(reason) => tracing::warn!("skipping accesslog entry {}: {reason}", entry.dn),
        }
    }
    let result = stream.finish().await;
    Err(format!("syncrepl search finished: {}", result.text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(attrs: &[(&str, &str)]) -> RawEntry {
        RawEntry {
            dn: "reqStart=1,cn=accesslog".into(),
            attrs: attrs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), vec![v.as_bytes().to_vec()]))
                .collect(),
        }
    }

    #[test]
    fn maps_each_request_type() {
        for (kind, command) in [
            ("add", Command::Add),
            ("modify", Command::Modify),
            ("delete", Command::Delete),
        ] {
            let w = changes_of(&entry(&[
                ("entryCSN", "c1"),
                ("reqType", kind),
                ("reqDN", "cn=a,dc=x"),
            ]))
            .unwrap();
            assert_eq!(w.changes, vec![("cn=a,dc=x".to_owned(), command)]);
            assert_eq!(w.csn, "c1");
        }
    }

    #[test]
    fn modrdn_becomes_r_then_a() {
        let with_new_dn = entry(&[
            ("entryCSN", "c"),
            ("reqType", "modrdn"),
            ("reqDN", "cn=a,ou=x,dc=x"),
            ("reqNewRDN", "cn=b"),
            ("reqNewDN", "cn=b,ou=y,dc=x"),
        ]);
        assert_eq!(
            changes_of(&with_new_dn).unwrap().changes,
            vec![
                ("cn=a,ou=x,dc=x".into(), Command::ModRdn),
                ("cn=b,ou=y,dc=x".into(), Command::Add)
            ]
        );
        let with_superior = entry(&[
            ("entryCSN", "c"),
            ("reqType", "modrdn"),
            ("reqDN", "cn=a,ou=x,dc=x"),
            ("reqNewRDN", "cn=b"),
            ("reqNewSuperior", "ou=z,dc=x"),
        ]);
        assert_eq!(
            changes_of(&with_superior).unwrap().changes[1].0,
            "cn=b,ou=z,dc=x"
        );
        let rename_only = entry(&[
            ("entryCSN", "c"),
            ("reqType", "modrdn"),
            ("reqDN", r"cn=a\,b,ou=x,dc=x"),
            ("reqNewRDN", "cn=c"),
        ]);
        assert_eq!(
            changes_of(&rename_only).unwrap().changes[1].0,
            "cn=c,ou=x,dc=x"
        );
    }

    #[test]
    fn unusable_entries_are_reported() {
        assert!(changes_of(&entry(&[("reqType", "add"), ("reqDN", "cn=a")])).is_err());
        assert!(
            changes_of(&entry(&[
                ("entryCSN", "c"),
                ("reqType", "bind"),
                ("reqDN", "cn=a")
            ]))
            .is_err()
        );
        assert!(
            changes_of(&entry(&[
                ("entryCSN", "c"),
                ("reqType", "modrdn"),
                ("reqDN", "cn=a")
            ]))
            .is_err()
        );
    }

    #[test]
    fn position_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accesslog.position");
        assert_eq!(Position::load(&path).unwrap(), None);
        let position = Position {
            csn: "20261121192913.255111Z#000000#000#000000".into(),
            id: 42,
        };
        position.store(&path).unwrap();
        assert_eq!(Position::load(&path).unwrap(), Some(position));
        fs::write(&path, "garbage").unwrap();
        assert!(Position::load(&path).is_err());
    }
}
