//! Prometheus metrics, served as text on `--metrics ADDR` (`GET /metrics`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Upper bounds (seconds) of the commit latency histogram.
const LATENCY_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

#[derive(Debug, Default)]
pub struct Metrics {
    last_id: AtomicU64,
    transactions: AtomicU64,
    commits: AtomicU64,
    commit_micros_sum: AtomicU64,
    commit_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    last_commit_unix: AtomicU64,
    schema_id: AtomicU64,
    clients: AtomicU64,
    clients_total: AtomicU64,
    clients_dropped_slow: AtomicU64,
    waits: AtomicU64,
    intake_lag: AtomicU64,
    quarantined: AtomicU64,
    filled: AtomicU64,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    pub fn record_commit(&self, last_id: u64, count: usize, took: Duration) {
        self.last_id.store(last_id, Ordering::Relaxed);
        self.transactions.fetch_add(count as u64, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.commit_micros_sum.fetch_add(micros, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.commit_buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_commit_unix.store(now, Ordering::Relaxed);
    }

    pub fn set_last_id(&self, id: u64) {
        self.last_id.store(id, Ordering::Relaxed);
    }

    pub fn set_schema_id(&self, id: u64) {
        self.schema_id.store(id, Ordering::Relaxed);
    }

    pub fn client_connected(&self) {
        self.clients.fetch_add(1, Ordering::Relaxed);
        self.clients_total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn client_disconnected(&self) {
        self.clients.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn client_dropped_slow(&self) {
        self.clients_dropped_slow.fetch_add(1, Ordering::Relaxed);
    }

    pub fn waits_added(&self, n: u64) {
        self.waits.fetch_add(n, Ordering::Relaxed);
    }

    pub fn waits_removed(&self, n: u64) {
        self.waits.fetch_sub(n, Ordering::Relaxed);
    }

    /// Changes seen by the intake but not yet committed.
    pub fn set_intake_lag(&self, lag: u64) {
        self.intake_lag.store(lag, Ordering::Relaxed);
    }

    pub fn quarantined(&self) {
        self.quarantined.fetch_add(1, Ordering::Relaxed);
    }

    pub fn filled(&self, n: u64) {
        self.filled.fetch_add(n, Ordering::Relaxed);
    }

    pub fn clients(&self) -> u64 {
        self.clients.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "udn_last_id",
            "gauge",
            "Last committed transaction id.",
            get(&self.last_id),
        );
        metric(
            "udn_transactions_total",
            "counter",
            "Transactions committed.",
            get(&self.transactions),
        );
        metric(
            "udn_schema_id",
            "gauge",
            "Current schema id.",
            get(&self.schema_id),
        );
        metric(
            "udn_clients",
            "gauge",
            "Connected listeners.",
            get(&self.clients),
        );
        metric(
            "udn_clients_total",
            "counter",
            "Accepted connections.",
            get(&self.clients_total),
        );
        metric(
            "udn_clients_dropped_slow_total",
            "counter",
            "Connections dropped because the client stopped reading.",
            get(&self.clients_dropped_slow),
        );
        metric(
            "udn_waits",
            "gauge",
            "Outstanding WAIT_ID/GET_DN requests.",
            get(&self.waits),
        );
        metric(
            "udn_intake_lag",
            "gauge",
            "Changes read by the intake and not yet committed.",
            get(&self.intake_lag),
        );
        metric(
            "udn_quarantined_lines_total",
            "counter",
            "Malformed intake lines moved to the quarantine file.",
            get(&self.quarantined),
        );
        metric(
            "udn_filled_transactions_total",
            "counter",
            "No-op transactions written to fill gaps or replace rejected ones.",
            get(&self.filled),
        );
        metric(
            "udn_last_commit_timestamp_seconds",
            "gauge",
            "Unix time of the last commit.",
            get(&self.last_commit_unix),
        );
        let name = "udn_commit_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from intake to durable, announced commit per batch.\n# TYPE {name} histogram"
        );
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.commit_buckets) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", get(bucket));
        }
        let count = get(&self.commits);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            get(&self.commit_micros_sum) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
        out
    }
}

/// Serves `GET /metrics` (any path, in fact) over plain HTTP/1.0 until shutdown.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_text(addr, move || metrics.render(), shutdown).await
}

/// Serves whatever `render` returns as Prometheus text; shared with the listener.
pub async fn serve_text(
    addr: SocketAddr,
    render: impl Fn() -> String + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let render = Arc::new(render);
    let listener = TcpListener::bind(addr).await?;
    tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
    loop {
        let (mut stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            // The request itself does not matter; read what arrived so the client sees a
            // clean close, with a short bound against idle connections.
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
            let body = render();
            let response = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.record_commit(42, 3, Duration::from_millis(2));
        m.client_connected();
        let text = m.render();
        assert!(text.contains("udn_last_id 42\n"), "{text}");
        assert!(text.contains("udn_transactions_total 3\n"));
        assert!(text.contains("udn_clients 1\n"));
        assert!(text.contains("udn_commit_duration_seconds_bucket{le=\"0.0025\"} 1\n"));
        assert!(text.contains("udn_commit_duration_seconds_bucket{le=\"0.001\"} 0\n"));
        assert!(text.contains("udn_commit_duration_seconds_count 1\n"));
    }
}
