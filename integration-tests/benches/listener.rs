//! Listener benchmark (prints figures; not a timed test). Run with `scripts/bench.sh listener`.
//!
//! (a) Backlog catch-up: N mixed LDAP writes (40 % adds of inetOrgPerson users under a few
//!     OUs, 40 % modifies, 10 % modrdn renames + moves, 10 % deletes) made while the listener
//!     is stopped; then the time until it has processed them all, without modules and with
//!     the jsonl module, with a trivial Python module and with the nats module publishing to
//!     a private nats-server (listeners prepared identically; each cache is put back to its
//!     pre-backlog copy between rounds), next to slapd's sequential base-search rate (`*`,
//!     `+`) on the same entries. A transaction costs the listener at least two such reads
//!     (its translog entry and the object): goals jsonl ≥ 0.6 × (search rate ÷ 2) and
//!     ≥ 3,000 tx/s.
//! (b) Module initialization (`-i`, jsonl, into an empty cache) over M entries bulk-loaded
//!     with slapadd, next to a paged `ldapsearch` of the same entries, each the best of three
//!     interleaved runs: goal ≤ 2× ldapsearch.
//! (c) The daemon's RSS with R cached entries after ~1,000 further changes: goal < 100 MB.
//! (d) Subtree move: an OU with D descendants (three levels) renamed; the time from the
//!     write until the listener processed it (every cached descendant re-keyed in one
//!     commit, an `r` + `a` per descendant for the jsonl module), per descendant, and the
//!     daemon's peak RSS: goal < 100 MB.
//!
//! (e) Replica roles: a replica built by the `replication` module (offline with slapadd,
//!     and online) from a primary of E users, and C changes caught up by the listener +
//!     module after the replicas were stopped, each next to an OpenLDAP syncrepl consumer
//!     of the same primary doing the same (full refresh; catch-up until its contextCSN is
//!     the primary's): goals ≤ 1.0 × the consumer's time. The catch-up runs on both of our
//!     replicas: the online-built one is built like the consumer (one write per entry) and
//!     compares like with like; slapadd packs every page full, so the first changes after
//!     an offline build split pages and cost that replica's slapd more.
//!
//! Every timed run also prints the CPU seconds the listener and slapd spent in it, to show
//! where the time goes. Rates are the best of BENCH_ROUNDS rounds (the references too): the
//! machine may be busy with other work.
//!
//! Sizes can be lowered for a quick run: BENCH_BACKLOG=4000 BENCH_INIT=10000 BENCH_RSS=20000
//! BENCH_RSS_CHANGES=1000 BENCH_SEARCHES=8000 BENCH_ROUNDS=1 BENCH_SUBTREE=2000
//! BENCH_REPL_BUILD=5000 BENCH_REPL_CHANGES=2000 (BENCH_REPL_NOSYNC=1 runs both replicas of
//! (e) with `dbnosync`, to show what their fsyncs cost); BENCH_ONLY lists the sections to run
//! (e.g. BENCH_ONLY=bc runs only (b) and (c), BENCH_ONLY=de (d) and (e)). Listeners log at level 2 (UCS's
//! default `listener/debug/level`); BENCH_DEBUG=4 measures them at the harness's test level.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use integration_tests::listener::LISTENER;
use integration_tests::replica_service::{NOSYNC_ENV, ServiceReplica, sample_directory_ldif};
use integration_tests::slapd::{ADMIN_DN, ADMIN_PW, BASE};
use integration_tests::{
    Directory, Intake, Listener, ListenerOptions, Notifier, Process, Slapd, SlapdConfig, wait_until,
};
use ldap3::Mod;

/// LDAP connections writing the backlog in parallel.
const WRITERS: usize = 4;
/// OUs the backlog's users live under (and move between).
const BACKLOG_OUS: usize = 4;
/// OUs the bulk-loaded users are spread over.
const BULK_OUS: usize = 10;
const LONG: Duration = Duration::from_secs(600);

static STARTED: OnceLock<Instant> = OnceLock::new();

/// Called for every object and every delete, like the jsonl module; does almost nothing.
const TRIVIAL_PYTHON_MODULE: &str = "name = 'trivial'\ndescription = 'benchmark'\n\
    filter = '(objectClass=*)'\nhandle_every_delete = True\nmodrdn = '1'\ncalls = 0\n\
    def handler(dn, new, old, command):\n    global calls\n    calls += 1\n";

fn progress(message: impl std::fmt::Display) {
    let secs = STARTED.get_or_init(Instant::now).elapsed().as_secs_f64();
    println!("    [{secs:>6.1}s] {message}");
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    STARTED.get_or_init(Instant::now);
    let backlog_changes = env_usize("BENCH_BACKLOG", 20_000);
    let searches = env_usize("BENCH_SEARCHES", 8_000);
    let init_entries = env_usize("BENCH_INIT", 50_000);
    let rss_entries = env_usize("BENCH_RSS", 100_000).max(init_entries);
    let rss_changes = env_usize("BENCH_RSS_CHANGES", 1_000);
    let rounds = env_usize("BENCH_ROUNDS", 2);
    let debug = env_usize("BENCH_DEBUG", 2).to_string();
    println!(
        "listener benchmark (release build, {} cores, listener -d {debug}, load {})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    let subtree = env_usize("BENCH_SUBTREE", 20_000);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wanted = |part: char| only.is_empty() || only.contains(part);
    if wanted('a') {
        commit_cost(env_usize("BENCH_COMMITS", 20_000));
        backlog(backlog_changes, searches, rounds, &debug);
    }
    if wanted('b') || wanted('c') {
        initialization_and_rss(init_entries, rss_entries, rss_changes, &debug);
    }
    if wanted('d') {
        subtree_move(subtree, &debug);
    }
    if wanted('e') {
        replication(
            env_usize("BENCH_REPL_BUILD", 50_000),
            env_usize("BENCH_REPL_CHANGES", 10_000),
            &debug,
        );
    }
    println!(
        "done in {:.0} s (load {})",
        STARTED.get_or_init(Instant::now).elapsed().as_secs_f64(),
        load_average()
    );
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// (0) What a commit costs now that every commit survives a process crash: the cache
/// commit of one user entry (entry, master record, commit-log record), next to the
/// bare `write(2)` of a record that size and the `fdatasync` per commit it avoids.
fn commit_cost(commits: usize) {
    use std::io::Write as _;
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let cache = cache::Cache::open(&dir.path().join("cache")).unwrap();
    let entry = |i: usize| cache::CacheEntry {
        dn: format!("uid=bench{i},cn=users,dc=example,dc=com"),
        attributes: person(&format!("bench{i}"), i)
            .into_iter()
            .map(|(a, v)| (a.to_owned(), vec![v.into_bytes()]))
            .chain([(
                "entryUUID".to_owned(),
                vec![format!("00000000-0000-0000-0000-{i:012}").into_bytes()],
            )])
            .collect(),
        modules: vec!["jsonl".into()],
    };
    let mut committing = Duration::ZERO;
    let mut syncing = Duration::ZERO;
    let mut syncs = 0u32;
    for i in 0..commits {
        let mut batch = cache.batch();
        batch.put(&entry(i % 1000));
        batch.set_master(cache::MasterRecord {
            notifier_id: i as u64,
            schema_id: 0,
        });
        let started = Instant::now();
        cache.commit(batch, false).unwrap();
        committing += started.elapsed();
        if i % 1000 == 999 {
            let started = Instant::now();
            cache.flush().unwrap();
            syncing += started.elapsed();
            syncs += 1;
        }
    }
    let commit = committing.as_secs_f64() / commits as f64;
    let sync = syncing.as_secs_f64() / f64::from(syncs.max(1));

    let record = vec![b'x'; 700];
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("write-only"))
        .unwrap();
    let started = Instant::now();
    for _ in 0..commits {
        file.write_all(&record).unwrap();
    }
    let write = started.elapsed().as_secs_f64() / commits as f64;
    let fsyncs = 200;
    let started = Instant::now();
    for _ in 0..fsyncs {
        file.write_all(&record).unwrap();
        file.sync_data().unwrap();
    }
    let fsync = started.elapsed().as_secs_f64() / f64::from(fsyncs);
    println!("(0) commit cost, {commits} commits of one user entry");
    println!(
        "    cache commit with commit log   {:8.1} µs per commit (crash-safe for the process)",
        commit * 1e6
    );
    println!(
        "    cache sync (every 1000 / 1 s)  {:8.1} ms per sync  ({:.1} µs per commit)",
        sync * 1e3,
        sync * 1e6 / 1000.0
    );
    println!(
        "    bare write(2) of a record      {:8.1} µs   ({:.0}% of a commit)",
        write * 1e6,
        100.0 * write / commit
    );
    println!(
        "    write + fdatasync per commit   {:8.1} µs   ({:.1}x a commit; avoided)",
        fsync * 1e6,
        fsync / commit
    );
}

fn options(jsonl: bool, debug: &str) -> ListenerOptions {
    ListenerOptions::new().jsonl(jsonl).args(["-d", debug])
}

/// The attributes of benchmark user `i` (about what a plain UCS user carries besides the
/// UCS object classes).
fn person(uid: &str, i: usize) -> Vec<(&'static str, String)> {
    vec![
        ("objectClass", "inetOrgPerson".to_owned()),
        ("uid", uid.to_owned()),
        ("cn", format!("Bench User {i}")),
        ("sn", format!("User{i}")),
        ("givenName", "Bench".to_owned()),
        ("displayName", format!("Bench User {i}")),
        ("mail", format!("{uid}@example.com")),
        ("telephoneNumber", format!("+49 421 {i:07}")),
        ("employeeNumber", i.to_string()),
        ("title", "Engineer".to_owned()),
        ("description", format!("benchmark user {i}")),
    ]
}

fn add_person(dir: &mut Directory, dn: &str, uid: &str, i: usize) {
    let attrs = person(uid, i);
    let attrs: Vec<(&str, [&str; 1])> = attrs
        .iter()
        .map(|(name, value)| (*name, [value.as_str()]))
        .collect();
    let attrs: Vec<(&str, &[&str])> = attrs
        .iter()
        .map(|(name, values)| (*name, &values[..]))
        .collect();
    dir.add(dn, &attrs).unwrap();
}

fn add_ou(dir: &mut Directory, ou: &str) {
    dir.add(
        &format!("ou={ou},{BASE}"),
        &[("objectClass", &["organizationalUnit"]), ("ou", &[ou])],
    )
    .unwrap();
}

fn text_set(value: String) -> HashSet<Vec<u8>> {
    HashSet::from([value.into_bytes()])
}

/// The notifier's last transaction id (`GET_ID`).
fn notifier_last_id(notifier: &Notifier) -> u64 {
    notifier.last_id().unwrap()
}

/// Waits until the notifier's id has not moved for a while, and returns it.
fn settled_id(notifier: &Notifier) -> u64 {
    let mut last = notifier_last_id(notifier);
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_millis(700) {
        std::thread::sleep(Duration::from_millis(50));
        let now = notifier_last_id(notifier);
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    last
}

/// What the backlog writers did, by kind.
struct Mix {
    adds: usize,
    modifies: usize,
    renames: usize,
    deletes: usize,
}

impl Mix {
    fn of(total: usize) -> Mix {
        let adds = total * 4 / 10;
        let modifies = total * 4 / 10;
        let renames = total / 10;
        Mix {
            adds,
            modifies,
            renames,
            deletes: total - adds - modifies - renames,
        }
    }

    fn total(&self) -> usize {
        self.adds + self.modifies + self.renames + self.deletes
    }

    fn ou(i: usize) -> usize {
        (i / WRITERS) % BACKLOG_OUS
    }

    fn dn(i: usize) -> String {
        format!("uid=user{i},ou=bench{},{BASE}", Mix::ou(i))
    }

    fn moved_dn(i: usize) -> String {
        format!(
            "uid=moved{i},ou=bench{},{BASE}",
            (Mix::ou(i) + 1) % BACKLOG_OUS
        )
    }

    /// The users that exist after the backlog, by their final DN.
    fn surviving(&self) -> Vec<String> {
        (0..self.adds)
            .filter_map(|i| {
                if i < self.renames {
                    Some(Mix::moved_dn(i))
                } else if i < self.renames + self.deletes {
                    None
                } else {
                    Some(Mix::dn(i))
                }
            })
            .collect()
    }

    /// Writer `w`'s share: its adds, then modifies, renames (with a move to the next OU)
    /// and deletes. Users `0..renames` are renamed, the next `deletes` deleted.
    fn write(&self, w: usize, mut dir: Directory) {
        assert!(self.renames + self.deletes <= self.adds);
        for i in (w..self.adds).step_by(WRITERS) {
            add_person(&mut dir, &Mix::dn(i), &format!("user{i}"), i);
        }
        for j in (w..self.modifies).step_by(WRITERS) {
            let i = j % self.adds;
            dir.modify(
                &Mix::dn(i),
                vec![
                    Mod::Replace(b"description".to_vec(), text_set(format!("modified {j}"))),
                    Mod::Replace(
                        b"telephoneNumber".to_vec(),
                        text_set(format!("+49 30 {j:07}")),
                    ),
                ],
            )
            .unwrap();
        }
        for i in (w..self.renames).step_by(WRITERS) {
            let superior = format!("ou=bench{},{BASE}", (Mix::ou(i) + 1) % BACKLOG_OUS);
            dir.modrdn(&Mix::dn(i), &format!("uid=moved{i}"), true, Some(&superior))
                .unwrap();
        }
        for i in (self.renames + w..self.renames + self.deletes).step_by(WRITERS) {
            dir.delete(&Mix::dn(i)).unwrap();
        }
    }
}

/// slapd's sequential base-search rate: one connection (the listener's host account),
/// `*` and `+`, one DN after the other.
/// The best of `rounds` passes over `dns` (the machine may be busy with other work).
fn slapd_search_rate(slapd: &Slapd, dns: &[String], rounds: usize) -> Vec<f64> {
    let mut host = slapd.host().unwrap();
    for dn in dns.iter().take(200) {
        host.get(dn).unwrap().unwrap();
    }
    (0..rounds.max(1))
        .map(|_| {
            let start = Instant::now();
            for dn in dns {
                assert!(host.get(dn).unwrap().is_some(), "{dn} is missing");
            }
            dns.len() as f64 / start.elapsed().as_secs_f64()
        })
        .collect()
}

/// The largest value and all values, e.g. `5515 tx/s` and `[5515, 5120]`.
fn best(values: &[f64]) -> (f64, String) {
    let max = values.iter().copied().fold(0.0, f64::max);
    let all: Vec<String> = values.iter().map(|v| format!("{v:.0}")).collect();
    (max, all.join(", "))
}

/// Copies a directory tree (a stopped listener's cache).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Puts a stopped listener's cache back to `snapshot`.
fn restore(listener: &Listener, snapshot: &std::path::Path) {
    std::fs::remove_dir_all(listener.cache_dir()).unwrap();
    copy_dir(snapshot, &listener.cache_dir());
}

/// Where a timed run's time went.
struct Usage {
    wall: Duration,
    /// Until the listener logged its starting transaction (catch-up only).
    startup: Duration,
    /// CPU seconds (user + system) of the listener and of slapd during the run.
    listener_cpu: f64,
    slapd_cpu: f64,
    /// The listener's peak RSS in kB (VmHWM; `-i` runs only).
    peak_kb: u64,
}

impl Usage {
    fn secs(&self) -> f64 {
        self.wall.as_secs_f64()
    }

    fn cpu_line(&self) -> String {
        format!(
            "CPU: listener {:.2} s, slapd {:.2} s in {:.2} s",
            self.listener_cpu,
            self.slapd_cpu,
            self.secs()
        )
    }
}

/// Restarts a stopped listener and waits until it has processed `target`.
fn catch_up(listener: &mut Listener, slapd: &Slapd, target: u64) -> Usage {
    catch_up_until(listener, slapd, target, || true)
}

/// [`catch_up`] that also waits for `done` once the listener is at `target` (the nats
/// module's last acknowledgements: its handler returns before them).
fn catch_up_until(
    listener: &mut Listener,
    slapd: &Slapd,
    target: u64,
    mut done: impl FnMut() -> bool,
) -> Usage {
    let log_before = listener.log().len();
    let slapd_before = cpu_secs(slapd_pid(slapd));
    let start = Instant::now();
    listener.restart().unwrap();
    let mut startup = None;
    loop {
        if listener.notifier_id().is_some_and(|id| id >= target) && done() {
            break;
        }
        if startup.is_none() && listener.log()[log_before..].contains("starting at transaction") {
            startup = Some(start.elapsed());
        }
        assert!(
            listener.is_running(),
            "the listener exited; log ends:\n{}",
            listener.log_tail(40)
        );
        assert!(
            start.elapsed() < LONG,
            "catch-up to {target} timed out at {:?}; log ends:\n{}",
            listener.notifier_id(),
            listener.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let wall = start.elapsed();
    let pid = listener.process().and_then(|p| p.pid()).unwrap();
    Usage {
        wall,
        startup: startup.unwrap_or(wall),
        listener_cpu: cpu_secs(pid),
        slapd_cpu: cpu_secs(slapd_pid(slapd)) - slapd_before,
        peak_kb: status_kb(pid, "VmHWM:"),
    }
}

fn backlog(total: usize, searches: usize, rounds: usize, debug: &str) {
    let mix = Mix::of(total);
    println!(
        "(a) backlog catch-up: {} LDAP writes ({} adds, {} modifies, {} modrdn moves, {} deletes)",
        mix.total(),
        mix.adds,
        mix.modifies,
        mix.renames,
        mix.deletes
    );
    progress("starting slapd (dbnosync) and a notifier following cn=accesslog");
    let slapd = Slapd::start(SlapdConfig::provider().dbnosync(true).log_operations(false)).unwrap();
    let notifier = Notifier::start(&slapd, Intake::Accesslog, &["-d", "1"]).unwrap();
    {
        let mut admin = slapd.admin().unwrap();
        for ou in 0..BACKLOG_OUS {
            add_ou(&mut admin, &format!("bench{ou}"));
        }
    }
    let first = settled_id(&notifier);
    progress(format!(
        "notifier at id {first}; initializing two listeners (no modules / jsonl)"
    ));
    let mut plain = Listener::start(&slapd, &notifier, options(false, debug)).unwrap();
    plain.wait_initialized(LONG).unwrap();
    plain.stop().unwrap();
    let mut jsonl = Listener::start(&slapd, &notifier, options(true, debug)).unwrap();
    jsonl.wait_initialized(LONG).unwrap();
    jsonl.stop().unwrap();
    // A trivial Python module that is called for everything jsonl is called for.
    let python_modules = tempfile::tempdir().unwrap();
    std::fs::write(
        python_modules.path().join("trivial.py"),
        TRIVIAL_PYTHON_MODULE,
    )
    .unwrap();
    let mut python = Listener::start(
        &slapd,
        &notifier,
        options(false, debug).module_dir(python_modules.path()),
    )
    .unwrap();
    python
        .wait_until("the Python module's initialisation", LONG, |l| {
            Ok((l.handler_state("trivial") == Some(3) && l.notifier_id().is_some()).then_some(()))
        })
        .unwrap();
    python.stop().unwrap();
    // The nats module publishing to a private nats-server (JetStream, file store); every
    // round publishes to a stream of its own, so no round is helped by de-duplication.
    let nats_dir = tempfile::tempdir().unwrap();
    let nats_server = integration_tests::NatsServer::start(nats_dir.path()).unwrap();
    let nats_conf = nats_dir.path().join("nats.conf");
    let nats_round = |round: usize| {
        std::fs::write(
            &nats_conf,
            format!(
                "servers = {}\nstream = bench{round}\nsubject_prefix = bench.r{round}\n\
                 state_dir = {}\n",
                nats_server.url(),
                nats_dir.path().join(format!("state{round}")).display()
            ),
        )
        .unwrap();
    };
    nats_round(0);
    let mut nats = Listener::start(
        &slapd,
        &notifier,
        options(false, debug).native_module(format!("nats=@{}", nats_conf.display())),
    )
    .unwrap();
    nats.wait_initialized(LONG).unwrap();
    nats.stop().unwrap();
    let start_id = plain.notifier_id().unwrap();
    assert_eq!(jsonl.notifier_id(), Some(start_id), "listeners start apart");
    assert_eq!(
        python.notifier_id(),
        Some(start_id),
        "listeners start apart"
    );
    assert_eq!(nats.notifier_id(), Some(start_id), "listeners start apart");
    assert_eq!(settled_id(&notifier), start_id, "the notifier moved on");
    let jsonl_lines_before = line_count(&jsonl.jsonl_path());

    progress(format!(
        "both stopped at id {start_id}; writing the backlog over {WRITERS} connections"
    ));
    let write_start = Instant::now();
    let conns: Vec<Directory> = (0..WRITERS).map(|_| slapd.admin().unwrap()).collect();
    std::thread::scope(|scope| {
        for (w, dir) in conns.into_iter().enumerate() {
            let mix = &mix;
            scope.spawn(move || mix.write(w, dir));
        }
    });
    let write_secs = write_start.elapsed().as_secs_f64();
    // At least one transaction per write; a modrdn is two (`r` on the old DN, `a` on the
    // new one), as UCS's translog overlay writes it.
    let at_least = start_id + mix.total() as u64;
    progress(format!(
        "written in {write_secs:.1} s ({:.0} writes/s); waiting for the notifier",
        mix.total() as f64 / write_secs
    ));
    wait_until("the notifier to commit the backlog", LONG, || {
        Ok((notifier_last_id(&notifier) >= at_least).then_some(()))
    })
    .unwrap();
    let target = settled_id(&notifier);
    let transactions = target - start_id;
    progress(format!(
        "notifier at {target} ({transactions} transactions) after {:.1} s",
        write_start.elapsed().as_secs_f64()
    ));

    let surviving = mix.surviving();
    let read: Vec<String> = surviving.iter().take(searches).cloned().collect();
    progress(format!("slapd: {} sequential base searches", read.len()));
    let (search_rate, search_rates) = best(&slapd_search_rate(&slapd, &read, rounds));

    // Both caches as they are before the backlog, so every round starts at `start_id`.
    let plain_snapshot = plain.dir().join("cache.snapshot");
    let jsonl_snapshot = jsonl.dir().join("cache.snapshot");
    let python_snapshot = python.dir().join("cache.snapshot");
    let nats_snapshot = nats.dir().join("cache.snapshot");
    copy_dir(&nats.cache_dir(), &nats_snapshot);
    copy_dir(&plain.cache_dir(), &plain_snapshot);
    copy_dir(&jsonl.cache_dir(), &jsonl_snapshot);
    copy_dir(&python.cache_dir(), &python_snapshot);
    let mut plain_runs = Vec::new();
    let mut jsonl_runs = Vec::new();
    let mut python_runs = Vec::new();
    let mut nats_runs = Vec::new();
    let mut calls = None;
    for round in 1..=rounds.max(1) {
        if round > 1 {
            restore(&plain, &plain_snapshot);
            restore(&jsonl, &jsonl_snapshot);
            restore(&python, &python_snapshot);
            restore(&nats, &nats_snapshot);
        }
        progress(format!("catch-up without modules (round {round})"));
        plain_runs.push(catch_up(&mut plain, &slapd, target));
        plain.stop().unwrap();
        progress(format!("catch-up with the jsonl module (round {round})"));
        jsonl_runs.push(catch_up(&mut jsonl, &slapd, target));
        jsonl.stop().unwrap();
        calls.get_or_insert_with(|| command_counts(&jsonl.jsonl_path(), jsonl_lines_before));
        progress(format!(
            "catch-up with a trivial Python module (round {round})"
        ));
        python_runs.push(catch_up(&mut python, &slapd, target));
        python.stop().unwrap();
        progress(format!("catch-up with the nats module (round {round})"));
        nats_round(round);
        // Until the stream holds every message, as many as jsonl wrote lines.
        let expected = (line_count(&jsonl.jsonl_path()) - jsonl_lines_before) / round;
        let stream = format!("bench{round}");
        nats_runs.push(catch_up_until(&mut nats, &slapd, target, || {
            integration_tests::nats::stream_message_count(&nats_server.url(), &stream)
                .is_ok_and(|count| count as usize >= expected)
        }));
        nats.stop().unwrap();
    }

    let tx = transactions as f64;
    let mut rates = [0.0; 4];
    for (index, (name, runs)) in [
        ("no modules", &plain_runs),
        ("jsonl module", &jsonl_runs),
        ("Python module", &python_runs),
        ("nats module", &nats_runs),
    ]
    .into_iter()
    .enumerate()
    {
        let run = runs.iter().min_by_key(|run| run.wall).unwrap();
        let (rate, all) = best(&runs.iter().map(|r| tx / r.secs()).collect::<Vec<_>>());
        rates[index] = rate;
        println!(
            "    {name:<13}        {rate:>10.0} tx/s  (best of {all}; {:.2} s incl. {:.2} s startup; {}; RSS peak {:.1} MB)",
            run.secs(),
            run.startup.as_secs_f64(),
            run.cpu_line(),
            run.peak_kb as f64 / 1024.0
        );
    }
    let jsonl_rate = rates[1];
    // The backlog is replayed against the directory as it is now (UCS semantics): the add
    // already brings the modified state, so modifies of surviving users call nothing, and
    // every transaction of a user deleted or moved away later becomes a `d` (jsonl has
    // handle_every_delete).
    println!(
        "    jsonl handler calls  {}",
        calls.expect("at least one round")
    );
    println!(
        "    slapd base search    {search_rate:>10.0} reads/s (best of {search_rates}; one connection, host account, * +)"
    );
    println!(
        "    jsonl / (search / 2) {:>10.2}    (goal >= 0.6)",
        jsonl_rate / (search_rate / 2.0)
    );
    println!(
        "    jsonl / 3000 tx/s    {:>10.2}    (goal >= 1)",
        jsonl_rate / 3000.0
    );
    println!(
        "    jsonl / search       {:>10.2}    (goal >= 1.0; tx/s next to base reads/s)",
        jsonl_rate / search_rate
    );
    println!(
        "    Python / jsonl       {:>10.2}    (goal >= 0.8)",
        rates[2] / jsonl_rate
    );
    println!(
        "    nats / jsonl         {:>10.2}    (goal >= 0.8; publishes overlap, outbox write per call)",
        rates[3] / jsonl_rate
    );
}

fn line_count(path: &std::path::Path) -> usize {
    std::fs::read(path)
        .map(|bytes| bytes.iter().filter(|&&b| b == b'\n').count())
        .unwrap_or(0)
}

/// LDIF of `count` users `uid=<prefix><i>` spread over `ou=<prefix>0..`, OUs first.
fn bulk_ldif(prefix: &str, count: usize) -> String {
    users_ldif(prefix, prefix, BASE, BULK_OUS.min(count.max(1)), count)
}

/// LDIF of `ous` OUs `ou=<ou_prefix><n>,<parent>` and `count` users `uid=<uid_prefix><i>`
/// spread over them, OUs first.
fn users_ldif(ou_prefix: &str, uid_prefix: &str, parent: &str, ous: usize, count: usize) -> String {
    let mut ldif = String::with_capacity(count * 400);
    for ou in 0..ous {
        let _ = write!(
            ldif,
            "dn: ou={ou_prefix}{ou},{parent}\nobjectClass: organizationalUnit\nou: {ou_prefix}{ou}\n\n"
        );
    }
    for i in 0..count {
        let uid = format!("{uid_prefix}{i}");
        let _ = writeln!(ldif, "dn: uid={uid},ou={ou_prefix}{},{parent}", i % ous);
        for (name, value) in person(&uid, i) {
            let _ = writeln!(ldif, "{name}: {value}");
        }
        ldif.push('\n');
    }
    ldif
}

/// Runs the listener with its daemon arguments plus `extra` until it exits. Its CPU time and
/// peak RSS are sampled every 20 ms, so the last few milliseconds may be missing.
fn run_sampled(listener: &Listener, slapd: &Slapd, extra: &[&str], log_name: &str) -> Usage {
    let mut args = listener.args().to_vec();
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let log = listener.dir().join(log_name);
    let slapd_before = cpu_secs(slapd_pid(slapd));
    let start = Instant::now();
    let mut process = Process::spawn(LISTENER, &args, &log).unwrap();
    let pid = process.pid().unwrap();
    let mut peak_kb = 0;
    let mut listener_cpu = 0.0;
    let status = loop {
        peak_kb = peak_kb.max(status_kb(pid, "VmHWM:"));
        listener_cpu = cpu_secs(pid).max(listener_cpu);
        if let Some(status) = process.wait_exit(Duration::from_millis(20)).unwrap() {
            break status;
        }
        assert!(start.elapsed() < LONG, "{LISTENER} {extra:?} timed out");
    };
    let wall = start.elapsed();
    assert!(
        status.success(),
        "{LISTENER} {extra:?} failed with {status}; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    Usage {
        wall,
        startup: Duration::ZERO,
        listener_cpu,
        slapd_cpu: cpu_secs(slapd_pid(slapd)) - slapd_before,
        peak_kb,
    }
}

fn ldapsearch(slapd: &Slapd, attrs: &[&str]) -> Usage {
    let slapd_before = cpu_secs(slapd_pid(slapd));
    let start = Instant::now();
    let status = Command::new("ldapsearch")
        .args([
            "-x",
            "-H",
            &slapd.ldap_url(),
            "-D",
            ADMIN_DN,
            "-w",
            ADMIN_PW,
        ])
        .args([
            "-b",
            BASE,
            "-E",
            &format!("pr={}/noprompt", listener::init::PAGE_SIZE),
        ])
        .arg("(objectClass=*)")
        .args(attrs)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "ldapsearch failed: {status}");
    Usage {
        wall: start.elapsed(),
        startup: Duration::ZERO,
        listener_cpu: 0.0,
        slapd_cpu: cpu_secs(slapd_pid(slapd)) - slapd_before,
        peak_kb: 0,
    }
}

/// Rounds of (b)'s -i and of its reference search.
const INIT_ROUNDS: usize = 3;

fn initialization_and_rss(init_entries: usize, rss_entries: usize, changes: usize, debug: &str) {
    println!("(b) module initialization: -i with the jsonl module over {init_entries} entries");
    progress(format!(
        "starting slapd and bulk-loading {init_entries} users"
    ));
    let mut slapd =
        Slapd::start(SlapdConfig::provider().dbnosync(true).log_operations(false)).unwrap();
    let load = Instant::now();
    slapd.slapadd(&bulk_ldif("init", init_entries)).unwrap();
    progress(format!(
        "slapadd took {:.1} s; starting a notifier",
        load.elapsed().as_secs_f64()
    ));
    let mut notifier = Notifier::start(&slapd, Intake::Accesslog, &["-d", "1"]).unwrap();

    ldapsearch(&slapd, &["*", "+"]);
    // Both sides take the best of the same number of rounds, interleaved, so that a busy
    // moment of the machine weighs on neither more than on the other.
    progress(format!(
        "paged ldapsearch and listener -i (after one warm-up search), best of {INIT_ROUNDS} each, interleaved"
    ));
    let mut searches = Vec::new();
    let mut inits = Vec::new();
    for _ in 0..INIT_ROUNDS {
        searches.push(ldapsearch(&slapd, &["*", "+"]));
        // A fresh state directory each round: -i over an empty cache, as on a joining host.
        let listener = Listener::prepare(&slapd, &notifier, options(true, debug)).unwrap();
        let init = run_sampled(&listener, &slapd, &["-i"], "init.log");
        inits.push((init, listener));
    }
    let init_walls: Vec<String> = inits
        .iter()
        .map(|(init, _)| format!("{:.2}", init.secs()))
        .collect();
    let peak_kb = inits.iter().map(|(init, _)| init.peak_kb).max().unwrap();
    let search = searches.into_iter().min_by_key(|run| run.wall).unwrap();
    let (init, listener) = inits.into_iter().min_by_key(|(init, _)| init.wall).unwrap();
    // What the listener's first scan (the DNs, to order parents first) costs on its own.
    let dns = (0..3)
        .map(|_| ldapsearch(&slapd, &["1.1"]))
        .min_by_key(|run| run.wall)
        .unwrap();
    let calls = command_counts(&listener.jsonl_path(), 0);
    println!(
        "    listener -i          {:>10.2} s   ({:.0} entries/s; {}; peak RSS {:.1} MB; runs {} s)",
        init.secs(),
        calls.get('n') as f64 / init.secs(),
        init.cpu_line(),
        peak_kb as f64 / 1024.0,
        init_walls.join(", ")
    );
    println!("    jsonl handler calls  {calls}");
    println!(
        "    paged ldapsearch     {:>10.2} s   (rootdn, -E pr={} as the listener, * +, to /dev/null; slapd CPU {:.2} s)",
        search.secs(),
        listener::init::PAGE_SIZE,
        search.slapd_cpu
    );
    println!(
        "    paged ldapsearch 1.1 {:>10.2} s   (DNs only, as the listener's first scan; slapd CPU {:.2} s)",
        dns.secs(),
        dns.slapd_cpu
    );
    println!(
        "    ratio                {:>10.2}x   (goal <= 2x)",
        init.secs() / search.secs()
    );
    let store = cache_store_alone(&listener.cache_dir());
    println!(
        "    cache store alone    {:>10.2} s   ({:.2}x ldapsearch; CPU {:.2} s: the same {} entries written into an empty cache as -i writes them, nothing else)",
        store.0,
        store.0 / search.secs(),
        store.1,
        store.2
    );
    drop(listener);

    println!("(c) listener RSS with {rss_entries} cached entries after {changes} further changes");
    let more = rss_entries - init_entries;
    progress(format!("bulk-loading {more} more users"));
    notifier.stop().unwrap();
    slapd.slapadd(&bulk_ldif("more", more)).unwrap();
    notifier.restart().unwrap();
    let mut listener = Listener::prepare(
        &slapd,
        &notifier,
        options(false, debug).native_module("jsonl=/dev/null"),
    )
    .unwrap();
    progress(format!("listener -i over {rss_entries} entries"));
    let init = run_sampled(&listener, &slapd, &["-i"], "init.log");
    progress(format!(
        "-i took {:.1} s (peak RSS {:.1} MB); starting the daemon",
        init.secs(),
        init.peak_kb as f64 / 1024.0
    ));
    listener.restart().unwrap();
    let start_id = listener.wait_initialized(LONG).unwrap();
    let start_id = start_id.max(settled_id(&notifier));
    listener.wait_for_id(start_id, LONG).unwrap();
    let pid = listener.process().and_then(|p| p.pid()).unwrap();
    let idle_rss = status_kb(pid, "VmRSS:");
    progress(format!(
        "daemon at id {start_id} (VmRSS {:.1} MB); writing {changes} changes",
        idle_rss as f64 / 1024.0
    ));
    {
        let mut admin = slapd.admin().unwrap();
        for j in 0..changes {
            // Spread over the whole directory, so the touched cache entries are too.
            let i = (j * 7919) % rss_entries;
            let (prefix, k) = if i < init_entries {
                ("init", i)
            } else {
                ("more", i - init_entries)
            };
            admin
                .replace(
                    &format!("uid={prefix}{k},ou={prefix}{},{BASE}", k % BULK_OUS),
                    "description",
                    &[&format!("changed {j}")],
                )
                .unwrap();
        }
    }
    let target = start_id + changes as u64;
    let written = Instant::now();
    listener.wait_for_id(target, LONG).unwrap();
    progress(format!(
        "processed up to {target} ({:.2} s after the last write)",
        written.elapsed().as_secs_f64()
    ));
    let rss = status_kb(pid, "VmRSS:");
    let hwm = status_kb(pid, "VmHWM:");
    let cache_kb = dir_size(&listener.cache_dir()) / 1024;
    println!(
        "    daemon VmRSS         {:>10.1} MB   (goal < 64 MB; anonymous {:.1} MB, file pages {:.1} MB)",
        rss as f64 / 1024.0,
        status_kb(pid, "RssAnon:") as f64 / 1024.0,
        status_kb(pid, "RssFile:") as f64 / 1024.0
    );
    println!(
        "    daemon VmHWM         {:>10.1} MB   (goal < 100 MB)",
        hwm as f64 / 1024.0
    );
    println!(
        "    -i peak RSS          {:>10.1} MB   (goal < 100 MB; {rss_entries} entries in {:.1} s; {})",
        init.peak_kb as f64 / 1024.0,
        init.secs(),
        init.cpu_line()
    );
    println!(
        "    cache on disk        {:>10.1} MB",
        cache_kb as f64 / 1024.0
    );
    listener.stop().unwrap();
    notifier.stop().unwrap();
}

/// (d) An OU with `users` users below ten sub-OUs is renamed while the daemon runs with the
/// jsonl module (which opts in to subtree moves): time per descendant and peak RSS.
fn subtree_move(users: usize, debug: &str) {
    const SUB_OUS: usize = 10;
    let descendants = users + SUB_OUS;
    println!("(d) subtree move: an OU with {descendants} descendants renamed (jsonl opted in)");
    progress(format!(
        "starting slapd and bulk-loading {descendants} descendants"
    ));
    let mut slapd =
        Slapd::start(SlapdConfig::provider().dbnosync(true).log_operations(false)).unwrap();
    let old = format!("ou=big,{BASE}");
    let mut ldif = format!("dn: {old}\nobjectClass: organizationalUnit\nou: big\n\n");
    ldif.push_str(&users_ldif("sub", "big", &old, SUB_OUS, users));
    slapd.slapadd(&ldif).unwrap();
    let mut notifier = Notifier::start(&slapd, Intake::Accesslog, &["-d", "1"]).unwrap();
    let mut listener = Listener::prepare(&slapd, &notifier, options(true, debug)).unwrap();
    progress("listener -i");
    run_sampled(&listener, &slapd, &["-i"], "init.log");
    listener.restart().unwrap();
    let start_id = listener.wait_initialized(LONG).unwrap();
    let start_id = start_id.max(settled_id(&notifier));
    listener.wait_for_id(start_id, LONG).unwrap();
    let pid = listener.process().and_then(|p| p.pid()).unwrap();
    let idle_rss = status_kb(pid, "VmRSS:");
    let skip = line_count(&listener.jsonl_path());
    progress("renaming the OU");
    let mut admin = slapd.admin().unwrap();
    let cpu_before = cpu_secs(pid);
    let written = Instant::now();
    admin.modrdn(&old, "ou=big2", true, None).unwrap();
    listener.wait_for_id(start_id + 2, LONG).unwrap();
    let secs = written.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid) - cpu_before;
    let calls = command_counts(&listener.jsonl_path(), skip);
    println!(
        "    move processed       {secs:>10.2} s   ({:.1} us per descendant; listener CPU {cpu:.2} s)",
        secs * 1e6 / descendants as f64
    );
    println!("    jsonl handler calls  {calls}");
    println!(
        "    daemon VmRSS         {:>10.1} MB   (before the move {:.1} MB)",
        status_kb(pid, "VmRSS:") as f64 / 1024.0,
        idle_rss as f64 / 1024.0
    );
    println!(
        "    daemon VmHWM         {:>10.1} MB   (goal < 100 MB)",
        status_kb(pid, "VmHWM:") as f64 / 1024.0
    );
    listener.stop().unwrap();
    notifier.stop().unwrap();
}

/// Handler calls in a jsonl file after its first `skip` lines, by command.
struct Calls(std::collections::BTreeMap<char, usize>);

impl Calls {
    fn get(&self, command: char) -> usize {
        self.0.get(&command).copied().unwrap_or(0)
    }
}

impl std::fmt::Display for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: usize = self.0.values().sum();
        write!(f, "{total:>10}")?;
        let parts: Vec<String> = self.0.iter().map(|(c, n)| format!("{c} {n}")).collect();
        if !parts.is_empty() {
            write!(f, "      ({})", parts.join(", "))?;
        }
        Ok(())
    }
}

fn command_counts(path: &std::path::Path, skip: usize) -> Calls {
    const KEY: &str = r#""command":""#;
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut counts = std::collections::BTreeMap::new();
    for line in text.lines().skip(skip) {
        if let Some(at) = line.find(KEY)
            && let Some(command) = line[at + KEY.len()..].chars().next()
        {
            *counts.entry(command).or_insert(0) += 1;
        }
    }
    Calls(counts)
}

/// User + system CPU seconds of a process so far (0 when gone).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: state is the first, utime the 12th.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf only reads a configuration value.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / per_sec as f64
}

fn slapd_pid(slapd: &Slapd) -> u32 {
    std::fs::read_to_string(slapd.dir().join("slapd.pid"))
        .ok()
        .and_then(|pid| pid.trim().parse().ok())
        .expect("slapd.pid")
}

/// A `kB` line of /proc/<pid>/status (0 when gone).
fn status_kb(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn dir_size(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_size(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

/// (e) Replica roles against OpenLDAP's own replication, on one primary in one run: the
/// build of a replica of `build` users (plus their groups) by the listener's `replication`
/// module (offline with slapadd, and online with one add per object) next to a syncrepl
/// consumer's full refresh; then `changes` writes made while both replicas were stopped,
/// caught up by the listener + module (until its id reaches the notifier's) next to the
/// consumer (until its contextCSN equals the primary's, polled every 20 ms). Both replicas
/// are [`ServiceReplica`]s with the same configuration. Goals: ≤ 1.0 × the consumer's time.
fn replication(build: usize, changes: usize, debug: &str) {
    println!(
        "(e) replica build of {build} users and catch-up of {changes} changes: listener + \
         replication module vs an OpenLDAP syncrepl consumer{} (load {})",
        if std::env::var_os(NOSYNC_ENV).is_some() {
            ", both replicas with dbnosync"
        } else {
            ""
        },
        load_average()
    );
    progress(format!(
        "starting the primary and bulk-loading {build} users"
    ));
    let mut primary =
        Slapd::start(SlapdConfig::provider().dbnosync(true).log_operations(false)).unwrap();
    primary.slapadd(&sample_directory_ldif(build)).unwrap();
    let notifier = Notifier::start(&primary, Intake::Accesslog, &["-d", "1"]).unwrap();
    // What the listener's host account sees (the consumer, bound as the admin, also copies
    // the one restricted entry).
    let entries = entry_count(&mut primary.host().unwrap());

    progress("syncrepl consumer: full refresh");
    let start = Instant::now();
    let consumer = ServiceReplica::start_syncrepl_consumer(&primary).unwrap();
    wait_consumer(&primary, &consumer);
    let refresh = start.elapsed();
    let consumer_cpu = cpu_secs(service_pid(&consumer));
    println!(
        "    syncrepl full refresh {:>9.2} s   ({:.0} entries/s; consumer slapd CPU {consumer_cpu:.2} s)",
        refresh.as_secs_f64(),
        entries as f64 / refresh.as_secs_f64()
    );
    let mut built = Vec::new();
    for mode in ["offline", "online"] {
        progress(format!("listener + replication module: {mode} build"));
        let state = tempfile::tempdir_in("/var/tmp").unwrap();
        let replica = ServiceReplica::start(&primary).unwrap();
        let config = replica
            .module_config(
                state.path(),
                &primary.ldap_url(),
                &format!("initialize = {mode}"),
            )
            .unwrap();
        let start = Instant::now();
        let mut listener = Listener::start(
            &primary,
            &notifier,
            options(false, debug)
                .native_module(format!("replication=@{}", config.display()))
                .args(["--init-retry", "1"]),
        )
        .unwrap();
        listener.wait_modules_ready(&["replication"], LONG).unwrap();
        let took = start.elapsed();
        let pid = listener.process().and_then(|p| p.pid()).unwrap();
        let loaded = entry_count(&mut replica.admin().unwrap());
        assert_eq!(
            loaded, entries,
            "{mode} build: {loaded} of {entries} entries"
        );
        println!(
            "    {mode:<7} build        {:>9.2} s   ({:.0} entries/s; {:.2} × syncrepl; listener CPU {:.2} s, replica slapd CPU {:.2} s; load {})",
            took.as_secs_f64(),
            entries as f64 / took.as_secs_f64(),
            took.as_secs_f64() / refresh.as_secs_f64(),
            cpu_secs(pid),
            cpu_secs(service_pid(&replica)),
            load_average()
        );
        built.push((mode, listener, replica, state));
    }
    // The same listener without any module: what the catch-up costs before replication.
    let mut bare = Listener::start(&primary, &notifier, options(false, debug)).unwrap();
    bare.wait_initialized(LONG).unwrap();

    progress(format!(
        "both replicas stopped; {changes} writes on the primary"
    ));
    for (_, listener, _, _) in &mut built {
        listener.stop().unwrap();
    }
    bare.stop().unwrap();
    consumer.service("stop").unwrap();
    let writing = Instant::now();
    replica_writes(&primary, build, changes);
    let target = settled_id(&notifier);
    progress(format!(
        "writes took {:.1} s; target id {target}",
        writing.elapsed().as_secs_f64()
    ));

    let primary_cpu = cpu_secs(slapd_pid(&primary));
    let start = Instant::now();
    consumer.service("start").unwrap();
    wait_consumer(&primary, &consumer);
    let theirs = start.elapsed();
    // A fresh process: all its CPU time is the catch-up's.
    println!(
        "    syncrepl catch-up     {:>9.2} s   ({:.0} changes/s; consumer slapd CPU {:.2} s, primary CPU {:.2} s)",
        theirs.as_secs_f64(),
        changes as f64 / theirs.as_secs_f64(),
        cpu_secs(service_pid(&consumer)),
        cpu_secs(slapd_pid(&primary)) - primary_cpu
    );
    let alone = catch_up(&mut bare, &primary, target);
    println!(
        "    listener, no module   {:>9.2} s   ({:.0} changes/s; {:.2} × syncrepl; {})",
        alone.secs(),
        changes as f64 / alone.secs(),
        alone.secs() / theirs.as_secs_f64(),
        alone.cpu_line()
    );
    // The online-built replica first: built like the consumer (one write per entry), so
    // its pages are as full as the consumer's. slapadd packs every page, so the first
    // changes after an offline build split pages and cost that replica more.
    built.reverse();
    for (mode, listener, replica, _state) in &mut built {
        let replica_cpu = cpu_secs(service_pid(replica));
        let primary_cpu = cpu_secs(slapd_pid(&primary));
        let ours = catch_up(listener, &primary, target);
        println!(
            "    listener catch-up, {mode}-built replica {:>6.2} s   ({:.0} changes/s; {:.2} × syncrepl; {}, replica slapd {:.2} s, primary {:.2} s; load {})",
            ours.secs(),
            changes as f64 / ours.secs(),
            ours.secs() / theirs.as_secs_f64(),
            ours.cpu_line(),
            cpu_secs(service_pid(replica)) - replica_cpu,
            cpu_secs(slapd_pid(&primary)) - primary_cpu,
            load_average()
        );
    }
}

/// What the cache's store costs `-i` on its own: every entry of the cache in `dir` written
/// into an empty cache the way initialisation writes them (new entries, a commit per
/// 1,000, a durable one at the end). Wall and CPU seconds, and the number of entries.
fn cache_store_alone(dir: &std::path::Path) -> (f64, f64, usize) {
    // As the listener's process.
    cache::bound_heap();
    let entries: Vec<cache::CacheEntry> = {
        let filled = cache::Cache::open(dir).unwrap();
        filled.iter().map(Result::unwrap).collect()
    };
    let scratch = tempfile::tempdir_in("/var/tmp").unwrap();
    let empty = cache::Cache::open(&scratch.path().join("cache")).unwrap();
    let (start, cpu) = (Instant::now(), cpu_secs(std::process::id()));
    for chunk in entries.chunks(1000) {
        let mut batch = empty.batch();
        for entry in chunk {
            batch.put_new(entry);
        }
        empty.commit(batch, false).unwrap();
    }
    empty.commit(empty.batch(), true).unwrap();
    (
        start.elapsed().as_secs_f64(),
        cpu_secs(std::process::id()) - cpu,
        entries.len(),
    )
}

fn entry_count(dir: &mut Directory) -> usize {
    dir.search(BASE, ldap3::Scope::Subtree, "(objectClass=*)", &["1.1"])
        .unwrap()
        .len()
}

/// Waits until the consumer's contextCSN equals the primary's.
fn wait_consumer(primary: &Slapd, consumer: &ServiceReplica) {
    let mut admin = primary.admin().unwrap();
    let wanted = admin
        .get(BASE)
        .unwrap()
        .and_then(|e| e.first("contextCSN").map(str::to_owned))
        .expect("the primary's contextCSN");
    let start = Instant::now();
    while consumer.context_csn().as_deref() != Some(wanted.as_str()) {
        assert!(
            start.elapsed() < LONG,
            "the syncrepl consumer never caught up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn service_pid(replica: &ServiceReplica) -> u32 {
    std::fs::read_to_string(replica.dir().join("slapd.pid"))
        .ok()
        .and_then(|pid| pid.trim().parse().ok())
        .expect("slapd.pid")
}

/// `total` writes from [`WRITERS`] connections: 70 % modifies of the sample users, 20 %
/// adds, 10 % deletes of those adds.
fn replica_writes(primary: &Slapd, users: usize, total: usize) {
    let per = total.div_ceil(WRITERS);
    std::thread::scope(|scope| {
        for w in 0..WRITERS {
            scope.spawn(move || {
                let mut admin = primary.admin().unwrap();
                for j in (w * per)..((w + 1) * per).min(total) {
                    match j % 10 {
                        7 | 8 => {
                            let uid = format!("repl{j}");
                            add_person(&mut admin, &format!("uid={uid},ou=people,{BASE}"), &uid, j);
                        }
                        9 => admin
                            .delete(&format!("uid=repl{},ou=people,{BASE}", j - 2))
                            .unwrap(),
                        _ => admin
                            .replace(
                                &format!("uid=user{},ou=people,{BASE}", j % users.max(1)),
                                "description",
                                &[&format!("Änderung {j}")],
                            )
                            .unwrap(),
                    }
                }
            });
        }
    });
}
