//! Crash consistency of the listener: a SIGKILL at a chosen point never leaves state that
//! claims more than what happened.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::time::Duration;

use integration_tests::slapd::BASE;
use integration_tests::{Listener, ListenerOptions, Notifier, Slapd};

const T: Duration = Duration::from_secs(120);
/// The READY bit of a module state file.
const READY: u32 = 2;

/// A Python module `slow` that records `initialize` and every handled DN in `slow.calls`
/// next to itself, 50 ms per object, for the `cn=init*` roles.
fn slow_module() -> tempfile::TempDir {
    integration_tests::listener::module_dir(
        "slow.py",
        "import os, time\n\
         name = 'slow'\n\
         description = 'records its initialisation slowly'\n\
         filter = '(&(objectClass=organizationalRole)(cn=init*))'\n\
         def _record(line):\n\
         \x20   with open(os.path.join(os.path.dirname(__file__), 'slow.calls'), 'a') as f:\n\
         \x20       f.write(line + '\\n')\n\
         def initialize():\n\
         \x20   _record('initialize')\n\
         def handler(dn, new, old):\n\
         \x20   time.sleep(0.05)\n\
         \x20   _record(dn)\n",
    )
    .unwrap()
}

fn recorded_calls(record: &std::path::Path) -> Vec<String> {
    fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A module killed in the middle of its initialisation is not marked ready: it is
/// initialised again at the next start and then has seen every object.
#[test]
fn a_crash_during_initialisation_initialises_again() {
    const OBJECTS: usize = 40;
    let slapd = Slapd::provider().unwrap();
    let mut admin = slapd.admin().unwrap();
    let dns: Vec<String> = (0..OBJECTS).map(|i| format!("cn=init{i},{BASE}")).collect();
    for (i, dn) in dns.iter().enumerate() {
        admin.add_role(dn, &format!("init{i}")).unwrap();
    }
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    let modules = slow_module();
    let record = modules.path().join("slow.calls");
    let options = ListenerOptions::new().module_dir(modules.path());
    let mut listener = Listener::start(&slapd, &notifier, options).unwrap();
    let calls = || recorded_calls(&record);
    integration_tests::wait_until("the initialisation to be under way", T, || {
        Ok((calls().len() > 10).then_some(()))
    })
    .unwrap();
    listener.kill().unwrap();
    let seen_before = calls().len() - 1;
    assert!(
        seen_before < OBJECTS,
        "the first pass finished before the kill"
    );
    let state = listener.handler_state("slow").unwrap_or(0);
    assert_eq!(
        state & READY,
        0,
        "a module killed after {seen_before} of {OBJECTS} objects is marked ready (state {state})"
    );

    listener.restart().unwrap();
    listener
        .wait_until("the module to be initialised again", T, |l| {
            Ok((l.handler_state("slow") == Some(3)).then_some(()))
        })
        .unwrap();
    let calls = calls();
    let passes: Vec<usize> = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| *c == "initialize")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(passes.len(), 2, "{calls:?}");
    let mut second: Vec<&str> = calls[passes[1] + 1..].iter().map(String::as_str).collect();
    second.sort_unstable();
    let mut expected: Vec<&str> = dns.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(second, expected);
    listener.stop().unwrap();
}

/// A module reset by removing its state file and reloaded with SIGHUP is initialised
/// again; killed in the middle of that pass, it is not ready on disk either (the reload
/// must not write the old ready state back), so the next start initialises it once more.
#[test]
fn a_crash_during_an_initialisation_after_a_reload_initialises_again() {
    const OBJECTS: usize = 40;
    let slapd = Slapd::provider().unwrap();
    let mut admin = slapd.admin().unwrap();
    for i in 0..OBJECTS {
        admin
            .add_role(&format!("cn=init{i},{BASE}"), &format!("init{i}"))
            .unwrap();
    }
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    let modules = slow_module();
    let record = modules.path().join("slow.calls");
    let options = ListenerOptions::new().module_dir(modules.path());
    let mut listener = Listener::start(&slapd, &notifier, options).unwrap();
    listener.wait_modules_ready(&["slow"], T).unwrap();
    let first_pass = recorded_calls(&record).len();

    fs::remove_file(listener.cache_dir().join("handlers/slow")).unwrap();
    listener.signal(libc::SIGHUP).unwrap();
    integration_tests::wait_until("the second initialisation to be under way", T, || {
        Ok((recorded_calls(&record).len() > first_pass + 10).then_some(()))
    })
    .unwrap();
    listener.kill().unwrap();
    assert!(
        recorded_calls(&record).len() < 2 * first_pass,
        "the second pass finished before the kill"
    );
    let state = listener.handler_state("slow").unwrap_or(0);
    assert_eq!(
        state & READY,
        0,
        "killed mid-pass, marked ready (state {state})"
    );

    listener.restart().unwrap();
    listener.wait_modules_ready(&["slow"], T).unwrap();
    let passes = recorded_calls(&record)
        .iter()
        .filter(|c| *c == "initialize")
        .count();
    assert_eq!(passes, 3);
    listener.stop().unwrap();
}

/// Killed with SIGKILL again and again while it works off a backlog, the listener re-runs
/// at most the one transaction that was in flight per crash: every commit survives a
/// process crash. The cascade file (`-o`) records every transaction the listener completes
/// in order, written right before its commit, so a re-run shows as an id written again.
#[test]
fn repeated_sigkills_rerun_at_most_the_transaction_in_flight() {
    const WRITES: usize = 600;
    const KILLS: usize = 20;
    let slapd =
        integration_tests::Slapd::start(integration_tests::SlapdConfig::provider().dbnosync(true))
            .unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    let mut listener = Listener::start(
        &slapd,
        &notifier,
        ListenerOptions::new()
            .arg("-o")
            .postrun_delay(Duration::from_secs(60)),
    )
    .unwrap();
    listener.wait_initialized(T).unwrap();
    let dn = format!("cn=backlog,{BASE}");
    let mut admin = slapd.admin().unwrap();
    admin.add_role(&dn, "backlog").unwrap();
    let first = notifier.wait_transaction(&dn, 'a', T).unwrap();
    listener.wait_for_id(first, T).unwrap();
    listener.stop().unwrap();
    for i in 0..WRITES {
        admin
            .replace(&dn, "description", &[&format!("v{i}")])
            .unwrap();
    }
    let last = first + WRITES as u64;
    integration_tests::wait_until("the backlog at the notifier", T, || {
        Ok((notifier.last_id().unwrap() >= last).then_some(()))
    })
    .unwrap();

    let cascade = listener.ldap_dir().join("listener/listener");
    let ids = || -> Vec<u64> {
        fs::read_to_string(&cascade)
            .unwrap_or_default()
            .lines()
            .map(|l| l.split_once(' ').unwrap().0.parse().unwrap())
            .collect()
    };
    let mut kill_points = Vec::new();
    for kill in 0..KILLS {
        listener.restart().unwrap();
        let before = ids().len();
        let progressed = listener
            .wait_until("progress through the backlog", T, |_| {
                let now = ids();
                Ok((now.len() >= before + 10 || now.last() == Some(&last)).then_some(now.len()))
            })
            .unwrap();
        if ids().last() == Some(&last) {
            eprintln!("backlog done after {kill} kills");
            break;
        }
        listener.kill().unwrap();
        kill_points.push(ids().len());
        assert!(progressed > before);
    }
    listener.restart().unwrap();
    listener.wait_for_id(last, T).unwrap();
    let ids = ids();
    assert!(
        kill_points.len() >= 10,
        "only {} kills landed",
        kill_points.len()
    );
    for (k, &at) in kill_points.iter().enumerate() {
        let seen_max = ids[..at].iter().copied().max().unwrap_or(0);
        let next = kill_points.get(k + 1).copied().unwrap_or(ids.len());
        let reruns = ids[at..next].iter().filter(|&&id| id <= seen_max).count();
        assert!(
            reruns <= 1,
            "crash {k} re-ran {reruns} transactions (ids {:?})",
            &ids[at..(at + 5).min(next)]
        );
    }
    let done: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
    assert!(
        (first + 1..=last).all(|id| done.contains(&id)),
        "a transaction never completed"
    );
    listener.stop().unwrap();
}

/// A cache flush that fails (as an fsync with a write-back error does) ends the listener
/// with status 1 instead of running on while nothing becomes durable. The failure is
/// injected with a failpoint (debug builds).
#[test]
fn a_failed_cache_flush_stops_the_listener() {
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    let options = ListenerOptions::new().env(daemon::failpoint::ENV, "cache-flush=1");
    let mut listener = Listener::start(&slapd, &notifier, options).unwrap();
    listener.wait_initialized(T).unwrap();
    slapd
        .admin()
        .unwrap()
        .add_role(&format!("cn=flushfail,{BASE}"), "flushfail")
        .unwrap();
    let status = integration_tests::wait_until("the listener to stop", T, || {
        Ok(listener.process().and_then(|p| p.try_status()))
    })
    .unwrap();
    assert_eq!(status.code(), Some(1), "{}", listener.log_tail(20));
    assert!(
        listener.log().contains("cache flush failed"),
        "{}",
        listener.log_tail(20)
    );
}
