//! The zero-copy search connection against real slapd: a paged search over more entries
//! than one page, with binary, non-UTF-8 and non-ASCII values, returns exactly what the
//! ldap3 path returns, over TCP with a simple bind and over ldapi with SASL EXTERNAL; a
//! wrong password and a missing base give the same answers as the ldap3 path.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use base64::Engine as _;
use integration_tests::slapd::{ADMIN_DN, ADMIN_PW, BASE};
use integration_tests::{Slapd, SlapdConfig};
use ldap::{
    ALL_ATTRS, Auth, Endpoint, FramedSearch, LdapFailure, PagedSearch, Password, RawEntry, Scope,
    SearchConnection, StartTls,
};

const T: Duration = Duration::from_secs(60);
const ENTRIES: usize = 2_500;
const PAGE: i32 = 1000;

fn ldif() -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
    let mut ldif = format!("dn: ou=paged,{BASE}\nobjectClass: organizationalUnit\nou: paged\n\n");
    for i in 0..ENTRIES {
        let photo: Vec<u8> = (0..=(i % 300) as u32)
            .map(|k| (k * 7 + i as u32) as u8)
            .collect();
        ldif.push_str(&format!(
            "dn: uid=u{i},ou=paged,{BASE}\nobjectClass: inetOrgPerson\nuid: u{i}\n\
             cn: Jürgen Größe {i} ✓\nsn: Ñandú\nuserPassword:: {}\n\
             userPassword:: {}\n{}\n",
            b64(&[&b"latin-1 \xe9 "[..], i.to_string().as_bytes()].concat()),
            b64(&[0xff, 0xfe, 0, i as u8]),
            if i % 3 == 0 {
                format!("jpegPhoto:: {}\n", b64(&photo))
            } else {
                String::new()
            },
        ));
    }
    ldif
}

fn endpoint(uri: String, auth: Auth) -> Endpoint {
    Endpoint {
        uri,
        auth,
        starttls: StartTls::Off,
        timeout: T,
    }
}

fn admin(slapd: &Slapd, password: &str) -> Endpoint {
    endpoint(
        slapd.ldap_url(),
        Auth::Simple {
            dn: ADMIN_DN.to_owned(),
            password: Password::Literal(password.to_owned()),
        },
    )
}

async fn framed(endpoint: &Endpoint, base: &str) -> Result<Vec<RawEntry>, LdapFailure> {
    let mut conn = SearchConnection::connect(endpoint).await?;
    let mut search = FramedSearch::start(
        &mut conn,
        base,
        Scope::Subtree,
        "(objectClass=*)",
        &ALL_ATTRS,
        PAGE,
        T,
    )
    .await?;
    let mut out = Vec::new();
    while let Some(entry) = search.next().await? {
        out.push(entry.into_raw());
    }
    search.finish()?;
    conn.close().await;
    Ok(out)
}

async fn with_ldap3(endpoint: &Endpoint, base: &str) -> Result<Vec<RawEntry>, LdapFailure> {
    let mut ldap = ldap::connect(endpoint).await?;
    let mut search = PagedSearch::start(
        &mut ldap,
        base,
        Scope::Subtree,
        "(objectClass=*)",
        &ALL_ATTRS,
        PAGE,
        T,
    )
    .await?;
    let mut out = Vec::new();
    while let Some(entry) = search.next().await? {
        out.push(entry);
    }
    search.finish().await?;
    Ok(out)
}

#[test]
fn paged_search_returns_what_ldap3_returns() {
    // The harness drives slapd with ldap3's blocking client: outside the runtime.
    let mut slapd = Slapd::start(SlapdConfig::provider().log_operations(false)).unwrap();
    slapd.slapadd(&ldif()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(compare(&slapd));
}

async fn compare(slapd: &Slapd) {
    let base = format!("ou=paged,{BASE}");

    let tcp = admin(slapd, ADMIN_PW);
    let ours = framed(&tcp, &base).await.unwrap();
    let theirs = with_ldap3(&tcp, &base).await.unwrap();
    assert_eq!(ours.len(), ENTRIES + 1, "every entry, across three pages");
    assert!(ours == theirs, "the zero-copy path differs from ldap3's");
    let sample = ours.iter().find(|e| e.dn.starts_with("uid=u3,")).unwrap();
    assert_eq!(sample.first_str("cn"), Some("Jürgen Größe 3 ✓"));
    assert_eq!(
        sample.values("userPassword").unwrap()[1],
        vec![0xff, 0xfe, 0, 3]
    );
    assert_eq!(sample.values("jpegPhoto").unwrap()[0].len(), 4);

    // Root over ldapi with SASL EXTERNAL sees the same.
    let ldapi = endpoint(slapd.ldapi_url(), Auth::SaslExternal);
    assert!(framed(&ldapi, &base).await.unwrap() == ours);

    // A missing base is an empty result; a wrong password the server's refusal.
    let missing = format!("ou=missing,{BASE}");
    assert!(framed(&tcp, &missing).await.unwrap().is_empty());
    match framed(&admin(slapd, "wrong"), &base).await {
        // invalidCredentials
        Err(LdapFailure::Result { rc, .. }) => assert_eq!(rc, 49),
        other => panic!("{other:?}"),
    }
}
