//! Promotion without renumbering (issue 14): three hosts on loopback. A Primary (slapd +
//! notifier), a Backup (replica slapd, replicating listener with cascade, its own notifier)
//! and a Replica (jsonl + replication) following the Primary. Mixed writes; the Primary's
//! slapd and notifier SIGKILLed; `univention-directory-backup2master --execute` on the
//! Backup (also SIGKILLed after every step once and run again); the Replica repointed;
//! mixed writes on the new Primary. Ids continue without reuse or gap, the Replica sees
//! every transaction at most once and in order, its LDAP equals the new Primary's, and no
//! module was initialised again. Refusals: an old Primary that still answers, a Backup
//! with a quarantine, a listener pointed at a notifier whose ids went backwards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use integration_tests::hosts::{
    Backup, backup2master, ctrl, host_comparison, mixed_writes, restart_as_primary, start_primary,
    start_replica, wait_same_transactions,
};
use integration_tests::slapd::{BASE, RESTRICTED_DN};
use integration_tests::{Intake, Listener, ListenerOptions, Notifier, Slapd, wait_until};

const WAIT: Duration = Duration::from_secs(120);
const STEPS: [&str; 6] = [
    "stop-listener",
    "release-held",
    "drain-cascade",
    "switch-intake",
    "set-ucr",
    "restart-services",
];

/// `(id, line)` of a notifier's transaction log.
fn journal(notifier: &Notifier) -> Vec<(u64, String)> {
    notifier
        .transactions()
        .lines()
        .map(|l| (l.split_once(' ').unwrap().0.parse().unwrap(), l.to_owned()))
        .collect()
}

fn backup_of(primary: &Slapd, notifier: &Notifier) -> Backup {
    Backup::start(
        primary,
        notifier,
        |c| c,
        ListenerOptions::new().jsonl(false).bind_admin(),
        WAIT,
    )
    .unwrap()
}

/// After a write: waits until `notifier` numbered it and `listener` handled it.
fn pace<'a>(notifier: &'a Notifier, listener: &'a mut Listener) -> impl FnMut() + 'a {
    let mut known = journal(notifier).len();
    move || {
        let (count, id) = wait_until("the write at the notifier", WAIT, || {
            let now = journal(notifier);
            Ok((now.len() > known).then(|| (now.len(), now[now.len() - 1].0)))
        })
        .unwrap();
        known = count;
        listener.wait_for_id(id, WAIT).unwrap();
    }
}

fn promote(kill_each_step: bool) {
    let (mut primary, mut notifier) = start_primary(WAIT).unwrap();
    let mut backup = backup_of(&primary, &notifier);
    let mut replica =
        start_replica(&primary, &primary, &notifier, ListenerOptions::new(), WAIT).unwrap();
    let states = replica.listener.handler_states();

    // Paced: the Replica handles every write before the next one, so each becomes a
    // handler call of its own (a modify read after a later one would collapse into it).
    let last = mixed_writes(
        &mut primary.admin().unwrap(),
        "before",
        15,
        &mut pace(&notifier, &mut replica.listener),
    )
    .unwrap();
    let last_id = notifier.wait_transaction(&last, 'd', WAIT).unwrap();
    wait_same_transactions(&notifier, &backup.notifier, WAIT).unwrap();
    replica.listener.wait_for_id(last_id, WAIT).unwrap();
    let old_journal = journal(&notifier);
    let (old_ldap, old_notifier) = (primary.port(), notifier.port());

    // The Primary dies.
    primary.kill().unwrap();
    notifier.kill().unwrap();

    // The administrator stops the Backup's listener (--no-restart), rehearses, promotes.
    backup.listener().stop().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let (code, plan) =
        backup2master(&backup, old_ldap, old_notifier, logs.path(), &[], None).unwrap();
    assert_eq!(code, Some(0), "{plan}");
    assert!(plan.contains("rehearsal only: nothing changed"), "{plan}");
    assert!(
        plan.contains(&format!(
            "last id heard from the old Primary: {last_id}; local notifier: {last_id}; behind: 0"
        )),
        "{plan}"
    );
    eprintln!("--- rehearsal ---\n{plan}");
    // The README shows this rehearsal: its plan lines are the tool's.
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let section = &readme[readme.find("### Replacing the Primary").unwrap()..];
    let shown: Vec<&str> = section
        .lines()
        .skip_while(|l| !l.starts_with("checks:"))
        .take_while(|l| !l.starts_with("```"))
        .filter(|l| l.contains("[todo]") || l.starts_with("plan (") || l.contains("ok: the"))
        .collect();
    assert!(shown.len() >= 9, "{shown:?}");
    for line in shown {
        let line = line.split(" at 127.0.0.1:").next().unwrap();
        assert!(
            plan.contains(line),
            "README line {line:?} not in the rehearsal:\n{plan}"
        );
    }
    if kill_each_step {
        for step in STEPS {
            let (code, out) = backup2master(
                &backup,
                old_ldap,
                old_notifier,
                logs.path(),
                &["--execute"],
                Some(step),
            )
            .unwrap();
            assert_eq!(code, None, "not killed after {step}: {out}");
            assert!(out.contains(&format!("killed after {step}")), "{out}");
        }
    }
    let (code, out) = backup2master(
        &backup,
        old_ldap,
        old_notifier,
        logs.path(),
        &["--execute"],
        None,
    )
    .unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("the next write gets id {}", last_id + 1)),
        "{out}"
    );
    let log = std::fs::read_to_string(logs.path().join("backup2master.log")).unwrap();
    for step in STEPS {
        assert_eq!(
            log.matches(&format!("step {step}: done")).count(),
            1,
            "{log}"
        );
    }
    // Run once more: nothing left to do.
    let (code, again) = backup2master(
        &backup,
        old_ldap,
        old_notifier,
        logs.path(),
        &["--execute"],
        None,
    )
    .unwrap();
    assert_eq!(code, Some(0), "{again}");
    assert!(!again.contains("step "), "{again}");
    restart_as_primary(&mut backup).unwrap();

    // The Replica follows the new Primary from where it stopped.
    let log_before = replica.listener.log().len();
    replica.listener.repoint(backup.slapd(), &backup.notifier);
    replica.listener.restart().unwrap();

    let last = mixed_writes(
        &mut backup.slapd().admin().unwrap(),
        "after",
        15,
        &mut pace(&backup.notifier, &mut replica.listener),
    )
    .unwrap();
    let new_last = backup.notifier.wait_transaction(&last, 'd', WAIT).unwrap();
    replica.listener.wait_for_id(new_last, WAIT).unwrap();

    // Ids: the old Primary's, then consecutive, and only the new writes got new ids.
    let new_journal = journal(&backup.notifier);
    assert_eq!(new_journal[..old_journal.len()], old_journal[..]);
    let ids: Vec<u64> = new_journal.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..=new_last).collect::<Vec<_>>());
    assert!(
        new_journal[old_journal.len()..]
            .iter()
            .all(|(_, line)| line.contains("after")),
        "a replicated write was numbered again: {:?}",
        &new_journal[old_journal.len()..]
    );
    // The Replica: every write exactly once, in order, across the promotion. Its jsonl
    // holds one call per transaction with the transaction's command (a move's `a` also
    // brings the moved object's modify, at the same id).
    let changes: Vec<(u64, char)> = replica
        .listener
        .changes()
        .unwrap()
        .iter()
        .filter(|c| c.id > 0)
        .map(|c| (c.id, c.command))
        .collect();
    assert!(changes.windows(2).all(|w| w[0].0 <= w[1].0), "{changes:?}");
    let mut ids: Vec<u64> = changes.iter().map(|c| c.0).collect();
    ids.dedup();
    assert_eq!(ids, (1..=new_last).collect::<Vec<_>>());
    for (id, line) in &new_journal {
        let command = line.chars().last().unwrap();
        let calls = changes.iter().filter(|c| **c == (*id, command)).count();
        assert_eq!(calls, 1, "transaction {line}: {calls} calls in {changes:?}");
    }
    host_comparison()
        .skip_subtree(RESTRICTED_DN)
        .check(backup.slapd(), &replica.slapd)
        .unwrap();
    let (healthy, status) = ctrl(&replica.listener, &backup.notifier, &["status"]).unwrap();
    assert!(healthy, "{status}");
    // No module initialised again.
    let after_log = &replica.listener.log()[log_before..];
    assert!(!after_log.contains("initializing module"), "{after_log}");
    assert_eq!(replica.listener.handler_states(), states);
}

#[test]
fn a_backup_is_promoted_and_the_ids_continue() {
    promote(false);
}

#[test]
fn a_promotion_killed_after_every_step_completes_when_run_again() {
    promote(true);
}

#[test]
fn an_answering_old_primary_or_a_quarantine_refuses_the_promotion() {
    let (primary, notifier) = start_primary(WAIT).unwrap();
    let without_nis = integration_tests::slapd::schema_without_nis();
    let mut backup = Backup::start(
        &primary,
        &notifier,
        move |mut c| {
            c.schema = without_nis;
            c
        },
        ListenerOptions::new().jsonl(false).bind_admin(),
        WAIT,
    )
    .unwrap();
    let logs = tempfile::tempdir().unwrap();
    let run = |backup: &Backup, extra: &[&str]| {
        backup2master(
            backup,
            primary.port(),
            notifier.port(),
            logs.path(),
            extra,
            None,
        )
        .unwrap()
    };
    let (code, out) = run(&backup, &["--execute"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("still answers"), "{out}");
    assert!(out.contains("REFUSED"), "{out}");
    assert!(
        !backup
            .notifier
            .ldap_dir()
            .join("backup2master.state")
            .exists()
    );

    // A quarantined change on the Backup refuses it too, even with the old Primary gone.
    let mut admin = primary.admin().unwrap();
    let group = format!("cn=posix,{BASE}");
    admin
        .add(
            &group,
            &[
                ("objectClass", &["posixGroup"]),
                ("cn", &["posix"]),
                ("gidNumber", &["5000"]),
            ],
        )
        .unwrap();
    let id = notifier.wait_transaction(&group, 'a', WAIT).unwrap();
    backup.listener().wait_for_id(id, WAIT).unwrap();
    let (code, out) = backup2master(&backup, 1, 1, logs.path(), &["--execute"], None).unwrap();
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("change(s) in the replication quarantine"),
        "{out}"
    );
    assert!(out.contains("cascade line(s) from id"), "{out}");
    assert!(
        !backup
            .notifier
            .ldap_dir()
            .join("backup2master.state")
            .exists()
    );
    let _ = ctrl(backup.listener(), &notifier, &["status"]).unwrap();
}

#[test]
fn a_listener_refuses_a_notifier_whose_ids_went_backwards() {
    let (primary, notifier) = start_primary(WAIT).unwrap();
    let mut listener =
        integration_tests::Listener::start(&primary, &notifier, ListenerOptions::new()).unwrap();
    listener.wait_initialized(WAIT).unwrap();
    let last = mixed_writes(&mut primary.admin().unwrap(), "w", 3, &mut || {}).unwrap();
    let id = notifier.wait_transaction(&last, 'd', WAIT).unwrap();
    listener.wait_for_id(id, WAIT).unwrap();
    let states = listener.handler_states();

    // A notifier that has numbered only two transactions.
    let behind = Notifier::start(&primary, Intake::QueueFile, &["--no-translog"]).unwrap();
    behind
        .queue(&format!("1 cn=x,{BASE} a\n2 cn=y,{BASE} a\n"))
        .unwrap();
    wait_until("the second notifier at id 2", WAIT, || {
        Ok((behind.last_id()? == 2).then_some(()))
    })
    .unwrap();
    let log_before = listener.log().len();
    listener.repoint(&primary, &behind);
    listener.restart().unwrap();
    wait_until("the refusal in the status", WAIT, || {
        let (healthy, status) = ctrl(&listener, &behind, &["status"])?;
        Ok(
            (!healthy && status.contains(&format!("has last id 2, below this listener's id {id}")))
                .then_some(status),
        )
    })
    .unwrap();
    assert!(listener.is_running());
    assert_eq!(listener.notifier_id(), Some(id));
    let after = &listener.log()[log_before..];
    assert!(!after.contains("initializing module"), "{after}");
    assert_eq!(listener.handler_states(), states);

    // Pointed back at the right notifier, it goes on.
    listener.repoint(&primary, &notifier);
    listener.restart().unwrap();
    let last = mixed_writes(&mut primary.admin().unwrap(), "v", 3, &mut || {}).unwrap();
    let id = notifier.wait_transaction(&last, 'd', WAIT).unwrap();
    listener.wait_for_id(id, WAIT).unwrap();
}

/// A Backup that lagged when the Primary died: the rehearsal says how many transactions
/// it heard announced but does not hold (they would be lost), from what the listener
/// recorded when it stopped.
#[test]
fn the_rehearsal_reports_what_a_lagging_backup_lacks() {
    let (mut primary, mut notifier) = start_primary(WAIT).unwrap();
    let mut backup = backup_of(&primary, &notifier);
    let mut admin = primary.admin().unwrap();
    admin
        .add_role(&format!("cn=first,{BASE}"), "first")
        .unwrap();
    wait_same_transactions(&notifier, &backup.notifier, WAIT).unwrap();
    let held = backup.notifier.last_id().unwrap();

    // The Backup's slapd stops: its listener waits on the first change it cannot write.
    backup.host.slapd.stop(Duration::from_secs(10)).unwrap();
    for i in 0..3 {
        admin
            .add_role(&format!("cn=late{i},{BASE}"), "late")
            .unwrap();
    }
    let last = notifier
        .wait_transaction(&format!("cn=late2,{BASE}"), 'a', WAIT)
        .unwrap();
    wait_until("the Backup's listener to wait on its slapd", WAIT, || {
        let (_, status) = ctrl(backup.listener(), &notifier, &["status"])?;
        Ok(status.contains("unavailable").then_some(()))
    })
    .unwrap();
    primary.kill().unwrap();
    notifier.kill().unwrap();
    backup.listener().stop().unwrap();
    backup.host.slapd.restart().unwrap();

    let logs = tempfile::tempdir().unwrap();
    let (code, plan) = backup2master(&backup, 1, 1, logs.path(), &[], None).unwrap();
    assert_eq!(code, Some(0), "{plan}");
    let line = plan
        .lines()
        .find(|l| l.contains("last id heard from the old Primary"))
        .unwrap();
    let heard: u64 = line
        .split("Primary: ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(heard > held && heard <= last, "{plan}");
    assert!(
        line.contains(&format!("behind: {} transaction(s) (lost", heard - held)),
        "{plan}"
    );
}

/// With UCS's translog overlay (`--intake file`) the intake stays the queue file and the
/// overlay's `last_id` is set to the last id, so slapd's next write gets last id + 1.
#[test]
fn a_promotion_for_the_translog_overlay_sets_its_last_id() {
    let (mut primary, mut notifier) = start_primary(WAIT).unwrap();
    let mut backup = backup_of(&primary, &notifier);
    let last = mixed_writes(&mut primary.admin().unwrap(), "t", 3, &mut || {}).unwrap();
    let last_id = notifier.wait_transaction(&last, 'd', WAIT).unwrap();
    wait_same_transactions(&notifier, &backup.notifier, WAIT).unwrap();
    let (old_ldap, old_notifier) = (primary.port(), notifier.port());
    primary.kill().unwrap();
    notifier.kill().unwrap();
    backup.listener().stop().unwrap();
    // A stale value from before, as a Backup may have.
    let last_id_file = backup.notifier.ldap_dir().join("last_id");
    std::fs::write(&last_id_file, "3").unwrap();
    let logs = tempfile::tempdir().unwrap();
    let (code, out) = backup2master(
        &backup,
        old_ldap,
        old_notifier,
        logs.path(),
        &["--execute", "--intake", "file"],
        None,
    )
    .unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        std::fs::read_to_string(&last_id_file).unwrap(),
        last_id.to_string()
    );
    assert!(
        !backup
            .notifier
            .ldap_dir()
            .join("notify/accesslog.position")
            .exists()
    );
    let ucr = std::fs::read_to_string(backup.notifier.ucr_file()).unwrap();
    for line in [
        "server/role: domaincontroller_master",
        "ldap/server/type: master",
        "ldap/master: 127.0.0.1",
        "notifier/intake: file",
    ] {
        assert!(ucr.contains(line), "{ucr}");
    }
    // What slapd's overlay appends next is numbered on, by the same notifier.
    backup
        .notifier
        .queue(&format!("{} cn=next,{BASE} a\n", last_id + 1))
        .unwrap();
    wait_until("the notifier to number the overlay's line", WAIT, || {
        Ok((backup.notifier.last_id()? == last_id + 1).then_some(()))
    })
    .unwrap();
}
