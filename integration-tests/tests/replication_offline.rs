//! The `replication` module's offline initialisation end to end: a primary slapd holding a
//! few thousand objects (non-ASCII and binary values, groups), the notifier, and a listener
//! whose module builds an empty replica slapd (run as a daemon with a service script, as
//! systemd runs UCS's) by stopping it, streaming the primary into `slapadd -q` and starting
//! it again; then the directories compare equal with every operational attribute and later
//! writes replicate as usual. Also: a `slapadd` that fails is reported with its standard
//! error and leaves the module uninitialised (retried until the replica is fixed), `auto`
//! falls back to the online path, and a listener killed during the build rebuilds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::compare::Comparison;
use integration_tests::replica_service::{ServiceReplica, sample_directory_ldif};
use integration_tests::slapd::{BASE, SCHEMA_FILES};
use integration_tests::{Listener, ListenerOptions, Notifier, Slapd, SlapdConfig, wait_until};

const WAIT: Duration = Duration::from_secs(120);
const READY: u32 = 2;

fn primary_with(users: usize) -> Slapd {
    let mut primary = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    primary.slapadd(&sample_directory_ldif(users)).unwrap();
    primary
}

fn listener(primary: &Slapd, notifier: &Notifier, config: &Path, env: &[(&str, &str)]) -> Listener {
    let mut options = ListenerOptions::new()
        .jsonl(false)
        .native_module(format!("replication=@{}", config.display()))
        .args(["--init-retry", "1"]);
    for (key, value) in env {
        options = options.env(*key, *value);
    }
    Listener::start(primary, notifier, options).unwrap()
}

/// The listener's view of the primary (host account) against the replica, with `strict`
/// also the attributes a later replicated modify sets differently (entryCSN, modifiers).
fn assert_equal(primary: &Slapd, replica: &ServiceReplica, strict: bool) {
    let mut comparison = Comparison::new();
    if strict {
        for attr in ["entryCSN", "modifiersName", "modifyTimestamp"] {
            comparison = comparison.include(attr);
        }
    }
    let diff = comparison
        .diff(&mut primary.host().unwrap(), &mut replica.admin().unwrap())
        .unwrap();
    assert!(diff.is_none(), "{}", diff.unwrap_or_default());
}

fn count(replica: &ServiceReplica) -> usize {
    replica
        .admin()
        .unwrap()
        .search(BASE, ldap3::Scope::Subtree, "(objectClass=*)", &["1.1"])
        .map(|e| e.len())
        .unwrap_or(0)
}

/// Writes after the build: modifies, adds, a rename and a delete; returns the last DN
/// written (an add).
fn later_writes(primary: &Slapd) -> String {
    let mut admin = primary.admin().unwrap();
    for i in 0..50 {
        admin
            .replace(
                &format!("uid=user{i},ou=people,{BASE}"),
                "description",
                &[&format!("später {i} ✓")],
            )
            .unwrap();
    }
    admin
        .delete_values(
            &format!("cn=group0,ou=groups,{BASE}"),
            "uniqueMember",
            &[&format!("uid=user1,ou=people,{BASE}")],
        )
        .unwrap();
    admin
        .delete(&format!("uid=user2,ou=people,{BASE}"))
        .unwrap();
    admin
        .conn()
        .modifydn(
            &format!("uid=user3,ou=people,{BASE}"),
            "uid=user3b",
            true,
            None,
        )
        .unwrap()
        .success()
        .unwrap();
    let last = format!("cn=after,{BASE}");
    admin.add_role(&last, "after").unwrap();
    last
}

fn schema(with_nis: bool) -> Vec<PathBuf> {
    if with_nis {
        SCHEMA_FILES.iter().map(PathBuf::from).collect()
    } else {
        integration_tests::slapd::schema_without_nis()
    }
}

#[test]
fn an_empty_replica_is_built_offline_and_replication_continues() {
    let primary = primary_with(3_000);
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    let replica = ServiceReplica::start(&primary).unwrap();
    assert_eq!(count(&replica), 0);
    let state = tempfile::tempdir().unwrap();
    let config = replica
        .module_config(state.path(), &primary.ldap_url(), "initialize = offline")
        .unwrap();
    let mut listener = listener(&primary, &notifier, &config, &[]);
    listener.wait_modules_ready(&["replication"], WAIT).unwrap();
    let log = listener.log();
    assert!(
        log.contains("offline initialisation loaded"),
        "{}",
        listener.log_tail(40)
    );
    // Every attribute as the primary has it, the operational ones included.
    assert_equal(&primary, &replica, true);
    assert!(count(&replica) > 3_000);

    let last = later_writes(&primary);
    let id = notifier.wait_transaction(&last, 'a', WAIT).unwrap();
    listener.wait_for_id(id, WAIT).unwrap();
    assert_equal(&primary, &replica, false);
    listener.assert_log_lacks("quarantined");
}

#[test]
fn a_failing_slapadd_is_reported_and_the_module_stays_uninitialised_until_it_succeeds() {
    let primary = primary_with(500);
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    // Without nis.schema the replica cannot hold the posixGroup: slapadd refuses the LDIF.
    let replica = ServiceReplica::start_with_schema(&primary, &schema(false)).unwrap();
    let state = tempfile::tempdir().unwrap();
    let config = replica
        .module_config(state.path(), &primary.ldap_url(), "initialize = offline")
        .unwrap();
    let mut listener = listener(&primary, &notifier, &config, &[]);
    wait_until("the failed offline initialisation", WAIT, || {
        Ok(listener
            .log()
            .contains("offline initialisation failed")
            .then_some(()))
    })
    .unwrap();
    let log = listener.log();
    assert!(log.contains("slapadd -q -f"), "{log}");
    // slapadd's own report (memberUid comes from nis.schema).
    assert!(
        log.contains("str2ad(memberUid): attribute type undefined"),
        "{}",
        listener.log_tail(40)
    );
    assert_ne!(listener.handler_state("replication"), Some(READY));
    // Nothing half-loaded: the replica runs again, empty.
    assert_eq!(count(&replica), 0);

    // Fixed: the listener's retry rebuilds it.
    replica.write_config(&schema(true)).unwrap();
    listener.wait_modules_ready(&["replication"], WAIT).unwrap();
    assert_equal(&primary, &replica, true);
}

#[test]
fn auto_falls_back_to_the_online_path_when_slapadd_fails() {
    let primary = primary_with(300);
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    let replica = ServiceReplica::start(&primary).unwrap();
    let state = tempfile::tempdir().unwrap();
    let config = replica
        .module_config(state.path(), &primary.ldap_url(), "initialize = auto")
        .unwrap();
    // Every build streams a line slapadd cannot parse.
    let mut listener = listener(
        &primary,
        &notifier,
        &config,
        &[("UDR_FAILPOINTS", "replication-offline-ldif=1")],
    );
    listener.wait_modules_ready(&["replication"], WAIT).unwrap();
    let log = listener.log();
    assert!(
        log.contains("offline initialisation failed, initialising online instead"),
        "{}",
        listener.log_tail(40)
    );
    assert!(log.contains("could not parse entry"), "{log}");
    assert_equal(&primary, &replica, false);

    let last = later_writes(&primary);
    let id = notifier.wait_transaction(&last, 'a', WAIT).unwrap();
    listener.wait_for_id(id, WAIT).unwrap();
    assert_equal(&primary, &replica, false);
}

#[test]
fn a_listener_killed_during_the_build_rebuilds_at_its_next_start() {
    let primary = primary_with(5_000);
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    let replica = ServiceReplica::start(&primary).unwrap();
    let state = tempfile::tempdir().unwrap();
    let config = replica
        .module_config(state.path(), &primary.ldap_url(), "initialize = offline")
        .unwrap();
    let mut listener = listener(&primary, &notifier, &config, &[]);
    // Killed while slapadd reads the stream: it sees the end of a half LDIF.
    wait_until("slapadd under way", WAIT, || {
        Ok(listener
            .log()
            .contains("loading with /usr/sbin/slapadd")
            .then_some(()))
    })
    .unwrap();
    listener.kill().unwrap();
    listener.assert_log_lacks("offline initialisation loaded");
    assert_ne!(listener.handler_state("replication"), Some(READY));
    listener.restart().unwrap();
    listener.wait_modules_ready(&["replication"], WAIT).unwrap();
    assert!(listener.log().contains("offline initialisation loaded"));
    assert_equal(&primary, &replica, true);
    let last = later_writes(&primary);
    let id = notifier.wait_transaction(&last, 'a', WAIT).unwrap();
    listener.wait_for_id(id, WAIT).unwrap();
    assert_equal(&primary, &replica, false);
}

#[test]
fn a_failing_stop_command_fails_the_build_and_leaves_the_replica_serving() {
    let primary = primary_with(100);
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    let replica = ServiceReplica::start(&primary).unwrap();
    let state = tempfile::tempdir().unwrap();
    let config = replica
        .module_config(state.path(), &primary.ldap_url(), "initialize = offline")
        .unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    let broken: String = text
        .lines()
        .map(|l| {
            if l.starts_with("slapd_stop") {
                "slapd_stop = echo cannot stop >&2; false".to_owned()
            } else {
                l.to_owned()
            }
        })
        .map(|l| l + "\n")
        .collect();
    std::fs::write(&config, broken).unwrap();
    let listener = listener(&primary, &notifier, &config, &[]);
    wait_until("the failed offline initialisation", WAIT, || {
        Ok(listener
            .log()
            .contains("offline initialisation failed")
            .then_some(()))
    })
    .unwrap();
    let log = listener.log();
    assert!(
        log.contains("slapd_stop") && log.contains("cannot stop"),
        "{log}"
    );
    assert_ne!(listener.handler_state("replication"), Some(READY));
    // Untouched and still serving.
    assert_eq!(count(&replica), 0);
    assert!(replica.admin().is_ok());
}
