//! The notifier with the UCS queue-file intake, against real slapd (cn=translog) and the
//! real binary: ids, exact protocol bytes, durability order, bad input.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use integration_tests::slapd::{BASE, TRANSLOG_BASE};
use integration_tests::{Intake, Notifier, Slapd, wait_until};

const T: Duration = Duration::from_secs(20);
/// `proto::MAX_LINE_LEN`: the longest queue line the notifier accepts, newline included.
const MAX_LINE_LEN: usize = 8192;

fn get_id(notifier: &Notifier) -> u64 {
    let mut client = notifier.client().unwrap();
    client.handshake(3).unwrap();
    let answer = client.request(1, "GET_ID").unwrap();
    answer.lines().nth(1).unwrap().parse().unwrap()
}

fn wait_for_id(notifier: &Notifier, id: u64) {
    wait_until(&format!("notifier last id {id}"), T, || {
        Ok((get_id(notifier) >= id).then_some(()))
    })
    .unwrap();
}

#[test]
fn queue_lines_become_transactions_with_exact_protocol_bytes() {
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::start(&slapd, Intake::QueueFile, &["-v", "2"]).unwrap();
    let mut v3 = notifier.client().unwrap();
    assert_eq!(v3.handshake(3).unwrap(), "Version: 3\nCapabilities: \n\n");
    assert_eq!(v3.request(1, "GET_ID").unwrap(), "MSGID: 1\n0\n\n");
    assert_eq!(v3.request(2, "ALIVE").unwrap(), "MSGID: 2\nOKAY\n\n");
    assert_eq!(v3.request(3, "GET_SCHEMA_ID").unwrap(), "MSGID: 3\n0\n\n");

    // A wait for a future id is answered when it is committed.
    v3.send("MSGID: 4\nWAIT_ID 1\n\n").unwrap();
    assert!(v3.is_silent(Duration::from_millis(200)).unwrap());
    notifier
        .queue(&format!("1 cn=a,{BASE} a\n2 cn=with space,{BASE} m\n"))
        .unwrap();
    let answer = v3.block(T).unwrap();
    assert!(
        answer == "MSGID: 4\n1\n\n" || answer == "MSGID: 4\n2\n\n",
        "{answer:?}"
    );
    wait_for_id(&notifier, 2);
    // WAIT_ID at or below the last id answers the last id, not the requested one.
    assert_eq!(v3.request(5, "WAIT_ID 1").unwrap(), "MSGID: 5\n2\n\n");
    // GET_DN is for protocol 2 only: dropped silently, connection stays open.
    v3.send("MSGID: 6\nGET_DN 1\n\n").unwrap();
    assert!(v3.is_silent(Duration::from_millis(200)).unwrap());
    assert_eq!(v3.request(7, "GET_ID").unwrap(), "MSGID: 7\n2\n\n");

    let mut v2 = notifier.client().unwrap();
    assert_eq!(v2.handshake(2).unwrap(), "Version: 2\nCapabilities: \n\n");
    // The C listener sends GET_DN without the trailing blank line.
    v2.send("MSGID: 1\nGET_DN 1\n").unwrap();
    assert_eq!(
        v2.block(T).unwrap(),
        format!("MSGID: 1\n1 cn=a,{BASE} a\n\n")
    );
    assert_eq!(
        v2.request(2, "GET_DN 2").unwrap(),
        format!("MSGID: 2\n2 cn=with space,{BASE} m\n\n")
    );
    v2.send("MSGID: 3\nGET_DN 3\n").unwrap();
    assert!(v2.is_silent(Duration::from_millis(200)).unwrap());
    notifier.queue(&format!("3 cn=b,{BASE} d\n")).unwrap();
    assert_eq!(
        v2.block(T).unwrap(),
        format!("MSGID: 3\n3 cn=b,{BASE} d\n\n")
    );

    assert_eq!(
        notifier.transactions(),
        format!("1 cn=a,{BASE} a\n2 cn=with space,{BASE} m\n3 cn=b,{BASE} d\n")
    );
    // The translog entries exist and the host account can read them.
    let mut host = slapd.host().unwrap();
    let entry = host
        .get(&format!("reqSession=2,{TRANSLOG_BASE}"))
        .unwrap()
        .unwrap();
    assert_eq!(
        entry.first("reqDN"),
        Some(format!("cn=with space,{BASE}").as_str())
    );
    assert_eq!(entry.first("reqType"), Some("m"));
    let start = entry.first("reqStart").unwrap();
    assert_eq!(start.len(), 15, "{start}");
    assert!(start.ends_with('Z'));
}

#[test]
fn translog_entry_exists_before_the_wait_id_answer() {
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::start(&slapd, Intake::QueueFile, &[]).unwrap();
    let mut host = slapd.host().unwrap();
    for id in 1..=20u64 {
        let mut client = notifier.client().unwrap();
        client.handshake(3).unwrap();
        client.send(&format!("MSGID: 1\nWAIT_ID {id}\n\n")).unwrap();
        notifier
            .queue(&format!("{id} cn=obj{id},{BASE} a\n"))
            .unwrap();
        client.block(T).unwrap();
        // No waiting here: the entry must already exist when the id is announced.
        let entry = host
            .get(&format!("reqSession={id},{TRANSLOG_BASE}"))
            .unwrap();
        assert!(
            entry.is_some(),
            "translog entry {id} missing at announcement"
        );
    }
}

#[test]
fn restart_keeps_numbering_and_leftover_private_file_is_drained_first() {
    let slapd = Slapd::provider().unwrap();
    let mut notifier = Notifier::start(&slapd, Intake::QueueFile, &[]).unwrap();
    notifier
        .queue(&format!("1 cn=a,{BASE} a\n2 cn=b,{BASE} a\n"))
        .unwrap();
    wait_for_id(&notifier, 2);
    notifier.stop().unwrap();
    // A crash left listener.priv behind (with an already committed line) and slapd kept
    // writing to the queue meanwhile.
    let listener_dir = notifier.ldap_dir().join("listener");
    std::fs::write(
        listener_dir.join("listener.priv"),
        format!("2 cn=b,{BASE} a\n3 cn=c,{BASE} m\n"),
    )
    .unwrap();
    notifier.queue(&format!("4 cn=d,{BASE} d\n")).unwrap();
    notifier.restart().unwrap();
    wait_for_id(&notifier, 4);
    assert_eq!(
        notifier.transactions(),
        format!("1 cn=a,{BASE} a\n2 cn=b,{BASE} a\n3 cn=c,{BASE} m\n4 cn=d,{BASE} d\n")
    );
    assert!(!listener_dir.join("listener.priv").exists());
    // The queue file is recreated empty, not removed: slapd's overlay appends to it.
    assert_eq!(std::fs::read_to_string(notifier.queue_file()).unwrap(), "");
}

#[test]
fn malformed_lines_are_quarantined_and_gaps_filled() {
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::start(&slapd, Intake::QueueFile, &["--max-gap", "10"]).unwrap();
    let garbage = [
        "0 cn=zero,dc=example,dc=com m\n".to_owned(),
        "<TransID> dc=example,dc=com m\n".to_owned(),
        "7\n".to_owned(),
        format!("8 cn=x,{BASE} q\n"),
        format!("9 cn=nul\0,{BASE} m\n"),
        format!("1000 cn=far,{BASE} m\n"),
    ];
    let mut queue = format!("1 cn=a,{BASE} a\n1 cn=a,{BASE} a\n");
    for line in &garbage {
        queue.push_str(line);
    }
    queue.push_str(&format!("4 cn=d,{BASE} m\n"));
    notifier.queue(&queue).unwrap();
    wait_for_id(&notifier, 4);
    assert_eq!(
        notifier.transactions(),
        format!("1 cn=a,{BASE} a\n2 {BASE} m\n3 {BASE} m\n4 cn=d,{BASE} m\n")
    );
    let quarantine =
        std::fs::read_to_string(notifier.ldap_dir().join("listener/listener.quarantine")).unwrap();
    assert_eq!(quarantine, garbage.concat());
    let log = notifier.log();
    assert!(log.contains("invalid transaction line"), "{log}");
    // Still serving after all that.
    assert_eq!(get_id(&notifier), 4);
    // Fillers have translog entries too, so protocol-3 listeners never hit a hole.
    let mut host = slapd.host().unwrap();
    let filler = host
        .get(&format!("reqSession=2,{TRANSLOG_BASE}"))
        .unwrap()
        .unwrap();
    assert_eq!(filler.first("reqDN"), Some(BASE));
}

/// A line longer than the protocol's limit goes to the quarantine file whole (the intake
/// reads it through a bounded buffer), and the lines after it are committed.
#[test]
fn an_over_long_line_is_quarantined_whole() {
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::start(&slapd, Intake::QueueFile, &[]).unwrap();
    let long = format!("2 cn={},{BASE} m\n", "x".repeat(4 * MAX_LINE_LEN));
    notifier
        .queue(&format!("1 cn=a,{BASE} a\n{long}2 cn=b,{BASE} a\n"))
        .unwrap();
    wait_for_id(&notifier, 2);
    assert_eq!(
        notifier.transactions(),
        format!("1 cn=a,{BASE} a\n2 cn=b,{BASE} a\n")
    );
    let quarantine =
        std::fs::read_to_string(notifier.ldap_dir().join("listener/listener.quarantine")).unwrap();
    assert_eq!(quarantine, long);
    let log = notifier.log();
    assert!(log.contains("transaction line too long"), "{log}");
}

#[test]
fn translog_outage_delays_announcement_and_loses_nothing() {
    let mut slapd = Slapd::provider().unwrap();
    let notifier = Notifier::start(&slapd, Intake::QueueFile, &[]).unwrap();
    notifier.queue(&format!("1 cn=a,{BASE} a\n")).unwrap();
    wait_for_id(&notifier, 1);
    slapd.kill().unwrap();
    notifier.queue(&format!("2 cn=b,{BASE} m\n")).unwrap();
    // Without its translog entry, id 2 must not be announced.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(get_id(&notifier), 1);
    assert_eq!(notifier.transactions().lines().count(), 1);
    slapd.restart().unwrap();
    wait_for_id(&notifier, 2);
    let mut host = slapd.host().unwrap();
    assert!(
        host.get(&format!("reqSession=2,{TRANSLOG_BASE}"))
            .unwrap()
            .is_some()
    );
    assert!(notifier.log().contains("retrying"));
}

/// Without `--ldap-base` the notifier takes the base from the server's naming contexts: a
/// transaction whose translog entry slapd rejects (here an invalid reqDN) is replaced by a
/// no-op on the base, which slapd accepts, and announced with its entry. Before, the no-op
/// reused the rejected DN and was announced without an entry.
#[test]
fn a_rejected_translog_entry_becomes_a_no_op_on_the_servers_base() {
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::start_without_base(&slapd, Intake::QueueFile, &[]).unwrap();
    notifier.queue("1 not-a-dn m\n").unwrap();
    wait_for_id(&notifier, 1);
    assert_eq!(notifier.transactions(), format!("1 {BASE} m\n"));
    let entry = slapd
        .host()
        .unwrap()
        .get(&format!("reqSession=1,{TRANSLOG_BASE}"))
        .unwrap();
    assert!(entry.is_some(), "id 1 announced without its translog entry");
    assert!(
        notifier.log().contains("names no-op transactions"),
        "{}",
        notifier.log()
    );
}

/// While slapd rejects even the no-op's translog entry, nothing is announced (a protocol-3
/// listener would wait for the missing entry for ever); the notifier says why in its log
/// and metrics, and the queued line is kept.
#[test]
fn nothing_is_announced_while_even_the_no_op_is_rejected() {
    let slapd = Slapd::provider().unwrap();
    let metrics = integration_tests::net::free_port().unwrap();
    let addr = format!("127.0.0.1:{metrics}");
    let notifier = Notifier::start(
        &slapd,
        Intake::QueueFile,
        &["--ldap-base", "garbage", "--metrics", &addr],
    )
    .unwrap();
    notifier.queue("1 not-a-dn m\n").unwrap();
    wait_until("the stall in the log", T, || {
        Ok(notifier
            .log()
            .contains("nothing is announced: slapd rejects the translog entry")
            .then_some(()))
    })
    .unwrap();
    let scrape = || {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        std::io::Write::write_all(&mut stream, b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stream, &mut text).unwrap();
        text
    };
    let text = scrape();
    assert!(text.contains("\nudn_translog_stalled 1\n"), "{text}");
    assert_eq!(
        get_id(&notifier),
        0,
        "an id was announced without its entry"
    );
    assert!(notifier.transactions().is_empty());
    let private = notifier.ldap_dir().join("listener/listener.priv");
    assert_eq!(std::fs::read_to_string(private).unwrap(), "1 not-a-dn m\n");
}

/// A failed fsync of the transaction log is not retried into an announcement (after a
/// write-back error Linux may report a later fsync as successful although the data is
/// gone): the notifier exits without announcing, and its next start decides from what is
/// on disk. The failure is injected with a failpoint (debug builds).
#[test]
fn a_failed_log_sync_stops_the_notifier_without_announcing() {
    let slapd = Slapd::provider().unwrap();
    // SAFETY: nextest runs every test in a process of its own; no other thread reads the
    // environment while it changes.
    unsafe { std::env::set_var(daemon::failpoint::ENV, "journal-sync=2") };
    let mut notifier = Notifier::start(&slapd, Intake::QueueFile, &[]).unwrap();
    unsafe { std::env::remove_var(daemon::failpoint::ENV) };
    notifier.queue(&format!("1 cn=a,{BASE} a\n")).unwrap();
    wait_for_id(&notifier, 1);
    let mut waiter = notifier.client().unwrap();
    waiter.handshake(3).unwrap();
    waiter.send("MSGID: 1\nWAIT_ID 2\n\n").unwrap();
    notifier.queue(&format!("2 cn=b,{BASE} a\n")).unwrap();
    let status = wait_until("the notifier to exit", T, || {
        Ok(notifier.process().unwrap().try_status())
    })
    .unwrap();
    assert!(!status.success(), "{status}");
    assert!(
        waiter.is_closed(T).unwrap(),
        "id 2 was announced although its sync failed"
    );
    let log = notifier.log();
    assert!(log.contains("cannot sync the transaction log"), "{log}");

    // The next start (no failpoint) finds line 2 on disk and announces it.
    notifier.restart().unwrap();
    wait_for_id(&notifier, 2);
}

/// The file intake says which file it waits on: at start, and again when nothing arrived
/// for `--idle-report` seconds.
#[test]
fn a_quiet_file_intake_names_its_queue_file() {
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::start(&slapd, Intake::QueueFile, &["--idle-report", "1"]).unwrap();
    let queue = notifier.queue_file().display().to_string();
    wait_until("the start message", T, || {
        Ok(notifier
            .log()
            .contains(&format!("waiting for transactions in {queue}"))
            .then_some(()))
    })
    .unwrap();
    let quiet = format!("no new transaction in {queue} for ");
    wait_until("the idle report", T, || {
        Ok(notifier.log().contains(&quiet).then_some(()))
    })
    .unwrap();
    assert!(notifier.log().contains("(last id 0)"), "{}", notifier.log());
}

/// A translog entry left from another numbering (a transaction log restored or recreated)
/// is made to say what the transaction log says, so protocol-2 and protocol-3 listeners see
/// the same change under one id.
#[test]
fn a_stale_translog_entry_is_replaced_with_the_logs_transaction() {
    let slapd = Slapd::provider().unwrap();
    let mut root = slapd.root().unwrap();
    // The base may exist already; the stale entry below it is what matters.
    let _ = root.add(
        TRANSLOG_BASE,
        &[("objectClass", &["auditContainer"]), ("cn", &["translog"])],
    );
    let stale = format!("cn=stale,{BASE}");
    root.add(
        &format!("reqSession=1,{TRANSLOG_BASE}"),
        &[
            ("objectClass", &["auditObject"]),
            ("reqStart", &["20200101000000Z"]),
            ("reqSession", &["1"]),
            ("reqDN", &[stale.as_str()]),
            ("reqType", &["d"]),
        ],
    )
    .unwrap();
    let notifier = Notifier::start(&slapd, Intake::QueueFile, &[]).unwrap();
    notifier.queue(&format!("1 cn=a,{BASE} a\n")).unwrap();
    wait_for_id(&notifier, 1);
    let entry = slapd
        .host()
        .unwrap()
        .get(&format!("reqSession=1,{TRANSLOG_BASE}"))
        .unwrap()
        .unwrap();
    assert_eq!(entry.first("reqDN"), Some(format!("cn=a,{BASE}").as_str()));
    assert_eq!(entry.first("reqType"), Some("a"));
    assert!(
        notifier.log().contains("replacing it"),
        "{}",
        notifier.log()
    );
}
