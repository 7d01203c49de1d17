//! The TCP server on port 6669: handshake, version gating and the commands of protocol 2
//! and 3 (spec/notifier.md §2, §9).
//!
//! Unlike UCS: every connection has a receive buffer (requests may span segments), any
//! number of outstanding waits keyed by MSGID, every waiter at or below the last id is
//! answered (no hang after a skipped id), a client that stops reading is dropped after a
//! write timeout instead of stalling anyone, and connections are capped.

mod connection;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::journal::Journal;
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Lowest protocol version accepted (`-v`); lower versions are disconnected.
    pub min_version: u32,
    pub max_connections: usize,
    /// Requests of this many bytes or more close the connection (UCS: 8192).
    pub max_request_len: usize,
    /// Outstanding waits per connection; more closes the connection.
    pub max_waits: usize,
    /// A client whose answers cannot be written for this long is dropped.
    pub write_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            min_version: 2,
            max_connections: 4096,
            max_request_len: proto::frame::MAX_FRAME_LEN,
            max_waits: 1024,
            write_timeout: Duration::from_secs(60),
        }
    }
}

/// What connections read: the published last id, the schema id and the log.
pub struct ServerState {
    pub last_id: watch::Receiver<u64>,
    pub schema_id: Arc<AtomicU64>,
    pub journal: Arc<RwLock<Journal>>,
    pub metrics: Arc<Metrics>,
}

/// Binds the listening socket: dual-stack `[::]` when `addr` is unspecified IPv6 and IPv6
/// works, IPv4 `0.0.0.0` otherwise (UCS behaviour), or exactly `addr` when given.
pub fn bind(addr: Option<SocketAddr>, port: u16) -> std::io::Result<TcpListener> {
    match addr {
        Some(addr) => listen(addr),
        None => listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
            .or_else(|_| listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))),
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv6() {
        TcpSocket::new_v6()?
    } else {
        TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // UCS used a backlog of 5; hundreds of listeners reconnecting at once need more.
    socket.listen(1024)
}

/// Accepts connections until `shutdown`, each served by its own task.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ServerState>,
    config: ServerConfig,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let config = Arc::new(config);
    let mut accept_backoff =
        daemon::backoff::Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                accept_backoff.reset();
                pair
            }
            Err(err) => {
                // EMFILE and friends: wait instead of spinning.
                tracing::warn!("accept failed: {err}");
                accept_backoff.wait().await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, "refusing connection: {} connections already open", config.max_connections);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let config = Arc::clone(&config);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            state.metrics.client_connected();
            connection::Connection::new(&state, &config, peer)
                .run(stream, shutdown)
                .await;
            state.metrics.client_disconnected();
            drop(permit);
        });
    }
}
