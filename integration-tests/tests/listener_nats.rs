//! The `nats` module against real `nats-server`s: every handler call becomes exactly one
//! message in the stream, in transaction order, whatever happens to the listener or NATS.
//! The jsonl module runs beside it in the same listener and is the reference: its lines,
//! without the repeats of a transaction re-run after a crash, are the handler calls.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use integration_tests::nats::{StreamMessage, create_stream, purge_stream, read_stream};
use integration_tests::process::binary;
use integration_tests::slapd::BASE;
use integration_tests::{
    Change, Directory, Listener, ListenerOptions, NatsCluster, NatsServer, Notifier, Slapd,
    SlapdConfig, wait_until,
};

const T: Duration = Duration::from_secs(180);
const STREAM: &str = "udl-test";

/// The module's config file: the given servers, short timeouts so outages show quickly
/// (unless `extra` sets `ack_timeout`), the outbox in `<dir>/nats-state`.
fn nats_conf(dir: &Path, servers: &str, extra: &str) -> PathBuf {
    let path = dir.join("nats.conf");
    let ack_timeout = if extra.contains("ack_timeout") {
        ""
    } else {
        "ack_timeout = 2\n"
    };
    std::fs::write(
        &path,
        format!(
            "servers = {servers}\nstream = {STREAM}\nsubject_prefix = udl\n\
             {ack_timeout}connect_timeout = 1\nstate_dir = {}\n{extra}",
            dir.join("nats-state").display()
        ),
    )
    .unwrap();
    path
}

/// The outbox file of the module configured by [`nats_conf`].
fn outbox_size(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("nats-state/nats.outbox")).map_or(0, |m| m.len())
}

fn start_listener(slapd: &Slapd, notifier: &Notifier, conf: &Path) -> Listener {
    Listener::start(
        slapd,
        notifier,
        ListenerOptions::new()
            .native_module(format!("nats=@{}", conf.display()))
            .postrun_delay(Duration::from_secs(60)),
    )
    .unwrap()
}

/// (id, command, dn) of a handler call.
type Key = (u64, char, String);

/// The jsonl module's calls, each once: a transaction re-run after a crash repeats calls
/// the stream de-duplicates.
fn jsonl_calls(changes: &[Change]) -> Vec<Key> {
    let mut seen = HashSet::new();
    changes
        .iter()
        .filter(|c| c.module == "jsonl")
        .map(|c| (c.id, c.command, c.dn.clone()))
        .filter(|key| seen.insert(key.clone()))
        .collect()
}

fn stream_key(m: &StreamMessage) -> Key {
    let p = &m.payload;
    (
        p["id"].as_u64().unwrap(),
        p["command"].as_str().unwrap().chars().next().unwrap(),
        p["dn"].as_str().unwrap().to_owned(),
    )
}

/// One message per handler call, none missing, none twice, in transaction order.
fn assert_exactly_once(stream: &[StreamMessage], changes: &[Change]) {
    let ids: HashSet<&str> = stream.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        stream.len(),
        "a message id is in the stream twice"
    );
    let positions: Vec<(u64, u64)> = stream
        .iter()
        .map(|m| {
            (
                m.payload["transaction"].as_u64().unwrap(),
                m.payload["number"].as_u64().unwrap(),
            )
        })
        .collect();
    for (i, pair) in positions.windows(2).enumerate() {
        assert!(
            pair[0] < pair[1],
            "out of transaction order: {pair:?} ({} then {})",
            stream[i].message_id,
            stream[i + 1].message_id
        );
    }
    for m in stream {
        let command = m.payload["command"].as_str().unwrap();
        assert_eq!(m.subject, format!("udl.{command}"));
    }
    // Each module has its own initialisation pass (`n` calls): the same objects, but the
    // jsonl file does not show the nats module's pass. The changes are the same calls.
    let (init, expected): (Vec<Key>, Vec<Key>) =
        jsonl_calls(changes).into_iter().partition(|k| k.1 == 'n');
    let (got_init, got): (Vec<Key>, Vec<Key>) =
        stream.iter().map(stream_key).partition(|k| k.1 == 'n');
    let dns = |keys: &[Key]| {
        keys.iter()
            .map(|k| k.2.to_lowercase())
            .collect::<HashSet<_>>()
    };
    assert_eq!(
        dns(&got_init),
        dns(&init),
        "the initialisation passes differ"
    );
    assert_eq!(
        got_init.len(),
        init.len(),
        "an object was initialised twice"
    );
    if got != expected {
        let first = got
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(expected.len()));
        panic!(
            "stream ({} messages) differs from the handler calls ({}) at {first}: \
             stream {:?}, calls {:?}",
            got.len(),
            expected.len(),
            &got[first..(first + 3).min(got.len())],
            &expected[first..(first + 3).min(expected.len())]
        );
    }
}

/// `ctrl status --json` of the running listener: (exit code, report).
fn ctrl_status(listener: &Listener, notifier: &Notifier) -> (i32, serde_json::Value) {
    let mut child = Command::new(binary("univention-directory-listener-ctrl").unwrap())
        .args([
            "-c",
            &listener.cache_dir().display().to_string(),
            "--failed-ldif",
            &listener.failed_ldif_path().display().to_string(),
            "--notifier-host",
            "127.0.0.1",
            "--notifier-port",
            &notifier.port().to_string(),
            "--ucr-file",
            &listener.ucr_file().display().to_string(),
            "status",
            "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let status = child.wait().unwrap();
    (
        status.code().unwrap_or(-1),
        serde_json::from_str(&out).unwrap(),
    )
}

/// The module's entry in the report (null while the listener has not loaded it yet).
fn module<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    static NULL: serde_json::Value = serde_json::Value::Null;
    report["modules"]
        .as_array()
        .and_then(|modules| modules.iter().find(|m| m["name"] == name))
        .unwrap_or(&NULL)
}

/// Waits until the stream holds `count` messages and returns them.
fn wait_stream(servers: &str, count: usize) -> Vec<StreamMessage> {
    wait_until(&format!("{count} messages in the stream"), T, || {
        let messages = read_stream(servers, STREAM).unwrap_or_default();
        Ok((messages.len() >= count).then_some(messages))
    })
    .unwrap()
}

/// NATS is not there when the listener starts: the changes wait (the listener does not
/// pass them, `ctrl status` says why and fails, retries are counted), and once NATS is up
/// every one of them arrives, once.
#[test]
fn nats_down_at_start_events_wait_and_arrive_once_it_is_up() {
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut server = NatsServer::unstarted(dir.path()).unwrap();
    let conf = nats_conf(dir.path(), &server.url(), "");
    let mut listener = start_listener(&slapd, &notifier, &conf);

    // Its initialisation (the listener's first work) waits for NATS already.
    wait_until("ctrl status to show nats unavailable", T, || {
        let (_, report) = ctrl_status(&listener, &notifier);
        Ok((module(&report, "nats")["condition"] == "unavailable").then_some(()))
    })
    .unwrap();
    let mut admin = slapd.admin().unwrap();
    let dns: Vec<String> = (0..5).map(|i| format!("cn=wait{i},{BASE}")).collect();
    for (i, dn) in dns.iter().enumerate() {
        admin.add_role(dn, &format!("wait{i}")).unwrap();
    }
    let first = notifier.wait_transaction(&dns[0], 'a', T).unwrap();
    let last = notifier.wait_transaction(&dns[4], 'a', T).unwrap();

    let report = wait_until("the retries to go on", T, || {
        let (code, report) = ctrl_status(&listener, &notifier);
        let nats = module(&report, "nats");
        Ok(
            (nats["condition"] == "unavailable" && nats["retries"].as_u64() >= Some(2))
                .then_some((code, report)),
        )
    })
    .unwrap();
    let (code, report) = report;
    assert_eq!(code, 1, "an unavailable module is unhealthy: {report}");
    let nats = module(&report, "nats");
    let error = nats["last_error"]["message"].as_str().unwrap();
    assert!(error.contains("cannot connect"), "{error}");
    let processed = report["processed_id"].as_u64().unwrap();
    assert!(
        processed < first,
        "passed transaction {first} without nats ({processed})"
    );
    assert!(listener.is_running());

    server.restart().unwrap();
    listener.wait_for_id(last, T).unwrap();
    let changes = listener.changes().unwrap();
    let stream = wait_stream(&server.url(), jsonl_calls(&changes).len());
    assert_exactly_once(&stream, &changes);
    let added: Vec<&str> = stream
        .iter()
        .filter(|m| m.payload["command"] == "a")
        .map(|m| m.payload["dn"].as_str().unwrap())
        .collect();
    assert_eq!(added, dns.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(stream.iter().all(|m| m.payload["entryUUID"].is_string()));
    let (code, report) = wait_until("ctrl status healthy again", T, || {
        let (code, report) = ctrl_status(&listener, &notifier);
        Ok((code == 0).then_some((code, report)))
    })
    .unwrap();
    assert_eq!(module(&report, "nats")["condition"], "ready", "{code}");
    listener.stop().unwrap();
}

/// A stream whose messages were removed (consumed under work-queue retention, expired,
/// purged) keeps its last sequence number but not the message: the module starts and
/// publishes anyway instead of failing for ever to read that message.
#[test]
fn a_stream_whose_last_message_is_gone_does_not_stop_the_module() {
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path()).unwrap();
    let conf = nats_conf(dir.path(), &server.url(), "");
    let mut listener = start_listener(&slapd, &notifier, &conf);
    let mut admin = slapd.admin().unwrap();
    let before = format!("cn=gone,{BASE}");
    admin.add_role(&before, "gone").unwrap();
    let id = notifier.wait_transaction(&before, 'a', T).unwrap();
    listener.wait_for_id(id, T).unwrap();
    wait_until("the add in the stream", T, || {
        Ok(read_stream(&server.url(), STREAM)
            .unwrap_or_default()
            .iter()
            .any(|m| m.payload["dn"] == before.as_str())
            .then_some(()))
    })
    .unwrap();
    listener.stop().unwrap();
    assert_eq!(outbox_size(dir.path()), 0, "everything acknowledged");
    purge_stream(&server.url(), STREAM).unwrap();

    listener.restart().unwrap();
    let after = format!("cn=after-purge,{BASE}");
    admin.add_role(&after, "after").unwrap();
    let id = notifier.wait_transaction(&after, 'a', T).unwrap();
    listener.wait_for_id(id, T).unwrap();
    let stream = wait_stream(&server.url(), 1);
    assert_eq!(stream[0].payload["dn"], after.as_str(), "{stream:?}");
    listener.stop().unwrap();
}

/// A change whose message the stream refuses by its size fails its call (visible in the
/// log and in the module's status) instead of being published again for ever: the
/// listener goes on, and the next change is exported.
#[test]
fn a_message_too_large_for_the_stream_fails_its_call_and_the_listener_goes_on() {
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path()).unwrap();
    create_stream(&server.url(), STREAM, "udl.>", 4096).unwrap();
    let conf = nats_conf(dir.path(), &server.url(), "create_stream = no\n");
    let mut listener = start_listener(&slapd, &notifier, &conf);
    let mut admin = slapd.admin().unwrap();
    let big = format!("cn=big,{BASE}");
    let description = "x".repeat(8000);
    admin
        .add(
            &big,
            &[
                ("objectClass", &["organizationalRole"]),
                ("cn", &["big"]),
                ("description", &[description.as_str()]),
            ],
        )
        .unwrap();
    let after = format!("cn=after-big,{BASE}");
    admin.add_role(&after, "after").unwrap();
    let id = notifier.wait_transaction(&after, 'a', T).unwrap();
    listener.wait_for_id(id, T).unwrap();
    let stream = wait_until("the later add in the stream", T, || {
        let stream = read_stream(&server.url(), STREAM).unwrap_or_default();
        Ok(stream
            .iter()
            .any(|m| m.payload["dn"] == after.as_str())
            .then_some(stream))
    })
    .unwrap();
    assert!(
        !stream.iter().any(|m| m.payload["dn"] == big.as_str()),
        "{stream:?}"
    );
    assert!(
        listener.log().contains("larger than NATS accepts"),
        "{}",
        listener.log()
    );
    listener.stop().unwrap();
}

/// The jsonl module's lines so far (handler calls, with repeats after crashes).
fn jsonl_lines(listener: &Listener) -> usize {
    std::fs::read(listener.jsonl_path())
        .map(|bytes| bytes.iter().filter(|&&b| b == b'\n').count())
        .unwrap_or(0)
}

/// A small deterministic pseudo-random sequence (the seed is printed to replay a run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

/// `writes` mixed LDAP writes (adds, modifies, renames with moves between two OUs,
/// deletes); returns the DN and command of the last transaction.
fn mixed_writes(admin: &mut Directory, prefix: &str, writes: usize) -> (String, char) {
    for ou in ["ou=n0", "ou=n1"] {
        let dn = format!("{ou},{BASE}");
        admin
            .add(
                &dn,
                &[
                    ("objectClass", &["organizationalUnit"]),
                    ("ou", &[&ou[3..]]),
                ],
            )
            .unwrap();
    }
    let mut live: Vec<String> = Vec::new();
    let mut made = 2;
    let mut i = 0usize;
    let mut last = (String::new(), 'a');
    while made < writes {
        i += 1;
        let op = if live.len() < 5 { 0 } else { i % 10 };
        match op {
            0..=3 => {
                let dn = format!("cn={prefix}{i},ou=n{},{BASE}", i % 2);
                admin.add_role(&dn, &format!("{prefix}{i}")).unwrap();
                last = (dn.clone(), 'a');
                live.push(dn);
            }
            4..=7 => {
                let dn = &live[i % live.len()];
                admin
                    .replace(dn, "description", &[&format!("v{i}")])
                    .unwrap();
                last = (dn.clone(), 'm');
            }
            8 => {
                let at = i % live.len();
                let old = live[at].clone();
                let target = if old.contains(",ou=n0,") { "n1" } else { "n0" };
                let rdn = format!("cn={prefix}m{i}");
                admin
                    .modrdn(&old, &rdn, true, Some(&format!("ou={target},{BASE}")))
                    .unwrap();
                live[at] = format!("{rdn},ou={target},{BASE}");
                last = (live[at].clone(), 'a');
            }
            _ => {
                let dn = live.swap_remove(i % live.len());
                admin.delete(&dn).unwrap();
                last = (dn, 'd');
            }
        }
        made += 1;
    }
    last
}

/// 4,000 mixed changes; the listener is SIGKILLed at 20 random points while it works
/// through them and NATS is restarted twice: the stream holds exactly one message per
/// handler call, in transaction order, none missing.
#[test]
fn sigkills_and_nats_restarts_lose_and_duplicate_nothing() {
    const WRITES: usize = 4000;
    const KILLS: usize = 20;
    let slapd = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut server = NatsServer::start(dir.path()).unwrap();
    // A small outbox: while NATS is away the listener runs ahead only that far, then waits
    // with a full outbox (so the kills still land in the backlog).
    let conf = nats_conf(dir.path(), &server.url(), "outbox_limit = 50\n");
    let mut listener = start_listener(&slapd, &notifier, &conf);
    // Stopped during its initialisation, the module would make a second snapshot.
    wait_both_initialized(&mut listener);
    listener.stop().unwrap();

    let mut admin = slapd.admin().unwrap();
    let (dn, command) = mixed_writes(&mut admin, "k", WRITES);
    let last = notifier.wait_transaction(&dn, command, T).unwrap();

    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill points seed {seed}");
    let mut random = Lcg(seed);
    // Small steps: a kill lands some way after the step is reached, and all KILLS must
    // land before the backlog is done.
    let per_round = (last / (6 * KILLS as u64)).max(2);
    let mut kills = 0;
    for round in 0..KILLS {
        listener.restart().unwrap();
        let before = jsonl_lines(&listener);
        let step = 1 + random.next(per_round * 2) as usize;
        listener
            .wait_until("progress through the backlog", T, |l| {
                // Lines, not parsed changes: parsing a growing file on every poll let the
                // listener run far past the kill point.
                let now = jsonl_lines(l);
                Ok((now >= before + step || l.notifier_id() >= Some(last)).then_some(()))
            })
            .unwrap();
        if listener.notifier_id() >= Some(last) {
            break;
        }
        if round == KILLS / 3 || round == 2 * KILLS / 3 {
            // NATS goes away under the running listener and comes back: a clean
            // restart (a SIGKILL of a single server may lose what it acknowledged last
            // but had not yet written; a cluster covers that, see the next test).
            server.stop().unwrap();
            std::thread::sleep(Duration::from_millis(random.next(1500)));
            server.restart().unwrap();
        }
        listener.kill().unwrap();
        kills += 1;
    }
    eprintln!("{kills} kills");
    assert_eq!(
        kills, KILLS,
        "the backlog was done before every kill landed"
    );
    listener.restart().unwrap();
    listener.wait_for_id(last, T).unwrap();
    let changes = listener.changes().unwrap();
    let expected = jsonl_calls(&changes).len();
    // Fewer calls than writes: a backlog read late collapses (a modify of an object
    // renamed later waits for the rename, an add of an object deleted later is a delete).
    assert!(expected >= WRITES / 2, "only {expected} handler calls");
    let stream = wait_stream(&server.url(), expected);
    assert_exactly_once(&stream, &changes);
    listener.stop().unwrap();
}

/// NATS stops under the running listener, which goes on: the handler returns once a
/// message is in the outbox, so the listener passes transactions whose messages are only
/// there. It is SIGKILLed in that state; after NATS and the listener are back, the outbox
/// is published (without waiting for a new change), every call once, in order.
#[test]
fn a_kill_while_the_outbox_holds_unacknowledged_messages_loses_and_duplicates_nothing() {
    const WRITES: usize = 200;
    let slapd = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut server = NatsServer::start(dir.path()).unwrap();
    // No acknowledgement times out while NATS is away: everything piles up in the outbox.
    let conf = nats_conf(dir.path(), &server.url(), "ack_timeout = 120\n");
    let mut listener = start_listener(&slapd, &notifier, &conf);
    wait_both_initialized(&mut listener);
    let published = wait_stream(&server.url(), 1).len();

    server.stop().unwrap();
    let mut admin = slapd.admin().unwrap();
    let (dn, command) = mixed_writes(&mut admin, "o", WRITES);
    let last = notifier.wait_transaction(&dn, command, T).unwrap();
    listener.wait_for_id(last, T).unwrap();
    let held = outbox_size(dir.path());
    let calls = jsonl_calls(&listener.changes().unwrap()).len();
    assert!(
        held > 0 && calls > published,
        "the listener passed {calls} calls with NATS down, outbox {held} bytes"
    );
    listener.kill().unwrap();

    server.restart().unwrap();
    listener.restart().unwrap();
    let changes = listener.changes().unwrap();
    let stream = wait_stream(&server.url(), jsonl_calls(&changes).len());
    assert_exactly_once(&stream, &changes);
    let added: Vec<&str> = stream
        .iter()
        .filter(|m| m.payload["id"].as_u64() == Some(last))
        .map(|m| m.payload["dn"].as_str().unwrap())
        .collect();
    // A move's two calls can share the last transaction with it, so: among its calls
    // (their number is checked against jsonl above).
    assert!(
        added.contains(&dn.as_str()),
        "the last transaction is there: {added:?}"
    );
    wait_until("the outbox to be emptied", T, || {
        Ok((outbox_size(dir.path()) == 0).then_some(()))
    })
    .unwrap();
    listener.stop().unwrap();
}

/// A 3-node JetStream cluster with a 3-replica stream: one node is killed while the
/// listener publishes; nothing is lost and nothing duplicated.
#[test]
fn a_cluster_node_killed_during_the_run_loses_and_duplicates_nothing() {
    const WRITES: usize = 400;
    let slapd = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = NatsCluster::start().unwrap();
    let conf = nats_conf(dir.path(), &cluster.urls(), "replicas = 3\n");
    let mut listener = start_listener(&slapd, &notifier, &conf);
    // Writes during the nats module's pass would make its snapshot differ from jsonl's.
    wait_both_initialized(&mut listener);

    let mut admin = slapd.admin().unwrap();
    let writer = std::thread::spawn(move || mixed_writes(&mut admin, "c", WRITES));
    listener
        .wait_until("the listener to be under way", T, |l| {
            Ok((l.changes()?.len() >= WRITES / 4).then_some(()))
        })
        .unwrap();
    cluster.servers[0].kill().unwrap();
    let (dn, command) = writer.join().unwrap();
    let last = notifier.wait_transaction(&dn, command, T).unwrap();
    listener.wait_for_id(last, T).unwrap();
    let changes = listener.changes().unwrap();
    let expected = jsonl_calls(&changes).len();
    let survivors = format!("{},{}", cluster.servers[1].url(), cluster.servers[2].url());
    let stream = wait_stream(&survivors, expected);
    assert_exactly_once(&stream, &changes);
    let report = read_replicas(&survivors);
    assert_eq!(report, 3, "the stream was created with 3 replicas");
    listener.stop().unwrap();
}

/// Both modules through their initialisation passes (`wait_initialized` looks at jsonl
/// only; the nats module runs its pass after it).
fn wait_both_initialized(listener: &mut Listener) {
    listener.wait_initialized(T).unwrap();
    listener.wait_modules_ready(&["nats"], T).unwrap();
}

/// The stream's configured replica count.
fn read_replicas(servers: &str) -> usize {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let servers: Vec<&str> = servers.split(',').collect();
        let client = async_nats::connect(servers.as_slice()).await.unwrap();
        let jetstream = async_nats::jetstream::new(client);
        let mut stream = jetstream.get_stream(STREAM).await.unwrap();
        stream.info().await.unwrap().config.num_replicas
    })
}
