//! Read-ahead for protocol 3 (DESIGN.md decision 11): when the notifier reports more than
//! one new transaction, the translog entries and the objects of the next few ids are read
//! concurrently over the multiplexed LDAP connection while the engine works through them in
//! order. The engine only uses an answer when its own rules ask exactly that question
//! ([`Prefetched`]), so read-ahead changes timing, never the outcome.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use cache::Cache;
use ldap3::Ldap;
use proto::{Command, TransactionId};
use tokio::task::JoinHandle;

use crate::engine::Prefetched;
use ldap::search::{find_by_uuid, read_entry};
use ldap::translog::read_translog;
use ldap::{LdapFailure, Lookup, TranslogEntry};

/// What was read ahead for one id; `entry` is `Err` when even the translog read failed
/// (the caller then reads it itself, with retries).
pub struct Ahead {
    pub id: u64,
    pub entry: Result<Option<TranslogEntry>, LdapFailure>,
    pub prefetched: Prefetched,
}

pub struct Prefetcher {
    window: usize,
    translog_base: String,
    base: String,
    timeout: Duration,
    cache: Arc<Cache>,
    /// Next id to launch.
    next: u64,
    running: VecDeque<(u64, JoinHandle<Ahead>)>,
}

impl Prefetcher {
    pub fn new(
        window: usize,
        translog_base: String,
        base: String,
        timeout: Duration,
        cache: Arc<Cache>,
    ) -> Prefetcher {
        Prefetcher {
            window: window.max(1),
            translog_base,
            base,
            timeout,
            cache,
            next: 0,
            running: VecDeque::new(),
        }
    }

    /// Launches reads for ids `from..=last`, at most `window` ahead of `from`.
    pub fn fill(&mut self, handle: &Ldap, from: u64, last: u64) {
        if self.running.front().is_some_and(|(id, _)| *id != from) {
            self.clear();
        }
        if self.running.is_empty() {
            self.next = from;
        }
        while self.next <= last && self.running.len() < self.window {
            let id = self.next;
            let task = tokio::spawn(read_ahead(
                handle.clone(),
                id,
                self.translog_base.clone(),
                self.base.clone(),
                self.timeout,
                Arc::clone(&self.cache),
            ));
            self.running.push_back((id, task));
            self.next += 1;
        }
    }

    /// The read-ahead for `id`, if it is the next one launched.
    pub async fn take(&mut self, id: u64) -> Option<Ahead> {
        if self.running.front().is_none_or(|(first, _)| *first != id) {
            self.clear();
            return None;
        }
        let (_, task) = self.running.pop_front()?;
        task.await.ok()
    }

    /// Forgets everything in flight (after a reconnect or an error).
    pub fn clear(&mut self) {
        for (_, task) in self.running.drain(..) {
            task.abort();
        }
    }
}

async fn read_ahead(
    mut handle: Ldap,
    id: u64,
    translog_base: String,
    base: String,
    timeout: Duration,
    cache: Arc<Cache>,
) -> Ahead {
    let mut prefetched = Prefetched::default();
    let entry = read_translog(&mut handle, &translog_base, TransactionId(id), timeout).await;
    let Ok(Some(tx)) = &entry else {
        return Ahead {
            id,
            entry,
            prefetched,
        };
    };
    let cached_uuid = || {
        cache
            .get(&tx.dn)
            .ok()
            .flatten()
            .and_then(|e| e.entry_uuid().map(str::to_owned))
    };
    // An `r`'s object has left its DN: only the entryUUID search can find it. For the
    // others the cache is only consulted when the DN read finds nothing.
    let moved_away_uuid = if tx.command() == Some(Command::ModRdn) {
        cached_uuid()
    } else {
        None
    };
    let uuid = match moved_away_uuid {
        Some(uuid) => Some(uuid),
        None => {
            prefetched.by_dn = read_entry(&mut handle, &tx.dn, timeout).await.ok();
            match prefetched.by_dn {
                Some(Lookup::Found(_)) => None,
                _ => cached_uuid(),
            }
        }
    };
    if let Some(uuid) = uuid
        && let Ok(lookup) = find_by_uuid(&mut handle, &base, &uuid, timeout).await
    {
        prefetched.by_uuid = Some((uuid, lookup));
    }
    Ahead {
        id,
        entry,
        prefetched,
    }
}
