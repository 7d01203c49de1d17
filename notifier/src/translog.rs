//! Writes `reqSession=<id>,cn=translog` entries: protocol-3 listeners read DN and command
//! from there, so each entry must exist before its id is announced (spec/notifier.md §9.7).

use std::time::{Duration, SystemTime};

use futures::StreamExt;
use ldap::search::search_one;
use ldap::{Ldap, Lookup, Scope};
use proto::Transaction;

use daemon::backoff::Backoff;
use daemon::time::generalized_time;
use ldap::dn::dn_key;
use ldap::translog::{base_attrs, entry_attrs, session_dn};
use ldap::write::Change;
use ldap::{Endpoint, LdapFailure, connect, rc};

/// Adds in flight at once on the one (multiplexed) connection.
const PIPELINE_DEPTH: usize = 64;

/// A transaction LDAP refused for its content (e.g. a DN slapd considers invalid): retrying
/// cannot help, so the caller replaces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub id: u64,
    pub reason: String,
}

pub struct TranslogWriter {
    endpoint: Endpoint,
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
    pub fn new(endpoint: Endpoint, base: impl Into<String>) -> TranslogWriter {
        TranslogWriter {
            endpoint,
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
                    tracing::error!("cannot connect to the translog LDAP server: {err}; retrying");
                    self.backoff.wait().await;
                    continue;
                }
            };
            let base = self.base.clone();
            let timeout = self.endpoint.timeout;
            let outcomes: Vec<(&Transaction, AddOutcome)> = futures::stream::iter(pending.iter())
                .map(|tx| {
                    let mut ldap = ldap.clone();
                    let base = base.as_str();
                    async move { (*tx, add_entry(&mut ldap, base, tx, timeout).await) }
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

    /// The data's base DN as the server names it: its one naming context that is not the
    /// translog, the access log, the configuration or the monitor; `None` when there is no
    /// single such context (then it must be configured).
    pub(crate) async fn data_base(&mut self) -> Result<Option<String>, LdapFailure> {
        let mut ldap = self.connection().await?;
        let Lookup::Found(root) = search_one(
            &mut ldap,
            "",
            Scope::Base,
            "(objectClass=*)",
            &["namingContexts"],
            self.endpoint.timeout,
        )
        .await?
        else {
            return Ok(None);
        };
        let own = dn_key(&self.base);
        let candidates: Vec<String> = root
            .values("namingContexts")
            .unwrap_or_default()
            .iter()
            .filter_map(|v| std::str::from_utf8(v).ok())
            .filter(|dn| {
                let key = dn_key(dn);
                key != own && !["cn=accesslog", "cn=config", "cn=monitor"].contains(&key.as_str())
            })
            .map(str::to_owned)
            .collect();
        Ok(match candidates.as_slice() {
            [base] => Some(base.clone()),
            _ => None,
        })
    }

    async fn connection(&mut self) -> Result<Ldap, LdapFailure> {
        if let Some(ldap) = &mut self.ldap
            && !ldap.is_closed()
        {
            return Ok(ldap.clone());
        }
        let ldap = connect(&self.endpoint).await?;
        self.ldap = Some(ldap.clone());
        Ok(ldap)
    }

    async fn create_base(&self, ldap: &Ldap) -> Result<(), String> {
        let mut ldap = ldap.clone();
        if let Lookup::Found(_) = search_one(
            &mut ldap,
            &self.base,
            Scope::Base,
            "(objectClass=*)",
            &["1.1"],
            self.endpoint.timeout,
        )
        .await
        .map_err(|e| e.to_string())?
        {
            return Ok(());
        }
        let attrs = base_attrs(&self.base).ok_or_else(|| format!("{} is not a DN", self.base))?;
        let result = ldap
            .add(&self.base, attrs)
            .await
            .map_err(|e| e.to_string())?;
        if result.rc == rc::SUCCESS || result.rc == rc::ALREADY_EXISTS {
            tracing::info!("created the translog base {}", self.base);
            Ok(())
        } else {
            Err(result.to_string())
        }
    }
}

async fn add_entry(ldap: &mut Ldap, base: &str, tx: &Transaction, timeout: Duration) -> AddOutcome {
    let dn = session_dn(tx.id.get(), base);
    let attrs = entry_attrs(tx, &generalized_time(SystemTime::now()));
    match ldap.add(&dn, attrs).await {
        Err(err) => AddOutcome::Retry(err.to_string()),
        Ok(result) => match result.rc {
            rc::SUCCESS => AddOutcome::Done,
            // Written by an earlier run (a crash before the id was committed, a replayed
            // queue) or left from another numbering (a transaction log restored or
            // recreated): the entry must say what this log says.
            rc::ALREADY_EXISTS => match_existing(ldap, &dn, tx, timeout).await,
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

/// Makes the existing entry `dn` describe `tx`: protocol-3 listeners read the change from
/// it, protocol-2 listeners from the transaction log, and both must see the same one.
async fn match_existing(
    ldap: &mut Ldap,
    dn: &str,
    tx: &Transaction,
    timeout: Duration,
) -> AddOutcome {
    let found = search_one(
        ldap,
        dn,
        Scope::Base,
        "(objectClass=*)",
        &["reqDN", "reqType"],
        timeout,
    )
    .await;
    let entry = match found {
        Ok(Lookup::Found(entry)) => entry,
        // Gone again meanwhile: the next round adds it.
        Ok(_) => return AddOutcome::Retry(format!("{dn} vanished after it existed")),
        Err(err) => return AddOutcome::Retry(err.to_string()),
    };
    let text = |name: &str| {
        entry
            .values(name)
            .unwrap_or_default()
            .first()
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    };
    let (req_dn, req_type) = (text("reqDN"), text("reqType"));
    let command = tx.command.to_string();
    if req_dn.as_deref().map(dn_key) == Some(dn_key(&tx.dn))
        && req_type.as_deref() == Some(command.as_str())
    {
        return AddOutcome::Done;
    }
    tracing::warn!(
        "translog entry {dn} says {} {}, the transaction log says {} {}: replacing it",
        req_dn.as_deref().unwrap_or("(no reqDN)"),
        req_type.as_deref().unwrap_or("(no reqType)"),
        tx.dn,
        command
    );
    let changes = [
        Change::Replace("reqDN".to_owned(), vec![tx.dn.clone().into_bytes()]),
        Change::Replace("reqType".to_owned(), vec![command.into_bytes()]),
    ];
    match ldap::write::modify(ldap, dn, &changes, timeout).await {
        Ok(()) => AddOutcome::Done,
        Err(err) => AddOutcome::Retry(err.to_string()),
    }
}
