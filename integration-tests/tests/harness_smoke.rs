//! The harness itself against real slapd: one add, modify, modrdn and delete show up in
//! `cn=accesslog`; `cn=translog` is writable by root over ldapi and readable by the host
//! account; the restricted subtree is invisible to the host account.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use integration_tests::slapd::{ACCESSLOG_BASE, BASE, RESTRICTED_DN, TRANSLOG_BASE};
use integration_tests::{Entry, Slapd, SlapdConfig, wait_until};
use ldap3::Scope;

fn accesslog(slapd: &Slapd) -> Vec<Entry> {
    let mut admin = slapd.admin().unwrap();
    let mut entries = admin
        .search(
            ACCESSLOG_BASE,
            Scope::OneLevel,
            "(&(objectClass=auditWriteObject)(reqResult=0))",
            &[
                "reqStart",
                "reqType",
                "reqDN",
                "reqNewRDN",
                "reqNewSuperior",
                "reqNewDN",
                "reqDeleteOldRDN",
                "reqEntryUUID",
            ],
        )
        .unwrap();
    // reqStart is the RDN and orders the log.
    entries.sort_by(|a, b| a.first("reqStart").cmp(&b.first("reqStart")));
    entries
}

#[test]
fn writes_appear_in_accesslog() {
    let slapd = Slapd::provider().unwrap();
    let before = accesslog(&slapd).len();
    let mut admin = slapd.admin().unwrap();
    let dn = format!("cn=alice,{BASE}");
    admin.add_role(&dn, "alice").unwrap();
    let uuid = admin
        .get(&dn)
        .unwrap()
        .unwrap()
        .first("entryUUID")
        .unwrap()
        .to_owned();
    admin.replace(&dn, "description", &["first"]).unwrap();
    admin
        .modrdn(&dn, "cn=alice2", true, Some(RESTRICTED_DN))
        .unwrap();
    let moved = format!("cn=alice2,{RESTRICTED_DN}");
    admin.delete(&moved).unwrap();

    let log = accesslog(&slapd);
    let ours = &log[before..];
    let types: Vec<_> = ours.iter().map(|e| e.first("reqType").unwrap()).collect();
    assert_eq!(types, ["add", "modify", "modrdn", "delete"]);
    let dns: Vec<_> = ours.iter().map(|e| e.first("reqDN").unwrap()).collect();
    assert_eq!(dns, [dn.as_str(), &dn, &dn, &moved]);
    let modrdn = &ours[2];
    assert_eq!(modrdn.first("reqNewRDN"), Some("cn=alice2"));
    assert_eq!(modrdn.first("reqNewSuperior"), Some(RESTRICTED_DN));
    assert_eq!(modrdn.first("reqNewDN"), Some(moved.as_str()));
    assert_eq!(modrdn.first("reqDeleteOldRDN"), Some("TRUE"));
    for entry in ours {
        assert_eq!(
            entry.first("reqEntryUUID"),
            Some(uuid.as_str()),
            "{entry:?}"
        );
    }
}

#[test]
fn rename_without_new_superior_keeps_old_rdn_when_asked() {
    let slapd = Slapd::provider().unwrap();
    let mut admin = slapd.admin().unwrap();
    let dn = format!("cn=bob,{BASE}");
    admin.add_role(&dn, "bob").unwrap();
    admin.modrdn(&dn, "cn=robert", false, None).unwrap();
    let renamed = admin.get(&format!("cn=robert,{BASE}")).unwrap().unwrap();
    let mut cns = renamed.texts("cn");
    cns.sort();
    assert_eq!(cns, ["bob", "robert"]);
    let log = accesslog(&slapd);
    let last = log.last().unwrap();
    assert_eq!(last.first("reqType"), Some("modrdn"));
    assert_eq!(last.first("reqDeleteOldRDN"), Some("FALSE"));
    assert_eq!(last.first("reqNewSuperior"), None);
}

#[test]
fn translog_is_written_by_root_and_read_by_host() {
    let slapd = Slapd::provider().unwrap();
    let mut root = slapd.root().unwrap();
    root.add(
        TRANSLOG_BASE,
        &[("objectClass", &["auditContainer"]), ("cn", &["translog"])],
    )
    .unwrap();
    let dn = format!("reqSession=1,{TRANSLOG_BASE}");
    let target = format!("cn=x,{BASE}");
    root.add(
        &dn,
        &[
            ("objectClass", &["auditObject"]),
            ("reqStart", &["20240131120000Z"]),
            ("reqSession", &["1"]),
            ("reqDN", &[target.as_str()]),
            ("reqType", &["a"]),
        ],
    )
    .unwrap();

    let mut host = slapd.host().unwrap();
    let entry = host
        .get(&dn)
        .unwrap()
        .expect("host reads the translog entry");
    assert_eq!(entry.first("reqSession"), Some("1"));
    assert_eq!(entry.first("reqDN"), Some(target.as_str()));
    assert_eq!(entry.first("reqType"), Some("a"));

    // Anonymous may not read it, and the host may not write it.
    assert!(slapd.anonymous().unwrap().get(&dn).unwrap().is_none());
    let err = host.delete(&dn).unwrap_err();
    assert!(err.to_string().contains("deleting"), "{err}");
}

#[test]
fn restricted_subtree_is_invisible_to_the_host() {
    let slapd = Slapd::provider().unwrap();
    let mut admin = slapd.admin().unwrap();
    let secret = format!("cn=secret,{RESTRICTED_DN}");
    admin.add_role(&secret, "secret").unwrap();
    assert!(admin.get(&secret).unwrap().is_some());
    let mut host = slapd.host().unwrap();
    assert!(host.get(&secret).unwrap().is_none());
    assert!(host.get(RESTRICTED_DN).unwrap().is_none());
    let visible = host
        .search(BASE, Scope::Subtree, "(objectClass=*)", &["1.1"])
        .unwrap();
    assert!(
        visible.iter().all(|e| !e.dn.ends_with(RESTRICTED_DN)),
        "{visible:?}"
    );
    assert!(!visible.is_empty());
}

#[test]
fn binary_values_round_trip_exactly() {
    let slapd = Slapd::provider().unwrap();
    let mut admin = slapd.admin().unwrap();
    let dn = format!("uid=bin,{BASE}");
    let photo: &[u8] = &[0, 1, 2, 0xff, 0xfe, b'\n', 0x80];
    admin
        .add_bytes(
            &dn,
            &[
                ("objectClass", &[b"inetOrgPerson"]),
                ("uid", &[b"bin"]),
                ("cn", &[b"Bin"]),
                ("sn", &["Bär".as_bytes()]),
                ("jpegPhoto", &[photo]),
            ],
        )
        .unwrap();
    let entry = admin.get(&dn).unwrap().unwrap();
    assert_eq!(entry.attrs["jpegPhoto"], vec![photo.to_vec()]);
    assert_eq!(entry.first("sn"), Some("Bär"));
}

#[test]
fn kill_and_restart_keeps_data_and_port() {
    let mut slapd = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let port = slapd.port();
    let dn = format!("cn=persist,{BASE}");
    slapd.admin().unwrap().add_role(&dn, "persist").unwrap();
    slapd.kill().unwrap();
    assert!(!slapd.is_running());
    assert!(slapd.admin().is_err(), "slapd is down");
    slapd.restart().unwrap();
    assert_eq!(slapd.port(), port);
    let found = wait_until("entry after restart", Duration::from_secs(10), || {
        slapd.admin()?.get(&dn)
    })
    .unwrap();
    assert_eq!(found.first("cn"), Some("persist"));
}

#[test]
fn replica_is_a_plain_instance() {
    let slapd = Slapd::replica().unwrap();
    let mut admin = slapd.admin().unwrap();
    assert!(admin.get(BASE).unwrap().is_some());
    assert!(admin.get(ACCESSLOG_BASE).unwrap().is_none());
    assert!(slapd.host().is_err(), "no host account on a replica");
}
