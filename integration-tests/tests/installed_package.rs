//! The installed Debian package, end to end: its notifier and listener (from `/usr/sbin`,
//! via `UDR_BIN_DIR`) against a private slapd, with the `listener` user its postinst
//! created, and its operator tools against them.
//!
//! Ignored in the normal run: `.ci/run` installs the package and then runs
//! `UDR_BIN_DIR=/usr/sbin cargo nextest run -p integration-tests --test installed_package
//! --run-ignored only`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use integration_tests::process::BIN_DIR_ENV;
use integration_tests::slapd::BASE;
use integration_tests::{Listener, ListenerOptions, Notifier, Slapd};

const WAIT: Duration = Duration::from_secs(60);

fn bin_dir() -> PathBuf {
    PathBuf::from(std::env::var_os(BIN_DIR_ENV).unwrap_or_else(|| {
        panic!("set {BIN_DIR_ENV} to the installed binaries' directory (/usr/sbin)")
    }))
}

fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// uid and gid of `user` from the passwd database.
fn ids(user: &str) -> (u32, u32) {
    let output = Command::new("getent")
        .args(["passwd", user])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "no user {user}: run postinst first"
    );
    let line = text(&output.stdout);
    let fields: Vec<&str> = line.trim().split(':').collect();
    (fields[2].parse().unwrap(), fields[3].parse().unwrap())
}

fn effective_uid(pid: u32) -> u32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// The arguments for `univention-directory-listener-ctrl status` against this private
/// stack. The ctrl tool arrives with the `tools` branch: once it is installed this step
/// runs; adjust these arguments if its command line differs.
fn ctrl_status_args(listener: &Listener, notifier: &Notifier) -> Vec<String> {
    vec![
        "status".into(),
        "-c".into(),
        listener.cache_dir().display().to_string(),
        "--notifier-host".into(),
        "127.0.0.1".into(),
        "--notifier-port".into(),
        notifier.port().to_string(),
        "--failed-ldif".into(),
        listener.failed_ldif_path().display().to_string(),
    ]
}

#[test]
#[ignore = "needs the installed package: UDR_BIN_DIR=/usr/sbin (see .ci/run)"]
fn installed_notifier_and_listener_replicate_and_the_tools_see_them() {
    let bins = bin_dir();
    let (uid, gid) = ids("listener");
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &[], WAIT).unwrap();

    // The listener as the unit runs it: root, effective uid of the package's user.
    let mut listener = Listener::prepare(&slapd, &notifier, ListenerOptions::new()).unwrap();
    fs::set_permissions(listener.dir(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(listener.jsonl_path(), "").unwrap();
    std::os::unix::fs::chown(listener.jsonl_path(), Some(uid), Some(gid)).unwrap();
    listener.restart().unwrap();
    listener.wait_initialized(WAIT).unwrap();
    let pid = listener.process().unwrap().pid().unwrap();
    assert_eq!(effective_uid(pid), uid, "effective uid of the listener");

    let dn = format!("cn=pkg,{BASE}");
    slapd.admin().unwrap().add_role(&dn, "pkg").unwrap();
    let id = notifier.wait_transaction(&dn, 'a', WAIT).unwrap();
    listener.wait_for_id(id, WAIT).unwrap();
    let calls = listener.changes().unwrap();
    assert!(
        calls.iter().any(|c| c.summary() == format!("a {dn}")),
        "{calls:?}"
    );

    // The installed translog tool backs up the running notifier's state.
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("b.tar");
    let translog = bins.join("univention-translog");
    let transaction = notifier.transaction_file();
    let out = run(
        &translog,
        &[
            "-T",
            transaction.to_str().unwrap(),
            "backup",
            "create",
            archive.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let out = run(
        &translog,
        &[
            "-T",
            transaction.to_str().unwrap(),
            "backup",
            "verify",
            archive.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");

    let ctrl = bins.join("univention-directory-listener-ctrl");
    if ctrl.exists() {
        let args = ctrl_status_args(&listener, &notifier);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&ctrl, &args);
        assert!(
            out.status.success(),
            "ctrl status failed (adjust ctrl_status_args if its command line changed): {out:?}"
        );
        assert!(text(&out.stdout).contains(&id.to_string()), "{out:?}");
    } else {
        eprintln!(
            "{} is not installed yet: ctrl status skipped",
            ctrl.display()
        );
    }
}
