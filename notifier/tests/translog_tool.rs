//! Runs the built `univention-translog` binary against crafted files: the `check` cases of
//! the UCS test suite (spec/notifier.md §6.2) plus stat, lookup, index and prune.

// Test helpers outside #[test] functions are not covered by clippy.toml's test exemption.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use notifier::journal::{Journal, JournalOptions};
use proto::line::{Command as Cmd, Transaction, TransactionId};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_univention-translog");
const BASE: &str = "dc=example,dc=com";
/// An LDAP URL that fails at once, so LDAP parts are skipped quickly.
const NO_LDAP: &str = "ldapi://%2Fnonexistent%2Fldapi/";

fn run(args: &[OsString]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap()
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// One test directory laid out like the UCS harness: `X.in` copied to `X`.
struct Case {
    dir: TempDir,
}

impl Case {
    fn new(files: &[(&str, &[u8])]) -> Case {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in files {
            fs::write(dir.path().join(name), content).unwrap();
        }
        // Empty listener.in files were lost from the UCS sources; the harness had them.
        if !dir.path().join("listener").exists() {
            fs::write(dir.path().join("listener"), b"").unwrap();
        }
        // A stale index, to see whether a rewrite removes it.
        fs::write(dir.path().join("transaction.index"), b"stale").unwrap();
        Case { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        fs::read(self.path(name)).unwrap()
    }

    fn exists(&self, name: &str) -> bool {
        self.path(name).exists()
    }

    /// The harness's argument list with `--role` and `--fix` adjustable.
    fn check_args(&self, fix: bool, role: &str) -> Vec<OsString> {
        let mut args = vec![
            OsString::from("--translog-file"),
            self.path("transaction").into(),
            "-vvvv".into(),
            "check".into(),
        ];
        if fix {
            args.push("--fix".into());
        }
        args.extend([
            "--base".into(),
            BASE.into(),
            "--role".into(),
            role.into(),
            "--listener-file".into(),
            self.path("listener").into(),
            "--listener-private-file".into(),
            self.path("listener.priv").into(),
            "--last-file".into(),
            self.path("last").into(),
            "--skip-services".into(),
        ]);
        args
    }

    fn check_fix(&self) -> Output {
        run(&self.check_args(true, "domaincontroller_master"))
    }

    fn translog_args(&self, rest: &[&str]) -> Vec<OsString> {
        let mut args = vec![
            OsString::from("-T"),
            self.path("transaction").into(),
            "-H".into(),
            NO_LDAP.into(),
        ];
        args.extend(rest.iter().map(OsString::from));
        args
    }
}

fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

const T1A: &[u8] = b"1 dc=example,dc=com a\n";

#[test]
fn case_garbage() {
    let mut input = vec![0u8];
    input.extend_from_slice(T1A);
    assert_eq!(input.len(), 23);
    let c = Case::new(&[("transaction", &input)]);
    let out = c.check_fix();
    assert_exit(&out, 0);
    assert!(text(&out.stderr).contains("Binary zeros"));
    assert_eq!(c.read("transaction"), input, "not rewritten");
    assert!(!c.exists("transaction.bak"));
    assert_eq!(c.read("last"), b"1");
}

#[test]
fn case_hole() {
    let input = b"1 cn=1,dc=example,dc=com a\n3 cn=3,dc=example,dc=com a\n4 cn=4,dc=example,dc=com a\n5 cn=5,dc=example,dc=com a\n";
    let c = Case::new(&[("transaction", input)]);
    let out = c.check_fix();
    assert_exit(&out, 0);
    assert!(text(&out.stderr).contains("Hole after"));
    assert!(text(&out.stdout).contains("- missing transactions in sequence"));
    assert_eq!(
        text(&c.read("transaction")),
        "1 cn=1,dc=example,dc=com a\n2 dc=example,dc=com m\n3 cn=3,dc=example,dc=com a\n4 cn=4,dc=example,dc=com a\n5 cn=5,dc=example,dc=com a\n"
    );
    assert_eq!(c.read("transaction.bak"), input);
    assert!(!c.exists("transaction.new"));
    assert!(!c.exists("transaction.index"), "index removed");
    assert_eq!(c.read("last"), b"5");
}

#[test]
fn case_hole_flat_layout() {
    let c = Case::new(&[(
        "transaction",
        b"1 dc=example,dc=com a\n3 dc=example,dc=com m\n",
    )]);
    assert_exit(&c.check_fix(), 0);
    assert_eq!(
        text(&c.read("transaction")),
        "1 dc=example,dc=com a\n2 dc=example,dc=com m\n3 dc=example,dc=com m\n"
    );
}

#[test]
fn case_offset() {
    let c = Case::new(&[("transaction", b"2 dc=example,dc=com a\n")]);
    let out = c.check_fix();
    assert_exit(&out, 0);
    assert!(text(&out.stderr).contains("Starts with"));
    assert_eq!(c.read("transaction"), b"2 dc=example,dc=com a\n");
    assert!(c.exists("transaction.index"), "nothing rewritten");
    assert_eq!(c.read("last"), b"2");
}

#[test]
fn case_overlap() {
    let input = b"1 cn=1,dc=example,dc=com m\n1 cn=2,dc=example,dc=com m\n";
    let c = Case::new(&[("transaction", input)]);
    let out = c.check_fix();
    assert_exit(&out, 1);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("still contains duplicate transactions after unique sorting!"));
    assert!(stdout.contains("must be reset"));
    assert_eq!(c.read("transaction"), input);
    assert!(!c.exists("transaction.new"));
    assert!(!c.exists("transaction.bak"));
    assert!(!c.exists("last"));
}

#[test]
fn case_pending() {
    let c = Case::new(&[
        ("transaction", T1A),
        ("listener", b"2 dc=example,dc=com m\n"),
    ]);
    assert_exit(&c.check_fix(), 0);
    assert_eq!(c.read("listener"), b"2 dc=example,dc=com m\n");
    assert_eq!(c.read("transaction"), T1A);
    assert_eq!(c.read("last"), b"2");
}

#[test]
fn case_private() {
    let c = Case::new(&[
        ("transaction", T1A),
        ("listener.priv", b"2 dc=example,dc=com m\n"),
        ("listener", b"3 cn=x,dc=example,dc=com a\n"),
    ]);
    assert_exit(&c.check_fix(), 0);
    assert_eq!(c.read("listener.priv"), b"2 dc=example,dc=com m\n");
    assert_eq!(c.read("listener"), b"3 cn=x,dc=example,dc=com a\n");
    assert_eq!(c.read("last"), b"3");
}

#[test]
fn case_private_renumbered_chain() {
    let c = Case::new(&[
        ("transaction", T1A),
        (
            "listener.priv",
            b"7 dc=example,dc=com m\n8 cn=y,dc=example,dc=com d\n",
        ),
        ("listener", b"5 cn=x,dc=example,dc=com a\n"),
    ]);
    let out = c.check_fix();
    assert_exit(&out, 0);
    assert!(text(&out.stderr).contains("Not continuous with"));
    assert_eq!(
        text(&c.read("listener.priv")),
        "2 dc=example,dc=com m\n3 cn=y,dc=example,dc=com d\n"
    );
    assert_eq!(text(&c.read("listener")), "4 cn=x,dc=example,dc=com a\n");
    assert_eq!(c.read("listener.bak"), b"5 cn=x,dc=example,dc=com a\n");
    assert_eq!(c.read("last"), b"4");
}

#[test]
fn case_renumber() {
    let c = Case::new(&[
        ("transaction", T1A),
        ("listener", b"3 dc=example,dc=com m\n"),
    ]);
    let out = c.check_fix();
    assert_exit(&out, 0);
    assert!(text(&out.stdout).contains("- pending transactions are not consecutive"));
    assert_eq!(c.read("listener"), b"2 dc=example,dc=com m\n");
    assert_eq!(c.read("last"), b"2");
    assert!(
        c.exists("transaction.index"),
        "the committed log was not touched"
    );
}

#[test]
fn case_reordered() {
    let c = Case::new(&[(
        "transaction",
        b"2 dc=example,dc=com m\n1 dc=example,dc=com a\n",
    )]);
    let out = c.check_fix();
    assert_exit(&out, 0);
    assert!(text(&out.stderr).contains("Repeated line after"));
    assert_eq!(
        c.read("transaction"),
        b"1 dc=example,dc=com a\n2 dc=example,dc=com m\n"
    );
    assert!(!c.exists("transaction.index"));
    assert_eq!(c.read("last"), b"2");
}

#[test]
fn case_repeated() {
    let c = Case::new(&[(
        "transaction",
        b"1 dc=example,dc=com m\n1 dc=example,dc=com m\n",
    )]);
    assert_exit(&c.check_fix(), 0);
    assert_eq!(c.read("transaction"), b"1 dc=example,dc=com m\n");
    assert!(!c.exists("transaction.index"));
    assert_eq!(c.read("last"), b"1");
}

#[test]
fn case_transid() {
    let c = Case::new(&[
        ("transaction", T1A),
        ("listener", b"<TransID> dc=example,dc=com m\n"),
    ]);
    let out = c.check_fix();
    assert_exit(&out, 0);
    assert!(text(&out.stderr).contains("Invalid transaction id"));
    assert_eq!(c.read("listener"), b"2 dc=example,dc=com m\n");
    assert_eq!(c.read("last"), b"2");
}

#[test]
fn case_truncated() {
    let c = Case::new(&[("transaction", b"1 dc=example\n")]);
    let out = c.check_fix();
    assert_exit(&out, 1);
    let stderr = text(&out.stderr);
    for msg in ["Invalid line", "Invalid command", "Foreign dn"] {
        assert!(stderr.contains(msg), "{msg}: {stderr}");
    }
    assert!(text(&out.stdout).contains("- contains unparseable lines!"));
    assert_eq!(c.read("transaction"), b"1 dc=example\n");
    assert!(!c.exists("transaction.bak"));
}

#[test]
fn case_twice() {
    let input = b"1 dc=example,dc=com m\n2 dc=example,dc=com m\n";
    let c = Case::new(&[("transaction", input)]);
    let out = c.check_fix();
    assert_exit(&out, 0);
    assert_eq!(c.read("transaction"), input);
    assert!(!c.exists("transaction.bak"));
    assert_eq!(c.read("last"), b"2");
    assert!(text(&out.stdout).is_empty(), "{}", text(&out.stdout));
}

#[test]
fn case_zero() {
    let c = Case::new(&[
        ("transaction", T1A),
        ("listener", b"0 dc=example,dc=com m\n"),
    ]);
    assert_exit(&c.check_fix(), 0);
    assert_eq!(c.read("listener"), b"2 dc=example,dc=com m\n");
    assert_eq!(c.read("last"), b"2");
}

#[test]
fn check_without_fix_only_reports() {
    let input = b"1 dc=example,dc=com a\n3 dc=example,dc=com m\n";
    let c = Case::new(&[("transaction", input), ("last", b"3")]);
    let out = run(&c.check_args(false, "domaincontroller_master"));
    assert_exit(&out, 1);
    assert!(text(&out.stdout).contains("--fix"));
    assert_eq!(c.read("transaction"), input);
    assert!(c.exists("transaction.index"));

    // A wrong last_id alone is also a problem without --fix.
    let c = Case::new(&[("transaction", T1A), ("last", b"7")]);
    let out = run(&c.check_args(false, "domaincontroller_master"));
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("Invalid last id: should be 1, but is 7"));
    assert_eq!(c.read("last"), b"7");

    let c = Case::new(&[("transaction", T1A), ("last", b"1")]);
    assert_exit(&run(&c.check_args(false, "domaincontroller_master")), 0);
}

#[test]
fn check_roles() {
    let c = Case::new(&[(
        "transaction",
        b"2 dc=example,dc=com m\n1 dc=example,dc=com a\n",
    )]);
    let out = run(&c.check_args(true, "domaincontroller_backup"));
    assert_exit(&out, 1);
    assert!(text(&out.stdout).contains("must be re-joined"));
    assert!(!c.exists("transaction.bak"));

    // Nothing applies: that is not success.
    let out = run(&c.check_args(true, "memberserver"));
    assert_exit(&out, 1);
    assert!(text(&out.stdout).contains("only for UCS Primary and Backup Nodes"));
    assert!(text(&out.stdout).contains("nothing was checked"));

    // A consistent Backup does not check last_id (it belongs to the Primary's overlay).
    let c = Case::new(&[("transaction", T1A)]);
    assert_exit(&run(&c.check_args(true, "domaincontroller_backup")), 0);
    assert!(!c.exists("last"));
}

/// A notifier following cn=accesslog (stock OpenLDAP: no role, no queue files, no
/// `last_id`) is recognised by its stored position; the log and the position are checked.
#[test]
fn check_follows_the_accesslog_intake() {
    let log = b"1 dc=example,dc=com a\n2 cn=x,dc=example,dc=com m\n";
    let position = |id: u64| format!("csn=20261206110000.000000Z#000000#000#000000\nid={id}\n");

    // No role, consistent: checked and fine, and no word about a missing last_id.
    let c = Case::new(&[
        ("transaction", log),
        ("accesslog.position", position(2).as_bytes()),
    ]);
    let out = run(&c.check_args(false, ""));
    assert_exit(&out, 0);
    assert!(
        !text(&out.stderr).contains("last id"),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains("Reading"), "the log was read");
    // Neither with the Primary role.
    let out = run(&c.check_args(false, "domaincontroller_master"));
    assert_exit(&out, 0);
    assert!(
        !text(&out.stderr).contains("last id"),
        "{}",
        text(&out.stderr)
    );
    assert!(!c.exists("last"));

    // A position behind the log is a crash between commit and store: fine.
    let c = Case::new(&[
        ("transaction", log),
        ("accesslog.position", position(1).as_bytes()),
    ]);
    assert_exit(&run(&c.check_args(false, "")), 0);

    // Ahead of the log: committed transactions were lost.
    let c = Case::new(&[
        ("transaction", log),
        ("accesslog.position", position(5).as_bytes()),
    ]);
    let out = run(&c.check_args(false, ""));
    assert_exit(&out, 1);
    assert!(
        text(&out.stderr).contains("is ahead of the log, which ends at 2"),
        "{}",
        text(&out.stderr)
    );

    // The log is still checked, and a hole is repaired here: this notifier owns its log.
    let c = Case::new(&[
        (
            "transaction",
            b"1 dc=example,dc=com a\n3 dc=example,dc=com m\n",
        ),
        ("accesslog.position", position(3).as_bytes()),
    ]);
    assert_exit(&run(&c.check_args(false, "")), 1);
    assert_exit(&run(&c.check_args(true, "")), 0);
    assert_eq!(
        c.read("transaction"),
        b"1 dc=example,dc=com a\n2 dc=example,dc=com m\n3 dc=example,dc=com m\n"
    );

    // Before the first start there is no position yet: --intake says which intake it is.
    let c = Case::new(&[("transaction", log)]);
    assert_exit(&run(&c.check_args(false, "")), 1);
    let mut args = c.check_args(false, "");
    args.extend(["--intake".into(), "accesslog".into()]);
    let out = run(&args);
    assert_exit(&out, 0);
    assert!(text(&out.stderr).contains("accesslog.position does not exist"));
}

#[test]
fn check_fix_dry_run_changes_nothing() {
    let input = b"2 dc=example,dc=com m\n1 dc=example,dc=com a\n";
    let c = Case::new(&[("transaction", input)]);
    let mut args = vec![OsString::from("-n")];
    args.extend(c.check_args(true, "domaincontroller_master"));
    assert_exit(&run(&args), 0);
    assert_eq!(c.read("transaction"), input);
    assert!(c.exists("transaction.index"));
    assert!(!c.exists("last"));
}

#[test]
fn modifying_commands_refuse_while_the_notifier_runs() {
    let input = b"2 dc=example,dc=com m\n1 dc=example,dc=com a\n";
    let c = Case::new(&[("transaction", input)]);
    let mut child = integration_tests::lockf::hold_lockf(&c.path("transaction.lock")).unwrap();

    let out = c.check_fix();
    assert_exit(&out, 1);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("the notifier is running and holds") && stderr.contains("stop it first"),
        "{stderr}"
    );
    assert_eq!(c.read("transaction"), input);

    // Checking without --fix is read-only and allowed.
    assert_exit(&run(&c.check_args(false, "domaincontroller_master")), 1);

    let log = Case::new(&[("transaction", b"1 dc=x a\n2 dc=x m\n3 dc=x m\n")]);
    let mut child2 = integration_tests::lockf::hold_lockf(&log.path("transaction.lock")).unwrap();
    let out = run(&log.translog_args(&["prune", "2", "--role", "domaincontroller_master"]));
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("stop it first"));
    assert_eq!(log.read("transaction"), b"1 dc=x a\n2 dc=x m\n3 dc=x m\n");
    // Read-only commands work while the daemon runs.
    assert_exit(&run(&log.translog_args(&["lookup", "2"])), 0);
    assert_exit(&run(&log.translog_args(&["stat"])), 0);

    for c in [&mut child, &mut child2] {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    assert_exit(&c.check_fix(), 0);
}

fn tx(id: u64, dn: &str, command: Cmd) -> Transaction {
    Transaction::new(TransactionId(id), dn, command)
}

/// A log and index written by the daemon's own journal.
fn daemon_log(first: u64, last: u64) -> (TempDir, PathBuf, Vec<Transaction>) {
    let dir = tempfile::tempdir().unwrap();
    let txs: Vec<_> = (first..=last)
        .map(|id| tx(id, &format!("cn=o{id},{BASE}"), Cmd::Modify))
        .collect();
    let mut j = Journal::open(dir.path(), &JournalOptions::default()).unwrap();
    j.append(&txs).unwrap();
    drop(j);
    let path = dir.path().join("transaction");
    (dir, path, txs)
}

fn tool(path: &Path, rest: &[&str]) -> Output {
    let mut args = vec![
        OsString::from("-T"),
        path.into(),
        "-H".into(),
        NO_LDAP.into(),
    ];
    args.extend(rest.iter().map(OsString::from));
    run(&args)
}

#[test]
fn stat_reports_file_and_index() {
    let (dir, path, txs) = daemon_log(1, 3);
    let size = fs::metadata(&path).unwrap().len();
    let out = tool(&path, &["stat"]);
    assert_exit(&out, 0);
    let want = format!(
        "Index.file: {idx}\nIndex.size: {isize}\nIndex.count: 3\nIndex.okay: yes\n\
         Translog.file: {file}\nTranslog.size: {size}\nTranslog.first: 1\nTranslog.last: 3\n\
         Translog.count: 3\n",
        idx = dir.path().join("transaction.index").display(),
        isize = 8 + 9 * 4,
        file = path.display(),
    );
    assert_eq!(text(&out.stdout), want);
    assert!(text(&out.stderr).contains("LDAP not reachable"));
    assert_eq!(txs.len(), 3);

    // Without an index, after a prune-like start, with a torn tail being written.
    fs::remove_file(dir.path().join("transaction.index")).unwrap();
    fs::write(&path, b"5 dc=x a\n6 dc=x m\n7 dc=x").unwrap();
    let out = tool(&path, &["stat"]);
    assert_exit(&out, 0);
    let stdout = text(&out.stdout);
    for line in [
        "Index.size: 0",
        "Index.count: 0",
        "Index.okay: no",
        "Translog.first: 5",
        "Translog.last: 6",
        "Translog.count: 2",
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line}: {stdout}");
    }
}

#[test]
fn lookup_through_index_and_by_scan() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path(), &JournalOptions::default()).unwrap();
    j.append(&[
        tx(1, "cn=a,dc=example,dc=com", Cmd::Add),
        tx(2, "cn=O'Brien,dc=example,dc=com", Cmd::Modify),
        tx(3, "cn=x y,dc=example,dc=com", Cmd::ModRdn),
    ])
    .unwrap();
    drop(j);
    let path = dir.path().join("transaction");
    let want = "Transaction(tid=1, dn='cn=a,dc=example,dc=com', command='a')\n\
                Transaction(tid=2, dn=\"cn=O'Brien,dc=example,dc=com\", command='m')\n\
                Transaction(tid=3, dn='cn=x y,dc=example,dc=com', command='r')\n";
    let out = tool(&path, &["lookup", "1", "2", "3"]);
    assert_exit(&out, 0);
    assert_eq!(text(&out.stdout), want);

    fs::remove_file(dir.path().join("transaction.index")).unwrap();
    let out = tool(&path, &["lookup", "1", "2", "3"]);
    assert_exit(&out, 0);
    assert_eq!(text(&out.stdout), want);

    // An index pointing at the wrong lines is verified and ignored.
    fs::write(
        dir.path().join("transaction.index"),
        [
            &0x3395e0d4u64.to_le_bytes()[..],
            &[0; 9],
            &[1, 30, 0, 0, 0, 0, 0, 0, 0],
            &[1, 0, 0, 0, 0, 0, 0, 0, 0],
        ]
        .concat(),
    )
    .unwrap();
    let out = tool(&path, &["lookup", "2", "1"]);
    assert_exit(&out, 0);
    assert!(text(&out.stdout).starts_with("Transaction(tid=2,"));

    let out = tool(&path, &["lookup", "9"]);
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("transaction 9 not found"));
}

#[test]
fn index_dump() {
    let (dir, path, txs) = daemon_log(1, 3);
    let len0 = txs[0].to_line().len();
    let len1 = txs[1].to_line().len();
    let out = tool(&path, &["index"]);
    assert_exit(&out, 0);
    assert_eq!(
        text(&out.stdout),
        format!(
            "       1[x]: 0\n       2[x]: {len0}\n       3[x]: {}\n",
            len0 + len1
        )
    );
    let out = tool(&path, &["index", "--min", "2", "--max", "2"]);
    assert_eq!(text(&out.stdout), format!("       2[x]: {len0}\n"));
    let out = tool(&path, &["index", "-m", "0", "-M", "1"]);
    assert_eq!(text(&out.stdout), "       0[ ]: 0\n       1[x]: 0\n");

    fs::remove_file(dir.path().join("transaction.index")).unwrap();
    assert_exit(&tool(&path, &["index"]), 1);
}

#[test]
fn prune_rewrites_the_log() {
    let (dir, path, txs) = daemon_log(1, 10);
    let original = fs::read(&path).unwrap();
    let role = ["--role", "domaincontroller_master"];

    let out = tool(&path, &["-n", "prune", "4", role[0], role[1]]);
    assert_exit(&out, 0);
    assert_eq!(fs::read(&path).unwrap(), original, "dry run");
    assert!(!dir.path().join("transaction.new").exists());

    let out = tool(&path, &["prune", "4", role[0], role[1]]);
    assert_exit(&out, 0);
    let kept: String = txs[3..].iter().map(Transaction::to_line).collect();
    assert_eq!(text(&fs::read(&path).unwrap()), kept);
    assert_eq!(
        fs::read(dir.path().join("transaction.bak")).unwrap(),
        original
    );
    assert!(!dir.path().join("transaction.index").exists());
    assert!(text(&out.stderr).contains("skipping the cleanup of cn=translog"));

    // The daemon's journal accepts the pruned log and rebuilds the index.
    let j = Journal::open(dir.path(), &JournalOptions::default()).unwrap();
    assert_eq!((j.first_id(), j.last_id()), (Some(4), 10));
    drop(j);

    // Keep the last 3.
    let out = tool(&path, &["prune", role[0], role[1], "--", "-3"]);
    assert_exit(&out, 0);
    let kept: String = txs[7..].iter().map(Transaction::to_line).collect();
    assert_eq!(text(&fs::read(&path).unwrap()), kept);

    let out = tool(&path, &["-v", "prune", "5", role[0], role[1]]);
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("Already purged."));
    let out = tool(&path, &["-v", "prune", "10", role[0], role[1]]);
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("Nothing to purge."));
    let out = tool(&path, &["prune", "9", "--role", "memberserver"]);
    assert_exit(&out, 0);
    assert_eq!(text(&fs::read(&path).unwrap()), kept);
}

#[test]
fn negative_prune_parses_without_separator() {
    let (_dir, path, txs) = daemon_log(1, 5);
    let out = tool(&path, &["prune", "-2", "--role", "domaincontroller_master"]);
    assert_exit(&out, 0);
    let kept: String = txs[3..].iter().map(Transaction::to_line).collect();
    assert_eq!(text(&fs::read(&path).unwrap()), kept);
}

#[test]
fn usage_and_help() {
    let out = run(&os(&["--help"]));
    assert_exit(&out, 0);
    let help = text(&out.stdout);
    for word in [
        "stat",
        "lookup",
        "ldap",
        "index",
        "check",
        "prune",
        "import",
        "Exit status",
    ] {
        assert!(help.contains(word), "{word}: {help}");
    }
    assert_exit(&run(&os(&["no-such-command"])), 2);
    assert_exit(&run(&os(&["lookup"])), 2);
    let out = run(&os(&["-T", "/nonexistent/transaction", "stat"]));
    assert_exit(&out, 2);
    assert!(text(&out.stderr).contains("cannot open"));
}
