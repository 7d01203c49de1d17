//! Crash consistency of the listener: a SIGKILL at a chosen point never leaves state that
//! claims more than what happened.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use integration_tests::slapd::BASE;
use integration_tests::{Listener, ListenerOptions, Notifier, Slapd};

const T: Duration = Duration::from_secs(120);
/// The READY bit of a module state file.
const READY: u32 = 2;

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
    let modules = tempfile::tempdir().unwrap();
    fs::set_permissions(modules.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let record = modules.path().join("slow.calls");
    fs::write(
        modules.path().join("slow.py"),
        format!(
            "import time\n\
             name = 'slow'\n\
             description = 'records its initialisation slowly'\n\
             filter = '(&(objectClass=organizationalRole)(cn=init*))'\n\
             def _record(line):\n\
             \x20   with open({record:?}, 'a') as f:\n\
             \x20       f.write(line + '\\n')\n\
             def initialize():\n\
             \x20   _record('initialize')\n\
             def handler(dn, new, old):\n\
             \x20   time.sleep(0.05)\n\
             \x20   _record(dn)\n",
            record = record.to_str().unwrap()
        ),
    )
    .unwrap();
    let options = ListenerOptions::new().module_dir(modules.path());
    let mut listener = Listener::start(&slapd, &notifier, options).unwrap();
    let calls = || {
        fs::read_to_string(&record)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
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
