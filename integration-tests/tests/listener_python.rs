//! Python handler modules end to end (spec listener.md §4, must-match items 1–5, 7, 9, 10):
//! real slapd, a notifier following its accesslog, the real listener binary with module
//! files in a `-m` directory.
//!
//! The recording module logs `dn`, `command` and the entryUUIDs of `old` and `new` of
//! every call. Where a test runs it next to the native `jsonl` module (whose call sequences
//! `listener_changes` checks against the spec), both must see exactly the same calls.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::slapd::{BASE, RESTRICTED_DN};
use integration_tests::users::{TempUser, is_root};
use integration_tests::{
    Change, Directory, Intake, Listener, ListenerOptions, Notifier, Slapd, wait_until,
};
use serde::Deserialize;

const T: Duration = Duration::from_secs(60);

/// Appends one JSON line per call to `<module dir>/<name>.calls`. `HEADER` declares the
/// module (name, filter, modrdn, …).
const RECORDER: &str = r#"
import json, os, threading
HEADER

_OUT = os.path.join(os.path.dirname(__file__), name + ".calls")

def _uuid(entry):
    values = entry.get("entryUUID")
    return values[0].decode() if values else None

def _record(function, **fields):
    fields["fn"] = function
    fields["euid"] = os.geteuid()
    current = threading.current_thread()
    fields["thread"] = "main" if current is threading.main_thread() else current.name
    with open(_OUT, "a") as out:
        out.write(json.dumps(fields) + "\n")

def handler(dn, new, old, *command):
    _record("handler", dn=dn, command=command[0] if command else None,
            old=_uuid(old), new=_uuid(new), old_empty=not old, new_empty=not new)

def initialize():
    _record("initialize")

def clean():
    _record("clean")

def prerun():
    _record("prerun")

def postrun():
    _record("postrun")

def setdata(key, value):
    _record("setdata", key=key)
"#;

#[derive(Debug, Clone, Deserialize, PartialEq)]
struct Recorded {
    #[serde(rename = "fn")]
    function: String,
    #[serde(default)]
    dn: Option<String>,
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    old: Option<String>,
    #[serde(default)]
    new: Option<String>,
    #[serde(default)]
    old_empty: Option<bool>,
    #[serde(default)]
    new_empty: Option<bool>,
    #[serde(default)]
    key: Option<String>,
    euid: u32,
    /// `main` when called on Python's main thread (the one that started the interpreter).
    thread: String,
}

impl Recorded {
    /// `"<command> <dn>"` of a handler call.
    fn summary(&self) -> String {
        format!(
            "{} {}",
            self.command.as_deref().unwrap_or("?"),
            self.dn.as_deref().unwrap_or("")
        )
    }
}

/// A handler call as `(command, dn, entryUUID of old, entryUUID of new)`.
type Seen = (String, String, Option<String>, Option<String>);

fn dn(rdn: &str) -> String {
    format!("{rdn},{BASE}")
}

struct Stack {
    slapd: Slapd,
    notifier: Notifier,
    admin: Directory,
    modules: tempfile::TempDir,
}

impl Stack {
    fn start() -> Stack {
        let slapd = Slapd::provider().unwrap();
        let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();
        let admin = slapd.admin().unwrap();
        let modules = tempfile::tempdir().unwrap();
        // Readable for a listener running with another effective uid.
        fs::set_permissions(modules.path(), fs::Permissions::from_mode(0o777)).unwrap();
        Stack {
            slapd,
            notifier,
            admin,
            modules,
        }
    }

    fn module(&self, file: &str, source: &str) -> PathBuf {
        let path = self.modules.path().join(file);
        fs::write(&path, source).unwrap();
        path
    }

    /// A recording module `<name>.py` with extra declarations.
    fn recorder(&self, name: &str, declarations: &str) {
        let header = format!("name = {name:?}\ndescription = 'records calls'\n{declarations}");
        self.module(&format!("{name}.py"), &RECORDER.replace("HEADER", &header));
    }

    fn recorded(&self, name: &str) -> Vec<Recorded> {
        read_recorded(&self.modules.path().join(format!("{name}.calls")))
    }

    fn handler_calls(&self, name: &str) -> Vec<Recorded> {
        self.recorded(name)
            .into_iter()
            .filter(|r| r.function == "handler")
            .collect()
    }

    /// Starts a listener on the module directory and waits until `ready` modules are
    /// initialised (state 3).
    fn listener(&self, options: ListenerOptions, ready: &[&str]) -> Listener {
        let options = options.module_dir(self.modules.path());
        let mut listener = Listener::start(&self.slapd, &self.notifier, options).unwrap();
        listener.wait_initialized(T).unwrap();
        wait_ready(&mut listener, ready);
        listener
    }

    /// Waits until the listener has processed everything the notifier announced.
    fn settle(&self, listener: &mut Listener) -> u64 {
        let last = self.notifier.last_id().unwrap();
        listener.wait_for_id(last, T).unwrap();
        last
    }
}

fn wait_ready(listener: &mut Listener, names: &[&str]) {
    listener.wait_modules_ready(names, T).unwrap();
}

fn read_recorded(path: &Path) -> Vec<Recorded> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect()
}

/// The jsonl module's calls as `(command, dn, old uuid, new uuid)`, from `from` on.
fn jsonl_calls(listener: &Listener, skip: usize) -> Vec<Seen> {
    listener
        .changes()
        .unwrap()
        .into_iter()
        .skip(skip)
        .map(|c| {
            let uuid = |side: &std::collections::BTreeMap<String, Vec<Vec<u8>>>| {
                side.get("entryUUID")
                    .map(|v| String::from_utf8(v[0].clone()).unwrap())
            };
            (
                c.command.to_string(),
                c.dn.clone(),
                uuid(&c.old),
                uuid(&c.new),
            )
        })
        .collect()
}

fn recorded_calls(calls: &[Recorded], skip: usize) -> Vec<Seen> {
    calls
        .iter()
        .skip(skip)
        .map(|r| {
            (
                r.command.clone().unwrap_or_default(),
                r.dn.clone().unwrap_or_default(),
                r.old.clone(),
                r.new.clone(),
            )
        })
        .collect()
}

/// One write at a time, each processed before the next (the listener reads the current
/// LDAP state of an object, so lockstep keeps the expected calls exact).
fn each_processed(stack: &mut Stack, listener: &mut Listener, writes: Vec<Write>) {
    for write in writes {
        let before = stack.notifier.last_id().unwrap();
        write(&mut stack.admin);
        let notifier = &stack.notifier;
        wait_until("the notifier to announce the write", T, || {
            Ok((notifier.last_id()? > before).then_some(()))
        })
        .unwrap();
        stack.settle(listener);
    }
}

type Write = Box<dyn FnOnce(&mut Directory)>;

fn add_role(dn: String, cn: &'static str) -> Write {
    Box::new(move |d: &mut Directory| d.add_role(&dn, cn).unwrap())
}

fn replace(dn: String, attr: &'static str, value: &'static str) -> Write {
    Box::new(move |d: &mut Directory| d.replace(&dn, attr, &[value]).unwrap())
}

fn modrdn(dn: String, rdn: &'static str, superior: Option<String>) -> Write {
    Box::new(move |d: &mut Directory| d.modrdn(&dn, rdn, true, superior.as_deref()).unwrap())
}

fn delete(dn: String) -> Write {
    Box::new(move |d: &mut Directory| d.delete(&dn).unwrap())
}

// ---------------------------------------------------------------------------------------

/// Add, modify, rename, move, delete and a restricted object, with and without `modrdn`:
/// the Python modules see exactly the calls of the `jsonl` module (command, DN, entryUUID
/// of old and new), and module initialisation passes every object as `n`.
#[test]
fn python_modules_see_the_same_calls_as_jsonl() {
    let mut stack = Stack::start();
    // Like the jsonl module, both also get deletes of objects they never handled.
    let every = "filter = '(objectClass=*)'\nhandle_every_delete = True\n";
    stack.recorder("with_modrdn", &format!("{every}modrdn = '1'\n"));
    stack.recorder("without_modrdn", every);
    let mut listener = stack.listener(ListenerOptions::new(), &["with_modrdn", "without_modrdn"]);

    // Initialisation: the same `n` calls as jsonl.
    let init = jsonl_calls(&listener, 0);
    assert!(init.iter().all(|c| c.0 == "n"), "{init:?}");
    assert!(init.iter().any(|c| c.1 == BASE));
    let with = stack.handler_calls("with_modrdn");
    assert_eq!(recorded_calls(&with, 0), init);
    let without = stack.handler_calls("without_modrdn");
    assert!(without.iter().all(|r| r.command.is_none()));
    assert_eq!(without.len(), init.len());
    let lifecycle: Vec<String> = stack
        .recorded("with_modrdn")
        .iter()
        .filter(|r| r.function != "handler")
        .map(|r| match &r.key {
            Some(key) => format!("{} {key}", r.function),
            None => r.function.clone(),
        })
        .collect();
    assert_eq!(
        lifecycle[..7],
        [
            "setdata basedn",
            "setdata binddn",
            "setdata bindpw",
            "setdata ldapserver",
            "clean",
            "initialize",
            "prerun"
        ]
    );

    let person = dn("cn=py");
    let renamed = dn("cn=py2");
    let moved = format!("cn=py2,{RESTRICTED_DN}");
    let back = dn("cn=py3");
    let secret = format!("cn=pysecret,{RESTRICTED_DN}");
    each_processed(
        &mut stack,
        &mut listener,
        vec![
            add_role(person.clone(), "py"),
            replace(person.clone(), "description", "changed"),
            modrdn(person.clone(), "cn=py2", None),
            // Into the subtree the host account cannot see, and out again.
            modrdn(renamed.clone(), "cn=py2", Some(RESTRICTED_DN.to_owned())),
            modrdn(moved.clone(), "cn=py3", Some(BASE.to_owned())),
            delete(back.clone()),
            add_role(secret.clone(), "pysecret"),
        ],
    );
    let skip = init.len();
    let expected = jsonl_calls(&listener, skip);
    let with = stack.handler_calls("with_modrdn");
    assert_eq!(recorded_calls(&with, skip), expected);
    let without = stack.handler_calls("without_modrdn");
    let strip = |calls: Vec<Seen>| -> Vec<_> {
        calls.into_iter().map(|(_, dn, o, n)| (dn, o, n)).collect()
    };
    assert_eq!(
        strip(recorded_calls(&without, skip)),
        strip(expected.clone())
    );

    // The sequence itself, as spec §3 derives it for the host account.
    let summaries: Vec<String> = with[skip..].iter().map(Recorded::summary).collect();
    assert_eq!(summaries[0], format!("a {person}"));
    assert_eq!(summaries[1], format!("m {person}"));
    assert_eq!(summaries[2], format!("r {person}"));
    assert_eq!(summaries[3], format!("a {renamed}"));
    assert!(summaries.contains(&format!("d {moved}")), "{summaries:?}");
    assert!(summaries.contains(&format!("a {back}")), "{summaries:?}");
    assert!(summaries.contains(&format!("d {back}")), "{summaries:?}");
    assert_eq!(summaries.last().unwrap(), &format!("d {secret}"));
    let uuid_of_add = with[skip].new.clone().unwrap();
    assert_eq!(
        with[skip + 2].old.as_deref(),
        Some(uuid_of_add.as_str()),
        "r: old side"
    );
    assert_eq!(with[skip + 2].new_empty, Some(true), "r: new = {{}}");
    assert_eq!(
        with[skip + 3].old_empty,
        Some(true),
        "a after r: old = {{}}"
    );
    // Every call of every module on the one thread that started Python, as in UCS: module
    // state (thread-locals, `threading.current_thread()`) never changes threads.
    for name in ["with_modrdn", "without_modrdn"] {
        let elsewhere: Vec<_> = stack
            .recorded(name)
            .into_iter()
            .filter(|r| r.thread != "main")
            .collect();
        assert!(elsewhere.is_empty(), "{name}: {elsewhere:?}");
    }
    listener.stop().unwrap();
}

/// `handle_subtree_moves = True` makes a Python module hear about the descendants of a
/// renamed container (`r` + `a` each, like the `jsonl` module); without it, the default,
/// the module sees only the container's own calls.
#[test]
fn python_modules_opt_in_to_subtree_moves() {
    let mut stack = Stack::start();
    // `modrdn` so that the recorded calls carry their command.
    let every = "filter = '(objectClass=*)'\nhandle_every_delete = True\nmodrdn = '1'\n";
    stack.recorder("movers", &format!("{every}handle_subtree_moves = True\n"));
    stack.recorder("plain", every);
    let mut listener = stack.listener(ListenerOptions::new(), &["movers", "plain"]);
    let skip = jsonl_calls(&listener, 0).len();
    let (movers_skip, plain_skip) = (
        stack.handler_calls("movers").len(),
        stack.handler_calls("plain").len(),
    );
    let ou = dn("ou=pyc");
    let kid = format!("cn=kid,{ou}");
    let add_ou: Write = {
        let ou = ou.clone();
        Box::new(move |d: &mut Directory| {
            d.add(
                &ou,
                &[("objectClass", &["organizationalUnit"]), ("ou", &["pyc"])],
            )
            .unwrap()
        })
    };
    each_processed(
        &mut stack,
        &mut listener,
        vec![
            add_ou,
            add_role(kid.clone(), "kid"),
            modrdn(ou.clone(), "ou=pyc2", None),
        ],
    );
    let ou2 = dn("ou=pyc2");
    let kid2 = format!("cn=kid,{ou2}");
    let summaries = |name: &str, skip: usize| -> Vec<String> {
        stack.handler_calls(name)[skip..]
            .iter()
            .map(Recorded::summary)
            .collect()
    };
    let container = [
        format!("a {ou}"),
        format!("a {kid}"),
        format!("r {ou}"),
        format!("a {ou2}"),
        format!("m {ou2}"),
    ];
    let mut with_kid = container.to_vec();
    with_kid.extend([format!("r {kid}"), format!("a {kid2}")]);
    assert_eq!(summaries("movers", movers_skip), with_kid);
    assert_eq!(summaries("plain", plain_skip), container);
    let jsonl: Vec<String> = jsonl_calls(&listener, skip)
        .into_iter()
        .map(|c| format!("{} {}", c.0, c.1))
        .collect();
    assert_eq!(jsonl, with_kid);
    listener.stop().unwrap();
}

/// `attributes` skips changes of other attributes on objects the module handled;
/// `handle_every_delete` gets deletes of objects its filter never matched.
#[test]
fn attributes_and_handle_every_delete() {
    let mut stack = Stack::start();
    stack.recorder(
        "only_description",
        "filter = '(objectClass=organizationalRole)'\nattributes = ['description']\nmodrdn = 1\n",
    );
    stack.recorder(
        "every_delete",
        "filter = '(cn=matches-nothing)'\nhandle_every_delete = True\n",
    );
    stack.recorder("no_every_delete", "filter = '(cn=matches-nothing)'\n");
    let mut listener = stack.listener(
        ListenerOptions::new(),
        &["only_description", "every_delete", "no_every_delete"],
    );
    let role = dn("cn=attrs");
    let start = stack.handler_calls("only_description").len();
    each_processed(
        &mut stack,
        &mut listener,
        vec![
            add_role(role.clone(), "attrs"),
            replace(role.clone(), "telephoneNumber", "+49 421 22232-0"),
            replace(role.clone(), "description", "counts"),
            delete(role.clone()),
        ],
    );
    let summaries: Vec<String> = stack.handler_calls("only_description")[start..]
        .iter()
        .map(Recorded::summary)
        .collect();
    assert_eq!(
        summaries,
        [
            format!("a {role}"),
            format!("m {role}"),
            format!("d {role}")
        ],
        "the telephoneNumber change must be skipped"
    );
    let every: Vec<String> = stack
        .handler_calls("every_delete")
        .iter()
        .filter(|r| r.dn.as_deref() == Some(role.as_str()))
        .map(|r| r.dn.clone().unwrap())
        .collect();
    assert_eq!(
        every,
        std::slice::from_ref(&role),
        "handle_every_delete: only the delete"
    );
    assert!(
        stack
            .handler_calls("no_every_delete")
            .iter()
            .all(|r| r.dn.as_deref() != Some(role.as_str())),
    );
    listener.stop().unwrap();
}

/// An exception or a return value other than `None` is a failure: logged with the module
/// name and traceback, and the module is not recorded on the object (so it gets no delete).
#[test]
fn failures_leave_the_module_off_the_object() {
    let mut stack = Stack::start();
    stack.module(
        "flaky.py",
        r#"
import os
name = "flaky"
description = "fails for some objects"
filter = "(objectClass=organizationalRole)"
_OUT = os.path.join(os.path.dirname(__file__), "flaky.calls")

def handler(dn, new, old):
    with open(_OUT, "a") as out:
        out.write("%s %s\n" % ("d" if not new else "u", dn))
    if dn.startswith("cn=raises"):
        raise ValueError("flaky failure for " + dn)
    if dn.startswith("cn=returns"):
        return "not None"
"#,
    );
    let mut listener = stack.listener(ListenerOptions::new(), &["flaky"]);
    let (raises, returns, fine) = (dn("cn=raises"), dn("cn=returns"), dn("cn=fine"));
    each_processed(
        &mut stack,
        &mut listener,
        vec![
            add_role(raises.clone(), "raises"),
            add_role(returns.clone(), "returns"),
            add_role(fine.clone(), "fine"),
            delete(raises.clone()),
            delete(returns.clone()),
            delete(fine.clone()),
        ],
    );
    let calls = fs::read_to_string(stack.modules.path().join("flaky.calls")).unwrap();
    let relevant: Vec<&str> = calls
        .lines()
        .filter(|l| {
            [&raises, &returns, &fine]
                .iter()
                .any(|dn| l.ends_with(dn.as_str()))
        })
        .collect();
    assert_eq!(
        relevant,
        [
            format!("u {raises}"),
            format!("u {returns}"),
            format!("u {fine}"),
            format!("d {fine}"),
        ]
    );
    let log = listener.log();
    assert!(log.contains("Traceback (most recent call last)"), "{log}");
    assert!(
        log.contains(&format!("ValueError: flaky failure for {raises}")),
        "{log}"
    );
    assert!(log.contains("returned 'not None' instead of None"), "{log}");
    assert!(log.contains("flaky: handler for a"), "{log}");
    listener.stop().unwrap();
}

/// Broken module files are reported with their file name and skipped; the others run.
/// `print` output goes to the log. SIGHUP reloads changed module files.
#[test]
fn broken_modules_are_skipped_and_sighup_reloads() {
    let mut stack = Stack::start();
    let syntax = stack.module(
        "syntax.py",
        "description = 'x'\ndef handler(dn, new, old)\n",
    );
    let import = stack.module("imports.py", "import no_such_module_anywhere\n");
    let no_handler = stack.module("nohandler.py", "description = 'x'\n");
    stack.module(
        "versioned.py",
        "import os\nprint('hello from versioned, version 1')\ndescription = 'x'\n\
         filter = '(objectClass=organizationalRole)'\n\
         def handler(dn, new, old):\n    \
         open(os.path.join(os.path.dirname(__file__), 'versioned.out'), 'a').write('v1 ' + dn + '\\n')\n",
    );
    let mut listener = stack.listener(ListenerOptions::new(), &["versioned"]);
    let log = listener.log();
    for file in [&syntax, &import, &no_handler] {
        assert!(
            log.contains(&format!("import of filename={} failed", file.display())),
            "{log}"
        );
    }
    assert!(log.contains("SyntaxError"), "{log}");
    assert!(
        log.contains("No module named 'no_such_module_anywhere'"),
        "{log}"
    );
    assert!(log.contains("hello from versioned, version 1"), "{log}");
    let first = dn("cn=v1");
    each_processed(
        &mut stack,
        &mut listener,
        vec![add_role(first.clone(), "v1")],
    );

    stack.module(
        "versioned.py",
        "import os\ndescription = 'x'\nfilter = '(objectClass=organizationalRole)'\n\
         def handler(dn, new, old):\n    \
         open(os.path.join(os.path.dirname(__file__), 'versioned.out'), 'a').write('v2 ' + dn + '\\n')\n",
    );
    listener.signal(libc::SIGHUP).unwrap();
    listener
        .wait_until("the modules to be reloaded", T, |l| {
            Ok(l.log().contains("modules reloaded").then_some(()))
        })
        .unwrap();
    let second = dn("cn=v2");
    each_processed(
        &mut stack,
        &mut listener,
        vec![add_role(second.clone(), "v2")],
    );
    let out = fs::read_to_string(stack.modules.path().join("versioned.out")).unwrap();
    assert!(out.contains(&format!("v1 {first}\n")), "{out}");
    assert!(out.ends_with(&format!("v2 {second}\n")), "{out}");
    assert_eq!(listener.handler_state("versioned"), Some(3));
    assert_eq!(listener.handler_state("syntax"), None);
    listener.stop().unwrap();
}

/// `listener.configRegistry` reads the listener's UCR file; `univention.debug` messages and
/// `print` end up in the listener's log with the module name.
#[test]
fn config_registry_and_debug_reach_modules() {
    let mut stack = Stack::start();
    stack.module(
        "ucr.py",
        r#"
import os
import listener
import univention.debug as ud
name = "ucr"
description = "reads UCR"
filter = "(objectClass=organizationalRole)"
def handler(dn, new, old):
    if not new:
        return
    ud.debug(ud.LISTENER, ud.ERROR, "ud says " + listener.configRegistry["test/value"])
    print("print says", listener.baseConfig.get("test/value"))
    with open(os.path.join(os.path.dirname(__file__), "ucr.out"), "w") as out:
        out.write("%s %s %s" % (listener.configRegistry["test/value"],
                               listener.configRegistry.is_true("test/flag"),
                               listener.configRegistry["ldap/base"]))
"#,
    );
    let options = ListenerOptions::new().ucr(format!(
        "ldap/base: {BASE}\ntest/value: from the listener's UCR\ntest/flag: yes\n"
    ));
    let mut listener = stack.listener(options, &["ucr"]);
    each_processed(
        &mut stack,
        &mut listener,
        vec![add_role(dn("cn=ucr"), "ucr")],
    );
    assert_eq!(
        fs::read_to_string(stack.modules.path().join("ucr.out")).unwrap(),
        format!("from the listener's UCR True {BASE}")
    );
    let log = listener.log();
    assert!(
        log.contains("ucr: LISTENER ud says from the listener's UCR"),
        "{log}"
    );
    assert!(
        log.contains("ucr: print says from the listener's UCR"),
        "{log}"
    );
    listener.stop().unwrap();
}

/// Started as root with `--user`: modules run with that effective uid, may become root
/// with `listener.setuid(0)`, and the daemon takes the uid back after every call.
#[test]
fn effective_uid_is_reset_after_every_call() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut stack = Stack::start();
    let user = TempUser::create("py");
    let (uid, _) = user.ids();
    stack.module(
        "rooty.py",
        r#"
import os, json
import listener
name = "rooty"
description = "becomes root and forgets to switch back"
filter = "(objectClass=organizationalRole)"
_OUT = os.path.join(os.path.dirname(__file__), "rooty.calls")
def handler(dn, new, old):
    seen = [os.geteuid()]
    listener.setuid(0)
    seen.append(os.geteuid())
    with open(_OUT, "a") as out:
        out.write(json.dumps(seen) + "\n")
def postrun():
    listener.setuid(0)
"#,
    );
    let options = ListenerOptions::new()
        .args(["--user".to_owned(), user.name.clone()])
        .jsonl(false);
    let mut listener = Listener::start(
        &stack.slapd,
        &stack.notifier,
        options.module_dir(stack.modules.path()),
    )
    .unwrap();
    // The listener directory must be reachable for the user (like on UCS).
    fs::set_permissions(listener.dir(), fs::Permissions::from_mode(0o755)).unwrap();
    listener.restart().unwrap();
    wait_ready(&mut listener, &["rooty"]);
    each_processed(
        &mut stack,
        &mut listener,
        vec![
            add_role(dn("cn=root1"), "root1"),
            add_role(dn("cn=root2"), "root2"),
        ],
    );
    let calls = fs::read_to_string(stack.modules.path().join("rooty.calls")).unwrap();
    let calls: Vec<Vec<u32>> = calls
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(calls.len() >= 2, "{calls:?}");
    for seen in &calls {
        assert_eq!(seen, &[uid, 0], "every call starts with the daemon's uid");
    }
    let pid = listener.process().unwrap().pid().unwrap();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_owned();
    let ids: Vec<u32> = uids[4..]
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(
        ids[..2],
        [0, uid],
        "real 0, effective back to the user: {uids}"
    );
    listener.stop().unwrap();
}

/// The object-oriented API: create, modify (with the old DN after a move), remove.
#[test]
fn object_oriented_api_end_to_end() {
    let mut stack = Stack::start();
    stack.module(
        "oo.py",
        r#"
import os
from univention.listener import ListenerModuleHandler

_OUT = os.path.join(os.path.dirname(__file__), "oo.calls")

class Recorder(ListenerModuleHandler):
    class Configuration:
        name = "oo"
        description = "object-oriented recorder"
        ldap_filter = "(&(objectClass=organizationalRole)(cn=oo*))"

    def _write(self, line):
        with open(_OUT, "a") as out:
            out.write(line + "\n")

    def create(self, dn, new):
        self._write("create %s" % dn)

    def modify(self, dn, old, new, old_dn):
        self._write("modify %s old_dn=%s diff=%s" % (dn, old_dn, ",".join(sorted(self.diff(old, new)))))

    def remove(self, dn, old):
        self._write("remove %s" % dn)
"#,
    );
    let mut listener = stack.listener(ListenerOptions::new(), &["oo"]);
    let (first, renamed, moved) = (
        dn("cn=oo1"),
        dn("cn=oo2"),
        format!("cn=oo2,{}", dn("cn=oobox")),
    );
    each_processed(
        &mut stack,
        &mut listener,
        vec![
            add_role(first.clone(), "oo1"),
            replace(first.clone(), "description", "d"),
            modrdn(first.clone(), "cn=oo2", None),
            add_role(dn("cn=oobox"), "oobox"),
            modrdn(renamed.clone(), "cn=oo2", Some(dn("cn=oobox"))),
            delete(moved.clone()),
        ],
    );
    let calls = fs::read_to_string(stack.modules.path().join("oo.calls")).unwrap();
    assert_eq!(
        calls.lines().collect::<Vec<_>>(),
        [
            format!("create {first}"),
            format!("modify {first} old_dn=None diff=description"),
            format!("modify {renamed} old_dn={first} diff=cn"),
            format!("create {}", dn("cn=oobox")),
            format!("modify {moved} old_dn={renamed} diff="),
            format!("remove {moved}"),
        ]
    );
    listener.stop().unwrap();
}

/// Every module in `modules/examples/` loads and does what its documentation says.
#[test]
fn example_modules_work() {
    let mut stack = Stack::start();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../modules/examples");
    for entry in fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "py") {
            fs::copy(&path, stack.modules.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let out = stack.modules.path().to_owned();
    let file = |name: &str| out.join(format!("{name}.out"));
    let mut ucr = format!(
        "ldap/base: {BASE}\nlistener/module/refcheck/port: {}\n",
        stack.slapd.port()
    );
    for name in ["simple", "modrdn", "printusers", "refcheck", "user_journal"] {
        ucr.push_str(&format!(
            "listener/module/{name}/file: {}\n",
            file(name).display()
        ));
    }
    let mut listener = stack.listener(
        ListenerOptions::new().bind_admin().ucr(ucr),
        &["simple", "modrdn", "printusers", "refcheck", "user_journal"],
    );

    let user = dn("uid=jdoe");
    let box_dn = dn("cn=people");
    let moved = format!("uid=jdoe,{box_dn}");
    let group = dn("cn=staff");
    let writes: Vec<Write> = vec![
        {
            let user = user.clone();
            Box::new(move |d: &mut Directory| {
                d.add(
                    &user,
                    &[
                        ("objectClass", &["inetOrgPerson"]),
                        ("uid", &["jdoe"]),
                        ("cn", &["John Doe"]),
                        ("sn", &["Doe"]),
                    ],
                )
                .unwrap()
            })
        },
        replace(user.clone(), "cn", "John Doe-Smith"),
        {
            let (group, user) = (group.clone(), user.clone());
            Box::new(move |d: &mut Directory| {
                d.add(
                    &group,
                    &[
                        ("objectClass", &["groupOfUniqueNames"]),
                        ("cn", &["staff"]),
                        ("uniqueMember", &[user.as_str()]),
                    ],
                )
                .unwrap()
            })
        },
        replace(group.clone(), "uniqueMember", "uid=ghost,dc=nowhere"),
        add_role(box_dn.clone(), "people"),
        modrdn(user.clone(), "uid=jdoe", Some(box_dn.clone())),
        delete(moved.clone()),
    ];
    each_processed(&mut stack, &mut listener, writes);
    listener.stop().unwrap();

    let read = |name: &str| fs::read_to_string(file(name)).unwrap_or_default();
    // After a move the listener passes a final `m` when the entry differs (at least its
    // entryCSN does); the legacy examples report it as a modification.
    let simple = read("simple");
    let simple: Vec<&str> = simple.lines().collect();
    assert_eq!(simple.len(), 6, "{simple:?}");
    assert_eq!(simple[0], format!("add {user}"));
    assert!(simple[1].starts_with(&format!("modify {user} ")) && simple[1].contains("cn"));
    assert_eq!(simple[2..3], [format!("remove {user}")]);
    assert_eq!(simple[3], format!("add {moved}"));
    assert!(simple[4].starts_with(&format!("modify {moved} entryCSN")));
    assert_eq!(simple[5], format!("remove {moved}"));
    assert_eq!(
        read("modrdn"),
        format!(
            "add {user}\nmodify {user}\nmove {user} -> {moved}\nmodify {moved}\nremove {moved}\n"
        )
    );
    let printusers = read("printusers");
    assert!(
        printusers.starts_with("Name: \"John Doe\"\nUser: \"jdoe\"\nUID: \"None\"\nadded\n"),
        "{printusers}"
    );
    assert!(printusers.contains("edited. Is now:\n"), "{printusers}");
    assert!(printusers.ends_with("removed\n"), "{printusers}");
    assert_eq!(read("refcheck"), format!("Now invalid: {group}\n"));
    assert_eq!(
        read("user_journal"),
        format!(
            "created jdoe {user}\nmodified jdoe cn\nmoved jdoe {user} -> {moved}\nremoved jdoe {moved}\n"
        )
    );
}

/// A handler that never returns does not keep the listener from stopping: after
/// `--stop-timeout` it exits, naming the module, and the transaction is processed again at
/// the next start.
#[test]
fn a_blocking_handler_does_not_block_stopping() {
    let mut stack = Stack::start();
    let blocker = r#"
import os, time
name = "blocker"
description = "blocks on one object"
filter = "(objectClass=organizationalRole)"
_DIR = os.path.dirname(__file__)
def handler(dn, new, old):
    with open(os.path.join(_DIR, "blocker.calls"), "a") as out:
        out.write(dn + "\n")
    if dn.startswith("cn=block") and os.path.exists(os.path.join(_DIR, "block")):
        time.sleep(3600)
"#;
    stack.module("blocker.py", blocker);
    fs::write(stack.modules.path().join("block"), "").unwrap();
    let mut listener = stack.listener(
        ListenerOptions::new().args(["--stop-timeout", "2"]),
        &["blocker"],
    );
    let target = dn("cn=block");
    let before = listener.notifier_id().unwrap();
    stack.admin.add_role(&target, "block").unwrap();
    let calls = stack.modules.path().join("blocker.calls");
    wait_until("the blocking call", T, || {
        Ok(fs::read_to_string(&calls)
            .unwrap_or_default()
            .contains(&target)
            .then_some(()))
    })
    .unwrap();
    let status = listener.stop().unwrap();
    assert_eq!(status.code(), Some(1), "{}", listener.log());
    let log = listener.log();
    assert!(
        log.contains(&format!("module blocker has been in handler for {target}")),
        "{log}"
    );
    assert_eq!(
        listener.notifier_id(),
        Some(before),
        "the blocked transaction is not done"
    );

    fs::remove_file(stack.modules.path().join("block")).unwrap();
    listener.restart().unwrap();
    let last = stack.settle(&mut listener);
    assert!(last > before);
    let seen = fs::read_to_string(&calls).unwrap();
    assert_eq!(
        seen.lines().filter(|l| *l == target).count(),
        2,
        "processed again after the restart: {seen}"
    );
    listener.stop().unwrap();
}

/// A mistyped `-m` path stops the listener at start with a message that names it, instead
/// of a Python import traceback and a listener running without the module.
#[test]
fn a_missing_module_directory_stops_the_start() {
    let slapd = Slapd::provider().unwrap();
    let notifier = Notifier::start(&slapd, Intake::QueueFile, &[]).unwrap();
    let modules = tempfile::tempdir().unwrap();
    let missing = modules.path().join("no-such-dir");
    let mut listener = Listener::prepare(
        &slapd,
        &notifier,
        ListenerOptions::new().module_dir(&missing),
    )
    .unwrap();
    let (status, log) = listener.run_once(&[], T).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "module directory {} does not exist",
            missing.display()
        )),
        "{log}"
    );
    assert!(!log.contains("Traceback"), "{log}");
}

/// What the cache holds, as `univention-directory-listener-dump` prints it (listener
/// stopped).
fn dump_cache(listener: &Listener) -> String {
    let output = std::process::Command::new(
        integration_tests::process::binary("univention-directory-listener-dump").unwrap(),
    )
    .arg("-c")
    .arg(listener.cache_dir())
    .output()
    .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// `sys.exit(1)` in a handler (UCS's `replication` module does it with
/// `ldap/replication/fallback=restart`) stops the listener with status 1 and without
/// committing the transaction: neither the cache, nor the id, nor a later module has it,
/// and the log calls it a requested exit, not a failure. After the restart the transaction
/// is delivered. `sys.exit` in `initialize` stops the start the same way, and the module is
/// initialised at the next start.
#[test]
fn system_exit_stops_without_committing_and_the_restart_redoes_it() {
    let mut stack = Stack::start();
    // Priority 10: called before the jsonl module (50), which must not see the change.
    stack.module(
        "leaver.py",
        r#"
import os, sys
name = "leaver"
description = "asks for a restart once per marker"
filter = "(objectClass=organizationalRole)"
priority = 10.0
_DIR = os.path.dirname(__file__)

def _once(what):
    marker = os.path.join(_DIR, what + ".done")
    if not os.path.exists(marker):
        open(marker, "w").close()
        sys.exit(1)

def initialize():
    _once("initialize")

def handler(dn, new, old):
    if dn.startswith("cn=leave"):
        _once("handler")
    with open(os.path.join(_DIR, "leaver.calls"), "a") as out:
        out.write(dn + "\n")
"#,
    );
    let options = ListenerOptions::new().module_dir(stack.modules.path());
    let mut listener = Listener::start(&stack.slapd, &stack.notifier, options).unwrap();
    let status = listener.wait_exit(T).unwrap();
    assert_eq!(status.code(), Some(1), "{}", listener.log());
    let log = listener.log();
    assert!(
        log.contains("leaver: initialize requested the listener to exit with status 1"),
        "{log}"
    );
    assert!(
        !log.contains("initialization of module leaver failed"),
        "{log}"
    );
    assert_ne!(listener.handler_state("leaver"), Some(3));

    listener.restart().unwrap();
    listener.wait_initialized(T).unwrap();
    wait_ready(&mut listener, &["leaver"]);
    let before = dn("cn=before");
    each_processed(
        &mut stack,
        &mut listener,
        vec![add_role(before.clone(), "before")],
    );
    let committed = listener.notifier_id().unwrap();
    let jsonl_before = listener.changes().unwrap().len();

    let target = dn("cn=leave");
    stack.admin.add_role(&target, "leave").unwrap();
    let status = listener.wait_exit(T).unwrap();
    assert_eq!(status.code(), Some(1), "{}", listener.log());
    let log = listener.log();
    let request = format!("leaver: handler {target} requested the listener to exit with status 1");
    assert!(log.contains(&request), "{log}");
    assert!(log.contains("SystemExit(1) at "), "{log}");
    assert!(!log.contains("(failed)"), "{log}");
    assert_eq!(listener.notifier_id(), Some(committed), "id not committed");
    assert_eq!(
        listener.changes().unwrap().len(),
        jsonl_before,
        "no later module saw the transaction"
    );
    let cached = dump_cache(&listener);
    assert!(cached.contains(&format!("dn: {before}\n")), "{cached}");
    assert!(!cached.contains(&format!("dn: {target}\n")), "{cached}");
    let (code, status) = ctrl_status(&stack, &listener);
    assert_eq!(code, Some(1), "{status}");
    assert!(
        status.contains(&format!(
            "not running, stopped: module leaver asked the listener to exit in handler \
             {target} with status 1 (SystemExit(1) at "
        )),
        "{status}"
    );

    listener.restart().unwrap();
    let last = stack.settle(&mut listener);
    assert!(last > committed);
    let delivered: Vec<String> = listener
        .changes()
        .unwrap()
        .iter()
        .skip(jsonl_before)
        .map(Change::summary)
        .collect();
    assert_eq!(delivered, [format!("a {target}")]);
    let calls = fs::read_to_string(stack.modules.path().join("leaver.calls")).unwrap();
    assert_eq!(calls, format!("{before}\n{target}\n"));
    let (_, status) = ctrl_status(&stack, &listener);
    assert!(!status.contains("stopped: module"), "{status}");
    listener.stop().unwrap();
    assert!(dump_cache(&listener).contains(&format!("dn: {target}\n")));
}

/// `univention-directory-listener-ctrl status` for this listener: exit code and output.
fn ctrl_status(stack: &Stack, listener: &Listener) -> (Option<i32>, String) {
    let output = std::process::Command::new(
        integration_tests::process::binary("univention-directory-listener-ctrl").unwrap(),
    )
    .arg("-c")
    .arg(listener.cache_dir())
    .arg("--failed-ldif")
    .arg(listener.failed_ldif_path())
    .args(["--notifier-host", "127.0.0.1", "--notifier-port"])
    .arg(stack.notifier.port().to_string())
    .arg("--ucr-file")
    .arg(listener.ucr_file())
    .arg("status")
    .env("NO_COLOR", "1")
    .output()
    .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// The `failed.ldif` replay-and-move sequence with a module that, like UCS's
/// `replication`, switches to writing changes into `failed.ldif` when its target fails and
/// keeps that writer open: the listener pauses, the operator replays the file and moves it
/// away, and on resume every module is loaded afresh (import, `setdata`, `prerun`), so the
/// redone transaction and every later one reach the target again, and nothing more is
/// appended to the moved-away file.
#[test]
fn resuming_after_failed_ldif_starts_modules_afresh() {
    let mut stack = Stack::start();
    let options = ListenerOptions::new().module_dir(stack.modules.path());
    let mut listener = Listener::prepare(&stack.slapd, &stack.notifier, options).unwrap();
    let failed = listener.failed_ldif_path();
    stack.module(
        "ldifwriter.py",
        &r#"
import os
name = "ldifwriter"
description = "writes to its target, or to failed.ldif once the target is down"
filter = "(objectClass=organizationalRole)"
_DIR = os.path.dirname(__file__)
_FAILED = FAILED_LDIF_PATH
_ldif = None

def _log(line):
    with open(os.path.join(_DIR, "ldifwriter.calls"), "a") as out:
        out.write(line + "\n")

def setdata(key, value):
    if key == "basedn":
        _log("setdata")

def prerun():
    _log("prerun")

def handler(dn, new, old):
    global _ldif
    if _ldif is None and os.path.exists(os.path.join(_DIR, "target-down")):
        _ldif = open(_FAILED, "a")
    if _ldif is not None:
        _ldif.write("dn: %s\nchangetype: add\n\n" % dn)
        _ldif.flush()
        return
    with open(os.path.join(_DIR, "target"), "a") as out:
        out.write(dn + "\n")
"#
        .replace(
            "FAILED_LDIF_PATH",
            &format!("{:?}", failed.display().to_string()),
        ),
    );
    listener.restart().unwrap();
    listener.wait_initialized(T).unwrap();
    wait_ready(&mut listener, &["ldifwriter"]);
    let modules = stack.modules.path().to_owned();
    let read = |file: &str| fs::read_to_string(modules.join(file)).unwrap_or_default();

    let one = dn("cn=one");
    each_processed(
        &mut stack,
        &mut listener,
        vec![add_role(one.clone(), "one")],
    );
    let committed = listener.notifier_id().unwrap();

    fs::write(stack.modules.path().join("target-down"), "").unwrap();
    let two = dn("cn=two");
    stack.admin.add_role(&two, "two").unwrap();
    listener
        .wait_until("the listener to pause on failed.ldif", T, |l| {
            Ok(l.log().contains("replication stopped").then_some(()))
        })
        .unwrap();
    assert_eq!(listener.notifier_id(), Some(committed));
    assert_eq!(
        fs::read_to_string(&failed).unwrap(),
        format!("dn: {two}\nchangetype: add\n\n")
    );

    // The operator repairs the target, replays the file and moves it away.
    fs::remove_file(stack.modules.path().join("target-down")).unwrap();
    let replayed = failed.with_extension("ldif.replayed");
    fs::rename(&failed, &replayed).unwrap();
    let three = dn("cn=three");
    each_processed(
        &mut stack,
        &mut listener,
        vec![add_role(three.clone(), "three")],
    );

    assert_eq!(read("target"), format!("{one}\n{two}\n{three}\n"));
    assert_eq!(
        fs::read_to_string(&replayed).unwrap(),
        format!("dn: {two}\nchangetype: add\n\n"),
        "nothing more goes to the moved-away file"
    );
    assert!(!failed.exists());
    let calls = read("ldifwriter.calls");
    let lines: Vec<&str> = calls.lines().collect();
    // Started, then loaded afresh on resume: setdata, and prerun before the next handler.
    assert_eq!(
        lines.iter().filter(|l| **l == "setdata").count(),
        2,
        "{calls}"
    );
    assert_eq!(lines.last(), Some(&"prerun"), "{calls}");
    assert!(listener.log().contains("reloading every module"));
    listener.stop().unwrap();
}

/// `univention.debug` levels per category as in UCS's listener: LISTENER and LDAP follow
/// `-d` and SIGUSR1/SIGUSR2, the other categories start at WARN, `set_level` overrides a
/// category; messages above their category's level are dropped.
#[test]
fn debug_levels_follow_the_daemon() {
    let mut stack = Stack::start();
    stack.module(
        "levels.py",
        r#"
import os
import univention.debug as ud
name = "levels"
description = "reports debug levels"
filter = "(objectClass=organizationalRole)"
def handler(dn, new, old):
    if not new:
        return
    if dn.startswith("cn=set"):
        ud.set_level(ud.ADMIN, ud.ALL)
    levels = (ud.get_level(ud.LISTENER), ud.get_level(ud.LDAP), ud.get_level(ud.ADMIN))
    with open(os.path.join(os.path.dirname(__file__), "levels.out"), "a") as out:
        out.write("%s %r\n" % (dn.split(",")[0], levels))
    ud.debug(ud.LISTENER, ud.INFO, "listener info for " + dn)
    ud.debug(ud.ADMIN, ud.PROCESS, "admin process for " + dn)
"#,
    );
    let mut listener = stack.listener(ListenerOptions::new().args(["-d", "2"]), &["levels"]);
    each_processed(
        &mut stack,
        &mut listener,
        vec![add_role(dn("cn=two"), "two")],
    );
    listener.signal(libc::SIGUSR1).unwrap();
    listener
        .wait_until("the level change", T, |l| {
            Ok(l.log().contains("debug level is now 3").then_some(()))
        })
        .unwrap();
    each_processed(
        &mut stack,
        &mut listener,
        vec![
            add_role(dn("cn=three"), "three"),
            add_role(dn("cn=set"), "set"),
        ],
    );
    assert_eq!(
        fs::read_to_string(stack.modules.path().join("levels.out")).unwrap(),
        "cn=two (2, 2, 1)\ncn=three (3, 3, 1)\ncn=set (3, 3, 4)\n"
    );
    let log = listener.log();
    assert!(
        !log.contains(&format!("listener info for {}", dn("cn=two"))),
        "{log}"
    );
    assert!(
        log.contains(&format!("listener info for {}", dn("cn=three"))),
        "{log}"
    );
    assert!(
        !log.contains(&format!("admin process for {}", dn("cn=three"))),
        "{log}"
    );
    assert!(
        log.contains(&format!("admin process for {}", dn("cn=set"))),
        "{log}"
    );
    listener.stop().unwrap();
}
