//! The listener's operator tools end to end, against real slapd, the real notifier and a
//! real listener: `univention-directory-listener-dump` (golden LDIF, while running and
//! stopped), `-verify` (a cache deliberately out of step with LDAP), `-ctrl` (status,
//! modules, resync, notifier-id, backup create/verify/restore) and `get_notifier_id`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::listener::{HANDLER_READY, JSONL_MODULE, module_dir};
use integration_tests::process::binary;
use integration_tests::slapd::{BASE, HOST_DN, RESTRICTED_DN};
use integration_tests::{Listener, ListenerOptions, Notifier, Slapd, wait_until};

const T: Duration = Duration::from_secs(60);
const DUMP: &str = "univention-directory-listener-dump";
const VERIFY: &str = "univention-directory-listener-verify";
const CTRL: &str = "univention-directory-listener-ctrl";

/// What a tool run left behind.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs a workspace binary to its end (killed after [`T`]), collecting its output.
fn tool(name: &str, args: &[&str]) -> Run {
    let mut child = Command::new(binary(name).unwrap())
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    // Read on threads so a full pipe cannot stall the tool while we wait.
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            child.kill().unwrap();
            panic!("{name} {args:?} did not finish within {T:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn stack() -> (Slapd, Notifier) {
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    (slapd, notifier)
}

fn start_listener(slapd: &Slapd, notifier: &Notifier) -> Listener {
    let mut listener = Listener::start(slapd, notifier, ListenerOptions::new()).unwrap();
    listener.wait_initialized(T).unwrap();
    listener
}

/// Waits until the notifier logged `<dn> <command>` and the listener processed it; returns
/// its id (the notifier's last one: tests write nothing else meanwhile).
fn catch_up(listener: &mut Listener, notifier: &Notifier, dn: &str, command: char) -> u64 {
    let id = notifier.wait_transaction(dn, command, T).unwrap();
    listener.wait_for_id(id, T).unwrap();
    assert_eq!(notifier.last_id().unwrap(), id);
    id
}

fn cache_arg(listener: &Listener) -> String {
    listener.cache_dir().display().to_string()
}

/// The ctrl options that point it at this listener and notifier.
fn ctrl_args(listener: &Listener, notifier: &Notifier) -> Vec<String> {
    vec![
        "-c".into(),
        cache_arg(listener),
        "--failed-ldif".into(),
        listener.failed_ldif_path().display().to_string(),
        "--notifier-host".into(),
        "127.0.0.1".into(),
        "--notifier-port".into(),
        notifier.port().to_string(),
        "--ucr-file".into(),
        listener.ucr_file().display().to_string(),
    ]
}

fn ctrl(listener: &Listener, notifier: &Notifier, args: &[&str]) -> Run {
    let mut all = ctrl_args(listener, notifier);
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    tool(CTRL, &all)
}

fn dump(listener: &Listener, extra: &[&str]) -> Run {
    let cache = cache_arg(listener);
    let mut args = vec!["-c", cache.as_str()];
    args.extend_from_slice(extra);
    tool(DUMP, &args)
}

/// The record of `dn` in a dump, with only the lines of `keep` (the stable attributes;
/// operational ones like entryCSN differ per run). Folded lines stay with their attribute.
fn record(dump: &str, dn_line: &str, keep: &[&str]) -> String {
    let start = dump
        .find(&format!("{dn_line}\n"))
        .unwrap_or_else(|| panic!("{dn_line:?} not in the dump:\n{dump}"));
    let text = &dump[start..];
    let text = &text[..text.find("\n\n").unwrap() + 1];
    let mut out = String::new();
    let mut keeping = false;
    for line in text.lines() {
        if !line.starts_with(' ') {
            let name = line.split(':').next().unwrap();
            keeping = name == "dn" || keep.contains(&name);
        }
        if keeping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn snapshot_dirs(listener: &Listener) -> Vec<String> {
    fs::read_dir(listener.cache_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".snapshot-"))
        .collect()
}

/// Golden output: base64 exactly where RFC 2849 wants it (non-ASCII, binary, a leading
/// space), plain text with inner spaces, folding at 76 columns, module lines; the dump of
/// the running listener (from a snapshot) equals the one of the stopped listener.
#[test]
fn dump_writes_golden_ldif_while_running_and_stopped() {
    let (slapd, notifier) = stack();
    let mut listener = start_listener(&slapd, &notifier);
    let dn = format!("uid=dump,{BASE}");
    let description = format!("a value with spaces {}", "x".repeat(100));
    let photo: Vec<u8> = (0..=255).collect();
    slapd
        .admin()
        .unwrap()
        .add_bytes(
            &dn,
            &[
                ("objectClass", &[b"inetOrgPerson"]),
                ("uid", &[b"dump"]),
                ("cn", &[b" leading space"]),
                ("sn", &["Bär".as_bytes()]),
                ("description", &[description.as_bytes()]),
                ("jpegPhoto", &[&photo]),
            ],
        )
        .unwrap();
    let id = catch_up(&mut listener, &notifier, &dn, 'a');

    let running = dump(&listener, &[]);
    assert_eq!(running.code, 0, "{running:?}");
    assert!(snapshot_dirs(&listener).is_empty(), "snapshot left behind");
    let keep = [
        "objectClass",
        "uid",
        "cn",
        "sn",
        "description",
        "jpegPhoto",
        "listenerModule",
    ];
    let golden = "\
dn: uid=dump,dc=example,dc=com
objectClass: inetOrgPerson
uid: dump
cn:: IGxlYWRpbmcgc3BhY2U=
sn:: QsOkcg==
description: a value with spaces xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx
 xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx
jpegPhoto:: AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4v
 MDEyMzQ1Njc4OTo7PD0+P0BBQkNERUZHSElKS0xNTk9QUVJTVFVWV1hZWltcXV5fYGFiY2RlZmd
 oaWprbG1ub3BxcnN0dXZ3eHl6e3x9fn+AgYKDhIWGh4iJiouMjY6PkJGSk5SVlpeYmZqbnJ2en6
 ChoqOkpaanqKmqq6ytrq+wsbKztLW2t7i5uru8vb6/wMHCw8TFxsfIycrLzM3Oz9DR0tPU1dbX2
 Nna29zd3t/g4eLj5OXm5+jp6uvs7e7v8PHy8/T19vf4+fr7/P3+/w==
listenerModule: jsonl
";
    assert_eq!(record(&running.stdout, &format!("dn: {dn}"), &keep), golden);
    assert!(
        running.stdout.lines().all(|l| l.len() <= 76),
        "a line longer than 76 bytes"
    );
    assert!(running.stdout.ends_with("\n\n"));
    // Objects are all there, each with its module.
    assert!(running.stdout.contains(&format!("dn: {BASE}\n")));
    assert!(
        !running.stdout.contains(RESTRICTED_DN),
        "invisible to the host"
    );

    let ids = dump(&listener, &["-i"]);
    assert_eq!(ids.code, 0, "{ids:?}");
    let (got_id, schema) = ids.stdout.trim_end().split_once(' ').unwrap();
    assert_eq!(got_id.parse::<u64>().unwrap(), id);
    schema.parse::<u64>().unwrap();
    assert!(ids.stdout.ends_with('\n') && ids.stdout.lines().count() == 1);
    let broken = dump(&listener, &["-r"]);
    assert_eq!((broken.code, broken.stdout.as_str()), (0, ""));

    listener.stop().unwrap();
    let stopped = dump(&listener, &[]);
    assert_eq!(stopped.code, 0, "{stopped:?}");
    assert_eq!(stopped.stdout, running.stdout, "snapshot and cache differ");
    let file = listener.dir().join("dump.ldif");
    let to_file = dump(&listener, &["-O", file.to_str().unwrap()]);
    assert_eq!((to_file.code, to_file.stdout.as_str()), (0, ""));
    assert_eq!(fs::read_to_string(&file).unwrap(), running.stdout);
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(tool(DUMP, &["--help"]).stdout.contains("Exit status"));
}

/// A cache out of step with LDAP (changes made while the listener was stopped): one
/// object only in LDAP, one only in the cache, one with a different value; objects the
/// bind DN cannot see (selective replication) are no finding.
#[test]
fn verify_reports_missing_extra_and_differing_objects() {
    let (slapd, notifier) = stack();
    let mut listener = start_listener(&slapd, &notifier);
    let mut admin = slapd.admin().unwrap();
    let a = format!("cn=Verify A,{BASE}");
    let b = format!("cn=Verify B,{BASE}");
    let c = format!("cn=Verify C,{BASE}");
    admin.add_role(&a, "Verify A").unwrap();
    admin
        .add(
            &b,
            &[
                ("objectClass", &["organizationalRole"]),
                ("cn", &["Verify B"]),
                ("description", &["before"]),
            ],
        )
        .unwrap();
    catch_up(&mut listener, &notifier, &b, 'a');
    let password = listener.password_file().display().to_string();
    let cache = cache_arg(&listener);
    let url = slapd.ldap_url();
    let args = [
        "-c", &cache, "-H", &url, "-b", BASE, "-D", HOST_DN, "-y", &password,
    ];
    let clean = tool(VERIFY, &args);
    assert_eq!((clean.code, clean.stdout.as_str()), (0, ""), "{clean:?}");

    listener.stop().unwrap();
    admin.add_role(&c, "Verify C").unwrap();
    admin.delete(&a).unwrap();
    admin.replace(&b, "description", &["after"]).unwrap();
    notifier.wait_transaction(&b, 'm', T).unwrap();
    let found = tool(VERIFY, &args);
    assert_eq!(found.code, 1, "{found:?}");
    let lines: Vec<&str> = found.stdout.lines().collect();
    assert!(
        lines.contains(&format!("E: {c} only in LDAP").as_str()),
        "{lines:#?}"
    );
    assert!(
        lines.contains(&format!("W: {a} only in cache").as_str()),
        "{lines:#?}"
    );
    let at = lines
        .iter()
        .position(|l| *l == format!("E: {b}:"))
        .unwrap_or_else(|| panic!("no block for {b}: {lines:#?}"));
    let block = &lines[at..];
    let description = block
        .iter()
        .position(|l| *l == "E:     description differs")
        .unwrap();
    assert_eq!(block[description + 1], "E:         CACHE = [before]");
    assert_eq!(block[description + 2], "E:         LDAP = [after]");
    assert!(!found.stdout.contains("restricted"), "{}", found.stdout);
    assert!(
        !found.stdout.contains("hasSubordinates"),
        "{}",
        found.stdout
    );

    // The listener catches up and the cache agrees again.
    listener.restart().unwrap();
    catch_up(&mut listener, &notifier, &b, 'm');
    let again = tool(VERIFY, &args);
    assert_eq!((again.code, again.stdout.as_str()), (0, ""), "{again:?}");

    // A bind that fails is an error (2), not a difference.
    let bad = tool(
        VERIFY,
        &[
            "-c", &cache, "-H", &url, "-b", BASE, "-D", HOST_DN, "-w", "wrong",
        ],
    );
    assert_eq!(bad.code, 2, "{bad:?}");
}

#[test]
fn ctrl_status_modules_notifier_id_and_resync() {
    let (slapd, notifier) = stack();
    let mut listener = start_listener(&slapd, &notifier);
    let dn = format!("cn=ctrl,{BASE}");
    slapd.admin().unwrap().add_role(&dn, "ctrl").unwrap();
    let id = catch_up(&mut listener, &notifier, &dn, 'a');

    let status = ctrl(&listener, &notifier, &["status", "--json"]);
    assert_eq!(status.code, 0, "{status:?}");
    let json: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(json["healthy"], true, "{json:#}");
    assert_eq!(json["listener"]["running"], true);
    let pid = listener.process().unwrap().pid().unwrap();
    assert_eq!(json["listener"]["pid"], pid);
    assert_eq!(json["notifier"]["id"], id);
    assert_eq!(json["processed_id"], id);
    assert_eq!(json["lag"], 0);
    assert!(json["seconds_since_progress"].is_u64());
    assert_eq!(json["failed_ldif"]["present"], false);
    assert_eq!(json["modules"][0]["name"], JSONL_MODULE);
    assert_eq!(json["modules"][0]["file"], "native:jsonl");
    assert_eq!(json["modules"][0]["state"], HANDLER_READY);

    let text = ctrl(&listener, &notifier, &["status"]);
    assert_eq!(text.code, 0, "{text:?}");
    assert!(
        text.stdout
            .starts_with(&format!("Listener status:\n running (pid {pid}): ")),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains(&format!(
        "Current Notifier ID on \"127.0.0.1\":\n {id}\n\
         Last Notifier ID processed by local Listener:\n {id}\nLag:\n 0 transactions, "
    )));
    // Status adds the condition and the counters to what `modules` lists.
    assert!(
        text.stdout
            .contains("Modules:\n3\tjsonl\tnative:jsonl\tready, "),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.ends_with(" calls, 0 failures\n"),
        "{}",
        text.stdout
    );
    assert!(!text.stdout.contains('\x1b'), "colours without a terminal");

    let modules = ctrl(&listener, &notifier, &["modules"]);
    assert_eq!(
        (modules.code, modules.stdout.as_str()),
        (0, "Modules:\n3\tjsonl\tnative:jsonl\n")
    );

    let notifier_id = ctrl(&listener, &notifier, &["notifier-id"]);
    assert_eq!(
        (notifier_id.code, notifier_id.stdout.trim()),
        (0, id.to_string().as_str())
    );
    let port = notifier.port().to_string();
    let legacy = tool("get_notifier_id", &["-p", &port, "127.0.0.1"]);
    assert_eq!(
        (legacy.code, legacy.stdout.trim()),
        (0, id.to_string().as_str())
    );
    let schema = tool("get_notifier_id", &["-p", &port, "-m", "127.0.0.1", "-s"]);
    assert_eq!(schema.code, 0, "{schema:?}");
    schema.stdout.trim().parse::<u64>().unwrap();
    let unreachable = tool("get_notifier_id", &["-p", "1", "127.0.0.1"]);
    assert_eq!(unreachable.code, 1);

    // failed.ldif pauses replication: status says so and fails.
    fs::write(listener.failed_ldif_path(), "dn: x\n").unwrap();
    let paused = ctrl(&listener, &notifier, &["status", "--json"]);
    assert_eq!(paused.code, 1);
    let json: serde_json::Value = serde_json::from_str(&paused.stdout).unwrap();
    assert_eq!(json["failed_ldif"]["present"], true);
    assert_eq!(json["healthy"], false);
    fs::remove_file(listener.failed_ldif_path()).unwrap();

    // Resync: unknown names list the modules (exit 2); with the listener running and
    // --no-restart it is refused; stopped, the state goes and the next start re-initialises.
    let unknown = ctrl(&listener, &notifier, &["resync", "nosuch"]);
    assert_eq!(unknown.code, 2, "{unknown:?}");
    assert!(
        unknown
            .stdout
            .contains("Modules:\n3\tjsonl\tnative:jsonl\n")
    );
    let refused = ctrl(
        &listener,
        &notifier,
        &["resync", "--no-restart", JSONL_MODULE],
    );
    assert_eq!(refused.code, 1, "{refused:?}");
    assert_eq!(listener.handler_state(JSONL_MODULE), Some(HANDLER_READY));
    let init_calls = |l: &Listener| {
        l.changes()
            .unwrap()
            .iter()
            .filter(|c| c.command == 'n')
            .count()
    };
    let before = init_calls(&listener);

    listener.stop().unwrap();
    let stopped = ctrl(&listener, &notifier, &["status"]);
    assert_eq!(stopped.code, 1);
    assert!(
        stopped
            .stdout
            .starts_with("Listener status:\n not running\n")
    );
    assert!(stopped.stdout.contains(&format!(
        "Last Notifier ID processed by local Listener:\n {id}\n"
    )));
    assert!(
        stopped.stdout.ends_with("Modules:\n3\tjsonl\t-\tready\n"),
        "{}",
        stopped.stdout
    );
    let resync = ctrl(
        &listener,
        &notifier,
        &["resync", "--no-restart", JSONL_MODULE],
    );
    assert_eq!(resync.code, 0, "{resync:?}");
    assert_eq!(listener.handler_state(JSONL_MODULE), None);
    listener.restart().unwrap();
    listener.wait_initialized(T).unwrap();
    assert!(init_calls(&listener) >= 2 * before, "no re-initialisation");
    assert!(
        tool(CTRL, &["resync", "--help"])
            .stdout
            .contains("--no-restart")
    );
}

/// `status` with a `--failed-ldif` other than the running listener's: the listener's own
/// file (from its STATUS) is reported, so "paused" and "failed.ldif" agree; only a stopped
/// listener is described with the option.
#[test]
fn ctrl_status_reports_the_running_listeners_failed_ldif() {
    let (slapd, notifier) = stack();
    let mut listener = start_listener(&slapd, &notifier);
    let own = listener.failed_ldif_path();
    let elsewhere = listener.dir().join("elsewhere.ldif");
    let mut args = ctrl_args(&listener, &notifier);
    let value = args.iter().position(|a| a == "--failed-ldif").unwrap() + 1;
    args[value] = elsewhere.display().to_string();
    let status = |json: bool| {
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        all.push("status");
        if json {
            all.push("--json");
        }
        tool(CTRL, &all)
    };

    fs::write(&own, "dn: x\n").unwrap();
    // The next transaction makes the listener pause on its failed.ldif.
    slapd
        .admin()
        .unwrap()
        .add_role(&format!("cn=paused,{BASE}"), "paused")
        .unwrap();
    wait_until("the listener to pause", T, || {
        let run = status(true);
        let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        Ok(json["listener"]["state"]
            .as_str()
            .is_some_and(|s| s.starts_with("paused"))
            .then_some(()))
    })
    .unwrap();
    let text = status(false);
    assert_eq!(text.code, 1, "{text:?}");
    assert!(text.stdout.contains("paused: "), "{}", text.stdout);
    assert!(
        text.stdout.contains(&format!(
            "failed.ldif:\n present: {} (replication stopped)\n",
            own.display()
        )),
        "{}",
        text.stdout
    );
    assert!(!text.stdout.contains("absent"), "{}", text.stdout);
    let json: serde_json::Value = serde_json::from_str(&status(true).stdout).unwrap();
    assert_eq!(json["failed_ldif"]["path"], own.display().to_string());
    assert_eq!(json["failed_ldif"]["present"], true);

    listener.stop().unwrap();
    let stopped = status(false);
    assert!(
        stopped.stdout.contains(&format!(
            "failed.ldif:\n absent ({})\n",
            elsewhere.display()
        )),
        "{}",
        stopped.stdout
    );
}

/// Backup while running, wipe, restore: the listener resumes at the same id with the same
/// cache and without re-initialising its modules.
#[test]
fn backup_wipe_restore_resumes_at_the_same_id() {
    let (slapd, notifier) = stack();
    let mut listener = start_listener(&slapd, &notifier);
    let mut admin = slapd.admin().unwrap();
    for i in 0..5 {
        admin
            .add_role(&format!("cn=backup{i},{BASE}"), &format!("backup{i}"))
            .unwrap();
    }
    let id = catch_up(&mut listener, &notifier, &format!("cn=backup4,{BASE}"), 'a');
    let file = listener.dir().join("listener.backup");
    let file_arg = file.display().to_string();

    let created = ctrl(&listener, &notifier, &["backup", "create", &file_arg]);
    assert_eq!(created.code, 0, "{created:?}");
    assert!(created.stdout.contains("snapshot of the running listener"));
    assert!(snapshot_dirs(&listener).is_empty());
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let verified = ctrl(&listener, &notifier, &["backup", "verify", &file_arg]);
    assert_eq!(verified.code, 0, "{verified:?}");
    assert!(verified.stdout.starts_with("OK: "));
    assert!(verified.stdout.contains(&format!("transaction {id},")));
    let refused = ctrl(&listener, &notifier, &["backup", "restore", &file_arg]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("running"), "{refused:?}");

    let before = dump(&listener, &[]).stdout;
    let calls_before = listener.changes().unwrap().len();
    listener.stop().unwrap();
    wipe(&listener.cache_dir());
    assert_eq!(listener.notifier_id(), None);

    let restored = ctrl(&listener, &notifier, &["backup", "restore", &file_arg]);
    assert_eq!(restored.code, 0, "{restored:?}");
    assert_eq!(listener.notifier_id(), Some(id));
    assert_eq!(listener.handler_state(JSONL_MODULE), Some(HANDLER_READY));
    assert_eq!(
        dump(&listener, &[]).stdout,
        before,
        "restored cache differs"
    );

    listener.restart().unwrap();
    listener
        .wait_until("the restarted listener's start line", T, |l| {
            Ok(l.log()
                .contains(&format!("starting at transaction {id} "))
                .then_some(()))
        })
        .unwrap();
    let dn = format!("cn=after,{BASE}");
    admin.add_role(&dn, "after").unwrap();
    let next = notifier.wait_transaction(&dn, 'a', T).unwrap();
    assert_eq!(next, id + 1);
    listener.wait_for_id(next, T).unwrap();
    let calls = listener.changes().unwrap();
    let new: Vec<String> = calls[calls_before..].iter().map(|c| c.summary()).collect();
    assert_eq!(new, [format!("a {dn}")], "re-initialised or replayed");

    // A damaged backup is detected.
    let text = fs::read_to_string(&file).unwrap();
    fs::write(&file, text.replacen("cn: backup1", "cn: backup9", 1)).unwrap();
    let damaged = ctrl(&listener, &notifier, &["backup", "verify", &file_arg]);
    assert_eq!(damaged.code, 1, "{damaged:?}");
    assert!(damaged.stdout.starts_with("FAILED: "));
}

fn wipe(dir: &Path) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            fs::remove_dir_all(&path).unwrap();
        } else {
            fs::remove_file(&path).unwrap();
        }
    }
}

// ---- honest health: `ctrl status` and failing, uninitialised, unloadable, blocked modules

fn health_listener(slapd: &Slapd, notifier: &Notifier, modules: &Path, args: &[&str]) -> Listener {
    let options = ListenerOptions::new()
        .module_dir(modules)
        .args(args.iter().copied());
    let mut listener = Listener::start(slapd, notifier, options).unwrap();
    listener.wait_initialized(T).unwrap();
    listener
}

/// `ctrl status --json`: exit code and report.
fn status_json(listener: &Listener, notifier: &Notifier) -> (i32, serde_json::Value) {
    let run = ctrl(listener, notifier, &["status", "--json"]);
    let json = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run:?}"));
    (run.code, json)
}

/// The module `name` of a status report (null when not listed).
fn module_of(json: &serde_json::Value, name: &str) -> serde_json::Value {
    json["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// Waits until `check` accepts the status report; returns exit code and report.
fn wait_status(
    listener: &mut Listener,
    notifier: &Notifier,
    what: &str,
    check: impl Fn(i32, &serde_json::Value) -> bool,
) -> (i32, serde_json::Value) {
    listener
        .wait_until(what, T, |l| {
            let (code, json) = status_json(l, notifier);
            Ok(check(code, &json).then_some((code, json)))
        })
        .unwrap()
}

const FAILER: &str = r#"
name = 'failer'
description = 'fails for objects whose cn starts with healthbad'
filter = '(cn=health*)'

def handler(dn, new, old):
    if new and new.get('cn', [b''])[0].startswith(b'healthbad'):
        raise ValueError('cannot handle ' + dn)
"#;

#[test]
fn ctrl_status_is_unhealthy_while_a_module_fails_its_calls() {
    let (slapd, notifier) = stack();
    let modules = module_dir("failer.py", FAILER).unwrap();
    let file = modules.path().join("failer.py");
    let mut listener = health_listener(&slapd, &notifier, modules.path(), &[]);
    let bad = format!("cn=healthbad,{BASE}");
    slapd.admin().unwrap().add_role(&bad, "healthbad").unwrap();
    catch_up(&mut listener, &notifier, &bad, 'a');

    let (code, json) = wait_status(&mut listener, &notifier, "failer failing", |_, j| {
        module_of(j, "failer")["condition"] == "failing"
    });
    assert_eq!((code, &json["healthy"]), (1, &false.into()), "{json:#}");
    let failer = module_of(&json, "failer");
    assert_eq!(failer["ready"], true, "ready, but failing: {failer:#}");
    assert_eq!(
        (&failer["calls"], &failer["failures"]),
        (&1.into(), &1.into())
    );
    assert_eq!(failer["consecutive_failures"], 1);
    assert_eq!(failer["last_error"]["call"], format!("handler {bad}"));
    let message = failer["last_error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("ValueError: cannot handle {bad}")),
        "{message}"
    );
    let text = ctrl(&listener, &notifier, &["status"]);
    assert_eq!(text.code, 1);
    let line = format!(
        "3\tfailer\t{}\tfailing, 1 calls, 1 failures (1 in a row), last error ",
        file.display()
    );
    assert!(text.stdout.contains(&line), "{}", text.stdout);
    assert!(
        text.stdout.contains(&format!(
            "in handler {bad}: ValueError: cannot handle {bad}\n"
        )),
        "the traceback shortened to its last line:\n{}",
        text.stdout
    );

    // A call that succeeds ends the run of failures: healthy again, the error still shown.
    let good = format!("cn=healthgood,{BASE}");
    slapd
        .admin()
        .unwrap()
        .add_role(&good, "healthgood")
        .unwrap();
    catch_up(&mut listener, &notifier, &good, 'a');
    let (code, json) = wait_status(&mut listener, &notifier, "failer ready", |_, j| {
        module_of(j, "failer")["condition"] == "ready"
    });
    assert_eq!((code, &json["healthy"]), (0, &true.into()), "{json:#}");
    let failer = module_of(&json, "failer");
    assert_eq!(
        (&failer["calls"], &failer["failures"]),
        (&2.into(), &1.into())
    );
    assert_eq!(failer["consecutive_failures"], 0);
    let text = ctrl(&listener, &notifier, &["status"]);
    assert!(
        text.stdout.contains("\tfailer\t")
            && text
                .stdout
                .contains("ready, 2 calls, 1 failures, last error "),
        "{}",
        text.stdout
    );
}

const INIT_FAILS: &str = r#"
import os
name = 'initfail'
description = 'initialize() raises while initfail.broken exists'
filter = '(cn=healthinit)'
_DIR = os.path.dirname(__file__)

def handler(dn, new, old):
    pass

def initialize():
    with open(os.path.join(_DIR, 'initfail.attempts'), 'a') as out:
        out.write('attempt\n')
    if os.path.exists(os.path.join(_DIR, 'initfail.broken')):
        raise RuntimeError('backend unavailable')
"#;

#[test]
fn a_module_whose_initialize_raises_is_not_ready_and_retried() {
    let (slapd, notifier) = stack();
    let modules = module_dir("initfail.py", INIT_FAILS).unwrap();
    let broken = modules.path().join("initfail.broken");
    fs::write(&broken, "").unwrap();
    let attempts_file = modules.path().join("initfail.attempts");
    let attempts = || {
        fs::read_to_string(&attempts_file)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    // A one-second first retry, so that the test sees the second attempt soon.
    let mut listener = health_listener(&slapd, &notifier, modules.path(), &["--init-retry", "1"]);
    listener
        .wait_until("a second initialisation attempt", T, |_| {
            Ok((attempts() >= 2).then_some(()))
        })
        .unwrap();
    assert_ne!(listener.handler_state("initfail"), Some(3));
    // Between two attempts (during one the module shows as "initialising").
    let (code, json) = wait_status(&mut listener, &notifier, "initfail failed", |_, j| {
        module_of(j, "initfail")["condition"] == "initialisation failed"
    });
    assert_eq!((code, &json["healthy"]), (1, &false.into()), "{json:#}");
    let module = module_of(&json, "initfail");
    assert_eq!(module["ready"], false, "{module:#}");
    assert!(module["next_init"].is_u64(), "{module:#}");
    assert_eq!(module["last_error"]["call"], "initialisation");
    let message = module["last_error"]["message"].as_str().unwrap();
    assert!(
        message.contains("RuntimeError: backend unavailable"),
        "{message}"
    );
    let text = listener
        .wait_until("initfail failed in the text", T, |l| {
            let text = ctrl(l, &notifier, &["status"]);
            Ok(text
                .stdout
                .contains("\tinitialisation failed, ")
                .then_some(text))
        })
        .unwrap();
    assert_eq!(text.code, 1);
    assert!(text.stdout.contains("\tinitfail\t"), "{}", text.stdout);
    assert!(
        listener
            .log()
            .contains("initializing module initfail (attempt 2)")
    );

    // Once initialize() succeeds the module is ready, and the status healthy.
    fs::remove_file(&broken).unwrap();
    let (code, json) = wait_status(&mut listener, &notifier, "initfail ready", |code, j| {
        code == 0 && module_of(j, "initfail")["condition"] == "ready"
    });
    assert_eq!(json["healthy"], true);
    assert_eq!(code, 0);
    assert_eq!(listener.handler_state("initfail"), Some(3));
}

#[test]
fn a_module_that_does_not_load_is_listed_and_unhealthy_until_reloaded_fixed() {
    let (slapd, notifier) = stack();
    let modules = module_dir(
        "broken.py",
        "name = 'broken'\ndescription = 'a syntax error'\ndef handler(dn, new, old:\n",
    )
    .unwrap();
    let file = modules.path().join("broken.py");
    let mut listener = health_listener(&slapd, &notifier, modules.path(), &[]);
    let (code, json) = wait_status(&mut listener, &notifier, "broken listed", |_, j| {
        !module_of(j, "broken").is_null()
    });
    assert_eq!((code, &json["healthy"]), (1, &false.into()), "{json:#}");
    let module = module_of(&json, "broken");
    assert_eq!(module["condition"], "failed to load", "{module:#}");
    assert_eq!(module["file"], file.display().to_string());
    assert_eq!(module["ready"], false);
    assert_eq!(module["last_error"]["call"], "load");
    let message = module["last_error"]["message"].as_str().unwrap();
    assert!(message.contains("SyntaxError"), "{message}");
    let text = ctrl(&listener, &notifier, &["status"]);
    assert_eq!(text.code, 1);
    // State 0: the module never got a state file.
    let line = format!("0\tbroken\t{}\tfailed to load, last error ", file.display());
    assert!(text.stdout.contains(&line), "{}", text.stdout);
    assert!(text.stdout.contains("SyntaxError"), "{}", text.stdout);

    // Fixed and reloaded (SIGHUP): loaded, initialised, healthy.
    fs::write(
        &file,
        "name = 'broken'\ndescription = 'fixed'\nfilter = '(cn=healthfixed)'\n\
         def handler(dn, new, old):\n    pass\n",
    )
    .unwrap();
    listener.signal(libc::SIGHUP).unwrap();
    let (_, json) = wait_status(&mut listener, &notifier, "broken loaded", |code, j| {
        code == 0 && module_of(j, "broken")["condition"] == "ready"
    });
    assert_eq!(json["healthy"], true, "{json:#}");
    assert_eq!(
        module_of(&json, "broken")["file"],
        file.display().to_string()
    );
}

const SLOW: &str = r#"
import os, time
name = 'slow'
description = 'does not return for cn=healthslow until the test releases it'
filter = '(cn=healthslow)'
_RELEASE = os.path.join(os.path.dirname(__file__), 'release')

def handler(dn, new, old):
    deadline = time.monotonic() + 120
    while not os.path.exists(_RELEASE) and time.monotonic() < deadline:
        time.sleep(0.05)
"#;

#[test]
fn a_handler_that_does_not_return_shows_as_blocked() {
    let (slapd, notifier) = stack();
    let modules = module_dir("slow.py", SLOW).unwrap();
    let mut listener =
        health_listener(&slapd, &notifier, modules.path(), &["--blocked-after", "1"]);
    // `slow` is initialised after `jsonl`: an object added before that pass ends would
    // block in the pass's `n` call instead of in a transaction.
    listener.wait_modules_ready(&["slow"], T).unwrap();
    let dn = format!("cn=healthslow,{BASE}");
    slapd.admin().unwrap().add_role(&dn, "healthslow").unwrap();
    let id = notifier.wait_transaction(&dn, 'a', T).unwrap();

    let (code, json) = wait_status(&mut listener, &notifier, "a blocked call", |_, j| {
        j["current_call"]["blocked"] == true
    });
    assert_eq!((code, &json["healthy"]), (1, &false.into()), "{json:#}");
    assert_eq!(
        json["listener"]["state"], "running",
        "not waiting: {json:#}"
    );
    let call = &json["current_call"];
    assert_eq!(call["module"], "slow");
    assert_eq!(call["function"], "handler");
    assert_eq!(call["dn"], dn.as_str());
    assert!(call["seconds"].as_f64().unwrap() >= 1.0, "{call:#}");
    assert_eq!(json["blocked_after"], 1.0);
    let text = ctrl(&listener, &notifier, &["status"]);
    assert_eq!(text.code, 1);
    let line = format!(" blocked: module slow in handler for {dn} since ");
    assert!(text.stdout.contains(&line), "{}", text.stdout);
    assert!(text.stdout.contains(" s (limit 1 s)\n"), "{}", text.stdout);

    // Released, the call returns: no longer blocked, healthy again.
    fs::write(modules.path().join("release"), "").unwrap();
    listener.wait_for_id(id, T).unwrap();
    let (code, json) = wait_status(&mut listener, &notifier, "healthy again", |code, _| {
        code == 0
    });
    assert_eq!(json["healthy"], true);
    assert_eq!(code, 0);
    assert!(
        !json["current_call"]["blocked"].as_bool().unwrap_or(false),
        "{json:#}"
    );
    let text = ctrl(&listener, &notifier, &["status"]);
    assert!(!text.stdout.contains("blocked:"), "{}", text.stdout);
}

/// Sends one request to the control socket as `user` (a child process with that uid) and
/// returns what it got: the reply line, or the connect error.
fn control_request_as(user: &str, socket: &std::path::Path, request: &str) -> String {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_UNIX)\n\
         try:\n\
         \x20   s.connect({socket:?})\n\
         except OSError as e:\n\
         \x20   print('connect:', e.strerror); raise SystemExit\n\
         s.sendall({request:?}.encode() + b'\\n')\n\
         print(s.makefile().readline().strip())\n",
        socket = socket.to_str().unwrap()
    );
    let output = std::process::Command::new("runuser")
        .args(["-u", user, "--", "python3", "-c", &script])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The control socket hands a cache snapshot (password hashes included) to root and the
/// listener's user only: another user cannot even connect (mode 0600 in a 0700
/// directory), and where an administrator loosened both modes, the peer's credentials
/// (SO_PEERCRED) still refuse the snapshot.
#[test]
fn the_control_socket_refuses_another_user() {
    if !integration_tests::users::is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let user = integration_tests::users::TempUser::create("ctl");
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    let mut listener = Listener::start(&slapd, &notifier, ListenerOptions::new()).unwrap();
    listener.wait_initialized(T).unwrap();
    let socket = listener.cache_dir().join("control.sock");
    let mode = fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let denied = control_request_as(&user.name, &socket, "STATUS");
    assert_eq!(denied, "connect: Permission denied");

    for dir in [listener.dir().to_path_buf(), listener.cache_dir()] {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o666)).unwrap();
    let target = tempfile::tempdir().unwrap();
    fs::set_permissions(target.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let reply = control_request_as(
        &user.name,
        &socket,
        &format!("SNAPSHOT {}", target.path().display()),
    );
    assert!(reply.starts_with("ERROR SNAPSHOT refused: uid"), "{reply}");
    assert!(
        fs::read_dir(target.path()).unwrap().next().is_none(),
        "something was copied"
    );
    listener.stop().unwrap();
}

/// The cache of the version before the LMDB store (sled), as a crash left it, is imported
/// at its first open, here by the dump tool: the flushed entries, the commit that was only
/// in its commit log, the master record; the old directory goes. See `fixtures/README.md`.
#[test]
fn the_cache_of_the_previous_version_is_imported_at_its_first_open() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/sled-cache/cache.sled");
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join(cache::SLED_DIR);
    fs::create_dir(&old).unwrap();
    // sled's empty `blobs/` directory is not in git; sled creates it again.
    for file in fs::read_dir(&fixture).unwrap() {
        let file = file.unwrap();
        fs::copy(file.path(), old.join(file.file_name())).unwrap();
    }
    let cache_dir = dir.path().display().to_string();

    let ids = tool(DUMP, &["-c", &cache_dir, "-i"]);
    assert_eq!((ids.code, ids.stdout.as_str()), (0, "9 3\n"), "{ids:?}");
    assert!(!old.exists(), "the old database is removed");
    assert!(dir.path().join(cache::DB_DIR).join("data.mdb").exists());

    let dump = tool(DUMP, &["-c", &cache_dir]);
    assert_eq!(dump.code, 0, "{dump:?}");
    let dns: Vec<&str> = dump
        .stdout
        .lines()
        .filter(|l| l.starts_with("dn:"))
        .collect();
    assert_eq!(dns.len(), 21, "{}", dump.stdout);
    assert!(dump.stdout.contains("dn: cn=old19,dc=example,dc=com\n"));
    assert!(!dump.stdout.contains("dn: cn=old0,dc=example,dc=com\n"));
    // The DN only in the commit log; not ASCII, so base64.
    assert!(
        dump.stdout
            .contains("dn:: Y249QsOkcixkYz1leGFtcGxlLGRjPWNvbQ==\n"),
        "{}",
        dump.stdout
    );
}
