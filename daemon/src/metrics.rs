//! Prometheus metrics: the text exposition format ([`Exposition`]) and the HTTP endpoint
//! that serves it ([`serve`]). The endpoint survives accept errors (it backs off and goes
//! on) and serves a bounded number of connections at a time, each with a deadline, so a
//! scraper that misbehaves cannot take it down or make it hold unbounded memory.

use std::fmt::{Display, Write as _};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;

/// The kind of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Prometheus text exposition (version 0.0.4), built family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// The `# HELP` and `# TYPE` lines of a family; its samples follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Exposition {
        let _ = writeln!(
            self.out,
            "# HELP {name} {help}\n# TYPE {name} {}",
            kind.as_str()
        );
        self
    }

    /// One sample; label values are escaped.
    pub fn sample(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl Display,
    ) -> &mut Exposition {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"{}\"", escape_label(value));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A family with a single unlabelled sample.
    pub fn single(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        value: impl Display,
    ) -> &mut Exposition {
        self.family(name, kind, help).sample(name, &[], value)
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The endpoint's address as given on the command line: `ADDR:PORT`, or a bare port on
/// the loopback address (metrics stay on the host unless an address says otherwise).
pub fn parse_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse()
        .map_err(|_| format!("{text:?} is neither PORT nor ADDR:PORT"))
}

/// Limits of the endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Time a client has to send its request and read the answer.
    pub io_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 16,
            io_timeout: Duration::from_secs(5),
        }
    }
}

/// Where connections come from: a TCP listener, or a test's stand-in that fails on purpose.
pub trait Acceptor: Send {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Acceptor for TcpListener {
    type Stream = tokio::net::TcpStream;

    async fn accept(&mut self) -> io::Result<Self::Stream> {
        TcpListener::accept(self).await.map(|(stream, _)| stream)
    }
}

/// Binds `addr` and serves `render()` as `GET /metrics` (any path, in fact) until
/// `shutdown`; only the bind can fail.
pub async fn serve(
    addr: SocketAddr,
    render: impl Fn() -> String + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
    serve_on(listener, render, Limits::default(), shutdown).await;
    Ok(())
}

/// The accept loop of [`serve`]: returns after `shutdown` once every connection is done.
pub(crate) async fn serve_on<A: Acceptor>(
    mut acceptor: A,
    render: impl Fn() -> String + Send + Sync + 'static,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let render = Arc::new(render);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    let mut failing = false;
    loop {
        // A slot first: at the cap, new clients wait in the backlog instead of piling up.
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = acceptor.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        let stream = match stream {
            Ok(stream) => {
                if failing {
                    tracing::info!("metrics endpoint accepts connections again");
                    failing = false;
                }
                backoff.reset();
                stream
            }
            Err(e) => {
                // EMFILE, ENOBUFS, ECONNABORTED…: wait instead of spinning or giving up.
                if !failing {
                    tracing::warn!("metrics endpoint: accept failed: {e}; retrying");
                    failing = true;
                }
                drop(permit);
                tokio::select! {
                    _ = backoff.wait() => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
        };
        let render = Arc::clone(&render);
        connections.spawn(async move {
            let _ = tokio::time::timeout(limits.io_timeout, answer(stream, render.as_ref())).await;
            drop(permit);
        });
    }
    connections.close();
    connections.wait().await;
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    render: &(impl Fn() -> String + ?Sized),
) -> io::Result<()> {
    // The request itself does not matter; read its head so the client sees a clean close.
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let body = render();
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::net::TcpStream;

    use super::*;

    #[test]
    fn a_bare_port_means_loopback() {
        assert_eq!(
            parse_address("9670").unwrap(),
            SocketAddr::from(([127, 0, 0, 1], 9670))
        );
        assert_eq!(
            parse_address("0.0.0.0:9670").unwrap(),
            SocketAddr::from(([0, 0, 0, 0], 9670))
        );
        assert_eq!(parse_address("[::1]:1").unwrap().port(), 1);
        assert!(parse_address("host:x").is_err());
    }

    #[test]
    fn exposition_format() {
        let mut e = Exposition::new();
        e.single("udn_last_id", Kind::Gauge, "Last id.", 42);
        e.family("udl_module_calls_total", Kind::Counter, "Calls.")
            .sample("udl_module_calls_total", &[("module", "a\"b\\c\nd")], 5)
            .sample(
                "udl_module_calls_total",
                &[("module", "x"), ("le", "0.5")],
                1.5,
            );
        assert_eq!(
            e.finish(),
            "# HELP udn_last_id Last id.\n# TYPE udn_last_id gauge\nudn_last_id 42\n\
             # HELP udl_module_calls_total Calls.\n# TYPE udl_module_calls_total counter\n\
             udl_module_calls_total{module=\"a\\\"b\\\\c\\nd\"} 5\n\
             udl_module_calls_total{module=\"x\",le=\"0.5\"} 1.5\n"
        );
    }

    /// A TCP listener whose first `failures` accepts fail as if the process ran out of
    /// descriptors.
    struct Flaky {
        listener: TcpListener,
        failures: usize,
        calls: Arc<AtomicUsize>,
    }

    impl Acceptor for Flaky {
        type Stream = TcpStream;

        async fn accept(&mut self) -> io::Result<TcpStream> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            if call < self.failures {
                return Err(io::Error::from_raw_os_error(libc::EMFILE));
            }
            TcpListener::accept(&self.listener).await.map(|(s, _)| s)
        }
    }

    async fn scrape(addr: SocketAddr) -> io::Result<String> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await?;
        Ok(reply)
    }

    async fn start(
        failures: usize,
        limits: Limits,
    ) -> (
        SocketAddr,
        Arc<AtomicUsize>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let flaky = Flaky {
            listener,
            failures,
            calls: Arc::clone(&calls),
        };
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_on(
            flaky,
            || "m 1\n".to_owned(),
            limits,
            shutdown.clone(),
        ));
        (addr, calls, shutdown, server)
    }

    #[tokio::test]
    async fn survives_accept_errors() {
        let (addr, calls, shutdown, server) = start(5, Limits::default()).await;
        let reply = tokio::time::timeout(Duration::from_secs(20), scrape(addr))
            .await
            .unwrap()
            .unwrap();
        assert!(reply.starts_with("HTTP/1.0 200 OK\r\n"), "{reply}");
        assert!(reply.ends_with("\r\n\r\nm 1\n"), "{reply}");
        assert!(calls.load(Ordering::SeqCst) > 5);
        shutdown.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn caps_connections_and_serves_the_next_when_one_ends() {
        let limits = Limits {
            max_connections: 2,
            io_timeout: Duration::from_secs(60),
        };
        let (addr, _, shutdown, server) = start(0, limits).await;
        // Two clients that connect and never send a request hold both slots.
        let idle1 = TcpStream::connect(addr).await.unwrap();
        let idle2 = TcpStream::connect(addr).await.unwrap();
        let third = tokio::spawn(scrape(addr));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !third.is_finished(),
            "a third connection was served beyond the cap"
        );
        drop(idle1);
        let reply = tokio::time::timeout(Duration::from_secs(20), third)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(reply.ends_with("m 1\n"), "{reply}");
        drop(idle2);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), server)
            .await
            .unwrap()
            .unwrap();
    }
}
