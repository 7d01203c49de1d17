//! Prometheus metrics of the listener: progress, lag, and per-module calls, failures and
//! time. The main loop publishes a snapshot; the HTTP endpoint renders it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use crate::control::unix_seconds;
use crate::dispatch::{CallStats, READY};

/// One loaded module as the metrics and the control socket show it.
#[derive(Debug, Clone)]
pub struct ModuleStat {
    pub name: String,
    /// A file path or `native:<kind>`.
    pub source: String,
    /// The state-file bits (3 = ready).
    pub state: u32,
    pub stats: CallStats,
}

#[derive(Debug, Default)]
pub struct Metrics {
    processed_id: AtomicU64,
    notifier_id: AtomicU64,
    transactions: AtomicU64,
    modules: Mutex<Vec<ModuleStat>>,
    /// What the daemon does, as in its systemd STATUS ("waiting", "paused: …").
    state: Mutex<String>,
    /// Unix seconds when `processed_id` last changed, 0 for not since start: the "seconds
    /// since progress" of `ctrl status`. An atomic keeps the per-transaction path lock-free.
    last_progress: AtomicU64,
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

    pub fn modules(&self) -> Vec<ModuleStat> {
        lock(&self.modules).clone()
    }

    pub fn set_notifier_id(&self, id: u64) {
        self.notifier_id.fetch_max(id, Ordering::Relaxed);
    }

    pub fn add_transactions(&self, n: u64) {
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

    /// "modules ok/failed": ready modules / modules that are not ready.
    pub fn module_counts(&self) -> (usize, usize) {
        let modules = lock(&self.modules);
        let ready = modules.iter().filter(|m| m.state & READY != 0).count();
        (ready, modules.len() - ready)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        gauge(
            "udl_processed_id",
            "Last transaction id fully processed.",
            "gauge",
            self.processed(),
        );
        gauge(
            "udl_notifier_id",
            "Last transaction id the notifier reported.",
            "gauge",
            self.notifier_id(),
        );
        gauge(
            "udl_lag",
            "Transactions not yet processed.",
            "gauge",
            self.lag(),
        );
        gauge(
            "udl_transactions_total",
            "Transactions processed since start.",
            "counter",
            self.transactions.load(Ordering::Relaxed),
        );
        let modules = lock(&self.modules);
        let families: [(&str, &str, &str); 4] = [
            (
                "udl_module_calls_total",
                "Handler calls per module.",
                "counter",
            ),
            (
                "udl_module_failures_total",
                "Failed handler calls per module.",
                "counter",
            ),
            (
                "udl_module_seconds_total",
                "Time spent in handler calls per module.",
                "counter",
            ),
            (
                "udl_module_ready",
                "1 if the module is initialised and ready.",
                "gauge",
            ),
        ];
        for (name, help, kind) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for ModuleStat {
                name: module,
                stats,
                state,
                ..
            } in modules.iter()
            {
                let value = match name {
                    "udl_module_calls_total" => stats.calls.to_string(),
                    "udl_module_failures_total" => stats.failures.to_string(),
                    "udl_module_seconds_total" => format!("{:.6}", stats.busy.as_secs_f64()),
                    _ => u8::from(state & READY != 0).to_string(),
                };
                let _ = writeln!(out, "{name}{{module=\"{}\"}} {value}", escape_label(module));
            }
        }
        out
    }
}

/// The guarded values are plain data that a panicking writer cannot leave inconsistent.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

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
            },
            state: 3,
        }]);
        let text = m.render();
        assert!(text.contains("udl_lag 2\n"), "{text}");
        assert!(text.contains("udl_transactions_total 3\n"));
        assert!(text.contains("udl_module_calls_total{module=\"jsonl\"} 5\n"));
        assert!(text.contains("udl_module_failures_total{module=\"jsonl\"} 1\n"));
        assert!(text.contains("udl_module_seconds_total{module=\"jsonl\"} 1.500000\n"));
        assert!(text.contains("udl_module_ready{module=\"jsonl\"} 1\n"));
        assert_eq!(m.module_counts(), (1, 0));
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
