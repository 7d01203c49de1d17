//! Failpoints: a seam for faults a test cannot cause on demand, such as an `fsync` that
//! reports a write-back error. Debug builds only (the integration tests run those); in a
//! release build [`check`] is always `Ok`.
//!
//! `UDR_FAILPOINTS=name=N[,name=N…]` makes the N-th and every later [`check`] of `name`
//! fail: a fault that keeps happening, as a failing disk does.

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

    /// Per armed name: the hit that starts failing, and the hits so far.
    static ARMED: OnceLock<Mutex<HashMap<String, (u64, u64)>>> = OnceLock::new();

    pub(super) fn due(name: &str) -> bool {
        let armed =
            ARMED.get_or_init(|| Mutex::new(parse(&std::env::var(super::ENV).unwrap_or_default())));
        let mut armed = armed.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((from, hits)) = armed.get_mut(name) else {
            return false;
        };
        *hits += 1;
        *hits >= *from
    }

    pub(super) fn parse(spec: &str) -> HashMap<String, (u64, u64)> {
        spec.split(',')
            .filter_map(|item| {
                let (name, from) = item.trim().split_once('=')?;
                Some((name.to_owned(), (from.parse().ok()?, 0)))
            })
            .collect()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn parses_names_and_hits() {
            let armed = super::parse("journal-sync=2, cache-flush=1,bad,x=y");
            assert_eq!(armed.len(), 2);
            assert_eq!(armed["journal-sync"], (2, 0));
            assert_eq!(armed["cache-flush"], (1, 0));
        }
    }
}
