//! The main loop (spec listener.md §2.2): ask the notifier for the next id, get its DN and
//! command, run the change engine, write the cascade line, commit cache and id together.
//! Idle time runs `postrun` and closes LDAP connections; the notifier connection is kept
//! alive with `ALIVE`. Unlike UCS, failures do not end the process: connections are
//! re-established with backoff and the same transaction is retried, so a supervisor never
//! sees a crash loop.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache::CacheError;
use daemon::backoff::Backoff;
use daemon::fs::FileError;
use daemon::tasks::run_blocking;
use proto::client::{ClientError, NotifierClient, parse_get_dn_reply};
use proto::{Request, Transaction, TransactionId};
use tokio::time::sleep_until;

use crate::cascade::{Cascade, CascadeError, Line};
use crate::config::{Config, Server};
use crate::dispatch::{ExitRequest, Handlers};
use crate::engine::{Engine, EngineError, Prefetched, Processed};
use crate::loader;
use crate::metrics::Metrics;
use crate::prefetch::Prefetcher;
use crate::signals::Signals;
use daemon::privileges::Privileges;
use ldap::TranslogEntry;

/// Transactions read ahead (protocol 3).
const PREFETCH_WINDOW: usize = 64;
/// Group commit: every commit survives a process crash at once (the cache's commit log);
/// a sync makes it survive a power loss too, at least every `--sync-interval`, every this
/// many transactions (bounding the commit log), and whenever the listener catches up.
const FLUSH_EVERY: u64 = 1000;
/// How often the notifier's schema id is checked while working through a backlog.
const SCHEMA_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait between attempts to reach the notifier again.
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// How often a paused listener looks whether the reason went away.
const PAUSE_POLL: Duration = Duration::from_secs(2);

/// Why the daemon ended.
#[derive(Debug)]
pub enum Exit {
    /// Stopped by a signal, everything committed.
    Stopped,
    /// A corrupt cache record: `bad_cache` was written; exit status 3.
    BadCache(String),
    /// The cache cannot be written (e.g. disk full); nothing was lost, exit status 1.
    CacheUnwritable(String),
    /// A module asked to exit (`sys.exit(n)`); the transaction in progress was not
    /// committed. Exit status `n`, or 1 if that is not a failure status (the listener did
    /// not finish its work, so a supervisor must restart it).
    ModuleRequested(ExitRequest),
}

impl Exit {
    /// A module's exit request, if one was made.
    fn module_requested(handlers: &Handlers) -> Option<Exit> {
        handlers
            .exit_requested()
            .map(|request| Exit::ModuleRequested(request.clone()))
    }
}

/// A transaction as the upstream notifier described it (kept verbatim for the cascade).
#[derive(Debug, Clone)]
struct Received {
    line: Line,
    transaction: Option<Transaction>,
}

impl Received {
    fn from_translog(entry: &TranslogEntry) -> Received {
        Received {
            line: Line {
                id: entry.id.get(),
                dn: entry.dn.clone(),
                command: entry.req_type.clone(),
            },
            transaction: entry.transaction(),
        }
    }

    fn from_transaction(tx: Transaction) -> Received {
        Received {
            line: Line {
                id: tx.id.get(),
                dn: tx.dn.clone(),
                command: tx.command.to_string(),
            },
            transaction: Some(tx),
        }
    }
}

enum WaitEvent {
    Reply(Result<String, ClientError>),
    Postrun,
    Alive,
    Signal,
    InitRetry,
}

pub struct Daemon {
    config: Config,
    server: Server,
    engine: Engine,
    privileges: Privileges,
    signals: Arc<Signals>,
    metrics: Arc<Metrics>,
    notifier: Option<NotifierClient>,
    prefetcher: Prefetcher,
    cascade: Option<Cascade>,
    /// The cascade line of a stashed `r`, written right before its `a`.
    stashed_line: Option<Line>,
    /// Read-ahead answers for the transaction about to be handled.
    pending_prefetch: Option<Prefetched>,
    /// A transaction received while processing had to pause, handled after the pause.
    held: Option<Received>,
    /// Last id handled (a stashed `r` is handled but not yet persisted).
    position: u64,
    /// Why the configured notifier is not followed: its last id is below ours.
    notifier_refused: Option<String>,
    /// Highest id the notifier reported.
    last_known: u64,
    unflushed: u64,
    last_flush: Instant,
    last_schema_check: Option<Instant>,
    /// `postrun` ran and connections closed since the last transaction.
    idle: bool,
    /// A failure that ends the daemon at the next safe point (a failed cache flush).
    fatal: Option<Exit>,
    /// Between attempts to reach the notifier: short, so the listener is back within
    /// seconds of a partition healing, whatever its length.
    reconnect: Backoff,
    backoff: Backoff,
}

impl Daemon {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        server: Server,
        engine: Engine,
        privileges: Privileges,
        signals: Arc<Signals>,
        metrics: Arc<Metrics>,
        notifier: Option<NotifierClient>,
    ) -> Result<Daemon, CascadeError> {
        let position = engine.master().notifier_id;
        let prefetcher = Prefetcher::new(
            PREFETCH_WINDOW,
            config.translog_base.clone(),
            config.base.clone(),
            config.ldap_timeout,
            Arc::clone(engine.cache()),
        );
        let cascade = match config.cascade {
            true => Some(Cascade::new(&config.ldap_dir, &config.cache_dir)?),
            false => None,
        };
        let daemon = Daemon {
            server,
            engine,
            privileges,
            signals,
            metrics,
            notifier,
            prefetcher,
            cascade,
            stashed_line: None,
            pending_prefetch: None,
            held: None,
            position,
            notifier_refused: None,
            last_known: position,
            unflushed: 0,
            last_flush: Instant::now(),
            last_schema_check: None,
            idle: false,
            fatal: None,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            reconnect: Backoff::new(Duration::from_millis(250), RECONNECT_MAX),
            config,
        };
        daemon.publish_held();
        Ok(daemon)
    }

    /// Whether the local slapd holds every change so far: no module holds a quarantined
    /// change and the replication module is ready (spec replication.md §B.6).
    fn cascade_gate_open(&self) -> bool {
        self.engine.handlers().local_ldap_incomplete().is_none()
    }

    /// Hands the held cascade lines to the local notifier once the quarantine is empty.
    fn release_held(&mut self) {
        if self.cascade.as_ref().is_none_or(|c| c.held().is_empty()) || !self.cascade_gate_open() {
            return;
        }
        let Some(cascade) = self.cascade.as_mut() else {
            return;
        };
        let (Some(first), Some(last)) = (
            cascade.held().first().map(|l| l.id),
            cascade.held().last().map(|l| l.id),
        ) else {
            return;
        };
        match cascade.release() {
            Ok(n) => tracing::warn!(
                "cascade: the local LDAP holds every change again, {n} held transaction(s) \
                 {first}..{last} handed to the local notifier"
            ),
            Err(e) => tracing::error!("cascade: cannot release the held transactions: {e}"),
        }
        self.publish_held();
    }

    fn publish_held(&self) {
        let held = self.cascade.as_ref().map_or(&[][..], |c| c.held());
        self.metrics
            .set_cascade_held(held.len() as u64, held.first().map_or(0, |l| l.id));
    }

    pub async fn run(mut self) -> Exit {
        self.publish_status("running");
        // Changes a module sent before a crash without their confirmation go first.
        self.engine.handlers_mut().confirm();
        // Held lines whose quarantine was emptied while the listener was down.
        self.release_held();
        // The connection made at start must continue this listener's ids like any later one.
        if let Some(mut client) = self.notifier.take()
            && self.check_continuation(&mut client).await.is_ok()
        {
            self.notifier = Some(client);
        }
        let exit = loop {
            self.engine.handlers().heartbeat().beat();
            if let Some(fatal) = self.fatal.take() {
                break fatal;
            }
            if let Some(exit) = Exit::module_requested(self.engine.handlers()) {
                break exit;
            }
            if self.signals.stop_requested() {
                break Exit::Stopped;
            }
            if !self.move_stashed() && self.signals.take_reload() {
                if let Err(exit) = self.reload().await {
                    break exit;
                }
                continue;
            }
            self.serve_module_requests();
            self.release_held();
            if let Some(reason) = self.stop_reason() {
                self.pause(&reason).await;
                continue;
            }
            if self.init_retry_due() {
                if let Err(e) = self.retry_initialisation().await
                    && let EngineError::Cache(e) = e
                {
                    break self.cache_failure(e);
                }
                continue;
            }
            let next = self.position + 1;
            let received = match self.held.take() {
                Some(received) => received,
                None => match self.next_transaction(next).await {
                    Ok(Some(received)) => received,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::error!("notifier: {e}");
                        self.notifier = None;
                        self.prefetcher.clear();
                        let delay = self.reconnect.next_delay();
                        self.wait_signal_or(delay).await;
                        continue;
                    }
                },
            };
            // The wait for this transaction may have been long: look again before any
            // module sees it.
            if let Some(reason) = self.stop_reason() {
                self.held = Some(received);
                self.pending_prefetch = None;
                self.pause(&reason).await;
                continue;
            }
            if let Err(exit) = self.handle(received).await {
                break exit;
            }
        };
        self.shutdown(&exit).await;
        exit
    }

    /// Runs the operator commands for modules that arrived over the control socket; only
    /// between transactions (or while one waits to be retried, rolled back), as modules
    /// belong to the main loop.
    fn serve_module_requests(&mut self) {
        let requests = self.signals.take_module_requests();
        if requests.is_empty() {
            return;
        }
        for request in requests {
            tracing::info!(
                "operator command for module {}: {}",
                request.module,
                request.command.join(" ")
            );
            let answer = self
                .engine
                .handlers_mut()
                .control(&request.module, &request.command);
            // The asker may have given up waiting; nothing is lost then.
            let _ = request.reply.send(answer);
        }
        self.publish_modules();
        // A retry or skip may have emptied the quarantine.
        self.release_held();
    }

    /// The reason processing must pause now, if any.
    fn stop_reason(&self) -> Option<String> {
        if self.config.failed_ldif.exists() {
            return Some(format!(
                "replication stopped: {} exists; fix the replication problem, then remove \
                 the file",
                self.config.failed_ldif.display()
            ));
        }
        if self.config.freespace_mib > 0 {
            for dir in [&self.config.cache_dir, &self.config.ldap_dir] {
                if let Some(free) = free_mib(dir)
                    && free < self.config.freespace_mib
                {
                    return Some(format!(
                        "file system of {} full: {free} MiB free, listener/freespace requires {} MiB",
                        dir.display(),
                        self.config.freespace_mib
                    ));
                }
            }
        }
        None
    }

    /// Stops processing cleanly until `reason` is gone or a signal arrives: everything is
    /// committed and postrun runs, but the process stays up (no restart loop).
    ///
    /// Resuming after `failed.ldif` reloads every module first. The file means a module
    /// (UCS's `replication`) gave up on its target and wrote changes into that file; the
    /// operator replays it and moves it away. The module still holds the state it had
    /// then (the open LDIF writer), and would append every later change to the moved-away
    /// file and report success. UCS's listener exits at this point, so modules start
    /// fresh; a reload gives them the same fresh start (new import, `setdata`, `prerun`
    /// before the next handler) while the process, its status and its connections stay.
    async fn pause(&mut self, reason: &str) {
        let after_failed_ldif = self.config.failed_ldif.exists();
        tracing::error!("{reason}");
        self.publish_status(&format!("paused: {reason}"));
        self.go_idle().await;
        loop {
            let heartbeat = self.engine.handlers().heartbeat();
            tokio::select! {
                _ = heartbeat.waiting(tokio::time::sleep(PAUSE_POLL)) => {}
                _ = self.signals.woken_with_reload(!self.move_stashed()) => {}
            }
            self.serve_module_requests();
            if self.signals.stop_requested()
                || self.fatal.is_some()
                || self.engine.handlers().exit_requested().is_some()
                || self.stop_reason().is_none()
            {
                break;
            }
        }
        if self.signals.stop_requested()
            || self.fatal.is_some()
            || self.engine.handlers().exit_requested().is_some()
        {
            return;
        }
        if after_failed_ldif {
            tracing::info!(
                "{} was removed: reloading every module, so none keeps state from before \
                 replication stopped",
                self.config.failed_ldif.display()
            );
            self.publish_status("reloading modules");
            if let Err(e) = self.reload_modules().await {
                tracing::error!("reload: {e}");
                if let EngineError::Cache(e) = e {
                    let exit = self.cache_failure(e);
                    self.fatal.get_or_insert(exit);
                    return;
                }
            }
            // The reload ran postrun of the old modules; the new ones are prepared lazily.
            self.idle = false;
        }
        tracing::info!("resuming replication");
        self.publish_status("running");
    }

    async fn wait_backoff(&mut self) {
        let delay = self.backoff.next_delay();
        self.wait_signal_or(delay).await;
    }

    /// Sleeps for `delay` unless a signal needs attention first.
    async fn wait_signal_or(&self, delay: Duration) {
        let heartbeat = self.engine.handlers().heartbeat();
        tokio::select! {
            _ = heartbeat.waiting(tokio::time::sleep(delay)) => {}
            // A reload postponed for a stashed move must not cut every wait short.
            _ = self.signals.woken_with_reload(!self.move_stashed()) => {}
        }
    }

    /// The notifier connection, (re)connecting once if needed.
    async fn connected(&mut self) -> Result<&mut NotifierClient, ClientError> {
        if self.notifier.is_none() {
            let client = NotifierClient::connect_with(
                &self.server.notifier_host,
                self.server.notifier_port,
                self.config.protocol,
                self.config.alive_timeout,
                &self.config.notifier_tls,
            )
            .await?;
            log_connected(&client, &self.config.notifier_tls);
            let mut client = client;
            self.check_continuation(&mut client).await?;
            self.notifier = Some(client);
            self.reconnect.reset();
        }
        match self.notifier.as_mut() {
            Some(client) => Ok(client),
            None => Err(ClientError::Closed {
                peer: self.server.notifier_host.clone(),
            }),
        }
    }

    /// A notifier this listener (re)connects to must continue its id space: its last id may
    /// not be below the listener's. A lower one is another domain's notifier, a Primary
    /// restored from an old backup, or a Backup promoted while it lagged; following it
    /// would wait for ids that mean other changes. The listener refuses it, says why
    /// (status `paused: …`, unhealthy), reconnects with backoff, and never re-initialises
    /// a module over it: the operator points it at the right notifier.
    async fn check_continuation(&mut self, client: &mut NotifierClient) -> Result<(), ClientError> {
        let last = client.get_id(self.config.notifier_timeout).await?;
        if last >= self.position {
            if self.notifier_refused.take().is_some() {
                tracing::info!(
                    "the notifier at {} is at id {last}, this listener at {}: following it",
                    client.peer(),
                    self.position
                );
            }
            return Ok(());
        }
        let reason = format!(
            "the notifier at {} has last id {last}, below this listener's id {}: its ids do \
             not continue this listener's (another domain, a restored or lagging Primary); \
             not following it and re-initialising nothing, point the listener at the right \
             notifier (UCR ldap/master, notifier/server)",
            client.peer(),
            self.position
        );
        tracing::error!("{reason}");
        self.notifier_refused = Some(reason.clone());
        self.publish_status("paused: refused notifier");
        Err(ClientError::BadReply {
            request: "GET_ID".into(),
            body: last.to_string(),
            reason,
        })
    }

    /// Transaction `next`, waiting for it if needed; `None` if a signal interrupted.
    async fn next_transaction(&mut self, next: u64) -> Result<Option<Received>, ClientError> {
        if self.config.protocol >= 3 {
            self.next_from_translog(next).await
        } else {
            self.next_from_get_dn(next).await
        }
    }

    async fn next_from_translog(&mut self, next: u64) -> Result<Option<Received>, ClientError> {
        if self.last_known < next {
            self.flush(false);
            if self.fatal.is_some() {
                return Ok(None);
            }
            self.publish_status("waiting");
            let msgid = self
                .connected()
                .await?
                .send(Request::WaitId(TransactionId(next)))
                .await?;
            let Some(body) = self.wait_reply(msgid).await? else {
                return Ok(None);
            };
            // Work arrived: the status must not say "waiting" while a module handles it.
            self.publish_status("running");
            let last = proto::client::parse_id_reply(&Request::WaitId(TransactionId(next)), &body)?;
            if last < next {
                return Err(ClientError::BadReply {
                    request: format!("WAIT_ID {next}"),
                    body,
                    reason: "the notifier answered with an older id".into(),
                });
            }
            self.last_known = last;
            self.metrics.set_notifier_id(last);
        }
        self.check_schema().await?;
        self.backoff.reset();
        if let Ok(handle) = self.engine.ldap.handle().await {
            self.prefetcher.fill(&handle, next, self.last_known);
        }
        let ahead = self.prefetcher.take(next).await;
        let (entry, prefetched) = match ahead {
            Some(ahead) => (ahead.entry.ok().flatten(), ahead.prefetched),
            None => (None, Prefetched::default()),
        };
        let entry = match entry {
            Some(entry) => entry,
            None => match self.read_translog(next).await {
                Some(entry) => entry,
                None => return Ok(None),
            },
        };
        let mut received = Received::from_translog(&entry);
        self.pending_prefetch = Some(prefetched);
        received.line.id = next;
        Ok(Some(received))
    }

    /// The translog entry of `next`, retried until it can be read; `None` on a stop signal.
    async fn read_translog(&mut self, next: u64) -> Option<TranslogEntry> {
        let base = self.config.translog_base.clone();
        loop {
            match self
                .engine
                .ldap
                .read_translog(&base, TransactionId(next))
                .await
            {
                Ok(Some(entry)) => return Some(entry),
                Ok(None) => tracing::warn!(
                    "transaction {next} announced but reqSession={next},{base} does not exist"
                ),
                Err(e) => tracing::error!("cannot read transaction {next}: {e}"),
            }
            self.wait_backoff().await;
            if self.signals.stop_requested() {
                return None;
            }
        }
    }

    async fn next_from_get_dn(&mut self, next: u64) -> Result<Option<Received>, ClientError> {
        let request = Request::GetDn(TransactionId(next));
        let waiting = self.last_known < next;
        if waiting {
            self.flush(false);
            if self.fatal.is_some() {
                return Ok(None);
            }
            self.publish_status("waiting");
        }
        let msgid = self.connected().await?.send(request.clone()).await?;
        let Some(body) = self.wait_reply(msgid).await? else {
            return Ok(None);
        };
        if waiting {
            // Work arrived: the status must not say "waiting" while a module handles it.
            self.publish_status("running");
        }
        let tx = parse_get_dn_reply(&request, &body)?;
        if tx.id.get() != next {
            return Err(ClientError::BadReply {
                request: format!("GET_DN {next}"),
                body,
                reason: format!(
                    "notifier returned transaction id {} ({next} expected)",
                    tx.id
                ),
            });
        }
        self.last_known = self.last_known.max(next);
        self.metrics.set_notifier_id(next);
        self.check_schema().await?;
        self.backoff.reset();
        self.pending_prefetch = Some(Prefetched::default());
        Ok(Some(Received::from_transaction(tx)))
    }

    /// Waits for the reply to `msgid`: after the postrun delay runs `postrun` and closes the
    /// LDAP connections, every alive interval checks the connection with `ALIVE`. `None` when
    /// a signal needs attention.
    async fn wait_reply(&mut self, msgid: u32) -> Result<Option<String>, ClientError> {
        let postrun_at = tokio::time::Instant::now() + self.config.postrun_delay;
        let mut alive_at = tokio::time::Instant::now() + self.config.alive_interval;
        let heartbeat = self.engine.handlers().heartbeat().clone();
        loop {
            // A module asked to exit (in postrun, a retried initialisation, a reload): the
            // main loop stops.
            if self.engine.handlers().exit_requested().is_some() {
                return Ok(None);
            }
            let idle = self.idle;
            // A module whose initialisation failed is retried while the listener waits
            // too: an idle listener would otherwise never get to it.
            // Neither a retried initialisation nor a reload while a move's `r` waits for
            // its `a` ([`Daemon::move_stashed`]).
            let move_stashed = self.move_stashed();
            let retry_at = if move_stashed {
                None
            } else {
                self.engine.handlers().next_init_due()
            };
            let Some(client) = self.notifier.as_mut() else {
                return Err(ClientError::Closed {
                    peer: self.server.notifier_host.clone(),
                });
            };
            let event = tokio::select! {
                reply = heartbeat.waiting(client.reply(msgid)) => WaitEvent::Reply(reply),
                _ = sleep_until(postrun_at), if !idle => WaitEvent::Postrun,
                _ = sleep_until(alive_at) => WaitEvent::Alive,
                _ = sleep_until(retry_at.map_or(alive_at, tokio::time::Instant::from_std)),
                    if retry_at.is_some() => WaitEvent::InitRetry,
                _ = self.signals.woken_with_reload(!move_stashed) => WaitEvent::Signal,
            };
            match event {
                WaitEvent::Reply(reply) => {
                    self.idle = false;
                    return reply.map(Some);
                }
                WaitEvent::Postrun => self.go_idle().await,
                WaitEvent::Alive => {
                    alive_at = tokio::time::Instant::now() + self.config.alive_interval;
                    let limit = self.config.alive_timeout;
                    if let Err(e) = client.alive(limit).await {
                        tracing::error!(
                            "the notifier connection to {} is dead (no answer to ALIVE \
                             within {limit:?}: {e}); reconnecting",
                            client.peer()
                        );
                        return Err(e);
                    }
                }
                WaitEvent::InitRetry => {
                    // The wait stays outstanding, as during a reload.
                    if let Err(e) = self.retry_initialisation().await {
                        tracing::error!("module initialization: {e}");
                    }
                }
                WaitEvent::Signal => {
                    if self.signals.stop_requested() {
                        return Ok(None);
                    }
                    if move_stashed {
                        if self.signals.reload_requested() {
                            tracing::info!(
                                "reload postponed until the move whose r is stashed is complete"
                            );
                        }
                    } else if self.signals.take_reload() {
                        // The wait stays outstanding; its reply is kept for later.
                        if let Err(e) = self.reload_modules().await {
                            tracing::error!("reload: {e}");
                        }
                    }
                    // So does the wait for an operator's module command.
                    self.serve_module_requests();
                }
            }
        }
    }

    /// Asks the notifier's schema id when it may have changed: before the first
    /// transaction and then at most once per [`SCHEMA_CHECK_INTERVAL`] (UCS asked for every
    /// transaction).
    async fn check_schema(&mut self) -> Result<(), ClientError> {
        if self.config.is_master()
            || self
                .last_schema_check
                .is_some_and(|t| t.elapsed() < SCHEMA_CHECK_INTERVAL)
        {
            return Ok(());
        }
        let timeout = self.config.notifier_timeout;
        let id = self.connected().await?.get_schema_id(timeout).await?;
        self.engine.set_notifier_schema_id(id);
        self.last_schema_check = Some(Instant::now());
        Ok(())
    }

    /// Processes one transaction until it succeeds (transient failures are retried with
    /// backoff), writes the cascade lines and commits.
    async fn handle(&mut self, received: Received) -> Result<(), Exit> {
        let id = received.line.id;
        if self.cascade.is_some()
            && let Err(e) = received.line.encode()
        {
            self.refuse_cascade(&e).await;
            return Ok(());
        }
        let mut prefetched = self.pending_prefetch.take().unwrap_or_default();
        loop {
            let checkpoint = self.engine.checkpoint();
            let processed = match &received.transaction {
                Some(tx) => {
                    let result = self
                        .engine
                        .process(tx, std::mem::take(&mut prefetched))
                        .await;
                    match result {
                        Ok(processed) => processed,
                        Err(EngineError::Cache(e)) => return Err(self.cache_failure(e)),
                        // Only a stop gives up a module's call.
                        Err(EngineError::Interrupted) => return Err(Exit::Stopped),
                        Err(e) => {
                            // A module asked to exit before the failure: no retry.
                            if let Some(exit) = Exit::module_requested(self.engine.handlers()) {
                                self.engine.rollback(checkpoint);
                                return Err(exit);
                            }
                            tracing::error!(
                                "transaction {id} ({}): {e}; retrying",
                                received.line.dn
                            );
                            self.publish_status(&format!("retrying transaction {id}: {e}"));
                            self.wait_backoff().await;
                            self.serve_module_requests();
                            if self.signals.stop_requested() {
                                return Err(Exit::Stopped);
                            }
                            continue;
                        }
                    }
                }
                None => {
                    tracing::warn!(
                        "unknown command {:?} for {} (id {id})",
                        received.line.command,
                        received.line.dn
                    );
                    Processed::Done
                }
            };
            if let Some(exit) = Exit::module_requested(self.engine.handlers()) {
                // Not committed: processed again after the restart (a stashed `r` too).
                self.engine.rollback(checkpoint);
                tracing::error!(
                    "transaction {id} ({}) not committed: a module asked the listener to exit",
                    received.line.dn
                );
                return Err(exit);
            }
            if self.config.failed_ldif.exists() {
                // The change that made replication fail is not persisted: it is processed
                // again once the administrator removed the file (spec §2.2 step 7).
                self.engine.rollback(checkpoint);
                return Ok(());
            }
            if processed == Processed::Stashed {
                self.stashed_line = Some(received.line.clone());
                self.position = id;
                return Ok(());
            }
            let mut lines: Vec<Line> = self.stashed_line.take().into_iter().collect();
            lines.push(received.line.clone());
            if self.cascade.is_some() {
                // The line says the local slapd holds the change: writes still in flight
                // are waited for first (any left unconfirmed close the gate).
                self.engine.handlers_mut().confirm();
            }
            let open = self.cascade_gate_open();
            if let Some(cascade) = &mut self.cascade
                && cascade.held().is_empty()
                && !open
            {
                tracing::warn!(
                    "cascade: transaction {id} and every later one are held back from the \
                     local notifier: {}, the local LDAP may lack them; released when the \
                     quarantine is retried or skipped and replication is ready",
                    self.engine
                        .handlers()
                        .local_ldap_incomplete()
                        .unwrap_or_default()
                );
            }
            if let Some(cascade) = &mut self.cascade
                && let Err(e) = cascade.write(&lines, open)
            {
                tracing::error!("cascade output: {e}; transaction {id} will be retried");
                self.engine.rollback(checkpoint);
                self.stashed_line = lines.into_iter().rev().nth(1);
                self.wait_backoff().await;
                return Ok(());
            }
            let batch = self.engine.take_batch(id);
            let cache = self.engine.cache();
            if let Err(e) = run_blocking(|| cache.commit(batch, false)) {
                return Err(self.cache_failure(e));
            }
            self.position = id;
            self.unflushed += 1;
            if self.cascade.is_some() {
                self.publish_held();
            }
            self.metrics.add_transactions(1);
            self.metrics.set_processed(id);
            self.backoff.reset();
            if self.unflushed >= FLUSH_EVERY
                || self.last_flush.elapsed() >= self.config.sync_interval
            {
                self.flush(false);
            }
            return Ok(());
        }
    }

    /// A transaction whose cascade line the local notifier would read back differently (a
    /// newline in the DN would forge a line). Checked before any module sees it. Skipping it
    /// is no option: the downstream notifier would fill the missing id with an invented
    /// no-op and its listeners would never see the real change. So the transaction is
    /// neither processed nor acknowledged, the status says why (as `paused`, which the
    /// tools report as unhealthy), and it is fetched again after a backoff: correcting the
    /// upstream translog entry, or running without `-o`, lets replication continue.
    async fn refuse_cascade(&mut self, e: &CascadeError) {
        tracing::error!(
            "cascade output refused: {e}; the transaction is not processed and not \
             acknowledged, replication on this host stops here until the notifier's \
             translog entry is corrected (or the listener runs without -o); retrying"
        );
        self.publish_status(&format!("paused: cascade output refused: {e}"));
        // The retry must read the entry again, not a copy read ahead before the repair.
        self.pending_prefetch = None;
        self.prefetcher.clear();
        self.wait_backoff().await;
    }

    fn cache_failure(&mut self, e: CacheError) -> Exit {
        let reason = e.to_string();
        if matches!(
            e,
            CacheError::Corrupt { .. } | CacheError::UnsupportedVersion { .. }
        ) {
            if let Err(io) = cache::mark_bad(&self.config.cache_dir, &reason) {
                tracing::error!("cannot write the bad_cache marker: {io}");
            }
            tracing::error!(
                "corrupt cache ({reason}); marked bad: re-initialize with \
                 `univention-directory-listener -i` (or remove {} after repairing)",
                self.config.cache_dir.join(cache::BAD_CACHE_FILE).display()
            );
            Exit::BadCache(reason)
        } else {
            tracing::error!(
                "cache write failed: {reason}; stopping (the transaction is processed again \
                 at the next start)"
            );
            Exit::CacheUnwritable(reason)
        }
    }

    /// Makes every commit durable and rewrites the legacy `notifier_id` file (also with
    /// nothing new when `force`d).
    fn flush(&mut self, force: bool) {
        if self.unflushed == 0 && !force {
            return;
        }
        // Modules' own files first (the nats outbox): a commit that is durable has them.
        let synced = self.engine.handlers_mut().sync();
        let cache = self.engine.cache();
        let flushed = synced
            .map_err(cache::CacheError::Store)
            .and_then(|()| {
                daemon::failpoint::check("cache-flush")
                    .map_err(|e| e.to_string())
                    .map_err(cache::CacheError::Store)
            })
            .and_then(|()| run_blocking(|| cache.flush()));
        if let Err(e) = flushed {
            // Like an fsync error: retrying may "succeed" with the data gone. Stop; the
            // next start recovers from what is on disk (commit log and LMDB).
            tracing::error!(
                "cache flush failed: {e}; stopping (uncommitted work is redone at the next start)"
            );
            self.fatal
                .get_or_insert(Exit::CacheUnwritable(e.to_string()));
            return;
        }
        // The module counters first: whoever sees the new id in the file then also sees
        // what the modules made of its transactions.
        self.publish_modules();
        let id = self.engine.master().notifier_id;
        if let Err(e) = cache::write_legacy_notifier_id(&self.config.cache_dir, id) {
            tracing::error!("cannot write the notifier_id file: {e}");
        }
        // The highest id the upstream notifier announced, for a promotion to say how much
        // a Backup lacks once that notifier is gone. Informational, so not synced apart.
        let upstream = self.last_known.max(id);
        if let Err(e) = std::fs::write(
            self.config.cache_dir.join(UPSTREAM_ID_FILE),
            format!("{upstream}\n"),
        ) {
            tracing::warn!("cannot write {UPSTREAM_ID_FILE}: {e}");
        }
        self.unflushed = 0;
        self.last_flush = Instant::now();
        self.publish_status("running");
    }

    /// Idle: postrun for prepared modules and close the LDAP connections (UCS after 15 s).
    async fn go_idle(&mut self) {
        if self.unflushed > 0 {
            self.flush(false);
        } else if let Err(e) = self.engine.handlers_mut().sync() {
            // Modules settle their own files even when nothing was committed since the
            // start (the nats module drops what the stream acknowledged from its outbox);
            // the status stays what it is (a pause must keep saying so).
            tracing::error!("{e}; stopping (uncommitted work is redone at the next start)");
            self.fatal.get_or_insert(Exit::CacheUnwritable(e));
        }
        if !self.idle {
            self.engine.handlers_mut().postrun();
            self.prefetcher.clear();
            self.engine.close_connections().await;
            self.idle = true;
            self.publish_modules();
        }
    }

    /// SIGHUP: reload the modules, hand them `setdata` and initialise new ones (UCS did
    /// neither, leaving new modules "not ready" until a restart).
    async fn reload(&mut self) -> Result<(), Exit> {
        if let Err(e) = self.reload_modules().await {
            tracing::error!("reload: {e}");
            if let EngineError::Cache(e) = e {
                return Err(self.cache_failure(e));
            }
        }
        Ok(())
    }

    async fn reload_modules(&mut self) -> Result<(), EngineError> {
        self.flush(false);
        self.engine.handlers_mut().postrun();
        // The old modules' request must not get lost with them.
        if self.engine.handlers().exit_requested().is_some() {
            return Err(EngineError::ExitRequested);
        }
        let loaded = loader::load_modules(&self.config, &self.privileges);
        // The new modules read their state files before the old ones write theirs, so a
        // state file removed for a resync leads to a re-initialisation.
        let mut handlers = Handlers::new(
            loaded.modules,
            &self.config.cache_dir,
            self.privileges,
            self.engine.handlers().heartbeat().clone(),
        );
        handlers.add_load_failures(loaded.failures);
        handlers.set_init_retry(self.config.init_retry);
        handlers.track_calls(self.metrics.call_tracker());
        let sink = Arc::clone(&self.metrics);
        handlers.publish_to(Arc::new(move |stats| sink.set_modules(stats)));
        let stop = Arc::clone(&self.signals);
        handlers.stop_when(Arc::new(move || stop.stop_requested()));
        let data = setdata_values(&self.config, &self.server);
        handlers.setdata(&data);
        self.engine.replace_handlers(handlers).write_states();
        tracing::info!(
            "modules reloaded: {}",
            self.engine
                .handlers()
                .names()
                .collect::<Vec<_>>()
                .join(", ")
        );
        // Published before the initialisation, which may take long: the status shows the
        // new module list (and what failed to load) at once.
        self.publish_modules();
        let signals = Arc::clone(&self.signals);
        let result = self
            .engine
            .initialize_pending(self.config.scan_timeout, &signals)
            .await;
        self.publish_modules();
        result
    }

    /// Whether a module whose initialisation failed is due to be tried again.
    fn init_retry_due(&self) -> bool {
        !self.move_stashed()
            && self
                .engine
                .handlers()
                .next_init_due()
                .is_some_and(|due| due <= Instant::now())
    }

    /// Whether an `r` waits for its `a`. Modules are neither reloaded nor initialised
    /// meanwhile: the `a` completes the move from the cache state the `r` saw, and would
    /// overwrite what an initialisation stored in between (handing the object twice).
    fn move_stashed(&self) -> bool {
        self.stashed_line.is_some()
    }

    /// Initialises the modules whose retry is due; each that fails again waits longer.
    async fn retry_initialisation(&mut self) -> Result<(), EngineError> {
        self.flush(false);
        self.publish_status("initialising modules");
        let signals = Arc::clone(&self.signals);
        let result = self
            .engine
            .initialize_due(Instant::now(), self.config.scan_timeout, &signals)
            .await;
        // The pass may have prepared modules (prerun): postrun and closing the
        // connections follow after the idle delay as after any work.
        self.idle = false;
        self.publish_modules();
        self.publish_status("running");
        // A replication module that is ready now lets held cascade lines go.
        self.release_held();
        result
    }

    async fn shutdown(&mut self, exit: &Exit) {
        match exit {
            Exit::ModuleRequested(request) => self.publish_status(&format!(
                "stopping: module {} asked the listener to exit in {} with status {}",
                request.module, request.call, request.status
            )),
            _ => self.publish_status("stopping"),
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        self.engine.handlers_mut().postrun();
        self.flush(true);
        self.engine.handlers().write_states();
        self.engine.close_connections().await;
        tracing::info!(
            "stopped at transaction {}",
            self.engine.master().notifier_id
        );
    }

    fn publish_modules(&self) {
        self.metrics
            .set_modules(self.engine.handlers().module_stats());
    }

    fn publish_status(&self, what: &str) {
        let refused;
        let what = match &self.notifier_refused {
            Some(reason) if !what.starts_with("stopping") => {
                refused = format!("paused: {reason}");
                refused.as_str()
            }
            _ => what,
        };
        self.metrics.set_state(what);
        let (ok, failed) = self.metrics.module_counts();
        let status = format!(
            "{what}: id {}, lag {}, modules {ok}/{failed}",
            self.engine.master().notifier_id,
            self.last_known.saturating_sub(self.position)
        );
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
    }
}

/// `<cache>/upstream_id`: the highest id the notifier announced, as of the last flush.
pub const UPSTREAM_ID_FILE: &str = "upstream_id";

/// The id in `<cache>/upstream_id`, if any.
pub fn read_upstream_id(cache_dir: &Path) -> Option<u64> {
    std::fs::read_to_string(cache_dir.join(UPSTREAM_ID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `<cache>/exit_request`: why the listener last exited at a module's request, for
/// `ctrl status` while it is down; removed at the next start.
pub const EXIT_REQUEST_FILE: &str = "exit_request";

/// Records a module's exit request in `<cache>/exit_request` (one line, with the time).
pub fn record_exit_request(cache_dir: &Path, request: &ExitRequest) -> Result<(), FileError> {
    let line = format!(
        "module {} asked the listener to exit in {} with status {} ({}) at {}\n",
        request.module,
        request.call,
        request.status,
        request.message,
        daemon::time::rfc3339(std::time::SystemTime::now())
    );
    daemon::fs::write_atomic(&cache_dir.join(EXIT_REQUEST_FILE), line.as_bytes(), 0o644)
}

/// The recorded exit request, if the listener's last exit was one.
pub fn read_exit_request(cache_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(cache_dir.join(EXIT_REQUEST_FILE)).ok()?;
    Some(text.trim_end().to_owned()).filter(|t| !t.is_empty())
}

/// The `setdata` values in UCS order: basedn, binddn, bindpw, ldapserver.
pub fn setdata_values(config: &Config, server: &Server) -> Vec<(&'static str, Option<String>)> {
    let (binddn, bindpw) = match &config.auth {
        ldap::Auth::Simple { dn, password } => (Some(dn.clone()), Some(password.current())),
        _ => (None, None),
    };
    vec![
        ("basedn", Some(config.base.clone())),
        ("binddn", binddn),
        ("bindpw", bindpw),
        ("ldapserver", Some(server.host.clone())),
    ]
}

/// Free space of the file system holding `dir`, in MiB.
fn free_mib(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: zeroed statvfs is a valid value of this plain C struct.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: path is NUL-terminated and stat is a valid out pointer for the call.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    if rc != 0 {
        return None;
    }
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64) / (1024 * 1024))
}

/// Says whether a notifier connection is encrypted; `try` that ended in plain text is a
/// warning, since the operator asked for TLS.
pub fn log_connected(client: &NotifierClient, tls: &proto::ClientTls) {
    if client.is_tls() {
        tracing::info!("connected to the notifier at {} (TLS)", client.peer());
    } else if tls.mode() == proto::TlsMode::Try {
        tracing::warn!(
            "connected to the notifier at {} in plain text: it does not offer STARTTLS",
            client.peer()
        );
    } else {
        tracing::info!("connected to the notifier at {}", client.peer());
    }
}
