//! One client connection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use futures::{SinkExt, StreamExt};
use proto::frame::clamp_version;
use proto::{Capabilities, ClientMessage, Request, ServerCodec, ServerMessage, TransactionId};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::{ServerConfig, ServerState};

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
}

pub(super) struct Connection<'a> {
    state: &'a ServerState,
    config: &'a ServerConfig,
    peer: SocketAddr,
    version: Option<u32>,
    /// The handshake was answered.
    greeted: bool,
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
            waits: BTreeMap::new(),
        }
    }

    pub(super) async fn run(mut self, stream: TcpStream, shutdown: CancellationToken) {
        let peer = self.peer;
        tracing::debug!(%peer, "connected");
        let (read_half, write_half) = stream.into_split();
        let mut reader = FramedRead::new(
            read_half,
            ServerCodec::with_max_frame_len(self.config.max_request_len),
        );
        let mut writer = FramedWrite::new(write_half, ServerCodec::new());
        let mut last_id = self.state.last_id.clone();
        last_id.mark_unchanged();
        // Until the handshake is answered the deadline is fixed (a client trickling bytes
        // does not extend it); afterwards every request and every answered wait restarts
        // the idle limit. A connection with a pending wait has no deadline at all.
        let mut deadline = Instant::now() + self.config.handshake_timeout;
        loop {
            let replies = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = sleep_until(deadline), if self.waits.is_empty() => {
                    let why = if self.greeted {
                        format!("idle for {:?}", self.config.idle_timeout)
                    } else {
                        format!("no handshake within {:?}", self.config.handshake_timeout)
                    };
                    tracing::info!(%peer, "closing connection: {why}");
                    self.state.metrics.client_timed_out();
                    break;
                }
                frame = reader.next() => match frame {
                    None => break,
                    Some(Err(err)) => {
                        tracing::info!(%peer, "closing connection: {err}");
                        break;
                    }
                    Some(Ok(message)) => {
                        let last = *last_id.borrow_and_update();
                        let replies = self.handle(message, last);
                        if self.greeted {
                            deadline = Instant::now() + self.config.idle_timeout;
                        }
                        replies
                    }
                },
                changed = last_id.changed(), if !self.waits.is_empty() => {
                    if changed.is_err() {
                        break;
                    }
                    let last = *last_id.borrow_and_update();
                    deadline = Instant::now() + self.config.idle_timeout;
                    self.wake(last)
                }
            };
            let replies = match replies {
                Ok(replies) => replies,
                Err(reason) => {
                    tracing::info!(%peer, "closing connection: {reason}");
                    break;
                }
            };
            if replies.is_empty() {
                continue;
            }
            if !self.send(&mut writer, replies).await {
                break;
            }
        }
        self.state.metrics.waits_removed(self.waits.len() as u64);
        tracing::debug!(%peer, "disconnected");
    }

    /// Writes replies, dropping the client if it does not take them within the timeout.
    async fn send(
        &self,
        writer: &mut FramedWrite<tokio::net::tcp::OwnedWriteHalf, ServerCodec>,
        replies: Vec<ServerMessage>,
    ) -> bool {
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

    fn handle(&mut self, message: ClientMessage, last: u64) -> Result<Vec<ServerMessage>, Close> {
        match message {
            ClientMessage::Version(requested) => {
                if requested == 0 || requested < self.config.min_version {
                    return Err(Close::Forbidden(requested));
                }
                self.version = Some(clamp_version(requested));
                Ok(Vec::new())
            }
            ClientMessage::Capabilities(offered) => match self.version {
                // Nothing is offered yet, so the negotiated list is always empty.
                Some(version) => {
                    self.greeted = true;
                    Ok(vec![ServerMessage::Handshake {
                        version,
                        capabilities: offered.negotiate(&Capabilities::new()),
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
