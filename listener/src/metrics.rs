//! Prometheus metrics of the listener: progress, lag, and per-module calls, failures and
//! time. The main loop publishes a snapshot; the HTTP endpoint renders it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use daemon::metrics::{Exposition, Kind};
use daemon::time::unix_seconds;

use crate::dispatch::{CallTracker, Condition, ModuleStat, READY};

#[derive(Debug, Default)]
pub struct Metrics {
    processed_id: AtomicU64,
    notifier_id: AtomicU64,
    transactions: AtomicU64,
    modules: Mutex<Vec<ModuleStat>>,
    /// The module call in progress, written by the main loop's handlers around every call.
    calls: CallTracker,
    /// What the daemon does, as in its systemd STATUS ("waiting", "paused: …").
    state: Mutex<String>,
    /// Unix seconds when `processed_id` last changed, 0 for not since start: the "seconds
    /// since progress" of `ctrl status`. An atomic keeps the per-transaction path lock-free.
    last_progress: AtomicU64,
    /// Cascade lines held back by the gate (`cascade.rs`) and the first held id.
    cascade_held: AtomicU64,
    cascade_held_from: AtomicU64,
}

impl Metrics {
    /// The id the daemon starts from: not progress, so it leaves `last_progress` alone.
    pub fn start_at(&self, id: u64) {
        self.processed_id.store(id, Ordering::Relaxed);
    }

    pub fn set_processed(&self, id: u64) {
        if self.processed_id.swap(id, Ordering::Relaxed) != id {
            self.last_progress
                .store(unix_seconds(SystemTime::now()), Ordering::Relaxed);
        }
    }

    /// Unix seconds of the last change of the processed id, if any since start.
    pub fn last_progress(&self) -> Option<u64> {
        match self.last_progress.load(Ordering::Relaxed) {
            0 => None,
            seconds => Some(seconds),
        }
    }

    pub fn set_state(&self, state: &str) {
        let mut current = lock(&self.state);
        if *current != state {
            state.clone_into(&mut current);
        }
    }

    pub fn state(&self) -> String {
        lock(&self.state).clone()
    }

    pub(crate) fn set_cascade_held(&self, count: u64, first: u64) {
        self.cascade_held_from.store(first, Ordering::Relaxed);
        self.cascade_held.store(count, Ordering::Relaxed);
    }

    /// Cascade lines held back from the local notifier and the first held id, if any.
    pub fn cascade_held(&self) -> Option<(u64, u64)> {
        match self.cascade_held.load(Ordering::Relaxed) {
            0 => None,
            count => Some((count, self.cascade_held_from.load(Ordering::Relaxed))),
        }
    }

    /// The tracker the handlers publish their calls to (shared, not copied).
    pub fn call_tracker(&self) -> CallTracker {
        self.calls.clone()
    }

    pub fn modules(&self) -> Vec<ModuleStat> {
        lock(&self.modules).clone()
    }

    pub(crate) fn set_notifier_id(&self, id: u64) {
        self.notifier_id.fetch_max(id, Ordering::Relaxed);
    }

    pub(crate) fn add_transactions(&self, n: u64) {
        self.transactions.fetch_add(n, Ordering::Relaxed);
    }

    pub fn processed(&self) -> u64 {
        self.processed_id.load(Ordering::Relaxed)
    }

    pub fn notifier_id(&self) -> u64 {
        self.notifier_id.load(Ordering::Relaxed)
    }

    pub fn lag(&self) -> u64 {
        self.notifier_id().saturating_sub(self.processed())
    }

    pub fn set_modules(&self, modules: Vec<ModuleStat>) {
        *lock(&self.modules) = modules;
    }

    /// "modules ok/failed": healthy modules / modules that are not (not ready, failing,
    /// failed to initialise or to load).
    pub(crate) fn module_counts(&self) -> (usize, usize) {
        let modules = lock(&self.modules);
        let healthy = modules
            .iter()
            .filter(|m| m.condition == Condition::Ready)
            .count();
        (healthy, modules.len() - healthy)
    }

    pub fn render(&self) -> String {
        let mut e = Exposition::new();
        e.single(
            "udl_processed_id",
            Kind::Gauge,
            "Last transaction id fully processed.",
            self.processed(),
        )
        .single(
            "udl_notifier_id",
            Kind::Gauge,
            "Last transaction id the notifier reported.",
            self.notifier_id(),
        )
        .single(
            "udl_lag",
            Kind::Gauge,
            "Transactions not yet processed.",
            self.lag(),
        )
        .single(
            "udl_transactions_total",
            Kind::Counter,
            "Transactions processed since start.",
            self.transactions.load(Ordering::Relaxed),
        )
        .single(
            "udl_cascade_held",
            Kind::Gauge,
            "Transactions held back from the local notifier until the local LDAP holds them.",
            self.cascade_held.load(Ordering::Relaxed),
        );
        let modules = lock(&self.modules);
        let families: [(&str, Kind, &str, ModuleValue); 9] = [
            (
                "udl_module_calls_total",
                Kind::Counter,
                "Handler calls per module.",
                |m| m.stats.calls.to_string(),
            ),
            (
                "udl_module_failures_total",
                Kind::Counter,
                "Failed handler calls per module.",
                |m| m.stats.failures.to_string(),
            ),
            (
                "udl_module_retries_total",
                Kind::Counter,
                "Handler calls repeated after a transient failure (the module's service was \
                 unreachable; the listener waited at the transaction).",
                |m| m.stats.retries.to_string(),
            ),
            (
                "udl_module_seconds_total",
                Kind::Counter,
                "Time spent in handler calls per module.",
                |m| format!("{:.6}", m.stats.busy.as_secs_f64()),
            ),
            (
                "udl_module_ready",
                Kind::Gauge,
                "1 if the module is initialised and ready.",
                |m| u8::from(m.state & READY != 0).to_string(),
            ),
            (
                "udl_module_healthy",
                Kind::Gauge,
                "1 if the module is ready and its last handler call did not fail; 0 if it \
                 is failing, not ready, failed to initialise or failed to load.",
                |m| u8::from(m.condition == Condition::Ready).to_string(),
            ),
            (
                "udl_module_consecutive_failures",
                Kind::Gauge,
                "Handler calls that failed since the module's last successful one.",
                |m| m.stats.consecutive_failures.to_string(),
            ),
            (
                "udl_module_quarantined",
                Kind::Gauge,
                "Changes the module holds in its quarantine because its target refused them.",
                |m| m.quarantined.to_string(),
            ),
            (
                "udl_module_problem",
                Kind::Gauge,
                "1 while the module reports a lasting problem (e.g. a replicated schema its \
                 target refused; `ctrl status` shows it).",
                |m| u8::from(m.problem.is_some()).to_string(),
            ),
        ];
        // One series per name: a module that did not load because its name was taken
        // must not repeat the loaded one's labels (loaded modules come first).
        let mut seen = std::collections::HashSet::new();
        let series: Vec<&ModuleStat> = modules
            .iter()
            .filter(|m| seen.insert(m.name.as_str()))
            .collect();
        for (name, kind, help, value) in families {
            e.family(name, kind, help);
            for module in &series {
                e.sample(name, &[("module", &module.name)], value(module));
            }
        }
        e.finish()
    }
}

/// One per-module value of a metric family.
type ModuleValue = fn(&ModuleStat) -> String;

/// The guarded values are plain data that a panicking writer cannot leave inconsistent.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::dispatch::CallStats;

    #[test]
    fn only_a_change_of_the_processed_id_is_progress() {
        let metrics = Metrics::default();
        metrics.start_at(5);
        assert_eq!(metrics.processed(), 5);
        assert_eq!(metrics.last_progress(), None);
        metrics.set_processed(5);
        assert_eq!(metrics.last_progress(), None);
        metrics.set_processed(6);
        assert!(metrics.last_progress().is_some_and(|s| s > 0));
    }

    #[test]
    fn renders_progress_and_modules() {
        let m = Metrics::default();
        m.set_notifier_id(12);
        m.set_processed(10);
        m.add_transactions(3);
        m.set_modules(vec![ModuleStat {
            name: "jsonl".into(),
            source: "native:jsonl".into(),
            stats: CallStats {
                calls: 5,
                failures: 1,
                busy: Duration::from_millis(1500),
                ..CallStats::default()
            },
            state: 3,
            condition: Condition::Ready,
            init_failures: 0,
            next_init: None,
            quarantined: 0,
            problem: None,
        }]);
        let text = m.render();
        assert!(text.contains("udl_lag 2\n"), "{text}");
        assert!(text.contains("udl_transactions_total 3\n"));
        assert!(text.contains("udl_module_calls_total{module=\"jsonl\"} 5\n"));
        assert!(text.contains("udl_module_failures_total{module=\"jsonl\"} 1\n"));
        assert!(text.contains("udl_module_seconds_total{module=\"jsonl\"} 1.500000\n"));
        assert!(text.contains("udl_module_ready{module=\"jsonl\"} 1\n"));
        assert!(text.contains("udl_module_healthy{module=\"jsonl\"} 1\n"));
        assert!(text.contains("udl_module_problem{module=\"jsonl\"} 0\n"));
        assert!(text.contains("udl_module_consecutive_failures{module=\"jsonl\"} 0\n"));
        assert_eq!(m.module_counts(), (1, 0));
    }

    #[test]
    fn a_module_that_did_not_load_is_unhealthy_and_never_repeats_a_series() {
        let m = Metrics::default();
        let stat = |name: &str, condition| ModuleStat {
            name: name.into(),
            source: "native:jsonl".into(),
            stats: CallStats::default(),
            state: 0,
            condition,
            init_failures: 0,
            next_init: None,
            quarantined: 0,
            problem: None,
        };
        m.set_modules(vec![
            stat("a", Condition::Failing),
            stat("b", Condition::FailedToLoad),
            // Its name was taken by "a".
            stat("a", Condition::FailedToLoad),
        ]);
        let text = m.render();
        assert_eq!(
            text.matches("udl_module_healthy{module=\"a\"} 0\n").count(),
            1
        );
        assert!(
            text.contains("udl_module_healthy{module=\"b\"} 0\n"),
            "{text}"
        );
        assert_eq!(m.module_counts(), (0, 3));
    }

    #[test]
    fn progress_time_moves_only_when_the_id_does() {
        let m = Metrics::default();
        assert_eq!(m.last_progress(), None);
        m.set_processed(5);
        let first = m.last_progress().unwrap();
        m.set_processed(5);
        assert_eq!(m.last_progress(), Some(first));
        m.set_state("waiting");
        assert_eq!(m.state(), "waiting");
    }
}
