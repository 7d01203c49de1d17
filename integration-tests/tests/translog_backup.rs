//! `univention-translog backup` against a real notifier following a real slapd's
//! cn=accesslog: a backup taken while it runs, restored after a wipe, resumes exactly (the
//! ids after the backup are assigned again to the same writes); damaged archives and a
//! restore while the notifier runs are refused with clear messages and distinct exit codes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use integration_tests::process::binary;
use integration_tests::slapd::BASE;
use integration_tests::{Intake, Notifier, Slapd, wait_until};

const T: Duration = Duration::from_secs(30);

fn backup(notifier: &Notifier, args: &[&str]) -> Output {
    Command::new(binary("univention-translog").unwrap())
        .arg("-T")
        .arg(notifier.transaction_file())
        .arg("backup")
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn add(slapd: &Slapd, cn: &str) {
    slapd
        .admin()
        .unwrap()
        .add_role(&format!("cn={cn},{BASE}"), cn)
        .unwrap();
}

fn wait_for_lines(notifier: &Notifier, count: usize) -> Vec<String> {
    wait_until(&format!("{count} transactions in the log"), T, || {
        let lines: Vec<String> = notifier.transactions().lines().map(str::to_owned).collect();
        Ok((lines.len() >= count).then_some(lines))
    })
    .unwrap()
}

fn get_dn(notifier: &Notifier, id: u64) -> String {
    let mut client = notifier.client().unwrap();
    client.handshake(2).unwrap();
    client.request(1, &format!("GET_DN {id}")).unwrap()
}

fn replace_in(path: &Path, from: &[u8], to: &[u8]) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern in the archive");
    bytes[at..at + to.len()].copy_from_slice(to);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn backup_while_running_then_wipe_restore_and_resume() {
    let slapd = Slapd::provider().unwrap();
    let mut notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    let position = notifier.ldap_dir().join("notify/accesslog.position");
    for i in 1..=5 {
        add(&slapd, &format!("b{i}"));
    }
    let before = wait_for_lines(&notifier, 5);
    // The position is stored right after the commit of transaction 5.
    wait_until("the position at transaction 5", T, || {
        let text = std::fs::read_to_string(&position).unwrap_or_default();
        Ok(text.contains("id=5\n").then_some(()))
    })
    .unwrap();

    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("notifier.tar");
    let archive_arg = archive.to_str().unwrap();
    let out = backup(&notifier, &["create", archive_arg]);
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("transactions: 1..5"), "{stdout}");
    assert!(stdout.contains("was running"), "{stdout}");
    let out = backup(&notifier, &["verify", archive_arg]);
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains(": OK"), "{out:?}");

    // Changes after the backup, which the restored notifier must number the same way.
    for i in 6..=8 {
        add(&slapd, &format!("b{i}"));
    }
    let full = wait_for_lines(&notifier, 8);
    assert_eq!(full[..5], before[..5]);

    // Restoring under a running notifier is refused and changes nothing.
    let out = backup(&notifier, &["restore", archive_arg]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        text(&out.stderr).contains("the notifier is running"),
        "{out:?}"
    );
    assert_eq!(notifier.transactions().lines().count(), 8);

    notifier.stop().unwrap();
    let notify = notifier.ldap_dir().join("notify");
    std::fs::remove_dir_all(&notify).unwrap();
    let out = backup(&notifier, &["restore", archive_arg]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        notifier.transactions().lines().collect::<Vec<_>>(),
        before[..5]
    );

    // The notifier serves the restored ids at once and replays the accesslog from the
    // restored position: 6..8 come back with the same ids and DNs.
    notifier.restart().unwrap();
    assert_eq!(
        get_dn(&notifier, 3),
        format!("MSGID: 1\n3 cn=b3,{BASE} a\n\n")
    );
    let replayed = wait_for_lines(&notifier, 8);
    assert_eq!(replayed, full);
    add(&slapd, "b9");
    let lines = wait_for_lines(&notifier, 9);
    assert_eq!(lines[8], format!("9 cn=b9,{BASE} a"));
    wait_until("last id 9 announced", T, || {
        Ok((notifier.last_id()? == 9).then_some(()))
    })
    .unwrap();
    assert_eq!(
        get_dn(&notifier, 7),
        format!("MSGID: 1\n7 cn=b7,{BASE} a\n\n")
    );
    assert!(!notifier.log().contains("repaired"), "{}", notifier.log());
}

#[test]
fn damaged_and_newer_archives_are_refused() {
    let slapd = Slapd::provider().unwrap();
    let mut notifier = Notifier::start(&slapd, Intake::QueueFile, &[]).unwrap();
    let lines: String = (1..=20)
        .map(|i| format!("{i} cn=d{i},{BASE} m\n"))
        .collect();
    notifier.queue(&lines).unwrap();
    wait_for_lines(&notifier, 20);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("notifier.tar");
    let archive_arg = archive.to_str().unwrap();
    let out = backup(&notifier, &["create", archive_arg]);
    assert!(out.status.success(), "{out:?}");
    // An existing archive is not overwritten by accident.
    let out = backup(&notifier, &["create", archive_arg]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("--force"), "{out:?}");
    notifier.stop().unwrap();

    let damaged = work.path().join("damaged.tar");
    std::fs::copy(&archive, &damaged).unwrap();
    replace_in(&damaged, b"cn=d13,", b"cn=d31,");
    let out = backup(&notifier, &["verify", damaged.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("damaged"), "{stderr}");
    assert!(
        stderr.contains("checksum mismatch for transaction"),
        "{stderr}"
    );
    let out = backup(&notifier, &["restore", damaged.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(notifier.transactions().contains("13 cn=d13,"));

    let newer = work.path().join("newer.tar");
    std::fs::copy(&archive, &newer).unwrap();
    replace_in(&newer, b"Format-Version: 1\n", b"Format-Version: 2\n");
    for command in ["verify", "restore"] {
        let out = backup(&notifier, &[command, newer.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(4), "{command}: {out:?}");
        assert!(text(&out.stderr).contains("format 2"), "{command}: {out:?}");
    }

    let out = backup(&notifier, &["restore", "--help"]);
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("before-restore"), "{out:?}");
}
