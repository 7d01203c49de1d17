//! One UCR fixture, four readers: a key set both in `base-forced.conf` and in `base.conf`
//! gives the forced value to the notifier, the listener, the operator tools and a Python
//! module the listener hosts (UCS's layer order, read by one implementation in Rust and a
//! Python shim tested against the same parser fixture).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::notifier::Client;
use integration_tests::process::binary;
use integration_tests::slapd::BASE;
use integration_tests::{Intake, Listener, ListenerOptions, Notifier, Slapd, wait_until};

const T: Duration = Duration::from_secs(60);

/// The normal layer: every value here loses against the forced layer.
fn normal_layer() -> String {
    format!(
        "ldap/base: {BASE}\n\
         notifier/protocol/version: 2\n\
         listener/freespace: 999999999\n\
         notifier/server: 127.0.0.1\n\
         notifier/server/port: 1\n\
         ucr/test/four-readers: normal\n"
    )
}

/// The forced layer, with the notifier's real port.
fn forced_layer(notifier_port: u16) -> String {
    format!(
        "notifier/protocol/version: 3\n\
         listener/freespace: 0\n\
         notifier/server/port: {notifier_port}\n\
         ucr/test/four-readers: forced\n"
    )
}

fn write_layers(base_conf: &Path, notifier_port: u16) {
    fs::write(base_conf, normal_layer()).unwrap();
    fs::write(
        base_conf.with_file_name("base-forced.conf"),
        forced_layer(notifier_port),
    )
    .unwrap();
}

#[test]
fn the_forced_layer_wins_for_every_reader() {
    let slapd = Slapd::provider().unwrap();
    // Reader 1, the notifier: the forced notifier/protocol/version 3 refuses protocol 2.
    let notifier = Notifier::start_with(&slapd, Intake::Accesslog, &[], |ldap_dir| {
        write_layers(&ldap_dir.parent().unwrap().join("base.conf"), 0);
        Ok(())
    })
    .unwrap();
    let position = notifier.ldap_dir().join("notify/accesslog.position");
    wait_until("the notifier's accesslog position", T, || {
        Ok(position.exists().then_some(()))
    })
    .unwrap();
    let mut v2 = Client::connect(notifier.port()).unwrap();
    v2.send("Version: 2\nCapabilities: \n\n").unwrap();
    assert!(
        v2.is_closed(Duration::from_secs(10)).unwrap(),
        "a protocol-2 client was served: the notifier used base.conf's version 2"
    );
    let mut v3 = Client::connect(notifier.port()).unwrap();
    assert!(v3.handshake(3).unwrap().starts_with("Version: 3"));

    // Reader 3, the tools: get_notifier_id finds the notifier by the forced port.
    let tools_dir = tempfile::tempdir().unwrap();
    let tools_ucr = tools_dir.path().join("base.conf");
    write_layers(&tools_ucr, notifier.port());
    let output = Command::new(binary("get_notifier_id").unwrap())
        .arg("--ucr-file")
        .arg(&tools_ucr)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "get_notifier_id used base.conf's port: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        notifier.last_id().unwrap().to_string()
    );

    // Readers 2 and 4, the listener and its Python module. With base.conf's
    // listener/freespace the listener would pause ("file system full") and never call the
    // module.
    let modules = integration_tests::listener::module_dir(
        "ucr.py",
        "import listener, os\n\
         name = 'ucr'\n\
         description = 'reads a layered UCR key'\n\
         filter = '(objectClass=organizationalRole)'\n\
         def handler(dn, new, old):\n\
         \x20   path = os.path.join(os.path.dirname(__file__), 'ucr.out')\n\
         \x20   with open(path + '.tmp', 'w') as f:\n\
         \x20       f.write(listener.configRegistry['ucr/test/four-readers'])\n\
         \x20   os.rename(path + '.tmp', path)\n",
    )
    .unwrap();
    let out = modules.path().join("ucr.out");
    let options = ListenerOptions::new()
        .module_dir(modules.path())
        .ucr(normal_layer());
    let mut listener = Listener::prepare(&slapd, &notifier, options).unwrap();
    write_layers(&listener.ucr_file(), notifier.port());
    listener.restart().unwrap();
    listener.wait_initialized(T).unwrap();
    slapd
        .admin()
        .unwrap()
        .add_role(&format!("cn=ucr-layers,{BASE}"), "ucr-layers")
        .unwrap();
    // The module renames its output into place, so an existing file is a complete one.
    let value = wait_until("the module to write what UCR says", T, || {
        Ok(fs::read_to_string(&out).ok())
    })
    .unwrap();
    assert_eq!(value, "forced");
    assert!(
        !listener.log().contains("file system"),
        "the listener paused on base.conf's listener/freespace:\n{}",
        listener.log_tail(20)
    );
    listener.stop().unwrap();
}
