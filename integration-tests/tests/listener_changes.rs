//! The listener's change semantics end to end (spec listener.md §3, §3.9, §5 and the
//! "Must-match" list): real slapd, a notifier following `cn=accesslog`, the real listener
//! binary, and the handler calls its `jsonl` modules record.
//!
//! Every test counts the transactions its LDAP writes cause, waits until the notifier has
//! announced exactly that many and the listener has processed the last of them, and then
//! compares the handler calls — `(id, command, dn)` and the `old`/`new` attributes — with
//! what the spec's rules derive, usually against the entry as LDAP holds it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::listener::{HANDLER_READY, JSONL_MODULE};
use integration_tests::slapd::{BASE, HOST_DN, RESTRICTED_DN};
use integration_tests::{
    Change, Directory, JsonlTail, Listener, ListenerOptions, Notifier, Slapd, wait_until,
};

/// Far above what a healthy stack needs (well under a second per transaction).
const WAIT: Duration = Duration::from_secs(30);

type Attrs = BTreeMap<String, Vec<Vec<u8>>>;

/// `(id, command, dn)` of a handler call.
type Call = (u64, char, String);

// ---------------------------------------------------------------------------------------
// Harness glue
// ---------------------------------------------------------------------------------------

/// slapd, a notifier following its accesslog and an admin connection for the writes.
struct Env {
    slapd: Slapd,
    notifier: Notifier,
    admin: Directory,
    /// The notifier's last id as far as the test has accounted for it.
    last: u64,
}

impl Env {
    fn start() -> Env {
        Env::start_with(&[])
    }

    fn start_with(notifier_args: &[&str]) -> Env {
        let slapd = Slapd::provider().unwrap();
        let notifier = Notifier::following_accesslog(&slapd, notifier_args, WAIT).unwrap();
        let admin = slapd.admin().unwrap();
        let last = notifier_last_id(&notifier);
        Env {
            slapd,
            notifier,
            admin,
            last,
        }
    }

    /// Waits until the notifier has announced exactly `count` transactions more than
    /// accounted for so far, and returns the new last id. More than `count` fails: the
    /// tests derive the ids of their handler calls from this arithmetic.
    fn announced(&mut self, count: u64) -> u64 {
        let expected = self.last + count;
        let notifier = &self.notifier;
        let what = format!("the notifier to announce transaction {expected}");
        wait_until(&what, WAIT, || {
            Ok((notifier_last_id(notifier) >= expected).then_some(()))
        })
        .unwrap();
        assert_eq!(
            notifier_last_id(&self.notifier),
            expected,
            "the notifier announced more transactions than the test's writes cause"
        );
        self.last = expected;
        expected
    }

    /// Starts a listener on this stack and waits for its initial sync.
    fn follow(&self, options: ListenerOptions) -> Feed {
        let mut listener = Listener::start(&self.slapd, &self.notifier, options).unwrap();
        listener.wait_initialized(WAIT).unwrap();
        let mut tail = listener.tail();
        let init = tail.poll().unwrap();
        Feed {
            listener,
            tail,
            init,
        }
    }

    /// The entry as LDAP holds it (read as the rootdn), with all user and operational
    /// attributes.
    fn ldap(&mut self, dn: &str) -> (String, Attrs) {
        let entry = self
            .admin
            .get(dn)
            .unwrap()
            .unwrap_or_else(|| panic!("{dn} is not in LDAP"));
        (entry.dn, entry.attrs)
    }

    fn ldap_attrs(&mut self, dn: &str) -> Attrs {
        self.ldap(dn).1
    }
}

/// A listener and a reader of its default `jsonl` module's calls.
struct Feed {
    listener: Listener,
    tail: JsonlTail,
    /// The calls of the initial sync (module initialisation).
    init: Vec<Change>,
}

impl Feed {
    /// Waits until the listener has processed transaction `id` and returns the handler
    /// calls recorded since the previous call of this method.
    fn calls_until(&mut self, id: u64) -> Vec<Change> {
        self.listener.wait_for_id(id, WAIT).unwrap();
        let calls = self.tail.poll().unwrap();
        for call in &calls {
            assert!(call.id <= id, "call of a future transaction: {call:?}");
            assert_eq!(call.module, JSONL_MODULE);
        }
        calls
    }
}

/// One LDAP write and the number of transactions it causes (a modrdn causes two).
struct Write<'a> {
    transactions: u64,
    apply: Box<dyn FnOnce(&mut Directory) + 'a>,
}

fn write<'a>(transactions: u64, apply: impl FnOnce(&mut Directory) + 'a) -> Write<'a> {
    Write {
        transactions,
        apply: Box::new(apply),
    }
}

/// Applies the writes one at a time, each only after every feed has processed the
/// previous one, and returns each feed's calls. The listener reads an object's *current*
/// LDAP state (§3.2), so a write that follows too quickly changes what an earlier
/// transaction looks like; live semantics need this lockstep (the backlog test shows the
/// other case).
fn one_by_one(env: &mut Env, feeds: &mut [&mut Feed], writes: Vec<Write<'_>>) -> Vec<Vec<Change>> {
    let mut seen = vec![Vec::new(); feeds.len()];
    for write in writes {
        (write.apply)(&mut env.admin);
        let id = env.announced(write.transactions);
        for (feed, seen) in feeds.iter_mut().zip(&mut seen) {
            seen.extend(feed.calls_until(id));
        }
    }
    seen
}

/// The notifier's last transaction id (`GET_ID`).
fn notifier_last_id(notifier: &Notifier) -> u64 {
    notifier.last_id().unwrap()
}

fn calls(changes: &[Change]) -> Vec<Call> {
    changes
        .iter()
        .map(|c| (c.id, c.command, c.dn.clone()))
        .collect()
}

fn call(id: u64, command: char, dn: &str) -> Call {
    (id, command, dn.to_owned())
}

fn dn(rdn: &str) -> String {
    format!("{rdn},{BASE}")
}

/// `state` with the given attributes' values replaced.
fn with(state: &Attrs, replace: &[(&str, &[&[u8]])]) -> Attrs {
    let mut state = state.clone();
    for (attr, values) in replace {
        state.insert(
            (*attr).to_owned(),
            values.iter().map(|v| v.to_vec()).collect(),
        );
    }
    state
}

fn texts(state: &Attrs, attr: &str) -> Vec<String> {
    integration_tests::directory::texts(state.get(attr))
}

fn add_person(admin: &mut Directory, dn: &str, uid: &str, cn: &str, sn: &str) {
    admin
        .add(
            dn,
            &[
                ("objectClass", &["inetOrgPerson"]),
                ("uid", &[uid]),
                ("cn", &[cn]),
                ("sn", &[sn]),
                ("mail", &[&format!("{uid}@example.com")]),
            ],
        )
        .unwrap();
}

fn add_ou(admin: &mut Directory, dn: &str, ou: &str) {
    admin
        .add(
            dn,
            &[("objectClass", &["organizationalUnit"]), ("ou", &[ou])],
        )
        .unwrap();
}

/// A native jsonl module set up by a config file in `dir`; returns the `--native-module`
/// spec and the file it writes.
fn jsonl_module(dir: &Path, name: &str, settings: &str) -> (String, PathBuf) {
    let file = dir.join(format!("{name}.jsonl"));
    let conf = dir.join(format!("{name}.conf"));
    fs::write(
        &conf,
        format!("name = {name}\nfile = {}\n{settings}", file.display()),
    )
    .unwrap();
    (format!("jsonl=@{}", conf.display()), file)
}

// ---------------------------------------------------------------------------------------
// 1. Live add / modify / delete
// ---------------------------------------------------------------------------------------

/// §3.3: `a` with old={} and the whole LDAP entry (user and operational attributes) as
/// new; `m` with the previous state as old and the current one as new, under LDAP's DN
/// even when the writer spelled it differently; `d` with the last state as old.
#[test]
fn live_add_modify_delete() {
    let mut env = Env::start();
    let mut feed = env.follow(ListenerOptions::new());
    let alice = dn("uid=Alice");

    add_person(&mut env.admin, &alice, "Alice", "Alice Liddell", "Liddell");
    let id = env.announced(1);
    let added = feed.calls_until(id);
    assert_eq!(calls(&added), [call(id, 'a', &alice)]);
    let add = &added[0];
    assert!(add.old.is_empty(), "{add:?}");
    let (ldap_dn, state) = env.ldap(&alice);
    assert_eq!(ldap_dn, alice);
    assert_eq!(add.new, state, "a: new must be the entry as LDAP holds it");
    for operational in [
        "entryUUID",
        "entryDN",
        "entryCSN",
        "modifyTimestamp",
        "createTimestamp",
    ] {
        assert!(
            add.new.contains_key(operational),
            "no {operational} in {add:?}"
        );
    }
    assert_eq!(texts(&add.new, "entryDN"), [alice.as_str()]);
    assert_eq!(texts(&add.new, "uid"), ["Alice"]);

    // Written under another spelling of the DN: the handler gets LDAP's.
    env.admin
        .modify(
            "UID=ALICE,DC=EXAMPLE,DC=COM",
            vec![
                ldap3::Mod::Replace(
                    b"mail".to_vec(),
                    [b"alice.liddell@example.com".to_vec()].into(),
                ),
                ldap3::Mod::Add(b"telephoneNumber".to_vec(), [b"+49 421 1".to_vec()].into()),
            ],
        )
        .unwrap();
    let id = env.announced(1);
    let modified = feed.calls_until(id);
    assert_eq!(calls(&modified), [call(id, 'm', &alice)]);
    let modify = &modified[0];
    assert_eq!(modify.old, add.new, "m: old must be the previous state");
    let state = env.ldap_attrs(&alice);
    assert_eq!(
        modify.new, state,
        "m: new must be the entry as LDAP holds it"
    );
    let changed = modify.changed_attributes();
    for attr in ["mail", "telephoneNumber", "entryCSN"] {
        assert!(
            changed.contains(&attr.to_owned()),
            "{attr} not in {changed:?}"
        );
    }
    assert!(!changed.contains(&"uid".to_owned()), "{changed:?}");

    env.admin.delete(&alice).unwrap();
    let id = env.announced(1);
    let deleted = feed.calls_until(id);
    assert_eq!(calls(&deleted), [call(id, 'd', &alice)]);
    assert_eq!(deleted[0].old, modify.new, "d: old must be the last state");
    assert!(deleted[0].new.is_empty(), "{:?}", deleted[0]);
    assert_eq!(feed.listener.notifier_id(), Some(env.last));
}

// ---------------------------------------------------------------------------------------
// 2. Rename and move
// ---------------------------------------------------------------------------------------

/// §3.3.1: a modrdn is the notifier's `r` (id N) then `a` (id N+1); the module sees `r`
/// under the old DN (old = cached state, new = {}), `a` under the new DN (old = {}, new =
/// the cached state with the RDN attribute's values replaced by the new RDN value and
/// entryDN set to the new DN), then `m` under the new DN (old = that, new = LDAP), because
/// the operational attributes (entryCSN, modifyTimestamp) differ.
#[test]
fn rename_and_move_are_r_a_m() {
    let mut env = Env::start();
    let mut feed = env.follow(ListenerOptions::new());
    let people = dn("ou=people");
    let alumni = dn("ou=alumni");
    let bob = format!("uid=bob,{people}");
    add_ou(&mut env.admin, &people, "people");
    add_ou(&mut env.admin, &alumni, "alumni");
    add_person(&mut env.admin, &bob, "bob", "Bob", "Builder");
    let id = env.announced(3);
    let added = feed.calls_until(id);
    assert_eq!(
        calls(&added),
        [
            call(id - 2, 'a', &people),
            call(id - 1, 'a', &alumni),
            call(id, 'a', &bob)
        ]
    );
    let cached = added[2].new.clone();

    // Rename with deleteoldrdn: uid bob → robert.
    let robert = format!("uid=robert,{people}");
    env.admin.modrdn(&bob, "uid=robert", true, None).unwrap();
    let id = env.announced(2);
    let renamed = feed.calls_until(id);
    assert_eq!(
        calls(&renamed),
        [
            call(id - 1, 'r', &bob),
            call(id, 'a', &robert),
            call(id, 'm', &robert)
        ]
    );
    let (r, a, m) = (&renamed[0], &renamed[1], &renamed[2]);
    assert_eq!(r.old, cached, "r: old must be the cached state");
    assert!(r.new.is_empty(), "r: new must be empty: {r:?}");
    assert!(a.old.is_empty(), "a: old must be empty: {a:?}");
    let expected = with(
        &cached,
        &[("uid", &[b"robert"]), ("entryDN", &[robert.as_bytes()])],
    );
    assert_eq!(
        a.new, expected,
        "a: new must be the cached state with the new RDN value and entryDN"
    );
    assert_eq!(m.old, a.new, "m: old must be the state the a call passed");
    assert_eq!(
        m.new,
        env.ldap_attrs(&robert),
        "m: new must be LDAP's entry"
    );
    let changed = m.changed_attributes();
    assert!(changed.contains(&"entryCSN".to_owned()), "{changed:?}");
    assert!(!changed.contains(&"uid".to_owned()), "{changed:?}");
    assert!(!changed.contains(&"entryDN".to_owned()), "{changed:?}");

    // Move to another OU (newSuperior): no RDN change, only entryDN.
    let moved = format!("uid=robert,{alumni}");
    env.admin
        .modrdn(&robert, "uid=robert", true, Some(&alumni))
        .unwrap();
    let id = env.announced(2);
    let moves = feed.calls_until(id);
    assert_eq!(
        calls(&moves),
        [
            call(id - 1, 'r', &robert),
            call(id, 'a', &moved),
            call(id, 'm', &moved)
        ]
    );
    assert_eq!(moves[0].old, m.new);
    assert!(moves[0].new.is_empty());
    assert!(moves[1].old.is_empty());
    assert_eq!(
        moves[1].new,
        with(&m.new, &[("entryDN", &[moved.as_bytes()])])
    );
    assert_eq!(moves[2].old, moves[1].new);
    assert_eq!(moves[2].new, env.ldap_attrs(&moved));

    // Without deleteoldrdn LDAP keeps the old value, but the `a` call's state has the RDN
    // attribute replaced (old values removed even then); the `m` brings LDAP's values.
    let carol = dn("cn=Carol");
    env.admin.add_role(&carol, "Carol").unwrap();
    let id = env.announced(1);
    let carol_state = feed.calls_until(id)[0].new.clone();
    let caroline = dn("cn=Caroline");
    env.admin
        .modrdn(&carol, "cn=Caroline", false, None)
        .unwrap();
    let id = env.announced(2);
    let kept = feed.calls_until(id);
    assert_eq!(
        calls(&kept),
        [
            call(id - 1, 'r', &carol),
            call(id, 'a', &caroline),
            call(id, 'm', &caroline)
        ]
    );
    assert_eq!(
        kept[1].new,
        with(
            &carol_state,
            &[("cn", &[b"Caroline"]), ("entryDN", &[caroline.as_bytes()])]
        )
    );
    let ldap = env.ldap_attrs(&caroline);
    let mut cns = texts(&ldap, "cn");
    cns.sort();
    assert_eq!(cns, ["Carol", "Caroline"], "slapd kept the old RDN value");
    assert_eq!(kept[2].old, kept[1].new);
    assert_eq!(kept[2].new, ldap);
    assert_eq!(feed.listener.notifier_id(), Some(env.last));
}

// ---------------------------------------------------------------------------------------
// 3. Backlog
// ---------------------------------------------------------------------------------------

/// Changes made while the listener is stopped. For every transaction the listener reads
/// the object's *current* LDAP state (§3.2), so the calls follow from what LDAP holds when
/// it catches up, not from what it held at the time of the write:
///
/// - add X, modify X: the `a` already has the final state; the `m` then finds LDAP equal
///   to the cache and the module recorded on X ⇒ "up-to-date", no call (§3.4).
/// - add Y, delete Y: Y is not in LDAP any more ⇒ each transaction is a delete (§3.2 step
///   4) ⇒ `d` twice with old = {} (nothing cached; jsonl has handle_every_delete).
/// - modify Z, rename Z → Z2, modify Z2: the `m` on Z finds the object (by entryUUID) at
///   Z2 ⇒ "delaying update until moved", no call; the `r` is stashed; the `a` is the move:
///   `r` Z (old = Z as cached before the stop, i.e. without the modification), `a` Z2
///   (that state with the new RDN), `m` Z2 (new = LDAP, with both modifications); the
///   final `m` on Z2 is then up-to-date.
/// - modify W, delete W: the `m` finds nothing (by entryUUID, then by DN) ⇒ `d` with old =
///   W as cached; the delete then has no cache entry left ⇒ `d` with old = {}.
/// - delete V, add V again (a new object under the same DN): the `d` finds no object by
///   V's entryUUID but one by DN ("resurrection") and is a delete regardless (§3.3) ⇒ `d`
///   with old = V as cached; the `a` is then a plain add of the new object.
#[test]
fn backlog_uses_the_current_ldap_state() {
    let mut env = Env::start();
    let mut feed = env.follow(ListenerOptions::new());
    let z = dn("cn=zed");
    let w = dn("cn=wes");
    let v = dn("cn=vic");
    env.admin.add_role(&z, "zed").unwrap();
    env.admin.add_role(&w, "wes").unwrap();
    env.admin.add_role(&v, "vic").unwrap();
    let id = env.announced(3);
    let before = feed.calls_until(id);
    assert_eq!(
        calls(&before),
        [
            call(id - 2, 'a', &z),
            call(id - 1, 'a', &w),
            call(id, 'a', &v)
        ]
    );
    let z_cached = before[0].new.clone();
    let w_cached = before[1].new.clone();
    let v_cached = before[2].new.clone();
    feed.listener.stop().unwrap();
    let base = env.last;

    let x = dn("cn=xavier");
    let y = dn("cn=yvonne");
    let z2 = dn("cn=zora");
    env.admin.add_role(&x, "xavier").unwrap(); // base+1
    env.admin.replace(&x, "description", &["final"]).unwrap(); // +2
    env.admin.add_role(&y, "yvonne").unwrap(); // +3
    env.admin.delete(&y).unwrap(); // +4
    env.admin.replace(&z, "description", &["changed"]).unwrap(); // +5
    env.admin.modrdn(&z, "cn=zora", true, None).unwrap(); // +6 r, +7 a
    env.admin
        .replace(&z2, "description", &["changed again"])
        .unwrap(); // +8
    env.admin.replace(&w, "description", &["doomed"]).unwrap(); // +9
    env.admin.delete(&w).unwrap(); // +10
    env.admin.delete(&v).unwrap(); // +11
    env.admin.add_role(&v, "vic").unwrap(); // +12
    let last = env.announced(12);
    assert_eq!(last, base + 12);

    feed.listener.restart().unwrap();
    let backlog = feed.calls_until(last);
    assert_eq!(
        calls(&backlog),
        [
            call(base + 1, 'a', &x),
            call(base + 3, 'd', &y),
            call(base + 4, 'd', &y),
            call(base + 6, 'r', &z),
            call(base + 7, 'a', &z2),
            call(base + 7, 'm', &z2),
            call(base + 9, 'd', &w),
            call(base + 10, 'd', &w),
            call(base + 11, 'd', &v),
            call(base + 12, 'a', &v),
        ]
    );
    let x_state = env.ldap_attrs(&x);
    assert_eq!(texts(&x_state, "description"), ["final"]);
    assert!(backlog[0].old.is_empty());
    assert_eq!(backlog[0].new, x_state, "a: the current LDAP state");
    for y_call in &backlog[1..3] {
        assert!(y_call.old.is_empty() && y_call.new.is_empty(), "{y_call:?}");
    }
    assert_eq!(
        backlog[3].old, z_cached,
        "r: the state cached before the stop"
    );
    assert!(backlog[3].new.is_empty());
    assert!(backlog[4].old.is_empty());
    assert_eq!(
        backlog[4].new,
        with(
            &z_cached,
            &[("cn", &[b"zora"]), ("entryDN", &[z2.as_bytes()])]
        )
    );
    assert_eq!(backlog[5].old, backlog[4].new);
    let z2_state = env.ldap_attrs(&z2);
    assert_eq!(texts(&z2_state, "description"), ["changed again"]);
    assert_eq!(backlog[5].new, z2_state);
    assert_eq!(backlog[6].old, w_cached, "d: W as cached");
    assert!(backlog[6].new.is_empty());
    assert!(backlog[7].old.is_empty() && backlog[7].new.is_empty());
    assert_eq!(backlog[8].old, v_cached, "d: the old object as cached");
    assert!(backlog[8].new.is_empty());
    assert!(backlog[9].old.is_empty());
    let v_state = env.ldap_attrs(&v);
    assert_eq!(backlog[9].new, v_state, "a: the new object");
    assert_ne!(v_state.get("entryUUID"), v_cached.get("entryUUID"));

    assert_eq!(
        feed.listener.notifier_id(),
        Some(notifier_last_id(&env.notifier))
    );
}

// ---------------------------------------------------------------------------------------
// 4. Selective replication
// ---------------------------------------------------------------------------------------

/// §3.2 step 4: an object the listener's bind identity cannot see is deleted for it: a
/// write under `cn=restricted` reaches the module as `d` (old = {}), never as `a`/`m`. A
/// listener bound as the rootdn sees the same writes as `a` and `m`.
#[test]
fn restricted_objects_arrive_as_deletes() {
    let mut env = Env::start();
    let mut host = env.follow(ListenerOptions::new());
    let mut admin = env.follow(ListenerOptions::new().bind_admin());
    let restricted_init = |feed: &Feed| -> Vec<String> {
        feed.init
            .iter()
            .filter(|c| c.dn.ends_with(RESTRICTED_DN))
            .map(Change::summary)
            .collect()
    };
    assert_eq!(restricted_init(&host), Vec::<String>::new());
    assert_eq!(restricted_init(&admin), [format!("n {RESTRICTED_DN}")]);

    let secret = format!("cn=secret,{RESTRICTED_DN}");
    let added = env.last + 1;
    let modified = env.last + 2;
    let mut seen = one_by_one(
        &mut env,
        &mut [&mut host, &mut admin],
        vec![
            write(1, |d| d.add_role(&secret, "secret").unwrap()),
            write(1, |d| {
                d.replace(&secret, "description", &["still secret"])
                    .unwrap()
            }),
        ],
    );
    let (seen, admin_seen) = (seen.remove(0), seen.remove(0));
    assert_eq!(
        calls(&seen),
        [call(added, 'd', &secret), call(modified, 'd', &secret)]
    );
    for c in &seen {
        assert!(c.old.is_empty() && c.new.is_empty(), "{c:?}");
    }
    assert!(
        host.listener
            .changes()
            .unwrap()
            .iter()
            .all(|c| !c.dn.ends_with(RESTRICTED_DN) || c.command == 'd'),
        "the host listener passed a restricted object as something else than a delete"
    );

    assert_eq!(
        calls(&admin_seen),
        [call(added, 'a', &secret), call(modified, 'm', &secret)]
    );
    assert_eq!(admin_seen[1].new, env.ldap_attrs(&secret));
    assert_eq!(host.listener.notifier_id(), Some(env.last));
    assert_eq!(admin.listener.notifier_id(), Some(env.last));
}

/// Moves across the visibility boundary of the host account (Bug #32685). Into the
/// restricted subtree: the `r` finds the object neither by entryUUID nor by DN ⇒ `d` under
/// the old DN with old = cached state (not stashed as a move); the `a` cannot see it ⇒ `d`
/// under the new DN with old = {}. Out of it: the `r` has nothing to find ⇒ `d` (old = {});
/// the `a` is a plain add with LDAP's state, and later writes are ordinary `m` calls. The
/// rootdn's listener sees both as ordinary r/a/m moves.
#[test]
fn moves_across_the_visibility_boundary() {
    let mut env = Env::start();
    let mut host = env.follow(ListenerOptions::new());
    let mut admin = env.follow(ListenerOptions::new().bind_admin());
    let visible = dn("cn=mover");
    let hidden = format!("cn=mover,{RESTRICTED_DN}");
    let back = dn("cn=mover2");
    let base = env.last;
    let mut seen = one_by_one(
        &mut env,
        &mut [&mut host, &mut admin],
        vec![
            write(1, |d| d.add_role(&visible, "mover").unwrap()),
            write(2, |d| {
                d.modrdn(&visible, "cn=mover", true, Some(RESTRICTED_DN))
                    .unwrap();
            }),
            write(2, |d| {
                d.modrdn(&hidden, "cn=mover2", true, Some(BASE)).unwrap()
            }),
            write(1, |d| d.replace(&back, "description", &["back"]).unwrap()),
        ],
    );
    let (host_seen, admin_seen) = (seen.remove(0), seen.remove(0));
    assert_eq!(
        calls(&host_seen),
        [
            call(base + 1, 'a', &visible),
            call(base + 2, 'd', &visible),
            call(base + 3, 'd', &hidden),
            call(base + 4, 'd', &hidden),
            call(base + 5, 'a', &back),
            call(base + 6, 'm', &back),
        ]
    );
    assert_eq!(host_seen[1].old, host_seen[0].new, "d: the cached state");
    for c in &host_seen[2..4] {
        assert!(c.old.is_empty() && c.new.is_empty(), "{c:?}");
    }
    assert!(host_seen[4].old.is_empty());
    assert_eq!(host_seen[4].new.get("cn"), Some(&vec![b"mover2".to_vec()]));
    assert_eq!(host_seen[5].old, host_seen[4].new);
    assert_eq!(host_seen[5].new, env.ldap_attrs(&back));
    assert_eq!(
        calls(&admin_seen),
        [
            call(base + 1, 'a', &visible),
            call(base + 2, 'r', &visible),
            call(base + 3, 'a', &hidden),
            call(base + 3, 'm', &hidden),
            call(base + 4, 'r', &hidden),
            call(base + 5, 'a', &back),
            call(base + 5, 'm', &back),
            call(base + 6, 'm', &back),
        ]
    );
}

/// `univention-directory-listener-verify` against the feed's cache, as the host account:
/// asserts it finds no difference between cache and LDAP.
fn assert_verify_clean(env: &Env, feed: &Feed) {
    let cache = feed.listener.cache_dir().display().to_string();
    let password = feed.listener.password_file().display().to_string();
    let url = env.slapd.ldap_url();
    let out = std::process::Command::new(
        integration_tests::process::binary("univention-directory-listener-verify").unwrap(),
    )
    .args([
        "-c", &cache, "-H", &url, "-b", BASE, "-D", HOST_DN, "-y", &password,
    ])
    .env("NO_COLOR", "1")
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        (out.status.code(), stdout.as_ref()),
        (Some(0), ""),
        "verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Renaming a container and moving it to another one moves its cached subtree with it
/// (three levels deep), atomically: `verify` is clean after each step, and a later change
/// of a descendant carries its cached state as `old`. The default `jsonl` module
/// (`handle_subtree_moves` on) gets an `r` + `a` per descendant, parents first, with the
/// container's ids; a module with it off gets no call for them. Moving the
/// container into the ACL-hidden subtree then deletes every cached descendant, deepest
/// first, with its cached state, before the container itself.
#[test]
fn subtree_moves_take_the_cached_descendants_along() {
    let mut env = Env::start();
    let modules = tempfile::tempdir().unwrap();
    let (quiet_spec, quiet_file) =
        jsonl_module(modules.path(), "quiet", "handle_subtree_moves = no\n");
    let mut feed = env.follow(ListenerOptions::new().native_module(quiet_spec));
    let listener = &feed.listener;
    wait_until("every module's initialisation", WAIT, || {
        let states = listener.handler_states();
        let ready = ["quiet", JSONL_MODULE]
            .iter()
            .all(|name| states.get(*name) == Some(&HANDLER_READY));
        Ok(ready.then_some(()))
    })
    .unwrap();
    let mut quiet = JsonlTail::new(&quiet_file);
    let c1 = dn("ou=c1");
    let n1 = format!("ou=n1,{c1}");
    let n2 = format!("ou=n2,{n1}");
    let deep = format!("cn=deep,{n2}");
    let kid = format!("cn=k1,{c1}");
    let c2 = dn("ou=c2");
    let dest = dn("ou=dest");
    let under = |rdn: &str, container: &str| format!("{rdn},{container}");
    let base = env.last;
    let seen = one_by_one(
        &mut env,
        &mut [&mut feed],
        vec![
            write(1, |d| add_ou(d, &c1, "c1")),
            write(1, |d| d.add_role(&kid, "k1").unwrap()),
            write(1, |d| add_ou(d, &n1, "n1")),
            write(1, |d| add_ou(d, &n2, "n2")),
            write(1, |d| d.add_role(&deep, "deep").unwrap()),
            write(2, |d| d.modrdn(&c1, "ou=c2", true, None).unwrap()),
        ],
    )
    .remove(0);
    let renamed = [
        call(base + 6, 'r', &c1),
        call(base + 7, 'a', &c2),
        call(base + 7, 'm', &c2),
    ];
    assert_eq!(calls(&seen[5..8]), renamed);
    let pairs = calls(&seen[8..]);
    assert_eq!(pairs.len(), 8, "{pairs:#?}");
    for pair in pairs.chunks(2) {
        let (r, a) = (&pair[0], &pair[1]);
        assert_eq!(
            (r.0, r.1, a.0, a.1),
            (base + 6, 'r', base + 7, 'a'),
            "{pairs:#?}"
        );
        assert_eq!(a.2, dn_rebased(&r.2, &c1, &c2));
    }
    let order = |dn: &str| pairs.iter().position(|c| c.2 == dn).unwrap();
    assert!(
        order(&n1) < order(&n2) && order(&n2) < order(&deep),
        "parents first"
    );
    let deep_a = seen[8..]
        .iter()
        .find(|c| c.command == 'a' && c.dn.starts_with("cn=deep"));
    assert_eq!(
        deep_a.unwrap().new,
        with(
            &seen[4].new,
            &[("entryDN", &[dn_rebased(&deep, &c1, &c2).as_bytes()])]
        ),
        "a: the cached state, re-keyed"
    );
    let quiet_seen = quiet.poll().unwrap();
    let quiet_calls: Vec<Call> = calls(&quiet_seen)
        .into_iter()
        .filter(|c| c.0 > base + 5)
        .collect();
    assert_eq!(
        quiet_calls, renamed,
        "descendants move silently without the flag"
    );
    assert_verify_clean(&env, &feed);

    // A later change of a descendant finds its cached state under the new DN.
    let deep2 = format!("cn=deep,ou=n2,ou=n1,{c2}");
    let before = seen[4].new.clone();
    let changed = one_by_one(
        &mut env,
        &mut [&mut feed],
        vec![write(1, |d| {
            d.replace(&deep2, "description", &["d"]).unwrap()
        })],
    )
    .remove(0);
    assert_eq!(calls(&changed), [call(base + 8, 'm', &deep2)]);
    assert_eq!(
        changed[0].old,
        with(&before, &[("entryDN", &[deep2.as_bytes()])]),
        "old: the cached state, re-keyed"
    );
    assert_eq!(changed[0].new, env.ldap_attrs(&deep2));

    // Move across containers.
    let moved = under("ou=c2", &dest);
    let seen = one_by_one(
        &mut env,
        &mut [&mut feed],
        vec![
            write(1, |d| add_ou(d, &dest, "dest")),
            write(2, |d| d.modrdn(&c2, "ou=c2", true, Some(&dest)).unwrap()),
        ],
    )
    .remove(0);
    assert_eq!(
        calls(&seen[..4]),
        [
            call(base + 9, 'a', &dest),
            call(base + 10, 'r', &c2),
            call(base + 11, 'a', &moved),
            call(base + 11, 'm', &moved),
        ]
    );
    assert_eq!(seen.len(), 4 + 8, "{:#?}", calls(&seen));
    assert_verify_clean(&env, &feed);

    // Into the hidden subtree: every descendant is deleted, deepest first, then the
    // container; the module's view of the subtree is empty, as LDAP shows it to the host.
    let m_n1 = under("ou=n1", &moved);
    let m_n2 = under("ou=n2", &m_n1);
    let m_deep = under("cn=deep", &m_n2);
    let m_kid = under("cn=k1", &moved);
    let hidden = format!("ou=c2,{RESTRICTED_DN}");
    let cached_deep = with(&changed[0].new, &[("entryDN", &[m_deep.as_bytes()])]);
    let seen = one_by_one(
        &mut env,
        &mut [&mut feed],
        vec![write(2, |d| {
            d.modrdn(&moved, "ou=c2", true, Some(RESTRICTED_DN))
                .unwrap()
        })],
    )
    .remove(0);
    let got = calls(&seen);
    assert_eq!(got.len(), 6, "{got:#?}");
    // The `r` already finds the container out of view: it deletes the subtree, and the
    // `a` finds nothing cached (like a leaf moved there).
    assert_eq!(got[0], call(base + 12, 'd', &m_deep));
    assert_eq!(got[1], call(base + 12, 'd', &m_n2));
    let mut shallow = vec![got[2].clone(), got[3].clone()];
    shallow.sort();
    let mut expected = vec![call(base + 12, 'd', &m_n1), call(base + 12, 'd', &m_kid)];
    expected.sort();
    assert_eq!(shallow, expected);
    assert_eq!(got[4], call(base + 12, 'd', &moved));
    assert_eq!(got[5], call(base + 13, 'd', &hidden));
    assert_eq!(
        seen[0].old, cached_deep,
        "d: the cached state of the descendant"
    );
    assert_verify_clean(&env, &feed);

    // Out of the hidden subtree into view: the container's add is followed by an add
    // for each descendant (read from LDAP), parents first, in the same transaction.
    let c3 = dn("ou=c3");
    let seen = one_by_one(
        &mut env,
        &mut [&mut feed],
        vec![write(2, |d| {
            d.modrdn(&hidden, "ou=c3", true, Some(BASE)).unwrap()
        })],
    )
    .remove(0);
    let got = calls(&seen);
    let adds: Vec<&Call> = got.iter().filter(|c| c.1 == 'a').collect();
    assert_eq!(adds.len(), 5, "{got:#?}");
    assert_eq!(*adds[0], call(base + 15, 'a', &c3));
    let position = |dn: &str| adds.iter().position(|c| c.2 == dn).unwrap();
    let n1 = under("ou=n1", &c3);
    let n2 = under("ou=n2", &n1);
    let deep = under("cn=deep", &n2);
    assert!(position(&under("cn=k1", &c3)) > 0);
    assert!(position(&n1) < position(&n2) && position(&n2) < position(&deep));
    assert!(adds.iter().all(|c| c.0 == base + 15));
    let added = seen.iter().find(|c| c.dn == deep).unwrap();
    assert!(added.old.is_empty());
    assert_eq!(added.new, env.ldap_attrs(&deep));
    assert_verify_clean(&env, &feed);

    // The module's view, built from all its calls keyed by DN, equals LDAP.
    let mut view: BTreeMap<String, Attrs> = BTreeMap::new();
    for change in feed.listener.changes().unwrap() {
        let key = change.dn.to_ascii_lowercase();
        match change.command {
            'a' | 'm' | 'n' => {
                view.insert(key, change.new);
            }
            _ => {
                view.remove(&key);
            }
        }
    }
    for dn in [&c3, &n1, &n2, &deep, &under("cn=k1", &c3)] {
        assert_eq!(
            view.get(&dn.to_ascii_lowercase()),
            Some(&env.ldap_attrs(dn)),
            "{dn}"
        );
    }
    let stale: Vec<&String> = view
        .keys()
        .filter(|k| k.contains("ou=c1,") || k.contains("ou=c2,"))
        .collect();
    assert!(stale.is_empty(), "{stale:#?}");
}

/// `dn` below `old` moved to the same place below `new` (the test's DNs are lower case).
fn dn_rebased(dn: &str, old: &str, new: &str) -> String {
    format!("{}{new}", dn.strip_suffix(old).unwrap())
}

// ---------------------------------------------------------------------------------------
// 5. Case-only rename
// ---------------------------------------------------------------------------------------

/// `cn=Foo` → `cn=foo`: the cache key (lower-cased DN) is the same, which must not be
/// taken for a "move_to collision" that loses the object: r/a/m as for any rename, and
/// the cache then holds exactly one entry for it, spelled the new way.
#[test]
fn case_only_rename() {
    let mut env = Env::start();
    let mut feed = env.follow(ListenerOptions::new());
    let upper = dn("cn=Foo");
    let lower = dn("cn=foo");
    env.admin.add_role(&upper, "Foo").unwrap();
    let id = env.announced(1);
    let cached = feed.calls_until(id)[0].new.clone();

    env.admin.modrdn(&upper, "cn=foo", true, None).unwrap();
    let id = env.announced(2);
    let renamed = feed.calls_until(id);
    assert_eq!(
        calls(&renamed),
        [
            call(id - 1, 'r', &upper),
            call(id, 'a', &lower),
            call(id, 'm', &lower)
        ]
    );
    assert_eq!(renamed[0].old, cached);
    assert_eq!(
        renamed[1].new,
        with(
            &cached,
            &[("cn", &[b"foo"]), ("entryDN", &[lower.as_bytes()])]
        )
    );
    let state = env.ldap_attrs(&lower);
    assert_eq!(texts(&state, "cn"), ["foo"]);
    assert_eq!(renamed[2].old, renamed[1].new);
    assert_eq!(renamed[2].new, state);

    // A later modify is a plain `m` with the new spelling and the right old state.
    env.admin
        .replace(&lower, "description", &["after"])
        .unwrap();
    let id = env.announced(1);
    let modified = feed.calls_until(id);
    assert_eq!(calls(&modified), [call(id, 'm', &lower)]);
    assert_eq!(modified[0].old, state);

    feed.listener.stop().unwrap();
    let cache = cache::Cache::open(&feed.listener.cache_dir()).unwrap();
    let entries: Vec<cache::CacheEntry> = cache
        .iter()
        .map(Result::unwrap)
        .filter(|entry| entry.dn.eq_ignore_ascii_case(&lower))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert_eq!(entries[0].dn, lower);
    assert_eq!(entries[0].values("cn"), Some(&[b"foo".to_vec()][..]));
    assert_eq!(
        entries[0].values("entryDN"),
        Some(&[lower.as_bytes().to_vec()][..])
    );
    assert!(entries[0].has_module(JSONL_MODULE), "{:?}", entries[0]);
    assert_eq!(cache.get(&upper).unwrap().map(|e| e.dn), Some(lower));
}

// ---------------------------------------------------------------------------------------
// 6. Non-ASCII and escaped RDNs
// ---------------------------------------------------------------------------------------

/// DNs reach the module as slapd spells them (it re-escapes `,` `+` and a leading `#` as
/// `\2C`, `\2B`, `\23`), attribute values as their unescaped bytes, and the RDN value
/// replacement of a rename uses the unescaped value of the new RDN (§3.3.1 step 2).
#[test]
fn escaped_and_non_ascii_dns() {
    let mut env = Env::start();
    let mut feed = env.follow(ListenerOptions::new());
    let written = [
        (dn("cn=Jürgen Groß"), "Jürgen Groß"),
        (dn("cn=Doe\\, John"), "Doe, John"),
        (dn("cn=a\\+b"), "a+b"),
        (dn("cn=\\#hash"), "#hash"),
        (
            dn("cn=semi\\;colon \\\"quoted\\\""),
            "semi;colon \"quoted\"",
        ),
    ];
    let mut spelled = Vec::new();
    for (written_dn, cn) in &written {
        env.admin.add_role(written_dn, cn).unwrap();
        spelled.push(env.ldap(written_dn).0);
    }
    assert_eq!(spelled[0], dn("cn=Jürgen Groß"));
    assert_eq!(spelled[1], dn("cn=Doe\\2C John"), "slapd's escaping");
    let last = env.announced(written.len() as u64);
    let added = feed.calls_until(last);
    let first = last + 1 - written.len() as u64;
    let expected: Vec<Call> = spelled
        .iter()
        .enumerate()
        .map(|(i, spelled)| call(first + i as u64, 'a', spelled))
        .collect();
    assert_eq!(calls(&added), expected);
    for ((add, (_, cn)), spelled) in added.iter().zip(&written).zip(&spelled) {
        assert_eq!(
            add.new.get("cn"),
            Some(&vec![cn.as_bytes().to_vec()]),
            "{add:?}"
        );
        assert_eq!(texts(&add.new, "entryDN"), [spelled.as_str()]);
        assert_eq!(add.new, env.ldap_attrs(spelled));
    }

    // Renames: the new RDN value is written escaped, the state carries its bytes.
    let renames = [
        (
            spelled[1].clone(),
            "cn=Roe\\, Jane",
            dn("cn=Roe\\2C Jane"),
            "Roe, Jane",
        ),
        (
            spelled[0].clone(),
            "cn=Jürgen Weiß",
            dn("cn=Jürgen Weiß"),
            "Jürgen Weiß",
        ),
        (spelled[2].clone(), "cn=c\\+d", dn("cn=c\\2Bd"), "c+d"),
    ];
    for ((old_dn, new_rdn, new_dn, value), add) in
        renames.iter().zip([&added[1], &added[0], &added[2]])
    {
        env.admin.modrdn(old_dn, new_rdn, true, None).unwrap();
        let id = env.announced(2);
        let renamed = feed.calls_until(id);
        assert_eq!(
            calls(&renamed),
            [
                call(id - 1, 'r', old_dn),
                call(id, 'a', new_dn),
                call(id, 'm', new_dn)
            ]
        );
        assert_eq!(renamed[0].old, add.new);
        assert_eq!(
            renamed[1].new,
            with(
                &add.new,
                &[
                    ("cn", &[value.as_bytes()]),
                    ("entryDN", &[new_dn.as_bytes()])
                ]
            ),
            "a: the unescaped new RDN value"
        );
        assert_eq!(renamed[2].new, env.ldap_attrs(new_dn));
    }

    // Modify and delete, written with other escapings of the same DNs.
    let weiss = dn("cn=Jürgen Weiß");
    env.admin
        .replace(&dn("cn=J\\C3\\BCrgen Wei\\C3\\9F"), "description", &["x"])
        .unwrap();
    let id = env.announced(1);
    assert_eq!(calls(&feed.calls_until(id)), [call(id, 'm', &weiss)]);
    let roe = dn("cn=Roe\\2C Jane");
    env.admin.delete(&roe).unwrap();
    let id = env.announced(1);
    let deleted = feed.calls_until(id);
    assert_eq!(calls(&deleted), [call(id, 'd', &roe)]);
    assert_eq!(deleted[0].old_values("cn"), ["Roe, Jane"]);
}

// ---------------------------------------------------------------------------------------
// 7. Binary values
// ---------------------------------------------------------------------------------------

/// Must-match 3: values are the exact LDAP bytes; the jsonl module writes values that are
/// not UTF-8 as `{"base64": …}`, which decode to exactly those bytes, on both sides.
#[test]
fn binary_values_are_byte_exact() {
    let mut env = Env::start();
    let mut feed = env.follow(ListenerOptions::new());
    let all_bytes: Vec<u8> = (0..=255).collect();
    let invalid_utf8: Vec<u8> = vec![0xc3, 0x28, 0xff, 0x00, 0x80, b'\n'];
    let person = dn("uid=bin");
    env.admin
        .add_bytes(
            &person,
            &[
                ("objectClass", &[b"inetOrgPerson"]),
                ("uid", &[b"bin"]),
                ("cn", &[b"Bin"]),
                ("sn", &["Bär".as_bytes()]),
                ("jpegPhoto", &[&all_bytes, &invalid_utf8]),
            ],
        )
        .unwrap();
    let id = env.announced(1);
    let added = feed.calls_until(id);
    assert_eq!(calls(&added), [call(id, 'a', &person)]);
    let ldap = env.ldap_attrs(&person);
    let photos = added[0].new.get("jpegPhoto").expect("no jpegPhoto");
    assert_eq!(Some(photos), ldap.get("jpegPhoto"), "LDAP's value order");
    let mut sorted = photos.clone();
    sorted.sort();
    let mut written = vec![all_bytes.clone(), invalid_utf8.clone()];
    written.sort();
    assert_eq!(sorted, written);
    assert_eq!(added[0].new, ldap);

    // The raw line: binary values as base64 objects, text as strings.
    let raw: Vec<serde_json::Value> = fs::read_to_string(feed.listener.jsonl_path())
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .filter(|line: &serde_json::Value| line["id"] == id)
        .collect();
    assert_eq!(raw.len(), 1);
    let values = raw[0]["new"]["jpegPhoto"].as_array().unwrap();
    assert_eq!(values.len(), 2);
    assert!(values.iter().all(|v| v["base64"].is_string()), "{values:?}");
    assert_eq!(raw[0]["new"]["sn"], serde_json::json!(["Bär"]));

    let reversed: Vec<u8> = all_bytes.iter().rev().copied().collect();
    env.admin
        .replace_bytes(&person, "jpegPhoto", &[&reversed])
        .unwrap();
    let id = env.announced(1);
    let modified = feed.calls_until(id);
    assert_eq!(calls(&modified), [call(id, 'm', &person)]);
    assert_eq!(modified[0].old.get("jpegPhoto"), Some(photos));
    assert_eq!(
        modified[0].new.get("jpegPhoto"),
        Some(&vec![reversed.clone()])
    );
    assert_eq!(modified[0].new, env.ldap_attrs(&person));

    env.admin.delete(&person).unwrap();
    let id = env.announced(1);
    let deleted = feed.calls_until(id);
    assert_eq!(calls(&deleted), [call(id, 'd', &person)]);
    assert_eq!(deleted[0].old.get("jpegPhoto"), Some(&vec![reversed]));
}

// ---------------------------------------------------------------------------------------
// 8. Filters and attributes
// ---------------------------------------------------------------------------------------

/// §3.4 and §5: a module with `filter = (objectClass=organizationalUnit)` and `attributes =
/// description` sees only OUs; once it handled an OU, modifies that touch none of its
/// attributes are "up-to-date" (no call) while the default module gets `m`; deletes reach
/// it only for objects it handled (no handle_every_delete). A filter attribute name is
/// compared case-sensitively with the names as stored: `(objectclass=…)` matches nothing,
/// not even during initialisation (whose LDAP search itself is case-insensitive).
#[test]
fn filter_and_attributes() {
    let mut env = Env::start();
    let modules = tempfile::tempdir().unwrap();
    let (ous_spec, ous_file) = jsonl_module(
        modules.path(),
        "ous",
        "filter = (objectClass=organizationalUnit)\nattributes = description\n\
         handle_every_delete = no\npriority = 10\n",
    );
    let (lower_spec, lower_file) = jsonl_module(
        modules.path(),
        "lower",
        "filter = (objectclass=organizationalUnit)\nhandle_every_delete = no\n",
    );
    let pre = dn("ou=pre");
    add_ou(&mut env.admin, &pre, "pre");
    env.announced(1);
    let mut feed = env.follow(
        ListenerOptions::new()
            .native_module(ous_spec)
            .native_module(lower_spec),
    );
    let mut ous = JsonlTail::new(&ous_file);
    let mut lower = JsonlTail::new(&lower_file);
    // wait_initialized waits for the jsonl module only; the others may come later.
    let listener = &feed.listener;
    wait_until("every module's initialisation", WAIT, || {
        let states = listener.handler_states();
        let ready = ["ous", "lower", JSONL_MODULE]
            .iter()
            .all(|name| states.get(*name) == Some(&HANDLER_READY));
        Ok(ready.then_some(()))
    })
    .unwrap();
    let ous_init = ous.poll().unwrap();
    assert_eq!(
        ous_init.iter().map(Change::summary).collect::<Vec<_>>(),
        [format!("n {pre}")]
    );
    assert!(
        feed.init.iter().any(|c| c.dn == pre && c.command == 'n'),
        "{:?}",
        calls(&feed.init)
    );

    let sales = dn("ou=sales");
    let user = dn("uid=u");
    let base = env.last;
    let all = one_by_one(
        &mut env,
        &mut [&mut feed],
        vec![
            write(1, |d| add_ou(d, &sales, "sales")),
            write(1, |d| add_person(d, &user, "u", "U", "User")),
            write(1, |d| d.replace(&sales, "postalCode", &["28359"]).unwrap()),
            write(1, |d| d.replace(&sales, "description", &["Sales"]).unwrap()),
            write(1, |d| d.replace(&pre, "postalCode", &["12345"]).unwrap()),
            write(1, |d| d.delete(&user).unwrap()),
            write(1, |d| d.delete(&sales).unwrap()),
        ],
    )
    .remove(0);
    assert_eq!(
        calls(&all),
        [
            call(base + 1, 'a', &sales),
            call(base + 2, 'a', &user),
            call(base + 3, 'm', &sales),
            call(base + 4, 'm', &sales),
            call(base + 5, 'm', &pre),
            call(base + 6, 'd', &user),
            call(base + 7, 'd', &sales),
        ]
    );
    let ou_calls = ous.poll().unwrap();
    assert!(ou_calls.iter().all(|c| c.module == "ous"));
    assert_eq!(
        calls(&ou_calls),
        [
            call(base + 1, 'a', &sales),
            call(base + 4, 'm', &sales),
            call(base + 7, 'd', &sales),
        ]
    );
    assert_eq!(
        ou_calls[1].old, all[2].new,
        "old: the state after the skipped modify"
    );
    assert_eq!(ou_calls[1].new, all[3].new);
    let lower_calls = lower.poll().unwrap();
    assert!(lower_calls.is_empty(), "{:?}", calls(&lower_calls));
}

// ---------------------------------------------------------------------------------------
// 9. Module initialisation
// ---------------------------------------------------------------------------------------

/// Asserts the calls of one module initialisation (§3.9): `n` for every object visible
/// under the base (the filter is `(objectClass=*)`), old = {}, new = LDAP's entry, every
/// parent before its children (UCS sorted by DN length; the listener keeps the server's
/// order and only defers children whose parent is still to come).
fn assert_initialisation(env: &mut Env, init: &[Change], visible: &[String]) {
    let mut seen: Vec<String> = init.iter().map(|c| c.dn.clone()).collect();
    assert!(init.iter().all(|c| c.command == 'n'), "{:?}", calls(init));
    for (i, c) in init.iter().enumerate() {
        assert!(c.old.is_empty(), "{c:?}");
        assert_eq!(c.new, env.ldap_attrs(&c.dn), "n: new must be LDAP's entry");
        if let Some((_, parent)) = c.dn.split_once(',') {
            let parent_at = init.iter().position(|p| p.dn.eq_ignore_ascii_case(parent));
            assert!(
                parent_at.is_none_or(|p| p < i),
                "{} before its parent: {:?}",
                c.dn,
                calls(init)
            );
        }
    }
    seen.sort();
    let mut expected = visible.to_vec();
    expected.sort();
    assert_eq!(seen, expected);
}

/// §3.9, §4.4–4.6: objects existing before the first start reach the module as `n`,
/// parents first, and the module's state becomes 3; a restart does not repeat them; `-g`
/// purges and repeats them; `-i` initialises and exits 0 with the notifier's last id.
#[test]
fn module_initialisation() {
    let mut env = Env::start();
    let a = dn("ou=a");
    let b = dn("ou=b");
    let c = format!("ou=c,{a}");
    let user = format!("uid=u,{c}");
    let secret = format!("cn=secret,{RESTRICTED_DN}");
    add_ou(&mut env.admin, &a, "a");
    add_ou(&mut env.admin, &b, "b");
    add_ou(&mut env.admin, &c, "c");
    add_person(&mut env.admin, &user, "u", "U", "User");
    env.admin.add_role(&secret, "secret").unwrap();
    let last = env.announced(5);
    let mut visible = vec![
        BASE.to_owned(),
        HOST_DN.to_owned(),
        a.clone(),
        b.clone(),
        c.clone(),
        user.clone(),
    ];

    let mut feed = env.follow(ListenerOptions::new());
    assert_initialisation(&mut env, &feed.init, &visible);
    let position = |dn: &str, init: &[Change]| init.iter().position(|c| c.dn == dn).unwrap();
    assert!(position(&a, &feed.init) < position(&c, &feed.init));
    assert!(position(&c, &feed.init) < position(&user, &feed.init));
    assert_eq!(
        feed.listener.handler_state(JSONL_MODULE),
        Some(HANDLER_READY)
    );
    assert_eq!(feed.listener.notifier_id(), Some(last));

    // A restart does not initialise again: the next call is the next change.
    feed.listener.restart().unwrap();
    let after = dn("cn=after");
    env.admin.add_role(&after, "after").unwrap();
    let id = env.announced(1);
    assert_eq!(calls(&feed.calls_until(id)), [call(id, 'a', &after)]);
    visible.push(after.clone());

    // `-i` with the daemon stopped: purge, initialise, exit 0.
    feed.listener.stop().unwrap();
    let (status, log) = feed.listener.run_once(&["-i"], WAIT).unwrap();
    assert!(status.success(), "-i exited with {status}:\n{log}");
    let reinit = feed.tail.poll().unwrap();
    assert_initialisation(&mut env, &reinit, &visible);
    assert_eq!(
        feed.listener.handler_state(JSONL_MODULE),
        Some(HANDLER_READY)
    );
    assert_eq!(
        feed.listener.notifier_id(),
        Some(notifier_last_id(&env.notifier))
    );

    // `-g` on a daemon with an initialised cache: purged, so initialised again at every
    // start; a listener with -i on a fresh directory exits 0 initialised too.
    let mut purging = env.follow(ListenerOptions::new().arg("-g"));
    assert_initialisation(&mut env, &purging.init, &visible);
    purging.listener.restart().unwrap();
    let again = wait_until("the -g restart's initialisation", WAIT, || {
        let changes = purging.listener.changes()?;
        Ok((changes.len() >= 2 * visible.len()).then_some(changes))
    })
    .unwrap();
    assert_initialisation(&mut env, &again[visible.len()..], &visible);
    // The purge removed the state files and notifier_id; these are the restart's.
    assert_eq!(purging.listener.wait_initialized(WAIT).unwrap(), env.last);

    let mut once = Listener::prepare(&env.slapd, &env.notifier, ListenerOptions::new()).unwrap();
    let (status, log) = once.run_once(&["-i"], WAIT).unwrap();
    assert!(status.success(), "-i exited with {status}:\n{log}");
    assert_initialisation(&mut env, &once.changes().unwrap(), &visible);
    assert_eq!(once.handler_state(JSONL_MODULE), Some(HANDLER_READY));
    assert_eq!(once.notifier_id(), Some(env.last));
}

// ---------------------------------------------------------------------------------------
// 10. Protocol 2
// ---------------------------------------------------------------------------------------

/// The same writes seen through protocol 2 (`GET_DN`) and protocol 3 (`WAIT_ID` +
/// `cn=translog`) give the same handler calls.
#[test]
fn protocol_2_and_3_see_the_same_calls() {
    // -v 2: the lowest version the notifier accepts (its default, made explicit).
    let mut env = Env::start_with(&["-v", "2"]);
    let mut v3 = env.follow(ListenerOptions::new());
    let mut v2 = env.follow(ListenerOptions::new().protocol(2));
    let x = dn("uid=x");
    let y = dn("uid=y");
    let base = env.last;
    let mut seen = one_by_one(
        &mut env,
        &mut [&mut v2, &mut v3],
        vec![
            write(1, |d| add_person(d, &x, "x", "X", "Ex")),
            write(1, |d| d.replace(&x, "mail", &["x2@example.com"]).unwrap()),
            write(2, |d| d.modrdn(&x, "uid=y", true, None).unwrap()),
            write(1, |d| d.delete(&y).unwrap()),
        ],
    );
    let (seen2, seen3) = (seen.remove(0), seen.remove(0));
    let last = env.last;
    let expected = [
        call(base + 1, 'a', &x),
        call(base + 2, 'm', &x),
        call(base + 3, 'r', &x),
        call(base + 4, 'a', &y),
        call(base + 4, 'm', &y),
        call(base + 5, 'd', &y),
    ];
    assert_eq!(calls(&seen2), expected);
    assert_eq!(calls(&seen3), expected);
    for (two, three) in seen2.iter().zip(&seen3) {
        assert_eq!(two.old, three.old, "{}", two.summary());
        assert_eq!(two.new, three.new, "{}", two.summary());
    }
    assert!(seen2[1].changed_attributes().contains(&"mail".to_owned()));
    assert_eq!(v2.listener.notifier_id(), Some(last));
    assert_eq!(v3.listener.notifier_id(), Some(last));
    // The listener names the protocol it negotiated.
    assert!(
        v2.listener.log().contains("(protocol 2)"),
        "{}",
        v2.listener.log()
    );
    assert!(
        v3.listener.log().contains("(protocol 3)"),
        "{}",
        v3.listener.log()
    );
}

/// A listener behind a queue-file notifier (which lets a test hand over a move's `r` and
/// `a` apart) that has handled `cn=<old>` and holds the `r` of its rename to `cn=<new>`
/// (made in LDAP) stashed until the test queues the `a` as transaction 3.
struct StashedMove {
    slapd: Slapd,
    notifier: Notifier,
    admin: Directory,
    listener: Listener,
    old_dn: String,
    new_dn: String,
}

fn stashed_move(old: &str, new: &str) -> StashedMove {
    use integration_tests::Intake;
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::start(&slapd, Intake::QueueFile, &[]).unwrap();
    let mut admin = slapd.admin().unwrap();
    let mut listener =
        Listener::start(&slapd, &notifier, ListenerOptions::new().bind_admin()).unwrap();
    listener.wait_initialized(WAIT).unwrap();
    let old_dn = format!("cn={old},{BASE}");
    let new_dn = format!("cn={new},{BASE}");
    admin.add_role(&old_dn, old).unwrap();
    notifier.queue(&format!("1 {old_dn} a\n")).unwrap();
    listener.wait_for_id(1, WAIT).unwrap();

    admin
        .modrdn(&old_dn, &format!("cn={new}"), true, None)
        .unwrap();
    notifier.queue(&format!("2 {old_dn} r\n")).unwrap();
    listener
        .wait_until("the r to be stashed", WAIT, |l| {
            Ok(l.log()
                .contains(&format!("transaction 2 (r {old_dn}) stashed"))
                .then_some(()))
        })
        .unwrap();
    StashedMove {
        slapd,
        notifier,
        admin,
        listener,
        old_dn,
        new_dn,
    }
}

/// A reload (SIGHUP) between a move's `r` and its `a` waits for the `a`. Run in between,
/// it initialised a reset module from the moved object, and the `a` then completed the move
/// from the cache state before that: the module got the object twice, the move last, and
/// the cache lost what the initialisation stored.
#[test]
fn a_reload_between_the_r_and_the_a_of_a_move_waits_for_the_a() {
    let StashedMove {
        slapd: _slapd,
        notifier,
        mut listener,
        new_dn,
        ..
    } = stashed_move("m1", "m2");
    // The jsonl module reset (as `ctrl resync` does), then a reload to initialise it.
    fs::remove_file(listener.cache_dir().join("handlers").join(JSONL_MODULE)).unwrap();
    listener.signal(libc::SIGHUP).unwrap();
    listener
        .wait_until("the reload to be postponed", WAIT, |l| {
            Ok(l.log().contains("reload postponed").then_some(()))
        })
        .unwrap();
    notifier.queue(&format!("3 {new_dn} a\n")).unwrap();
    listener.wait_for_id(3, WAIT).unwrap();
    listener
        .wait_until("the jsonl module initialised again", WAIT, |l| {
            Ok(l.changes()?
                .iter()
                .any(|c| c.command == 'n' && c.dn == new_dn)
                .then_some(()))
        })
        .unwrap();

    let calls: Vec<char> = listener
        .changes()
        .unwrap()
        .into_iter()
        .filter(|c| c.dn == new_dn)
        .map(|c| c.command)
        .collect();
    assert_eq!(calls.last(), Some(&'n'), "the move came last: {calls:?}");
    assert_eq!(calls.iter().filter(|c| **c == 'n').count(), 1, "{calls:?}");
    listener.stop().unwrap();
}

/// An object renamed and deleted before the listener reads the rename's `a`: modules know
/// it under its old DN, so that is the DN whose removal they get. The queue-file intake
/// lets the test hand the notifier the `r` and the `a` apart, with the delete in between.
#[test]
fn a_move_whose_add_finds_nothing_removes_the_dn_modules_know() {
    let StashedMove {
        slapd: _slapd,
        notifier,
        mut admin,
        mut listener,
        old_dn,
        new_dn,
    } = stashed_move("e16", "e43");
    admin.delete(&new_dn).unwrap();
    notifier.queue(&format!("3 {new_dn} a\n")).unwrap();
    listener.wait_for_id(3, WAIT).unwrap();

    let calls: Vec<(char, String)> = listener
        .changes()
        .unwrap()
        .into_iter()
        .filter(|c| c.command != 'n')
        .map(|c| (c.command, c.dn))
        .collect();
    assert_eq!(calls, [('a', old_dn.clone()), ('d', old_dn.clone())]);
    let removal = listener.changes().unwrap().pop().unwrap();
    assert_eq!(removal.old.get("cn"), Some(&vec![b"e16".to_vec()]));
    listener.stop().unwrap();
}
