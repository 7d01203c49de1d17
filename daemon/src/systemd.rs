//! systemd integration: `sd_notify` states, and a watchdog fed only while the daemon makes
//! progress.
//!
//! A watchdog fed by a timer task proves that the async runtime is alive, not that the
//! daemon works: a main loop wedged in a module call or a deadlock would never be
//! restarted. Here the main loop (listener) or the intake/committer loop (notifier) beats a
//! [`Heartbeat`] every time it makes progress and at least every [`Heartbeat::idle_interval`]
//! while it waits for work; the watchdog task pings systemd only while the last beat is
//! younger than the watchdog interval. Long work keeps it alive by its own progress (a
//! module initialisation beats per object).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Tells systemd the daemon is ready (Type=notify), with a status line.
pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The status line `systemctl status` shows.
pub fn status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// When the main loop last showed that it is not stuck.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    inner: Arc<Beats>,
}

#[derive(Debug)]
struct Beats {
    origin: Instant,
    /// Milliseconds after `origin` of the last beat.
    last: AtomicU64,
    /// How often a waiting loop must beat.
    idle_interval: Duration,
}

impl Heartbeat {
    /// A heartbeat for the watchdog systemd configured for this process (`WATCHDOG_USEC`),
    /// if any.
    pub fn new() -> Heartbeat {
        Heartbeat::with_watchdog(sd_notify::watchdog_enabled())
    }

    fn with_watchdog(watchdog: Option<Duration>) -> Heartbeat {
        // Without a watchdog nobody reads the beats; a slow idle tick costs nothing.
        let idle_interval = watchdog.map_or(Duration::from_secs(30), |w| w / 4);
        Heartbeat {
            inner: Arc::new(Beats {
                origin: Instant::now(),
                last: AtomicU64::new(0),
                idle_interval,
            }),
        }
    }

    /// The loop made progress, or is waiting for work as it should.
    pub fn beat(&self) {
        let now = self.inner.origin.elapsed().as_millis() as u64;
        self.inner.last.store(now, Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub(crate) fn age(&self) -> Duration {
        let now = self.inner.origin.elapsed();
        now.saturating_sub(Duration::from_millis(
            self.inner.last.load(Ordering::Relaxed),
        ))
    }

    /// The longest a loop waiting for work may go without a beat.
    pub fn idle_interval(&self) -> Duration {
        self.inner.idle_interval
    }

    /// Awaits `work`, beating while it is pending: for waits that are legitimately long and
    /// bounded by their own logic (waiting for the next transaction, retrying an unreachable
    /// server with backoff). Never wrap work whose hang the watchdog must catch.
    pub async fn waiting<F: Future>(&self, work: F) -> F::Output {
        let mut work = std::pin::pin!(work);
        loop {
            self.beat();
            tokio::select! {
                output = &mut work => {
                    self.beat();
                    return output;
                }
                _ = tokio::time::sleep(self.inner.idle_interval) => {}
            }
        }
    }
}

impl Default for Heartbeat {
    fn default() -> Heartbeat {
        Heartbeat::new()
    }
}

/// Pings systemd's watchdog every quarter interval while `heartbeat` is younger than the
/// interval; `None` when systemd configured no watchdog. `what` names the loop in the log.
pub fn spawn_watchdog(
    heartbeat: Heartbeat,
    what: &'static str,
    shutdown: CancellationToken,
) -> Option<JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()?;
    Some(tokio::spawn(async move {
        let mut stalled = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval / 4) => {}
            }
            let age = heartbeat.age();
            if age < interval {
                if stalled {
                    tracing::warn!("the {what} makes progress again; feeding the watchdog");
                    stalled = false;
                }
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            } else if !stalled {
                tracing::error!(
                    "the {what} has made no progress for {age:.0?} (watchdog {interval:?}); \
                     no longer feeding the watchdog, systemd will restart the daemon"
                );
                stalled = true;
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_reset_the_age() {
        let heartbeat = Heartbeat::with_watchdog(Some(Duration::from_secs(4)));
        assert_eq!(heartbeat.idle_interval(), Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(30));
        assert!(heartbeat.age() >= Duration::from_millis(30));
        heartbeat.clone().beat();
        assert!(heartbeat.age() < Duration::from_millis(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_wait_keeps_beating() {
        let heartbeat = Heartbeat::with_watchdog(Some(Duration::from_secs(4)));
        let waiter = heartbeat.clone();
        let task = tokio::spawn(async move {
            waiter
                .waiting(async {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    7
                })
                .await
        });
        tokio::time::sleep(Duration::from_millis(9500)).await;
        assert!(
            heartbeat.age() <= Duration::from_secs(1),
            "{:?}",
            heartbeat.age()
        );
        assert_eq!(task.await.unwrap(), 7);
        // Without the wrapper nothing beats.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(heartbeat.age() >= Duration::from_secs(3));
    }
}
