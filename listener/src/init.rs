//! Module (re)initialisation (spec listener.md §3.9, §4.4–4.6): `clean`, `initialize`, then
//! every object matching the module's filter with command `n`, parents first. Objects the
//! cache holds are passed as cached (so a pending transaction still finds its old state);
//! the others come from one paged search with all attributes (UCS read every object
//! separately, which costs slapd ten times the work). The DNs of the result, which say
//! whether a parent is still to come, are searched at the same time on a second connection;
//! the pass waits for them only at the first object whose parent it has not handled yet.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use std::collections::{HashMap, HashSet};

use cache::CacheEntry;
use daemon::tasks::run_blocking;
use ldap::dn::{dn_key, is_below, parent};
use ldap::{ALL_ATTRS, FramedSearch, LdapFailure, RawEntry, Scope};
use modules::Command;

use crate::dispatch::{INITIALIZED, READY, Selection};
use crate::engine::{Engine, EngineError, SUBSCHEMA_DN};
use crate::signals::Signals;

/// Entries per page of the initialisation search. Between two pages slapd sits idle for a
/// round trip and then starts the search over from the cookie (~5 ms measured for 50,000
/// users): with 1,000 per page that was a third of `-i`'s time. A server whose `size.pr`
/// limit is lower gets smaller pages (`ldap::searcher::FramedSearch`).
pub const PAGE_SIZE: i32 = 10_000;
/// Objects per cache commit during initialisation.
const COMMIT_EVERY: usize = 1000;

/// State of one module's initialisation scan.
struct InitPass {
    index: usize,
    id: u64,
    /// Cache keys of every DN the scan returns; `None` until the DN scan is needed.
    expected: Option<HashSet<String>>,
    /// Cache key of the search base: parents above it are never part of the result.
    base: String,
    /// Cache keys stored by this pass (the objects handed to the module, and the schema).
    done: HashSet<String>,
    /// The cache held no entry when the pass began, so the only cached objects are those
    /// in `done`: the others need no cache read, and are stored without one.
    fresh: bool,
    /// Entries whose parent (key) is expected but not done yet.
    waiting: HashMap<String, Vec<RawEntry>>,
    since_commit: usize,
}

impl InitPass {
    /// Whether `dn` may have to wait for its parent: the parent is inside the search base
    /// and not handled yet. Only then does the pass need the DN scan.
    fn may_wait(&self, dn: &str) -> bool {
        parent(dn).is_some_and(|parent| {
            let key = dn_key(parent);
            !self.done.contains(&key) && (key == self.base || is_below(&key, &self.base))
        })
    }
}

/// The DNs (as cache keys) the filter matches below `base`: which parents are part of the
/// result.
async fn scan_dns(
    mut conn: ldap::SearchConnection,
    base: String,
    filter: String,
    timeout: Duration,
) -> Result<HashSet<String>, LdapFailure> {
    let mut expected = HashSet::new();
    let mut search = FramedSearch::start(
        &mut conn,
        &base,
        Scope::Subtree,
        &filter,
        &["1.1"],
        PAGE_SIZE,
        timeout,
    )
    .await?;
    while let Some(entry) = search.next().await? {
        expected.insert(dn_key(entry.dn()));
    }
    search.finish()?;
    conn.close().await;
    Ok(expected)
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
        if self.total == 0 {
            // The DN scan, which counts them, is not in yet.
            return format!(
                "initializing {}: {} objects, {rate:.0}/s",
                self.module, self.done
            );
        }
        let eta = if rate > 0.0 {
            self.total.saturating_sub(self.done) as f64 / rate
        } else {
            0.0
        };
        format!(
            "initializing {}: {}/{} objects, {rate:.0}/s, ETA {eta:.0}s",
            self.module, self.done, self.total
        )
    }

    /// The number of objects, known once the DN scan is in.
    fn set_total(&mut self, total: usize) {
        self.total = total;
    }

    fn step(&mut self) {
        self.done += 1;
        // Reading the clock for every entry cost ~1 % of a pass.
        if !self.done.is_multiple_of(64) {
            return;
        }
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
    /// Initialises every module that is not READY, in call order; see
    /// [`Engine::initialize_modules`].
    pub async fn initialize_pending(
        &mut self,
        scan_timeout: Duration,
        signals: &Signals,
    ) -> Result<(), EngineError> {
        let pending = self.handlers.not_ready();
        self.initialize_modules(pending, scan_timeout, signals)
            .await
    }

    /// Initialises the modules that are not READY and whose retry is due at `now`.
    pub(crate) async fn initialize_due(
        &mut self,
        now: Instant,
        scan_timeout: Duration,
        signals: &Signals,
    ) -> Result<(), EngineError> {
        let due = self.handlers.due_for_init(now);
        self.initialize_modules(due, scan_timeout, signals).await
    }

    /// Initialises the modules `indices`. A module whose initialisation fails stays not
    /// ready and is retried later with backoff ([`Handlers::init_failed`]); the others are
    /// still initialised, and the first such failure is returned at the end. A cache
    /// failure or a stop request (`signals`) ends the pass at once; the module being
    /// initialised stays not ready.
    ///
    /// [`Handlers::init_failed`]: crate::dispatch::Handlers::init_failed
    async fn initialize_modules(
        &mut self,
        indices: Vec<usize>,
        scan_timeout: Duration,
        signals: &Signals,
    ) -> Result<(), EngineError> {
        let mut first_failure = None;
        for index in indices {
            match self.initialize_module(index, scan_timeout, signals).await {
                Ok(()) => {}
                Err(
                    e @ (EngineError::Cache(_)
                    | EngineError::Interrupted
                    | EngineError::ExitRequested),
                ) => return Err(e),
                Err(e) => {
                    first_failure.get_or_insert(e);
                }
            }
        }
        first_failure.map_or(Ok(()), Err)
    }

    async fn initialize_module(
        &mut self,
        index: usize,
        scan_timeout: Duration,
        signals: &Signals,
    ) -> Result<(), EngineError> {
        let name = self.handlers.name(index).to_owned();
        let state = self.handlers.state(index);
        let attempt = self.handlers.init_failures(index) + 1;
        if attempt > 1 {
            tracing::info!("initializing module {name} (attempt {attempt})");
        } else {
            tracing::info!("initializing module {name}");
        }
        // READY is persisted only after the whole pass: a crash (or the stop guard's
        // exit) in the middle must not leave a module marked ready that saw part of the
        // directory. Written now too: the file may say ready although the module is not
        // (a reload writes the old handlers' states back over a removed file).
        self.set_state(index, state & !READY);
        self.handlers.begin_initialising(index);
        let result = self
            .run_initialization(index, &name, scan_timeout, signals)
            .await;
        match &result {
            Ok(()) => self.set_state(index, INITIALIZED | READY),
            Err(EngineError::Interrupted) => {
                tracing::warn!("initialization of module {name} interrupted");
                self.set_state(index, state & !READY);
            }
            // Not a failure of this module's initialisation: it runs again after the
            // restart.
            Err(EngineError::ExitRequested) => self.set_state(index, state & !READY),
            Err(e) => {
                self.set_state(index, state & !READY);
                let retry = self.handlers.init_failed(index, &e.to_string());
                tracing::error!(
                    "initialization of module {name} failed (attempt {attempt}): {e}; the \
                     module is not ready, next attempt in {:.0?}",
                    retry
                );
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
        self.handlers
            .clean_and_initialize(index)
            .map_err(|e| match e.requested_exit() {
                Some(_) => EngineError::ExitRequested,
                None => EngineError::ModuleInit(e),
            })?;
        let cache = self.cache();
        let removed = run_blocking(|| cache.remove_module_everywhere(name))?;
        tracing::debug!("module {name} removed from {removed} cache entries");
        let id = self.master().notifier_id;
        self.handlers.begin_transaction(id);
        let empty = CacheEntry::default();
        let fresh = self.cache().is_empty();
        let mut done = HashSet::new();

        if let Some(mut schema) = self.staged.get(SUBSCHEMA_DN)? {
            self.handlers.update(
                id,
                SUBSCHEMA_DN,
                &mut schema,
                &empty,
                Command::Init,
                Selection::Only(index),
            );
            done.insert(dn_key(&schema.dn));
            self.store(schema);
            self.check_exit_request()?;
        }

        let Some(filter) = self.handlers.filter_text(index).map(str::to_owned) else {
            tracing::info!("module {name} has no filter: nothing to initialize");
            return self.commit_staged(true);
        };
        let base = self.settings().base.clone();
        // Both scans go through connections of our own that decode entries without copying
        // their values (ldap3 parses, then copies, every message).
        let mut conn = self.ldap.search_connection().await?;
        self.update_schema().await?;
        // A schema update calls every module: committed like a transaction, not with the
        // pass's unlogged chunks.
        self.commit_staged(false)?;

        let mut progress = Progress::new(name, 0);
        let mut pass = InitPass {
            index,
            id,
            expected: None,
            base: dn_key(&base),
            done,
            fresh,
            waiting: HashMap::new(),
            since_commit: 0,
        };
        let mut search = FramedSearch::start(
            &mut conn,
            &base,
            Scope::Subtree,
            &filter,
            &ALL_ATTRS,
            PAGE_SIZE,
            scan_timeout,
        )
        .await?;
        loop {
            if signals.stop_requested() {
                self.commit_staged(true)?;
                return Err(EngineError::Interrupted);
            }
            let Some(entry) = search.next().await? else {
                break;
            };
            let raw = entry.into_raw();
            if pass.expected.is_none() && pass.may_wait(&raw.dn) {
                // Only now, on a connection of its own: the server's order has parents
                // first except after moves, so most passes never need it.
                let scan = self.ldap.search_connection().await?;
                let expected = scan_dns(scan, base.clone(), filter.clone(), scan_timeout).await?;
                progress.set_total(expected.len());
                pass.expected = Some(expected);
            }
            self.init_entry(&mut pass, raw, &mut progress)?;
        }
        search.finish()?;
        conn.close().await;
        // Parents that vanished during the scan: their children go now, shortest first.
        let mut orphans: Vec<RawEntry> = pass.waiting.drain().flat_map(|(_, v)| v).collect();
        orphans.sort_by_key(|e| e.dn.len());
        for raw in orphans {
            self.init_one(&mut pass, raw, &mut progress)?;
        }
        progress.finish();
        self.commit_staged(true)
    }

    /// Hands `raw` (and then every child that waited for it) to the module, unless its
    /// parent is part of the result and still to come: parents go first (UCS sorted by DN
    /// length; the server's order already has parents first except after moves).
    fn init_entry(
        &mut self,
        pass: &mut InitPass,
        raw: RawEntry,
        progress: &mut Progress,
    ) -> Result<(), EngineError> {
        if let Some(parent) = parent(&raw.dn) {
            let parent_key = dn_key(parent);
            let expected = pass
                .expected
                .as_ref()
                .is_some_and(|expected| expected.contains(&parent_key));
            if expected && !pass.done.contains(&parent_key) {
                pass.waiting.entry(parent_key).or_default().push(raw);
                return Ok(());
            }
        }
        let mut ready = vec![raw];
        while let Some(raw) = ready.pop() {
            let key = dn_key(&raw.dn);
            self.init_one(pass, raw, progress)?;
            if let Some(children) = pass.waiting.remove(&key) {
                ready.extend(children);
            }
        }
        Ok(())
    }

    /// The `n` call for one object: its cached state if the cache has it (not refreshed, so
    /// a pending transaction still finds its old state), else the entry just read.
    fn init_one(
        &mut self,
        pass: &mut InitPass,
        raw: RawEntry,
        progress: &mut Progress,
    ) -> Result<(), EngineError> {
        let key = dn_key(&raw.dn);
        let new = pass.fresh && !pass.done.contains(&key);
        let cached = if new { None } else { self.staged.get(&raw.dn)? };
        let mut entry = match cached {
            Some(cached) => cached,
            None => self.to_cache_entry(raw),
        };
        let dn = entry.dn.clone();
        self.handlers.update(
            pass.id,
            &dn,
            &mut entry,
            &CacheEntry::default(),
            Command::Init,
            Selection::Only(pass.index),
        );
        self.check_exit_request()?;
        if self.handlers.interrupted() {
            return Err(EngineError::Interrupted);
        }
        if new {
            self.store_new(&entry);
        } else {
            self.store(entry);
        }
        pass.done.insert(key);
        progress.step();
        pass.since_commit += 1;
        if pass.since_commit >= COMMIT_EVERY {
            self.commit_pass_chunk()?;
            pass.since_commit = 0;
        }
        Ok(())
    }

    /// Ends an initialisation pass as soon as a module asked the listener to exit.
    fn check_exit_request(&self) -> Result<(), EngineError> {
        match self.handlers.exit_requested() {
            Some(_) => Err(EngineError::ExitRequested),
            None => Ok(()),
        }
    }

    /// Commits a chunk of an initialisation pass, without the cache's commit log: the pass
    /// ends with a durable commit before the module counts as initialised, and a crash
    /// before that repeats the whole pass anyway. Saves writing every entry twice.
    fn commit_pass_chunk(&mut self) -> Result<(), EngineError> {
        let mut batch = self.take_master_batch();
        batch.unlogged();
        let cache = self.cache();
        run_blocking(|| cache.commit(batch, false))?;
        Ok(())
    }

    /// Commits what is staged, with the current master record.
    pub fn commit_staged(&mut self, durable: bool) -> Result<(), EngineError> {
        if durable {
            // Modules' own files (and writes in flight) first, as before every flush.
            self.handlers
                .sync()
                .map_err(|e| EngineError::Cache(cache::CacheError::Store(e)))?;
        }
        let batch = self.take_master_batch();
        let cache = self.cache();
        run_blocking(|| cache.commit(batch, durable))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(done: &[&str]) -> InitPass {
        InitPass {
            index: 0,
            id: 0,
            expected: None,
            base: dn_key("dc=Example,dc=com"),
            done: done.iter().map(|dn| dn_key(dn)).collect(),
            fresh: true,
            waiting: HashMap::new(),
            since_commit: 0,
        }
    }

    #[test]
    fn only_a_pending_parent_inside_the_base_needs_the_dn_scan() {
        let pass = pass(&["dc=example,dc=com", "ou=Done,dc=example,dc=com"]);
        // The base itself: its parent is outside the search.
        assert!(!pass.may_wait("dc=example,dc=com"));
        // Parents already handled (compared as cache keys).
        assert!(!pass.may_wait("ou=a,dc=EXAMPLE,dc=com"));
        assert!(!pass.may_wait("uid=x,ou=done,dc=example,dc=com"));
        // A parent below the base not handled yet may still come.
        assert!(pass.may_wait("uid=x,ou=later,dc=example,dc=com"));
        // Unless nothing is handled yet: the base is then a parent still to come.
        assert!(self::pass(&[]).may_wait("ou=a,dc=example,dc=com"));
        // No parent at all, or one outside the base.
        assert!(!pass.may_wait("dc=com"));
        assert!(!pass.may_wait("uid=x,ou=elsewhere,dc=org"));
    }
}
