//! Notifier benchmark (prints figures; not a timed test). Run with `scripts/bench.sh notifier`.
//!
//! (a) Intake: N queued lines → fsynced log + cn=translog entries, in lines/s, next to
//!     slapd's own sequential add rate measured in the same run (goal ≥ 3×).
//! (b) Fan-out: C protocol-3 clients waiting while T transactions are committed: median and
//!     p99 latency from queue write to WAIT_ID answer (an upper bound of commit-to-answer;
//!     goal p99 < 50 ms), and the notifier's peak RSS (goal < 64 MB), once in plain text and
//!     once with every client upgraded by STARTTLS (goals p99 < 50 ms, RSS < 96 MB), side by
//!     side from the same run.
//! (c) Big log: start-up time and peak RSS of a notifier whose log holds 10,000,000
//!     transactions (goals < 1 s, < 64 MB), after protocol-2 lookups across the log. The log
//!     and its UCS index are written directly in the format the journal writes.
//!
//! Sizes can be lowered for a quick run: BENCH_INTAKE=20000 BENCH_CLIENTS=200 BENCH_TX=2000
//! BENCH_LOG_TX=1000000; BENCH_PARTS=c runs only part (c).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::pki::Pki;
use integration_tests::slapd::BASE;
use integration_tests::{Intake, Notifier, Slapd, SlapdConfig, wait_until};
use openssl::ssl::{SslConnector, SslMethod};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let intake_lines = env_usize("BENCH_INTAKE", 100_000);
    let clients = env_usize("BENCH_CLIENTS", 1000);
    let transactions = env_usize("BENCH_TX", 10_000);
    let log_transactions = env_usize("BENCH_LOG_TX", 10_000_000);
    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| "abc".into());
    println!(
        "notifier benchmark (release build, {} cores, load {})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    if parts.contains('a') {
        intake(intake_lines);
    }
    if parts.contains('b') {
        fan_out_plain_and_tls(clients, transactions);
    }
    if parts.contains('c') {
        big_log(log_transactions as u64);
    }
    println!("load average at the end: {}", load_average());
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn big_log_line(id: u64) -> String {
    format!("{id} uid=user{id},cn=users,{BASE} m\n")
}

/// `transaction` and `transaction.index` (UCS amd64 layout: 8-byte magic, 9-byte entries
/// `valid, offset` at `8 + 9 * id`) for ids `1..=count`.
fn write_big_log(notify: &std::path::Path, count: u64) -> std::io::Result<()> {
    let mut log = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(notify.join("transaction"))?,
    );
    let mut index = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(notify.join("transaction.index"))?,
    );
    index.write_all(&0x3395_e0d4u64.to_le_bytes())?;
    index.write_all(&[0; 9])?;
    let mut offset = 0u64;
    for id in 1..=count {
        let line = big_log_line(id);
        log.write_all(line.as_bytes())?;
        index.write_all(&[1])?;
        index.write_all(&offset.to_le_bytes())?;
        offset += line.len() as u64;
    }
    log.flush()?;
    index.flush()
}

fn big_log(count: u64) {
    let slapd = Slapd::start(SlapdConfig::provider().log_operations(false)).unwrap();
    let generated = std::cell::Cell::new(None);
    let mut notifier = Notifier::start_with(&slapd, Intake::QueueFile, &["-d", "1"], |dir| {
        let start = Instant::now();
        write_big_log(&dir.join("notify"), count)?;
        println!(
            "(c) big log: {count} transactions written directly in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        generated.set(Some(Instant::now()));
        Ok(())
    })
    .unwrap();
    let startup = generated.get().unwrap().elapsed();
    let mut client = notifier.client().unwrap();
    client.handshake(2).unwrap();
    let mut lookups = Vec::new();
    for (msgid, id) in [1, count / 3, count / 2, count - 1000, count]
        .into_iter()
        .enumerate()
    {
        let start = Instant::now();
        let answer = client
            .request(msgid as u32 + 1, &format!("GET_DN {id}"))
            .unwrap();
        lookups.push(start.elapsed());
        assert_eq!(
            answer,
            format!("MSGID: {}\n{}\n", msgid + 1, big_log_line(id))
        );
    }
    let pid = notifier.process().and_then(|p| p.pid()).unwrap();
    let rss_kb = peak_rss_kb(pid);
    let slowest = lookups.iter().max().copied().unwrap_or_default();
    println!(
        "    start-up             {:>10.3} s    (goal < 1 s; spawn to listening)",
        startup.as_secs_f64()
    );
    println!(
        "    slowest GET_DN       {:>10.3} ms   (ids 1 .. {count}, a fresh process)",
        slowest.as_secs_f64() * 1e3
    );
    println!(
        "    notifier peak RSS    {:>10.1} MB   (goal < 64 MB)",
        rss_kb as f64 / 1024.0
    );
    notifier.stop().unwrap();
}

/// (b) in plain text and with every client on TLS, side by side.
fn fan_out_plain_and_tls(clients: usize, transactions: usize) {
    let pki = Pki::new().unwrap();
    let ca = pki.ca("bench").unwrap();
    let server = pki
        .issue(&ca, "notifier", "DNS:localhost,IP:127.0.0.1")
        .unwrap();
    let mut connector = SslConnector::builder(SslMethod::tls_client()).unwrap();
    connector.set_ca_file(&ca.certificate).unwrap();
    let connector = connector.build();
    let plain = fan_out(clients, transactions, &[], None);
    let tls_args = [
        "--tls-policy".to_owned(),
        "required".to_owned(),
        "--tls-certificate".to_owned(),
        server.certificate.display().to_string(),
        "--tls-key".to_owned(),
        server.key.display().to_string(),
    ];
    let tls = fan_out(clients, transactions, &tls_args, Some(connector));
    println!(
        "(b) fan-out: {clients} v3 clients waiting, {transactions} transactions (10 per 5 ms)"
    );
    println!("                              plain         TLS");
    println!(
        "    answers              {:>10} {:>11}",
        plain.answers, tls.answers
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "    median latency       {:>7.2} ms {:>8.2} ms (queue write -> WAIT_ID answer)",
        ms(plain.median),
        ms(tls.median)
    );
    println!(
        "    p99 latency          {:>7.2} ms {:>8.2} ms   (goal < 50 ms)",
        ms(plain.p99),
        ms(tls.p99)
    );
    println!(
        "    max latency          {:>7.2} ms {:>8.2} ms",
        ms(plain.max),
        ms(tls.max)
    );
    println!(
        "    notifier peak RSS    {:>7.1} MB {:>8.1} MB   (goal < 64 MB plain, < 96 MB TLS)",
        plain.rss_kb as f64 / 1024.0,
        tls.rss_kb as f64 / 1024.0
    );
}

/// What one fan-out run measured.
struct FanOut {
    answers: usize,
    median: Duration,
    p99: Duration,
    max: Duration,
    rss_kb: u64,
}

/// slapd's own add rate: sequential adds on one connection, like ldapadd.
fn slapd_add_rate(slapd: &Slapd, count: usize) -> f64 {
    let mut admin = slapd.admin().unwrap();
    let start = Instant::now();
    for i in 0..count {
        let uid = format!("ref{i}");
        admin
            .add(
                &format!("uid={uid},{BASE}"),
                &[
                    ("objectClass", &["inetOrgPerson"]),
                    ("uid", &[uid.as_str()]),
                    ("cn", &[uid.as_str()]),
                    ("sn", &["Reference"]),
                ],
            )
            .unwrap();
    }
    count as f64 / start.elapsed().as_secs_f64()
}

fn intake(lines: usize) {
    let slapd = Slapd::start(SlapdConfig::provider().log_operations(false)).unwrap();
    let reference = slapd_add_rate(&slapd, 3000);
    let mut queue = String::with_capacity(lines * 48);
    for id in 1..=lines {
        queue.push_str(&format!("{id} uid=user{id},cn=users,{BASE} m\n"));
    }
    let notifier = Notifier::start_with(&slapd, Intake::QueueFile, &["-d", "1"], |dir| {
        std::fs::write(dir.join("listener/listener"), &queue)
    })
    .unwrap();
    let start = Instant::now();
    let expected = format!("{lines} uid=user{lines},cn=users,{BASE} m\n");
    wait_until(
        "the whole queue committed",
        Duration::from_secs(600),
        || Ok(notifier.transactions().ends_with(&expected).then_some(())),
    )
    .unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    let rate = lines as f64 / elapsed;
    println!("(a) intake: {lines} queued lines -> fsynced log + cn=translog in {elapsed:.2} s");
    println!("    notifier intake      {rate:>10.0} lines/s");
    println!("    slapd sequential add {reference:>10.0} adds/s (same slapd, same run)");
    println!(
        "    ratio                {:>10.2}x   (goal >= 3x)",
        rate / reference
    );
}

fn fan_out(
    clients: usize,
    transactions: usize,
    extra: &[String],
    tls: Option<SslConnector>,
) -> FanOut {
    let slapd = Slapd::start(SlapdConfig::provider().log_operations(false)).unwrap();
    // All clients come from 127.0.0.1, above the default per-address limit.
    let limit = (clients + 16).to_string();
    let mut args = vec![
        "-d",
        "1",
        "--poll-interval",
        "1",
        "--max-connections-per-address",
        &limit,
    ];
    args.extend(extra.iter().map(String::as_str));
    let mut notifier = Notifier::start(&slapd, Intake::QueueFile, &args).unwrap();
    let port = notifier.port();
    let pid = notifier.process().and_then(|p| p.pid()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // Write time of every id, filled by the writer; read by clients at answer time.
    let written: Arc<Mutex<Vec<Option<Instant>>>> =
        Arc::new(Mutex::new(vec![None; transactions + 1]));
    let samples: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
    runtime.block_on(async {
        let mut tasks = Vec::new();
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(clients);
        for _ in 0..clients {
            let written = Arc::clone(&written);
            let samples = Arc::clone(&samples);
            let ready = ready_tx.clone();
            let tls = tls.clone();
            tasks.push(tokio::spawn(async move {
                client(port, tls, transactions as u64, written, samples, ready).await;
            }));
        }
        for _ in 0..clients {
            ready_rx.recv().await.unwrap();
        }
        // Feed the queue in small chunks, as slapd's overlay would under steady load.
        let queue = notifier.queue_file();
        let written_w = Arc::clone(&written);
        let writer = tokio::task::spawn_blocking(move || {
            let chunk = 10;
            let mut id = 1;
            while id <= transactions {
                let end = (id + chunk - 1).min(transactions);
                let mut text = String::new();
                for i in id..=end {
                    text.push_str(&format!("{i} cn=tx{i},{BASE} m\n"));
                }
                let now = Instant::now();
                {
                    let mut w = written_w.lock().unwrap();
                    for slot in w.iter_mut().take(end + 1).skip(id) {
                        *slot = Some(now);
                    }
                }
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&queue)
                    .unwrap();
                f.write_all(text.as_bytes()).unwrap();
                id = end + 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        writer.await.unwrap();
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(300), task)
                .await
                .unwrap()
                .unwrap();
        }
    });
    let rss_kb = peak_rss_kb(pid);
    let mut samples = samples.lock().unwrap().clone();
    samples.sort();
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    let result = FanOut {
        answers: samples.len(),
        median: pick(0.5),
        p99: pick(0.99),
        max: pick(1.0),
        rss_kb,
    };
    notifier.stop().unwrap();
    result
}

/// The client's stream after the handshake: plain TCP or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects and does the handshake, with STARTTLS when `tls` is given.
async fn connect(port: u16, tls: Option<SslConnector>) -> Box<dyn Io> {
    let mut stream = BufReader::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    let asked = if tls.is_some() { "STARTTLS" } else { "" };
    stream
        .write_all(format!("Version: 3\nCapabilities: {asked}\n\n").as_bytes())
        .await
        .unwrap();
    // "Version: 3", "Capabilities: ...", blank line.
    let mut line = String::new();
    for _ in 0..3 {
        line.clear();
        stream.read_line(&mut line).await.unwrap();
    }
    let Some(connector) = tls else {
        return Box::new(stream);
    };
    // The server sends nothing after its answer until the TLS handshake, so the reader
    // holds no buffered bytes here.
    assert!(stream.buffer().is_empty());
    let ssl = connector
        .configure()
        .unwrap()
        .into_ssl("127.0.0.1")
        .unwrap();
    let mut tls = tokio_openssl::SslStream::new(ssl, stream.into_inner()).unwrap();
    std::pin::Pin::new(&mut tls).connect().await.unwrap();
    Box::new(tls)
}

async fn client(
    port: u16,
    tls: Option<SslConnector>,
    last: u64,
    written: Arc<Mutex<Vec<Option<Instant>>>>,
    samples: Arc<Mutex<Vec<Duration>>>,
    ready: tokio::sync::mpsc::Sender<()>,
) {
    let (read, mut write) = tokio::io::split(connect(port, tls).await);
    let mut lines = BufReader::new(read).lines();
    let mut next = 1u64;
    let mut msgid = 1u32;
    let mut mine = Vec::new();
    let mut seen = HashSet::new();
    write
        .write_all(format!("MSGID: {msgid}\nWAIT_ID {next}\n\n").as_bytes())
        .await
        .unwrap();
    write.flush().await.unwrap();
    ready.send(()).await.unwrap();
    while next <= last {
        let _msgid_line = lines.next_line().await.unwrap().unwrap();
        let id: u64 = lines.next_line().await.unwrap().unwrap().parse().unwrap();
        let _blank = lines.next_line().await.unwrap();
        let now = Instant::now();
        if let Some(Some(at)) = written.lock().unwrap().get(id as usize) {
            mine.push(now.duration_since(*at));
        }
        seen.insert(id);
        next = id + 1;
        msgid += 1;
        if next <= last {
            write
                .write_all(format!("MSGID: {msgid}\nWAIT_ID {next}\n\n").as_bytes())
                .await
                .unwrap();
            write.flush().await.unwrap();
        }
    }
    samples.lock().unwrap().extend(mine);
}

fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
