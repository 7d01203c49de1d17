//! Our entry decoders (`parse_entry` over ldap3's parse, and the zero-copy
//! `frame::parse_message` the search connection uses) against ldap3's
//! `SearchEntry::construct`: generated entries (binary, non-UTF-8 and empty values, a
//! 10,000-value attribute) and entries slapd sends.
//!
//! `UDR_WRITE_CORPUS=1` also stores the captured slapd frames in `fuzz/corpus/`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use integration_tests::slapd::{ADMIN_DN, ADMIN_PW, BASE};
use integration_tests::{Slapd, SlapdConfig};
use ldap::decode::parse_entry;
use ldap3::asn1::{
    ASNTag, Boolean, Enumerated, Integer, OctetString, Sequence, Set, Tag, TagClass, parse_tag,
    write,
};
use proptest::prelude::*;
use support::{frame_len, message, same_as_ldap3};

fn octet(bytes: &[u8]) -> Tag {
    Tag::OctetString(OctetString {
        inner: bytes.to_vec(),
        ..Default::default()
    })
}

fn encode(tag: Tag) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    write::encode_into(&mut buf, tag.into_structure()).unwrap();
    buf.to_vec()
}

fn entry_op(dn: &str, attrs: &[(String, Vec<Vec<u8>>)]) -> Tag {
    let attrs = attrs
        .iter()
        .map(|(name, values)| {
            Tag::Sequence(Sequence {
                inner: vec![
                    octet(name.as_bytes()),
                    Tag::Set(Set {
                        inner: values.iter().map(|v| octet(v)).collect(),
                        ..Default::default()
                    }),
                ],
                ..Default::default()
            })
        })
        .collect();
    Tag::Sequence(Sequence {
        class: TagClass::Application,
        id: 4,
        inner: vec![
            octet(dn.as_bytes()),
            Tag::Sequence(Sequence {
                inner: attrs,
                ..Default::default()
            }),
        ],
    })
}

/// The entry through BER bytes, decoded by ldap3 and by both our decoders (which must
/// agree).
fn both_ways(dn: &str, attrs: &[(String, Vec<Vec<u8>>)]) -> (ldap::RawEntry, ldap3::SearchEntry) {
    let bytes = encode(entry_op(dn, attrs));
    let (rest, tag) = parse_tag(&bytes).unwrap();
    assert!(rest.is_empty());
    let ours = parse_entry(ldap3::ResultEntry::new(tag.clone())).unwrap();
    let mut op = ldap::frame::Ber::new(bytes::Bytes::from(bytes));
    let framed = ldap::frame::parse_search_entry(op.expect(0x64, "entry").unwrap()).unwrap();
    assert!(op.is_empty());
    assert_eq!(
        framed.value_count(),
        attrs.iter().map(|(_, v)| v.len()).sum::<usize>()
    );
    assert_eq!(framed.into_raw(), ours);
    (
        ours,
        ldap3::SearchEntry::construct(ldap3::ResultEntry::new(tag)),
    )
}

#[test]
fn huge_multi_valued_attribute_decodes_like_ldap3() {
    let members: Vec<Vec<u8>> = (0..10_000)
        .map(|i| format!("uid=member{i},cn=users,{BASE}").into_bytes())
        .collect();
    let attrs = vec![
        ("cn".to_owned(), vec![b"big".to_vec()]),
        ("uniqueMember".to_owned(), members.clone()),
        ("userPassword".to_owned(), vec![Vec::new(), vec![0xff, 0]]),
    ];
    let (ours, theirs) = both_ways(&format!("cn=big,{BASE}"), &attrs);
    assert!(same_as_ldap3(&ours, &theirs), "{theirs:?}");
    assert_eq!(ours.attrs, attrs);
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        "[ -~äöü]{0,40}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(prop_oneof![Just(0u8), Just(0xffu8), Just(0xc3u8)], 1..8),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn entries_decode_like_ldap3(
        dn in "[a-z]{1,8}=[ -~äß]{0,30}",
        attrs in prop::collection::btree_map(
            "[a-zA-Z][a-zA-Z0-9-]{0,12}(;binary)?",
            prop::collection::vec(value(), 0..12),
            0..10,
        ),
    ) {
        // Names differing only in case would collide in ldap3's map.
        let mut seen = std::collections::HashSet::new();
        let attrs: Vec<(String, Vec<Vec<u8>>)> = attrs
            .into_iter()
            .filter(|(name, _)| seen.insert(name.to_ascii_lowercase()))
            .collect();
        let (ours, theirs) = both_ways(&dn, &attrs);
        prop_assert!(same_as_ldap3(&ours, &theirs), "{ours:?} vs {theirs:?}");
        prop_assert_eq!(ours.attrs, attrs);
    }
}

/// UCS-like users, one with a photo and a non-UTF-8 password, and a group with 10,000
/// members, below `ou=frames`.
fn frames_ldif() -> String {
    let mut ldif = format!("dn: ou=frames,{BASE}\nobjectClass: organizationalUnit\nou: frames\n\n");
    for i in 0..40 {
        ldif.push_str(&format!(
            "dn: uid=user{i},ou=frames,{BASE}\nobjectClass: inetOrgPerson\nobjectClass: posixAccount\n\
             uid: user{i}\ncn: User Nümber {i}\nsn: Nümber\ngivenName: User\nmail: user{i}@example.com\n\
             uidNumber: {}\ngidNumber: 5001\nhomeDirectory: /home/user{i}\nloginShell: /bin/bash\n\
             description: line one\ndescription: line two\ntelephoneNumber: +49 421 {i}\n\n",
            2000 + i
        ));
    }
    // A JPEG header and bytes that are not UTF-8; an empty and a binary password.
    ldif.push_str(&format!(
        "dn: uid=photo,ou=frames,{BASE}\nobjectClass: inetOrgPerson\nuid: photo\ncn: Photo\nsn: P\n\
         jpegPhoto:: /9j/4AAQSkZJRgABAQAAAQABAAD//gAQTGF2YzYwLjMxLjEwMgD/2wBDAAgEBAQEBAUFBQUFBQYGBgYGBgYGBgYGBgYHBwcICAgHBwcGBgcHCAgICAkJCQgICAgJCQoKCgwMCwsODg4RERT/\n\
         userPassword:: //7+/QABAgM=\nuserPassword:\n\n"
    ));
    ldif.push_str(&format!(
        "dn: cn=big,ou=frames,{BASE}\nobjectClass: groupOfUniqueNames\ncn: big\n"
    ));
    for i in 0..10_000 {
        ldif.push_str(&format!("uniqueMember: uid=member{i},cn=users,{BASE}\n"));
    }
    ldif.push('\n');
    ldif
}

/// Binds as the admin and searches `*` and `+` below `ou=frames` over a plain socket,
/// returning every response frame exactly as slapd sent it.
fn capture(slapd: &Slapd) -> Vec<Vec<u8>> {
    let mut stream = TcpStream::connect(("127.0.0.1", slapd.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let int = |v: i64| {
        Tag::Integer(Integer {
            inner: v,
            ..Default::default()
        })
    };
    let message = |id: i64, op: Tag| {
        encode(Tag::Sequence(Sequence {
            inner: vec![int(id), op],
            ..Default::default()
        }))
    };
    let bind = message(
        1,
        Tag::Sequence(Sequence {
            class: TagClass::Application,
            id: 0,
            inner: vec![
                int(3),
                octet(ADMIN_DN.as_bytes()),
                Tag::OctetString(OctetString {
                    class: TagClass::Context,
                    id: 0,
                    inner: ADMIN_PW.as_bytes().to_vec(),
                }),
            ],
        }),
    );
    let enumerated = |v: i64| {
        Tag::Enumerated(Enumerated {
            inner: v,
            ..Default::default()
        })
    };
    let search = message(
        2,
        Tag::Sequence(Sequence {
            class: TagClass::Application,
            id: 3,
            inner: vec![
                octet(format!("ou=frames,{BASE}").as_bytes()),
                enumerated(2),
                enumerated(0),
                int(0),
                int(0),
                Tag::Boolean(Boolean {
                    inner: false,
                    ..Default::default()
                }),
                Tag::OctetString(OctetString {
                    class: TagClass::Context,
                    id: 7,
                    inner: b"objectClass".to_vec(),
                }),
                Tag::Sequence(Sequence {
                    inner: vec![octet(b"*"), octet(b"+")],
                    ..Default::default()
                }),
            ],
        }),
    );
    stream.write_all(&bind).unwrap();
    stream.write_all(&search).unwrap();
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        while let Some(len) = frame_len(&buf) {
            let frame: Vec<u8> = buf.drain(..len).collect();
            // SearchResultDone, [APPLICATION 5], ends the search.
            let done = frame
                .windows(3)
                .position(|w| w[0] == 0x02)
                .and_then(|p| frame.get(p + 2 + usize::from(frame[p + 1])))
                == Some(&0x65);
            frames.push(frame);
            if done {
                return frames;
            }
        }
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "slapd closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Decodes every frame both ways; the number of entries.
fn frames_decode_like_ldap3(frames: &[Vec<u8>]) -> usize {
    let mut entries = 0;
    for (i, frame) in frames.iter().enumerate() {
        let framed = ldap::frame::parse_message(bytes::Bytes::copy_from_slice(frame)).unwrap();
        let msg = message(frame).unwrap();
        match framed.op {
            ldap::frame::Response::Entry(entry) => {
                let ours = parse_entry(msg.clone()).unwrap();
                let theirs = ldap3::SearchEntry::construct(msg);
                assert!(same_as_ldap3(&ours, &theirs), "{ours:?} vs {theirs:?}");
                assert_eq!(entry.into_raw(), ours);
                entries += 1;
            }
            // The bind response first, the search result last.
            ldap::frame::Response::Bind(result) => assert_eq!((i, result.rc), (0, 0)),
            ldap::frame::Response::Done(result) => {
                assert_eq!((i, result.rc), (frames.len() - 1, 0));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    entries
}

#[test]
fn captured_frames_decode_like_ldap3() {
    let frames: Vec<Vec<u8>> = support::corpus()
        .into_iter()
        .filter(|(name, _)| name.starts_with("slapd-"))
        .map(|(_, data)| data)
        .collect();
    assert_eq!((frames.len(), frames_decode_like_ldap3(&frames)), (45, 43));
}

#[test]
fn slapd_frames_decode_like_ldap3() {
    let mut slapd = Slapd::start(SlapdConfig::provider().log_operations(false)).unwrap();
    slapd.slapadd(&frames_ldif()).unwrap();
    let frames = capture(&slapd);
    assert_eq!(frames_decode_like_ldap3(&frames), 43);
    if std::env::var_os("UDR_WRITE_CORPUS").is_some() {
        let dir = support::corpus_dir();
        std::fs::create_dir_all(&dir).unwrap();
        for (i, frame) in frames.iter().enumerate() {
            std::fs::write(dir.join(format!("slapd-{i:02}.ber")), frame).unwrap();
        }
    }
}
