//! The OpenLDAP kit (`kit/openldap/`) against slapd set up the way Debian's package sets up
//! a new server (cn=config in `slapd.d`): `apply.sh` configures it over ldapi, a second run
//! changes nothing, and then the real notifier (following `cn=accesslog`) and a listener
//! (binding as the host account the kit granted access to) replicate a write, while the
//! subtree the kit hid from the listener stays invisible to it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use integration_tests::slapd::{BASE, HOST_DN, RESTRICTED_DN};
use integration_tests::{Entry, Listener, ListenerOptions, Notifier, Slapd};
use ldap3::Scope;

const T: Duration = Duration::from_secs(30);

fn kit_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kit/openldap")
}

fn apply(slapd: &Slapd) -> Output {
    let output = Command::new(kit_dir().join("apply.sh"))
        .args(["--uri", &slapd.ldapi_url(), "--suffix", BASE])
        .args(["--listener-dn", HOST_DN, "--hide", RESTRICTED_DN])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "apply.sh: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// All of cn=config, operational attributes (modifyTimestamp, entryCSN) included.
fn cn_config(slapd: &Slapd) -> Vec<Entry> {
    slapd
        .root()
        .unwrap()
        .search("cn=config", Scope::Subtree, "(objectClass=*)", &["*", "+"])
        .unwrap()
}

#[test]
fn kit_configures_debian_slapd_for_notifier_and_listener() {
    let slapd = Slapd::debian_package().unwrap();

    let first = String::from_utf8(apply(&slapd).stdout).unwrap();
    for step in [
        "module accesslog: added",
        "database cn=accesslog: added",
        "syncprov on cn=accesslog: added",
        "accesslog overlay on dc=example,dc=com: added",
        "database cn=translog: added",
        &format!("read access for {HOST_DN}: added"),
        &format!("{RESTRICTED_DN} hidden from {HOST_DN}: added"),
    ] {
        assert!(first.contains(step), "first run lacks {step:?}:\n{first}");
    }

    let before = cn_config(&slapd);
    let second = String::from_utf8(apply(&slapd).stdout).unwrap();
    assert!(
        second.contains("nothing to do") && !second.contains("added"),
        "second run:\n{second}"
    );
    assert_eq!(
        cn_config(&slapd),
        before,
        "the second run changed cn=config"
    );

    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
    let mut listener = Listener::start(&slapd, &notifier, ListenerOptions::new()).unwrap();
    // The first load of the jsonl module: every object the host account can see.
    listener.wait_initialized(T).unwrap();
    let initial = listener.changes().unwrap();
    assert!(
        initial.iter().any(|c| c.dn == HOST_DN && c.command == 'n'),
        "{initial:#?}"
    );
    let mut admin = slapd.admin().unwrap();
    let secret = format!("cn=secret,{RESTRICTED_DN}");
    admin.add_role(&secret, "secret").unwrap();
    let visible = format!("cn=kit,{BASE}");
    admin.add_role(&visible, "kit").unwrap();

    assert!(
        initial.iter().all(|c| !c.dn.ends_with(RESTRICTED_DN)),
        "the first load passed hidden objects: {initial:#?}"
    );
    // The hidden add reaches the module only as a delete of an object it never saw (the
    // listener cannot read it), then the visible add.
    let changes = listener.wait_for_changes(initial.len() + 2, T).unwrap();
    let live: Vec<String> = changes[initial.len()..]
        .iter()
        .map(|c| format!("{} {} {}", c.id, c.command, c.dn))
        .collect();
    assert_eq!(live, [format!("1 d {secret}"), format!("2 a {visible}")]);
    let hidden = &changes[initial.len()];
    assert!(hidden.old.is_empty() && hidden.new.is_empty(), "{hidden:?}");
    let added = &changes[initial.len() + 1];
    assert_eq!(added.new.get("cn"), Some(&vec![b"kit".to_vec()]));
}

#[test]
fn slapd_conf_example_passes_slaptest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let example = std::fs::read_to_string(kit_dir().join("slapd.conf.example")).unwrap();
    let conf = example
        .replace("/var/lib/ldap", &format!("{d}/db"))
        .replace("/var/run/slapd", &d.to_string());
    for sub in ["db", "db/accesslog", "db/translog"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    std::fs::write(dir.path().join("slapd.conf"), conf).unwrap();
    let output = Command::new("/usr/sbin/slaptest")
        .arg("-u")
        .arg("-f")
        .arg(dir.path().join("slapd.conf"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "slaptest: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
