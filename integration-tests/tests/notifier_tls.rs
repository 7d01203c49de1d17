//! STARTTLS on 6669 end to end: the real notifier with certificates made by the `openssl`
//! tool, the real listener and `get_notifier_id` as TLS clients, and raw UCS-style clients.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::pki::{Ca, Identity, Pki};
use integration_tests::process::binary;
use integration_tests::slapd::BASE;
use integration_tests::{Client, Intake, Listener, ListenerOptions, Notifier, Slapd, wait_until};

const T: Duration = Duration::from_secs(30);
const LOCAL: &str = "DNS:localhost,IP:127.0.0.1";

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// A notifier offering `server`'s certificate, plus `extra` options.
fn tls_notifier(slapd: &Slapd, server: &Identity, extra: &[&str]) -> Notifier {
    let mut args = vec![
        "--tls-certificate".to_owned(),
        path(&server.certificate),
        "--tls-key".to_owned(),
        path(&server.key),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Notifier::start(slapd, Intake::QueueFile, &args).unwrap()
}

/// Runs `get_notifier_id` against `notifier` with `extra` options: its stdout on success,
/// its stderr on failure.
fn get_id(notifier: &Notifier, extra: &[String]) -> Result<String, String> {
    let output = Command::new(binary("get_notifier_id").unwrap())
        .args(["-m", "127.0.0.1", "-t", "10", "-p"])
        .arg(notifier.port().to_string())
        // No UCR, and no machine certificate under this name.
        .args(["--ucr-file", "/nonexistent/base.conf"])
        .args(extra)
        .output()
        .unwrap();
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn tls_args(mode: &str, ca: &Ca, identity: Option<&Identity>) -> Vec<String> {
    let mut args = vec![
        "--notifier-tls".to_owned(),
        mode.to_owned(),
        "--notifier-tls-ca".to_owned(),
        path(&ca.certificate),
    ];
    if let Some(identity) = identity {
        args.extend([
            "--notifier-tls-certificate".to_owned(),
            path(&identity.certificate),
            "--notifier-tls-key".to_owned(),
            path(&identity.key),
        ]);
    }
    args
}

/// The notifier's metrics text from `--metrics addr`, once it holds every line of `wanted`
/// (a refused client is counted as it is closed, so the count may trail the close a little).
fn metrics_with(addr: &str, wanted: &[&str]) -> String {
    wait_until("the metrics", T, || {
        let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
            return Ok(None);
        };
        stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        std::io::Read::read_to_string(&mut stream, &mut body).unwrap();
        Ok(wanted
            .iter()
            .all(|w| body.contains(&format!("{w}\n")))
            .then_some(body))
    })
    .unwrap_or_else(|e| panic!("{e}: {wanted:?}"))
}

/// The notifier's log once it holds every text of `wanted`.
fn log_with(notifier: &Notifier, wanted: &[&str]) -> String {
    wait_until("the log lines", T, || {
        let log = notifier.log();
        Ok(wanted.iter().all(|w| log.contains(w)).then_some(log))
    })
    .unwrap_or_else(|e| panic!("{e}: {wanted:?}\n{}", notifier.log()))
}

/// A listener with a client certificate follows a notifier that requires one, over TLS; at
/// the highest debug level neither log holds a line of either private key.
#[test]
fn a_tls_listener_follows_a_notifier_that_requires_client_certificates() {
    let pki = Pki::new().unwrap();
    let ca = pki.ca("domain").unwrap();
    let server = pki.issue(&ca, "notifier", LOCAL).unwrap();
    let client = pki.issue(&ca, "replica", "DNS:replica.example").unwrap();
    let slapd = Slapd::provider().unwrap();
    let metrics = format!("127.0.0.1:{}", integration_tests::net::free_port().unwrap());
    let notifier = tls_notifier(
        &slapd,
        &server,
        &[
            "-d",
            "4",
            "--tls-policy",
            "client-cert",
            "--tls-ca",
            &path(&ca.certificate),
            "--metrics",
            &metrics,
        ],
    );
    let mut listener = Listener::start(
        &slapd,
        &notifier,
        ListenerOptions::new().args(tls_args("required", &ca, Some(&client))),
    )
    .unwrap();
    listener.wait_initialized(T).unwrap();
    notifier.queue(&format!("1 {BASE} m\n")).unwrap();
    listener.wait_for_id(1, T).unwrap();
    assert!(
        listener
            .log()
            .contains("connected to the notifier at 127.0.0.1"),
        "{}",
        listener.log()
    );
    assert!(listener.log().contains("(TLS)"), "{}", listener.log());
    metrics_with(&metrics, &["udn_clients 1", "udn_clients_tls 1"]);

    for (who, log) in [("notifier", notifier.log()), ("listener", listener.log())] {
        for identity in [&server, &client] {
            let lines = identity.key_lines().unwrap();
            assert!(!lines.is_empty());
            for line in lines {
                assert!(!log.contains(&line), "{who} log holds key material {line}");
            }
        }
        assert!(!log.contains("PRIVATE KEY"), "{who} log:\n{log}");
    }
}

/// With the default policy a notifier with a certificate serves unmodified UCS clients in
/// plain text, offers STARTTLS to clients that ask, and refuses clear-text bytes smuggled in
/// behind a STARTTLS request.
#[test]
fn plain_ucs_clients_keep_working_while_tls_is_optional() {
    let pki = Pki::new().unwrap();
    let ca = pki.ca("domain").unwrap();
    let server = pki.issue(&ca, "notifier", LOCAL).unwrap();
    let slapd = Slapd::provider().unwrap();
    let notifier = tls_notifier(&slapd, &server, &[]);

    let mut plain = notifier.client().unwrap();
    assert_eq!(
        plain.handshake(3).unwrap(),
        "Version: 3\nCapabilities: \n\n"
    );
    assert_eq!(plain.request(1, "GET_ID").unwrap(), "MSGID: 1\n0\n\n");

    let mut asking = notifier.client().unwrap();
    asking
        .send("Version: 3\nCapabilities: STARTTLS\n\n")
        .unwrap();
    assert_eq!(
        asking.block(T).unwrap(),
        "Version: 3\nCapabilities: STARTTLS\n\n"
    );

    let mut smuggler = notifier.client().unwrap();
    smuggler
        .send("Version: 3\nCapabilities: STARTTLS\n\nMSGID: 1\nGET_ID\n\n")
        .unwrap();
    assert!(smuggler.is_closed(T).unwrap());
    log_with(&notifier, &["clear-text data after STARTTLS"]);

    assert_eq!(
        get_id(&notifier, &tls_args("required", &ca, None)),
        Ok("0".into())
    );
    assert_eq!(get_id(&notifier, &[]), Ok("0".into()));
}

/// `--tls-policy required`: a client that does not upgrade is closed without an answer,
/// logged once with its address and reason, and counted.
#[test]
fn plain_clients_are_refused_when_tls_is_required() {
    let pki = Pki::new().unwrap();
    let ca = pki.ca("domain").unwrap();
    let server = pki.issue(&ca, "notifier", LOCAL).unwrap();
    let slapd = Slapd::provider().unwrap();
    let metrics = format!("127.0.0.1:{}", integration_tests::net::free_port().unwrap());
    let notifier = tls_notifier(
        &slapd,
        &server,
        &["--tls-policy", "required", "--metrics", &metrics],
    );

    for _ in 0..3 {
        let mut plain = notifier.client().unwrap();
        plain.send("Version: 3\nCapabilities: \n\n").unwrap();
        assert!(plain.is_closed(T).unwrap());
    }
    // Without a Capabilities line, a request is refused all the same.
    let mut sneaky = notifier.client().unwrap();
    sneaky.send("Version: 3\nMSGID: 1\nGET_ID\n\n").unwrap();
    assert!(sneaky.is_closed(T).unwrap());

    metrics_with(
        &metrics,
        &["udn_clients_refused_total{reason=\"plain_text\"} 4"],
    );
    let log = log_with(&notifier, &["refusing client 127.0.0.1: TLS is required"]);
    let refusals = log
        .matches("refusing client 127.0.0.1: TLS is required")
        .count();
    assert_eq!(refusals, 1, "{log}");

    assert_eq!(
        get_id(&notifier, &tls_args("try", &ca, None)),
        Ok("0".into())
    );
    metrics_with(&metrics, &["udn_clients_tls_total 1"]);

    // `ctrl` asks the notifier with the same settings.
    let ctrl = |extra: &[String]| {
        Command::new(binary("univention-directory-listener-ctrl").unwrap())
            .args([
                "--ucr-file",
                "/nonexistent/base.conf",
                "--notifier-host",
                "127.0.0.1",
            ])
            .args(["--notifier-port", &notifier.port().to_string()])
            .args(extra)
            .arg("notifier-id")
            .output()
            .unwrap()
    };
    let output = ctrl(&tls_args("required", &ca, None));
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "0");
    assert!(!ctrl(&[]).status.success(), "plain text must be refused");
    metrics_with(&metrics, &["udn_clients_tls_total 2"]);
}

/// `--tls-policy client-cert`: no certificate, or one from another CA, is refused in the
/// TLS handshake; one issued by the configured CA is served.
#[test]
fn client_certificates_must_come_from_the_configured_ca() {
    let pki = Pki::new().unwrap();
    let ca = pki.ca("domain").unwrap();
    let other = pki.ca("other").unwrap();
    let server = pki.issue(&ca, "notifier", LOCAL).unwrap();
    let good = pki.issue(&ca, "replica", "DNS:replica.example").unwrap();
    let stranger = pki
        .issue(&other, "stranger", "DNS:stranger.example")
        .unwrap();
    let slapd = Slapd::provider().unwrap();
    let metrics = format!("127.0.0.1:{}", integration_tests::net::free_port().unwrap());
    let notifier = tls_notifier(
        &slapd,
        &server,
        &[
            "-d",
            "4",
            "--tls-policy",
            "client-cert",
            "--tls-ca",
            &path(&ca.certificate),
            "--metrics",
            &metrics,
        ],
    );

    let without = get_id(&notifier, &tls_args("required", &ca, None)).unwrap_err();
    assert!(without.contains("get_notifier_id: "), "{without}");
    let wrong = get_id(&notifier, &tls_args("required", &ca, Some(&stranger))).unwrap_err();
    assert!(wrong.contains("get_notifier_id: "), "{wrong}");
    assert_eq!(
        get_id(&notifier, &tls_args("required", &ca, Some(&good))),
        Ok("0".into())
    );
    // A plain client is refused before any TLS.
    let mut plain = notifier.client().unwrap();
    plain.send("Version: 3\nCapabilities: \n\n").unwrap();
    assert!(plain.is_closed(T).unwrap());

    // The missing certificate, then the stranger's (logged at debug level as a repeat).
    log_with(
        &notifier,
        &[
            "refusing client 127.0.0.1: TLS handshake failed",
            "peer did not return a certificate",
            "refusing client 127.0.0.1 again: its certificate is not accepted",
        ],
    );
    metrics_with(
        &metrics,
        &[
            "udn_clients_refused_total{reason=\"tls_handshake\"} 2",
            "udn_clients_refused_total{reason=\"plain_text\"} 1",
        ],
    );
}

/// Connects to 127.0.0.1:`port` from 127.0.0.2, a second address on the loopback.
fn connect_from(source: [u8; 4], port: u16) -> Client {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = runtime
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(std::net::SocketAddr::from((source, 0)))?;
            socket
                .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                .await
        })
        .unwrap()
        .into_std()
        .unwrap();
    stream.set_nonblocking(false).unwrap();
    Client::from_stream(stream).unwrap()
}

/// `--allow`: addresses outside the list are closed before a byte is read; listed ones are
/// served, in plain text and TLS alike.
#[test]
fn the_allow_list_refuses_other_addresses() {
    let slapd = Slapd::provider().unwrap();
    let notifier =
        Notifier::start(&slapd, Intake::QueueFile, &["--allow", "127.0.0.2/32"]).unwrap();

    let mut outsider = connect_from([127, 0, 0, 1], notifier.port());
    assert!(outsider.is_closed(T).unwrap());
    let mut insider = connect_from([127, 0, 0, 2], notifier.port());
    assert_eq!(
        insider.handshake(3).unwrap(),
        "Version: 3\nCapabilities: \n\n"
    );
    assert_eq!(insider.request(1, "GET_ID").unwrap(), "MSGID: 1\n0\n\n");
    let log = log_with(
        &notifier,
        &["refusing client 127.0.0.1: its address is not in the allow-list"],
    );
    assert!(!log.contains("refusing client 127.0.0.2"), "{log}");
}

/// `try` falls back to plain text against a notifier that does not offer STARTTLS, and
/// `required` refuses it; against one that does, a failed TLS handshake is an error in `try`
/// too, never a fall-back.
#[test]
fn try_falls_back_only_when_starttls_is_not_offered() {
    let pki = Pki::new().unwrap();
    let ca = pki.ca("domain").unwrap();
    let other = pki.ca("other").unwrap();
    let server = pki.issue(&ca, "notifier", LOCAL).unwrap();
    let slapd = Slapd::provider().unwrap();

    let plain = Notifier::start(&slapd, Intake::QueueFile, &[]).unwrap();
    assert_eq!(get_id(&plain, &tls_args("try", &ca, None)), Ok("0".into()));
    let err = get_id(&plain, &tls_args("required", &ca, None)).unwrap_err();
    assert!(err.contains("does not offer STARTTLS"), "{err}");

    let tls = tls_notifier(&slapd, &server, &[]);
    let err = get_id(&tls, &tls_args("try", &other, None)).unwrap_err();
    assert!(
        err.contains("TLS with notifier at 127.0.0.1") && err.contains("not accepted"),
        "{err}"
    );
    // The name checked is the host connected to, unless another is given.
    let err = get_id(
        &tls,
        &[
            tls_args("try", &ca, None),
            vec!["--notifier-tls-name".into(), "primary.example".into()],
        ]
        .concat(),
    )
    .unwrap_err();
    assert!(err.contains("expected name primary.example"), "{err}");
}

/// SIGHUP reloads the certificate: new clients get the new one, a listener connected under
/// the old one keeps following on its connection.
#[test]
fn sighup_rotates_the_certificate_and_connections_keep_working() {
    let pki = Pki::new().unwrap();
    let old_ca = pki.ca("old").unwrap();
    let new_ca = pki.ca("new").unwrap();
    let old = pki.issue(&old_ca, "notifier-old", LOCAL).unwrap();
    let new = pki.issue(&new_ca, "notifier-new", LOCAL).unwrap();
    let served = Identity {
        certificate: pki.dir().join("served.pem"),
        key: pki.dir().join("served.key"),
    };
    std::fs::copy(&old.certificate, &served.certificate).unwrap();
    std::fs::copy(&old.key, &served.key).unwrap();
    let slapd = Slapd::provider().unwrap();
    let mut notifier = tls_notifier(&slapd, &served, &["--tls-policy", "required"]);
    let mut listener = Listener::start(
        &slapd,
        &notifier,
        ListenerOptions::new().args(tls_args("required", &old_ca, None)),
    )
    .unwrap();
    listener.wait_initialized(T).unwrap();
    notifier.queue(&format!("1 {BASE} m\n")).unwrap();
    listener.wait_for_id(1, T).unwrap();
    assert_eq!(
        get_id(&notifier, &tls_args("required", &old_ca, None)),
        Ok("1".into())
    );
    assert!(get_id(&notifier, &tls_args("required", &new_ca, None)).is_err());
    let connects = listener.log().matches("connected to the notifier").count();

    std::fs::copy(&new.certificate, &served.certificate).unwrap();
    std::fs::copy(&new.key, &served.key).unwrap();
    notifier.process().unwrap().signal(libc::SIGHUP).unwrap();
    wait_until("the reloaded certificate", T, || {
        Ok(notifier
            .log()
            .contains("SIGHUP: reloaded the TLS certificate")
            .then_some(()))
    })
    .unwrap();
    assert_eq!(
        get_id(&notifier, &tls_args("required", &new_ca, None)),
        Ok("1".into())
    );
    let err = get_id(&notifier, &tls_args("required", &old_ca, None)).unwrap_err();
    assert!(err.contains("not accepted"), "{err}");

    notifier.queue(&format!("2 {BASE} m\n")).unwrap();
    listener.wait_for_id(2, T).unwrap();
    assert_eq!(
        listener.log().matches("connected to the notifier").count(),
        connects,
        "the listener reconnected:\n{}",
        listener.log()
    );

    // A broken file on the next SIGHUP keeps the current certificate.
    std::fs::write(&served.key, "not a key").unwrap();
    notifier.process().unwrap().signal(libc::SIGHUP).unwrap();
    wait_until("the failed reload", T, || {
        Ok(notifier
            .log()
            .contains("SIGHUP: keeping the previous TLS certificate")
            .then_some(()))
    })
    .unwrap();
    assert_eq!(
        get_id(&notifier, &tls_args("required", &new_ca, None)),
        Ok("2".into())
    );
}
