//! The README says what is true: its ten-line module, taken from README.md as it is now,
//! runs in the real listener and writes exactly the output the README shows, and its
//! package list is the one `scripts/setup.sh` installs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use integration_tests::slapd::BASE;
use integration_tests::{Directory, Listener, ListenerOptions, Notifier, Slapd, wait_until};

const T: Duration = Duration::from_secs(30);
const MODULE_MARKER: &str = "<!-- README example module: hello.py";
const OUTPUT_MARKER: &str = "<!-- README example output: hello.log";

fn repo_file(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The body of the first ```` ```lang ```` block after the line holding `marker`.
fn fenced_block_after(text: &str, marker: &str, lang: &str) -> String {
    let start = text
        .find(marker)
        .unwrap_or_else(|| panic!("README.md has no {marker:?} line"));
    let mut lines = text[start..].lines().skip(1);
    let fence = format!("```{lang}");
    assert_eq!(
        lines.next().map(str::trim_end),
        Some(fence.as_str()),
        "{marker:?} must be directly followed by a {fence} block"
    );
    let body: Vec<&str> = lines.take_while(|line| !line.starts_with("```")).collect();
    body.join("\n") + "\n"
}

fn add_person(admin: &mut Directory, uid: &str) -> String {
    let dn = format!("uid={uid},{BASE}");
    admin
        .add(
            &dn,
            &[
                ("objectClass", &["inetOrgPerson"]),
                ("uid", &[uid]),
                ("cn", &[uid]),
                ("sn", &[uid]),
            ],
        )
        .unwrap();
    dn
}

#[test]
fn readme_module_writes_the_documented_output() {
    let readme = repo_file("README.md");
    let module = fenced_block_after(&readme, MODULE_MARKER, "python");
    let expected = fenced_block_after(&readme, OUTPUT_MARKER, "text");
    assert!(
        module.lines().filter(|l| !l.trim().is_empty()).count() <= 10,
        "the README promises a module in ten lines:\n{module}"
    );

    let slapd = Slapd::provider().unwrap();
    let mut admin = slapd.admin().unwrap();
    // There before the module's first load.
    add_person(&mut admin, "anna");
    let notifier = Notifier::following_accesslog(&slapd, &[], T).unwrap();

    let modules = tempfile::tempdir().unwrap();
    fs::write(modules.path().join("hello.py"), &module).unwrap();
    let output = modules.path().join("hello.log");
    let listener = Listener::start(
        &slapd,
        &notifier,
        ListenerOptions::new()
            .jsonl(false)
            .module_dir(modules.path())
            // How UCR reaches a module on a host without UCS: the --ucr-file.
            .ucr(format!(
                "ldap/base: {BASE}\nlistener/module/hello/file: {}\n",
                output.display()
            )),
    )
    .unwrap();

    // One write at a time, each after the listener passed the previous one on, as someone
    // trying the example would: a listener that is behind reads the object as it is by
    // then (the listener fetches the current state, not the logged one).
    let wait_lines = |count: usize| -> String {
        wait_until(&format!("{count} lines in hello.log"), T, || {
            let text = fs::read_to_string(&output).unwrap_or_default();
            Ok((text.lines().count() >= count).then_some(text))
        })
        .unwrap_or_else(|e| panic!("{e}\nlistener log:\n{}", listener.log_tail(40)))
    };
    wait_lines(1);
    let ben = add_person(&mut admin, "ben");
    wait_lines(2);
    admin.modrdn(&ben, "uid=benjamin", true, None).unwrap();
    wait_lines(5);
    admin.delete(&format!("uid=benjamin,{BASE}")).unwrap();
    let written = wait_lines(expected.lines().count());
    assert_eq!(written, expected);
}

#[test]
fn readme_lists_the_packages_setup_installs() {
    let setup = repo_file("scripts/setup.sh");
    let start = setup.find("packages=(").unwrap() + "packages=(".len();
    let end = start + setup[start..].find("\n)").unwrap();
    let installed: Vec<&str> = setup[start..end]
        .lines()
        .flat_map(|line| line.split('#').next().unwrap_or("").split_whitespace())
        .collect();

    let readme = repo_file("README.md");
    let intro = "installs the missing ones of these Debian";
    let at = readme
        .find(intro)
        .unwrap_or_else(|| panic!("README.md lacks {intro:?}"));
    let listed: Vec<&str> = readme[at..]
        .split('`')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(listed, installed, "README.md and scripts/setup.sh disagree");
}
