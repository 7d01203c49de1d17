//! LDAP access of the listener: one multiplexed connection to the LDAP server next to the
//! notifier, the reads the change engine needs (object by DN or entryUUID, translog entry,
//! subschema, DNs for module initialisation), and reconnects with the UCS retry rule
//! (spec listener.md §2.3).
//!
//! Objects are always read with all user and operational attributes and decoded by
//! [`proto::ldap::parse_entry`], so values are the exact bytes the server sent.

use std::time::Duration;

use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, Scope, ldap_escape};
use proto::ldap::{RawEntry, parse_entry};
use proto::{Command, Transaction, TransactionId};

use crate::config::{Auth, StartTls};

/// Attributes requested for every object: all user and all operational ones.
pub const ALL_ATTRS: [&str; 2] = ["*", "+"];

/// LDAP result codes the listener reacts to.
pub mod rc {
    pub const NO_SUCH_OBJECT: u32 = 32;
    pub const INVALID_DN_SYNTAX: u32 = 34;
    pub const INVALID_CREDENTIALS: u32 = 49;
    pub const BUSY: u32 = 51;
    pub const UNAVAILABLE: u32 = 52;
    pub const SERVER_DOWN: u32 = 81;
}

#[derive(Debug, thiserror::Error)]
pub enum LdapFailure {
    /// The connection is gone or never came up: reconnect and retry.
    #[error("LDAP {what} failed, server unreachable: {reason}")]
    Down { what: String, reason: String },
    /// The server answered with an error result.
    #[error("LDAP {what} failed: {message} (result code {rc})")]
    Result {
        what: String,
        rc: u32,
        message: String,
    },
    #[error("LDAP {what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    /// An answer this client cannot decode.
    #[error("LDAP {what}: undecodable answer: {reason}")]
    Decode { what: String, reason: String },
}

impl LdapFailure {
    /// Worth reconnecting and trying again (UCS retries on `LDAP_SERVER_DOWN`; busy and
    /// unavailable servers and timeouts are the same situation seen differently).
    pub fn is_transient(&self) -> bool {
        match self {
            LdapFailure::Down { .. } | LdapFailure::Timeout { .. } => true,
            LdapFailure::Result { rc, .. } => {
                matches!(*rc, rc::BUSY | rc::UNAVAILABLE | rc::SERVER_DOWN)
            }
            LdapFailure::Decode { .. } => false,
        }
    }
}

/// The answer to a read: the object, or nothing visible (absent or hidden by ACLs, which the
/// listener must treat alike: spec §3.2 step 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(RawEntry),
    Missing,
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub uri: String,
    pub auth: Auth,
    pub starttls: StartTls,
    pub timeout: Duration,
}

/// Classifies an ldap3 error of the operation `what`.
fn failure(what: &str, err: LdapError) -> LdapFailure {
    match err {
        LdapError::LdapResult { result } => LdapFailure::Result {
            what: what.to_owned(),
            rc: result.rc,
            message: if result.text.is_empty() {
                ldap_rc_name(result.rc).to_owned()
            } else {
                result.text
            },
        },
        LdapError::Timeout { .. } => LdapFailure::Timeout {
            what: what.to_owned(),
            after: Duration::ZERO,
        },
        LdapError::FilterParsing | LdapError::DecodingUTF8 | LdapError::AdapterInit(_) => {
            LdapFailure::Decode {
                what: what.to_owned(),
                reason: err.to_string(),
            }
        }
        other => LdapFailure::Down {
            what: what.to_owned(),
            reason: other.to_string(),
        },
    }
}

fn ldap_rc_name(rc: u32) -> &'static str {
    match rc {
        rc::NO_SUCH_OBJECT => "no such object",
        rc::INVALID_CREDENTIALS => "invalid credentials",
        rc::BUSY => "busy",
        rc::UNAVAILABLE => "unavailable",
        50 => "insufficient access",
        _ => "error",
    }
}

async fn timed<T>(
    what: &str,
    after: Duration,
    fut: impl Future<Output = Result<T, LdapFailure>>,
) -> Result<T, LdapFailure> {
    tokio::time::timeout(after, fut).await.unwrap_or_else(|_| {
        Err(LdapFailure::Timeout {
            what: what.to_owned(),
            after,
        })
    })
}

/// Connects and binds. A simple bind whose password comes from a file re-reads the file once
/// after "invalid credentials": the machine password may have rotated (seed §4.4.1).
pub async fn connect(endpoint: &Endpoint) -> Result<Ldap, LdapFailure> {
    let uri = notifier::ldap::normalize_url(&endpoint.uri);
    let ldap = match endpoint.starttls {
        StartTls::Off => open(&uri, endpoint, false).await?,
        StartTls::Require => open(&uri, endpoint, true).await?,
        StartTls::Try => match open(&uri, endpoint, true).await {
            Ok(ldap) => ldap,
            Err(e) => {
                tracing::warn!("StartTLS with {uri} failed ({e}); continuing without TLS");
                open(&uri, endpoint, false).await?
            }
        },
    };
    Ok(ldap)
}

async fn open(uri: &str, endpoint: &Endpoint, starttls: bool) -> Result<Ldap, LdapFailure> {
    let settings = LdapConnSettings::new()
        .set_conn_timeout(endpoint.timeout)
        .set_starttls(starttls && !uri.starts_with("ldapi:"));
    // ldap3 sends the StartTLS request while connecting: name it in the error, a server
    // without TLS only says "unsupported extended operation".
    let what = if starttls {
        format!("StartTLS with {uri}")
    } else {
        format!("connect to {uri}")
    };
    let (conn, ldap) = timed(&what, endpoint.timeout, async {
        LdapConnAsync::with_settings(settings, uri)
            .await
            .map_err(|e| failure(&what, e))
    })
    .await?;
    ldap3::drive!(conn);
    match &endpoint.auth {
        Auth::Anonymous => {}
        Auth::SaslExternal => {
            timed("SASL EXTERNAL bind", endpoint.timeout, async {
                ldap.clone()
                    .sasl_external_bind()
                    .await
                    .and_then(|r| r.success())
                    .map(drop)
                    .map_err(|e| failure("SASL EXTERNAL bind", e))
            })
            .await?;
        }
        Auth::Simple { dn, password } => {
            let bind = |pw: String| {
                let mut ldap = ldap.clone();
                async move {
                    ldap.simple_bind(dn, &pw)
                        .await
                        .and_then(|r| r.success())
                        .map(drop)
                        .map_err(|e| failure(&format!("bind as {dn}"), e))
                }
            };
            match timed("bind", endpoint.timeout, bind(password.current())).await {
                Err(LdapFailure::Result {
                    rc: rc::INVALID_CREDENTIALS,
                    ..
                }) if reread(password) => {
                    tracing::info!(
                        "bind as {dn} rejected; retrying with the re-read password file"
                    );
                    timed("bind", endpoint.timeout, bind(password.current())).await?;
                }
                other => other?,
            }
        }
    }
    Ok(ldap)
}

/// Re-reads a password file; false if there is none or it cannot be read.
fn reread(password: &crate::config::Password) -> bool {
    match password.reread() {
        Ok(reread) => reread,
        Err(e) => {
            tracing::error!("cannot re-read the password file: {e}");
            false
        }
    }
}

/// The error of a search that failed as a whole.
pub fn search_failure(what: &str, err: LdapError) -> LdapFailure {
    failure(what, err)
}

/// Base-scope read of `dn` with all attributes.
pub async fn read_entry(
    ldap: &mut Ldap,
    dn: &str,
    timeout: Duration,
) -> Result<Lookup, LdapFailure> {
    search_one(
        ldap,
        dn,
        Scope::Base,
        "(objectClass=*)",
        &ALL_ATTRS,
        timeout,
    )
    .await
}

/// The object with this entryUUID anywhere below `base`.
pub async fn find_by_uuid(
    ldap: &mut Ldap,
    base: &str,
    uuid: &str,
    timeout: Duration,
) -> Result<Lookup, LdapFailure> {
    let filter = format!("(entryUUID={})", ldap_escape(uuid));
    search_one(ldap, base, Scope::Subtree, &filter, &ALL_ATTRS, timeout).await
}

/// Protocol 3: DN and command of transaction `id` from `reqSession=<id>,<translog base>`.
/// `Ok(None)` when the entry does not exist (yet).
pub async fn read_translog(
    ldap: &mut Ldap,
    translog_base: &str,
    id: TransactionId,
    timeout: Duration,
) -> Result<Option<TranslogEntry>, LdapFailure> {
    let dn = format!("reqSession={id},{translog_base}");
    let lookup = search_one(
        ldap,
        &dn,
        Scope::Base,
        "(objectClass=*)",
        &["reqDN", "reqType", "reqSession"],
        timeout,
    )
    .await?;
    let Lookup::Found(entry) = lookup else {
        return Ok(None);
    };
    let what = || format!("translog entry {dn}");
    let req_dn = entry
        .first_str("reqDN")
        .ok_or_else(|| LdapFailure::Decode {
            what: what(),
            reason: "no reqDN".into(),
        })?;
    let req_type = entry.first_str("reqType").unwrap_or_default();
    Ok(Some(TranslogEntry {
        id,
        dn: req_dn.to_owned(),
        req_type: req_type.to_owned(),
    }))
}

/// A `cn=translog` entry as stored; `req_type` is kept verbatim so an unknown type can be
/// reported and skipped like UCS does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslogEntry {
    pub id: TransactionId,
    pub dn: String,
    pub req_type: String,
}

impl TranslogEntry {
    pub fn command(&self) -> Option<Command> {
        let mut chars = self.req_type.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => Command::from_char(c),
            _ => None,
        }
    }

    pub fn transaction(&self) -> Option<Transaction> {
        self.command()
            .map(|command| Transaction::new(self.id, self.dn.clone(), command))
    }
}

async fn search_one(
    ldap: &mut Ldap,
    base: &str,
    scope: Scope,
    filter: &str,
    attrs: &[&str],
    timeout: Duration,
) -> Result<Lookup, LdapFailure> {
    let what = format!("search {base}");
    timed(&what, timeout, async {
        let result = ldap
            .search(base, scope, filter, attrs.to_vec())
            .await
            .map_err(|e| failure(&what, e))?;
        let ldap3::SearchResult(entries, status) = result;
        match status.rc {
            0 => {}
            rc::NO_SUCH_OBJECT | rc::INVALID_DN_SYNTAX => return Ok(Lookup::Missing),
            rc => {
                return Err(LdapFailure::Result {
                    what: what.clone(),
                    rc,
                    message: if status.text.is_empty() {
                        ldap_rc_name(rc).to_owned()
                    } else {
                        status.text
                    },
                });
            }
        }
        match entries.first() {
            None => Ok(Lookup::Missing),
            Some(entry) => parse_entry(entry)
                .map(Lookup::Found)
                .map_err(|e| LdapFailure::Decode {
                    what: what.clone(),
                    reason: e.to_string(),
                }),
        }
    })
    .await
}

/// DNs of every object below `base` matching `filter`, read page by page (module
/// initialisation, spec §3.9 step 4).
pub async fn subtree_dns(
    ldap: &mut Ldap,
    base: &str,
    filter: &str,
    timeout: Duration,
) -> Result<Vec<String>, LdapFailure> {
    let what = format!("search {filter} below {base}");
    timed(&what, timeout, async {
        let adapters: Vec<Box<dyn Adapter<'_, &str, Vec<&str>>>> = vec![
            Box::new(EntriesOnly::new()),
            Box::new(PagedResults::new(1000)),
        ];
        let mut stream = ldap
            .streaming_search_with(adapters, base, Scope::Subtree, filter, vec!["1.1"])
            .await
            .map_err(|e| failure(&what, e))?;
        let mut dns = Vec::new();
        while let Some(entry) = stream.next().await.map_err(|e| failure(&what, e))? {
            let entry = parse_entry(&entry).map_err(|e| LdapFailure::Decode {
                what: what.clone(),
                reason: e.to_string(),
            })?;
            dns.push(entry.dn);
        }
        let status = stream.finish().await;
        match status.rc {
            0 | rc::NO_SUCH_OBJECT => Ok(dns),
            rc => Err(LdapFailure::Result {
                what: what.clone(),
                rc,
                message: status.text,
            }),
        }
    })
    .await
}

/// A lazily (re)connected LDAP handle with the UCS retry rule: on a transient failure
/// reconnect up to `retries` times, sleeping `1 << (n % 6)` seconds between attempts
/// (spec §2.3), then retry the operation.
pub struct Connection {
    endpoint: Endpoint,
    retries: u32,
    ldap: Option<Ldap>,
}

impl Connection {
    pub fn new(endpoint: Endpoint, retries: u32) -> Connection {
        Connection {
            endpoint,
            retries,
            ldap: None,
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The handle, connecting first if needed (one attempt).
    pub async fn handle(&mut self) -> Result<Ldap, LdapFailure> {
        if let Some(ldap) = &mut self.ldap
            && !ldap.is_closed()
        {
            return Ok(ldap.clone());
        }
        self.ldap = None;
        let ldap = connect(&self.endpoint).await?;
        tracing::debug!("connected to {}", self.endpoint.uri);
        self.ldap = Some(ldap.clone());
        Ok(ldap)
    }

    /// Unbinds; the next operation reconnects (UCS closes its connections when idle).
    pub async fn close(&mut self) {
        if let Some(mut ldap) = self.ldap.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), ldap.unbind()).await;
        }
    }

    /// Runs `op` on the handle with reconnects and retries on transient failures.
    pub async fn run<T, Fut>(&mut self, mut op: impl FnMut(Ldap) -> Fut) -> Result<T, LdapFailure>
    where
        Fut: Future<Output = Result<T, LdapFailure>>,
    {
        let mut attempt: u32 = 0;
        loop {
            let result = match self.handle().await {
                Ok(ldap) => op(ldap).await,
                Err(e) => Err(e),
            };
            match result {
                Err(e) if e.is_transient() && attempt < self.retries => {
                    self.ldap = None;
                    let pause = Duration::from_secs(1 << (attempt % 6));
                    attempt += 1;
                    tracing::warn!("{e}; retry {attempt}/{} in {pause:?}", self.retries);
                    tokio::time::sleep(pause).await;
                }
                Err(e) => {
                    if e.is_transient() {
                        self.ldap = None;
                    }
                    return Err(e);
                }
                Ok(value) => return Ok(value),
            }
        }
    }

    pub async fn read_entry(&mut self, dn: &str) -> Result<Lookup, LdapFailure> {
        let timeout = self.endpoint.timeout;
        self.run(|mut ldap| async move { read_entry(&mut ldap, dn, timeout).await })
            .await
    }

    pub async fn find_by_uuid(&mut self, base: &str, uuid: &str) -> Result<Lookup, LdapFailure> {
        let timeout = self.endpoint.timeout;
        self.run(|mut ldap| async move { find_by_uuid(&mut ldap, base, uuid, timeout).await })
            .await
    }

    pub async fn read_translog(
        &mut self,
        translog_base: &str,
        id: TransactionId,
    ) -> Result<Option<TranslogEntry>, LdapFailure> {
        let timeout = self.endpoint.timeout;
        self.run(
            |mut ldap| async move { read_translog(&mut ldap, translog_base, id, timeout).await },
        )
        .await
    }

    pub async fn subtree_dns(
        &mut self,
        base: &str,
        filter: &str,
        timeout: Duration,
    ) -> Result<Vec<String>, LdapFailure> {
        self.run(|mut ldap| async move { subtree_dns(&mut ldap, base, filter, timeout).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translog_types_map_to_commands() {
        let entry = |t: &str| TranslogEntry {
            id: TransactionId(5),
            dn: "cn=x".into(),
            req_type: t.into(),
        };
        assert_eq!(entry("a").command(), Some(Command::Add));
        assert_eq!(entry("r").command(), Some(Command::ModRdn));
        assert_eq!(entry("x").command(), None);
        assert_eq!(entry("ab").command(), None);
        assert_eq!(entry("").transaction(), None);
        assert_eq!(entry("d").transaction().unwrap().to_line(), "5 cn=x d\n");
    }

    #[test]
    fn only_connection_problems_are_transient() {
        let down = LdapFailure::Down {
            what: "w".into(),
            reason: "r".into(),
        };
        assert!(down.is_transient());
        let busy = LdapFailure::Result {
            what: "w".into(),
            rc: rc::BUSY,
            message: String::new(),
        };
        assert!(busy.is_transient());
        let denied = LdapFailure::Result {
            what: "w".into(),
            rc: 50,
            message: String::new(),
        };
        assert!(!denied.is_transient());
    }
}
