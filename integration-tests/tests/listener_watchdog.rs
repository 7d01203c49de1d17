//! The systemd watchdog follows the listener's progress, not the mere life of its runtime:
//! it keeps being fed through a long module initialisation (progress per object) and stops
//! when the main loop is wedged in a module call that never returns, so systemd restarts
//! the daemon. systemd is played by a datagram socket in `NOTIFY_SOCKET`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::slapd::BASE;
use integration_tests::{Listener, ListenerOptions, Notifier, Slapd, wait_until};

const T: Duration = Duration::from_secs(120);
/// `WATCHDOG_USEC`: the listener pings every quarter of it while it makes progress.
const WATCHDOG: Duration = Duration::from_secs(2);
/// Objects the module initialises, each taking `SLOW_CALL`: an initialisation several
/// watchdog intervals long.
const OBJECTS: usize = 120;
const SLOW_CALL: f64 = 0.05;

/// When each `WATCHDOG=1` arrived.
struct FakeSystemd {
    pings: Arc<Mutex<Vec<Instant>>>,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl FakeSystemd {
    fn start() -> FakeSystemd {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        // The listener may run with another effective uid.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o777)).unwrap();
        let pings = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&pings);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "WATCHDOG=1")
                {
                    seen.lock().unwrap().push(Instant::now());
                }
            }
        });
        FakeSystemd {
            pings,
            _dir: dir,
            path,
        }
    }

    fn pings_between(&self, from: Instant, to: Instant) -> Vec<Instant> {
        let pings = self.pings.lock().unwrap();
        pings
            .iter()
            .copied()
            .filter(|t| *t >= from && *t <= to)
            .collect()
    }

    fn last_ping(&self) -> Option<Instant> {
        self.pings.lock().unwrap().last().copied()
    }
}

fn longest_gap(start: Instant, pings: &[Instant], end: Instant) -> Duration {
    let mut marks = vec![start];
    marks.extend_from_slice(pings);
    marks.push(end);
    marks
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
        .unwrap_or_default()
}

#[test]
fn fed_through_a_long_initialisation_and_not_when_wedged() {
    let slapd = Slapd::provider().unwrap();
    let mut admin = slapd.admin().unwrap();
    for i in 0..OBJECTS {
        admin
            .add_role(&format!("cn=slow{i},{BASE}"), &format!("slow{i}"))
            .unwrap();
    }
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    let systemd = FakeSystemd::start();
    let modules = integration_tests::listener::module_dir(
        "slow.py",
        &format!(
            "import time\n\
             name = 'slow'\n\
             description = 'slow to initialise, wedges on cn=wedge'\n\
             filter = '(objectClass=organizationalRole)'\n\
             def handler(dn, new, old, *command):\n\
             \x20   if dn.startswith('cn=wedge,'):\n\
             \x20       while True:\n\
             \x20           time.sleep(1)\n\
             \x20   time.sleep({SLOW_CALL})\n"
        ),
    )
    .unwrap();
    let options = ListenerOptions::new()
        .module_dir(modules.path())
        .env("NOTIFY_SOCKET", systemd.path.display().to_string())
        .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
        .env_remove("WATCHDOG_PID")
        .args(["--stop-timeout", "1"]);
    let started = Instant::now();
    let mut listener = Listener::start(&slapd, &notifier, options).unwrap();
    listener.wait_modules_ready(&["slow"], T).unwrap();
    let initialised = Instant::now();
    assert!(
        initialised - started > WATCHDOG * 2,
        "the initialisation was too short to show anything ({:?})",
        initialised - started
    );
    // First ping a quarter interval after start; then at most a quarter interval apart
    // while the module makes progress (with slack for a loaded machine).
    let pings = systemd.pings_between(started, initialised);
    let gap = longest_gap(started, &pings, initialised);
    assert!(
        gap < WATCHDOG,
        "no ping for {gap:?} during the initialisation ({} pings)",
        pings.len()
    );

    // Wedge the main loop in a module call that never returns.
    let wedged_at = Instant::now();
    admin
        .add_role(&format!("cn=wedge,{BASE}"), "wedge")
        .unwrap();
    wait_until("the watchdog to stop being fed", T, || {
        Ok(systemd
            .last_ping()
            .filter(|last| last.elapsed() > WATCHDOG * 2 && *last > wedged_at)
            .map(|_| ()))
    })
    .unwrap();
    assert!(
        listener.is_running(),
        "the wedged listener exited by itself"
    );
    let log = listener.log();
    assert!(
        log.contains("has made no progress") && log.contains("no longer feeding the watchdog"),
        "{}",
        listener.log_tail(20)
    );
    listener.kill().unwrap();
}
