//! Protocol edge cases, startup repair and operations of the real notifier binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::time::Duration;

use integration_tests::slapd::BASE;
use integration_tests::{Intake, Notifier, Slapd, wait_until};

const T: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_millis(300);

fn started(slapd: &Slapd, extra: &[&str]) -> Notifier {
    Notifier::start(slapd, Intake::QueueFile, extra).unwrap()
}

#[test]
fn version_gating_and_ignored_commands() {
    let slapd = Slapd::provider().unwrap();
    let notifier = started(&slapd, &["-v", "3"]);

    // Below the minimum: closed without a single byte.
    let mut old = notifier.client().unwrap();
    old.send("Version: 2\nCapabilities: \n\n").unwrap();
    assert!(old.is_closed(T).unwrap());

    let mut bad = notifier.client().unwrap();
    bad.send("Version: 3x\nCapabilities: \n\n").unwrap();
    assert!(bad.is_closed(T).unwrap());

    // Above 3: clamped.
    let mut future = notifier.client().unwrap();
    assert_eq!(
        future.handshake(9).unwrap(),
        "Version: 3\nCapabilities: \n\n"
    );

    // Commands before a version, and without MSGID, are ignored; the connection stays.
    let mut early = notifier.client().unwrap();
    early.send("MSGID: 1\nGET_ID\n\n").unwrap();
    early.send("Capabilities: \n\n").unwrap();
    assert!(early.is_silent(SHORT).unwrap());
    assert_eq!(
        early.handshake(3).unwrap(),
        "Version: 3\nCapabilities: \n\n"
    );
    early
        .send("GET_ID\n\nMSGID: 4294967295\nGET_ID\n\nMSGID: 2\nNO_SUCH_COMMAND\n\n")
        .unwrap();
    assert!(early.is_silent(SHORT).unwrap());
    // A STARTTLS request is not offered, so it is not echoed.
    let mut tls = notifier.client().unwrap();
    tls.send("Version: 3\nCapabilities: STARTTLS\n\n").unwrap();
    assert_eq!(tls.block(T).unwrap(), "Version: 3\nCapabilities: \n\n");
    // Two requests in one segment, and one split across segments.
    early
        .send("MSGID: 3\nGET_ID\n\nMSGID: 4\nALIVE\n\nMSGID: 5\nGET_")
        .unwrap();
    assert_eq!(early.block(T).unwrap(), "MSGID: 3\n0\n\n");
    assert_eq!(early.block(T).unwrap(), "MSGID: 4\nOKAY\n\n");
    early.send("SCHEMA_ID\n\n").unwrap();
    assert_eq!(early.block(T).unwrap(), "MSGID: 5\n0\n\n");
}

#[test]
fn ucs_one_shot_client_works() {
    let slapd = Slapd::provider().unwrap();
    let notifier = started(&slapd, &[]);
    notifier
        .queue(&format!("1 {BASE} m\n2 {BASE} m\n"))
        .unwrap();
    // The log line is written before the id is announced (durable before visible), so
    // wait for the announcement, not for the file.
    wait_until("two transactions announced", T, || {
        Ok((notifier.last_id()? == 2).then_some(()))
    })
    .unwrap();
    // get_notifier_id.py: send, recv(100), send, recv(100), take line 1.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", notifier.port())).unwrap();
    stream.set_read_timeout(Some(T)).unwrap();
    stream.write_all(b"Version: 3\nCapabilities: \n\n").unwrap();
    let mut buf = [0u8; 100];
    let _ = stream.read(&mut buf).unwrap();
    stream.write_all(b"MSGID: 1\nGET_ID\n\n").unwrap();
    let n = stream.read(&mut buf).unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert_eq!(reply.split('\n').nth(1), Some("2"));
}

#[test]
fn schema_id_follows_the_file() {
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::start_with(&slapd, Intake::QueueFile, &[], |dir| {
        std::fs::write(dir.join("schema/id/id"), "7")
    })
    .unwrap();
    let mut client = notifier.client().unwrap();
    client.handshake(3).unwrap();
    assert_eq!(
        client.request(1, "GET_SCHEMA_ID").unwrap(),
        "MSGID: 1\n7\n\n"
    );
    std::fs::write(notifier.ldap_dir().join("schema/id/id"), "8\n").unwrap();
    let mut msgid = 1;
    wait_until("schema id 8", T, || {
        msgid += 1;
        Ok(
            (client.request(msgid, "GET_SCHEMA_ID")? == format!("MSGID: {msgid}\n8\n\n"))
                .then_some(()),
        )
    })
    .unwrap();
}

#[test]
fn get_dn_for_a_pruned_id_closes_the_connection() {
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::start_with(&slapd, Intake::QueueFile, &["-v", "2"], |dir| {
        std::fs::write(
            dir.join("notify/transaction"),
            format!("5 cn=a,{BASE} a\n6 cn=b,{BASE} m\n"),
        )
    })
    .unwrap();
    let mut client = notifier.client().unwrap();
    client.handshake(2).unwrap();
    assert_eq!(
        client.request(1, "GET_DN 6").unwrap(),
        format!("MSGID: 1\n6 cn=b,{BASE} m\n\n")
    );
    client.send("MSGID: 2\nGET_DN 2\n\n").unwrap();
    assert!(client.is_closed(T).unwrap());
}

#[test]
fn oversize_request_closes_the_connection() {
    let slapd = Slapd::provider().unwrap();
    let notifier = started(&slapd, &[]);
    let mut client = notifier.client().unwrap();
    client.handshake(3).unwrap();
    client
        .send(&format!("MSGID: 1\n{}", "X".repeat(9000)))
        .unwrap();
    assert!(client.is_closed(T).unwrap());
    // Others are unaffected.
    let mut other = notifier.client().unwrap();
    other.handshake(3).unwrap();
    assert_eq!(other.request(1, "ALIVE").unwrap(), "MSGID: 1\nOKAY\n\n");
}

#[test]
fn a_client_that_never_reads_does_not_stall_others() {
    let slapd = Slapd::provider().unwrap();
    let notifier = started(&slapd, &["--client-write-timeout", "1"]);
    let mut slow = notifier.client().unwrap();
    slow.handshake(3).unwrap();
    // Flood requests and never read the answers: its socket buffers fill up.
    let request = "MSGID: 1\nGET_SCHEMA_ID\n\n".repeat(2000);
    slow.stream()
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    for _ in 0..200 {
        if slow.stream().write_all(request.as_bytes()).is_err() {
            break;
        }
    }
    let mut fast = notifier.client().unwrap();
    fast.handshake(3).unwrap();
    fast.send("MSGID: 1\nWAIT_ID 1\n\n").unwrap();
    notifier.queue(&format!("1 {BASE} m\n")).unwrap();
    assert_eq!(fast.block(T).unwrap(), "MSGID: 1\n1\n\n");
    wait_until("the slow client to be dropped", T, || {
        Ok(notifier.log().contains("dropping client").then_some(()))
    })
    .unwrap();
}

#[test]
fn startup_repairs_torn_tail_and_nuls_and_rebuilds_a_missing_index() {
    let slapd = Slapd::provider().unwrap();
    let mut notifier = Notifier::start_with(&slapd, Intake::QueueFile, &["-v", "2"], |dir| {
        let mut log = format!("1 cn=a,{BASE} a\n2 cn=b,{BASE} m\n").into_bytes();
        log.extend_from_slice(b"3 cn=torn,dc=exa");
        log.extend_from_slice(&[0u8; 100]);
        std::fs::write(dir.join("notify/transaction"), log)
    })
    .unwrap();
    assert_eq!(
        notifier.transactions(),
        format!("1 cn=a,{BASE} a\n2 cn=b,{BASE} m\n")
    );
    let log = notifier.log();
    assert!(log.contains("repaired"), "{log}");
    // The next transaction continues cleanly after the repaired tail.
    notifier.queue(&format!("3 cn=c,{BASE} d\n")).unwrap();
    wait_until("transaction 3", T, || {
        Ok((notifier.transactions().lines().count() == 3).then_some(()))
    })
    .unwrap();
    notifier.stop().unwrap();

    let index = notifier.ldap_dir().join("notify/transaction.index");
    let written = std::fs::read(&index).unwrap();
    std::fs::remove_file(&index).unwrap();
    notifier.restart().unwrap();
    let mut client = notifier.client().unwrap();
    client.handshake(2).unwrap();
    assert_eq!(
        client.request(1, "GET_DN 2").unwrap(),
        format!("MSGID: 1\n2 cn=b,{BASE} m\n\n")
    );
    // UCS layout on amd64: 8-byte magic, 9 bytes per id at 8 + 9*id.
    let rebuilt = std::fs::read(&index).unwrap();
    assert_eq!(rebuilt, written);
    assert_eq!(&rebuilt[..8], &0x3395e0d4u64.to_le_bytes());
    assert_eq!(rebuilt.len(), 8 + 9 * 4);
}

#[test]
fn sigterm_exits_cleanly_and_removes_the_pid_file() {
    let slapd = Slapd::provider().unwrap();
    let mut notifier = started(&slapd, &[]);
    let pid_file = notifier.dir().join("notifier.pid");
    assert!(pid_file.exists());
    let process = notifier.process().unwrap();
    process.signal(libc::SIGTERM).unwrap();
    let status = process.wait_exit(T).unwrap().expect("exited");
    assert!(status.success(), "{status}");
    assert!(!pid_file.exists());
}

#[test]
fn metrics_endpoint_reports_ids_and_clients() {
    let slapd = Slapd::provider().unwrap();
    let port = integration_tests::net::free_port().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let notifier = started(&slapd, &["--metrics", &addr]);
    notifier.queue(&format!("1 {BASE} m\n")).unwrap();
    let mut client = notifier.client().unwrap();
    client.handshake(3).unwrap();
    let body = wait_until("metrics with last id 1", T, || {
        let Ok(mut stream) = std::net::TcpStream::connect(&addr) else {
            return Ok(None);
        };
        stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).unwrap();
        Ok(body.contains("udn_last_id 1\n").then_some(body))
    })
    .unwrap();
    assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
    assert!(body.contains("udn_clients 1\n"), "{body}");
    assert!(body.contains("udn_commit_duration_seconds_count"), "{body}");
}

#[test]
fn sighup_reopens_the_log_file_and_sigusr_changes_the_level() {
    let slapd = Slapd::provider().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log_file = dir.path().join("notifier.log");
    let log_arg = log_file.display().to_string();
    let mut notifier = started(&slapd, &["--log-file", &log_arg, "-d", "2"]);
    wait_for_text(&log_file, "listening");
    // logrotate: move the file away, then SIGHUP.
    let rotated = dir.path().join("notifier.log.1");
    std::fs::rename(&log_file, &rotated).unwrap();
    let process = notifier.process().unwrap();
    process.signal(libc::SIGHUP).unwrap();
    wait_until("a fresh log file", T, || {
        Ok(log_file.exists().then_some(()))
    })
    .unwrap();
    process.signal(libc::SIGUSR1).unwrap();
    wait_for_text(&log_file, "debug level is now 3");
    process.signal(libc::SIGUSR2).unwrap();
    wait_for_text(&log_file, "debug level is now 2");
    assert!(
        std::fs::read_to_string(&rotated)
            .unwrap()
            .contains("listening")
    );
}

/// Waits until `path` contains `text`.
fn wait_for_text(path: &std::path::Path, text: &str) {
    wait_until(&format!("{text:?} in {}", path.display()), T, || {
        Ok(std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(text)
            .then_some(()))
    })
    .unwrap();
}

/// A second notifier started by mistake with the running one's `--pid-file` refuses to
/// start, says why, and leaves the first one's PID file in place when it exits.
#[test]
fn a_second_notifier_keeps_its_hands_off_the_first_ones_pid_file() {
    let slapd = Slapd::provider().unwrap();
    let mut first = started(&slapd, &[]);
    let pid_file = first.dir().join("notifier.pid");
    let pid = first.process().unwrap().pid().unwrap();
    let own_pid = || std::fs::read_to_string(&pid_file).unwrap_or_default();
    assert_eq!(own_pid().trim(), pid.to_string());

    // Its own --ldap-dir and port: only the PID file is shared.
    let pid_arg = pid_file.display().to_string();
    let err = match Notifier::start(&slapd, Intake::QueueFile, &["--pid-file", &pid_arg]) {
        Ok(_) => panic!("a second notifier started with the same PID file"),
        Err(err) => err.to_string(),
    };
    assert!(
        err.contains(&format!("{pid_arg} names the running process {pid}")),
        "{err}"
    );
    // The second process has exited (start reports its exit status and log).
    assert!(err.contains("notifier exited with"), "{err}");
    assert_eq!(own_pid().trim(), pid.to_string());
    assert!(first.process().unwrap().is_running());
    assert_eq!(first.last_id().unwrap(), 0);

    // The first still removes its own file when it stops.
    first.stop().unwrap();
    assert!(!pid_file.exists());
}

/// A connection to the notifier from another loopback source address (127.0.0.2), as a
/// second host would make it.
fn connect_from_second_host(port: u16) -> std::net::TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = runtime
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind("127.0.0.2:0".parse().unwrap())?;
            socket
                .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                .await
        })
        .unwrap()
        .into_std()
        .unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
}

/// Reads until a blank line ends an answer block.
fn read_block(stream: &mut std::net::TcpStream) -> String {
    use std::io::Read as _;
    let mut block = Vec::new();
    let mut byte = [0u8; 1];
    while !block.ends_with(b"\n\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed mid-block");
        block.push(byte[0]);
    }
    String::from_utf8(block).unwrap()
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// One host holding 5,000 idle connections (no handshake sent) locks nobody out: it gets
/// at most `--max-connections-per-address`, its connections are closed when the handshake
/// deadline passes, and meanwhile a client from another address gets `GET_ID` answered
/// promptly; the notifier's memory stays bounded.
#[test]
fn idle_connections_from_one_host_lock_nobody_out() {
    use std::time::Instant;
    let slapd = Slapd::provider().unwrap();
    let mut notifier = Notifier::start(
        &slapd,
        Intake::QueueFile,
        &[
            "--max-connections-per-address",
            "100",
            "--handshake-timeout",
            "8",
        ],
    )
    .unwrap();
    let port = notifier.port();
    let idle: Vec<std::net::TcpStream> = (0..5000)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    let opened = idle.len();
    assert!(opened > 1000, "only {opened} connections opened");

    let mut latencies = Vec::new();
    for msgid in 1..=100u32 {
        let started = Instant::now();
        let mut client = connect_from_second_host(port);
        client.write_all(b"Version: 3\nCapabilities: \n\n").unwrap();
        read_block(&mut client);
        client
            .write_all(format!("MSGID: {msgid}\nGET_ID\n\n").as_bytes())
            .unwrap();
        assert_eq!(read_block(&mut client), format!("MSGID: {msgid}\n0\n\n"));
        latencies.push(started.elapsed());
    }
    latencies.sort_unstable();
    let p99 = latencies[98];
    assert!(p99 < Duration::from_millis(100), "p99 {p99:?}");
    let pid = notifier.process().unwrap().pid().unwrap();
    let rss = vm_rss_kib(pid);
    assert!(rss < 64 * 1024, "notifier VmRSS {rss} KiB");

    // The idle connections the notifier admitted are closed at the handshake deadline.
    let mut closed = 0;
    for mut stream in idle {
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut buf = [0u8; 16];
        if matches!(stream.read(&mut buf), Ok(0) | Err(_)) {
            closed += 1;
        }
    }
    assert_eq!(
        closed, opened,
        "connections still open after the handshake deadline"
    );
    // Logged once per episode at the limit, not once per refused attempt.
    let log = notifier.log();
    let refusals = log.matches("refusing connections from 127.0.0.1").count();
    assert!(
        (1..10).contains(&refusals),
        "{refusals} refusal lines:\n{log}"
    );
    assert!(log.contains("no handshake within"), "{log}");
}
