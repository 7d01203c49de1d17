//! The native `replication` module end to end: a primary slapd (accesslog), the notifier,
//! the listener with `--native-module replication=@FILE` writing a replica slapd configured
//! like a UCS Replica (rootdn and updatedn `cn=update`, `rootpw.conf`, `updateref`).
//! After mixed writes the two directories are compared entry by entry (`*` and `+`,
//! entryUUID included). Also: a change the replica's schema refuses is quarantined while
//! everything else goes on, and applied by `ctrl quarantine retry` once the schema is
//! fixed; a replica stopped mid-run (briefly, and for 30 s during 3,000+ writes) makes the
//! listener wait and catch up; a listener killed 20 times loses nothing; the primary's
//! schema changes reach the replica's schema file (and one slaptest refuses never goes
//! live); UCS's `failed.ldif` and `restart` fallbacks; and `ldap/slave/filter`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::net::{free_port, is_listening};
use integration_tests::slapd::{BASE, HOST_DN, HOST_PW, RESTRICTED_DN};
use integration_tests::{Listener, ListenerOptions, Notifier, Slapd, SlapdConfig, wait_until};
use ldap3::{LdapConn, Mod, Scope, SearchEntry};
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(120);
const UPDATE_DN: &str = "cn=update,dc=example,dc=com";
/// With a quote and a backslash: `rootpw.conf` escapes them.
const UPDATE_PW: &str = "up\"date\\pw";
/// Differ between servers by nature (sync state, computed per server, the primary's
/// accesslog overlay).
const NOT_COMPARED: &[&str] = &[
    "contextCSN",
    "auditContext",
    "entryDN",
    "subschemaSubentry",
    "hasSubordinates",
];

// Kept beside the harness's `Slapd::start_replica_of` because the quarantine test needs a
// replica without nis.schema that is fixed in place; the harness replica copies the
// primary's schema. Moving this variant into the harness is open in issue 13.
/// A replica slapd as UCS configures one: the update DN is rootdn and updatedn, its
/// password in `rootpw.conf`, writes of anyone else are referred to the primary.
struct Replica {
    dir: TempDir,
    port: u16,
    primary_url: String,
    child: Option<Child>,
    schema: Schema,
}

/// Where a replica's schema comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Schema {
    /// The standard files, nis.schema included or not.
    Files { nis: bool },
    /// As on UCS: only the replicated schema file, `<dir>/schema.conf`, which the module
    /// rewrites from the primary's `cn=Subschema`; until the first update it includes the
    /// standard files.
    Replicated,
}

impl Replica {
    fn start(primary: &Slapd, nis_schema: bool) -> Replica {
        Replica::start_with(primary, Schema::Files { nis: nis_schema })
    }

    fn start_with(primary: &Slapd, schema: Schema) -> Replica {
        let dir = tempfile::Builder::new()
            .prefix("replica-")
            .tempdir_in("/tmp")
            .unwrap();
        fs::create_dir(dir.path().join("data")).unwrap();
        let escaped = UPDATE_PW.replace('\\', "\\\\").replace('"', "\\\"");
        fs::write(
            dir.path().join("rootpw.conf"),
            format!("rootpw \"{escaped}\"\n"),
        )
        .unwrap();
        let mut replica = Replica {
            dir,
            port: free_port().unwrap(),
            primary_url: primary.ldap_url(),
            child: None,
            schema,
        };
        if schema == Schema::Replicated {
            let includes: String = integration_tests::slapd::SCHEMA_FILES
                .iter()
                .map(|f| format!("include {f}\n"))
                .collect();
            fs::write(replica.schema_file(), includes).unwrap();
        }
        replica.write_restart_script();
        replica.write_config(matches!(schema, Schema::Files { nis: true }));
        replica.spawn();
        replica
    }

    fn schema_file(&self) -> PathBuf {
        self.path().join("schema.conf")
    }

    fn restart_script(&self) -> PathBuf {
        self.path().join("restart-slapd")
    }

    /// What the module runs to restart slapd, as UCS's `/etc/init.d/slapd restart`: stops
    /// this replica's slapd (by its pid file) and starts it again detached, logging to the
    /// same file, and returns once it answers. [`Replica::stop`] stops either kind.
    fn write_restart_script(&self) {
        let d = self.path().display();
        let port = self.port;
        let script = format!(
            r#"#!/bin/bash
pid=$(cat {d}/slapd.pid 2>/dev/null)
if [ -n "$pid" ]; then
  kill "$pid" 2>/dev/null
  # Gone, or a zombie its parent (the test) has not reaped yet.
  while [ -d /proc/$pid ] && ! grep -q ') Z ' /proc/$pid/stat 2>/dev/null; do sleep 0.05; done
fi
setsid /usr/sbin/slapd -f {d}/slapd.conf -h ldap://127.0.0.1:{port}/ -d 0 >>{d}/slapd.log 2>&1 </dev/null &
for _ in $(seq 400); do
  (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && exit 0
  sleep 0.05
done
echo "slapd did not come back on port {port}" >&2
exit 1
"#
        );
        fs::write(self.restart_script(), script).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(self.restart_script(), fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// A slapd the restart script started (not our child), by its pid file.
    fn stop_detached(&self) {
        let Ok(pid) = fs::read_to_string(self.path().join("slapd.pid")) else {
            return;
        };
        let Ok(pid) = pid.trim().parse::<i32>() else {
            return;
        };
        let ours = fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*self.path().to_string_lossy()));
        if !ours {
            return;
        }
        // SAFETY: kill(2) of the slapd this replica's restart script started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; it did not stop in time.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write_config(&self, nis_schema: bool) {
        let d = self.path().display();
        let nis = if nis_schema {
            "include /etc/ldap/schema/nis.schema\n"
        } else {
            ""
        };
        let schema = match self.schema {
            Schema::Replicated => format!("include {}\n", self.schema_file().display()),
            Schema::Files { .. } => format!(
                "include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
{nis}include /etc/ldap/schema/inetorgperson.schema
"
            ),
        };
        let conf = format!(
            "{schema}pidfile {d}/slapd.pid
modulepath /usr/lib/ldap
moduleload back_mdb
sizelimit unlimited
database mdb
suffix \"{BASE}\"
rootdn \"{UPDATE_DN}\"
include {d}/rootpw.conf
updatedn \"{UPDATE_DN}\"
updateref {}
directory {d}/data
maxsize 1073741824
dbnosync
index objectClass,entryUUID eq
access to * by users read by * none
",
            self.primary_url
        );
        fs::write(self.path().join("slapd.conf"), conf).unwrap();
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join("slapd.log"))
            .unwrap();
        let child = Command::new("/usr/sbin/slapd")
            .arg("-f")
            .arg(self.path().join("slapd.conf"))
            .arg("-h")
            .arg(format!("ldap://127.0.0.1:{}/", self.port))
            .args(["-d", "0"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.port;
        wait_until("the replica slapd listening", WAIT, || {
            Ok(is_listening(port).then_some(()))
        })
        .unwrap();
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait().unwrap();
        }
        self.stop_detached();
    }

    fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}/", self.port)
    }

    /// Sends `signal` to the slapd this test started (SIGSTOP: it keeps its connections
    /// and takes requests into the socket buffer, but answers none).
    fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("a replica started by the test");
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
    }

    /// SIGKILL (also of a stopped slapd): requests it had not read are gone with it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn connect(&self) -> LdapConn {
        let mut conn = LdapConn::new(&self.url()).unwrap();
        conn.simple_bind(UPDATE_DN, UPDATE_PW)
            .unwrap()
            .success()
            .unwrap();
        conn
    }

    /// The module's config file.
    fn module_config(&self, state: &Path) -> PathBuf {
        self.module_config_with(state, "")
    }

    /// The module's config file with `extra` lines at the end.
    fn module_config_with(&self, state: &Path, extra: &str) -> PathBuf {
        let file = state.join("replication.conf");
        fs::create_dir_all(state).unwrap();
        fs::write(
            &file,
            format!(
                "uri = {}\nbase = {BASE}\nrootpw_file = {}\nstate_dir = {}\nbackup_dir = {}\n\
                 timeout = 10\n# The primary's accesslog overlay: unknown to a replica.\nexclude = auditContext\n\
                 schema_file = {}\nslapd_conf = {}\nslapd_restart = {}\n{extra}",
                self.url(),
                self.path().join("rootpw.conf").display(),
                state.join("state").display(),
                state.join("backup").display(),
                self.schema_file().display(),
                self.path().join("slapd.conf").display(),
                self.restart_script().display(),
            ),
        )
        .unwrap();
        file
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stop_detached();
    }
}

type Snapshot = BTreeMap<String, BTreeMap<String, Vec<Vec<u8>>>>;

/// Every entry below the base with `*` and `+`, keyed by lower-cased DN, attribute names
/// lower-cased, values sorted (replication compares value sets, as UCS does).
fn snapshot(conn: &mut LdapConn) -> Snapshot {
    let (entries, _) = conn
        .search(BASE, Scope::Subtree, "(objectClass=*)", vec!["*", "+"])
        .unwrap()
        .success()
        .unwrap();
    let mut all = Snapshot::new();
    for entry in entries {
        let entry = SearchEntry::construct(entry);
        let mut attrs: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        let text = entry
            .attrs
            .into_iter()
            .map(|(n, v)| (n, v.into_iter().map(String::into_bytes).collect::<Vec<_>>()));
        for (name, values) in text.chain(entry.bin_attrs) {
            if NOT_COMPARED.iter().any(|x| x.eq_ignore_ascii_case(&name)) {
                continue;
            }
            attrs
                .entry(name.to_ascii_lowercase())
                .or_default()
                .extend(values);
        }
        for values in attrs.values_mut() {
            values.sort();
        }
        all.insert(entry.dn.to_ascii_lowercase(), attrs);
    }
    all
}

/// What the listener sees of the primary (it binds as the host account).
fn primary_view(primary: &Slapd) -> Snapshot {
    let mut conn = LdapConn::new(&primary.ldap_url()).unwrap();
    conn.simple_bind(HOST_DN, HOST_PW)
        .unwrap()
        .success()
        .unwrap();
    snapshot(&mut conn)
}

fn assert_same(primary: &Snapshot, replica: &Snapshot) {
    let mut problems = Vec::new();
    for (dn, attrs) in primary {
        match replica.get(dn) {
            None => problems.push(format!("missing on the replica: {dn}")),
            Some(theirs) if theirs != attrs => {
                for name in attrs.keys().chain(theirs.keys()) {
                    if attrs.get(name) != theirs.get(name) {
                        problems.push(format!(
                            "{dn}: {name}: primary {:?} replica {:?}",
                            attrs.get(name).map(|v| v
                                .iter()
                                .map(|x| String::from_utf8_lossy(x).into_owned())
                                .collect::<Vec<_>>()),
                            theirs.get(name).map(|v| v
                                .iter()
                                .map(|x| String::from_utf8_lossy(x).into_owned())
                                .collect::<Vec<_>>())
                        ));
                    }
                }
            }
            Some(_) => {}
        }
    }
    for dn in replica.keys() {
        if !primary.contains_key(dn) {
            problems.push(format!("only on the replica: {dn}"));
        }
    }
    problems.dedup();
    assert!(
        problems.is_empty(),
        "{} differences:\n{}",
        problems.len(),
        problems[..problems.len().min(40)].join("\n")
    );
}

/// A small deterministic generator: the workload is the same in every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) as usize) % below.max(1)
    }
}

fn ok(result: ldap3::result::Result<ldap3::LdapResult>, what: &str) {
    match result.and_then(|r| r.success()) {
        Ok(_) => {}
        Err(e) => panic!("{what}: {e}"),
    }
}

fn set(values: &[&[u8]]) -> std::collections::HashSet<Vec<u8>> {
    values.iter().map(|v| v.to_vec()).collect()
}

fn add(conn: &mut LdapConn, dn: &str, attrs: &[(&str, &[&[u8]])]) {
    let attrs: Vec<(Vec<u8>, std::collections::HashSet<Vec<u8>>)> = attrs
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), set(v)))
        .collect();
    ok(conn.add(dn, attrs), &format!("add {dn}"));
}

fn modify(conn: &mut LdapConn, dn: &str, mods: Vec<Mod<Vec<u8>>>) {
    ok(conn.modify(dn, mods), &format!("modify {dn}"));
}

/// Mixed writes on the primary: adds, modifies (binary and non-ASCII values), group
/// membership churn, renames, moves across containers, a container moved with its
/// subtree, a subtree moved out of view (the replica deletes it deepest first) and
/// deletes. Returns the number of LDAP writes.
fn mixed_writes(primary: &Slapd, users: usize, rounds: usize) -> usize {
    mixed_writes_at(&primary.ldap_url(), users, rounds)
}

/// [`mixed_writes`] against the primary at `url`.
fn mixed_writes_at(url: &str, users: usize, rounds: usize) -> usize {
    let mut conn = LdapConn::new(url).unwrap();
    conn.simple_bind(
        integration_tests::slapd::ADMIN_DN,
        integration_tests::slapd::ADMIN_PW,
    )
    .unwrap()
    .success()
    .unwrap();
    let mut writes = 0;
    for ou in ["people", "groups", "other", "tree"] {
        add(
            &mut conn,
            &format!("ou={ou},{BASE}"),
            &[
                ("objectClass", &[b"organizationalUnit"]),
                ("ou", &[ou.as_bytes()]),
            ],
        );
        writes += 1;
    }
    // A container with a subtree, moved later as a whole.
    for sub in ["a", "b"] {
        let dn = format!("ou={sub},ou=tree,{BASE}");
        add(
            &mut conn,
            &dn,
            &[
                ("objectClass", &[b"organizationalUnit"]),
                ("ou", &[sub.as_bytes()]),
            ],
        );
        for i in 0..5 {
            add(
                &mut conn,
                &format!("cn=leaf{i},{dn}"),
                &[
                    ("objectClass", &[b"organizationalRole"]),
                    ("cn", &[format!("leaf{i}").as_bytes()]),
                ],
            );
            writes += 1;
        }
        writes += 1;
    }
    let photo: Vec<u8> = (0..=255u8).collect();
    let mut live: Vec<String> = Vec::new();
    for i in 0..users {
        let uid = format!("user{i}");
        let dn = format!("uid={uid},ou=people,{BASE}");
        let cn = format!("Jürgen Müller {i} ✓");
        add(
            &mut conn,
            &dn,
            &[
                ("objectClass", &[b"inetOrgPerson"]),
                ("uid", &[uid.as_bytes()]),
                ("cn", &[cn.as_bytes()]),
                ("sn", &[b"M\xc3\xbcller"]),
                ("jpegPhoto", &[&photo]),
                ("mail", &[format!("{uid}@example.com").as_bytes()]),
            ],
        );
        live.push(dn);
        writes += 1;
    }
    let groups: Vec<String> = (0..5)
        .map(|g| format!("cn=group{g},ou=groups,{BASE}"))
        .collect();
    for (g, dn) in groups.iter().enumerate() {
        add(
            &mut conn,
            dn,
            &[
                ("objectClass", &[b"groupOfUniqueNames"]),
                ("cn", &[format!("group{g}").as_bytes()]),
                ("uniqueMember", &[live[g].as_bytes()]),
            ],
        );
        writes += 1;
    }
    let mut rng = Lcg(13);
    let mut renamed = 0usize;
    for round in 0..rounds {
        let pick = rng.next(live.len());
        let dn = live[pick].clone();
        match round % 8 {
            0 | 1 => {
                let text = format!("Beschreibung {round}: Grüße, 日本, \u{1F600}");
                modify(
                    &mut conn,
                    &dn,
                    vec![Mod::Replace(
                        b"description".to_vec(),
                        set(&[text.as_bytes()]),
                    )],
                );
            }
            2 => {
                let mut bytes = photo.clone();
                bytes.rotate_left(round % 256);
                bytes.push(0);
                modify(
                    &mut conn,
                    &dn,
                    vec![Mod::Replace(b"jpegPhoto".to_vec(), set(&[&bytes]))],
                );
            }
            3 => {
                let group = &groups[rng.next(groups.len())];
                let member = live[rng.next(live.len())].clone();
                let result = conn.modify(
                    group,
                    vec![Mod::Add(
                        b"uniqueMember".to_vec(),
                        set(&[member.as_bytes()]),
                    )],
                );
                // Already a member: that churn step is a no-op.
                let _ = result.and_then(|r| r.success());
            }
            4 => {
                let group = &groups[rng.next(groups.len())];
                let (entries, _) = conn
                    .search(group, Scope::Base, "(objectClass=*)", vec!["uniqueMember"])
                    .unwrap()
                    .success()
                    .unwrap();
                let members = SearchEntry::construct(entries[0].clone())
                    .attrs
                    .remove("uniqueMember")
                    .unwrap_or_default();
                if members.len() > 1 {
                    let gone = &members[rng.next(members.len())];
                    modify(
                        &mut conn,
                        group,
                        vec![Mod::Delete(
                            b"uniqueMember".to_vec(),
                            set(&[gone.as_bytes()]),
                        )],
                    );
                }
            }
            5 => {
                // Rename in place, the old RDN value dropped.
                renamed += 1;
                let uid = format!("renamed{renamed}");
                let parent = dn.split_once(',').unwrap().1.to_owned();
                ok(
                    conn.modifydn(&dn, &format!("uid={uid}"), true, None),
                    "rename",
                );
                live[pick] = format!("uid={uid},{parent}");
            }
            6 => {
                // Move across containers, keeping the RDN.
                let rdn = dn.split_once(',').unwrap().0.to_owned();
                let target = if dn.contains("ou=people") {
                    "ou=other"
                } else {
                    "ou=people"
                };
                ok(
                    conn.modifydn(&dn, &rdn, true, Some(&format!("{target},{BASE}"))),
                    "move",
                );
                live[pick] = format!("{rdn},{target},{BASE}");
            }
            _ => {
                // Delete and re-add under the same DN: a new entryUUID.
                ok(conn.delete(&dn), "delete");
                let uid = dn
                    .split_once(',')
                    .unwrap()
                    .0
                    .trim_start_matches("uid=")
                    .to_owned();
                add(
                    &mut conn,
                    &dn,
                    &[
                        ("objectClass", &[b"inetOrgPerson"]),
                        ("uid", &[uid.as_bytes()]),
                        ("cn", &[b"again"]),
                        ("sn", &[b"again"]),
                    ],
                );
                writes += 1;
            }
        }
        writes += 1;
    }
    // The container with its subtree moves across containers in one modrdn.
    ok(
        conn.modifydn(
            &format!("ou=a,ou=tree,{BASE}"),
            "ou=a",
            true,
            Some(&format!("ou=other,{BASE}")),
        ),
        "subtree move",
    );
    // A subtree moved where the listener cannot read: the replica deletes it, deepest first.
    ok(
        conn.modifydn(
            &format!("ou=b,ou=tree,{BASE}"),
            "ou=b",
            true,
            Some(RESTRICTED_DN),
        ),
        "move out of view",
    );
    // A plain delete of a leaf and of an emptied container.
    ok(conn.delete(&last_write()), "delete leaf");
    writes += 3;
    writes
}

/// The DN of the last write of [`mixed_writes`], a delete.
fn last_write() -> String {
    format!("cn=leaf0,ou=a,ou=other,{BASE}")
}

fn replication_listener(
    primary: &Slapd,
    notifier: &Notifier,
    replica: &Replica,
    state: &Path,
) -> Listener {
    let config = replica.module_config(state);
    let mut listener = Listener::start(
        primary,
        notifier,
        ListenerOptions::new()
            .jsonl(false)
            .native_module(format!("replication=@{}", config.display())),
    )
    .unwrap();
    // Without the jsonl module `wait_initialized` cannot tell when this one is ready.
    listener.wait_modules_ready(&["replication"], WAIT).unwrap();
    listener
}

/// Waits until the listener has processed the write `command` of `dn` (the last one).
fn wait_caught_up(listener: &mut Listener, notifier: &Notifier, dn: &str, command: char) {
    let id = notifier.wait_transaction(dn, command, WAIT).unwrap();
    listener.wait_for_id(id, WAIT).unwrap();
}

/// While the replica is down: the listener stays at or before the first change it could
/// not write (after `stopped_at`, before `last`) and says it is unavailable.
fn assert_waiting_at(listener: &Listener, notifier: &Notifier, stopped_at: u64, last: u64) {
    assert!(listener.notifier_id().unwrap_or(0) <= stopped_at + 1);
    assert!(listener.notifier_id().unwrap_or(0) < last);
    let (healthy, status) = ctrl(listener, notifier, &["status"]);
    assert!(!healthy, "{status}");
    assert!(status.contains("unavailable"), "{status}");
}

fn ctrl(listener: &Listener, notifier: &Notifier, args: &[&str]) -> (bool, String) {
    integration_tests::hosts::ctrl(listener, notifier, args).unwrap()
}

#[test]
fn mixed_writes_reach_the_replica_identically() {
    let primary = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    let replica = Replica::start(&primary, true);
    let state = tempfile::tempdir().unwrap();
    let mut listener = replication_listener(&primary, &notifier, &replica, state.path());
    listener.wait_initialized(WAIT).unwrap();

    let started = Instant::now();
    let writes = mixed_writes(&primary, 300, 2_600);
    wait_caught_up(&mut listener, &notifier, &last_write(), 'd');
    eprintln!("{writes} writes replicated in {:.1?}", started.elapsed());

    let expected = primary_view(&primary);
    assert!(expected.len() > 300, "{} entries", expected.len());
    assert!(
        !expected.keys().any(|dn| dn.contains("ou=b,")),
        "the moved-away subtree is out of view"
    );
    assert_same(&expected, &snapshot(&mut replica.connect()));
    let (healthy, status) = ctrl(&listener, &notifier, &["status"]);
    assert!(healthy, "{status}");
    listener.assert_log_lacks("quarantined");
}

/// The module writes a modify from the listener's old state without reading the replica,
/// asserting the old entryCSN. An object changed on the replica behind its back (new CSN)
/// fails that assertion, and the read + compare path makes it the Primary's again: a value
/// the listener never saw is removed, a changed one restored.
#[test]
fn an_object_changed_on_the_replica_behind_the_module_converges_at_its_next_change() {
    let primary = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    let replica = Replica::start(&primary, true);
    let state = tempfile::tempdir().unwrap();
    let mut listener = replication_listener(&primary, &notifier, &replica, state.path());
    listener.wait_initialized(WAIT).unwrap();

    let mut conn = LdapConn::new(&primary.ldap_url()).unwrap();
    conn.simple_bind(
        integration_tests::slapd::ADMIN_DN,
        integration_tests::slapd::ADMIN_PW,
    )
    .unwrap()
    .success()
    .unwrap();
    let dn = format!("cn=drifted,{BASE}");
    add(
        &mut conn,
        &dn,
        &[
            ("objectClass", &[b"organizationalRole"]),
            ("cn", &[b"drifted"]),
            ("description", &[b"first"]),
            ("l", &[b"primary"]),
        ],
    );
    wait_caught_up(&mut listener, &notifier, &dn, 'a');
    // A plain modify keeps to the fast path (nothing changed locally).
    modify(
        &mut conn,
        &dn,
        vec![Mod::Replace(b"description".to_vec(), set(&[b"second"]))],
    );
    wait_caught_up(&mut listener, &notifier, &dn, 'm');
    assert_same(&primary_view(&primary), &snapshot(&mut replica.connect()));
    let fell_back = "is not as the listener last saw it";
    assert!(
        !listener.log().contains(fell_back),
        "{}",
        listener.log_tail(40)
    );

    // Behind the module's back, as the replica's rootdn.
    let mut local = replica.connect();
    ok(
        local.modify(
            &dn,
            vec![
                Mod::Replace(b"l".to_vec(), set(&[b"replica"])),
                Mod::Add(b"telephoneNumber".to_vec(), set(&[b"+49 421 0"])),
            ],
        ),
        "local modify",
    );
    modify(
        &mut conn,
        &dn,
        vec![Mod::Replace(b"description".to_vec(), set(&[b"third"]))],
    );
    // `wait_caught_up` finds the first `m` of the DN: a later write marks the end.
    let marker = format!("cn=marker,{BASE}");
    add(
        &mut conn,
        &marker,
        &[
            ("objectClass", &[b"organizationalRole"]),
            ("cn", &[b"marker"]),
        ],
    );
    wait_caught_up(&mut listener, &notifier, &marker, 'a');
    assert_same(&primary_view(&primary), &snapshot(&mut replica.connect()));
    // The shortcut was tried and refused by the assertion (result code 122).
    let log = listener.log();
    assert!(
        log.lines()
            .any(|l| l.contains(fell_back) && l.contains("result code 122")),
        "{}",
        listener.log_tail(40)
    );
    listener.assert_log_lacks("quarantined");
}

#[test]
fn a_refused_change_is_quarantined_and_retried_after_the_schema_is_fixed() {
    let primary = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    // The replica lacks nis.schema: posixGroup objects are refused.
    let mut replica = Replica::start(&primary, false);
    let state = tempfile::tempdir().unwrap();
    let mut listener = replication_listener(&primary, &notifier, &replica, state.path());
    listener.wait_initialized(WAIT).unwrap();

    let mut admin = primary.admin().unwrap();
    let group = format!("cn=posix,{BASE}");
    admin
        .add(
            &group,
            &[
                ("objectClass", &["posixGroup"]),
                ("cn", &["posix"]),
                ("gidNumber", &["5000"]),
            ],
        )
        .unwrap();
    // Queued behind the refused add, in order.
    admin.replace(&group, "gidNumber", &["5001"]).unwrap();
    admin
        .add_role(&format!("cn=after,{BASE}"), "after")
        .unwrap();
    wait_caught_up(&mut listener, &notifier, &format!("cn=after,{BASE}"), 'a');

    // Everything else went on.
    let mut conn = replica.connect();
    let after = snapshot(&mut conn);
    assert!(after.contains_key(&format!("cn=after,{BASE}")));
    assert!(!after.contains_key(&group));
    let (listed_ok, list) = ctrl(&listener, &notifier, &["quarantine", "list"]);
    assert!(listed_ok, "{list}");
    let records: Vec<serde_json::Value> = serde_json::from_str(list.trim()).unwrap();
    // The refused add, then what queued behind it (the module's initialisation may
    // already have met the group and been refused first: one more queued record).
    assert!(records.len() >= 2, "{list}");
    assert_eq!(records[0]["operation"], "add");
    assert_eq!(records[0]["dn"], group.as_str());
    assert!(
        records[0]["ldif"]
            .as_str()
            .unwrap()
            .contains("objectClass: posixGroup"),
        "{list}"
    );
    assert!(
        records[1..].iter().all(|r| r["operation"] == "queued"),
        "{list}"
    );
    let (healthy, status) = ctrl(&listener, &notifier, &["status"]);
    assert!(!healthy, "{status}");
    assert!(status.contains("quarantined changes"), "{status}");

    // Fix the schema, retry.
    replica.stop();
    replica.write_config(true);
    replica.spawn();
    let (retried, answer) = ctrl(&listener, &notifier, &["quarantine", "retry"]);
    assert!(retried, "{answer}");
    assert!(
        answer.contains(&format!("{} applied, 0 still quarantined", records.len())),
        "{answer}"
    );
    assert_same(&primary_view(&primary), &snapshot(&mut replica.connect()));
    let entry = snapshot(&mut replica.connect()).remove(&group).unwrap();
    assert_eq!(entry["gidnumber"], vec![b"5001".to_vec()]);
    wait_until("a healthy status", WAIT, || {
        let (healthy, _) = ctrl(&listener, &notifier, &["status"]);
        Ok(healthy.then_some(()))
    })
    .unwrap();
}

#[test]
fn a_stopped_replica_makes_the_listener_wait_and_catch_up() {
    let primary = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    let mut replica = Replica::start(&primary, true);
    let state = tempfile::tempdir().unwrap();
    let mut listener = replication_listener(&primary, &notifier, &replica, state.path());
    listener.wait_initialized(WAIT).unwrap();

    let mut admin = primary.admin().unwrap();
    admin
        .add_role(&format!("cn=to-move,{BASE}"), "to-move")
        .unwrap();
    mixed_writes(&primary, 40, 100);
    wait_caught_up(&mut listener, &notifier, &last_write(), 'd');
    replica.stop();
    let stopped_at = notifier.last_id().unwrap();
    // The first change the listener cannot write is a move: its `a` is retried in place,
    // and the retry must still know the `r` (else the old DN stays on the replica).
    admin
        .modrdn(
            &format!("cn=to-move,{BASE}"),
            "cn=moved-while-down",
            true,
            None,
        )
        .unwrap();
    for i in 0..30 {
        admin
            .add_role(&format!("cn=while-down{i},{BASE}"), "down")
            .unwrap();
    }
    // The listener stays at or before the first change it could not write.
    let last = notifier
        .wait_transaction(&format!("cn=while-down29,{BASE}"), 'a', WAIT)
        .unwrap();
    wait_until("the listener retrying", WAIT, || {
        Ok(listener
            .log()
            .contains("the listener waits at this transaction and retries")
            .then_some(()))
    })
    .unwrap();
    assert_waiting_at(&listener, &notifier, stopped_at, last);

    replica.spawn();
    wait_caught_up(
        &mut listener,
        &notifier,
        &format!("cn=while-down29,{BASE}"),
        'a',
    );
    assert_same(&primary_view(&primary), &snapshot(&mut replica.connect()));
    listener.assert_log_lacks("quarantined");
}

#[test]
fn a_listener_killed_20_times_during_the_writes_still_replicates_identically() {
    let primary = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    let replica = Replica::start(&primary, true);
    let state = tempfile::tempdir().unwrap();
    let mut listener = replication_listener(&primary, &notifier, &replica, state.path());
    listener.wait_initialized(WAIT).unwrap();

    let writer = {
        let url = primary.ldap_url();
        std::thread::spawn(move || mixed_writes_at(&url, 300, 2_700))
    };
    // Kills at varying points of the run: in module calls, between a move's `r` and `a`,
    // during commits.
    let mut rng = Lcg(20);
    let mut kills = 0;
    while kills < 20 {
        let processed = listener.notifier_id().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(50 + rng.next(250) as u64));
        listener.kill().unwrap();
        kills += 1;
        listener.restart().unwrap();
        // Progress between kills, so the kills land all over the run.
        if !writer.is_finished() {
            wait_until("progress after a restart", WAIT, || {
                Ok(
                    (listener.notifier_id().unwrap_or(0) > processed || writer.is_finished())
                        .then_some(()),
                )
            })
            .unwrap();
        }
    }
    let writes = writer.join().unwrap();
    assert!(writes >= 3_000, "{writes} writes");
    wait_caught_up(&mut listener, &notifier, &last_write(), 'd');
    assert_same(&primary_view(&primary), &snapshot(&mut replica.connect()));
    listener.assert_log_lacks("quarantined");
}

/// Adds schema `name` to the running primary's cn=config (as root over ldapi) and bumps
/// the notifier's schema id, as UCS's slapd start script does after a schema change.
fn change_primary_schema(primary: &Slapd, notifier: &Notifier, name: &str, defs: &[&str]) {
    let (attrs, classes): (Vec<&str>, Vec<&str>) =
        defs.iter().partition(|d| d.starts_with("attributetype "));
    fn strip<'a>(d: &&'a str) -> &'a str {
        d.split_once(' ').unwrap().1
    }
    let attrs: Vec<&str> = attrs.iter().map(strip).collect();
    let classes: Vec<&str> = classes.iter().map(strip).collect();
    // One schema entry per definition, in order: ldap3 sends an attribute's values as a
    // set, and a type naming its SUP must reach slapd after that SUP.
    let mut root = primary.root().unwrap();
    let definitions = attrs
        .iter()
        .map(|d| ("olcAttributeTypes", d))
        .chain(classes.iter().map(|d| ("olcObjectClasses", d)));
    for (n, (attr, definition)) in definitions.enumerate() {
        let cn = format!("{name}-{n}");
        root.add(
            &format!("cn={cn},cn=schema,cn=config"),
            &[
                ("objectClass", &["olcSchemaConfig"]),
                ("cn", &[cn.as_str()]),
                (attr, &[definition]),
            ],
        )
        .unwrap();
    }
    let id_file = notifier.ldap_dir().join("schema/id/id");
    let id = fs::read_to_string(&id_file)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0);
    fs::write(&id_file, format!("{}\n", id + 1)).unwrap();
}

/// The replica's `cn=Subschema` as text (its attribute types and object classes).
fn replica_subschema(replica: &Replica) -> String {
    let mut conn = replica.connect();
    let (entries, _) = conn
        .search(
            "cn=Subschema",
            Scope::Base,
            "(objectClass=*)",
            vec!["attributeTypes", "objectClasses"],
        )
        .unwrap()
        .success()
        .unwrap();
    let entry = SearchEntry::construct(entries[0].clone());
    format!("{:?}", entry.attrs)
}

#[test]
fn a_schema_change_on_the_primary_reaches_the_replica_and_its_entries_follow() {
    let primary = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    let replica = Replica::start_with(&primary, Schema::Replicated);
    let state = tempfile::tempdir().unwrap();
    let mut listener = replication_listener(&primary, &notifier, &replica, state.path());
    listener.wait_initialized(WAIT).unwrap();
    assert!(!replica_subschema(&replica).contains("univentionTestColour"));

    let started = Instant::now();
    change_primary_schema(
        &primary,
        &notifier,
        "univention-test",
        &[
            "attributetype ( 1.3.6.1.4.1.10176.99999.1.1 NAME 'univentionTestColour' \
             DESC 'a colour' EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )",
            "attributetype ( 1.3.6.1.4.1.10176.99999.1.2 NAME 'univentionTestShade' \
             SUP univentionTestColour )",
            "objectclass ( 1.3.6.1.4.1.10176.99999.2.1 NAME 'univentionTestThing' \
             SUP top STRUCTURAL MUST cn MAY ( univentionTestColour $ univentionTestShade ) )",
        ],
    );
    let thing = format!("cn=thing,{BASE}");
    primary
        .admin()
        .unwrap()
        .add(
            &thing,
            &[
                ("objectClass", &["univentionTestThing"]),
                ("cn", &["thing"]),
                ("univentionTestColour", &["blue"]),
                ("univentionTestShade", &["navy"]),
            ],
        )
        .unwrap();
    wait_caught_up(&mut listener, &notifier, &thing, 'a');
    eprintln!("schema and entry replicated in {:.1?}", started.elapsed());

    // The live file is the primary's schema without slapd's own definitions, superiors
    // first; slapd restarted with it and the entry followed.
    let file = fs::read_to_string(replica.schema_file()).unwrap();
    assert!(file.starts_with("# This file is generated"), "{file}");
    let colour = file.find("NAME 'univentionTestColour'").unwrap();
    let shade = file.find("NAME 'univentionTestShade'").unwrap();
    assert!(colour < shade, "superior first");
    assert!(!file.contains("NAME 'entryUUID'") && !file.contains("NAME 'reqStart'"));
    assert!(replica_subschema(&replica).contains("univentionTestThing"));
    assert!(
        listener.log().contains("checked and installed"),
        "{}",
        listener.log_tail(40)
    );
    assert_same(&primary_view(&primary), &snapshot(&mut replica.connect()));
    let (healthy, status) = ctrl(&listener, &notifier, &["status"]);
    assert!(healthy, "{status}");
    listener.assert_log_lacks("quarantined");
}

/// The primary may use a definition from a module it loads (here `reqStart` of the
/// accesslog overlay) in its own schema; the replica does not load that module, so slapd
/// would not start with the replicated file (UCS writes it and restarts anyway). A real
/// refusal by slaptest, no test hook.
#[test]
fn a_schema_slaptest_refuses_is_reported_and_never_reaches_the_live_file() {
    let primary = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    let replica = Replica::start_with(&primary, Schema::Replicated);
    let state = tempfile::tempdir().unwrap();
    let mut listener = replication_listener(&primary, &notifier, &replica, state.path());
    listener.wait_initialized(WAIT).unwrap();
    let live_before = fs::read(replica.schema_file()).unwrap();

    change_primary_schema(
        &primary,
        &notifier,
        "audited",
        &[
            "objectclass ( 1.3.6.1.4.1.10176.99999.2.2 NAME 'univentionTestAudited' \
           SUP top AUXILIARY MAY reqStart )",
        ],
    );
    let after = format!("cn=after-schema,{BASE}");
    primary.admin().unwrap().add_role(&after, "after").unwrap();
    wait_caught_up(&mut listener, &notifier, &after, 'a');

    assert_eq!(
        fs::read(replica.schema_file()).unwrap(),
        live_before,
        "the live file is untouched"
    );
    let rejected = fs::read_to_string(replica.path().join("schema.conf.rejected")).unwrap();
    assert!(rejected.contains("univentionTestAudited"), "{rejected}");
    assert!(
        listener.log().contains("not installed"),
        "{}",
        listener.log_tail(40)
    );
    let (healthy, status) = ctrl(&listener, &notifier, &["status"]);
    assert!(!healthy, "{status}");
    assert!(status.contains("degraded"), "{status}");
    assert!(status.contains("slaptest refused"), "{status}");
    // Replication goes on with the old schema.
    assert!(snapshot(&mut replica.connect()).contains_key(&after));
    assert_same(&primary_view(&primary), &snapshot(&mut replica.connect()));
}

/// A listener whose replication module falls back like UCS (`fallback = MODE`), writing
/// the listener's own `failed.ldif`.
fn fallback_listener(
    primary: &Slapd,
    notifier: &Notifier,
    replica: &Replica,
    state: &Path,
    mode: &str,
) -> Listener {
    let config = state.join("replication.conf");
    let mut listener = Listener::prepare(
        primary,
        notifier,
        ListenerOptions::new()
            .jsonl(false)
            .native_module(format!("replication=@{}", config.display())),
    )
    .unwrap();
    replica.module_config_with(
        state,
        &format!(
            "fallback = {mode}\nfailed_ldif = {}\n",
            listener.failed_ldif_path().display()
        ),
    );
    listener.restart().unwrap();
    listener.wait_modules_ready(&["replication"], WAIT).unwrap();
    listener.wait_initialized(WAIT).unwrap();
    listener
}

fn add_posix_group(primary: &Slapd) -> String {
    let group = format!("cn=posix,{BASE}");
    primary
        .admin()
        .unwrap()
        .add(
            &group,
            &[
                ("objectClass", &["posixGroup"]),
                ("cn", &["posix"]),
                ("gidNumber", &["5000"]),
                (
                    "description",
                    &[&"a long description, longer than sixty columns, folded ".repeat(3)],
                ),
            ],
        )
        .unwrap();
    group
}

#[test]
fn ldif_fallback_writes_failed_ldif_pauses_and_resumes_after_the_replay() {
    let primary = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    // The replica lacks nis.schema: posixGroup objects are refused.
    let mut replica = Replica::start(&primary, false);
    let state = tempfile::tempdir().unwrap();
    let mut listener = fallback_listener(&primary, &notifier, &replica, state.path(), "ldif");
    let started = Instant::now();

    let group = add_posix_group(&primary);
    let after = format!("cn=after,{BASE}");
    primary.admin().unwrap().add_role(&after, "after").unwrap();
    let group_id = notifier.wait_transaction(&group, 'a', WAIT).unwrap();
    let failed = listener.failed_ldif_path();
    wait_until("failed.ldif and the listener paused", WAIT, || {
        Ok((failed.exists() && listener.log().contains("replication stopped")).then_some(()))
    })
    .unwrap();

    // UCS's format: one change record, folded at 60 columns, a blank line after it;
    // readable by root only (it holds what the Primary holds, password hashes included).
    let text = fs::read_to_string(&failed).unwrap();
    assert!(
        text.starts_with(&format!("dn: {group}\nchangetype: add\n")),
        "{text}"
    );
    assert!(text.contains("objectClass: posixGroup\n"), "{text}");
    assert!(text.ends_with("\n\n"), "{text:?}");
    assert!(text.lines().all(|l| l.len() <= 61), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with(' ')),
        "a folded line: {text}"
    );
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        fs::metadata(&failed).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Paused at the group: neither it nor what came after is committed.
    assert!(listener.notifier_id().unwrap_or(0) < group_id);
    assert!(!snapshot(&mut replica.connect()).contains_key(&after));
    let (healthy, status) = ctrl(&listener, &notifier, &["status"]);
    assert!(!healthy, "{status}");

    // The operator fixes the replica, replays the file as UCS's resync does, moves it away.
    replica.stop();
    replica.write_config(true);
    replica.spawn();
    let replay = Command::new("ldapmodify")
        .args([
            "-x",
            "-H",
            &replica.url(),
            "-D",
            UPDATE_DN,
            "-w",
            UPDATE_PW,
            "-c",
            "-f",
        ])
        .arg(&failed)
        .output()
        .unwrap();
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    fs::rename(&failed, state.path().join("replayed.ldif")).unwrap();
    wait_caught_up(&mut listener, &notifier, &after, 'a');
    eprintln!("ldif fallback round trip in {:.1?}", started.elapsed());
    assert!(listener.log().contains("reloading every module"));
    assert_same(&primary_view(&primary), &snapshot(&mut replica.connect()));
    let (healthy, status) = ctrl(&listener, &notifier, &["status"]);
    assert!(healthy, "{status}");
}

#[test]
fn restart_fallback_exits_without_committing_and_the_restart_redoes_the_change() {
    let primary = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    let mut replica = Replica::start(&primary, false);
    let state = tempfile::tempdir().unwrap();
    let mut listener = fallback_listener(&primary, &notifier, &replica, state.path(), "restart");

    let group = add_posix_group(&primary);
    let group_id = notifier.wait_transaction(&group, 'a', WAIT).unwrap();
    let status = listener.wait_exit(WAIT).unwrap();
    assert_eq!(status.code(), Some(1), "{}", listener.log_tail(30));
    assert!(listener.notifier_id().unwrap_or(0) < group_id);
    assert!(
        listener.log().contains("ldap/replication/fallback=restart"),
        "{}",
        listener.log_tail(30)
    );
    assert!(!listener.failed_ldif_path().exists());

    // Restarted after the cause is fixed, the listener redoes the change.
    replica.stop();
    replica.write_config(true);
    replica.spawn();
    listener.restart().unwrap();
    wait_caught_up(&mut listener, &notifier, &group, 'a');
    assert_same(&primary_view(&primary), &snapshot(&mut replica.connect()));
}

/// `ldap/slave/filter` end to end: the mixed writes with roles and the users `user1…`
/// hidden from the replica (renames bring some of those users into view; moves, deletes
/// and group churn go on around them). The replica holds exactly what the filter matches
/// on the primary.
#[test]
fn a_selective_filter_replicates_exactly_what_it_matches() {
    const FILTER: &str = "(!(|(objectClass=organizationalRole)(uid=user1*)))";
    let primary = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    let replica = Replica::start(&primary, true);
    let state = tempfile::tempdir().unwrap();
    let config = replica.module_config(state.path());
    let mut listener = Listener::start(
        &primary,
        &notifier,
        ListenerOptions::new()
            .jsonl(false)
            .ucr(format!("ldap/base: {BASE}\nldap/slave/filter: {FILTER}\n"))
            .native_module(format!("replication=@{}", config.display())),
    )
    .unwrap();
    listener.wait_modules_ready(&["replication"], WAIT).unwrap();
    listener.wait_initialized(WAIT).unwrap();

    let started = Instant::now();
    let writes = mixed_writes(&primary, 200, 1_200);
    wait_caught_up(&mut listener, &notifier, &last_write(), 'd');
    eprintln!(
        "{writes} writes with a filter replicated in {:.1?}",
        started.elapsed()
    );

    let mut replica_conn = integration_tests::directory::Directory::new(replica.connect());
    let hidden = replica_conn
        .search(
            BASE,
            Scope::Subtree,
            "(|(objectClass=organizationalRole)(uid=user1*))",
            &["1.1"],
        )
        .unwrap();
    assert!(
        hidden.is_empty(),
        "hidden entries on the replica: {}",
        hidden.len()
    );
    let report = integration_tests::compare::Comparison::new()
        .filter_left(FILTER)
        .exclude("auditContext")
        // Computed per server: a container whose children are all hidden has none here.
        .exclude("hasSubordinates")
        .diff(&mut primary.host().unwrap(), &mut replica_conn)
        .unwrap();
    assert!(report.is_none(), "{}", report.unwrap_or_default());
    let visible = primary
        .host()
        .unwrap()
        .search(BASE, Scope::Subtree, FILTER, &["1.1"])
        .unwrap();
    let all = primary
        .host()
        .unwrap()
        .search(BASE, Scope::Subtree, "(objectClass=*)", &["1.1"])
        .unwrap();
    assert!(
        visible.len() > 150 && all.len() > visible.len() + 50,
        "the filter must hide a good part: {} of {} visible",
        visible.len(),
        all.len()
    );
}

/// The replica's slapd is down for 30 s in the middle of a run of more than 3,000 mixed
/// writes, and writes go on all through the outage; the listener waits at the first change
/// it cannot write, catches up once slapd is back, and the directories are equal.
/// A listener whose connection to the replica stays open while it is idle (no postrun).
fn lasting_replication_listener(
    primary: &Slapd,
    notifier: &Notifier,
    replica: &Replica,
    state: &Path,
) -> Listener {
    let config = replica.module_config(state);
    let mut listener = Listener::start(
        primary,
        notifier,
        ListenerOptions::new()
            .jsonl(false)
            .postrun_delay(Duration::from_secs(600))
            .native_module(format!("replication=@{}", config.display())),
    )
    .unwrap();
    listener.wait_modules_ready(&["replication"], WAIT).unwrap();
    listener
}

/// Stops the replica (SIGSTOP: it keeps the listener's connection but answers nothing) and
/// adds the role `cn=<prefix>0`: the listener sends its write and commits the transaction
/// although the write is unanswered (the flush gives up waiting after the module's timeout
/// and keeps it unconfirmed). Then adds `cn=<prefix>1…` up to `count`: at the first of them
/// the listener waits. Returns the first change's id.
fn a_write_left_in_flight(
    primary: &Slapd,
    notifier: &Notifier,
    listener: &Listener,
    replica: &Replica,
    prefix: &str,
    count: usize,
) -> u64 {
    let mut admin = primary.admin().unwrap();
    let mut add = |i: usize| {
        admin
            .add_role(&format!("cn={prefix}{i},{BASE}"), "in flight")
            .unwrap();
    };
    replica.signal(libc::SIGSTOP);
    // The first alone, so that it is the last the listener knows of and it flushes after
    // it (announced together with the rest, all went out in flight before any flush).
    add(0);
    let first = notifier
        .wait_transaction(&format!("cn={prefix}0,{BASE}"), 'a', WAIT)
        .unwrap();
    wait_until(
        "the listener committing a write still in flight",
        WAIT,
        || Ok((listener.notifier_id().unwrap_or(0) >= first).then_some(())),
    )
    .unwrap();
    for i in 1..count {
        add(i);
    }
    let last = notifier
        .wait_transaction(&format!("cn={prefix}{},{BASE}", count - 1), 'a', WAIT)
        .unwrap();
    // It waits before the end.
    assert!(listener.notifier_id().unwrap_or(0) < last);
    first
}

#[test]
fn writes_in_flight_when_the_replica_dies_are_sent_again() {
    let primary = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    let mut replica = Replica::start(&primary, true);
    let state = tempfile::tempdir().unwrap();
    let mut listener = lasting_replication_listener(&primary, &notifier, &replica, state.path());
    mixed_writes(&primary, 20, 40);
    wait_caught_up(&mut listener, &notifier, &last_write(), 'd');

    a_write_left_in_flight(&primary, &notifier, &listener, &replica, "lost", 20);
    // The slapd that had it in its socket buffer dies: it was never applied.
    replica.kill();
    replica.spawn();
    let held = snapshot(&mut replica.connect());
    assert!(!held.contains_key(&format!("cn=lost0,{BASE}")));
    // The listener sends it again before the next change.
    wait_caught_up(&mut listener, &notifier, &format!("cn=lost19,{BASE}"), 'a');
    assert_same(&primary_view(&primary), &snapshot(&mut replica.connect()));
    listener.assert_log_lacks("quarantined");
}

#[test]
fn writes_in_flight_when_the_listener_and_the_replica_die_are_applied_after_the_restart() {
    let primary = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    let mut replica = Replica::start(&primary, true);
    let state = tempfile::tempdir().unwrap();
    let mut listener = lasting_replication_listener(&primary, &notifier, &replica, state.path());
    mixed_writes(&primary, 20, 40);
    wait_caught_up(&mut listener, &notifier, &last_write(), 'd');

    a_write_left_in_flight(&primary, &notifier, &listener, &replica, "lost", 20);
    // The listener has committed it; only the module's log still knows it is not
    // confirmed.
    let log = state.path().join("state").join("unconfirmed.log");
    let logged = fs::read_to_string(&log).unwrap();
    assert!(logged.contains("cn=lost0,"), "{logged}");
    listener.kill().unwrap();
    replica.kill();
    replica.spawn();
    assert!(!snapshot(&mut replica.connect()).contains_key(&format!("cn=lost0,{BASE}")));

    // Applied again at the start, then the rest.
    listener.restart().unwrap();
    wait_caught_up(&mut listener, &notifier, &format!("cn=lost19,{BASE}"), 'a');
    assert_same(&primary_view(&primary), &snapshot(&mut replica.connect()));
    assert!(
        listener
            .log()
            .contains("were never confirmed; applying them again"),
        "{}",
        listener.log_tail(40)
    );
    listener.assert_log_lacks("quarantined");
}

#[test]
fn a_refusal_collected_after_the_commit_is_quarantined_and_later_changes_queue_behind_it() {
    let primary = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    // No nis.schema: the posixGroup is refused.
    let mut replica = Replica::start(&primary, false);
    let state = tempfile::tempdir().unwrap();
    let mut listener = replication_listener(&primary, &notifier, &replica, state.path());
    listener.wait_initialized(WAIT).unwrap();

    // The add is sent and the listener commits it before the (stopped) replica refuses.
    replica.signal(libc::SIGSTOP);
    let group = add_posix_group(&primary);
    let added = notifier.wait_transaction(&group, 'a', WAIT).unwrap();
    wait_until("the listener committing the add in flight", WAIT, || {
        Ok((listener.notifier_id().unwrap_or(0) >= added).then_some(()))
    })
    .unwrap();
    let mut admin = primary.admin().unwrap();
    admin.replace(&group, "gidNumber", &["5001"]).unwrap();
    admin
        .add_role(&format!("cn=after,{BASE}"), "after")
        .unwrap();
    replica.signal(libc::SIGCONT);
    wait_caught_up(&mut listener, &notifier, &format!("cn=after,{BASE}"), 'a');

    let (listed, list) = ctrl(&listener, &notifier, &["quarantine", "list"]);
    assert!(listed, "{list}");
    let records: Vec<serde_json::Value> = serde_json::from_str(list.trim()).unwrap();
    assert_eq!(records.len(), 2, "{list}");
    assert_eq!(records[0]["id"], added);
    assert_eq!(records[0]["dn"], group.as_str());
    assert_eq!(records[0]["command"], "a");
    assert_eq!(records[0]["operation"], "add");
    assert!(!records[0]["error"].as_str().unwrap().is_empty(), "{list}");
    assert!(
        records[0]["ldif"]
            .as_str()
            .unwrap()
            .contains("objectClass: posixGroup"),
        "{list}"
    );
    assert_eq!(records[1]["operation"], "queued");
    assert_eq!(records[1]["dn"], group.as_str());
    let held = snapshot(&mut replica.connect());
    assert!(held.contains_key(&format!("cn=after,{BASE}")));
    assert!(!held.contains_key(&group));

    // With the schema fixed the retry applies both, in order.
    replica.stop();
    replica.write_config(true);
    replica.spawn();
    let (retried, answer) = ctrl(&listener, &notifier, &["quarantine", "retry"]);
    assert!(retried, "{answer}");
    assert!(
        answer.contains("2 applied, 0 still quarantined"),
        "{answer}"
    );
    assert_same(&primary_view(&primary), &snapshot(&mut replica.connect()));
}

#[test]
fn a_30_s_replica_outage_during_3000_writes_catches_up_identically() {
    const OUTAGE: Duration = Duration::from_secs(30);
    let primary = Slapd::start(SlapdConfig::provider().dbnosync(true)).unwrap();
    let notifier = Notifier::following_accesslog(&primary, &[], WAIT).unwrap();
    let mut replica = Replica::start(&primary, true);
    let state = tempfile::tempdir().unwrap();
    let mut listener = replication_listener(&primary, &notifier, &replica, state.path());
    listener.wait_initialized(WAIT).unwrap();
    let started = Instant::now();

    let writer = {
        let url = primary.ldap_url();
        std::thread::spawn(move || mixed_writes_at(&url, 300, 2_700))
    };
    wait_until("the listener in the middle of the run", WAIT, || {
        Ok((listener.notifier_id().unwrap_or(0) > 800).then_some(()))
    })
    .unwrap();
    replica.stop();
    let down_at = Instant::now();
    let stopped_at = notifier.last_id().unwrap();
    // Writes all through the outage, also after the mixed run ended.
    let mut admin = primary.admin().unwrap();
    let mut during = 0;
    while down_at.elapsed() < OUTAGE {
        admin
            .add_role(&format!("cn=during-outage{during},{BASE}"), "outage")
            .unwrap();
        during += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let writes = writer.join().unwrap() + during;
    assert!(writes >= 3_000, "{writes} writes");
    let last = notifier
        .wait_transaction(&format!("cn=during-outage{},{BASE}", during - 1), 'a', WAIT)
        .unwrap();
    // Nothing past the first change it could not write.
    assert_waiting_at(&listener, &notifier, stopped_at, last);

    replica.spawn();
    let back = Instant::now();
    wait_caught_up(
        &mut listener,
        &notifier,
        &format!("cn=during-outage{},{BASE}", during - 1),
        'a',
    );
    wait_caught_up(&mut listener, &notifier, &last_write(), 'd');
    eprintln!(
        "{writes} writes, {OUTAGE:?} outage; caught up {:.1?} after slapd came back, {:.1?} in all",
        back.elapsed(),
        started.elapsed()
    );
    assert_same(&primary_view(&primary), &snapshot(&mut replica.connect()));
    listener.assert_log_lacks("quarantined");
}
