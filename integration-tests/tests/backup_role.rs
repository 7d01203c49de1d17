//! The DC Backup role end to end (issue 14 item 1, spec replication.md §B.6): a Primary
//! (slapd + notifier), a Backup (replica slapd with accesslog and translog, a listener with
//! the native replication module and cascade output `-o`, its own notifier reading that
//! cascade) and a Replica listener following the Backup's notifier. The Backup's notifier
//! serves exactly the Primary's transactions, and its cascade waits while the local slapd
//! lacks a change (quarantine), released by retry or skip.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use integration_tests::hosts::{
    Backup, ctrl, host_comparison, mixed_writes, start_primary, start_replica,
    wait_same_transactions,
};
use integration_tests::slapd::BASE;
use integration_tests::{Directory, ListenerOptions, Notifier, wait_until};

const WAIT: Duration = Duration::from_secs(120);

fn backup_options() -> ListenerOptions {
    // A Backup's machine account reads everything, as the admin here.
    ListenerOptions::new().jsonl(false).bind_admin()
}

#[test]
fn a_backup_serves_the_primarys_ids_and_its_replicas_follow_it() {
    let (primary, notifier) = start_primary(WAIT).unwrap();
    let mut backup = Backup::start(&primary, &notifier, |c| c, backup_options(), WAIT).unwrap();
    let mut replica = start_replica(
        &primary,
        backup.slapd(),
        &backup.notifier,
        ListenerOptions::new(),
        WAIT,
    )
    .unwrap();

    let last = mixed_writes(&mut primary.admin().unwrap(), "mixed", 20, &mut || {}).unwrap();
    let id = notifier.wait_transaction(&last, 'd', WAIT).unwrap();
    wait_same_transactions(&notifier, &backup.notifier, WAIT).unwrap();
    replica.listener.wait_for_id(id, WAIT).unwrap();

    // The Replica saw every transaction of the Primary once, in order, with its ids.
    let seen: Vec<(u64, String)> = replica
        .listener
        .changes()
        .unwrap()
        .into_iter()
        .filter(|c| c.dn.contains("ou=mixed"))
        .map(|c| (c.id, c.dn.to_lowercase()))
        .collect();
    let logged: Vec<(u64, String)> = notifier
        .transactions()
        .lines()
        .filter(|l| l.contains("ou=mixed"))
        .map(|l| {
            let (id, rest) = l.split_once(' ').unwrap();
            let dn = rest.rsplit_once(' ').unwrap().0;
            (id.parse().unwrap(), dn.to_lowercase())
        })
        .collect();
    assert!(logged.len() > 40, "{logged:?}");
    // A modify the Replica reads after a later one collapses into it (no difference left
    // to report), so the Replica sees a subsequence: in order, each id once, the last one
    // included.
    let mut ids: Vec<u64> = seen.iter().map(|s| s.0).collect();
    ids.dedup();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(
        ids.iter().all(|id| logged.iter().any(|l| l.0 == *id)),
        "{ids:?} not all in {logged:?}"
    );
    assert_eq!(ids.last(), Some(&id));
    host_comparison().check(&primary, backup.slapd()).unwrap();
    // The Replica's machine account cannot see the restricted subtree.
    host_comparison()
        .skip_subtree(integration_tests::slapd::RESTRICTED_DN)
        .check(&primary, &replica.slapd)
        .unwrap();
    let (healthy, status) = ctrl(backup.listener(), &notifier, &["status"]).unwrap();
    assert!(healthy, "{status}");
}

fn posix_group(admin: &mut Directory, cn: &str) -> String {
    let dn = format!("cn={cn},{BASE}");
    admin
        .add(
            &dn,
            &[
                ("objectClass", &["posixGroup"]),
                ("cn", &[cn]),
                ("gidNumber", &["5000"]),
            ],
        )
        .unwrap();
    // Queued behind the refused add.
    admin.replace(&dn, "gidNumber", &["5001"]).unwrap();
    dn
}

fn quarantined_ids(backup: &mut Backup, notifier: &Notifier) -> Vec<u64> {
    let (ok, list) = ctrl(backup.listener(), notifier, &["quarantine", "list"]).unwrap();
    assert!(ok, "{list}");
    let records: Vec<serde_json::Value> = serde_json::from_str(list.trim()).unwrap();
    records.iter().map(|r| r["id"].as_u64().unwrap()).collect()
}

/// The gate: a change the Backup's slapd refused holds back its transaction and every
/// later one from the Backup's notifier (status, log), until the quarantine is empty. A
/// skip releases them too (the id space must stay the Primary's), and the local LDAP then
/// lacks the skipped object for good; a retry after the schema is fixed releases them with
/// the change applied.
#[test]
fn the_cascade_waits_while_the_backup_lacks_a_change() {
    let (primary, notifier) = start_primary(WAIT).unwrap();
    let without_nis = integration_tests::slapd::schema_without_nis();
    let mut backup = Backup::start(
        &primary,
        &notifier,
        move |mut c| {
            c.schema = without_nis;
            c
        },
        backup_options(),
        WAIT,
    )
    .unwrap();
    let mut admin = primary.admin().unwrap();
    admin
        .add_role(&format!("cn=before,{BASE}"), "before")
        .unwrap();
    wait_same_transactions(&notifier, &backup.notifier, WAIT).unwrap();

    // Skip: the held transactions reach the Backup's notifier without the change.
    let skipped = posix_group(&mut admin, "skipped");
    let after = format!("cn=after1,{BASE}");
    admin.add_role(&after, "after1").unwrap();
    let after_id = notifier.wait_transaction(&after, 'a', WAIT).unwrap();
    backup.listener().wait_for_id(after_id, WAIT).unwrap();
    let held = quarantined_ids(&mut backup, &notifier);
    assert!(held.len() >= 2, "{held:?}");
    let first = held[0];
    assert!(backup.notifier.last_id().unwrap() < first);
    let (healthy, status) = ctrl(backup.listener(), &notifier, &["status"]).unwrap();
    assert!(!healthy, "{status}");
    assert!(
        status.contains(&format!(
            "cascade held back: {} transaction(s) from id {first}",
            after_id - first + 1
        )),
        "{status}"
    );
    assert!(backup.listener().log().contains(&format!(
        "cascade: transaction {first} and every later one are held back"
    )));
    // Still held after a restart of the listener (the held lines are on disk).
    backup.listener().restart().unwrap();
    wait_until("the restarted listener's control socket", WAIT, || {
        Ok(ctrl(backup.listener(), &notifier, &["status"])?
            .1
            .contains("cascade held back")
            .then_some(()))
    })
    .unwrap();
    assert!(backup.notifier.last_id().unwrap() < first);
    for id in &held {
        let (ok, answer) = ctrl(
            backup.listener(),
            &notifier,
            &["quarantine", "skip", &id.to_string()],
        )
        .unwrap();
        assert!(ok, "{answer}");
    }
    wait_same_transactions(&notifier, &backup.notifier, WAIT).unwrap();
    assert!(
        backup
            .slapd()
            .admin()
            .unwrap()
            .get(&skipped)
            .unwrap()
            .is_none()
    );
    wait_until("a healthy Backup listener", WAIT, || {
        Ok(ctrl(backup.listener(), &notifier, &["status"])?
            .0
            .then_some(()))
    })
    .unwrap();

    // Retry: the change is applied first, then its transaction is announced.
    let retried = posix_group(&mut admin, "retried");
    let after = format!("cn=after2,{BASE}");
    admin.add_role(&after, "after2").unwrap();
    let after_id = notifier.wait_transaction(&after, 'a', WAIT).unwrap();
    backup.listener().wait_for_id(after_id, WAIT).unwrap();
    let held = quarantined_ids(&mut backup, &notifier);
    assert!(backup.notifier.last_id().unwrap() < held[0]);
    backup
        .host
        .slapd
        .reconfigure(|c| {
            c.schema = integration_tests::slapd::SCHEMA_FILES
                .iter()
                .map(PathBuf::from)
                .collect()
        })
        .unwrap();
    let (ok, answer) = ctrl(backup.listener(), &notifier, &["quarantine", "retry"]).unwrap();
    assert!(ok, "{answer}");
    wait_same_transactions(&notifier, &backup.notifier, WAIT).unwrap();
    assert!(
        backup
            .slapd()
            .admin()
            .unwrap()
            .get(&retried)
            .unwrap()
            .is_some()
    );
    assert!(backup.listener().log().contains("held transaction(s)"));
}
