//! Read-only access to Univention Config Registry variables, with every layer UCS has, in
//! UCS's order: `base-forced.conf` > `base-schedule.conf` > `base-ldap.conf` > `base.conf` >
//! `base-defaults.conf`, all in one directory (`/etc/univention`). A key found in a higher
//! layer wins, even with an empty value.
//!
//! The files hold `key: value` lines; a line whose first non-blank character is `#` is a
//! comment. Parsing follows UCS's Python reader exactly (line ends `\n`, `\r\n` or `\r`;
//! the key is stripped, the value loses the blanks after the colon only), and so does the
//! listener's Python `univention.config_registry` shim: both are tested against the same
//! fixture (`daemon/tests/fixtures/ucr`), so a daemon and the modules it hosts see the same
//! value for every key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The normal layer of a UCS host; the other layers live next to it.
pub const BASE_CONF: &str = "/etc/univention/base.conf";

/// The layers above and below `base.conf`, highest priority first, with their file names.
const LAYERS: [Layer; 5] = [
    Layer::Forced,
    Layer::Schedule,
    Layer::Ldap,
    Layer::Normal,
    Layer::Defaults,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layer {
    Forced,
    Schedule,
    Ldap,
    Normal,
    Defaults,
}

impl Layer {
    fn file_name(self) -> &'static str {
        match self {
            Layer::Forced => "base-forced.conf",
            Layer::Schedule => "base-schedule.conf",
            Layer::Ldap => "base-ldap.conf",
            Layer::Normal => "base.conf",
            Layer::Defaults => "base-defaults.conf",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Ucr {
    /// Per key the value of the highest layer holding it.
    vars: HashMap<String, (Layer, String)>,
}

impl Ucr {
    /// Loads the normal layer `base_conf` and the other layers from its directory; a missing
    /// or unreadable file is an empty layer (not a UCS host).
    pub fn load(base_conf: &Path) -> Ucr {
        let mut ucr = Ucr::default();
        for layer in LAYERS {
            let path = layer_path(base_conf, layer);
            if let Ok(bytes) = std::fs::read(&path) {
                ucr.add_layer(layer, &String::from_utf8_lossy(&bytes));
            }
        }
        ucr
    }

    pub fn load_default() -> Ucr {
        Ucr::load(Path::new(BASE_CONF))
    }

    /// One layer's text as the normal layer (for tests and callers with a single file).
    pub fn parse(text: &str) -> Ucr {
        let mut ucr = Ucr::default();
        ucr.add_layer(Layer::Normal, text);
        ucr
    }

    /// Adds `text` as `layer`; keys already set by a higher layer keep their value.
    fn add_layer(&mut self, layer: Layer, text: &str) {
        for (key, value) in parse_lines(text) {
            self.vars.entry(key).or_insert((layer, value));
        }
    }

    /// The value as stored, empty values included, and the layer it comes from.
    pub fn get_raw(&self, key: &str) -> Option<(Layer, &str)> {
        self.vars
            .get(key)
            .map(|(layer, value)| (*layer, value.as_str()))
    }

    /// The value of `key`; an empty value counts as unset, as the daemons' defaults need.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.get_raw(key)
            .map(|(_, value)| value)
            .filter(|v| !v.is_empty())
    }

    /// A variable parsed as a number; unparseable values count as unset.
    pub fn get_parsed<T: std::str::FromStr>(&self, key: &str) -> Option<T> {
        self.get(key).and_then(|v| v.trim().parse().ok())
    }

    /// UCR's notion of true: yes, true, 1, enable(d), on (case-insensitive).
    pub fn is_true(&self, key: &str) -> bool {
        self.get(key).is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "yes" | "true" | "1" | "enable" | "enabled" | "on"
            )
        })
    }

    /// UCS's `is_false`: set to a false word (unset is neither true nor false).
    pub fn is_false(&self, key: &str) -> bool {
        self.get(key).is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "no" | "false" | "0" | "disable" | "disabled" | "off"
            )
        })
    }
}

/// The file of `layer` next to the normal layer `base_conf`.
fn layer_path(base_conf: &Path, layer: Layer) -> PathBuf {
    if layer == Layer::Normal {
        return base_conf.to_owned();
    }
    base_conf
        .parent()
        .unwrap_or(Path::new("."))
        .join(layer.file_name())
}

/// `(key, value)` pairs of one layer file, later duplicates winning (as a dict update).
/// Sets `values` in the layer file `path` (normally `base.conf`) as `ucr set` would: an
/// existing `key: value` line is replaced, a new key appended, comments and other lines
/// kept; the file is replaced atomically. For hosts without the `ucr` tool (tests, stock
/// Debian); on UCS use `ucr set`, which also runs the templates.
pub fn set_in_file(path: &Path, values: &[(&str, &str)]) -> Result<(), crate::fs::FileError> {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(crate::fs::file_err("read", path)(e)),
    };
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for (key, value) in values {
        let line = format!("{key}: {value}");
        let existing = lines.iter().position(|l| {
            !l.trim_start().starts_with('#')
                && l.split_once(':').is_some_and(|(k, _)| k.trim() == *key)
        });
        match existing {
            Some(i) => lines[i] = line,
            None => lines.push(line),
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    crate::fs::write_atomic(path, out.as_bytes(), 0o644)
}

fn parse_lines(text: &str) -> Vec<(String, String)> {
    let normalised = text.replace("\r\n", "\n").replace('\r', "\n");
    let mut pairs: Vec<(String, String)> = Vec::new();
    for line in normalised.split('\n') {
        if line.trim_start().starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty() {
            continue;
        }
        let value = value.trim_start_matches(' ');
        match pairs.iter_mut().find(|(k, _)| k == key) {
            Some(pair) => pair.1 = value.to_owned(),
            None => pairs.push((key.to_owned(), value.to_owned())),
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_in_file_replaces_and_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.conf");
        std::fs::write(
            &path,
            "# c: x\nserver/role: domaincontroller_backup\nother: 1\n",
        )
        .unwrap();
        set_in_file(
            &path,
            &[
                ("server/role", "domaincontroller_master"),
                ("ldap/master", "b.x"),
            ],
        )
        .unwrap();
        let ucr = Ucr::load(&path);
        assert_eq!(ucr.get("server/role"), Some("domaincontroller_master"));
        assert_eq!(ucr.get("ldap/master"), Some("b.x"));
        assert_eq!(ucr.get("other"), Some("1"));
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .starts_with("# c: x\n")
        );
    }

    #[test]
    fn parses_key_value_lines_and_ignores_comments() {
        let ucr = Ucr::parse(
            "# univention_ base.conf\n\nldap/base: dc=example,dc=com\nnotifier/cache/size: 200\n\
             empty: \nnotifier/debug/level:3\nweird line\n  # indented comment: x\n",
        );
        assert_eq!(ucr.get("ldap/base"), Some("dc=example,dc=com"));
        assert_eq!(ucr.get_parsed::<usize>("notifier/cache/size"), Some(200));
        assert_eq!(ucr.get_parsed::<u8>("notifier/debug/level"), Some(3));
        assert_eq!(ucr.get("empty"), None);
        assert_eq!(ucr.get_raw("empty"), Some((Layer::Normal, "")));
        assert_eq!(ucr.get("weird line"), None);
        assert_eq!(ucr.get("# indented comment"), None);
    }

    #[test]
    fn truth_values_follow_ucr() {
        let ucr = Ucr::parse("a: yes\nb: False\nc: On\n");
        assert!(ucr.is_true("a"));
        assert!(!ucr.is_true("b"));
        assert!(ucr.is_true("c"));
        assert!(!ucr.is_true("missing"));
    }

    #[test]
    fn missing_files_are_an_empty_registry() {
        let ucr = Ucr::load(Path::new("/nonexistent/base.conf"));
        assert_eq!(ucr.get("ldap/base"), None);
    }

    /// The fixture shared with the Python shim's test: every layer, and per key the value
    /// that must win.
    #[test]
    fn layers_in_ucs_order_match_the_shared_fixture() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ucr");
        let ucr = Ucr::load(&dir.join("base.conf"));
        let expected = std::fs::read_to_string(dir.join("expected.json")).unwrap();
        let expected: std::collections::BTreeMap<String, Option<String>> =
            serde_json::from_str(&expected).unwrap();
        assert!(expected.len() >= 10);
        for (key, value) in expected {
            assert_eq!(
                ucr.get_raw(&key).map(|(_, v)| v.to_owned()),
                value,
                "key {key:?}"
            );
        }
        assert_eq!(
            ucr.get_raw("ucr/test/forced").map(|(l, _)| l),
            Some(Layer::Forced)
        );
    }
}
