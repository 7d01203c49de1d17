//! Every shipped binary answers `--version` and `-V` (the daemons too, without clashing
//! with their UCS options), prints a man page that names it and its environment
//! variables, and shows those variables in `--help`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};

use integration_tests::process::binary;

/// (binary, man section, environment variables it reads for its options)
const BINARIES: &[(&str, &str, &[&str])] = &[
    ("univention-directory-notifier", "8", &["UDN_LDAP_DIR"]),
    (
        "univention-translog",
        "1",
        &["UDN_LDAP_DIR", "UDN_TRANSLOG_FILE", "UDN_TRANSLOG_URI"],
    ),
    ("univention-directory-listener", "8", &["UDL_CACHE_DIR"]),
    (
        "univention-directory-listener-dump",
        "1",
        &["UDL_CACHE_DIR"],
    ),
    (
        "univention-directory-listener-verify",
        "1",
        &["UDL_CACHE_DIR", "UDL_LDAP_URI"],
    ),
    (
        "univention-directory-listener-ctrl",
        "1",
        &["UDL_CACHE_DIR"],
    ),
    ("get_notifier_id", "1", &[]),
    (
        "univention-directory-backup2master",
        "8",
        &["UDL_CACHE_DIR", "UDN_LDAP_DIR"],
    ),
];

fn run(name: &str, args: &[&str]) -> Output {
    let output = Command::new(binary(name).unwrap())
        .args(args)
        .env_remove("UDL_CACHE_DIR")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{name} {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn every_binary_prints_its_version() {
    let version = env!("CARGO_PKG_VERSION");
    for (name, _, _) in BINARIES {
        for flag in ["--version", "-V"] {
            let stdout = String::from_utf8(run(name, &[flag]).stdout).unwrap();
            assert_eq!(stdout.trim(), format!("{name} {version}"), "{name} {flag}");
        }
    }
}

#[test]
fn every_binary_prints_its_man_page() {
    for (name, section, env) in BINARIES {
        let page = String::from_utf8(run(name, &["--print-man-page"]).stdout).unwrap();
        assert!(
            page.contains(&format!(".TH {name} {section} ")),
            "{name}: no .TH line for section {section}:\n{page}"
        );
        for var in *env {
            assert!(page.contains(var), "{name}: man page lacks {var}");
        }
    }
}

#[test]
fn help_shows_the_environment_variables() {
    for (name, _, env) in BINARIES {
        let help = String::from_utf8(run(name, &["--help"]).stdout).unwrap();
        for var in *env {
            assert!(
                help.contains(&format!("env: {var}")),
                "{name} --help lacks {var}:\n{help}"
            );
        }
    }
}

#[test]
fn cache_dir_comes_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-cache-here");
    // No cache there: the error names the directory from UDL_CACHE_DIR, not the default.
    let output = Command::new(binary("univention-directory-listener-dump").unwrap())
        .arg("-i")
        .env("UDL_CACHE_DIR", &missing)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
}
