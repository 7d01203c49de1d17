//! A connection of its own for bulk searches (module initialisation): it frames and decodes
//! the responses itself ([`crate::frame`]), so attribute values are slices of the received
//! bytes instead of ldap3's parsed-then-copied tag trees. It speaks only what a paged
//! search needs: connect (ldap://, ldaps://, ldapi://, StartTLS as configured), bind (simple
//! or SASL EXTERNAL, as [`crate::connect`] does), paged search, unbind. Everything else
//! stays with ldap3.

use std::pin::Pin;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ldap3::asn1::{ASNTag, write};
use openssl::ssl::{SslConnector, SslMethod};
use percent_encoding::percent_decode_str;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_openssl::SslStream;

use crate::Scope;
use crate::endpoint::{Auth, Endpoint, StartTls, normalize_url};
use crate::error::{LdapFailure, rc, rc_name, timed};
use crate::frame::{
    FrameError, LdapResult, Message, PAGED_RESULTS_OID, Response, SearchEntry, encode, frame_len,
    paged_cookie, parse_message,
};

const STARTTLS_OID: &str = "1.3.6.1.4.1.1466.20037";
/// Bytes asked of the socket per read (more when a frame is bigger).
const READ_CHUNK: usize = 128 << 10;

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

fn down(what: &str, reason: impl std::fmt::Display) -> LdapFailure {
    LdapFailure::Down {
        what: what.to_owned(),
        reason: reason.to_string(),
    }
}

fn undecodable(what: &str, e: FrameError) -> LdapFailure {
    LdapFailure::Decode {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

fn result_failure(what: &str, result: LdapResult) -> LdapFailure {
    LdapFailure::Result {
        what: what.to_owned(),
        rc: result.rc,
        message: if result.message.is_empty() {
            rc_name(result.rc).to_owned()
        } else {
            result.message
        },
    }
}

/// Where a URI points.
enum Target {
    Unix(String),
    Tcp { host: String, port: u16, tls: bool },
}

fn target(uri: &str) -> Result<Target, LdapFailure> {
    let bad = || LdapFailure::Down {
        what: format!("connect to {uri}"),
        reason: "unsupported or malformed LDAP URI".to_owned(),
    };
    let (scheme, rest) = uri.split_once("://").ok_or_else(bad)?;
    let authority = rest.split('/').next().unwrap_or_default();
    match scheme.to_ascii_lowercase().as_str() {
        "ldapi" => {
            let path = percent_decode_str(authority)
                .decode_utf8()
                .map_err(|_| bad())?
                .into_owned();
            if path.is_empty() {
                return Err(bad());
            }
            Ok(Target::Unix(path))
        }
        scheme @ ("ldap" | "ldaps") => {
            let tls = scheme == "ldaps";
            let default = if tls { 636 } else { 389 };
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let (host, after) = v6.split_once(']').ok_or_else(bad)?;
                let port = match after.strip_prefix(':') {
                    Some(p) => p.parse().map_err(|_| bad())?,
                    None if after.is_empty() => default,
                    None => return Err(bad()),
                };
                (host.to_owned(), port)
            } else {
                match authority.rsplit_once(':') {
                    Some((host, p)) => (host.to_owned(), p.parse().map_err(|_| bad())?),
                    None => (authority.to_owned(), default),
                }
            };
            let host = if host.is_empty() {
                "localhost".to_owned()
            } else {
                host
            };
            Ok(Target::Tcp { host, port, tls })
        }
        _ => Err(bad()),
    }
}

/// An LDAP connection for searches whose responses are decoded without copies.
pub struct SearchConnection {
    io: Box<dyn Io>,
    /// Received bytes not yet handed out as frames.
    buf: BytesMut,
    last_id: i32,
    timeout: Duration,
    what: String,
}

impl SearchConnection {
    /// Connects and binds as `endpoint` says, exactly as [`crate::connect`] does for ldap3.
    pub async fn connect(endpoint: &Endpoint) -> Result<SearchConnection, LdapFailure> {
        let uri = normalize_url(&endpoint.uri);
        let mut conn = match endpoint.starttls {
            StartTls::Off => Self::open(&uri, endpoint, false).await?,
            StartTls::Require => Self::open(&uri, endpoint, true).await?,
            StartTls::Try => match Self::open(&uri, endpoint, true).await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("StartTLS with {uri} failed ({e}); continuing without TLS");
                    Self::open(&uri, endpoint, false).await?
                }
            },
        };
        conn.bind(endpoint).await?;
        Ok(conn)
    }

    async fn open(
        uri: &str,
        endpoint: &Endpoint,
        starttls: bool,
    ) -> Result<SearchConnection, LdapFailure> {
        let what = format!("connect to {uri}");
        let target = target(uri)?;
        let io: Box<dyn Io> = timed(&what, endpoint.timeout, async {
            match &target {
                Target::Unix(path) => Ok(Box::new(
                    UnixStream::connect(path)
                        .await
                        .map_err(|e| down(&what, e))?,
                ) as Box<dyn Io>),
                Target::Tcp { host, port, tls } => {
                    let tcp = TcpStream::connect((host.as_str(), *port))
                        .await
                        .map_err(|e| down(&what, e))?;
                    let _ = tcp.set_nodelay(true);
                    if *tls {
                        Ok(Box::new(tls_handshake(tcp, host, &what).await?) as Box<dyn Io>)
                    } else {
                        Ok(Box::new(tcp) as Box<dyn Io>)
                    }
                }
            }
        })
        .await?;
        let mut conn = SearchConnection {
            io,
            buf: BytesMut::new(),
            last_id: 0,
            timeout: endpoint.timeout,
            what: what.clone(),
        };
        if let (
            true,
            Target::Tcp {
                host, tls: false, ..
            },
        ) = (starttls, &target)
        {
            let what = format!("StartTLS with {uri}");
            conn.what.clone_from(&what);
            timed(&what, endpoint.timeout, conn.start_tls(host)).await?;
        }
        Ok(conn)
    }

    async fn start_tls(&mut self, host: &str) -> Result<(), LdapFailure> {
        let id = self.next_id();
        let mut req = BytesMut::new();
        message(&mut req, id, |b| {
            encode::element(b, 0x77, |b| {
                encode::octets(b, 0x80, STARTTLS_OID.as_bytes());
            });
        });
        self.send(&req).await?;
        match self.recv().await? {
            Message {
                op: Response::Extended { result, .. },
                ..
            } if result.rc == rc::SUCCESS => {}
            Message {
                op: Response::Extended { result, .. },
                ..
            } => return Err(result_failure(&self.what, result)),
            _ => return Err(down(&self.what, "unexpected answer to StartTLS")),
        }
        // Nothing may follow the StartTLS response in the clear.
        if !self.buf.is_empty() {
            return Err(down(&self.what, "data after the StartTLS response"));
        }
        let plain = std::mem::replace(&mut self.io, Box::new(tokio::io::duplex(1).0));
        self.io = Box::new(tls_handshake(plain, host, &self.what).await?);
        Ok(())
    }

    async fn bind(&mut self, endpoint: &Endpoint) -> Result<(), LdapFailure> {
        match &endpoint.auth {
            Auth::Anonymous => Ok(()),
            Auth::SaslExternal => {
                let what = "SASL EXTERNAL bind";
                timed(what, self.timeout, self.bind_once(what, "", None)).await
            }
            Auth::Simple { dn, password } => {
                let what = format!("bind as {dn}");
                let first = timed(
                    &what,
                    self.timeout,
                    self.bind_once(&what, dn, Some(&password.current())),
                )
                .await;
                match first {
                    Err(LdapFailure::Result {
                        rc: rc::INVALID_CREDENTIALS,
                        ..
                    }) if password.reread().unwrap_or(false) => {
                        timed(
                            &what,
                            self.timeout,
                            self.bind_once(&what, dn, Some(&password.current())),
                        )
                        .await
                    }
                    other => other,
                }
            }
        }
    }

    /// A simple bind with `password`, or SASL EXTERNAL (empty authzid) without.
    async fn bind_once(
        &mut self,
        what: &str,
        dn: &str,
        password: Option<&str>,
    ) -> Result<(), LdapFailure> {
        let id = self.next_id();
        let mut req = BytesMut::new();
        message(&mut req, id, |b| {
            encode::element(b, 0x60, |b| {
                encode::integer(b, 0x02, 3);
                encode::octets(b, 0x04, dn.as_bytes());
                match password {
                    Some(pw) => encode::octets(b, 0x80, pw.as_bytes()),
                    None => encode::element(b, 0xa3, |b| {
                        encode::octets(b, 0x04, b"EXTERNAL");
                        encode::octets(b, 0x04, b"");
                    }),
                }
            });
        });
        self.send(&req).await?;
        match self.recv().await? {
            Message {
                op: Response::Bind(result),
                id: got,
                ..
            } if got == id => {
                if result.rc == rc::SUCCESS {
                    Ok(())
                } else {
                    Err(result_failure(what, result))
                }
            }
            _ => Err(down(what, "unexpected answer to the bind")),
        }
    }

    fn next_id(&mut self) -> i32 {
        self.last_id = if self.last_id == i32::MAX {
            1
        } else {
            self.last_id + 1
        };
        self.last_id
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), LdapFailure> {
        let what = &self.what;
        self.io.write_all(bytes).await.map_err(|e| down(what, e))?;
        self.io.flush().await.map_err(|e| down(what, e))
    }

    /// The next message; the notice of disconnection (id 0) is an error.
    async fn recv(&mut self) -> Result<Message, LdapFailure> {
        loop {
            let have = self.buf.len();
            let wanted = frame_len(&self.buf).map_err(|e| undecodable(&self.what, e))?;
            match wanted {
                Some(len) if have >= len => {
                    let frame = self.buf.split_to(len).freeze();
                    let message = parse_message(frame).map_err(|e| undecodable(&self.what, e))?;
                    if message.id == 0 {
                        let reason = match message.op {
                            Response::Extended { result, .. } => {
                                format!("the server disconnected: {}", result.message)
                            }
                            _ => "unsolicited message from the server".to_owned(),
                        };
                        return Err(down(&self.what, reason));
                    }
                    return Ok(message);
                }
                Some(len) => self.buf.reserve((len - have).max(READ_CHUNK)),
                None => self.buf.reserve(READ_CHUNK),
            }
            let read = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| down(&self.what, e))?;
            if read == 0 {
                return Err(down(&self.what, "the connection was closed"));
            }
        }
    }

    /// Unbinds and closes.
    pub async fn close(mut self) {
        let id = self.next_id();
        let mut req = BytesMut::new();
        message(&mut req, id, |b| encode::octets(b, 0x42, b""));
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = self.io.write_all(&req).await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}

async fn tls_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    host: &str,
    what: &str,
) -> Result<SslStream<S>, LdapFailure> {
    let connector = SslConnector::builder(SslMethod::tls_client())
        .map_err(|e| down(what, e))?
        .build();
    let ssl = connector
        .configure()
        .and_then(|c| c.into_ssl(host))
        .map_err(|e| down(what, e))?;
    let mut stream = SslStream::new(ssl, stream).map_err(|e| down(what, e))?;
    Pin::new(&mut stream)
        .connect()
        .await
        .map_err(|e| down(what, format!("TLS handshake: {e}")))?;
    Ok(stream)
}

/// Appends an LDAPMessage with `id` whose operation `op` writes.
fn message(buf: &mut BytesMut, id: i32, op: impl FnOnce(&mut BytesMut)) {
    encode::element(buf, 0x30, |b| {
        encode::integer(b, 0x02, id.into());
        op(b);
    });
}

/// Smallest page size [`FramedSearch`] falls back to when the server refuses a bigger one.
const MIN_PAGE_SIZE: i32 = 100;

/// A paged search over a [`SearchConnection`], handing out entries as they arrive;
/// continuation references are skipped (as ldap3's `EntriesOnly` does). A server that
/// refuses the page size (adminLimitExceeded before the first entry) is asked again with a
/// tenth of it, down to [`MIN_PAGE_SIZE`].
pub struct FramedSearch<'c> {
    conn: &'c mut SearchConnection,
    /// The SearchRequest without the message envelope and controls; the same for every
    /// page.
    request: Bytes,
    page_size: i32,
    id: i32,
    /// Whether an entry or a later page came: only the first page's request is retried
    /// with a smaller page size.
    started: bool,
    /// Limit for each step (sending a page request, receiving a message).
    timeout: Duration,
    what: String,
    result: Option<LdapResult>,
}

impl<'c> FramedSearch<'c> {
    /// Sends the first page's request.
    pub async fn start(
        conn: &'c mut SearchConnection,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: &[&str],
        page_size: i32,
        timeout: Duration,
    ) -> Result<FramedSearch<'c>, LdapFailure> {
        let what = format!("search {filter} below {base}");
        let filter = ldap3::parse_filter(filter).map_err(|()| LdapFailure::Decode {
            what: what.clone(),
            reason: "invalid filter".to_owned(),
        })?;
        let mut encoded_filter = BytesMut::new();
        write::encode_into(&mut encoded_filter, filter.into_structure())
            .map_err(|e| down(&what, e))?;
        let mut request = BytesMut::new();
        encode::element(&mut request, 0x63, |b| {
            encode::octets(b, 0x04, base.as_bytes());
            encode::integer(b, 0x0a, scope as i64);
            encode::integer(b, 0x0a, 0); // never dereference aliases
            encode::integer(b, 0x02, 0); // no size limit
            encode::integer(b, 0x02, 0); // no time limit
            encode::octets(b, 0x01, &[0]); // typesOnly false
            b.extend_from_slice(&encoded_filter);
            encode::element(b, 0x30, |b| {
                for attr in attrs {
                    encode::octets(b, 0x04, attr.as_bytes());
                }
            });
        });
        let mut search = FramedSearch {
            conn,
            request: request.freeze(),
            page_size,
            id: 0,
            started: false,
            timeout,
            what,
            result: None,
        };
        search.request_page(b"").await?;
        Ok(search)
    }

    async fn request_page(&mut self, cookie: &[u8]) -> Result<(), LdapFailure> {
        self.id = self.conn.next_id();
        let mut req = BytesMut::new();
        let (request, page_size) = (&self.request, self.page_size);
        message(&mut req, self.id, |b| {
            b.extend_from_slice(request);
            encode::element(b, 0xa0, |b| {
                encode::element(b, 0x30, |b| {
                    encode::octets(b, 0x04, PAGED_RESULTS_OID.as_bytes());
                    encode::element(b, 0x04, |b| {
                        encode::element(b, 0x30, |b| {
                            encode::integer(b, 0x02, page_size.into());
                            encode::octets(b, 0x04, cookie);
                        });
                    });
                });
            });
        });
        let what = self.what.clone();
        timed(&what, self.timeout, self.conn.send(&req)).await
    }

    /// The next entry; `None` at the end (then [`FramedSearch::finish`] tells the result).
    pub async fn next(&mut self) -> Result<Option<SearchEntry>, LdapFailure> {
        loop {
            if self.result.is_some() {
                return Ok(None);
            }
            let message = timed(&self.what, self.timeout, self.conn.recv()).await?;
            if message.id != self.id {
                return Err(down(
                    &self.what,
                    format!(
                        "answer to message {} in a search of {}",
                        message.id, self.id
                    ),
                ));
            }
            match message.op {
                Response::Entry(entry) => {
                    self.started = true;
                    return Ok(Some(entry));
                }
                Response::Reference(_) | Response::Intermediate { .. } => {}
                Response::Done(result)
                    if result.rc == rc::ADMIN_LIMIT_EXCEEDED
                        && !self.started
                        && self.page_size > MIN_PAGE_SIZE =>
                {
                    // A `size.pr` limit below our page size ("illegal pagedResults page
                    // size"): ask again with smaller pages.
                    self.page_size = (self.page_size / 10).max(MIN_PAGE_SIZE);
                    tracing::debug!(
                        "{}: the server refused the page size, trying {}",
                        self.what,
                        self.page_size
                    );
                    self.request_page(b"").await?;
                }
                Response::Done(result) => {
                    self.started = true;
                    let cookie = if result.rc == rc::SUCCESS {
                        paged_cookie(&message.controls).map_err(|e| undecodable(&self.what, e))?
                    } else {
                        None
                    };
                    match cookie {
                        Some(cookie) if !cookie.is_empty() => self.request_page(&cookie).await?,
                        _ => self.result = Some(result),
                    }
                }
                _ => return Err(down(&self.what, "unexpected answer to a search")),
            }
        }
    }

    /// The search's result once [`FramedSearch::next`] returned `None`: success, or no
    /// such base (an empty result).
    pub fn finish(self) -> Result<(), LdapFailure> {
        match self.result {
            Some(result) if matches!(result.rc, rc::SUCCESS | rc::NO_SUCH_OBJECT) => Ok(()),
            Some(result) => Err(result_failure(&self.what, result)),
            None => Err(down(&self.what, "search ended before its result")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_their_targets() {
        let tcp = |uri| match target(uri).unwrap() {
            Target::Tcp { host, port, tls } => (host, port, tls),
            Target::Unix(_) => panic!("unix"),
        };
        assert_eq!(tcp("ldap://h:1389/"), ("h".into(), 1389, false));
        assert_eq!(tcp("ldap://h"), ("h".into(), 389, false));
        assert_eq!(tcp("ldaps://h/"), ("h".into(), 636, true));
        assert_eq!(tcp("ldap://"), ("localhost".into(), 389, false));
        assert_eq!(tcp("ldap://[::1]:7/"), ("::1".into(), 7, false));
        match target(&normalize_url("ldapi:///")).unwrap() {
            Target::Unix(path) => assert_eq!(path, "/var/run/slapd/ldapi"),
            Target::Tcp { .. } => panic!("tcp"),
        }
        assert!(target("http://h/").is_err());
        assert!(target("ldap://h:x/").is_err());
    }
}
