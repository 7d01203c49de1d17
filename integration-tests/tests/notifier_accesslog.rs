//! The notifier following stock OpenLDAP's cn=accesslog: every logged write becomes exactly
//! one transaction (modrdn: `r` + `a`), across restarts and crashes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use integration_tests::slapd::{BASE, RESTRICTED_DN, TRANSLOG_BASE};
use integration_tests::{Intake, Notifier, Slapd, SlapdConfig, wait_until};

const T: Duration = Duration::from_secs(30);

fn wait_for_lines(notifier: &Notifier, count: usize) -> Vec<String> {
    wait_until(&format!("{count} transactions in the log"), T, || {
        let lines: Vec<String> = notifier.transactions().lines().map(str::to_owned).collect();
        Ok((lines.len() >= count).then_some(lines))
    })
    .unwrap()
}

fn add(slapd: &Slapd, cn: &str) {
    slapd
        .admin()
        .unwrap()
        .add_role(&format!("cn={cn},{BASE}"), cn)
        .unwrap();
}

#[test]
fn writes_map_to_transactions_in_log_order() {
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    // Writes before the first start (the fixture's adds) are not replayed.
    let mut admin = slapd.admin().unwrap();
    let dn = format!("cn=alice,{BASE}");
    admin.add_role(&dn, "alice").unwrap();
    admin.replace(&dn, "description", &["x"]).unwrap();
    admin.modrdn(&dn, "cn=alice2", true, None).unwrap();
    let renamed = format!("cn=alice2,{BASE}");
    admin
        .modrdn(&renamed, "cn=alice3", true, Some(RESTRICTED_DN))
        .unwrap();
    let moved = format!("cn=alice3,{RESTRICTED_DN}");
    admin.delete(&moved).unwrap();
    // A failed write is not logged as a change.
    assert!(admin.delete(&format!("cn=missing,{BASE}")).is_err());

    let lines = wait_for_lines(&notifier, 7);
    assert_eq!(
        lines,
        [
            format!("1 {dn} a"),
            format!("2 {dn} m"),
            format!("3 {dn} r"),
            format!("4 {renamed} a"),
            format!("5 {renamed} r"),
            format!("6 {moved} a"),
            format!("7 {moved} d"),
        ]
    );
    let mut host = slapd.host().unwrap();
    let entry = host
        .get(&format!("reqSession=6,{TRANSLOG_BASE}"))
        .unwrap()
        .unwrap();
    assert_eq!(entry.first("reqType"), Some("a"));
    assert_eq!(entry.first("reqDN"), Some(moved.as_str()));
}

#[test]
fn first_start_can_replay_the_retained_log() {
    let slapd = Slapd::provider().unwrap();
    add(&slapd, "early");
    let notifier = Notifier::following_accesslog(&slapd, &["--accesslog-replay"], T).unwrap();
    // The fixture (base, host, restricted) plus our add.
    let lines = wait_for_lines(&notifier, 4);
    assert_eq!(lines[0], format!("1 {BASE} a"));
    assert_eq!(lines[3], format!("4 cn=early,{BASE} a"));
}

#[test]
fn restart_resumes_without_loss_or_duplicates() {
    let slapd = Slapd::provider().unwrap();
    let mut notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    add(&slapd, "one");
    wait_for_lines(&notifier, 1);
    notifier.stop().unwrap();
    add(&slapd, "two");
    add(&slapd, "three");
    notifier.restart().unwrap();
    add(&slapd, "four");
    let lines = wait_for_lines(&notifier, 4);
    let dns: Vec<&str> = lines.iter().map(|l| l.split(' ').nth(1).unwrap()).collect();
    assert_eq!(
        dns,
        [
            format!("cn=one,{BASE}"),
            format!("cn=two,{BASE}"),
            format!("cn=three,{BASE}"),
            format!("cn=four,{BASE}")
        ]
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(notifier.transactions().lines().count(), 4, "no duplicates");
}

#[test]
fn sigkill_during_a_burst_loses_and_duplicates_nothing() {
    let slapd = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let mut notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    let writer = std::thread::spawn({
        let url = slapd.ldap_url();
        move || {
            let mut conn = ldap3::LdapConn::new(&url).unwrap();
            conn.simple_bind("cn=admin,dc=example,dc=com", "secret")
                .unwrap()
                .success()
                .unwrap();
            for i in 0..400 {
                let dn = format!("cn=burst{i},{BASE}");
                conn.add(
                    &dn,
                    vec![
                        ("objectClass", ["organizationalRole"].into()),
                        ("cn", [format!("burst{i}").as_str()].into()),
                    ],
                )
                .unwrap()
                .success()
                .unwrap();
            }
        }
    });
    // Kill the notifier twice while the burst is going on.
    for _ in 0..2 {
        wait_until("some progress", T, || {
            Ok((notifier.transactions().lines().count() > 20).then_some(()))
        })
        .unwrap();
        notifier.kill().unwrap();
        notifier.restart().unwrap();
    }
    writer.join().unwrap();
    let lines = wait_for_lines(&notifier, 400);
    std::thread::sleep(Duration::from_millis(300));
    let lines_after = notifier.transactions();
    assert_eq!(lines_after.lines().count(), 400, "exactly once");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line, &format!("{} cn=burst{i},{BASE} a", i + 1));
    }
}

#[test]
fn slapd_restart_is_survived_with_backoff() {
    let mut slapd = Slapd::provider().unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    add(&slapd, "before");
    wait_for_lines(&notifier, 1);
    slapd.kill().unwrap();
    // While slapd is down nothing is announced, and the notifier keeps running.
    std::thread::sleep(Duration::from_millis(500));
    slapd.restart().unwrap();
    add(&slapd, "after");
    let lines = wait_for_lines(&notifier, 2);
    assert_eq!(lines[1], format!("2 cn=after,{BASE} a"));
    let log = notifier.log();
    assert!(
        log.contains("reconnecting") || log.contains("retrying"),
        "{log}"
    );
}

#[test]
fn follows_over_tcp_with_a_simple_bind() {
    use integration_tests::slapd::{ADMIN_DN, ADMIN_PW};
    let slapd = Slapd::provider().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("accesslog.secret");
    std::fs::write(&password_file, format!("{ADMIN_PW}\n")).unwrap();
    let url = slapd.ldap_url();
    let password_arg = password_file.display().to_string();
    let notifier = Notifier::following_accesslog(
        &slapd,
        &[
            "--accesslog-uri",
            &url,
            "--accesslog-bind-dn",
            ADMIN_DN,
            "--accesslog-password-file",
            &password_arg,
        ],
        T,
    )
    .unwrap();
    add(&slapd, "tcp");
    assert_eq!(wait_for_lines(&notifier, 1), [format!("1 cn=tcp,{BASE} a")]);
}

#[test]
fn a_wrong_password_is_reported_and_retried_not_fatal() {
    use integration_tests::slapd::ADMIN_DN;
    let slapd = Slapd::provider().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("accesslog.secret");
    std::fs::write(&password_file, "wrong\n").unwrap();
    let url = slapd.ldap_url();
    let password_arg = password_file.display().to_string();
    let mut notifier = Notifier::start(
        &slapd,
        Intake::Accesslog,
        &[
            "--accesslog-uri",
            &url,
            "--accesslog-bind-dn",
            ADMIN_DN,
            "--accesslog-password-file",
            &password_arg,
        ],
    )
    .unwrap();
    wait_until("the bind failure in the log", T, || {
        Ok(notifier
            .log()
            .contains("invalid credentials (result code 49)")
            .then_some(()))
    })
    .unwrap();
    assert!(
        notifier.process().unwrap().is_running(),
        "no crash on bad credentials"
    );
}

/// The intake's connection errors name the server they tried, also where the LDAP error
/// itself does not (a refused bind says only "bind as <dn> failed").
#[test]
fn accesslog_errors_name_the_uri() {
    let slapd = Slapd::provider().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("wrong.secret");
    std::fs::write(&password, "wrong\n").unwrap();
    let uri = slapd.ldap_url();
    let password_arg = password.display().to_string();
    let notifier = Notifier::start(
        &slapd,
        Intake::Accesslog,
        &[
            "--accesslog-uri",
            &uri,
            "--accesslog-bind-dn",
            integration_tests::slapd::ADMIN_DN,
            "--accesslog-password-file",
            &password_arg,
        ],
    )
    .unwrap();
    let wanted = format!("cannot read the accesslog's contextCSN from {uri}: ");
    wait_until("the refused bind in the log", T, || {
        Ok(notifier.log().contains(&wanted).then_some(()))
    })
    .unwrap();
    let log = notifier.log();
    assert!(log.contains("bind as"), "{log}");
}

/// Writes purged from the access log (logpurge) while the notifier was down cannot be
/// numbered any more; the notifier says so at its start instead of going on silently.
/// Entries live 5 s here: long enough for the running notifier to read the first write.
#[test]
fn writes_purged_while_the_notifier_was_down_are_reported() {
    let slapd = Slapd::start(SlapdConfig::provider().accesslog_purge("00:00:05 00:00:01")).unwrap();
    let mut notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    add(&slapd, "before-purge");
    notifier
        .wait_transaction(&format!("cn=before-purge,{BASE}"), 'a', T)
        .unwrap();
    notifier.stop().unwrap();
    add(&slapd, "purged");
    // Once the purge has run, the log holds none of the writes.
    let mut root = slapd.root().unwrap();
    wait_until("the access log purged", T, || {
        let left = root
            .search(
                integration_tests::slapd::ACCESSLOG_BASE,
                ldap3::Scope::OneLevel,
                "(objectClass=auditWriteObject)",
                &["1.1"],
            )
            .unwrap();
        Ok(left.is_empty().then_some(()))
    })
    .unwrap();
    notifier.restart().unwrap();
    wait_until("the purge reported", T, || {
        Ok(notifier
            .log()
            .contains("may have been purged")
            .then_some(()))
    })
    .unwrap();
}
