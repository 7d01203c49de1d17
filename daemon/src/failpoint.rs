//! Failpoints: a seam for faults a test cannot cause on demand, such as an `fsync` that
//! reports a write-back error. Debug builds only (the integration tests run those); in a
//! release build [`check`] is always `Ok`.
//!
//! `UDR_FAILPOINTS=name=N[,name=N…]` makes the N-th and every later [`check`] of `name`
//! fail: a fault that keeps happening, as a failing disk does. `name=N*C` fails only C
//! checks from the N-th on: a fault that passes, as a disk that was full for a moment.

use std::io;

/// The environment variable naming the armed failpoints.
pub const ENV: &str = "UDR_FAILPOINTS";

/// `Err` when the failpoint `name` is armed and due.
pub fn check(name: &str) -> io::Result<()> {
    #[cfg(debug_assertions)]
    if armed::due(name) {
        return Err(io::Error::other(format!("failpoint {name} ({ENV})")));
    }
    let _ = name;
    Ok(())
}

#[cfg(debug_assertions)]
mod armed {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock, PoisonError};

    /// When an armed failpoint fails, and how often it was hit so far.
    #[derive(Debug, PartialEq, Eq)]
    pub(super) struct Armed {
        from: u64,
        /// Failing checks from `from` on; `None`: all of them.
        count: Option<u64>,
        hits: u64,
    }

    static ARMED: OnceLock<Mutex<HashMap<String, Armed>>> = OnceLock::new();

    pub(super) fn due(name: &str) -> bool {
        let armed =
            ARMED.get_or_init(|| Mutex::new(parse(&std::env::var(super::ENV).unwrap_or_default())));
        let mut armed = armed.lock().unwrap_or_else(PoisonError::into_inner);
        armed.get_mut(name).is_some_and(Armed::hit)
    }

    impl Armed {
        /// Counts a check; whether it fails.
        fn hit(&mut self) -> bool {
            self.hits += 1;
            self.hits >= self.from && self.count.is_none_or(|count| self.hits - self.from < count)
        }
    }

    pub(super) fn parse(spec: &str) -> HashMap<String, Armed> {
        spec.split(',')
            .filter_map(|item| {
                let (name, when) = item.trim().split_once('=')?;
                let (from, count) = match when.split_once('*') {
                    Some((from, count)) => (from, Some(count.parse().ok()?)),
                    None => (when, None),
                };
                let from = from.parse().ok()?;
                Some((
                    name.to_owned(),
                    Armed {
                        from,
                        count,
                        hits: 0,
                    },
                ))
            })
            .collect()
    }

    #[cfg(test)]
    mod tests {
        use super::Armed;

        #[test]
        fn parses_names_and_hits() {
            let armed = super::parse("journal-sync=2, cache-flush=1,bad,x=y,log=3*2,z=1*y");
            assert_eq!(armed.len(), 3);
            let at = |from, count| Armed {
                from,
                count,
                hits: 0,
            };
            assert_eq!(armed["journal-sync"], at(2, None));
            assert_eq!(armed["cache-flush"], at(1, None));
            assert_eq!(armed["log"], at(3, Some(2)));
        }

        #[test]
        fn a_counted_failpoint_fails_only_its_checks() {
            let mut armed = super::parse("a=2*2,b=2");
            let mut hit = |name: &str| armed.get_mut(name).unwrap().hit();
            let a: Vec<bool> = (0..5).map(|_| hit("a")).collect();
            assert_eq!(a, [false, true, true, false, false]);
            let b: Vec<bool> = (0..4).map(|_| hit("b")).collect();
            assert_eq!(b, [false, true, true, true]);
        }
    }
}
