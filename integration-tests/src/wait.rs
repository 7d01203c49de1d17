//! Waiting for conditions with a deadline: tests never sleep-and-hope.

use std::time::{Duration, Instant};

use crate::{HarnessError, Result};

/// How often a condition is re-checked. Short, because the conditions are cheap (a file
/// read, an LDAP base search) and test latency adds up.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Polls `check` until it yields `Some`, an error, or `timeout` passes.
///
/// `what` names the condition in the timeout error, e.g. "transaction 3 in the log".
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if start.elapsed() >= timeout {
            return Err(HarnessError::Timeout {
                what: what.to_owned(),
                seconds: timeout.as_secs_f64(),
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_value_once_condition_holds() {
        let mut calls = 0;
        let value = wait_until("third call", Duration::from_secs(5), || {
            calls += 1;
            Ok((calls == 3).then_some(calls))
        })
        .unwrap();
        assert_eq!(value, 3);
    }

    #[test]
    fn times_out_with_the_condition_named() {
        let err = wait_until("never", Duration::from_millis(30), || Ok(None::<()>)).unwrap_err();
        assert!(err.to_string().contains("never"), "{err}");
    }
}
