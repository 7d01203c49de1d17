//! Connecting and binding (simple, SASL EXTERNAL, StartTLS), and [`Connection`]: a lazily
//! (re)connected handle with the UCS retry rule (spec listener.md §2.3).

use std::time::Duration;

use ldap3::{Ldap, LdapConnAsync, LdapConnSettings};
use proto::TransactionId;

use crate::endpoint::{Auth, Endpoint, Password, StartTls, normalize_url};
use crate::error::{LdapFailure, failure, rc, timed};
use crate::search::{Lookup, find_by_uuid, read_entry};
use crate::searcher::SearchConnection;
use crate::translog::{TranslogEntry, read_translog};

/// Connects and binds. A simple bind whose password comes from a file re-reads the file once
/// after "invalid credentials": the machine password may have rotated (seed §4.4.1).
pub async fn connect(endpoint: &Endpoint) -> Result<Ldap, LdapFailure> {
    let uri = normalize_url(&endpoint.uri);
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
fn reread(password: &Password) -> bool {
    match password.reread() {
        Ok(reread) => reread,
        Err(e) => {
            tracing::error!("cannot re-read the password file: {e}");
            false
        }
    }
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

    /// A [`SearchConnection`] to the same server, connected with the same retry rule.
    pub async fn search_connection(&self) -> Result<SearchConnection, LdapFailure> {
        let mut attempt: u32 = 0;
        loop {
            match SearchConnection::connect(&self.endpoint).await {
                Err(e) if e.is_transient() && attempt < self.retries => {
                    let pause = Duration::from_secs(1 << (attempt % 6));
                    attempt += 1;
                    tracing::warn!("{e}; retry {attempt}/{} in {pause:?}", self.retries);
                    tokio::time::sleep(pause).await;
                }
                other => return other,
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
}
