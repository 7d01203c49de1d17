//! Prometheus metrics, served as text on `--metrics ADDR` (`GET /metrics`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use daemon::metrics::{Exposition, Kind};

/// Upper bounds (seconds) of the commit latency histogram.
const LATENCY_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// Why a client was refused, the `reason` label of `udn_clients_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The global or the per-address connection limit.
    Limit,
    /// The address is not in the allow-list.
    NotAllowed,
    /// TLS is required and the client did not ask for STARTTLS.
    PlainText,
    /// The TLS handshake failed (also: no or an unaccepted client certificate).
    TlsHandshake,
}

impl Refusal {
    const ALL: [Refusal; 4] = [
        Refusal::Limit,
        Refusal::NotAllowed,
        Refusal::PlainText,
        Refusal::TlsHandshake,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::Limit => "limit",
            Refusal::NotAllowed => "not_allowed",
            Refusal::PlainText => "plain_text",
            Refusal::TlsHandshake => "tls_handshake",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

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
    clients_refused: [AtomicU64; Refusal::ALL.len()],
    clients_tls: AtomicU64,
    clients_tls_total: AtomicU64,
    clients_timed_out: AtomicU64,
    waits: AtomicU64,
    intake_lag: AtomicU64,
    quarantined: AtomicU64,
    filled: AtomicU64,
    translog_rejected: AtomicU64,
    translog_stalled: AtomicU64,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    pub(crate) fn record_commit(&self, last_id: u64, count: usize, took: Duration) {
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
        let now = daemon::time::unix_seconds(SystemTime::now());
        self.last_commit_unix.store(now, Ordering::Relaxed);
    }

    pub fn set_last_id(&self, id: u64) {
        self.last_id.store(id, Ordering::Relaxed);
    }

    pub(crate) fn set_schema_id(&self, id: u64) {
        self.schema_id.store(id, Ordering::Relaxed);
    }

    pub(crate) fn client_connected(&self) {
        self.clients.fetch_add(1, Ordering::Relaxed);
        self.clients_total.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn client_disconnected(&self) {
        self.clients.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn client_refused(&self, why: Refusal) {
        if let Some(counter) = self.clients_refused.get(why.index()) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn client_upgraded(&self) {
        self.clients_tls.fetch_add(1, Ordering::Relaxed);
        self.clients_tls_total.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn tls_client_disconnected(&self) {
        self.clients_tls.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn client_timed_out(&self) {
        self.clients_timed_out.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn client_dropped_slow(&self) {
        self.clients_dropped_slow.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn waits_added(&self, n: u64) {
        self.waits.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn waits_removed(&self, n: u64) {
        self.waits.fetch_sub(n, Ordering::Relaxed);
    }

    /// Changes seen by the intake but not yet committed.
    pub(crate) fn set_intake_lag(&self, lag: u64) {
        self.intake_lag.store(lag, Ordering::Relaxed);
    }

    pub(crate) fn quarantined(&self) {
        self.quarantined.fetch_add(1, Ordering::Relaxed);
    }

    /// slapd refused a translog entry.
    pub(crate) fn translog_rejected(&self) {
        self.translog_rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Nothing can be announced while even a no-op's translog entry is refused.
    pub(crate) fn set_translog_stalled(&self, stalled: bool) {
        self.translog_stalled
            .store(u64::from(stalled), Ordering::Relaxed);
    }

    pub fn filled(&self, n: u64) {
        self.filled.fetch_add(n, Ordering::Relaxed);
    }

    pub fn clients(&self) -> u64 {
        self.clients.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut e = Exposition::new();
        e.single(
            "udn_last_id",
            Kind::Gauge,
            "Last committed transaction id.",
            get(&self.last_id),
        )
        .single(
            "udn_transactions_total",
            Kind::Counter,
            "Transactions committed.",
            get(&self.transactions),
        )
        .single(
            "udn_schema_id",
            Kind::Gauge,
            "Current schema id.",
            get(&self.schema_id),
        )
        .single(
            "udn_clients",
            Kind::Gauge,
            "Connected listeners.",
            get(&self.clients),
        )
        .single(
            "udn_clients_total",
            Kind::Counter,
            "Accepted connections.",
            get(&self.clients_total),
        )
        .single(
            "udn_clients_dropped_slow_total",
            Kind::Counter,
            "Connections dropped because the client stopped reading.",
            get(&self.clients_dropped_slow),
        )
        .single(
            "udn_clients_tls",
            Kind::Gauge,
            "Connected clients on TLS.",
            get(&self.clients_tls),
        )
        .single(
            "udn_clients_tls_total",
            Kind::Counter,
            "Connections upgraded with STARTTLS.",
            get(&self.clients_tls_total),
        )
        .single(
            "udn_clients_timed_out_total",
            Kind::Counter,
            "Connections closed for an unfinished handshake or idleness.",
            get(&self.clients_timed_out),
        )
        .single(
            "udn_waits",
            Kind::Gauge,
            "Outstanding WAIT_ID/GET_DN requests.",
            get(&self.waits),
        )
        .single(
            "udn_intake_lag",
            Kind::Gauge,
            "Changes read by the intake and not yet committed.",
            get(&self.intake_lag),
        )
        .single(
            "udn_quarantined_lines_total",
            Kind::Counter,
            "Malformed intake lines moved to the quarantine file.",
            get(&self.quarantined),
        )
        .single(
            "udn_filled_transactions_total",
            Kind::Counter,
            "No-op transactions written to fill gaps or replace rejected ones.",
            get(&self.filled),
        )
        .single(
            "udn_translog_rejected_total",
            Kind::Counter,
            "Translog entries slapd refused (each replaced by a no-op, or retried).",
            get(&self.translog_rejected),
        )
        .single(
            "udn_translog_stalled",
            Kind::Gauge,
            "1 while nothing is announced because slapd refuses even a no-op's translog entry.",
            get(&self.translog_stalled),
        )
        .single(
            "udn_last_commit_timestamp_seconds",
            Kind::Gauge,
            "Unix time of the last commit.",
            get(&self.last_commit_unix),
        );
        let refused = "udn_clients_refused_total";
        e.family(
            refused,
            Kind::Counter,
            "Clients refused: at a connection limit, outside the allow-list, in plain text \
             where TLS is required, or in a failed TLS handshake.",
        );
        for (why, count) in Refusal::ALL.iter().zip(&self.clients_refused) {
            e.sample(refused, &[("reason", why.label())], get(count));
        }
        let name = "udn_commit_duration_seconds";
        e.family(
            name,
            Kind::Histogram,
            "Time from intake to durable, announced commit per batch.",
        );
        let bucket = format!("{name}_bucket");
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&self.commit_buckets) {
            e.sample(&bucket, &[("le", &bound.to_string())], get(count));
        }
        let count = get(&self.commits);
        e.sample(&bucket, &[("le", "+Inf")], count)
            .sample(
                &format!("{name}_sum"),
                &[],
                get(&self.commit_micros_sum) as f64 / 1e6,
            )
            .sample(&format!("{name}_count"), &[], count);
        e.finish()
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
