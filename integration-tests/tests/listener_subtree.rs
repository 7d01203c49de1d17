//! A large subtree move end to end: an OU with 20,000 descendants renamed while the
//! listener runs with the default `jsonl` module (which opts in to subtree moves). The
//! cache follows in one commit (`verify` is clean), the module gets an `r` + `a` per
//! descendant, and the daemon's peak memory stays bounded.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use integration_tests::process::binary;
use integration_tests::slapd::{BASE, HOST_DN};
use integration_tests::{Listener, ListenerOptions, Notifier, Slapd, SlapdConfig};

const USERS: usize = 20_000;
const SUB_OUS: usize = 10;
const WAIT: Duration = Duration::from_secs(300);
/// The bench's goal for the daemon with 100,000 cached entries (benches/listener.rs (c));
/// a debug build measured 95 MB for this test's move, hence the margin.
const PEAK_RSS_BOUND_KB: u64 = 150 * 1024;

fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_subtree_of_20000_descendants_moves_within_the_memory_bound() {
    let mut slapd = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let old = format!("ou=big,{BASE}");
    let mut ldif = format!("dn: {old}\nobjectClass: organizationalUnit\nou: big\n\n");
    for sub in 0..SUB_OUS {
        let _ = write!(
            ldif,
            "dn: ou=sub{sub},{old}\nobjectClass: organizationalUnit\nou: sub{sub}\n\n"
        );
    }
    for i in 0..USERS {
        let _ = write!(
            ldif,
            "dn: cn=r{i},ou=sub{},{old}\nobjectClass: organizationalRole\ncn: r{i}\n\
             description: descendant {i} of a large subtree\n\n",
            i % SUB_OUS
        );
    }
    slapd.slapadd(&ldif).unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &[], WAIT).unwrap();
    let mut listener = Listener::start(&slapd, &notifier, ListenerOptions::new()).unwrap();
    listener.wait_initialized(WAIT).unwrap();
    let pid = listener.process().and_then(|p| p.pid()).unwrap();
    let skip = listener.changes().unwrap().len();

    let new = format!("ou=big2,{BASE}");
    let mut admin = slapd.admin().unwrap();
    let started = Instant::now();
    admin.modrdn(&old, "ou=big2", true, None).unwrap();
    let id = notifier.wait_transaction(&new, 'a', WAIT).unwrap();
    listener.wait_for_id(id, WAIT).unwrap();
    let took = started.elapsed();
    let peak = status_kb(pid, "VmHWM:");
    eprintln!(
        "moved {} descendants in {took:?} ({:.0} us each); VmHWM {} kB",
        USERS + SUB_OUS,
        took.as_secs_f64() * 1e6 / (USERS + SUB_OUS) as f64,
        peak
    );
    assert!(peak < PEAK_RSS_BOUND_KB, "VmHWM {peak} kB");

    let changes = listener.changes().unwrap();
    let moved = &changes[skip..];
    let count = |c: char| moved.iter().filter(|m| m.command == c).count();
    assert_eq!(count('r'), 1 + USERS + SUB_OUS);
    assert_eq!(count('a'), 1 + USERS + SUB_OUS);
    assert!(
        moved
            .iter()
            .filter(|m| m.command == 'a')
            .all(|m| m.dn.ends_with(&new)),
        "every a under the new DN"
    );

    let cache = listener.cache_dir().display().to_string();
    let password = listener.password_file().display().to_string();
    let url = slapd.ldap_url();
    let out = std::process::Command::new(binary("univention-directory-listener-verify").unwrap())
        .args([
            "-c", &cache, "-H", &url, "-b", BASE, "-D", HOST_DN, "-y", &password,
        ])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        (
            out.status.code(),
            stdout.lines().take(5).collect::<Vec<_>>()
        ),
        (Some(0), Vec::new()),
        "verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
