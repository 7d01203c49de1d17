//! The Python `univention.config_registry` shim and the daemons' Rust reader
//! (`daemon::ucr`) read the same fixture of every UCR layer and must give the same value for
//! every key, so a module never sees another value than the daemon hosting it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemon/tests/fixtures/ucr")
}

fn expected() -> BTreeMap<String, Option<String>> {
    let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// What the shim returns for each key, reading the layers of `prefix`.
fn python_values(prefix: &Path, keys: &[&String]) -> BTreeMap<String, Option<String>> {
    let script = format!(
        "import json, sys\n\
         import univention.config_registry as ucr\n\
         ucr.PREFIX = {prefix:?}\n\
         registry = ucr.ConfigRegistry().load()\n\
         keys = json.loads(sys.argv[1])\n\
         print(json.dumps({{k: registry.get(k) for k in keys}}))\n",
        prefix = prefix.to_str().unwrap()
    );
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(serde_json::to_string(keys).unwrap())
        .env(
            "PYTHONPATH",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("src/python-lib"),
        )
        .env_remove("UNIVENTION_BASECONF")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn python_shim_and_rust_reader_agree_on_every_layer() {
    let expected = expected();
    let keys: Vec<&String> = expected.keys().collect();
    let python = python_values(&fixture(), &keys);
    let rust = daemon::ucr::Ucr::load(&fixture().join("base.conf"));
    for (key, value) in &expected {
        assert_eq!(python.get(key), Some(value), "Python shim, key {key:?}");
        assert_eq!(
            rust.get_raw(key).map(|(_, v)| v.to_owned()).as_ref(),
            value.as_ref(),
            "Rust reader, key {key:?}"
        );
    }
}
