//! The demo runner end to end: `univention-directory-demo --once` starts slapd, notifier and
//! listener, applies its sample changes with ldap-utils and must see every handler call.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use integration_tests::process::binary;
use integration_tests::slapd::BASE;

const DEMO: &str = "univention-directory-demo";
/// Far above a healthy run (a few seconds); the demo's own waits give up after 60 s each.
const TIMEOUT: Duration = Duration::from_secs(180);
/// After a timeout the demo gets SIGTERM first, so it stops its slapd, notifier and
/// listener (which run in their own process groups) instead of leaving them behind.
const GRACE: Duration = Duration::from_secs(20);

fn read_all(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn wait(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn demo_once_shows_every_handler_call() {
    let mut child = Command::new(binary(DEMO).unwrap())
        .arg("--once")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = read_all(child.stdout.take().unwrap());
    let stderr = read_all(child.stderr.take().unwrap());
    let status = match wait(&mut child, TIMEOUT) {
        Some(status) => Some(status),
        None => {
            let pid = libc::pid_t::try_from(child.id()).unwrap();
            // SAFETY: kill(2) with the pid of our own, not yet reaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            if wait(&mut child, GRACE).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            None
        }
    };
    let stdout = stdout.join().unwrap();
    let stderr = stderr.join().unwrap();
    let report = format!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    let status = status.unwrap_or_else(|| panic!("demo still running after {TIMEOUT:?}\n{report}"));
    assert!(status.success(), "demo exited with {status}\n{report}");

    let alice = format!("uid=alice,ou=people,{BASE}");
    let alicia = format!("uid=alicia,ou=people,{BASE}");
    let moved = format!("uid=alicia,ou=alumni,{BASE}");
    for call in [
        format!("jsonl a {alice}"),
        format!("jsonl m {alice}"),
        format!("jsonl r {alice}"),
        format!("jsonl a {alicia}"),
        format!("jsonl r {alicia}"),
        format!("jsonl a {moved}"),
        format!("jsonl d {moved}"),
    ] {
        assert!(
            stdout.contains(&format!("] {call}")),
            "no handler call line `{call}`\n{report}"
        );
    }
    // The Python module's journal: the object-oriented API reports both moves as moves.
    for line in [
        format!("python user_journal: created alice {alice}"),
        "python user_journal: modified alice mail".to_owned(),
        format!("python user_journal: moved alicia {alice} -> {alicia}"),
        format!("python user_journal: moved alicia {alicia} -> {moved}"),
        format!("python user_journal: removed alicia {moved}"),
    ] {
        assert!(stdout.contains(&line), "no journal line `{line}`\n{report}");
    }
    // The modify line names the changed attribute with its old and new value.
    assert!(
        stdout.contains("mail: alice@example.com → alice.liddell@example.com"),
        "{report}"
    );
}
