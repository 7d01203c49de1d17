//! Module (re)initialisation (spec listener.md §3.9, §4.4–4.6): `clean`, `initialize`, then
//! every object matching the module's filter with command `n`, parents first. Objects the
//! cache holds are passed as cached (so a pending transaction still finds its old state);
//! the others are read from LDAP, many at a time over the multiplexed connection.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use cache::CacheEntry;
use futures::StreamExt;
use modules::Command;

use crate::dispatch::{INITIALIZED, READY, Selection};
use crate::engine::{Engine, EngineError, SUBSCHEMA_DN};
use crate::ldap::{self, Lookup};
use crate::signals::Signals;

/// LDAP reads in flight during initialisation.
const FETCH_CONCURRENCY: usize = 32;
/// Objects per cache commit during initialisation.
const COMMIT_EVERY: usize = 1000;

/// Where an object's state for its `n` call comes from.
enum Source {
    Cached(CacheEntry),
    /// To be read from LDAP.
    Ldap(String),
    Fetched(proto::ldap::RawEntry),
}

/// Count, rate and ETA of an initialisation: a rewritten line on a terminal, a log line
/// every ten seconds otherwise.
struct Progress {
    module: String,
    total: usize,
    done: usize,
    started: Instant,
    last: Instant,
    terminal: bool,
}

impl Progress {
    fn new(module: &str, total: usize) -> Progress {
        let now = Instant::now();
        Progress {
            module: module.to_owned(),
            total,
            done: 0,
            started: now,
            last: now,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = self.done as f64 / secs;
        let eta = if rate > 0.0 {
            (self.total - self.done) as f64 / rate
        } else {
            0.0
        };
        format!(
            "initializing {}: {}/{} objects, {rate:.0}/s, ETA {eta:.0}s",
            self.module, self.done, self.total
        )
    }

    fn step(&mut self) {
        self.done += 1;
        let interval = if self.terminal {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(10)
        };
        if self.last.elapsed() < interval {
            return;
        }
        self.last = Instant::now();
        if self.terminal {
            let mut err = std::io::stderr();
            let _ = write!(err, "\r{}\x1b[K", self.line());
            let _ = err.flush();
        } else {
            tracing::info!("{}", self.line());
        }
    }

    fn finish(&self) {
        if self.terminal && self.total > 0 {
            let _ = writeln!(std::io::stderr(), "\r{}\x1b[K", self.line());
        }
        tracing::info!(
            "initialized {}: {} objects in {:.1}s",
            self.module,
            self.done,
            self.started.elapsed().as_secs_f64()
        );
    }
}

impl Engine {
    /// Initialises every module that is not READY, in call order. A module whose
    /// initialisation fails stays not ready (and is retried at the next start); transient
    /// LDAP failures are returned so the caller can retry later.
    /// A stop request (`signals`) interrupts the initialisation; the module stays not ready.
    pub async fn initialize_pending(
        &mut self,
        scan_timeout: Duration,
        signals: &Signals,
    ) -> Result<(), EngineError> {
        for index in self.handlers.not_ready() {
            self.initialize_module(index, scan_timeout, signals).await?;
        }
        Ok(())
    }

    async fn initialize_module(
        &mut self,
        index: usize,
        scan_timeout: Duration,
        signals: &Signals,
    ) -> Result<(), EngineError> {
        let name = self.handlers.name(index).to_owned();
        let state = self.handlers.state(index);
        tracing::info!("initializing module {name}");
        self.set_state(index, state | READY);
        let result = self
            .run_initialization(index, &name, scan_timeout, signals)
            .await;
        match &result {
            Ok(()) => self.set_state(index, INITIALIZED | READY),
            Err(e) => {
                tracing::error!("initialization of module {name} failed: {e}");
                self.set_state(index, state & !READY);
            }
        }
        result
    }

    fn set_state(&mut self, index: usize, state: u32) {
        if let Err(e) = self.handlers.set_state(index, state) {
            tracing::error!(
                "cannot write the state file of module {}: {e}",
                self.handlers.name(index)
            );
        }
    }

    async fn run_initialization(
        &mut self,
        index: usize,
        name: &str,
        scan_timeout: Duration,
        signals: &Signals,
    ) -> Result<(), EngineError> {
        self.commit_staged(false)?;
        self.handlers.clean_and_initialize(index);
        let removed = self.cache().remove_module_everywhere(name)?;
        tracing::debug!("module {name} removed from {removed} cache entries");
        let id = self.master().notifier_id;
        let empty = CacheEntry::default();

        if let Some(mut schema) = self.staged.get(SUBSCHEMA_DN)? {
            self.handlers.update(
                id,
                SUBSCHEMA_DN,
                &mut schema,
                &empty,
                Command::Init,
                Selection::Only(index),
            );
            self.store(schema);
        }

        let Some(filter) = self.handlers.filter_text(index).map(str::to_owned) else {
            tracing::info!("module {name} has no filter: nothing to initialize");
            return self.commit_staged(true);
        };
        let base = self.settings().base.clone();
        let mut dns = self.ldap.subtree_dns(&base, &filter, scan_timeout).await?;
        // Parents before children; stable, so siblings keep the server's order.
        dns.sort_by_key(String::len);
        self.update_schema().await?;

        let mut sources = Vec::with_capacity(dns.len());
        for dn in dns {
            sources.push(match self.staged.get(&dn)? {
                Some(cached) => Source::Cached(cached),
                None => Source::Ldap(dn),
            });
        }
        let mut progress = Progress::new(name, sources.len());
        let handle = self.ldap.handle().await?;
        let timeout = self.ldap.endpoint().timeout;
        let mut fetched = futures::stream::iter(sources)
            .map(|source| {
                let mut handle = handle.clone();
                async move {
                    match source {
                        Source::Cached(entry) => Ok(Some(Source::Cached(entry))),
                        Source::Ldap(dn) => {
                            match ldap::read_entry(&mut handle, &dn, timeout).await? {
                                Lookup::Found(entry) => Ok(Some(Source::Fetched(entry))),
                                // Deleted since the search (UCS stored an empty entry): its own
                                // transaction follows.
                                Lookup::Missing => Ok(None),
                            }
                        }
                        Source::Fetched(entry) => Ok(Some(Source::Fetched(entry))),
                    }
                }
            })
            .buffered(FETCH_CONCURRENCY);
        let mut since_commit = 0;
        while let Some(item) = fetched.next().await {
            if signals.stop_requested() {
                self.commit_staged(true)?;
                return Err(EngineError::Interrupted);
            }
            let item: Result<Option<Source>, ldap::LdapFailure> = item;
            let mut entry = match item? {
                Some(Source::Cached(entry)) => entry,
                Some(Source::Fetched(entry)) => self.to_cache_entry(entry),
                Some(Source::Ldap(_)) | None => {
                    progress.step();
                    continue;
                }
            };
            let dn = entry.dn.clone();
            self.handlers.update(
                id,
                &dn,
                &mut entry,
                &empty,
                Command::Init,
                Selection::Only(index),
            );
            self.store(entry);
            progress.step();
            since_commit += 1;
            if since_commit >= COMMIT_EVERY {
                self.commit_staged(false)?;
                since_commit = 0;
            }
        }
        progress.finish();
        self.commit_staged(true)
    }

    /// Commits what is staged, with the current master record.
    pub fn commit_staged(&mut self, durable: bool) -> Result<(), EngineError> {
        let batch = self.take_master_batch();
        self.cache().commit(batch, durable)?;
        Ok(())
    }
}
