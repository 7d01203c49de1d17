//! `univention-translog` subcommands that talk to LDAP, against a real notifier's log and
//! real slapd: ldap, stat, prune (file and cn=translog), import, and the lock refusal.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};
use std::time::Duration;

use integration_tests::process::binary;
use integration_tests::slapd::{BASE, TRANSLOG_BASE};
use integration_tests::{Intake, Notifier, Slapd, wait_until};
use ldap3::Scope;

fn translog(notifier: &Notifier, slapd: &Slapd, args: &[&str]) -> Output {
    Command::new(binary("univention-translog").unwrap())
        .arg("-T")
        .arg(notifier.transaction_file())
        .arg("-H")
        .arg(slapd.ldapi_url())
        .args(args)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn translog_ids(slapd: &Slapd) -> Vec<u64> {
    let mut root = slapd.root().unwrap();
    let mut ids: Vec<u64> = root
        .search(
            TRANSLOG_BASE,
            Scope::OneLevel,
            "(reqSession=*)",
            &["reqSession"],
        )
        .unwrap()
        .iter()
        .map(|e| e.first("reqSession").unwrap().parse().unwrap())
        .collect();
    ids.sort();
    ids
}

#[test]
fn ldap_stat_prune_and_import_against_real_slapd() {
    let slapd = Slapd::provider().unwrap();
    let mut notifier = Notifier::start(&slapd, Intake::QueueFile, &[]).unwrap();
    let lines: String = (1..=10)
        .map(|i| format!("{i} cn=n{i},{BASE} m\n"))
        .collect();
    notifier.queue(&lines).unwrap();
    wait_until("10 transactions", Duration::from_secs(20), || {
        Ok((notifier.transactions().lines().count() == 10).then_some(()))
    })
    .unwrap();

    // Read-only subcommands work while the notifier runs.
    let out = translog(&notifier, &slapd, &["ldap", "3"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), format!("tid=3 dn=cn=n3,{BASE} command=m\n"));
    let out = translog(&notifier, &slapd, &["stat"]);
    let stat = stdout(&out);
    assert!(stat.contains("Translog.last: 10"), "{stat}");
    assert!(stat.contains("Ldap.last: 10"), "{stat}");
    let missing = translog(&notifier, &slapd, &["ldap", "99"]);
    assert_eq!(missing.status.code(), Some(1));

    // Rewriting the log is refused while the daemon holds it.
    let refused = translog(
        &notifier,
        &slapd,
        &["prune", "6", "--role", "domaincontroller_master"],
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("stop it first"),
        "{refused:?}"
    );

    notifier.stop().unwrap();
    let out = translog(
        &notifier,
        &slapd,
        &["prune", "6", "--role", "domaincontroller_master"],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        notifier.transactions().lines().next().unwrap(),
        format!("6 cn=n6,{BASE} m")
    );
    assert_eq!(translog_ids(&slapd), (6..=10).collect::<Vec<_>>());

    // Drop cn=translog entirely and backfill it from the file.
    let mut root = slapd.root().unwrap();
    for id in 6..=10 {
        root.delete(&format!("reqSession={id},{TRANSLOG_BASE}"))
            .unwrap();
    }
    root.delete(TRANSLOG_BASE).unwrap();
    let out = translog(&notifier, &slapd, &["import"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(translog_ids(&slapd), (6..=10).collect::<Vec<_>>());
    let again = translog(&notifier, &slapd, &["--lenient", "import"]);
    assert!(again.status.success(), "{again:?}");

    // The notifier accepts the pruned log and keeps counting.
    notifier.restart().unwrap();
    notifier.queue(&format!("11 cn=n11,{BASE} a\n")).unwrap();
    wait_until("transaction 11", Duration::from_secs(20), || {
        Ok(notifier
            .transactions()
            .ends_with(&format!("11 cn=n11,{BASE} a\n"))
            .then_some(()))
    })
    .unwrap();
    let mut client = notifier.client().unwrap();
    client.handshake(2).unwrap();
    assert_eq!(
        client.request(1, "GET_DN 7").unwrap(),
        format!("MSGID: 1\n7 cn=n7,{BASE} m\n\n")
    );
}
