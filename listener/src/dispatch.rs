//! The loaded handler modules and the UCS rules for calling them (spec listener.md §3.4,
//! §3.5, §4.3–4.5): order, filters, "up to date" skipping, lazy `prerun`, `postrun` of
//! prepared modules, state files `<cache>/handlers/<name>`.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use daemon::fs::FileError;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use cache::CacheEntry;
use daemon::backoff::Backoff;
use daemon::privileges::Privileges;
use daemon::systemd::Heartbeat;
use daemon::tasks::run_blocking;
use modules::filter::Filter;
use modules::{Call, Command, Module, ModuleError, REPLICATION};

/// State file bit: the module was initialised once.
pub(crate) const INITIALIZED: u32 = 1;
/// State file bit: the module is ready (initialised and not being re-initialised).
pub const READY: u32 = 2;

/// Subdirectory of the cache directory holding the state files.
pub const STATE_DIR: &str = "handlers";

/// First wait before a failed module initialisation is tried again (`--init-retry`).
pub(crate) const DEFAULT_INIT_RETRY: Duration = Duration::from_secs(30);
/// The wait between initialisation attempts doubles up to this.
pub(crate) const MAX_INIT_RETRY: Duration = Duration::from_secs(3600);

/// One module (loaded or not) as the metrics and the control socket show it.
#[derive(Debug, Clone)]
pub struct ModuleStat {
    pub name: String,
    /// A file path or `native:<kind>`.
    pub source: String,
    /// The state-file bits (3 = ready).
    pub state: u32,
    pub stats: CallStats,
    pub condition: Condition,
    /// Failed initialisations since the last successful one.
    pub init_failures: u32,
    /// After a failed initialisation: when the next attempt is due.
    pub next_init: Option<SystemTime>,
    /// Changes the module holds in its quarantine (refused by its target).
    pub quarantined: usize,
    /// The lasting problem the module reports ([`Module::problem`]).
    pub problem: Option<String>,
}

/// How a module is doing, as `ctrl status` reports it; only [`Condition::Ready`] is
/// healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Ready, and no handler call failed since the last one that succeeded.
    Ready,
    /// Ready, but every handler call since the last success (at least one) failed.
    Failing,
    /// Its last handler call failed transiently (its service is unreachable); the call is
    /// retried with backoff and the listener does not pass the transaction until it
    /// succeeds.
    Unavailable,
    /// Ready, but it holds changes its target refused in a quarantine.
    Quarantined,
    /// Ready, but it reports a lasting problem ([`ModuleStat::problem`]).
    Degraded,
    /// Not initialised, no attempt failed yet.
    NotReady,
    /// Its initialisation is running.
    Initialising,
    /// Its last initialisation failed; it is retried with backoff.
    InitFailed,
    /// The module could not be loaded; it runs nowhere until it is fixed and reloaded.
    FailedToLoad,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Ready => "ready",
            Condition::Failing => "failing",
            Condition::Unavailable => "unavailable",
            Condition::Quarantined => "quarantined changes",
            Condition::Degraded => "degraded",
            Condition::NotReady => "not ready",
            Condition::Initialising => "initialising",
            Condition::InitFailed => "initialisation failed",
            Condition::FailedToLoad => "failed to load",
        }
    }
}

/// Counters per module, for metrics and the status line.
#[derive(Debug, Clone, Default)]
pub struct CallStats {
    pub calls: u64,
    pub failures: u64,
    pub busy: Duration,
    /// Handler calls that failed since the last one that succeeded.
    pub consecutive_failures: u64,
    /// Handler calls repeated after a transient failure.
    pub retries: u64,
    /// The most recent failure of any call into the module (or of loading it).
    pub last_error: Option<LastError>,
}

/// A module failure as the status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastError {
    /// What failed: "handler m cn=x,dc=y", "initialize", "load", ….
    pub call: String,
    pub message: String,
    pub at: SystemTime,
}

/// A module file or native module spec that could not be loaded: listed by the status
/// (and unhealthy) instead of only logged, until a reload loads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadFailure {
    /// The module's name as far as it is known (its `name = ` line, else the file name).
    pub name: String,
    pub source: String,
    pub error: String,
    pub at: SystemTime,
}

/// A module asked the listener to exit (Python `SystemExit`, e.g. UCS's `replication` with
/// `ldap/replication/fallback=restart`): the listener stops without committing the
/// transaction in progress, so it is processed again after the restart, as in UCS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitRequest {
    pub module: String,
    /// The call that asked: "handler cn=x,dc=y", "initialize", "postrun", ….
    pub call: String,
    /// The status the module asked for (`sys.exit(n)`).
    pub status: i32,
    /// What it raised and where.
    pub message: String,
}

/// Where the handlers publish their module list when a module's condition changes during
/// an initialisation pass (which may keep the main loop busy for hours), so the status
/// shows "initialising" and each outcome at once.
pub type StatsSink = Arc<dyn Fn(Vec<ModuleStat>) + Send + Sync>;

/// The module call in progress, shared with the control socket: a call that does not
/// return shows up as blocked (module, function, DN, since when) instead of as an idle
/// listener. One lock per call is nothing next to the call itself.
#[derive(Debug, Clone, Default)]
pub struct CallTracker(Arc<Mutex<Option<ActiveCall>>>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveCall {
    pub module: String,
    /// "handler", "initialize", "prerun", ….
    pub function: &'static str,
    /// The object of a handler call.
    pub dn: Option<String>,
    pub started: Instant,
}

impl CallTracker {
    pub fn current(&self) -> Option<ActiveCall> {
        self.slot().clone()
    }

    pub(crate) fn set(&self, call: Option<ActiveCall>) {
        *self.slot() = call;
    }

    /// The value is replaced whole, so a panicking writer cannot leave it inconsistent.
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<ActiveCall>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Slot {
    module: Box<dyn Module>,
    filter: Option<Filter>,
    state: u32,
    /// Being initialised: called although not READY. Only in memory, so a crash during
    /// the pass leaves the module not ready and it is initialised again at the next start.
    initialising: bool,
    /// `prerun` ran (or the module needs none) and `postrun` has not yet.
    prepared: bool,
    stats: CallStats,
    /// Failed initialisations since the last successful one; with the backoff between
    /// attempts and the time the next one is due.
    init_failures: u32,
    init_backoff: Option<Backoff>,
    next_init: Option<Instant>,
    /// Handler calls made for the current transaction ([`Call::number`]).
    calls_in_transaction: u32,
    /// Since when its handler call fails transiently and is being retried.
    unavailable_since: Option<Instant>,
}

impl Slot {
    fn name(&self) -> &str {
        &self.module.info().name
    }

    fn is_ready(&self) -> bool {
        self.state & READY != 0
    }
}

/// Which modules an update runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    All,
    /// Module initialisation: only this one (index into the module list).
    Only(usize),
}

/// All loaded modules, in call order.
pub struct Handlers {
    slots: Vec<Slot>,
    state_dir: PathBuf,
    privileges: Privileges,
    /// Beaten after every module call: module calls are the daemon's progress, and a call
    /// that never returns stops the beats and so the watchdog.
    heartbeat: Heartbeat,
    /// During `-i`/`-P` a module that is not ready is still called (spec §4.5).
    init_only: bool,
    /// Modules that could not be loaded (or whose name was taken).
    load_failures: Vec<LoadFailure>,
    /// First wait before a failed initialisation is retried.
    init_retry: Duration,
    calls: CallTracker,
    sink: Option<StatsSink>,
    /// Set by the first module that asked the listener to exit; from then on no module is
    /// called any more.
    exit_request: Option<ExitRequest>,
    /// The transaction being processed ([`Call::transaction`]).
    transaction: u64,
    /// First and longest wait between retries of a transiently failed handler call.
    retry_backoff: (Duration, Duration),
    /// Asked between retries: true when the daemon is to stop.
    stop_requested: Option<StopCheck>,
    /// A handler call was given up because a stop was requested: the transaction must
    /// not be committed (a module missed it).
    interrupted: bool,
}

/// See [`Handlers::stop_when`].
pub type StopCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// First wait before a transiently failed handler call is retried.
pub(crate) const RETRY_FIRST: Duration = Duration::from_millis(250);
/// The wait between retries doubles up to this.
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often a retry wait looks whether a stop was requested.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Re-exported for the engine and the tests: the "up to date" rule's notion of a change.
pub use modules::changed_attributes;

fn order_key(module: &dyn Module) -> (f64, String) {
    let info = module.info();
    (info.priority, info.name.clone())
}

impl Handlers {
    /// Orders `modules` by priority, then name (UCS 5), reads their state files, and drops
    /// later modules whose name is taken (their state file and cache entries would collide).
    pub fn new(
        mut modules: Vec<Box<dyn Module>>,
        cache_dir: &Path,
        privileges: Privileges,
        heartbeat: Heartbeat,
    ) -> Handlers {
        modules.sort_by(|a, b| {
            let (pa, na) = order_key(a.as_ref());
            let (pb, nb) = order_key(b.as_ref());
            pa.total_cmp(&pb).then(na.cmp(&nb))
        });
        let state_dir = cache_dir.join(STATE_DIR);
        let mut slots: Vec<Slot> = Vec::with_capacity(modules.len());
        let mut load_failures = Vec::new();
        for module in modules {
            let info = module.info();
            if slots.iter().any(|s| s.name() == info.name) {
                tracing::error!(
                    "module {} from {} skipped: another module has that name",
                    info.name,
                    info.source
                );
                load_failures.push(LoadFailure {
                    name: info.name.clone(),
                    source: info.source.to_string(),
                    error: "skipped: another module has that name".into(),
                    at: SystemTime::now(),
                });
                continue;
            }
            let filter = info.filter.as_deref().map(Filter::new);
            for warning in filter.iter().flat_map(Filter::warnings) {
                tracing::warn!("module {}: filter {warning}", info.name);
            }
            let state = read_state(&state_dir, &info.name);
            slots.push(Slot {
                module,
                filter,
                state,
                initialising: false,
                prepared: false,
                stats: CallStats::default(),
                init_failures: 0,
                init_backoff: None,
                next_init: None,
                calls_in_transaction: 0,
                unavailable_since: None,
            });
        }
        Handlers {
            slots,
            state_dir,
            privileges,
            heartbeat,
            init_only: false,
            load_failures,
            init_retry: DEFAULT_INIT_RETRY,
            calls: CallTracker::default(),
            sink: None,
            exit_request: None,
            transaction: 0,
            retry_backoff: (RETRY_FIRST, RETRY_MAX),
            stop_requested: None,
            interrupted: false,
        }
    }

    /// Makes the retries of transiently failed handler calls give up when `check` says
    /// the daemon is to stop (the transaction is then not committed).
    pub fn stop_when(&mut self, check: StopCheck) {
        self.stop_requested = Some(check);
    }

    /// The waits between retries of a transiently failed handler call (first, longest).
    pub fn set_retry_backoff(&mut self, first: Duration, max: Duration) {
        self.retry_backoff = (first, max.max(first));
    }

    /// Starts the calls of transaction `id` (every attempt of it): numbering starts again.
    pub(crate) fn begin_transaction(&mut self, id: u64) {
        self.transaction = id;
        self.interrupted = false;
        for slot in &mut self.slots {
            slot.calls_in_transaction = 0;
        }
    }

    /// Whether a handler call was given up for a stop since the transaction began: its
    /// staged work must be discarded, not committed.
    pub(crate) fn interrupted(&self) -> bool {
        self.interrupted
    }

    /// Publishes the module list to `sink` whenever an initialisation starts or ends.
    pub fn publish_to(&mut self, sink: StatsSink) {
        self.sink = Some(sink);
    }

    fn publish(&self) {
        if let Some(sink) = &self.sink {
            sink(self.module_stats());
        }
    }

    /// Records modules the loader could not load, for the status.
    pub fn add_load_failures(&mut self, failures: impl IntoIterator<Item = LoadFailure>) {
        self.load_failures.extend(failures);
    }

    /// The first wait before a failed initialisation is retried (then doubling up to
    /// [`MAX_INIT_RETRY`]).
    pub fn set_init_retry(&mut self, first: Duration) {
        self.init_retry = first;
    }

    /// Publishes every module call to `tracker` (the control socket reads it).
    pub fn track_calls(&mut self, tracker: CallTracker) {
        self.calls = tracker;
    }

    /// The module that asked the listener to exit, if one did.
    pub fn exit_requested(&self) -> Option<&ExitRequest> {
        self.exit_request.as_ref()
    }

    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heartbeat
    }

    pub fn set_init_only(&mut self, on: bool) {
        self.init_only = on;
    }

    pub fn name(&self, index: usize) -> &str {
        self.slots.get(index).map_or("", Slot::name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(Slot::name)
    }

    pub(crate) fn filter_text(&self, index: usize) -> Option<&str> {
        self.slots
            .get(index)
            .and_then(|s| s.filter.as_ref())
            .map(Filter::as_str)
    }

    pub fn state(&self, index: usize) -> u32 {
        self.slots.get(index).map_or(0, |s| s.state)
    }

    pub fn stats(&self) -> impl Iterator<Item = (&str, &CallStats, u32)> {
        self.slots.iter().map(|s| (s.name(), &s.stats, s.state))
    }

    /// Changes all modules hold in their quarantines.
    pub fn quarantined(&self) -> usize {
        self.slots.iter().map(|s| s.module.quarantined()).sum()
    }

    /// Why the local LDAP server may lack a change the listener passed, if it may: a
    /// module holds quarantined changes, or the module that writes it (`replication`,
    /// native or UCS's `replication.py`) is loaded but not ready, so it is skipped. While
    /// this is `Some`, the cascade gate is closed (`cascade.rs`).
    pub fn local_ldap_incomplete(&self) -> Option<String> {
        let quarantined = self.quarantined();
        if quarantined > 0 {
            return Some(format!("{quarantined} change(s) quarantined"));
        }
        let unconfirmed: usize = self.slots.iter().map(|s| s.module.unconfirmed()).sum();
        if unconfirmed > 0 {
            return Some(format!(
                "{unconfirmed} change(s) not confirmed by the local LDAP server"
            ));
        }
        self.slots
            .iter()
            .find(|s| s.name() == REPLICATION && !s.is_ready())
            .map(|_| "the replication module is not ready".to_owned())
    }

    /// Every module with its source, state, counters and condition, then the modules that
    /// failed to load, for metrics and `ctrl status`.
    pub fn module_stats(&self) -> Vec<ModuleStat> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let loaded = self.slots.iter().map(|s| {
            // A module waiting for its service says so, also during its initialisation.
            let condition = if s.unavailable_since.is_some() {
                Condition::Unavailable
            } else if s.initialising {
                Condition::Initialising
            } else if !s.is_ready() && s.init_failures > 0 {
                Condition::InitFailed
            } else if !s.is_ready() {
                Condition::NotReady
            } else if s.stats.consecutive_failures > 0 {
                Condition::Failing
            } else if s.module.quarantined() > 0 {
                Condition::Quarantined
            } else if s.module.problem().is_some() {
                Condition::Degraded
            } else {
                Condition::Ready
            };
            ModuleStat {
                name: s.name().to_owned(),
                source: s.module.info().source.to_string(),
                state: s.state,
                stats: s.stats.clone(),
                condition,
                init_failures: s.init_failures,
                quarantined: s.module.quarantined(),
                problem: s.module.problem(),
                next_init: s
                    .next_init
                    .filter(|_| !s.is_ready())
                    .map(|due| wall + due.saturating_duration_since(now)),
            }
        });
        let failed = self.load_failures.iter().map(|f| ModuleStat {
            name: f.name.clone(),
            source: f.source.clone(),
            state: read_state(&self.state_dir, &f.name),
            stats: CallStats {
                last_error: Some(LastError {
                    call: "load".into(),
                    message: f.error.clone(),
                    at: f.at,
                }),
                ..CallStats::default()
            },
            condition: Condition::FailedToLoad,
            init_failures: 0,
            next_init: None,
            quarantined: 0,
            problem: None,
        });
        loaded.chain(failed).collect()
    }

    /// Indices of modules without the READY bit, in call order.
    pub(crate) fn not_ready(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| !self.slots[i].is_ready())
            .collect()
    }

    /// Modules without the READY bit whose initialisation may run at `now`: never tried,
    /// or their retry is due.
    pub(crate) fn due_for_init(&self, now: Instant) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| {
                let slot = &self.slots[i];
                !slot.is_ready() && slot.next_init.is_none_or(|due| due <= now)
            })
            .collect()
    }

    /// The earliest time a module that is not ready is to be initialised again.
    pub(crate) fn next_init_due(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter(|s| !s.is_ready())
            .filter_map(|s| s.next_init)
            .min()
    }

    /// How many initialisations of the module failed in a row so far.
    pub(crate) fn init_failures(&self, index: usize) -> u32 {
        self.slots.get(index).map_or(0, |s| s.init_failures)
    }

    /// Records a failed initialisation: the module stays not ready and is tried again
    /// after the returned wait (doubling per failure, with jitter so that many listeners
    /// do not retry in step).
    pub(crate) fn init_failed(&mut self, index: usize, error: &str) -> Duration {
        let first = self.init_retry;
        let Some(slot) = self.slots.get_mut(index) else {
            return first;
        };
        slot.init_failures = slot.init_failures.saturating_add(1);
        let delay = slot
            .init_backoff
            .get_or_insert_with(|| Backoff::new(first, MAX_INIT_RETRY.max(first)))
            .next_delay();
        slot.next_init = Some(Instant::now() + delay);
        slot.stats.last_error = Some(LastError {
            call: "initialisation".into(),
            message: error.to_owned(),
            at: SystemTime::now(),
        });
        self.publish();
        delay
    }

    /// Marks a module as being initialised (in memory only): its calls go through although
    /// it is not READY, until [`Handlers::set_state`] records the outcome.
    pub(crate) fn begin_initialising(&mut self, index: usize) {
        if let Some(slot) = self.slots.get_mut(index) {
            slot.initialising = true;
        }
        self.publish();
    }

    /// Sets a module's state and writes its state file; ends an initialisation.
    pub fn set_state(&mut self, index: usize, state: u32) -> Result<(), FileError> {
        let Some(slot) = self.slots.get_mut(index) else {
            return Ok(());
        };
        slot.state = state;
        slot.initialising = false;
        if state & READY != 0 {
            slot.init_failures = 0;
            slot.init_backoff = None;
            slot.next_init = None;
        }
        let written = write_state(&self.state_dir, slot.name(), state);
        self.publish();
        written
    }

    /// Writes every module's state file (at exit and before a reload, like UCS).
    pub fn write_states(&self) {
        for slot in &self.slots {
            if let Err(e) = write_state(&self.state_dir, slot.name(), slot.state) {
                tracing::error!("cannot write the state of module {}: {e}", slot.name());
            }
        }
    }

    /// `setdata` for every module with the UCS keys in UCS order; `None` values are skipped.
    pub fn setdata(&mut self, data: &[(&str, Option<String>)]) {
        for index in 0..self.slots.len() {
            for (key, value) in data {
                if let Some(value) = value {
                    let result = self.call(index, "setdata", None, |m| m.setdata(key, value));
                    if let Err(e) = result
                        && e.requested_exit().is_none()
                    {
                        tracing::error!("{}: setdata({key}) failed: {e}", self.name(index));
                    }
                }
            }
        }
    }

    /// `clean()` then `initialize()` of one module. A failed `clean` is logged and
    /// ignored (spec §3.8); a failed `initialize` is returned: the module did not set
    /// itself up, so its initialisation failed (UCS leaves such a module not ready).
    pub(crate) fn clean_and_initialize(&mut self, index: usize) -> Result<(), ModuleError> {
        match self.call(index, "clean", None, |m| m.clean()) {
            Ok(()) => {}
            Err(e) if e.requested_exit().is_some() => return Err(e),
            Err(e) => tracing::error!("{}: clean failed: {e}", self.name(index)),
        }
        self.call(index, "initialize", None, |m| m.initialize())
    }

    /// `H_update` (spec §3.4): runs the selected modules for an object whose new state is
    /// `new` and cached state `old`; every module that ran successfully or is up to date is
    /// added to `new.modules`.
    pub fn update(
        &mut self,
        id: u64,
        dn: &str,
        new: &mut CacheEntry,
        old: &CacheEntry,
        command: Command,
        selection: Selection,
    ) {
        // Modules to record, added after the calls: the calls borrow `new`'s attributes.
        let mut recorded: Vec<usize> = Vec::new();
        let changes = changed_attributes(&new.attributes, &old.attributes);
        for index in 0..self.slots.len() {
            if selection != Selection::All && selection != Selection::Only(index) {
                continue;
            }
            let slot = &self.slots[index];
            let name = slot.name();
            if name != REPLICATION && old.has_module(name) {
                let watched = &slot.module.info().attributes;
                let up_to_date = changes.is_empty()
                    || (!watched.is_empty()
                        && !watched.iter().any(|a| changes.contains(&a.as_str())));
                if up_to_date {
                    recorded.push(index);
                    continue;
                }
            }
            let matches = slot
                .filter
                .as_ref()
                .is_some_and(|f| f.matches(new.attributes.as_slice()));
            if !matches {
                continue;
            }
            let call = Call {
                id,
                dn,
                command,
                new: &new.attributes,
                old: &old.attributes,
                transaction: self.transaction,
                number: self.next_number(index),
            };
            if self.handle(index, &call) {
                recorded.push(index);
            }
        }
        for index in recorded {
            new.add_module(self.name(index));
        }
    }

    /// `H_delete` (spec §3.5): modules recorded on `old`, `replication`, and modules with
    /// `handle_every_delete` see the delete (`d`) or first half of a move (`r`); each that
    /// succeeds is removed from `old.modules`.
    pub fn delete(&mut self, id: u64, dn: &str, old: &mut CacheEntry, command: Command) {
        self.delete_selected(id, dn, old, command, Selection::All);
    }

    /// [`Handlers::delete`] for the selected modules only.
    pub fn delete_selected(
        &mut self,
        id: u64,
        dn: &str,
        old: &mut CacheEntry,
        command: Command,
        selection: Selection,
    ) {
        for index in 0..self.slots.len() {
            if selection != Selection::All && selection != Selection::Only(index) {
                continue;
            }
            let slot = &self.slots[index];
            let name = slot.name();
            let wanted = old.has_module(name)
                || name == REPLICATION
                || slot.module.info().handle_every_delete;
            if !wanted {
                continue;
            }
            let call = Call {
                id,
                dn,
                command,
                new: &[],
                old: &old.attributes,
                transaction: self.transaction,
                number: self.next_number(index),
            };
            if self.handle(index, &call) {
                old.remove_module(self.name(index));
            }
        }
    }

    /// Runs an operator command of the module `name` (the control socket's `MODULE`).
    pub fn control(&mut self, name: &str, command: &[String]) -> Result<String, String> {
        let Some(index) = self.slots.iter().position(|s| s.name() == name) else {
            return Err(format!("no module {name:?} is loaded"));
        };
        let words: Vec<&str> = command.iter().map(String::as_str).collect();
        let mut answer = None;
        let result = self.call(index, "control", None, |m| {
            answer = Some(m.control(&words)?);
            Ok(())
        });
        self.publish();
        match (result, answer) {
            (Ok(()), Some(answer)) => Ok(answer),
            (Err(e), _) => Err(e.to_string()),
            (Ok(()), None) => Err("no answer".into()),
        }
    }

    /// The modules that asked to hear about the descendants of moved containers
    /// (`handle_subtree_moves`), as indices in call order.
    pub fn subtree_movers(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&index| self.slots[index].module.info().handle_subtree_moves)
            .collect()
    }

    /// `postrun` for every prepared module; a module whose `postrun` fails stays prepared,
    /// so it is retried at the next idle time (spec §3.8).
    pub fn postrun(&mut self) {
        for index in 0..self.slots.len() {
            if !self.slots[index].prepared {
                continue;
            }
            match self.call(index, "postrun", None, |m| m.postrun()) {
                Ok(()) => self.slots[index].prepared = false,
                Err(e) if e.requested_exit().is_some() => return,
                Err(e) => tracing::error!("{}: postrun failed: {e}", self.name(index)),
            }
        }
    }

    /// `sync` for every module, before the listener makes its commits durable: the first
    /// failure (the caller stops as after a failed flush of its own).
    /// Waits until every module's target confirmed what it was handed
    /// ([`Module::confirm`]); returns how many changes remain unconfirmed.
    pub fn confirm(&mut self) -> usize {
        self.slots
            .iter_mut()
            .map(|slot| run_blocking(|| slot.module.confirm()))
            .sum()
    }

    pub fn sync(&mut self) -> Result<(), String> {
        for slot in &mut self.slots {
            if let Err(e) = run_blocking(|| slot.module.sync()) {
                return Err(format!("{}: sync failed: {e}", slot.name()));
            }
        }
        Ok(())
    }

    /// Runs one handler call with the lazy `prerun`; true on success.
    fn handle(&mut self, index: usize, call: &Call<'_>) -> bool {
        let Some(slot) = self.slots.get(index) else {
            return false;
        };
        if self.interrupted {
            // The transaction is given up (stop requested): no module sees more of it.
            return false;
        }
        if !slot.is_ready() && !slot.initialising && !self.init_only {
            tracing::warn!(
                "{}: not ready, {} {} skipped (failed)",
                slot.name(),
                call.command,
                call.dn
            );
            self.slots[index].stats.failures += 1;
            return false;
        }
        if !slot.prepared {
            match self.call(index, "prerun", None, |m| m.prerun()) {
                Ok(()) => self.slots[index].prepared = true,
                Err(e) if e.requested_exit().is_some() => return false,
                // The handler still runs; prerun is retried before the next call.
                Err(e) => tracing::error!("{}: prerun failed: {e}", self.name(index)),
            }
        }
        let started = Instant::now();
        let mut result = self.call(index, "handler", Some(call.dn), |m| m.handler(call));
        if result.as_ref().is_err_and(|e| e.is_transient()) {
            result = self.retry_transient(index, call, result);
        }
        let slot = &mut self.slots[index];
        slot.stats.calls += 1;
        slot.stats.busy += started.elapsed();
        match result {
            // Neither a success nor a failure: the transaction is not committed.
            Err(e) if e.requested_exit().is_some() => false,
            Ok(()) => {
                slot.stats.consecutive_failures = 0;
                tracing::debug!("{}: {} {}", slot.name(), call.command, call.dn);
                true
            }
            Err(e) => {
                slot.stats.failures += 1;
                slot.stats.consecutive_failures += 1;
                tracing::error!(
                    "{}: handler for {} {} (failed): {e}",
                    slot.name(),
                    call.command,
                    call.dn
                );
                false
            }
        }
    }

    /// The next [`Call::number`] of a module in the current transaction.
    fn next_number(&mut self, index: usize) -> u32 {
        let slot = &mut self.slots[index];
        slot.calls_in_transaction = slot.calls_in_transaction.saturating_add(1);
        slot.calls_in_transaction
    }

    /// Repeats a handler call that failed transiently, with backoff, until it succeeds,
    /// fails for good, or the daemon is to stop (then the transaction is marked
    /// [interrupted](Handlers::interrupted) and must not be committed). Meanwhile the
    /// module is [`Condition::Unavailable`] with the reason as its last error, and the
    /// watchdog is fed: the wait is bounded by the backoff, not stuck.
    fn retry_transient(
        &mut self,
        index: usize,
        call: &Call<'_>,
        mut result: Result<(), ModuleError>,
    ) -> Result<(), ModuleError> {
        let (first, max) = self.retry_backoff;
        let mut backoff = Backoff::new(first, max);
        let mut logged = false;
        while let Err(error) = &result {
            if !error.is_transient() {
                break;
            }
            let delay = backoff.next_delay();
            let slot = &mut self.slots[index];
            slot.unavailable_since.get_or_insert_with(Instant::now);
            if !logged {
                tracing::error!(
                    "{}: {} {} (id {}) cannot be handled now: {error}; the listener waits \
                     at this transaction and retries with backoff",
                    slot.name(),
                    call.command,
                    call.dn,
                    call.id
                );
                logged = true;
            } else {
                tracing::warn!(
                    "{}: still unavailable: {error}; next attempt in {delay:.1?}",
                    slot.name()
                );
            }
            self.publish();
            if !self.pause(delay) {
                tracing::warn!(
                    "{}: stop requested while waiting to retry {} {}; the transaction is \
                     not committed and is handled again at the next start",
                    self.name(index),
                    call.command,
                    call.dn
                );
                self.interrupted = true;
                break;
            }
            self.slots[index].stats.retries += 1;
            result = self.call(index, "handler", Some(call.dn), |m| m.handler(call));
        }
        let slot = &mut self.slots[index];
        if slot.unavailable_since.take().is_some() && result.is_ok() {
            tracing::info!("{}: available again, going on", slot.name());
        }
        self.publish();
        result
    }

    /// Sleeps `delay` (blocking work), beating the watchdog; false as soon as a stop is
    /// requested.
    fn pause(&self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        let stop = || self.stop_requested.as_ref().is_some_and(|check| check());
        loop {
            if stop() {
                return false;
            }
            self.heartbeat.beat();
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            run_blocking(|| std::thread::sleep(left.min(STOP_POLL)));
        }
    }

    /// Calls into a module (blocking work: [`run_blocking`]), then restores the daemon's
    /// effective uid/gid: modules may switch to root (`listener.setuid(0)`) and forget to
    /// switch back (spec §4.3). The call is published to the [`CallTracker`] while it
    /// runs, and a failure becomes the module's last error. Once a module asked the
    /// listener to exit, no module is called any more (UCS's listener ended right there).
    fn call(
        &mut self,
        index: usize,
        function: &'static str,
        dn: Option<&str>,
        f: impl FnOnce(&mut dyn Module) -> Result<(), ModuleError>,
    ) -> Result<(), ModuleError> {
        if let Some(request) = &self.exit_request {
            return Err(ModuleError::exit_requested(
                request.status,
                format!(
                    "not called: module {} asked the listener to exit",
                    request.module
                ),
            ));
        }
        let Some(slot) = self.slots.get_mut(index) else {
            return Ok(());
        };
        self.calls.set(Some(ActiveCall {
            module: slot.module.info().name.clone(),
            function,
            dn: dn.map(str::to_owned),
            started: Instant::now(),
        }));
        let result = run_blocking(|| f(slot.module.as_mut()));
        self.calls.set(None);
        if let Err(e) = &result {
            let call = match dn {
                Some(dn) => format!("{function} {dn}"),
                None => function.to_owned(),
            };
            match e.requested_exit() {
                Some(status) => {
                    let module = slot.module.info().name.clone();
                    tracing::error!(
                        "{module}: {call} requested the listener to exit with status {status} \
                         ({e}); stopping without committing the transaction in progress, it is \
                         processed again after the restart"
                    );
                    self.exit_request = Some(ExitRequest {
                        module,
                        call,
                        status,
                        message: e.to_string(),
                    });
                }
                None => {
                    slot.stats.last_error = Some(LastError {
                        call,
                        message: e.to_string(),
                        at: SystemTime::now(),
                    });
                }
            }
        }
        self.privileges.restore();
        self.heartbeat.beat();
        result
    }
}

/// The decimal state in `<dir>/<name>`; a missing or unreadable file is state 0.
pub(crate) fn read_state(dir: &Path, name: &str) -> u32 {
    parse_state(&dir.join(name)).unwrap_or(0)
}

fn parse_state(path: &Path) -> Option<u32> {
    daemon::fs::read_decimal(path).and_then(|n| u32::try_from(n).ok())
}

/// The module states in a `handlers` directory, by name; files that do not hold a number
/// (temporary files, junk) are left out. A missing directory has none.
pub fn read_states(dir: &Path) -> io::Result<BTreeMap<String, u32>> {
    let listing = match std::fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let mut states = BTreeMap::new();
    for entry in listing {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.file_type()?.is_file() {
            continue;
        }
        if let Some(state) = parse_state(&entry.path()) {
            states.insert(name, state);
        }
    }
    Ok(states)
}

/// Writes `<dir>/<name>` atomically and durably, decimal without newline.
pub(crate) fn write_state(dir: &Path, name: &str, state: u32) -> Result<(), FileError> {
    daemon::fs::write_decimal(&dir.join(name), state.into())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use modules::{ModuleInfo, ModuleSource};

    use super::*;

    type Log = Arc<Mutex<Vec<String>>>;

    struct Recorder {
        info: ModuleInfo,
        log: Log,
        fail_handler: bool,
        quarantined: usize,
        problem: Option<String>,
        fail_prerun: bool,
        fail_initialize: bool,
        /// The handler asks the listener to exit (as Python's `SystemExit`).
        exit_handler: bool,
        /// Logs what the tracker says while the handler runs.
        tracker: Option<CallTracker>,
    }

    impl Module for Recorder {
        fn info(&self) -> &ModuleInfo {
            &self.info
        }
        fn handler(&mut self, call: &Call<'_>) -> Result<(), ModuleError> {
            self.log.lock().unwrap().push(format!(
                "{} {} {} new={} old={}",
                self.info.name,
                call.command,
                call.dn,
                call.new.len(),
                call.old.len()
            ));
            if let Some(call) = self.tracker.as_ref().and_then(CallTracker::current) {
                self.log.lock().unwrap().push(format!(
                    "current {} {} {:?}",
                    call.module, call.function, call.dn
                ));
            }
            if self.exit_handler {
                return Err(ModuleError::exit_requested(1, "SystemExit(1)"));
            }
            if self.fail_handler {
                Err(ModuleError::new("boom"))
            } else {
                Ok(())
            }
        }
        fn quarantined(&self) -> usize {
            self.quarantined
        }
        fn problem(&self) -> Option<String> {
            self.problem.clone()
        }
        fn control(&mut self, command: &[&str]) -> Result<String, ModuleError> {
            Ok(format!("{} did {}", self.info.name, command.join(" ")))
        }
        fn prerun(&mut self) -> Result<(), ModuleError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("{} prerun", self.info.name));
            if self.fail_prerun {
                Err(ModuleError::new("no"))
            } else {
                Ok(())
            }
        }
        fn postrun(&mut self) -> Result<(), ModuleError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("{} postrun", self.info.name));
            Ok(())
        }
        fn initialize(&mut self) -> Result<(), ModuleError> {
            if self.fail_initialize {
                Err(ModuleError::new("cannot set up"))
            } else {
                Ok(())
            }
        }
        fn setdata(&mut self, key: &str, value: &str) -> Result<(), ModuleError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("{} setdata {key}={value}", self.info.name));
            Ok(())
        }
    }

    fn recorder(name: &str, filter: Option<&str>, log: &Log) -> Recorder {
        Recorder {
            info: ModuleInfo {
                name: name.into(),
                description: String::new(),
                filter: filter.map(str::to_owned),
                attributes: vec![],
                handle_every_delete: false,
                handle_subtree_moves: false,
                priority: if name == REPLICATION { 0.0 } else { 50.0 },
                source: ModuleSource::Native("test".into()),
            },
            log: Arc::clone(log),
            fail_handler: false,
            quarantined: 0,
            problem: None,
            fail_prerun: false,
            fail_initialize: false,
            exit_handler: false,
            tracker: None,
        }
    }

    fn entry(dn: &str, attrs: &[(&str, &[&str])], modules: &[&str]) -> CacheEntry {
        CacheEntry {
            dn: dn.into(),
            attributes: attrs
                .iter()
                .map(|(n, vs)| {
                    (
                        n.to_string(),
                        vs.iter().map(|v| v.as_bytes().to_vec()).collect(),
                    )
                })
                .collect(),
            modules: modules.iter().map(|m| m.to_string()).collect(),
        }
    }

    fn handlers(dir: &Path, modules: Vec<Recorder>) -> Handlers {
        let boxed: Vec<Box<dyn Module>> = modules
            .into_iter()
            .map(|m| Box::new(m) as Box<dyn Module>)
            .collect();
        std::fs::create_dir_all(dir.join(STATE_DIR)).unwrap();
        let mut h = Handlers::new(boxed, dir, Privileges::unchanged(), Heartbeat::new());
        for i in 0..h.names().count() {
            h.set_state(i, INITIALIZED | READY).unwrap();
        }
        h
    }

    fn take(log: &Log) -> Vec<String> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    #[test]
    fn diff_is_positional_and_counts_removed_attributes() {
        let old = entry(
            "x",
            &[("a", &["1", "2"]), ("b", &["x"]), ("gone", &["g"])],
            &[],
        );
        let new = entry(
            "x",
            &[("a", &["2", "1"]), ("b", &["x"]), ("c", &["n"])],
            &[],
        );
        assert_eq!(
            changed_attributes(&new.attributes, &old.attributes),
            ["a", "c", "gone"]
        );
        assert!(changed_attributes(&old.attributes, &old.attributes).is_empty());
    }

    #[test]
    fn the_local_ldap_is_incomplete_while_replication_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::default();
        let mut h = handlers(
            dir.path(),
            vec![
                recorder(REPLICATION, None, &log),
                recorder("other", None, &log),
            ],
        );
        assert_eq!(h.local_ldap_incomplete(), None);
        // Another module not being ready says nothing about the local LDAP.
        h.set_state(1, 0).unwrap();
        assert_eq!(h.local_ldap_incomplete(), None);
        h.set_state(0, INITIALIZED).unwrap();
        assert_eq!(
            h.local_ldap_incomplete().as_deref(),
            Some("the replication module is not ready")
        );
    }

    #[test]
    fn quarantined_changes_are_unhealthy_and_commands_reach_the_module() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::default();
        let mut held = recorder(REPLICATION, None, &log);
        held.quarantined = 2;
        let mut troubled = recorder("troubled", None, &log);
        troubled.problem = Some("schema not installed".into());
        let h = &mut handlers(
            dir.path(),
            vec![held, recorder("other", None, &log), troubled],
        );
        let stats = h.module_stats();
        assert_eq!(stats[0].condition, Condition::Quarantined);
        assert_eq!(stats[0].quarantined, 2);
        assert_eq!(
            h.local_ldap_incomplete().as_deref(),
            Some("2 change(s) quarantined")
        );
        assert_eq!(stats[1].condition, Condition::Ready);
        // A lasting problem the module reports makes it unhealthy, with the reason.
        assert_eq!(stats[2].condition, Condition::Degraded);
        assert_eq!(stats[2].problem.as_deref(), Some("schema not installed"));
        let command = vec!["quarantine".to_owned(), "list".to_owned()];
        assert_eq!(
            h.control(REPLICATION, &command).unwrap(),
            "replication did quarantine list"
        );
        assert!(
            h.control("nosuch", &command)
                .unwrap_err()
                .contains("no module")
        );
    }

    #[test]
    fn order_is_priority_then_name_with_replication_first() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::default();
        let mut late = recorder("aaa", Some("(objectClass=*)"), &log);
        late.info.priority = 60.0;
        let h = handlers(
            dir.path(),
            vec![
                late,
                recorder("zeta", None, &log),
                recorder(REPLICATION, None, &log),
                recorder("beta", None, &log),
                recorder("beta", None, &log),
            ],
        );
        assert_eq!(
            h.names().collect::<Vec<_>>(),
            ["replication", "beta", "zeta", "aaa"]
        );
        assert_eq!(read_state(&dir.path().join(STATE_DIR), "beta"), 3);
    }

    #[test]
    fn update_follows_filters_and_up_to_date_rules() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::default();
        let mut watcher = recorder("watcher", Some("(objectClass=person)"), &log);
        watcher.info.attributes = vec!["mail".into()];
        let h = &mut handlers(
            dir.path(),
            vec![
                recorder("all", Some("(objectClass=*)"), &log),
                recorder("groups", Some("(objectClass=group)"), &log),
                watcher,
            ],
        );
        let old = entry(
            "cn=a",
            &[
                ("objectClass", &["person"]),
                ("cn", &["a"]),
                ("mail", &["m"]),
            ],
            &["all", "watcher", "groups"],
        );
        // Only cn changed: "watcher" only cares about mail, so it is up to date; "groups"
        // no longer matches and silently drops out.
        let mut new = entry(
            "cn=a",
            &[
                ("objectClass", &["person"]),
                ("cn", &["b"]),
                ("mail", &["m"]),
            ],
            &[],
        );
        h.update(7, "cn=a", &mut new, &old, Command::Modify, Selection::All);
        assert_eq!(take(&log), ["all prerun", "all m cn=a new=3 old=3"]);
        assert_eq!(new.modules, ["all", "watcher"]);
        // No change at all: nobody is called, recorded modules stay.
        let mut same = old.clone();
        same.modules.clear();
        h.update(8, "cn=a", &mut same, &old, Command::Modify, Selection::All);
        assert!(take(&log).is_empty());
        assert_eq!(same.modules, ["all", "groups", "watcher"]);
        // A module not recorded on the object ignores `attributes`.
        let fresh = entry("cn=a", &[], &[]);
        let mut new = old.clone();
        new.modules.clear();
        h.update(9, "cn=a", &mut new, &fresh, Command::Add, Selection::All);
        assert_eq!(
            take(&log),
            [
                "all a cn=a new=3 old=0",
                "watcher prerun",
                "watcher a cn=a new=3 old=0"
            ]
        );
    }

    #[test]
    fn failures_are_not_recorded_and_prerun_failures_still_call_the_handler() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::default();
        let mut bad = recorder("bad", Some("(cn=*)"), &log);
        bad.fail_handler = true;
        let mut noprep = recorder("noprep", Some("(cn=*)"), &log);
        noprep.fail_prerun = true;
        let h = &mut handlers(dir.path(), vec![bad, noprep]);
        let mut new = entry("cn=a", &[("cn", &["a"])], &[]);
        h.update(
            1,
            "cn=a",
            &mut new,
            &CacheEntry::default(),
            Command::Add,
            Selection::All,
        );
        assert_eq!(new.modules, ["noprep"]);
        assert_eq!(
            take(&log),
            [
                "bad prerun",
                "bad a cn=a new=1 old=0",
                "noprep prerun",
                "noprep a cn=a new=1 old=0"
            ]
        );
        // postrun only for prepared modules ("bad" prepared; "noprep" not).
        h.postrun();
        assert_eq!(take(&log), ["bad postrun"]);
        h.postrun();
        assert!(take(&log).is_empty(), "postrun only once");
        let stats: Vec<_> = h
            .stats()
            .map(|(n, s, _)| (n.to_owned(), s.calls, s.failures))
            .collect();
        assert_eq!(
            stats,
            [("bad".to_owned(), 1, 1), ("noprep".to_owned(), 1, 0)]
        );
    }

    #[test]
    fn deletes_reach_recorded_replication_and_every_delete_modules() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::default();
        let mut every = recorder("every", None, &log);
        every.info.handle_every_delete = true;
        let h = &mut handlers(
            dir.path(),
            vec![
                recorder(REPLICATION, None, &log),
                recorder("recorded", None, &log),
                recorder("other", Some("(objectClass=*)"), &log),
                every,
            ],
        );
        let mut old = entry("cn=a", &[("cn", &["a"])], &["recorded"]);
        h.delete(4, "CN=A", &mut old, Command::Delete);
        let calls: Vec<_> = take(&log)
            .into_iter()
            .filter(|l| !l.ends_with("prerun"))
            .collect();
        assert_eq!(
            calls,
            [
                "replication d CN=A new=0 old=1",
                "every d CN=A new=0 old=1",
                "recorded d CN=A new=0 old=1"
            ]
        );
        assert!(old.modules.is_empty());
    }

    #[test]
    fn an_exit_request_stops_every_later_call_and_is_no_failure() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::default();
        let mut leaver = recorder("leaver", Some("(cn=*)"), &log);
        leaver.exit_handler = true;
        let h = &mut handlers(
            dir.path(),
            vec![
                recorder(REPLICATION, Some("(cn=*)"), &log),
                leaver,
                recorder("zlater", Some("(cn=*)"), &log),
            ],
        );
        let mut new = entry("cn=a", &[("cn", &["a"])], &[]);
        let old = CacheEntry::default();
        h.update(1, "cn=a", &mut new, &old, Command::Add, Selection::All);
        assert_eq!(
            take(&log),
            [
                "replication prerun",
                "replication a cn=a new=1 old=0",
                "leaver prerun",
                "leaver a cn=a new=1 old=0",
            ]
        );
        assert_eq!(new.modules, [REPLICATION]);
        let request = h.exit_requested().unwrap();
        assert_eq!(
            (
                request.module.as_str(),
                request.call.as_str(),
                request.status
            ),
            ("leaver", "handler cn=a", 1)
        );
        // Not counted as a failure, and nothing is called any more.
        let stats: Vec<_> = h.stats().map(|(n, s, _)| (n, s.failures)).collect();
        assert_eq!(stats, [(REPLICATION, 0), ("leaver", 0), ("zlater", 0)]);
        assert!(conditions(h).iter().all(|(_, c)| *c == Condition::Ready));
        h.postrun();
        h.setdata(&[("basedn", Some("dc=x".into()))]);
        h.delete(2, "cn=a", &mut new, Command::Delete);
        assert!(take(&log).is_empty());
    }

    #[test]
    fn modules_that_are_not_ready_fail_except_in_init_only_mode() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::default();
        let h = &mut handlers(dir.path(), vec![recorder("m", Some("(cn=*)"), &log)]);
        h.set_state(0, INITIALIZED).unwrap();
        assert_eq!(h.not_ready(), [0]);
        let mut new = entry("cn=a", &[("cn", &["a"])], &[]);
        h.update(
            1,
            "cn=a",
            &mut new,
            &CacheEntry::default(),
            Command::Add,
            Selection::All,
        );
        assert!(new.modules.is_empty());
        assert!(take(&log).is_empty());
        h.set_init_only(true);
        h.update(
            1,
            "cn=a",
            &mut new,
            &CacheEntry::default(),
            Command::Init,
            Selection::Only(0),
        );
        assert_eq!(new.modules, ["m"]);
    }

    fn conditions(h: &Handlers) -> Vec<(String, Condition)> {
        h.module_stats()
            .into_iter()
            .map(|m| (m.name, m.condition))
            .collect()
    }

    #[test]
    fn failing_calls_load_failures_and_the_current_call_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::default();
        let tracker = CallTracker::default();
        let mut bad = recorder("bad", Some("(cn=*)"), &log);
        bad.fail_handler = true;
        let mut good = recorder("good", Some("(cn=*)"), &log);
        good.tracker = Some(tracker.clone());
        let h = &mut handlers(dir.path(), vec![bad, good, recorder("bad", None, &log)]);
        h.track_calls(tracker.clone());
        h.add_load_failures([LoadFailure {
            name: "broken".into(),
            source: "/m/broken.py".into(),
            error: "SyntaxError: invalid syntax".into(),
            at: SystemTime::now(),
        }]);
        let mut new = entry("cn=a", &[("cn", &["a"])], &[]);
        let old = CacheEntry::default();
        h.update(1, "cn=a", &mut new, &old, Command::Add, Selection::All);
        assert!(
            take(&log).contains(&r#"current good handler Some("cn=a")"#.to_owned()),
            "the call is published while it runs"
        );
        assert_eq!(tracker.current(), None, "and withdrawn when it returns");
        assert_eq!(
            conditions(h),
            [
                ("bad".to_owned(), Condition::Failing),
                ("good".to_owned(), Condition::Ready),
                // The second "bad" could not be loaded: its name was taken.
                ("bad".to_owned(), Condition::FailedToLoad),
                ("broken".to_owned(), Condition::FailedToLoad),
            ]
        );
        let stats = h.module_stats();
        assert_eq!(stats[0].stats.consecutive_failures, 1);
        let error = stats[0].stats.last_error.as_ref().unwrap();
        assert_eq!(
            (error.call.as_str(), error.message.as_str()),
            ("handler cn=a", "boom")
        );
        assert_eq!(stats[3].source, "/m/broken.py");
        assert_eq!(
            stats[3].stats.last_error.as_ref().unwrap().message,
            "SyntaxError: invalid syntax"
        );
        h.update(2, "cn=a", &mut new, &old, Command::Add, Selection::All);
        assert_eq!(h.module_stats()[0].stats.consecutive_failures, 2);
    }

    #[test]
    fn a_failed_initialisation_is_retried_with_growing_waits() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::default();
        let mut module = recorder("m", Some("(cn=*)"), &log);
        module.fail_initialize = true;
        let h = &mut handlers(dir.path(), vec![module]);
        let published: Arc<Mutex<Vec<Condition>>> = Arc::default();
        let sink = Arc::clone(&published);
        h.publish_to(Arc::new(move |stats: Vec<ModuleStat>| {
            sink.lock().unwrap().push(stats[0].condition);
        }));
        h.set_state(0, INITIALIZED).unwrap();
        assert_eq!(conditions(h)[0].1, Condition::NotReady);
        assert_eq!(
            h.due_for_init(Instant::now()),
            [0],
            "never tried: due at once"
        );
        h.begin_initialising(0);
        assert_eq!(conditions(h)[0].1, Condition::Initialising);
        let error = h.clean_and_initialize(0).unwrap_err();
        assert_eq!(error.to_string(), "cannot set up");
        h.set_state(0, INITIALIZED).unwrap();
        h.set_init_retry(Duration::from_secs(10));
        let first = h.init_failed(0, "initialize() failed: cannot set up");
        // Equal jitter: between half and all of the step.
        assert!(first >= Duration::from_secs(5) && first <= Duration::from_secs(10));
        assert!(h.due_for_init(Instant::now()).is_empty());
        let due = h.next_init_due().unwrap();
        assert_eq!(h.due_for_init(due), [0]);
        let stat = &h.module_stats()[0];
        assert_eq!(stat.condition, Condition::InitFailed);
        assert_eq!(stat.init_failures, 1);
        assert!(stat.next_init.is_some());
        assert_eq!(
            stat.stats.last_error.as_ref().unwrap().call,
            "initialisation"
        );
        let second = h.init_failed(0, "again");
        assert!(second >= Duration::from_secs(10) && second <= Duration::from_secs(20));
        assert_eq!(h.init_failures(0), 2);
        // Success clears the retry state.
        h.set_state(0, INITIALIZED | READY).unwrap();
        assert_eq!(h.next_init_due(), None);
        assert_eq!(h.init_failures(0), 0);
        assert_eq!(conditions(h)[0].1, Condition::Ready);
        // Every step reached the status as it happened.
        assert_eq!(
            *published.lock().unwrap(),
            [
                Condition::NotReady,
                Condition::Initialising,
                Condition::NotReady,
                Condition::InitFailed,
                Condition::InitFailed,
                Condition::Ready
            ]
        );
    }

    #[test]
    fn setdata_skips_missing_values_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::default();
        let h = &mut handlers(dir.path(), vec![recorder("m", None, &log)]);
        h.setdata(&[
            ("basedn", Some("dc=x".into())),
            ("binddn", None),
            ("bindpw", Some("pw".into())),
            ("ldapserver", Some("h".into())),
        ]);
        assert_eq!(
            take(&log),
            [
                "m setdata basedn=dc=x",
                "m setdata bindpw=pw",
                "m setdata ldapserver=h"
            ]
        );
    }

    #[test]
    fn state_files_round_trip_without_newline() {
        let dir = tempfile::tempdir().unwrap();
        write_state(dir.path(), "mod", 3).unwrap();
        assert_eq!(std::fs::read(dir.path().join("mod")).unwrap(), b"3");
        assert_eq!(read_state(dir.path(), "mod"), 3);
        assert_eq!(read_state(dir.path(), "missing"), 0);
        std::fs::write(dir.path().join("junk"), "x").unwrap();
        assert_eq!(read_state(dir.path(), "junk"), 0);
    }
}
