//! The listener's LDAP connection options end to end, against real slapd and the real
//! notifier: StartTLS required (`-ZZ`) and tried (`-Z`) with trusted and untrusted server
//! certificates and against a server without TLS, the machine password rotating under a
//! running listener (`-y` is re-read), and SASL EXTERNAL over ldapi (the default without
//! `-x`).
//!
//! TLS instances get a throwaway CA; the listener trusts it through `SSL_CERT_FILE`, which
//! OpenSSL (native-tls) reads for its default trust store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::time::Duration;

use integration_tests::slapd::{BASE, HOST_DN, RESTRICTED_DN};
use integration_tests::{Listener, ListenerOptions, Notifier, Slapd, SlapdConfig, wait_until};
use ldap3::Mod;

/// Far above what a healthy stack needs; a timeout means something is broken.
const T: Duration = Duration::from_secs(60);
/// Failed connection attempts a listener that must not process is watched for: the
/// startup backoff starts at 1 s and doubles, so three attempts take about 3 s.
const ATTEMPTS: usize = 3;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn dn(cn: &str) -> String {
    format!("cn={cn},{BASE}")
}

/// slapd as configured and a notifier following its accesslog, once the notifier's
/// starting point is fixed (later writes are transactions).
fn stack(config: SlapdConfig) -> (Slapd, Notifier) {
    let slapd = Slapd::start(config).unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    (slapd, notifier)
}

fn tls_stack() -> (Slapd, Notifier) {
    stack(SlapdConfig::provider().dbnosync(true).tls(true))
}

/// The id of the newest transaction `<id> <dn> <command>` in the notifier's log.
fn transaction_id(notifier: &Notifier, dn: &str, command: char) -> u64 {
    notifier.wait_transaction(dn, command, T).unwrap()
}

/// Adds `dn` (an `organizationalRole`) as the rootdn, waits until the listener has
/// processed its transaction and asserts the handler saw the add.
fn add_and_expect(slapd: &Slapd, notifier: &Notifier, listener: &mut Listener, dn: &str) {
    let cn = dn
        .strip_prefix("cn=")
        .and_then(|rest| rest.split(',').next())
        .unwrap();
    slapd.admin().unwrap().add_role(dn, cn).unwrap();
    let id = transaction_id(notifier, dn, 'a');
    listener.wait_for_id(id, T).unwrap();
    let calls: Vec<(u64, char, String)> = listener
        .changes()
        .unwrap()
        .into_iter()
        .filter(|change| change.id == id)
        .map(|change| (change.id, change.command, change.dn))
        .collect();
    assert_eq!(calls, [(id, 'a', dn.to_owned())], "handler calls of {id}");
}

/// Waits until `needle` occurs at least `count` times in the listener's log (failing at
/// once if the daemon exits), and returns the log.
fn wait_log_count(listener: &mut Listener, needle: &str, count: usize) -> String {
    let what = format!("{count} log lines with {needle:?}");
    listener
        .wait_until(&what, T, |listener| {
            let log = listener.log();
            Ok((log.matches(needle).count() >= count).then_some(log))
        })
        .unwrap()
}

/// A listener that cannot connect: it keeps trying (at least [`ATTEMPTS`] failures with
/// `error` in the log), keeps running and has processed nothing.
fn assert_retrying_without_processing(listener: &mut Listener, error: &str) {
    let log = wait_log_count(listener, error, ATTEMPTS);
    assert!(
        log.matches("retrying in").count() >= ATTEMPTS,
        "each failed attempt is retried; log:\n{log}"
    );
    assert!(listener.is_running(), "the listener exited; log:\n{log}");
    assert_eq!(listener.notifier_id(), None, "nothing may be processed");
    assert!(listener.changes().unwrap().is_empty(), "no handler calls");
}

/// The connections on which slapd established TLS (`conn=N fd=F TLS established …` in
/// its `-d stats` log), and how many of them are closed again. Only the listener uses
/// TLS: the harness's connections are plain and the notifier's go over ldapi.
fn tls_sessions(slapd: &Slapd) -> (usize, usize) {
    let log = fs::read_to_string(slapd.log_path()).unwrap();
    let conn = |line: &str| {
        line.split_whitespace()
            .find(|w| w.starts_with("conn="))
            .map(str::to_owned)
    };
    let established: Vec<String> = log
        .lines()
        .filter(|line| line.contains("TLS established"))
        .filter_map(conn)
        .collect();
    let closed = log
        .lines()
        .filter(|line| line.contains(" closed"))
        .filter_map(conn)
        .filter(|c| established.contains(c))
        .count();
    (established.len(), closed)
}

// ---------------------------------------------------------------------------------------
// 1. StartTLS with a trusted certificate
// ---------------------------------------------------------------------------------------

#[test]
fn starttls_required_with_a_trusted_certificate_replicates() {
    let (slapd, notifier) = tls_stack();
    let options = ListenerOptions::new()
        .arg("-ZZ")
        .env("SSL_CERT_FILE", slapd.ca_cert_path().display().to_string())
        .env_remove("SSL_CERT_DIR");
    let mut listener = Listener::start(&slapd, &notifier, options).unwrap();
    listener.wait_initialized(T).unwrap();
    assert!(
        tls_sessions(&slapd).0 >= 1,
        "the listener's LDAP session uses TLS"
    );

    add_and_expect(&slapd, &notifier, &mut listener, &dn("tls-one"));
    // Idle (postrun delay 1 s) closes the LDAP connection; the next change reconnects,
    // again with StartTLS.
    let sessions = wait_until("the idle listener to close its TLS connections", T, || {
        let (established, closed) = tls_sessions(&slapd);
        Ok((established == closed).then_some(established))
    })
    .unwrap();
    add_and_expect(&slapd, &notifier, &mut listener, &dn("tls-two"));
    assert!(
        tls_sessions(&slapd).0 > sessions,
        "the reconnect after idle uses TLS too"
    );
    assert!(
        !listener.log().contains("continuing without TLS"),
        "-ZZ never falls back"
    );
}

#[test]
fn starttls_required_by_host_name_replicates() {
    let (slapd, notifier) = tls_stack();
    let options = ListenerOptions::new()
        .args(["-ZZ", "-H", &slapd.ldap_url_localhost()])
        .env("SSL_CERT_FILE", slapd.ca_cert_path().display().to_string())
        .env_remove("SSL_CERT_DIR");
    let mut listener = Listener::start(&slapd, &notifier, options).unwrap();
    listener.wait_initialized(T).unwrap();
    assert!(
        tls_sessions(&slapd).0 >= 1,
        "the listener's LDAP session uses TLS"
    );
    add_and_expect(&slapd, &notifier, &mut listener, &dn("tls-localhost"));
}

// ---------------------------------------------------------------------------------------
// 2. StartTLS with an untrusted certificate
// ---------------------------------------------------------------------------------------

/// Options that trust only the system store, which never holds the throwaway CA.
fn untrusting(starttls: &str) -> ListenerOptions {
    ListenerOptions::new()
        .arg(starttls)
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
}

#[test]
fn starttls_required_with_an_untrusted_certificate_processes_nothing() {
    let (slapd, notifier) = tls_stack();
    // A change waiting at the notifier that must not be processed.
    slapd
        .admin()
        .unwrap()
        .add_role(&dn("untrusted"), "untrusted")
        .unwrap();
    transaction_id(&notifier, &dn("untrusted"), 'a');
    let mut listener = Listener::start(&slapd, &notifier, untrusting("-ZZ")).unwrap();
    assert_retrying_without_processing(&mut listener, "certificate verify failed");
    assert_eq!(tls_sessions(&slapd).0, 0, "no TLS session was established");
    assert!(
        !listener.log().contains("continuing without TLS"),
        "-ZZ never falls back"
    );
}

#[test]
fn starttls_tried_with_an_untrusted_certificate_falls_back_to_plain_ldap() {
    let (slapd, notifier) = tls_stack();
    let mut listener = Listener::start(&slapd, &notifier, untrusting("-Z")).unwrap();
    listener.wait_initialized(T).unwrap();
    let log = listener.log();
    assert!(
        log.contains("continuing without TLS") && log.contains("certificate verify failed"),
        "the fallback is logged as a warning with its reason; log:\n{log}"
    );
    assert!(
        log.lines()
            .filter(|line| line.contains("continuing without TLS"))
            .all(|line| line.contains("WARN")),
        "the fallback is a warning; log:\n{log}"
    );
    add_and_expect(&slapd, &notifier, &mut listener, &dn("fallback"));
    assert_eq!(tls_sessions(&slapd).0, 0, "the session is plain LDAP");
}

// ---------------------------------------------------------------------------------------
// 3. StartTLS required against a server without TLS
// ---------------------------------------------------------------------------------------

#[test]
fn starttls_required_against_a_server_without_tls_keeps_retrying() {
    let (slapd, notifier) = stack(SlapdConfig::provider().dbnosync(true));
    let mut listener =
        Listener::start(&slapd, &notifier, ListenerOptions::new().arg("-ZZ")).unwrap();
    assert_retrying_without_processing(&mut listener, "retrying in");
    // The error must say what failed: StartTLS (slapd without TLS refuses the extended
    // operation), as OpenLDAP's clients do (`ldap_start_tls: Protocol error (2)`).
    let log = listener.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("retrying in"))
        .collect();
    assert!(
        errors
            .iter()
            .all(|line| line.to_ascii_lowercase().contains("tls")),
        "every connection error names StartTLS; errors:\n{}",
        errors.join("\n")
    );
}

#[test]
fn starttls_tried_against_a_server_without_tls_falls_back_to_plain_ldap() {
    let (slapd, notifier) = stack(SlapdConfig::provider().dbnosync(true));
    let mut listener =
        Listener::start(&slapd, &notifier, ListenerOptions::new().arg("-Z")).unwrap();
    listener.wait_initialized(T).unwrap();
    let log = listener.log();
    assert!(
        log.lines()
            .any(|line| line.contains("WARN") && line.contains("continuing without TLS")),
        "the fallback is logged as a warning; log:\n{log}"
    );
    add_and_expect(&slapd, &notifier, &mut listener, &dn("no-tls-fallback"));
}

// ---------------------------------------------------------------------------------------
// 4. Machine password rotation (`-y`)
// ---------------------------------------------------------------------------------------

/// Sets the host account's password in LDAP (as the rootdn).
fn set_host_password(slapd: &Slapd, password: &str) {
    slapd
        .admin()
        .unwrap()
        .modify(
            HOST_DN,
            vec![Mod::Replace(
                b"userPassword".to_vec(),
                [password.as_bytes().to_vec()].into_iter().collect(),
            )],
        )
        .unwrap();
}

/// Binds as the host account in a piece of slapd's `-d stats` log: `(attempts,
/// successes)`, matching `conn=N op=M BIND dn="…"` with `conn=N op=M RESULT tag=97 err=0`.
fn host_binds(log: &str) -> (usize, usize) {
    let key = |line: &str| {
        let mut words = line.split_whitespace();
        let conn = words.find(|w| w.starts_with("conn="))?;
        let op = words.next().filter(|w| w.starts_with("op="))?;
        Some(format!("{conn} {op}"))
    };
    let bind = format!("BIND dn=\"{HOST_DN}\"");
    let attempts: Vec<String> = log
        .lines()
        .filter(|line| line.contains(&bind))
        .filter_map(key)
        .collect();
    let successes = log
        .lines()
        .filter(|line| line.contains("RESULT tag=97 err=0 "))
        .filter_map(key)
        .filter(|k| attempts.contains(k))
        .count();
    (attempts.len(), successes)
}

#[test]
fn a_rotated_machine_password_is_read_from_the_file_on_reconnect() {
    let (mut slapd, notifier) = stack(SlapdConfig::provider().dbnosync(true));
    let mut listener = Listener::start(&slapd, &notifier, ListenerOptions::new()).unwrap();
    listener.wait_initialized(T).unwrap();
    add_and_expect(&slapd, &notifier, &mut listener, &dn("before-rotation"));

    // Rotate as a UCS host does: the server's password first, then the secret file.
    let rotated = "rotated-secret";
    set_host_password(&slapd, rotated);
    fs::write(listener.password_file(), rotated).unwrap();
    assert!(
        slapd
            .simple_bind(HOST_DN, integration_tests::slapd::HOST_PW)
            .is_err(),
        "the old password is gone"
    );
    let rotation_id = transaction_id(&notifier, HOST_DN, 'm');
    listener.wait_for_id(rotation_id, T).unwrap();

    // A restart drops every connection: the listener must bind again, with the new
    // password.
    let before_restart = fs::read_to_string(slapd.log_path()).unwrap().len();
    slapd.restart().unwrap();
    add_and_expect(&slapd, &notifier, &mut listener, &dn("after-rotation"));
    let log = fs::read_to_string(slapd.log_path()).unwrap();
    let (binds, successful) = host_binds(&log[before_restart..]);
    assert!(
        binds >= 1 && successful >= 1,
        "after the restart the listener bound as {HOST_DN} ({binds} binds, {successful} \
         successful)"
    );
    assert!(listener.is_running());
}

#[test]
fn a_wrong_password_at_start_is_retried_until_the_file_is_fixed() {
    let (slapd, notifier) = stack(SlapdConfig::provider().dbnosync(true));
    let mut listener = Listener::prepare(&slapd, &notifier, ListenerOptions::new()).unwrap();
    fs::write(listener.password_file(), "wrong-secret").unwrap();
    listener.restart().unwrap();
    // Two failed attempts: the listener is retrying, not stuck in its first one.
    let log = wait_log_count(&mut listener, "invalid credentials", 2);
    assert!(listener.is_running(), "the listener exited; log:\n{log}");
    assert_eq!(listener.notifier_id(), None, "nothing processed yet");

    fs::write(listener.password_file(), integration_tests::slapd::HOST_PW).unwrap();
    listener.wait_initialized(T).unwrap();
    add_and_expect(&slapd, &notifier, &mut listener, &dn("fixed-password"));
}

// ---------------------------------------------------------------------------------------
// 5. SASL EXTERNAL over ldapi
// ---------------------------------------------------------------------------------------

#[test]
fn sasl_external_over_ldapi_binds_as_root_and_sees_everything() {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: slapd maps only root to the identity its ACLs trust");
        return;
    }
    let (slapd, notifier) = stack(SlapdConfig::provider().dbnosync(true));
    let secret = format!("cn=secret,{RESTRICTED_DN}");
    slapd.admin().unwrap().add_role(&secret, "secret").unwrap();
    transaction_id(&notifier, &secret, 'a');
    // `--user root`: started as root, the daemon would otherwise switch its effective uid
    // to the `listener` user where one exists, and slapd would see that uid.
    let options = ListenerOptions::new()
        .sasl_external_ldapi()
        .args(["--user", "root"]);
    let mut listener = Listener::start(&slapd, &notifier, options).unwrap();
    let args = listener.args().to_vec();
    assert!(
        !args
            .iter()
            .any(|a| a == "-x" || a == "-D" || a == "-y" || a == "-h"),
        "no simple-bind options: {args:?}"
    );
    assert!(args.contains(&slapd.ldapi_url()), "{args:?}");
    listener.wait_initialized(T).unwrap();

    // The initial sync (`n` calls) saw the restricted subtree, which the host account
    // cannot.
    let init: Vec<String> = listener
        .changes()
        .unwrap()
        .into_iter()
        .filter(|change| change.command == 'n')
        .map(|change| change.dn)
        .collect();
    for expected in [RESTRICTED_DN, secret.as_str()] {
        assert!(
            init.iter().any(|dn| dn == expected),
            "initial sync must include {expected}: {init:?}"
        );
    }

    add_and_expect(&slapd, &notifier, &mut listener, &dn("external"));
    add_and_expect(
        &slapd,
        &notifier,
        &mut listener,
        &format!("cn=hidden,{RESTRICTED_DN}"),
    );
}

/// The error chain rule: a refused notifier connection is logged with its cause once, not
/// once per layer that wrapped it.
#[test]
fn a_refused_notifier_is_logged_with_its_cause_once() {
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    let closed = integration_tests::net::free_port().unwrap();
    let options = ListenerOptions::new().args(["--notifier-port", &closed.to_string()]);
    let listener = Listener::start(&slapd, &notifier, options).unwrap();
    wait_until("a refused connection in the log", T, || {
        Ok(listener.log().contains("retrying in").then_some(()))
    })
    .unwrap();
    let log = listener.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Connection refused"))
        .collect();
    assert!(!refused.is_empty(), "{log}");
    for line in refused {
        assert_eq!(line.matches("Connection refused").count(), 1, "{line}");
    }
}

/// The bind password from `-y` reaches no log line, at the highest debug level (the
/// harness runs the listener with `-d 4`), through start, a transaction, a module reload
/// (which hands the modules `bindpw` again) and the stop.
#[test]
fn the_bind_password_never_reaches_the_log() {
    use integration_tests::slapd::HOST_PW;
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    let mut listener = Listener::start(&slapd, &notifier, ListenerOptions::new()).unwrap();
    listener.wait_initialized(T).unwrap();
    let dn = format!("cn=secret-check,{BASE}");
    slapd
        .admin()
        .unwrap()
        .add_role(&dn, "secret-check")
        .unwrap();
    let id = notifier.wait_transaction(&dn, 'a', T).unwrap();
    listener.wait_for_id(id, T).unwrap();
    listener.signal(libc::SIGHUP).unwrap();
    wait_until("the reload", T, || {
        Ok(listener.log().contains("modules reloaded").then_some(()))
    })
    .unwrap();
    listener.stop().unwrap();
    let log = listener.log();
    assert!(log.contains("DEBUG"), "not the highest level:\n{log}");
    assert!(
        !log.contains(HOST_PW),
        "the bind password is in the log:\n{log}"
    );
}
