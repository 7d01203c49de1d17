//! A network partition between the listener and its notifier/LDAP server: the listener
//! runs in a network namespace whose only link to the servers the test takes down (packets
//! dropped silently, no reset). A pending WAIT_ID must not hide a dead connection: the
//! listener notices and says so within 10 s (ALIVE probes) and is back within 5 s of the
//! link returning, whatever the partition's length. Needs root (`ip netns`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use integration_tests::net::Partition;
use integration_tests::process::NETNS_ENV;
use integration_tests::slapd::BASE;
use integration_tests::{Listener, ListenerOptions, Notifier, Slapd, SlapdConfig, wait_until};

const T: Duration = Duration::from_secs(60);

#[test]
fn a_partition_is_noticed_and_healed_within_seconds() {
    let partition = Partition::create().unwrap();
    let server = partition.host_ip();
    let slapd = Slapd::start(SlapdConfig::provider().listen_all(true)).unwrap();
    let notifier = Notifier::following_accesslog(&slapd, &["--listen", "0.0.0.0"], T).unwrap();
    let options = ListenerOptions::new()
        .env(NETNS_ENV, partition.name())
        .args(["-H", &format!("ldap://{server}:{}/", slapd.port())])
        .args(["-h", &server]);
    let mut listener = Listener::start(&slapd, &notifier, options).unwrap();
    listener.wait_initialized(T).unwrap();
    let mut admin = slapd.admin().unwrap();
    let before = format!("cn=before-partition,{BASE}");
    admin.add_role(&before, "before-partition").unwrap();
    let id = notifier.wait_transaction(&before, 'a', T).unwrap();
    listener.wait_for_id(id, T).unwrap();

    partition.cut().unwrap();
    let cut = Instant::now();
    wait_until("the dead connection in the log", T, || {
        Ok(listener
            .log()
            .contains("notifier connection to")
            .then_some(()))
    })
    .unwrap();
    let noticed = cut.elapsed();
    assert!(
        noticed < Duration::from_secs(12),
        "the dead connection was noticed after {noticed:?}"
    );
    let during = format!("cn=during-partition,{BASE}");
    admin.add_role(&during, "during-partition").unwrap();
    let id = notifier.wait_transaction(&during, 'a', T).unwrap();
    // A partition much longer than any retry interval of the listener.
    std::thread::sleep(Duration::from_secs(20));
    assert!(
        listener.notifier_id().unwrap() < id,
        "processed through the partition"
    );

    partition.heal().unwrap();
    let healed = Instant::now();
    listener.wait_for_id(id, T).unwrap();
    let recovered = healed.elapsed();
    assert!(
        recovered < Duration::from_secs(7),
        "back {recovered:?} after the link returned"
    );
    listener.stop().unwrap();
}
