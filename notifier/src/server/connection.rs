//! One client connection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;

use bytes::{Buf, BytesMut};
use futures::{SinkExt, StreamExt};
use openssl::ssl::Ssl;
use proto::frame::clamp_version;
use proto::{
    Capabilities, Capability, ClientMessage, Request, ServerCodec, ServerMessage, TransactionId,
    Transport,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_openssl::SslStream;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use super::{ServerConfig, ServerState};
use crate::metrics::Refusal;

/// A blocking request waiting for its id to be committed.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// Protocol 3: answered with the last id once `id` exists.
    WaitId(u64),
    /// Protocol 1/2: answered with exactly transaction `id`.
    GetDn(u64),
}

impl Wait {
    fn id(self) -> u64 {
        match self {
            Wait::WaitId(id) | Wait::GetDn(id) => id,
        }
    }
}

/// Why a connection ends early.
#[derive(Debug, thiserror::Error)]
enum Close {
    #[error("forbidden protocol version {0} (below the minimum, or 0)")]
    Forbidden(u32),
    #[error("transaction {0} is not in the log (pruned or never written)")]
    Missing(u64),
    #[error("too many outstanding waits")]
    TooManyWaits,
    #[error("transaction log: {0}")]
    Storage(String),
    /// Refused by the TLS policy; logged through `Refusals`, not as a plain close.
    #[error("{1}")]
    Refused(Refusal, String),
}

/// How serving a stream ended.
enum Step {
    Closed,
    /// STARTTLS was negotiated: answer the handshake with this, then upgrade.
    StartTls(ServerMessage),
}

type Frames = Framed<Transport, ServerCodec>;

pub(super) struct Connection<'a> {
    state: &'a ServerState,
    config: &'a ServerConfig,
    peer: SocketAddr,
    version: Option<u32>,
    /// The handshake was answered.
    greeted: bool,
    /// The connection runs over TLS.
    tls: bool,
    waits: BTreeMap<u32, Wait>,
}

impl<'a> Connection<'a> {
    pub(super) fn new(state: &'a ServerState, config: &'a ServerConfig, peer: SocketAddr) -> Self {
        Connection {
            state,
            config,
            peer,
            version: None,
            greeted: false,
            tls: false,
            waits: BTreeMap::new(),
        }
    }

    fn codec(&self) -> ServerCodec {
        ServerCodec::with_max_frame_len(self.config.max_request_len)
    }

    pub(super) async fn run(mut self, stream: TcpStream, shutdown: CancellationToken) {
        let peer = self.peer;
        tracing::debug!(%peer, "connected");
        let mut framed = Framed::new(Transport::Plain(stream), self.codec());
        let mut last_id = self.state.last_id.clone();
        last_id.mark_unchanged();
        // Until the handshake is answered the deadline is fixed (a client trickling bytes
        // does not extend it); afterwards every request and every answered wait restarts
        // the idle limit. A connection with a pending wait has no deadline at all.
        let mut deadline = Instant::now() + self.config.handshake_timeout;
        loop {
            match self
                .serve(&mut framed, &mut last_id, &mut deadline, &shutdown)
                .await
            {
                Step::Closed => break,
                Step::StartTls(answer) => {
                    let upgrade = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        upgraded = timeout(
                            self.config.handshake_timeout,
                            self.start_tls(framed, answer),
                        ) => upgraded,
                    };
                    framed = match upgrade {
                        Ok(Ok(framed)) => framed,
                        Ok(Err(reason)) => {
                            self.state.refusals.refuse(
                                &self.state.metrics,
                                peer.ip(),
                                Refusal::TlsHandshake,
                                &reason,
                            );
                            break;
                        }
                        Err(_) => {
                            self.state.refusals.refuse(
                                &self.state.metrics,
                                peer.ip(),
                                Refusal::TlsHandshake,
                                &format!(
                                    "no TLS handshake within {:?}",
                                    self.config.handshake_timeout
                                ),
                            );
                            break;
                        }
                    };
                    self.tls = true;
                    self.state.metrics.client_upgraded();
                    tracing::debug!(%peer, "TLS established");
                    deadline = Instant::now() + self.config.idle_timeout;
                }
            }
        }
        self.state.metrics.waits_removed(self.waits.len() as u64);
        if self.tls {
            self.state.metrics.tls_client_disconnected();
        }
        tracing::debug!(%peer, "disconnected");
    }

    /// Serves requests on `framed` until the connection ends or asks for STARTTLS.
    async fn serve(
        &mut self,
        framed: &mut Frames,
        last_id: &mut watch::Receiver<u64>,
        deadline: &mut Instant,
        shutdown: &CancellationToken,
    ) -> Step {
        let peer = self.peer;
        loop {
            let replies = tokio::select! {
                _ = shutdown.cancelled() => return Step::Closed,
                _ = sleep_until(*deadline), if self.waits.is_empty() => {
                    let why = if self.greeted {
                        format!("idle for {:?}", self.config.idle_timeout)
                    } else {
                        format!("no handshake within {:?}", self.config.handshake_timeout)
                    };
                    tracing::info!(%peer, "closing connection: {why}");
                    self.state.metrics.client_timed_out();
                    return Step::Closed;
                }
                frame = framed.next() => match frame {
                    None => return Step::Closed,
                    Some(Err(err)) => {
                        tracing::info!(%peer, "closing connection: {err}");
                        return Step::Closed;
                    }
                    Some(Ok(message)) => {
                        let last = *last_id.borrow_and_update();
                        let replies = self.handle(message, last);
                        if self.greeted {
                            *deadline = Instant::now() + self.config.idle_timeout;
                        }
                        replies
                    }
                },
                changed = last_id.changed(), if !self.waits.is_empty() => {
                    if changed.is_err() {
                        return Step::Closed;
                    }
                    let last = *last_id.borrow_and_update();
                    *deadline = Instant::now() + self.config.idle_timeout;
                    self.wake(last)
                }
            };
            let replies = match replies {
                Ok(replies) => replies,
                Err(Close::Refused(kind, reason)) => {
                    self.state
                        .refusals
                        .refuse(&self.state.metrics, peer.ip(), kind, &reason);
                    return Step::Closed;
                }
                Err(reason) => {
                    tracing::info!(%peer, "closing connection: {reason}");
                    return Step::Closed;
                }
            };
            let mut replies = replies;
            let upgrade = matches!(
                replies.as_slice(),
                [ServerMessage::Handshake { capabilities, .. }]
                    if capabilities.contains(&Capability::StartTls)
            );
            if upgrade && let Some(answer) = replies.pop() {
                return Step::StartTls(answer);
            }
            if replies.is_empty() {
                continue;
            }
            if !self.send(framed, replies).await {
                return Step::Closed;
            }
        }
    }

    /// Answers a STARTTLS handshake in clear text and runs the TLS handshake as the server.
    /// Errors are the reason to log for the refused client.
    async fn start_tls(&self, framed: Frames, answer: ServerMessage) -> Result<Frames, String> {
        let Some(tls) = &self.state.tls else {
            return Err("STARTTLS without a certificate".to_owned());
        };
        let parts = framed.into_parts();
        let Transport::Plain(mut tcp) = parts.io else {
            return Err("a second STARTTLS".to_owned());
        };
        let mut buffered = parts.read_buf;
        // The handshake block ends with a blank line, which may still be in flight; after
        // it the client sends nothing until it has our answer. Anything else is refused:
        // clear-text bytes must never be taken as if they had come through TLS.
        loop {
            if buffered.starts_with(b"\n") {
                buffered.advance(1);
                break;
            }
            if buffered.starts_with(b"\r\n") {
                buffered.advance(2);
                break;
            }
            if !buffered.is_empty() && buffered.as_ref() != b"\r" {
                return Err("clear-text data after STARTTLS".to_owned());
            }
            match tcp.read_buf(&mut buffered).await {
                Ok(0) => return Err("closed before the TLS handshake".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(format!("read failed before the TLS handshake: {e}")),
            }
        }
        if !buffered.is_empty() {
            return Err("clear-text data after STARTTLS".to_owned());
        }
        let mut out = BytesMut::new();
        answer
            .encode_into(&mut out)
            .map_err(|e| format!("cannot answer the handshake: {e}"))?;
        tcp.write_all(&out)
            .await
            .map_err(|e| format!("cannot answer the handshake: {e}"))?;
        let acceptor = tls.acceptor();
        let ssl = Ssl::new(acceptor.context()).map_err(|e| format!("cannot set up TLS: {e}"))?;
        let mut stream = SslStream::new(ssl, tcp).map_err(|e| format!("cannot set up TLS: {e}"))?;
        if let Err(e) = Pin::new(&mut stream).accept().await {
            let verify = stream.ssl().verify_result();
            return Err(if verify == openssl::x509::X509VerifyResult::OK {
                format!("TLS handshake failed: {e}")
            } else {
                format!("its certificate is not accepted: {verify}")
            });
        }
        Ok(Framed::new(Transport::Tls(Box::new(stream)), self.codec()))
    }

    /// Writes replies, dropping the client if it does not take them within the timeout.
    async fn send(&self, writer: &mut Frames, replies: Vec<ServerMessage>) -> bool {
        let write = async {
            for reply in replies {
                writer.feed(reply).await?;
            }
            SinkExt::<ServerMessage>::flush(writer).await
        };
        match tokio::time::timeout(self.config.write_timeout, write).await {
            Ok(Ok(())) => true,
            Ok(Err(err)) => {
                tracing::info!(peer = %self.peer, "write failed: {err}");
                false
            }
            Err(_) => {
                tracing::warn!(
                    peer = %self.peer,
                    "dropping client: it has not read its answers for {:?}",
                    self.config.write_timeout
                );
                self.state.metrics.client_dropped_slow();
                false
            }
        }
    }

    /// What this connection may still negotiate: STARTTLS once, when a certificate is set.
    fn offered(&self) -> Capabilities {
        let mut offered = Capabilities::new();
        if !self.tls && self.state.tls.is_some() {
            offered.insert(Capability::StartTls);
        }
        offered
    }

    fn refuse_plain(&self) -> Result<(), Close> {
        if self.config.tls_policy.requires_tls() && !self.tls {
            return Err(Close::Refused(
                Refusal::PlainText,
                "TLS is required (--tls-policy) and the client did not ask for STARTTLS".to_owned(),
            ));
        }
        Ok(())
    }

    fn handle(&mut self, message: ClientMessage, last: u64) -> Result<Vec<ServerMessage>, Close> {
        match message {
            ClientMessage::Version(requested) => {
                if requested == 0 || requested < self.config.min_version {
                    return Err(Close::Forbidden(requested));
                }
                self.version = Some(clamp_version(requested));
                Ok(Vec::new())
            }
            ClientMessage::Capabilities(asked) => match self.version {
                Some(version) => {
                    let capabilities = asked.negotiate(&self.offered());
                    if !capabilities.contains(&Capability::StartTls) {
                        self.refuse_plain()?;
                    }
                    self.greeted = true;
                    Ok(vec![ServerMessage::Handshake {
                        version,
                        capabilities,
                    }])
                }
                None => {
                    tracing::debug!(peer = %self.peer, "Capabilities before Version: ignored");
                    Ok(Vec::new())
                }
            },
            ClientMessage::Request { msgid, request } => {
                let (Some(msgid), Some(version)) = (msgid, self.version) else {
                    tracing::debug!(peer = %self.peer, "dropping request without MSGID or version: {request}");
                    return Ok(Vec::new());
                };
                self.refuse_plain()?;
                self.request(msgid, version, request, last)
            }
        }
    }

    fn request(
        &mut self,
        msgid: u32,
        version: u32,
        request: Request,
        last: u64,
    ) -> Result<Vec<ServerMessage>, Close> {
        let reply = |body: String| Ok(vec![ServerMessage::Response { msgid, body }]);
        match request {
            Request::GetId => reply(last.to_string()),
            Request::GetSchemaId => reply(self.state.schema_id.load(Ordering::Relaxed).to_string()),
            Request::Alive => reply("OKAY".to_owned()),
            Request::WaitId(TransactionId(id)) if version >= 3 => {
                if id <= last {
                    reply(last.to_string())
                } else {
                    self.register(msgid, Wait::WaitId(id))
                }
            }
            Request::GetDn(TransactionId(id)) if version < 3 => {
                if id <= last {
                    reply(self.lookup(id)?)
                } else {
                    self.register(msgid, Wait::GetDn(id))
                }
            }
            other => {
                tracing::debug!(peer = %self.peer, "dropping request not allowed for version {version}: {other}");
                Ok(Vec::new())
            }
        }
    }

    fn register(&mut self, msgid: u32, wait: Wait) -> Result<Vec<ServerMessage>, Close> {
        if self.waits.insert(msgid, wait).is_none() {
            if self.waits.len() > self.config.max_waits {
                return Err(Close::TooManyWaits);
            }
            self.state.metrics.waits_added(1);
        }
        Ok(Vec::new())
    }

    /// Answers every wait whose id is now committed.
    fn wake(&mut self, last: u64) -> Result<Vec<ServerMessage>, Close> {
        let ready: Vec<(u32, Wait)> = self
            .waits
            .iter()
            .filter(|(_, wait)| wait.id() <= last)
            .map(|(msgid, wait)| (*msgid, *wait))
            .collect();
        let mut replies = Vec::with_capacity(ready.len());
        for (msgid, wait) in ready {
            self.waits.remove(&msgid);
            self.state.metrics.waits_removed(1);
            let body = match wait {
                Wait::WaitId(_) => last.to_string(),
                Wait::GetDn(id) => self.lookup(id)?,
            };
            replies.push(ServerMessage::Response { msgid, body });
        }
        Ok(replies)
    }

    /// `ID DN CMD` of a committed transaction; a missing one (pruned, never written) closes
    /// the connection, which is how UCS signals it.
    fn lookup(&self, id: u64) -> Result<String, Close> {
        let journal = self
            .state
            .journal
            .read()
            .map_err(|_| Close::Storage("transaction log lock poisoned".into()))?;
        match journal.get(id) {
            Ok(Some(tx)) => Ok(tx.to_string()),
            Ok(None) => Err(Close::Missing(id)),
            Err(err) => Err(Close::Storage(err.to_string())),
        }
    }
}
