//! Async client end of a notifier connection, for the listener and one-shot tools.
//!
//! [`NotifierClient`] does the handshake, numbers requests with per-connection MSGIDs and
//! matches replies to them. Replies may come back in any order (a `WAIT_ID` can stay
//! unanswered for hours while `ALIVE`s are answered), so replies for other MSGIDs are kept
//! until their caller asks for them.
//!
//! The server never answers with an error: it ignores bad requests or closes the connection.
//! A request the server does not understand therefore shows up as a [`ClientError::Timeout`].
//! After any error other than [`ClientError::BadReply`] and [`ClientError::NotPending`] the
//! connection should be dropped and a new one opened.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use thiserror::Error;
use tokio::net::{TcpSocket, TcpStream, lookup_host};
use tokio::time::timeout;
use tokio_util::codec::Framed;

use crate::capability::{Capabilities, Capability};
use crate::codec::ClientCodec;
use crate::error::ProtocolError;
use crate::frame::{ClientFrame, MSGID_UNSET, Request, ServerMessage};
use crate::line::{Transaction, TransactionId, parse_get_dn_body, parse_u64};
use crate::tls::{ClientTls, TlsMode, Transport};

/// Longest prefix of a reply body quoted in [`ClientError::BadReply`], so errors stay
/// log-friendly.
const BODY_QUOTE_LIMIT: usize = 100;

/// Why a notifier request or connection failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Name resolution or every TCP connection attempt failed.
    #[error("cannot connect to notifier at {addr}: {source}")]
    Connect {
        /// `host:port` as given to [`NotifierClient::connect`].
        addr: String,
        /// The resolver error, or the connection error (one per address tried if several).
        #[source]
        source: io::Error,
    },
    /// The established connection failed, or closed in the middle of a message.
    #[error("I/O error on connection to notifier at {peer}: {source}")]
    Io {
        /// `host:port` of the notifier.
        peer: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The server sent something the codec cannot decode, or a request could not be encoded.
    #[error("protocol error on connection to notifier at {peer}: {source}")]
    Protocol {
        /// `host:port` of the notifier.
        peer: String,
        /// What went wrong.
        #[source]
        source: ProtocolError,
    },
    /// The server closed the connection between messages.
    #[error("notifier at {peer} closed the connection")]
    Closed {
        /// `host:port` of the notifier.
        peer: String,
    },
    /// The server closed the connection instead of answering the handshake, which is what it
    /// does for a version below its configured minimum.
    #[error(
        "notifier at {peer} closed the connection without answering the handshake; it probably \
         requires a protocol version above {version}"
    )]
    HandshakeClosed {
        /// `host:port` of the notifier.
        peer: String,
        /// The version that was asked for.
        version: u32,
    },
    /// No answer within the time limit.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited, including the peer.
        what: String,
        /// The time limit.
        after: Duration,
    },
    /// The server answered the handshake with another version than asked for.
    #[error(
        "notifier at {peer} speaks protocol {offered}, not {requested}; start the listener with \
         --protocol {offered}"
    )]
    VersionMismatch {
        /// `host:port` of the notifier.
        peer: String,
        /// The version that was asked for.
        requested: u32,
        /// The version the server answered with.
        offered: u32,
    },
    /// A reply body that does not have the form the request calls for.
    #[error("unexpected reply {body:?} to {request}: {reason}")]
    BadReply {
        /// The request line.
        request: String,
        /// The reply body, cut to its first 100 characters.
        body: String,
        /// What was expected instead.
        reason: String,
    },
    /// A well-formed message at a point where it makes no sense (a reply before the handshake
    /// answer, or a second handshake answer).
    #[error("unexpected message from notifier at {peer}: {what}")]
    Unexpected {
        /// `host:port` of the notifier.
        peer: String,
        /// Description of the message.
        what: String,
    },
    /// TLS is required and the notifier does not offer STARTTLS.
    #[error("notifier at {peer} does not offer STARTTLS, and TLS is required")]
    TlsNotOffered {
        /// `host:port` of the notifier.
        peer: String,
    },
    /// The TLS handshake after STARTTLS failed (a certificate that is not accepted, or a
    /// notifier that refuses this client's certificate).
    #[error("TLS with notifier at {peer} failed: {reason}")]
    Tls {
        /// `host:port` of the notifier.
        peer: String,
        /// OpenSSL's reason, or the verification result.
        reason: String,
    },
    /// [`NotifierClient::reply`] was asked for a MSGID that was never sent on this
    /// connection, has already been delivered, or was abandoned after a timeout.
    #[error("no request with MSGID {msgid} is awaiting a reply")]
    NotPending {
        /// The MSGID asked for.
        msgid: u32,
    },
}

/// A connection to a notifier after a successful handshake.
#[derive(Debug)]
pub struct NotifierClient {
    framed: Framed<Transport, ClientCodec>,
    /// MSGID for the next request.
    next_msgid: u32,
    /// Requests sent and not yet delivered to a caller, with their reply once it has arrived.
    /// Replies for MSGIDs not in here are dropped, so a late answer to an abandoned request
    /// or a misbehaving server cannot make this grow.
    pending: HashMap<u32, Option<String>>,
    peer: String,
    version: u32,
}

impl NotifierClient {
    /// Connects to `host:port` and negotiates protocol `version` in plain text, like every
    /// UCS client; see [`NotifierClient::connect_with`].
    pub async fn connect(
        host: &str,
        port: u16,
        version: u32,
        limit: Duration,
    ) -> Result<NotifierClient, ClientError> {
        NotifierClient::connect_with(host, port, version, limit, &ClientTls::off()).await
    }

    /// Connects to `host:port`, negotiates protocol `version` and, as `tls` says, STARTTLS.
    ///
    /// `host` may be a name or an IP address; every address it resolves to is tried in turn.
    /// Name resolution, each connection attempt, the handshake and the TLS handshake are
    /// each limited to `limit`. Sockets get `TCP_NODELAY` and TCP keepalive.
    ///
    /// Fails with [`ClientError::VersionMismatch`] if the server answers with another version
    /// (it clamps versions above 3 to 3), with [`ClientError::HandshakeClosed`] if it hangs
    /// up instead of answering, with [`ClientError::TlsNotOffered`] if TLS is required and
    /// not offered, and with [`ClientError::Tls`] if the TLS handshake fails (never falling
    /// back to plain text after that).
    pub async fn connect_with(
        host: &str,
        port: u16,
        version: u32,
        limit: Duration,
        tls: &ClientTls,
    ) -> Result<NotifierClient, ClientError> {
        let peer = host_port(host, port);
        let stream = open(host, port, &peer, limit).await?;
        let mut framed = Framed::new(Transport::Plain(stream), ClientCodec::new());
        let mut asked = Capabilities::new();
        if tls.mode() != TlsMode::Off {
            asked.insert(Capability::StartTls);
        }
        let handshake = async {
            framed
                .send(ClientFrame::Handshake {
                    version,
                    capabilities: asked.clone(),
                })
                .await?;
            framed.next().await.transpose()
        };
        let answer = match timeout(limit, handshake).await {
            Ok(answer) => answer.map_err(|e| protocol_error(&peer, e))?,
            Err(_) => {
                return Err(ClientError::Timeout {
                    what: format!("the handshake answer from notifier at {peer}"),
                    after: limit,
                });
            }
        };
        let capabilities = match answer {
            Some(ServerMessage::Handshake {
                version: offered,
                capabilities,
            }) if offered == version => capabilities,
            Some(ServerMessage::Handshake {
                version: offered, ..
            }) => {
                return Err(ClientError::VersionMismatch {
                    peer,
                    requested: version,
                    offered,
                });
            }
            Some(ServerMessage::Response { msgid, .. }) => {
                return Err(ClientError::Unexpected {
                    peer,
                    what: format!("a reply to MSGID {msgid} instead of the handshake answer"),
                });
            }
            None => return Err(ClientError::HandshakeClosed { peer, version }),
        };
        if let Some(unasked) = capabilities.iter().find(|c| !asked.contains(c)) {
            return Err(ClientError::Unexpected {
                peer,
                what: format!(
                    "capability {unasked} in the handshake answer, which was not asked for"
                ),
            });
        }
        if capabilities.contains(&Capability::StartTls) {
            framed = start_tls(framed, host, &peer, limit, tls).await?;
        } else if tls.mode() == TlsMode::Required {
            return Err(ClientError::TlsNotOffered { peer });
        }
        Ok(NotifierClient {
            framed,
            next_msgid: 1,
            pending: HashMap::new(),
            peer,
            version,
        })
    }

    /// Whether the connection is encrypted (STARTTLS was negotiated).
    pub fn is_tls(&self) -> bool {
        self.framed.get_ref().is_tls()
    }

    /// The negotiated protocol version (always the one asked for).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The notifier's address as `host:port`, for messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Sends `request` and returns its MSGID, to be passed to [`NotifierClient::reply`].
    ///
    /// Not cancel-safe: if the future is dropped, the request may or may not have been sent
    /// and its reply will be dropped.
    pub async fn send(&mut self, request: Request) -> Result<u32, ClientError> {
        let msgid = self.next_msgid;
        self.framed
            .send(ClientFrame::request(msgid, request))
            .await
            .map_err(|e| protocol_error(&self.peer, e))?;
        // MSGID_UNSET would make the server drop the request. Wrapping is harmless: it takes
        // four billion requests, long after the early ones were answered.
        self.next_msgid = msgid
            .checked_add(1)
            .filter(|&k| k != MSGID_UNSET)
            .unwrap_or(1);
        self.pending.insert(msgid, None);
        Ok(msgid)
    }

    /// Waits for the reply to the request sent with `msgid` and returns its body.
    ///
    /// Replies to other outstanding requests that arrive meanwhile are kept for their own
    /// `reply` call. Cancel-safe: a message is either stored or returned within one poll of
    /// the connection, so this can race against timers in `tokio::select!` and be called
    /// again later. Each reply is delivered once; asking again gives
    /// [`ClientError::NotPending`]. There is no time limit here.
    pub async fn reply(&mut self, msgid: u32) -> Result<String, ClientError> {
        let Some(slot) = self.pending.get_mut(&msgid) else {
            return Err(ClientError::NotPending { msgid });
        };
        if let Some(body) = slot.take() {
            self.pending.remove(&msgid);
            return Ok(body);
        }
        loop {
            match self.framed.next().await {
                Some(Ok(ServerMessage::Response { msgid: k, body })) => {
                    if k == msgid {
                        self.pending.remove(&msgid);
                        return Ok(body);
                    }
                    if let Some(slot) = self.pending.get_mut(&k) {
                        *slot = Some(body);
                    }
                }
                Some(Ok(ServerMessage::Handshake { version, .. })) => {
                    return Err(ClientError::Unexpected {
                        peer: self.peer.clone(),
                        what: format!("a second handshake answer (version {version})"),
                    });
                }
                Some(Err(e)) => return Err(protocol_error(&self.peer, e)),
                None => {
                    return Err(ClientError::Closed {
                        peer: self.peer.clone(),
                    });
                }
            }
        }
    }

    /// Sends `request` and waits at most `limit` for its reply body.
    ///
    /// On timeout the request is abandoned: its reply, should it still come, is dropped.
    pub async fn request(
        &mut self,
        request: Request,
        limit: Duration,
    ) -> Result<String, ClientError> {
        let what = format!("the reply to {request} from notifier at {}", self.peer);
        let mut sent = None;
        let result = timeout(limit, async {
            let msgid = self.send(request).await?;
            sent = Some(msgid);
            self.reply(msgid).await
        })
        .await;
        result.unwrap_or_else(|_| {
            if let Some(msgid) = sent {
                self.pending.remove(&msgid);
            }
            Err(ClientError::Timeout { what, after: limit })
        })
    }

    /// `GET_ID`: the notifier's last transaction ID (0 if there is none yet).
    pub async fn get_id(&mut self, limit: Duration) -> Result<u64, ClientError> {
        let body = self.request(Request::GetId, limit).await?;
        parse_id_reply(&Request::GetId, &body)
    }

    /// `GET_SCHEMA_ID`: the notifier's schema ID.
    pub async fn get_schema_id(&mut self, limit: Duration) -> Result<u64, ClientError> {
        let body = self.request(Request::GetSchemaId, limit).await?;
        parse_id_reply(&Request::GetSchemaId, &body)
    }

    /// `ALIVE`: checks that the notifier still answers. Works while other requests (such as
    /// a `WAIT_ID`) are outstanding; their replies are kept.
    pub async fn alive(&mut self, limit: Duration) -> Result<(), ClientError> {
        let body = self.request(Request::Alive, limit).await?;
        if body.trim() == "OKAY" {
            Ok(())
        } else {
            Err(bad_reply(&Request::Alive, &body, "expected OKAY"))
        }
    }

    /// `GET_DN <id>` (protocol 1 and 2): the transaction `id`. The server answers only once
    /// the transaction exists, so `limit` must allow for that. The returned ID is not checked
    /// against `id`.
    pub async fn get_dn(
        &mut self,
        id: TransactionId,
        limit: Duration,
    ) -> Result<Transaction, ClientError> {
        let request = Request::GetDn(id);
        let body = self.request(request.clone(), limit).await?;
        parse_get_dn_reply(&request, &body)
    }
}

/// Parses the body of a `GET_ID`, `GET_SCHEMA_ID` or `WAIT_ID` reply: a decimal number,
/// surrounding whitespace ignored. Anything else is a [`ClientError::BadReply`] naming
/// `request`.
pub fn parse_id_reply(request: &Request, body: &str) -> Result<u64, ClientError> {
    parse_u64(body.trim()).ok_or_else(|| {
        bad_reply(
            request,
            body,
            "expected an unsigned decimal number that fits 64 bits",
        )
    })
}

/// Parses the body of a `GET_DN` reply with [`parse_get_dn_body`]; a body it rejects is a
/// [`ClientError::BadReply`] naming `request`.
pub fn parse_get_dn_reply(request: &Request, body: &str) -> Result<Transaction, ClientError> {
    parse_get_dn_body(body).map_err(|e| bad_reply(request, body, e.to_string()))
}

fn bad_reply(request: &Request, body: &str, reason: impl Into<String>) -> ClientError {
    ClientError::BadReply {
        request: request.to_string(),
        body: body.chars().take(BODY_QUOTE_LIMIT).collect(),
        reason: reason.into(),
    }
}

/// Socket errors get their own variant so callers can tell a dead link from a confused peer.
fn protocol_error(peer: &str, e: ProtocolError) -> ClientError {
    match e {
        ProtocolError::Io(source) => ClientError::Io {
            peer: peer.to_owned(),
            source,
        },
        source => ClientError::Protocol {
            peer: peer.to_owned(),
            source,
        },
    }
}

/// `host:port`, with an IPv6 literal in brackets so the port stays recognisable.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The TLS handshake after the server offered STARTTLS in its handshake answer.
async fn start_tls(
    framed: Framed<Transport, ClientCodec>,
    host: &str,
    peer: &str,
    limit: Duration,
    tls: &ClientTls,
) -> Result<Framed<Transport, ClientCodec>, ClientError> {
    let parts = framed.into_parts();
    // The server sends nothing between its answer and the TLS handshake; bytes there were
    // put in by someone else and must not be read as if they came through TLS.
    if !parts.read_buf.is_empty() {
        return Err(ClientError::Unexpected {
            peer: peer.to_owned(),
            what: "clear-text data after the STARTTLS answer".to_owned(),
        });
    }
    let Transport::Plain(tcp) = parts.io else {
        return Err(ClientError::Unexpected {
            peer: peer.to_owned(),
            what: "a second STARTTLS".to_owned(),
        });
    };
    let stream = match timeout(limit, tls.connect(host, tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(failure)) => {
            return Err(ClientError::Tls {
                peer: peer.to_owned(),
                reason: failure.to_string(),
            });
        }
        Err(_) => {
            return Err(ClientError::Timeout {
                what: format!("the TLS handshake with notifier at {peer}"),
                after: limit,
            });
        }
    };
    Ok(Framed::new(
        Transport::Tls(Box::new(stream)),
        ClientCodec::new(),
    ))
}

/// Resolves `host` and connects to the first address that accepts.
async fn open(
    host: &str,
    port: u16,
    peer: &str,
    limit: Duration,
) -> Result<TcpStream, ClientError> {
    let connect_error = |source| ClientError::Connect {
        addr: peer.to_owned(),
        source,
    };
    let addrs: Vec<SocketAddr> = match timeout(limit, lookup_host((host, port))).await {
        Ok(addrs) => addrs.map_err(connect_error)?.collect(),
        Err(_) => {
            return Err(connect_error(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("name resolution timed out after {limit:?}"),
            )));
        }
    };
    let mut failures = Vec::new();
    for addr in addrs {
        match timeout(limit, connect_socket(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => failures.push((addr, e)),
            Err(_) => failures.push((
                addr,
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connection attempt timed out after {limit:?}"),
                ),
            )),
        }
    }
    Err(connect_error(summarize(peer, failures)))
}

/// One error for all failed attempts, keeping the kind of the last one so callers can still
/// tell "refused" from "timed out".
fn summarize(peer: &str, mut failures: Vec<(SocketAddr, io::Error)>) -> io::Error {
    let Some((last_addr, last)) = failures.pop() else {
        return io::Error::new(
            io::ErrorKind::NotFound,
            "the host name resolved to no addresses",
        );
    };
    if failures.is_empty() && last_addr.to_string() == peer {
        return last;
    }
    let kind = last.kind();
    failures.push((last_addr, last));
    let text = failures
        .iter()
        .map(|(addr, e)| format!("{addr}: {e}"))
        .collect::<Vec<_>>()
        .join("; ");
    io::Error::new(kind, text)
}

async fn connect_socket(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // The listener idles inside WAIT_ID for hours; keepalive lets the kernel notice a peer
    // that vanished without a FIN even if the caller sends no ALIVEs.
    socket.set_keepalive(true)?;
    // Requests are tiny and latency-bound; Nagle would hold an ALIVE behind the
    // unacknowledged WAIT_ID segment.
    socket.set_nodelay(true)?;
    socket.connect(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line::Command;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::time::sleep;

    const LIMIT: Duration = Duration::from_secs(5);
    const SHORT: Duration = Duration::from_millis(50);

    async fn listen() -> (TcpListener, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        (listener, port)
    }

    /// Reads exactly `want.len()` bytes and compares them.
    async fn expect(stream: &mut TcpStream, want: &[u8]) {
        let mut got = vec![0; want.len()];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
    }

    /// Accepts one client, checks its handshake for `asked` and answers with `answer`.
    async fn serve_handshake(listener: &TcpListener, asked: u32, answer: u32) -> TcpStream {
        let (mut stream, _) = listener.accept().await.unwrap();
        expect(
            &mut stream,
            format!("Version: {asked}\nCapabilities: \n\n").as_bytes(),
        )
        .await;
        stream
            .write_all(format!("Version: {answer}\nCapabilities: \n\n").as_bytes())
            .await
            .unwrap();
        stream
    }

    /// A client connected with `version` and the server end of its connection.
    async fn connected(version: u32) -> (NotifierClient, TcpStream) {
        let (listener, port) = listen().await;
        let (client, server) = tokio::join!(
            NotifierClient::connect("127.0.0.1", port, version, LIMIT),
            serve_handshake(&listener, version, version)
        );
        (client.unwrap(), server)
    }

    #[tokio::test]
    async fn handshake() {
        let (listener, port) = listen().await;
        let (client, _server) = tokio::join!(
            NotifierClient::connect("127.0.0.1", port, 3, LIMIT),
            serve_handshake(&listener, 3, 3)
        );
        let client = client.unwrap();
        assert_eq!(client.version(), 3);
        assert_eq!(client.peer(), format!("127.0.0.1:{port}"));
    }

    #[tokio::test]
    async fn version_mismatch() {
        let (listener, port) = listen().await;
        let (client, _server) = tokio::join!(
            NotifierClient::connect("127.0.0.1", port, 3, LIMIT),
            serve_handshake(&listener, 3, 2)
        );
        let err = client.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::VersionMismatch {
                    requested: 3,
                    offered: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "notifier at 127.0.0.1:{port} speaks protocol 2, not 3; start the listener \
                 with --protocol 2"
            )
        );
    }

    #[tokio::test]
    async fn server_closes_during_handshake() {
        let (listener, port) = listen().await;
        let server = async {
            let (mut stream, _) = listener.accept().await.unwrap();
            // Read everything first so the close is a clean FIN, not a reset.
            expect(&mut stream, b"Version: 1\nCapabilities: \n\n").await;
        };
        let (client, ()) =
            tokio::join!(NotifierClient::connect("127.0.0.1", port, 1, LIMIT), server);
        let err = client.unwrap_err();
        assert!(
            matches!(err, ClientError::HandshakeClosed { version: 1, .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "notifier at 127.0.0.1:{port} closed the connection without answering the \
                 handshake; it probably requires a protocol version above 1"
            )
        );
    }

    #[tokio::test]
    async fn handshake_timeout() {
        let (listener, port) = listen().await;
        let server = async {
            let (mut stream, _) = listener.accept().await.unwrap();
            expect(&mut stream, b"Version: 3\nCapabilities: \n\n").await;
            stream
        };
        let (client, _stream) =
            tokio::join!(NotifierClient::connect("127.0.0.1", port, 3, SHORT), server);
        let err = client.unwrap_err();
        match &err {
            ClientError::Timeout { what, after } => {
                assert_eq!(*after, SHORT);
                assert!(what.contains("handshake"), "{what}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn reply_before_handshake_answer() {
        let (listener, port) = listen().await;
        let server = async {
            let (mut stream, _) = listener.accept().await.unwrap();
            expect(&mut stream, b"Version: 3\nCapabilities: \n\n").await;
            stream.write_all(b"MSGID: 1\n5\n\n").await.unwrap();
            stream
        };
        let (client, _stream) =
            tokio::join!(NotifierClient::connect("127.0.0.1", port, 3, LIMIT), server);
        assert!(matches!(
            client.unwrap_err(),
            ClientError::Unexpected { .. }
        ));
    }

    /// Answers a handshake that asked for `asked` with `answer` as the capability list.
    async fn serve_capabilities(listener: &TcpListener, asked: &str, answer: &str) -> TcpStream {
        let (mut stream, _) = listener.accept().await.unwrap();
        expect(
            &mut stream,
            format!("Version: 3\nCapabilities: {asked}\n\n").as_bytes(),
        )
        .await;
        stream
            .write_all(format!("Version: 3\nCapabilities: {answer}\n\n").as_bytes())
            .await
            .unwrap();
        stream
    }

    #[tokio::test]
    async fn tls_modes_against_a_server_without_starttls() {
        let (listener, port) = listen().await;
        let tls = ClientTls::without_files(TlsMode::Try);
        let (client, _server) = tokio::join!(
            NotifierClient::connect_with("127.0.0.1", port, 3, LIMIT, &tls),
            serve_capabilities(&listener, "STARTTLS", "")
        );
        assert!(!client.unwrap().is_tls(), "try falls back to plain text");

        let tls = ClientTls::without_files(TlsMode::Required);
        let (client, _server) = tokio::join!(
            NotifierClient::connect_with("127.0.0.1", port, 3, LIMIT, &tls),
            serve_capabilities(&listener, "STARTTLS", "")
        );
        let err = client.unwrap_err();
        assert!(matches!(err, ClientError::TlsNotOffered { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("notifier at 127.0.0.1:{port} does not offer STARTTLS, and TLS is required")
        );
    }

    #[tokio::test]
    async fn starttls_that_was_not_asked_for_is_refused() {
        let (listener, port) = listen().await;
        let (client, _server) = tokio::join!(
            NotifierClient::connect("127.0.0.1", port, 3, LIMIT),
            serve_capabilities(&listener, "", "STARTTLS")
        );
        let err = client.unwrap_err();
        assert!(
            matches!(&err, ClientError::Unexpected { what, .. } if what.contains("STARTTLS")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn clear_text_after_the_starttls_answer_is_refused() {
        let (listener, port) = listen().await;
        let tls = ClientTls::without_files(TlsMode::Required);
        let server = async {
            let (mut stream, _) = listener.accept().await.unwrap();
            expect(&mut stream, b"Version: 3\nCapabilities: STARTTLS\n\n").await;
            stream
                .write_all(b"Version: 3\nCapabilities: STARTTLS\n\nMSGID: 1\n5\n\n")
                .await
                .unwrap();
            stream
        };
        let (client, _server) = tokio::join!(
            NotifierClient::connect_with("127.0.0.1", port, 3, LIMIT, &tls),
            server
        );
        let err = client.unwrap_err();
        assert!(
            matches!(&err, ClientError::Unexpected { what, .. } if what.contains("clear-text")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn connect_refused() {
        let (listener, port) = listen().await;
        drop(listener);
        let err = NotifierClient::connect("127.0.0.1", port, 3, LIMIT)
            .await
            .unwrap_err();
        match &err {
            ClientError::Connect { addr, source } => {
                assert_eq!(*addr, format!("127.0.0.1:{port}"));
                assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string()
                .starts_with(&format!("cannot connect to notifier at 127.0.0.1:{port}: ")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn msgids_count_and_replies_out_of_order() {
        let (mut client, mut server) = connected(3).await;
        assert_eq!(client.send(Request::GetId).await.unwrap(), 1);
        assert_eq!(client.send(Request::GetSchemaId).await.unwrap(), 2);
        assert_eq!(client.send(Request::Alive).await.unwrap(), 3);
        expect(
            &mut server,
            b"MSGID: 1\nGET_ID\n\nMSGID: 2\nGET_SCHEMA_ID\n\nMSGID: 3\nALIVE\n\n",
        )
        .await;
        // A reply nobody asked for is dropped, not stored.
        server
            .write_all(b"MSGID: 2\n7\n\nMSGID: 99\nx\n\nMSGID: 3\nOKAY\n\nMSGID: 1\n42\n\n")
            .await
            .unwrap();
        assert_eq!(client.reply(1).await.unwrap(), "42");
        assert_eq!(client.reply(3).await.unwrap(), "OKAY");
        assert_eq!(client.reply(2).await.unwrap(), "7");
        assert!(matches!(
            client.reply(99).await,
            Err(ClientError::NotPending { msgid: 99 })
        ));
        assert!(client.pending.is_empty());
    }

    #[tokio::test]
    async fn wait_id_reply_arrives_during_alive() {
        let (mut client, mut server) = connected(3).await;
        let wait = client
            .send(Request::WaitId(TransactionId(43)))
            .await
            .unwrap();
        let script = async {
            expect(&mut server, b"MSGID: 1\nWAIT_ID 43\n\nMSGID: 2\nALIVE\n\n").await;
            server.write_all(b"MSGID: 1\n44\n\n").await.unwrap();
            sleep(SHORT).await;
            server.write_all(b"MSGID: 2\nOKAY\n\n").await.unwrap();
        };
        let (alive, ()) = tokio::join!(client.alive(LIMIT), script);
        alive.unwrap();
        let body = client.reply(wait).await.unwrap();
        assert_eq!(
            parse_id_reply(&Request::WaitId(TransactionId(43)), &body).unwrap(),
            44
        );
    }

    #[tokio::test]
    async fn split_and_coalesced_replies() {
        let (mut client, mut server) = connected(3).await;
        let script = async {
            expect(&mut server, b"MSGID: 1\nGET_ID\n\n").await;
            for piece in [&b"MSG"[..], b"ID: 1\n4", b"2\n", b"\n"] {
                server.write_all(piece).await.unwrap();
                server.flush().await.unwrap();
                sleep(Duration::from_millis(10)).await;
            }
        };
        let (id, ()) = tokio::join!(client.get_id(LIMIT), script);
        assert_eq!(id.unwrap(), 42);

        let first = client.send(Request::GetId).await.unwrap();
        let second = client.send(Request::GetSchemaId).await.unwrap();
        expect(
            &mut server,
            b"MSGID: 2\nGET_ID\n\nMSGID: 3\nGET_SCHEMA_ID\n\n",
        )
        .await;
        server
            .write_all(b"MSGID: 2\n43\n\nMSGID: 3\n9\n\n")
            .await
            .unwrap();
        assert_eq!(client.reply(second).await.unwrap(), "9");
        assert_eq!(client.reply(first).await.unwrap(), "43");
    }

    #[tokio::test]
    async fn reply_is_cancel_safe() {
        let (mut client, mut server) = connected(3).await;
        let wait = client
            .send(Request::WaitId(TransactionId(5)))
            .await
            .unwrap();
        expect(&mut server, b"MSGID: 1\nWAIT_ID 5\n\n").await;
        for round in 0..5 {
            if round == 2 {
                // Half a reply is buffered inside the codec while futures are dropped.
                server.write_all(b"MSGID: 1\n").await.unwrap();
            }
            tokio::select! {
                r = client.reply(wait) => panic!("early reply {r:?}"),
                () = sleep(Duration::from_millis(20)) => {}
            }
        }
        server.write_all(b"7\n\n").await.unwrap();
        assert_eq!(client.reply(wait).await.unwrap(), "7");
        assert!(matches!(
            client.reply(wait).await,
            Err(ClientError::NotPending { msgid: 1 })
        ));

        // The connection is still in step.
        let script = async {
            expect(&mut server, b"MSGID: 2\nGET_ID\n\n").await;
            server.write_all(b"MSGID: 2\n8\n\n").await.unwrap();
        };
        let (id, ()) = tokio::join!(client.get_id(LIMIT), script);
        assert_eq!(id.unwrap(), 8);
    }

    #[tokio::test]
    async fn get_dn() {
        let (mut client, mut server) = connected(2).await;
        assert_eq!(client.version(), 2);
        let script = async {
            expect(&mut server, b"MSGID: 1\nGET_DN 40\n\n").await;
            server
                .write_all(b"MSGID: 1\n40 cn=John Smith,dc=example,dc=com a\n\n")
                .await
                .unwrap();
            expect(&mut server, b"MSGID: 2\nGET_DN 41\n\n").await;
            server.write_all(b"MSGID: 2\n41\n\n").await.unwrap();
        };
        let calls = async {
            let first = client.get_dn(TransactionId(40), LIMIT).await;
            let second = client.get_dn(TransactionId(41), LIMIT).await;
            (first, second)
        };
        let ((first, second), ()) = tokio::join!(calls, script);
        assert_eq!(
            first.unwrap(),
            Transaction::new(
                TransactionId(40),
                "cn=John Smith,dc=example,dc=com",
                Command::Add
            )
        );
        match second.unwrap_err() {
            ClientError::BadReply {
                request,
                body,
                reason,
            } => {
                assert_eq!(request, "GET_DN 41");
                assert_eq!(body, "41");
                assert_eq!(
                    reason,
                    "transaction line must have the form \"<id> <dn> <command>\""
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn bad_reply_bodies() {
        let (mut client, mut server) = connected(3).await;
        let script = async {
            expect(&mut server, b"MSGID: 1\nGET_ID\n\n").await;
            server.write_all(b"MSGID: 1\nabc\n\n").await.unwrap();
            expect(&mut server, b"MSGID: 2\nALIVE\n\n").await;
            server.write_all(b"MSGID: 2\nNOPE\n\n").await.unwrap();
        };
        let calls = async {
            let id = client.get_id(LIMIT).await;
            let alive = client.alive(LIMIT).await;
            (id, alive)
        };
        let ((id, alive), ()) = tokio::join!(calls, script);
        let err = id.unwrap_err();
        assert!(
            matches!(&err, ClientError::BadReply { request, body, .. }
                if request == "GET_ID" && body == "abc"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "unexpected reply \"abc\" to GET_ID: expected an unsigned decimal number that fits \
             64 bits"
        );
        assert!(matches!(
            alive.unwrap_err(),
            ClientError::BadReply { body, .. } if body == "NOPE"
        ));
    }

    #[test]
    fn id_reply_forms() {
        let r = Request::GetId;
        assert_eq!(parse_id_reply(&r, "42").unwrap(), 42);
        assert_eq!(parse_id_reply(&r, " 0 \r").unwrap(), 0);
        assert_eq!(parse_id_reply(&r, &u64::MAX.to_string()).unwrap(), u64::MAX);
        for bad in ["", " ", "-1", "+1", "4 2", "18446744073709551616", "0x10"] {
            assert!(
                matches!(parse_id_reply(&r, bad), Err(ClientError::BadReply { .. })),
                "{bad:?}"
            );
        }
        match parse_id_reply(&r, &"9".repeat(500)) {
            Err(ClientError::BadReply { body, .. }) => assert_eq!(body.len(), BODY_QUOTE_LIMIT),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn timeout_abandons_request() {
        let (mut client, mut server) = connected(3).await;
        let err = client.get_id(SHORT).await.unwrap_err();
        match &err {
            ClientError::Timeout { what, after } => {
                assert_eq!(*after, SHORT);
                assert!(what.contains("GET_ID"), "{what}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            client.reply(1).await,
            Err(ClientError::NotPending { msgid: 1 })
        ));
        // The late answer to MSGID 1 is dropped; MSGID 2 gets its own.
        let script = async {
            expect(&mut server, b"MSGID: 1\nGET_ID\n\nMSGID: 2\nGET_ID\n\n").await;
            server
                .write_all(b"MSGID: 1\n5\n\nMSGID: 2\n6\n\n")
                .await
                .unwrap();
        };
        let (id, ()) = tokio::join!(client.get_id(LIMIT), script);
        assert_eq!(id.unwrap(), 6);
        assert!(client.pending.is_empty());
    }

    #[tokio::test]
    async fn server_closes_after_request() {
        let (mut client, mut server) = connected(3).await;
        let msgid = client.send(Request::GetId).await.unwrap();
        expect(&mut server, b"MSGID: 1\nGET_ID\n\n").await;
        drop(server);
        let err = client.reply(msgid).await.unwrap_err();
        assert!(matches!(err, ClientError::Closed { .. }), "{err:?}");
        assert!(err.to_string().ends_with("closed the connection"), "{err}");
    }

    #[tokio::test]
    async fn server_closes_mid_reply() {
        let (mut client, mut server) = connected(3).await;
        let msgid = client.send(Request::GetId).await.unwrap();
        expect(&mut server, b"MSGID: 1\nGET_ID\n\n").await;
        server.write_all(b"MSGID: 1\n4").await.unwrap();
        drop(server);
        let err = client.reply(msgid).await.unwrap_err();
        match err {
            ClientError::Io { source, .. } => {
                assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn peer_formatting() {
        assert_eq!(host_port("notifier.example", 6669), "notifier.example:6669");
        assert_eq!(host_port("::1", 6669), "[::1]:6669");
        assert_eq!(host_port("[::1]", 6669), "[::1]:6669");
    }

    #[test]
    fn summarized_connect_errors() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "[::1]:1".parse().unwrap();
        let refused = || io::Error::from(io::ErrorKind::ConnectionRefused);
        let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "slow");
        assert_eq!(
            summarize("127.0.0.1:1", vec![(a, refused())]).kind(),
            io::ErrorKind::ConnectionRefused
        );
        let e = summarize("localhost:1", vec![(b, refused()), (a, timed_out())]);
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            e.to_string(),
            "[::1]:1: connection refused; 127.0.0.1:1: slow"
        );
        assert_eq!(summarize("x:1", Vec::new()).kind(), io::ErrorKind::NotFound);
    }
}
