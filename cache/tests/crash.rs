//! Crash consistency: a child process commits transactions the way the listener does (entry
//! put + older entry deleted + master record, one batch each, durable every few) and is
//! killed with SIGKILL at an arbitrary moment. After each kill the cache must hold exactly
//! the state of some committed transaction N: the master record says N, the entries are
//! those after N, and N is not older than the last commit that
//! returned, durable or not (a process crash loses no commit: the commit log).
//!
//! The child is this test binary itself, re-executed with `CACHE_CRASH_CHILD_DIR` set (the
//! habit of sled's own crash tests).

// Test helpers outside #[test] functions are not covered by clippy.toml's test exemption.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cache::{Cache, CacheEntry, MasterRecord};

const CHILD_ENV: &str = "CACHE_CRASH_CHILD_DIR";
/// Set in the child of [`a_failed_apply_fails_the_later_commits_and_the_open_replays_it`].
const APPLY_CHILD_ENV: &str = "CACHE_APPLY_CHILD_DIR";
/// Commits between durable ones in the child (default [`DURABLE_EVERY`]).
const DURABLE_ENV: &str = "CACHE_CRASH_DURABLE_EVERY";
/// Each transaction deletes the entry written this many transactions earlier.
const LIVE: u64 = 3;
const DURABLE_EVERY: u64 = 7;

fn entry(id: u64) -> CacheEntry {
    CacheEntry {
        dn: format!("cn=Tx{id},dc=example"),
        attributes: vec![
            ("cn".into(), vec![format!("Tx{id}").into_bytes()]),
            ("entryUUID".into(), vec![format!("uuid-{id}").into_bytes()]),
            // Some bulk, so that commits span more than one collected set now and then.
            (
                "description".into(),
                vec![vec![b'd'; (id % 17 * 300) as usize]],
            ),
        ],
        modules: vec!["replication".into()],
    }
}

/// Runs only inside the child: commits until killed.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let durable_every = std::env::var(DURABLE_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(DURABLE_EVERY);
    let cache = Cache::open(dir.as_ref()).unwrap();
    let mut id = cache.master().unwrap().map_or(0, |m| m.notifier_id);
    let mut out = std::io::stdout().lock();
    loop {
        id += 1;
        let mut b = cache.batch();
        b.put(&entry(id));
        if id > LIVE {
            b.delete(&format!("CN=TX{},DC=EXAMPLE", id - LIVE));
        }
        b.set_master(MasterRecord {
            notifier_id: id,
            schema_id: 1,
        });
        let durable = id.is_multiple_of(durable_every);
        cache.commit(b, durable).unwrap();
        writeln!(out, "committed {id}").unwrap();
        out.flush().unwrap();
    }
}

fn check_consistent(cache: &Cache, min_id: u64) -> u64 {
    let n = cache
        .master()
        .unwrap()
        .expect("a master record")
        .notifier_id;
    assert!(
        n >= min_id,
        "master {n} is older than the commit {min_id} that returned before the kill"
    );
    let first = n.saturating_sub(LIVE - 1).max(1);
    let live: Vec<String> = cache.iter().map(|e| e.unwrap().dn).collect();
    let mut expected: Vec<String> = (first..=n).map(|id| entry(id).dn).collect();
    expected.sort_by_key(|dn| ldap::dn::dn_key(dn));
    assert_eq!(live, expected, "entries after transaction {n}");
    assert_eq!(cache.len(), expected.len());
    for id in first..=n {
        assert_eq!(cache.get(&entry(id).dn).unwrap(), Some(entry(id)));
    }
    for id in [first.saturating_sub(1), n + 1] {
        assert_eq!(cache.get(&entry(id).dn).unwrap(), None);
    }
    n
}

#[test]
fn killed_writer_leaves_a_consistent_cache() {
    kill_rounds(DURABLE_EVERY, 20, |round| (round * 3) % 11);
}

/// As above with few flushes, so thousands of commits are collected in memory (not yet in
/// LMDB) or being applied to LMDB when the kill lands.
#[test]
fn killed_writer_with_commits_collected_in_memory_leaves_a_consistent_cache() {
    kill_rounds(5000, 8, |round| 300 + (round * 997) % 4000);
}

/// Starts the child `rounds` times (flushing every `durable_every` commits) and kills it
/// after `kill_after(round)` + 1 reported commits; checks the cache after each kill.
fn kill_rounds(durable_every: u64, rounds: u64, kill_after: impl Fn(u64) -> u64) {
    let tmp = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut last_master = 0;
    for round in 1..=rounds {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, tmp.path())
            .env(DURABLE_ENV, durable_every.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(id) = line.strip_prefix("committed ") {
                    let _ = tx.send(id.parse::<u64>().unwrap());
                }
            }
        });
        // Kill after a different number of commits each round, so the kill lands at
        // different points of the commit cycle (between flushes, too).
        let mut committed = 0;
        for _ in 0..=kill_after(round) {
            committed = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("the child commits");
        }
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        // Commits the child reported after the ones counted above also count.
        committed = rx.try_iter().fold(committed, u64::max);

        let cache = Cache::open(tmp.path()).unwrap();
        let n = check_consistent(&cache, committed);
        assert!(
            n > last_master,
            "round {round}: no progress past {last_master}"
        );
        last_master = n;
    }
}

/// Runs only inside the child: commits until one fails, with the applier's first set
/// failing (failpoint); reports what it saw.
#[test]
fn apply_child() {
    let Some(dir) = std::env::var_os(APPLY_CHILD_ENV) else {
        return;
    };
    let cache = Cache::open(dir.as_ref()).unwrap();
    let mut id = 0;
    let error = loop {
        id += 1;
        let mut b = cache.batch();
        b.put(&entry(id));
        b.set_master(MasterRecord {
            notifier_id: id,
            schema_id: 1,
        });
        if let Err(e) = cache.commit(b, false) {
            break e;
        }
        assert!(id < 100_000, "no commit failed");
    };
    // What reached neither LMDB nor a later commit is still read back.
    assert_eq!(cache.get(&entry(1).dn).unwrap(), Some(entry(1)));
    // On a line of its own: the test harness has begun one.
    println!("\nfailed {id}: {error}");
}

/// Runs [`apply_child`] with `failpoint` armed at its first hit; the id of the commit that
/// failed and its error.
fn failing_apply(dir: &std::path::Path, failpoint: &str) -> (u64, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "apply_child", "--nocapture", "--test-threads=1"])
        .env(APPLY_CHILD_ENV, dir)
        .env(daemon::failpoint::ENV, format!("{failpoint}=1"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // A cache that waits forever for a set must fail the test, not hang it.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the child still runs after 60 s: a commit waits for the applier");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("failed "))
        .unwrap_or_else(|| panic!("no commit failed: {stdout}"));
    let (failed, error) = line.split_once(": ").unwrap();
    (failed.parse().unwrap(), error.to_owned())
}

/// The reopened cache holds every commit before `failed` and none after.
fn replayed_up_to(dir: &std::path::Path, failed: u64) {
    let cache = Cache::open(dir).unwrap();
    assert!(cache.recovered() > 0);
    assert_eq!(
        cache.master().unwrap().unwrap().notifier_id,
        failed - 1,
        "every commit that returned, none after"
    );
    assert_eq!(cache.len(), failed as usize - 1);
    assert_eq!(cache.get(&entry(1).dn).unwrap(), Some(entry(1)));
}

/// A set the applier cannot write to LMDB fails the commits after it before they are
/// logged (none is reported done while LMDB lacks what came before), and the next open
/// replays the set, and every commit that returned, from the commit log.
#[test]
fn a_failed_apply_fails_the_later_commits_and_the_open_replays_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (failed, error) = failing_apply(tmp.path(), cache::APPLY_FAILPOINT);
    assert!(error.contains("cannot apply commits"), "{error}");
    assert!(error.contains(cache::APPLY_FAILPOINT), "{error}");
    replayed_up_to(tmp.path(), failed);
}

/// A panic of the storage engine on the applier's thread is a failed apply, not a thread
/// gone with its set still marked as on its way (every later wait for it would hang).
#[test]
fn a_panicking_apply_fails_the_later_commits_instead_of_hanging() {
    let tmp = tempfile::tempdir().unwrap();
    let (failed, error) = failing_apply(tmp.path(), cache::APPLY_PANIC_FAILPOINT);
    assert!(error.contains("panicked"), "{error}");
    assert!(error.contains(cache::APPLY_PANIC_FAILPOINT), "{error}");
    replayed_up_to(tmp.path(), failed);
}

/// Set in the child of [`a_torn_append_hides_no_later_commit`].
const APPEND_CHILD_ENV: &str = "CACHE_APPEND_CHILD_DIR";
/// Commits the append child makes; the fifth one's append fails half-way.
const APPEND_COMMITS: u64 = 12;
const TORN: u64 = 5;

/// Runs only inside the child: commits [`APPEND_COMMITS`] transactions while one append
/// fails half-way (failpoint), then ends without closing the cache, as a crash would.
#[test]
fn append_child() {
    let Some(dir) = std::env::var_os(APPEND_CHILD_ENV) else {
        return;
    };
    let cache = Cache::open(dir.as_ref()).unwrap();
    for id in 1..=APPEND_COMMITS {
        let mut b = cache.batch();
        b.put(&entry(id));
        b.set_master(MasterRecord {
            notifier_id: id,
            schema_id: 1,
        });
        let result = cache.commit(b, false);
        assert_eq!(result.is_err(), id == TORN, "commit {id}: {result:?}");
    }
    std::process::exit(0);
}

/// An append that fails part way (a disk full for a moment) leaves no partial record: the
/// replay stops at the first torn record, so one left behind would drop every commit that
/// returned after it.
#[test]
fn a_torn_append_hides_no_later_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "append_child", "--nocapture", "--test-threads=1"])
        .env(APPEND_CHILD_ENV, tmp.path())
        .env(
            daemon::failpoint::ENV,
            format!("{}={TORN}*1", cache::APPEND_FAILPOINT),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let cache = Cache::open(tmp.path()).unwrap();
    assert_eq!(cache.recovered() as u64, APPEND_COMMITS - 1);
    assert_eq!(cache.master().unwrap().unwrap().notifier_id, APPEND_COMMITS);
    assert_eq!(cache.len() as u64, APPEND_COMMITS - 1);
    assert_eq!(cache.get(&entry(TORN).dn).unwrap(), None);
    assert_eq!(
        cache.get(&entry(APPEND_COMMITS).dn).unwrap(),
        Some(entry(APPEND_COMMITS))
    );
}
