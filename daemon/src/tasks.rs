//! Tasks and threads.
//!
//! **The blocking rule.** Async tasks never block a runtime worker:
//! - module calls (native or Python), cache commits, flushes and scans of the listener's main
//!   loop, and the notifier's journal append + fsync are blocking work. The listener's main
//!   loop owns its modules and cache and needs them back at once, so it runs such work
//!   through [`run_blocking`] (`block_in_place`: the worker hands its other tasks to another
//!   thread meanwhile); one-off work that owns its data (the journal commit, a snapshot)
//!   goes to `spawn_blocking`;
//! - Python runs only on the listener's main loop thread (the runtime's `block_on` thread),
//!   never on a runtime worker;
//! - no `std` lock guard is held across an `.await` (`clippy::await_holding_lock` denies it).
//!
//! [`TaskSet`] holds the long-running tasks of a daemon (server, control socket, metrics,
//! watchdog) by name; its shutdown cancels them and awaits each in order, so nothing is cut
//! off half way and a task that does not stop is named in the log.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Runs blocking `f` from async code without stalling the runtime's other tasks (see the
/// module comment); outside a multi-threaded runtime it simply runs `f`.
pub fn run_blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Named tasks sharing one shutdown token.
#[derive(Debug)]
pub struct TaskSet {
    shutdown: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl TaskSet {
    pub fn new(shutdown: CancellationToken) -> TaskSet {
        TaskSet {
            shutdown,
            tasks: Vec::new(),
        }
    }

    /// The token the tasks watch; cancelling it starts the shutdown.
    pub fn token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push((name, tokio::spawn(task)));
    }

    /// Adds a task spawned elsewhere.
    pub fn adopt(&mut self, name: &'static str, handle: JoinHandle<()>) {
        self.tasks.push((name, handle));
    }

    /// Cancels the token, then awaits every task in the order they were added, each for
    /// at most `grace`; a task still running then is aborted and named.
    pub async fn shutdown(self, grace: Duration) {
        self.shutdown.cancel();
        for (name, mut handle) in self.tasks {
            match tokio::time::timeout(grace, &mut handle).await {
                Ok(Ok(())) => tracing::debug!("{name} stopped"),
                Ok(Err(e)) if e.is_panic() => tracing::error!("{name} panicked: {e}"),
                Ok(Err(_)) => {}
                Err(_) => {
                    tracing::warn!("{name} did not stop within {grace:?}; aborting it");
                    handle.abort();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn shutdown_awaits_tasks_in_order_and_aborts_stragglers() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut set = TaskSet::new(CancellationToken::new());
        for (name, delay) in [("server", 50), ("control", 0), ("metrics", 10)] {
            let token = set.token();
            let order = Arc::clone(&order);
            set.spawn(name, async move {
                token.cancelled().await;
                tokio::time::sleep(Duration::from_millis(delay)).await;
                order.lock().unwrap().push(name);
            });
        }
        set.spawn("stuck", std::future::pending());
        set.shutdown(Duration::from_millis(500)).await;
        // Every task finished its shutdown work; "stuck" was aborted.
        let mut done = order.lock().unwrap().clone();
        done.sort_unstable();
        assert_eq!(done, ["control", "metrics", "server"]);
    }

    #[test]
    fn run_blocking_works_on_both_runtime_flavours() {
        assert_eq!(run_blocking(|| 1), 1);
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(current.block_on(async { run_blocking(|| 2) }), 2);
        let multi = tokio::runtime::Builder::new_multi_thread().build().unwrap();
        assert_eq!(multi.block_on(async { run_blocking(|| 3) }), 3);
    }
}
