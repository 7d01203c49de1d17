//! Exponential backoff for reconnect loops: quick first retries, bounded wait afterwards,
//! and jitter, so that hundreds of listeners that lost the same notifier do not reconnect
//! in lock-step.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    rng: u64,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff::with_seed(initial, max, fresh_seed())
    }

    /// A backoff whose jitter sequence is fixed by `seed`.
    fn with_seed(initial: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
            // xorshift must not start at 0.
            rng: seed | 1,
        }
    }

    /// The delay to wait now: the current step scaled by a random factor in [0.5, 1.0]
    /// ("equal jitter"); the step doubles up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let fraction = (self.next_random() >> 11) as f64 / (1u64 << 53) as f64;
        step.mul_f64(0.5 + fraction / 2.0)
    }

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// xorshift64*: plenty for spreading retries.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Different per process and per backoff: pid, clock and a counter mixed together.
fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    (u64::from(std::process::id()) << 32) ^ nanos ^ count.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_up_to_the_maximum_with_jitter_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        for step in [100, 200, 350, 350] {
            let delay = b.next_delay().as_millis();
            assert!((step / 2..=step).contains(&delay), "{delay} for {step}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn different_seeds_spread_the_retries() {
        let delays = |seed| {
            let mut b = Backoff::with_seed(Duration::from_secs(1), Duration::from_secs(30), seed);
            (0..8).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(delays(7), delays(7));
        assert_ne!(delays(7), delays(8));
        // Many listeners restarting together pick many different first delays.
        let firsts: std::collections::BTreeSet<_> = (0..100)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(30)).next_delay())
            .collect();
        assert!(firsts.len() > 90, "{}", firsts.len());
    }
}
