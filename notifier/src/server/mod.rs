//! The TCP server on port 6669: handshake, version gating and the commands of protocol 2
//! and 3 (spec/notifier.md §2, §9).
//!
//! Unlike UCS: every connection has a receive buffer (requests may span segments), any
//! number of outstanding waits keyed by MSGID, every waiter at or below the last id is
//! answered (no hang after a skipped id), a client that stops reading is dropped after a
//! write timeout instead of stalling anyone, and connections are capped. Beyond UCS: an
//! address allow-list and STARTTLS with three policies (`tls`, `access`).

pub mod access;
mod connection;
pub mod tls;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::journal::Journal;
use crate::metrics::{Metrics, Refusal};
use access::{Cidr, Refusals};
use tls::{ServerTls, TlsPolicy};

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
    /// Connections one client address may hold at once.
    pub max_per_address: usize,
    /// A connection without a completed handshake after this long is closed.
    pub handshake_timeout: Duration,
    /// A connection that waits for nothing and sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Whether clients must use TLS (and present a certificate).
    pub tls_policy: TlsPolicy,
    /// Client addresses admitted; empty: all.
    pub allow: Vec<Cidr>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            min_version: 2,
            max_connections: 4096,
            max_request_len: proto::frame::MAX_FRAME_LEN,
            max_waits: 1024,
            write_timeout: Duration::from_secs(60),
            max_per_address: 256,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(900),
            tls_policy: TlsPolicy::Optional,
            allow: Vec::new(),
        }
    }
}

/// What connections read: the published last id, the schema id and the log.
pub struct ServerState {
    pub last_id: watch::Receiver<u64>,
    pub schema_id: Arc<AtomicU64>,
    pub journal: Arc<RwLock<Journal>>,
    pub metrics: Arc<Metrics>,
    /// The certificate offered with STARTTLS; `None`: STARTTLS is not offered.
    pub tls: Option<Arc<ServerTls>>,
    pub refusals: Refusals,
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

/// Open connections per client address, for the per-address limit.
#[derive(Debug, Default, Clone)]
struct Addresses(Arc<Mutex<HashMap<IpAddr, PerAddress>>>);

#[derive(Debug, Default)]
struct PerAddress {
    open: usize,
    /// A refusal was logged since the address was last below its limit: one log line per
    /// episode, not one per attempt.
    refusal_logged: bool,
}

/// One admitted connection of an address; gives its place back when dropped.
struct AddressSlot {
    addresses: Addresses,
    ip: IpAddr,
}

impl Addresses {
    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, PerAddress>> {
        // Plain counters: a panicking holder cannot leave them inconsistent.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for one more connection from `ip`; `None` (logged once) at the limit.
    fn admit(&self, ip: IpAddr, limit: usize) -> Option<AddressSlot> {
        let mut all = self.lock();
        let entry = all.entry(ip).or_default();
        if entry.open >= limit {
            if !entry.refusal_logged {
                tracing::warn!(
                    "refusing connections from {ip}: it holds {limit} already \
                     (--max-connections-per-address)"
                );
                entry.refusal_logged = true;
            }
            return None;
        }
        entry.open += 1;
        Some(AddressSlot {
            addresses: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut all = self.addresses.lock();
        if let Some(entry) = all.get_mut(&self.ip) {
            entry.open = entry.open.saturating_sub(1);
            entry.refusal_logged = false;
            if entry.open == 0 {
                all.remove(&self.ip);
            }
        }
    }
}

/// Accepts connections until `shutdown`, each served by its own task.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ServerState>,
    config: ServerConfig,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let addresses = Addresses::default();
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
        if !config.allow.is_empty() && !config.allow.iter().any(|net| net.contains(peer.ip())) {
            state.refusals.refuse(
                &state.metrics,
                peer.ip(),
                Refusal::NotAllowed,
                "its address is not in the allow-list (--allow)",
            );
            continue;
        }
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, "refusing connection: {} connections already open", config.max_connections);
            state.metrics.client_refused(Refusal::Limit);
            continue;
        };
        let Some(per_address) = addresses.admit(peer.ip(), config.max_per_address) else {
            state.metrics.client_refused(Refusal::Limit);
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
            drop(per_address);
            drop(permit);
        });
    }
}
