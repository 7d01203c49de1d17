//! The Python host on its own: loading module files, the legacy calling convention, the
//! built-in `listener` module and the compatibility packages (spec listener.md §4). The
//! listener's end-to-end tests cover the same modules against a real slapd.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use modules::python::{HostOptions, PythonError, PythonHost, PythonModule};
use modules::{Call, Command, Module, ModuleSource};

/// One interpreter per process: every test uses the same options (a UCR file of its own).
fn host() -> PythonHost {
    static UCR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = UCR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("base.conf"),
            "# test\nldap/base: dc=example,dc=com\nfeature/on: yes\nfeature/off: Disabled\n\
             listener/module/deactivated_oo/deactivate: true\n",
        )
        .unwrap();
        dir
    });
    PythonHost::start(HostOptions {
        // SAFETY: geteuid cannot fail.
        daemon_uid: unsafe { libc::geteuid() },
        ucr_file: Some(dir.path().join("base.conf")),
    })
    .unwrap()
}

fn write_module(dir: &Path, file: &str, source: &str) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, source).unwrap();
    path
}

fn load(dir: &Path, file: &str, source: &str) -> Result<PythonModule, PythonError> {
    let path = write_module(dir, file, source);
    PythonModule::load(&host(), &path)
}

type Attrs = Vec<(String, Vec<Vec<u8>>)>;

fn attrs(pairs: &[(&str, &[&[u8]])]) -> Attrs {
    pairs
        .iter()
        .map(|(name, values)| {
            (
                name.to_string(),
                values.iter().map(|v| v.to_vec()).collect(),
            )
        })
        .collect()
}

fn call<'a>(dn: &'a str, command: Command, new: &'a Attrs, old: &'a Attrs) -> Call<'a> {
    Call {
        id: 1,
        dn,
        command,
        new,
        old,
        transaction: 1,
        number: 1,
    }
}

/// A module that appends `repr((function, args…))` lines to `log`.
fn recorder(log: &Path, extra: &str) -> String {
    format!(
        r#"
name = "recorder"
description = "records every call"
filter = "(objectClass=person)"
attributes = ["cn", "sn"]
{extra}
LOG = {log:?}

def _write(*args):
    with open(LOG, "a") as f:
        f.write(repr(args) + "\n")

def handler(dn, new, old, *command):
    _write("handler", dn, new, old, *command)

def initialize():
    _write("initialize")

def clean():
    _write("clean")

def prerun():
    _write("prerun")

def postrun():
    _write("postrun")

def setdata(key, value):
    _write("setdata", key, value)
"#
    )
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn declarations_are_read_like_ucs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls");
    let module = load(
        dir.path(),
        "rec.py",
        &recorder(&log, "handle_every_delete = 1\npriority = 7"),
    )
    .unwrap();
    let info = module.info();
    assert_eq!(info.name, "recorder");
    assert_eq!(info.description, "records every call");
    assert_eq!(info.filter.as_deref(), Some("(objectClass=person)"));
    assert_eq!(info.attributes, ["cn", "sn"]);
    assert!(info.handle_every_delete);
    assert_eq!(info.priority, 7.0);
    assert_eq!(info.source, ModuleSource::File(dir.path().join("rec.py")));

    // Defaults: file stem as name, no filter, tuple attributes ignored, priority 50 (0 for
    // replication).
    let plain = load(
        dir.path(),
        "plain.py",
        "description = 'd'\nattributes = ('cn',)\ndef handler(dn, new, old): pass\n",
    )
    .unwrap();
    assert_eq!(plain.info().name, "plain");
    assert_eq!(plain.info().filter, None);
    assert!(plain.info().attributes.is_empty());
    assert!(!plain.info().handle_every_delete);
    assert_eq!(plain.info().priority, 50.0);
    let replication = load(
        dir.path(),
        "replication.py",
        "description = 'd'\ndef handler(dn, new, old): pass\n",
    )
    .unwrap();
    assert_eq!(replication.info().priority, 0.0);
}

#[test]
fn broken_modules_are_reported_with_their_file() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "syntax.py",
            "description = 'd'\ndef handler(dn, new, old)\n",
            "SyntaxError",
        ),
        (
            "imports.py",
            "import no_such_module_here\n",
            "No module named 'no_such_module_here'",
        ),
        (
            "nohandler.py",
            "description = 'd'\n",
            "no `handler` function",
        ),
        (
            "nodesc.py",
            "def handler(dn, new, old): pass\n",
            "no `description`",
        ),
        (
            "badname.py",
            "name = '../x'\ndescription = 'd'\ndef handler(dn, new, old): pass\n",
            "state file",
        ),
        (
            "badfilter.py",
            "description = 'd'\nfilter = 5\ndef handler(dn, new, old): pass\n",
            "`filter` must be a string",
        ),
    ];
    for (file, source, expected) in cases {
        let error = load(dir.path(), file, source).err().unwrap().to_string();
        let path = dir.path().join(file);
        assert!(
            error.starts_with(&format!("import of filename={} failed", path.display())),
            "{error}"
        );
        assert!(error.contains(expected), "{file}: {error}");
    }
    // A failed import leaves nothing behind: the same file loads once fixed.
    let fixed = load(
        dir.path(),
        "syntax.py",
        "description = 'd'\ndef handler(dn, new, old): pass\n",
    );
    assert!(fixed.is_ok());
}

#[test]
fn handler_gets_str_dn_bytes_values_and_the_command_with_modrdn() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls");
    let mut with_modrdn = load(dir.path(), "a.py", &recorder(&log, "modrdn = '0'")).unwrap();
    let new = attrs(&[
        ("cn", &[b"J\xc3\xbcrgen"]),
        ("jpegPhoto", &[b"\x00\xff\xfe"]),
    ]);
    let old: Attrs = Vec::new();
    with_modrdn
        .handler(&call("cn=J\\C3\\BCrgen,dc=x", Command::Add, &new, &old))
        .unwrap();
    let log2 = dir.path().join("calls2");
    let mut without = load(dir.path(), "b.py", &recorder(&log2, "")).unwrap();
    without
        .handler(&call("cn=a,dc=x", Command::Delete, &old, &new))
        .unwrap();
    assert_eq!(
        lines(&log),
        [
            r#"('handler', 'cn=J\\C3\\BCrgen,dc=x', {'cn': [b'J\xc3\xbcrgen'], 'jpegPhoto': [b'\x00\xff\xfe']}, {}, 'a')"#
        ]
    );
    assert_eq!(
        lines(&log2),
        [
            r#"('handler', 'cn=a,dc=x', {}, {'cn': [b'J\xc3\xbcrgen'], 'jpegPhoto': [b'\x00\xff\xfe']})"#
        ]
    );
}

#[test]
fn only_none_is_success() {
    let dir = tempfile::tempdir().unwrap();
    let mut module = load(
        dir.path(),
        "ret.py",
        r#"
description = "d"
def handler(dn, new, old):
    if dn == "raise":
        raise ValueError("handler failure test")
    if dn == "false":
        return False
    if dn == "zero":
        return 0
def prerun():
    return 1
"#,
    )
    .unwrap();
    let empty: Attrs = Vec::new();
    assert!(
        module
            .handler(&call("ok", Command::Modify, &empty, &empty))
            .is_ok()
    );
    let error = module
        .handler(&call("raise", Command::Modify, &empty, &empty))
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("Traceback (most recent call last):"),
        "{error}"
    );
    assert!(error.contains("ret.py\", line 5, in handler"), "{error}");
    assert!(
        error.ends_with("ValueError: handler failure test"),
        "{error}"
    );
    for (dn, shown) in [("false", "False"), ("zero", "0")] {
        let error = module
            .handler(&call(dn, Command::Modify, &empty, &empty))
            .unwrap_err()
            .to_string();
        assert_eq!(error, format!("returned {shown} instead of None"));
    }
    assert_eq!(
        module.prerun().unwrap_err().to_string(),
        "returned 1 instead of None"
    );
    // Missing optional functions succeed.
    assert!(module.postrun().is_ok() && module.clean().is_ok() && module.initialize().is_ok());
    assert!(module.setdata("basedn", "dc=x").is_ok());
}

#[test]
fn lifecycle_calls_reach_the_module() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls");
    let mut module = load(dir.path(), "rec.py", &recorder(&log, "")).unwrap();
    module.setdata("basedn", "dc=example,dc=com").unwrap();
    module.clean().unwrap();
    module.initialize().unwrap();
    module.prerun().unwrap();
    module.postrun().unwrap();
    assert_eq!(
        lines(&log),
        [
            "('setdata', 'basedn', 'dc=example,dc=com')",
            "('clean',)",
            "('initialize',)",
            "('prerun',)",
            "('postrun',)",
        ]
    );
}

#[test]
fn globals_do_not_collide_and_reload_reexecutes() {
    let dir = tempfile::tempdir().unwrap();
    let source = |value: &str| {
        format!(
            "import sys\ndescription = 'd'\nSTATE = {value:?}\n\
             def handler(dn, new, old):\n    \
             assert sys.modules[__name__].STATE == {value:?}\n    \
             if __file__ != {:?}: raise RuntimeError(__file__)\n",
            dir.path().join(format!("{value}.py"))
        )
    };
    // `-O` like UCS: the assert would fail for `b` if the modules shared globals, but asserts
    // are off, so the explicit __file__ check is what proves separation.
    let mut a = load(dir.path(), "a.py", &source("a")).unwrap();
    let mut b = load(dir.path(), "b.py", &source("b")).unwrap();
    let empty: Attrs = Vec::new();
    a.handler(&call("x", Command::Add, &empty, &empty)).unwrap();
    b.handler(&call("x", Command::Add, &empty, &empty)).unwrap();
    drop(a);
    let mut again = load(dir.path(), "a.py", &source("a")).unwrap();
    again
        .handler(&call("x", Command::Add, &empty, &empty))
        .unwrap();

    let mut optimized = load(
        dir.path(),
        "opt.py",
        "import sys\ndescription = 'd'\ndef handler(dn, new, old):\n    assert False\n    \
         if sys.flags.optimize != 1: raise RuntimeError('not -O')\n",
    )
    .unwrap();
    optimized
        .handler(&call("x", Command::Add, &empty, &empty))
        .unwrap();
}

#[test]
fn listener_module_config_registry_and_debug() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut module = load(
        dir.path(),
        "ucr.py",
        &format!(
            r#"
import listener
import univention.debug as ud
import univention.config_registry
description = "d"
def handler(dn, new, old):
    ucr = univention.config_registry.ConfigRegistry()
    ucr.load()
    ud.debug(ud.LISTENER, ud.PROCESS, "debug from a module")
    print("printed by a module")
    with open({out:?}, "w") as f:
        f.write(repr((
            listener.configRegistry["ldap/base"],
            listener.baseConfig.get("ldap/base"),
            listener.configRegistry.get("missing", "default"),
            listener.configRegistry["missing"],
            listener.configRegistry.is_true("feature/on"),
            listener.configRegistry.is_false("feature/off"),
            listener.configRegistry.is_true("missing", True),
            ucr["ldap/base"],
            "feature/on" in ucr,
            ud.ERROR, ud.WARN, ud.PROCESS, ud.INFO, ud.ALL, ud.LISTENER,
        )))
"#
        ),
    )
    .unwrap();
    let empty: Attrs = Vec::new();
    module
        .handler(&call("x", Command::Add, &empty, &empty))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "('dc=example,dc=com', 'dc=example,dc=com', 'default', None, True, True, True, \
         'dc=example,dc=com', True, 0, 1, 2, 3, 4, 8)"
    );
}

#[test]
fn python_ldap_is_importable() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut module = load(
        dir.path(),
        "ldapmod.py",
        &format!(
            "import ldap, ldap.dn\ndescription = 'd'\n\
             def handler(dn, new, old):\n    \
             open({out:?}, 'w').write(repr(ldap.dn.str2dn(dn)))\n"
        ),
    )
    .unwrap();
    let empty: Attrs = Vec::new();
    module
        .handler(&call("cn=a,dc=x", Command::Add, &empty, &empty))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "[[('cn', 'a', 1)], [('dc', 'x', 1)]]"
    );
}

#[test]
fn object_oriented_api_maps_calls() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls");
    let source = format!(
        r#"
from univention.listener import ListenerModuleHandler

LOG = {log:?}

def _write(*args):
    with open(LOG, "a") as f:
        f.write(repr(args) + "\n")

class Recorder(ListenerModuleHandler):
    class Configuration:
        name = "oo_recorder"
        description = "object-oriented recorder"
        ldap_filter = "(objectClass=person)"
        attributes = ["sn"]
        priority = 20

    def initialize(self):
        _write("initialize")

    def clean(self):
        _write("clean")

    def pre_run(self):
        _write("pre_run")

    def post_run(self):
        _write("post_run")

    def create(self, dn, new):
        _write("create", dn, sorted(new))

    def modify(self, dn, old, new, old_dn):
        _write("modify", dn, old_dn, sorted(self.diff(old, new)))

    def remove(self, dn, old):
        _write("remove", dn)
        if dn.startswith("cn=fail"):
            raise RuntimeError("remove failed")
"#
    );
    let mut module = load(dir.path(), "oo.py", &source).unwrap();
    let info = module.info().clone();
    assert_eq!(info.name, "oo_recorder");
    assert_eq!(info.filter.as_deref(), Some("(objectClass=person)"));
    assert_eq!(info.attributes, ["sn"]);
    assert_eq!(info.priority, 20.0);

    let a = attrs(&[("cn", &[b"a"]), ("sn", &[b"1"]), ("entryCSN", &[b"x"])]);
    let a2 = attrs(&[("cn", &[b"a"]), ("sn", &[b"2"]), ("entryCSN", &[b"y"])]);
    let moved_meta_only = attrs(&[("cn", &[b"a"]), ("sn", &[b"2"]), ("entryCSN", &[b"z"])]);
    let empty: Attrs = Vec::new();
    module.setdata("basedn", "dc=x").unwrap();
    module.clean().unwrap();
    module.initialize().unwrap();
    module.prerun().unwrap();
    module
        .handler(&call("cn=a,dc=x", Command::Init, &a, &empty))
        .unwrap();
    module
        .handler(&call("cn=a,dc=x", Command::Modify, &a2, &a))
        .unwrap();
    // A move: `r` is remembered, the `a` reports a modify with the old DN, the metadata-only
    // `m` after it is swallowed.
    module
        .handler(&call("cn=a,dc=x", Command::ModRdn, &empty, &a2))
        .unwrap();
    module
        .handler(&call("cn=a,ou=y,dc=x", Command::Add, &a2, &empty))
        .unwrap();
    module
        .handler(&call(
            "cn=a,ou=y,dc=x",
            Command::Modify,
            &moved_meta_only,
            &a2,
        ))
        .unwrap();
    // A second pure move right after: reported, although nothing but the DN changed (the
    // listener sent no follow-up modify this time, e.g. skipped by `attributes`).
    module
        .handler(&call("cn=a,ou=y,dc=x", Command::ModRdn, &empty, &a2))
        .unwrap();
    module
        .handler(&call("cn=a,ou=z,dc=x", Command::Add, &a2, &empty))
        .unwrap();
    module
        .handler(&call("cn=a,ou=z,dc=x", Command::ModRdn, &empty, &a2))
        .unwrap();
    module
        .handler(&call("cn=a,ou=y,dc=x", Command::Add, &a2, &empty))
        .unwrap();
    module
        .handler(&call("cn=a,ou=y,dc=x", Command::Delete, &empty, &a2))
        .unwrap();
    let error = module
        .handler(&call("cn=fail,dc=x", Command::Delete, &empty, &a2))
        .unwrap_err()
        .to_string();
    assert!(error.ends_with("RuntimeError: remove failed"), "{error}");
    module.postrun().unwrap();
    assert_eq!(
        lines(&log),
        [
            "('clean',)",
            "('initialize',)",
            "('pre_run',)",
            "('create', 'cn=a,dc=x', ['cn', 'entryCSN', 'sn'])",
            "('modify', 'cn=a,dc=x', None, ['sn'])",
            "('modify', 'cn=a,ou=y,dc=x', 'cn=a,dc=x', [])",
            "('modify', 'cn=a,ou=z,dc=x', 'cn=a,ou=y,dc=x', [])",
            "('modify', 'cn=a,ou=y,dc=x', 'cn=a,ou=z,dc=x', [])",
            "('remove', 'cn=a,ou=y,dc=x')",
            "('remove', 'cn=fail,dc=x')",
            "('post_run',)",
        ]
    );

    // Deactivation through UCR replaces the filter.
    let deactivated = load(
        dir.path(),
        "deact.py",
        r#"
from univention.listener import ListenerModuleHandler
class Off(ListenerModuleHandler):
    class Configuration:
        name = "deactivated_oo"
        description = "d"
        ldap_filter = "(objectClass=person)"
"#,
    )
    .unwrap();
    assert_eq!(
        deactivated.info().filter.as_deref(),
        Some("(objectClass=listenerModuleDeactivated)")
    );
}

#[test]
fn setuid_helpers_switch_the_effective_uid() {
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut module = load(
        dir.path(),
        "uid.py",
        &format!(
            r#"
import os, listener
description = "d"
def handler(dn, new, old):
    seen = []
    listener.setuid(65534)
    seen.append(os.geteuid())
    with listener.SetUID(0):
        seen.append(os.geteuid())
    seen.append(os.geteuid())
    listener.unsetuid()
    seen.append(os.geteuid())
    @listener.SetUID(65534)
    def as_nobody():
        return os.geteuid()
    seen.append(as_nobody())
    seen.append(listener.run("/bin/sh", ["sh", "-c", "exit 3"]))
    seen.append(listener.run("/nonexistent", ["x"]))
    with open({out:?}, "w") as f:
        f.write(repr(seen))
"#
        ),
    )
    .unwrap();
    let empty: Attrs = Vec::new();
    module
        .handler(&call("x", Command::Add, &empty, &empty))
        .unwrap();
    // Leaving SetUID and unsetuid() return to the daemon's uid (0 here); a program that cannot
    // be executed exits 127 in the child.
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "[65534, 0, 0, 0, 65534, 3, 127]"
    );
}

/// `sys.exit()` in any call is a request to stop the listener, with Python's exit status
/// rules, and says where it was raised; other exceptions stay failures.
#[test]
fn system_exit_is_an_exit_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut module = load(
        dir.path(),
        "leaver.py",
        r#"
import sys
description = "d"
def handler(dn, new, old):
    if dn == "one":
        sys.exit(1)
    if dn == "none":
        sys.exit()
    if dn == "text":
        sys.exit("replication failed")
    if dn == "other":
        raise KeyError(dn)
def prerun():
    raise SystemExit(3)
def setdata(key, value):
    sys.exit(4)
"#,
    )
    .unwrap();
    let empty: Attrs = Vec::new();
    let exit = |module: &mut PythonModule, dn: &str| {
        module
            .handler(&call(dn, Command::Modify, &empty, &empty))
            .unwrap_err()
    };
    let one = exit(&mut module, "one");
    assert_eq!(one.requested_exit(), Some(1));
    assert!(
        one.to_string().starts_with(&format!(
            "SystemExit(1) at {}:",
            dir.path().join("leaver.py").display()
        )),
        "{one}"
    );
    assert_eq!(exit(&mut module, "none").requested_exit(), Some(0));
    let text = exit(&mut module, "text");
    assert_eq!(text.requested_exit(), Some(1));
    assert!(
        text.to_string()
            .starts_with("SystemExit('replication failed')"),
        "{text}"
    );
    assert_eq!(exit(&mut module, "other").requested_exit(), None);
    assert_eq!(module.prerun().unwrap_err().requested_exit(), Some(3));
    assert_eq!(
        module.setdata("basedn", "x").unwrap_err().requested_exit(),
        Some(4)
    );
}

/// A reload imports the file again before the old module is unloaded (SIGHUP, resuming
/// after `failed.ldif`): unloading the old one leaves the new one registered.
#[test]
fn unloading_an_old_import_keeps_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let source = "import sys\ndescription = 'd'\nVERSION = 'VALUE'\n\
                  def handler(dn, new, old):\n    \
                  if sys.modules[__name__].VERSION != 'VALUE': raise RuntimeError('stale')\n";
    let old = load(dir.path(), "twice.py", &source.replace("VALUE", "1")).unwrap();
    let mut new = load(dir.path(), "twice.py", &source.replace("VALUE", "2")).unwrap();
    drop(old);
    let empty: Attrs = Vec::new();
    new.handler(&call("x", Command::Add, &empty, &empty))
        .unwrap();
}
