//! The replica harness itself: a replica configured like a UCS Replica Directory Node
//! (update DN as rootdn and updatedn, referral to the primary for everybody else, the
//! primary's schema) and the entry-by-entry comparison with its report.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;

use integration_tests::compare::Comparison;
use integration_tests::slapd::{BASE, RESTRICTED_DN, UPDATE_DN, UPDATE_PW};
use integration_tests::{HarnessError, Slapd};
use ldap3::Mod;

fn dn(rdn: &str) -> String {
    format!("{rdn},{BASE}")
}

fn mismatch(result: integration_tests::Result<()>) -> String {
    match result {
        Err(HarnessError::Mismatch(report)) => report,
        other => panic!("expected a mismatch, got {other:?}"),
    }
}

#[test]
fn a_replica_copied_from_its_primary_compares_equal_and_differences_are_reported() {
    let primary = Slapd::provider().unwrap();
    let mut admin = primary.admin().unwrap();
    let user = dn("uid=jürgen");
    admin
        .add_bytes(
            &user,
            &[
                ("objectClass", &[b"inetOrgPerson"]),
                ("uid", &["jürgen".as_bytes()]),
                ("cn", &["Jürgen Müller".as_bytes()]),
                ("sn", &[b"M\xc3\xbcller"]),
                ("jpegPhoto", &[&[0xff, 0xd8, 0x00, 0x01]]),
                ("userPassword", &[b"{SSHA}c2VjcmV0"]),
            ],
        )
        .unwrap();
    admin
        .add(
            &dn("cn=group"),
            &[
                ("objectClass", &["groupOfNames"]),
                ("cn", &["group"]),
                ("member", &[user.as_str()]),
            ],
        )
        .unwrap();

    let mut replica = Slapd::start_replica_of(&primary).unwrap();
    assert_eq!(
        std::fs::read_to_string(replica.rootpw_conf_path()).unwrap(),
        format!("rootpw \"{UPDATE_PW}\"\n")
    );
    let report = mismatch(Comparison::new().check(&primary, &replica));
    assert!(
        report.contains(&format!("only in left:  {BASE}")),
        "{report}"
    );

    replica.slapadd(&primary.slapcat().unwrap()).unwrap();
    Comparison::new().check(&primary, &replica).unwrap();

    // Everybody but the update DN gets a referral to the primary.
    let mut host = replica.host().unwrap();
    let refused = host
        .conn()
        .modify(
            &dn("cn=group"),
            vec![Mod::Replace("description", HashSet::from(["x"]))],
        )
        .unwrap();
    assert_eq!(refused.rc, 10, "{refused:?}");
    assert_eq!(
        refused.refs,
        [format!("{}{}", primary.ldap_url(), dn("cn=group"))],
        "{refused:?}"
    );

    // The update DN writes; the changed value is reported, the CSN and modifier it
    // changed too are not compared.
    let mut update = replica.simple_bind(UPDATE_DN, UPDATE_PW).unwrap();
    update
        .replace(&dn("cn=group"), "description", &["only here"])
        .unwrap();
    let report = mismatch(Comparison::new().check(&primary, &replica));
    assert!(
        report.contains(&format!(
            "{}: description: left absent, right [\"only here\"]",
            dn("cn=group")
        )),
        "{report}"
    );
    assert!(report.starts_with("1 difference(s)"), "{report}");
    assert!(!report.contains("entrycsn:"), "{report}");
    let report = mismatch(
        Comparison::new()
            .include("modifiersName")
            .check(&primary, &replica),
    );
    assert!(
        report.contains(&format!(
            "modifiersname: left [\"cn=admin,{BASE}\"], right [\"{UPDATE_DN}\"]"
        )),
        "{report}"
    );
    update.replace(&dn("cn=group"), "description", &[]).unwrap();
    Comparison::new().check(&primary, &replica).unwrap();

    // Like UCS's replication module, the update DN writes an entry verbatim, operational
    // attributes included; a different entryUUID is a difference.
    admin.add_role(&dn("cn=new"), "new").unwrap();
    let mut root = primary.root().unwrap();
    let original = root.get(&dn("cn=new")).unwrap().unwrap();
    let writable: Vec<(&str, Vec<&[u8]>)> = original
        .attrs
        .iter()
        .filter(|(name, _)| {
            !["entryDN", "subschemaSubentry", "hasSubordinates"].contains(&name.as_str())
        })
        .map(|(name, values)| {
            let values = if name == "entryUUID" {
                vec![&b"00000000-0000-0000-0000-000000000001"[..]]
            } else {
                values.iter().map(Vec::as_slice).collect()
            };
            (name.as_str(), values)
        })
        .collect();
    let writable: Vec<(&str, &[&[u8]])> =
        writable.iter().map(|(n, v)| (*n, v.as_slice())).collect();
    update.add_bytes(&dn("cn=new"), &writable).unwrap();
    let report = mismatch(Comparison::new().check(&primary, &replica));
    assert!(
        report.contains(&format!("{}: entryuuid: left", dn("cn=new"))),
        "{report}"
    );
    assert!(report.starts_with("1 difference(s)"), "{report}");

    // Skipped subtrees and excluded attributes are left out on both sides.
    update.delete(&dn("cn=new")).unwrap();
    update.delete(RESTRICTED_DN).unwrap();
    let report = mismatch(Comparison::new().check(&primary, &replica));
    assert!(
        report.contains(&format!("only in left:  {}", dn("cn=new"))),
        "{report}"
    );
    assert!(
        report.contains(&format!("only in left:  {RESTRICTED_DN}")),
        "{report}"
    );
    Comparison::new()
        .skip_subtree(RESTRICTED_DN)
        .skip_subtree(&dn("cn=new"))
        .check(&primary, &replica)
        .unwrap();
}
