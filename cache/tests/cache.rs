//! The public API of the cache as the listener uses it: commits, lookups by DN and
//! the master record, module lists and persistence across reopen.

// Test helpers outside #[test] functions are not covered by clippy.toml's test exemption.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use cache::{Cache, CacheEntry, CacheError, MasterRecord, is_marked_bad, mark_bad};
use ldap::dn::dn_key;
use proptest::prelude::*;

fn entry(dn: &str, uuid: &str, modules: &[&str]) -> CacheEntry {
    CacheEntry {
        dn: dn.into(),
        attributes: vec![
            (
                "objectClass".into(),
                vec![b"top".to_vec(), b"person".to_vec()],
            ),
            ("entryUUID".into(), vec![uuid.as_bytes().to_vec()]),
        ],
        modules: modules.iter().map(|m| (*m).to_owned()).collect(),
    }
}

fn put(cache: &Cache, e: &CacheEntry) {
    let mut b = cache.batch();
    b.put(e);
    cache.commit(b, false).unwrap();
}

fn delete(cache: &Cache, dn: &str) {
    let mut b = cache.batch();
    b.delete(dn);
    cache.commit(b, false).unwrap();
}

fn dns(cache: &Cache) -> Vec<String> {
    cache.iter().map(|e| e.unwrap().dn).collect()
}

#[test]
fn cache_types_can_be_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Cache>();
    assert_send_sync::<cache::Batch>();
    assert_send_sync::<CacheError>();
}

#[test]
fn open_creates_a_private_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("var/lib/univention-directory-listener");
    let cache = Cache::open(&dir).unwrap();
    assert!(cache.is_empty());
    assert_eq!(cache.len(), 0);
    assert_eq!(cache.master().unwrap(), None);
    for path in [dir.clone(), dir.join(cache::DB_DIR)] {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", path.display());
    }
    put(&cache, &entry("cn=a", "u", &["m"]));
    cache.flush().unwrap();
    assert!(cache.size_on_disk().unwrap() > 0);
}

#[test]
fn get_by_dn_ignores_case() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let e = entry("uid=Bär,CN=Users,DC=Example", "u-1", &["replication"]);
    put(&cache, &e);
    for dn in [
        "uid=Bär,CN=Users,DC=Example",
        "uid=bär,cn=users,dc=example",
        "UID=BÄR,CN=USERS,DC=EXAMPLE",
    ] {
        // The DN comes back as LDAP spelled it, whatever the lookup's case.
        assert_eq!(cache.get(dn).unwrap().as_ref(), Some(&e), "{dn}");
    }
    assert_eq!(cache.get("uid=bar,cn=users,dc=example").unwrap(), None);
    // Differently escaped DNs are different keys: no DN normalisation beyond case.
    assert_eq!(
        cache.get(r"uid=B\C3\A4r,cn=users,dc=example").unwrap(),
        None
    );
}

#[test]
fn put_in_another_case_replaces_the_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    put(&cache, &entry("cn=Foo,dc=x", "u-1", &["a"]));
    put(&cache, &entry("CN=FOO,DC=X", "u-1", &["b"]));
    assert_eq!(cache.len(), 1);
    let got = cache.get("cn=foo,dc=x").unwrap().unwrap();
    assert_eq!(got.dn, "CN=FOO,DC=X");
    assert_eq!(got.modules, ["b"]);
}

#[test]
fn operations_in_one_batch_apply_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let mut b = cache.batch();
    assert!(b.is_empty());
    b.put(&entry("cn=a", "u-a", &["m"]));
    b.delete("CN=A");
    b.put(&entry("cn=b", "u-b", &["m"]));
    b.put(&entry("cn=B", "u-b2", &["n"]));
    b.delete("cn=never-there");
    assert_eq!(b.len(), 5);
    cache.commit(b, false).unwrap();
    assert_eq!(cache.get("cn=a").unwrap(), None);
    assert_eq!(
        cache.get("cn=b").unwrap(),
        Some(entry("cn=B", "u-b2", &["n"]))
    );
    assert_eq!(cache.len(), 1);

    let mut b = cache.batch();
    b.delete("cn=b");
    b.put(&entry("cn=b", "u-b3", &["o"]));
    cache.commit(b, false).unwrap();
    assert_eq!(
        cache.get("cn=b").unwrap(),
        Some(entry("cn=b", "u-b3", &["o"]))
    );
    assert_eq!(cache.len(), 1);

    // An empty batch is a no-op.
    cache.commit(cache.batch(), true).unwrap();
    assert_eq!(cache.len(), 1);
}

#[test]
fn master_record_is_committed_with_the_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    assert_eq!(cache.master().unwrap(), None);
    let mut b = cache.batch();
    b.put(&entry("cn=a", "u-a", &["m"]));
    b.set_master(MasterRecord {
        notifier_id: 41,
        schema_id: 3,
    });
    b.set_master(MasterRecord {
        notifier_id: 42,
        schema_id: 3,
    });
    cache.commit(b, false).unwrap();
    assert!(cache.get("cn=a").unwrap().is_some());
    assert_eq!(
        cache.master().unwrap(),
        Some(MasterRecord {
            notifier_id: 42,
            schema_id: 3
        })
    );
    let mut b = cache.batch();
    b.set_master(MasterRecord {
        notifier_id: u64::MAX,
        schema_id: 0,
    });
    cache.commit(b, true).unwrap();
    assert_eq!(cache.master().unwrap().unwrap().notifier_id, u64::MAX);
    // The master record is not an entry.
    assert_eq!(cache.len(), 1);
    assert_eq!(dns(&cache), ["cn=a"]);
}

#[test]
fn durable_commit_survives_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let e = entry("cn=Persistent,dc=x", "u-p", &["replication", "a"]);
    let master = MasterRecord {
        notifier_id: 7,
        schema_id: 2,
    };
    {
        let cache = Cache::open(tmp.path()).unwrap();
        let mut b = cache.batch();
        b.put(&e);
        b.put(&entry("cn=gone", "u-g", &["a"]));
        b.set_master(master);
        cache.commit(b, true).unwrap();
        delete(&cache, "cn=gone");
        cache.flush().unwrap();
    }
    let cache = Cache::open(tmp.path()).unwrap();
    assert_eq!(cache.get("cn=persistent,dc=x").unwrap(), Some(e));
    assert_eq!(cache.get("cn=gone").unwrap(), None);
    assert_eq!(cache.master().unwrap(), Some(master));
    assert_eq!(cache.len(), 1);
}

#[test]
fn group_commit_then_one_flush_survives_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let cache = Cache::open(tmp.path()).unwrap();
        for id in 1..=20u64 {
            let mut b = cache.batch();
            b.put(&entry(&format!("cn={id}"), &format!("u-{id}"), &["m"]));
            b.set_master(MasterRecord {
                notifier_id: id,
                schema_id: 1,
            });
            cache.commit(b, false).unwrap();
        }
        cache.flush().unwrap();
    }
    let cache = Cache::open(tmp.path()).unwrap();
    assert_eq!(cache.len(), 20);
    assert_eq!(cache.master().unwrap().unwrap().notifier_id, 20);
    assert_eq!(
        cache.get("cn=13").unwrap(),
        Some(entry("cn=13", "u-13", &["m"]))
    );
}

#[test]
fn binary_values_and_order_round_trip_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let e = CacheEntry {
        dn: "cn=Bin,dc=x".into(),
        attributes: vec![
            ("zeta".into(), vec![b"z".to_vec()]),
            (
                "objectClass".into(),
                vec![b"top".to_vec(), b"device".to_vec()],
            ),
            (
                "jpegPhoto".into(),
                vec![vec![0x00, 0xff, b'\n', 0x00, b'\r', 0x80], vec![]],
            ),
            // Values are kept in server order, even when unsorted or duplicated.
            (
                "memberUid".into(),
                vec![b"b".to_vec(), b"a".to_vec(), b"b".to_vec()],
            ),
            ("alpha".into(), vec![vec![0u8; 100_000]]),
            ("empty".into(), vec![]),
        ],
        modules: vec!["zz".into(), "replication".into(), "aa".into()],
    };
    put(&cache, &e);
    assert_eq!(cache.get("cn=bin,dc=x").unwrap(), Some(e));
}

#[test]
fn iteration_is_in_key_order() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    for dn in ["cn=C", "cn=a", "CN=b", "cn=Ä"] {
        put(&cache, &entry(dn, dn, &["m"]));
    }
    assert_eq!(dns(&cache), ["cn=a", "CN=b", "cn=C", "cn=Ä"]);
    let keys: Vec<String> = dns(&cache).iter().map(|d| dn_key(d)).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
}

#[test]
fn remove_module_everywhere_deletes_entries_left_without_modules() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    put(&cache, &entry("cn=only-m", "u1", &["m"]));
    put(&cache, &entry("cn=m-and-n", "u2", &["n", "m", "o"]));
    put(&cache, &entry("cn=n", "u3", &["n"]));
    // Entries no module ever handled are removed too (spec §3.9 step 2).
    put(&cache, &entry("cn=none", "u4", &[]));
    assert_eq!(cache.remove_module_everywhere("m").unwrap(), 3);
    assert_eq!(dns(&cache), ["cn=m-and-n", "cn=n"]);
    assert_eq!(
        cache.get("cn=m-and-n").unwrap().unwrap().modules,
        ["n", "o"]
    );
    assert_eq!(cache.len(), 2);
    // Nothing left to do.
    assert_eq!(cache.remove_module_everywhere("m").unwrap(), 0);
}

#[test]
fn remove_module_everywhere_handles_more_than_one_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let mut b = cache.batch();
    for i in 0..2500 {
        let modules: &[&str] = if i % 2 == 0 { &["m"] } else { &["m", "keep"] };
        b.put(&entry(&format!("cn={i:05}"), &format!("u{i}"), modules));
    }
    cache.commit(b, false).unwrap();
    assert_eq!(cache.remove_module_everywhere("m").unwrap(), 2500);
    assert_eq!(cache.len(), 1250);
    assert!(
        cache
            .iter()
            .all(|e| e.unwrap().modules == ["keep".to_owned()])
    );
    drop(cache);
    assert_eq!(Cache::open(tmp.path()).unwrap().len(), 1250);
}

#[test]
fn bad_cache_refuses_open() {
    let tmp = tempfile::tempdir().unwrap();
    drop(Cache::open(tmp.path()).unwrap());
    assert!(!is_marked_bad(tmp.path()));
    mark_bad(tmp.path(), "Check log file").unwrap();
    assert!(is_marked_bad(tmp.path()));
    let err = Cache::open(tmp.path()).unwrap_err();
    match &err {
        CacheError::BadCache { path, reason } => {
            assert_eq!(path, &tmp.path().join("bad_cache"));
            assert_eq!(reason, "Check log file");
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(err.to_string().contains("Check log file"), "{err}");
    std::fs::remove_file(tmp.path().join(cache::BAD_CACHE_FILE)).unwrap();
    Cache::open(tmp.path()).unwrap();
}

#[test]
fn a_second_open_of_the_same_directory_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let _first = Cache::open(tmp.path()).unwrap();
    let err = Cache::open(tmp.path()).unwrap_err();
    assert!(matches!(err, CacheError::Store(_)), "{err}");
    assert!(err.to_string().contains("is in use"), "{err}");
}

#[test]
fn reopen_right_after_drop_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..20u64 {
        let cache = Cache::open(tmp.path()).unwrap();
        let mut b = cache.batch();
        b.put(&entry(&format!("cn={i}"), &format!("u{i}"), &["m"]));
        cache.commit(b, true).unwrap();
    }
    assert_eq!(Cache::open(tmp.path()).unwrap().len(), 20);
}

#[test]
fn open_reports_an_unusable_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("file");
    std::fs::write(&file, "").unwrap();
    let err = Cache::open(&file).unwrap_err();
    assert!(matches!(err, CacheError::Io { op: "create", .. }), "{err}");
}

/// Not a benchmark: catches pathological slowness (e.g. a full scan per commit) on the
/// listener's pattern of many small non-durable commits and one flush.
#[test]
fn ten_thousand_entries_in_batches_of_one_hundred() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let started = Instant::now();
    for chunk in 0..100u64 {
        let mut b = cache.batch();
        for i in 0..100 {
            let n = chunk * 100 + i;
            let mut e = entry(
                &format!("uid=user{n},cn=users,dc=example,dc=org"),
                &format!("{n:08x}-0000-1000-8000-000000000000"),
                &["replication", "nfs-shares"],
            );
            e.attributes
                .push(("userPassword".into(), vec![vec![b'x'; 64]]));
            b.put(&e);
        }
        b.set_master(MasterRecord {
            notifier_id: chunk + 1,
            schema_id: 1,
        });
        cache.commit(b, false).unwrap();
    }
    cache.flush().unwrap();
    let committed = started.elapsed();
    assert_eq!(cache.len(), 10_000);
    let mut n = 0;
    for e in cache.iter() {
        e.unwrap();
        n += 1;
    }
    assert_eq!(n, 10_000);
    assert_eq!(cache.master().unwrap().unwrap().notifier_id, 100);
    let dn = format!("uid=user{},cn=users,dc=example,dc=org", 0x1234);
    assert_eq!(cache.get(&dn).unwrap().unwrap().dn, dn);
    eprintln!(
        "10k entries committed in {committed:?}, scanned in {:?} total, {} bytes on disk",
        started.elapsed(),
        cache.size_on_disk().unwrap()
    );
}

fn arb_entry() -> impl Strategy<Value = CacheEntry> {
    (
        "[a-zA-Z]{1,8}=[^,]{0,20}(,[a-z]{2}=[a-zA-Z0-9]{1,10}){0,3}",
        proptest::collection::vec(
            (
                "[a-zA-Z][a-zA-Z0-9-]{0,20}",
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..4),
            ),
            0..8,
        ),
        proptest::collection::vec("[a-z0-9_-]{1,12}", 0..5),
        proptest::option::of("[0-9a-f]{8}-[0-9a-f]{4}"),
    )
        .prop_map(|(dn, attributes, modules, uuid)| {
            let mut e = CacheEntry {
                dn,
                attributes,
                ..CacheEntry::default()
            };
            // The module list has no duplicates by contract.
            for m in modules {
                e.add_module(&m);
            }
            // Make entryUUID unambiguous: generated names never spell it.
            e.attributes
                .retain(|(n, _)| !n.eq_ignore_ascii_case("entryUUID"));
            if let Some(uuid) = uuid {
                e.attributes
                    .push(("entryUUID".into(), vec![uuid.into_bytes()]));
            }
            e
        })
}

fn round_trip(dir: &Path, entries: &[CacheEntry]) -> Result<(), TestCaseError> {
    let cache = Cache::open(dir).unwrap();
    let mut b = cache.batch();
    for e in entries {
        b.put(e);
    }
    cache.commit(b, false).unwrap();
    // Later puts of the same key win, so compare against the last one per key.
    let mut expected = std::collections::BTreeMap::new();
    for e in entries {
        expected.insert(dn_key(&e.dn), e.clone());
    }
    prop_assert_eq!(cache.len(), expected.len());
    for (key, e) in &expected {
        prop_assert_eq!(cache.get(key).unwrap(), Some(e.clone()));
        prop_assert_eq!(cache.get(&e.dn).unwrap(), Some(e.clone()));
    }
    let all: Vec<CacheEntry> = cache.iter().map(|e| e.unwrap()).collect();
    let want: Vec<CacheEntry> = expected.values().cloned().collect();
    prop_assert_eq!(all, want);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn arbitrary_entries_round_trip(entries in proptest::collection::vec(arb_entry(), 1..6)) {
        let tmp = tempfile::tempdir().unwrap();
        round_trip(tmp.path(), &entries)?;
        // The same data read back after a reopen.
        let cache = Cache::open(tmp.path()).unwrap();
        let mut b = cache.batch();
        for e in &entries {
            b.put(e);
        }
        cache.commit(b, true).unwrap();
        drop(cache);
        let cache = Cache::open(tmp.path()).unwrap();
        for e in &entries {
            let got = cache.get(&e.dn).unwrap().unwrap();
            // Only the last entry per key survives; it must be one of the inputs.
            prop_assert!(entries.contains(&got));
        }
    }
}

/// DNs longer than the store's key limit: stored, read, found below their parent,
/// renamed, stripped of a module and deleted like any other, also after a reopen.
#[test]
fn entries_with_very_long_dns_behave_like_any_other() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = format!("ou={},dc=example", "p".repeat(300));
    let long = |name: &str| format!("cn={name}{},{parent}", "x".repeat(400));
    {
        let cache = Cache::open(tmp.path()).unwrap();
        put(&cache, &entry(&parent, "u-p", &["m"]));
        put(&cache, &entry(&long("a"), "u-a", &["m", "n"]));
        put(&cache, &entry(&long("b"), "u-b", &["m"]));
        cache.flush().unwrap();
    }
    let cache = Cache::open(tmp.path()).unwrap();
    assert_eq!(cache.len(), 3);
    assert_eq!(
        cache.get(&long("A").to_uppercase()).unwrap().unwrap().dn,
        long("a")
    );
    let mut below = cache.descendant_keys(&dn_key(&parent)).unwrap();
    below.sort();
    assert_eq!(below, [dn_key(&long("a")), dn_key(&long("b"))]);
    assert_eq!(cache.remove_module_everywhere("m").unwrap(), 3);
    assert_eq!(dns(&cache), [long("a")]);
    assert_eq!(cache.get(&long("a")).unwrap().unwrap().modules, ["n"]);
    delete(&cache, &long("a"));
    assert!(cache.is_empty());
    assert_eq!(cache.get(&long("a")).unwrap(), None);
}
