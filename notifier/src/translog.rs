//! Writes `reqSession=<id>,cn=translog` entries: protocol-3 listeners read DN and command
//! from there, so each entry must exist before its id is announced (spec/notifier.md §9.7).

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use ldap3::{Ldap, LdapError, Scope};
use proto::Transaction;

use crate::backoff::Backoff;
use crate::ldap::{Bind, connect, rc};

/// Adds in flight at once on the one (multiplexed) connection.
const PIPELINE_DEPTH: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A transaction LDAP refused for its content (e.g. a DN slapd considers invalid): retrying
/// cannot help, so the caller replaces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub id: u64,
    pub reason: String,
}

pub struct TranslogWriter {
    url: String,
    bind: Bind,
    base: String,
    ldap: Option<Ldap>,
    backoff: Backoff,
}

enum AddOutcome {
    Done,
    Rejected(String),
    MissingBase,
    Retry(String),
}

impl TranslogWriter {
    pub fn new(url: impl Into<String>, bind: Bind, base: impl Into<String>) -> TranslogWriter {
        TranslogWriter {
            url: url.into(),
            bind,
            base: base.into(),
            ldap: None,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(30)),
        }
    }

    /// Writes an entry for every transaction, retrying connection and server trouble with
    /// backoff until it succeeds (drop the future to give up, e.g. at shutdown). Returns the
    /// transactions slapd rejected permanently.
    pub async fn write(&mut self, txs: &[Transaction]) -> Vec<Rejection> {
        let mut pending: Vec<&Transaction> = txs.iter().collect();
        let mut rejections = Vec::new();
        while !pending.is_empty() {
            let ldap = match self.connection().await {
                Ok(ldap) => ldap,
                Err(err) => {
                    tracing::error!(url = %self.url, "cannot connect to the translog LDAP server: {err}; retrying");
                    self.backoff.wait().await;
                    continue;
                }
            };
            let base = self.base.clone();
            let outcomes: Vec<(&Transaction, AddOutcome)> = futures::stream::iter(pending.iter())
                .map(|tx| {
                    let mut ldap = ldap.clone();
                    let base = base.as_str();
                    async move { (*tx, add_entry(&mut ldap, base, tx).await) }
                })
                .buffer_unordered(PIPELINE_DEPTH)
                .collect()
                .await;
            let mut retry = Vec::new();
            let mut missing_base = false;
            let mut last_problem = None;
            for (tx, outcome) in outcomes {
                match outcome {
                    AddOutcome::Done => {}
                    AddOutcome::Rejected(reason) => rejections.push(Rejection {
                        id: tx.id.get(),
                        reason,
                    }),
                    AddOutcome::MissingBase => {
                        missing_base = true;
                        retry.push(tx);
                    }
                    AddOutcome::Retry(problem) => {
                        last_problem = Some(problem);
                        retry.push(tx);
                    }
                }
            }
            if missing_base && let Err(err) = self.create_base(&ldap).await {
                last_problem = Some(format!("creating {}: {err}", self.base));
            }
            pending = retry;
            pending.sort_by_key(|tx| tx.id);
            if let Some(problem) = last_problem {
                tracing::error!(
                    "writing {} translog entries failed ({problem}); retrying",
                    pending.len()
                );
                // A broken connection is re-established on the next round.
                self.ldap = None;
                self.backoff.wait().await;
            } else {
                self.backoff.reset();
            }
        }
        rejections
    }

    async fn connection(&mut self) -> Result<Ldap, LdapError> {
        if let Some(ldap) = &self.ldap {
            return Ok(ldap.clone());
        }
        let ldap = connect(&self.url, &self.bind, CONNECT_TIMEOUT).await?;
        self.ldap = Some(ldap.clone());
        Ok(ldap)
    }

    async fn create_base(&self, ldap: &Ldap) -> Result<(), LdapError> {
        let mut ldap = ldap.clone();
        let found = ldap
            .search(&self.base, Scope::Base, "(objectClass=*)", vec!["1.1"])
            .await?;
        if found.1.rc != rc::NO_SUCH_OBJECT {
            return found.success().map(|_| ());
        }
        let cn = self
            .base
            .split(',')
            .next()
            .and_then(|rdn| rdn.split_once('='))
            .map(|(_, value)| value.to_owned())
            .unwrap_or_else(|| "translog".to_owned());
        let result = ldap
            .add(
                &self.base,
                vec![
                    ("objectClass", HashSet::from(["auditContainer"])),
                    ("cn", HashSet::from([cn.as_str()])),
                ],
            )
            .await?;
        if result.rc == rc::SUCCESS || result.rc == rc::ALREADY_EXISTS {
            tracing::info!("created the translog base {}", self.base);
            Ok(())
        } else {
            result.success().map(|_| ())
        }
    }
}

async fn add_entry(ldap: &mut Ldap, base: &str, tx: &Transaction) -> AddOutcome {
    let dn = format!("reqSession={},{base}", tx.id);
    let id = tx.id.to_string();
    let now = generalized_time(SystemTime::now());
    let command = tx.command.as_char().to_string();
    let attrs = vec![
        ("objectClass", HashSet::from(["auditObject"])),
        ("reqStart", HashSet::from([now.as_str()])),
        ("reqSession", HashSet::from([id.as_str()])),
        ("reqDN", HashSet::from([tx.dn.as_str()])),
        ("reqType", HashSet::from([command.as_str()])),
    ];
    match ldap.add(&dn, attrs).await {
        Err(err) => AddOutcome::Retry(err.to_string()),
        Ok(result) => match result.rc {
            rc::SUCCESS | rc::ALREADY_EXISTS => AddOutcome::Done,
            rc::NO_SUCH_OBJECT => AddOutcome::MissingBase,
            rc::INVALID_ATTRIBUTE_SYNTAX
            | rc::INVALID_DN_SYNTAX
            | rc::NAMING_VIOLATION
            | rc::OBJECT_CLASS_VIOLATION => {
                AddOutcome::Rejected(format!("LDAP result {}: {}", result.rc, result.text))
            }
            other => AddOutcome::Retry(format!("LDAP result {other}: {}", result.text)),
        },
    }
}

/// `YYYYmmddHHMMSSZ` in UTC, the `reqStart` format UCS writes.
pub fn generalized_time(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}{month:02}{day:02}{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `YYYY-mm-ddTHH:MM:SSZ` (RFC 3339) in UTC, for humans and manifests.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_generalized_time_in_utc() {
        assert_eq!(generalized_time(UNIX_EPOCH), "19700101000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_706_702_400); // 2024-01-31 12:00:00
        assert_eq!(generalized_time(t), "20240131120000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_825_599); // 2000-02-29 11:59:59
        assert_eq!(generalized_time(leap), "20000229115959Z");
        assert_eq!(rfc3339(leap), "2000-02-29T11:59:59Z");
    }
}
