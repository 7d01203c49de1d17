//! Read-only access to Univention Config Registry variables in `/etc/univention/base.conf`.
//!
//! The file holds `key: value` lines; `#` starts a comment line. Only this file is read
//! (UCS's other layers — forced, schedule, ldap — are not consulted), which is what the
//! daemons need for their defaults.

use std::collections::HashMap;
use std::path::Path;

pub const BASE_CONF: &str = "/etc/univention/base.conf";

#[derive(Debug, Clone, Default)]
pub struct Ucr {
    vars: HashMap<String, String>,
}

impl Ucr {
    /// Loads `path`; a missing or unreadable file yields an empty registry (not a UCS host).
    pub fn load(path: &Path) -> Ucr {
        std::fs::read_to_string(path)
            .map(|text| Ucr::parse(&text))
            .unwrap_or_default()
    }

    pub fn load_default() -> Ucr {
        Ucr::load(Path::new(BASE_CONF))
    }

    pub fn parse(text: &str) -> Ucr {
        let vars = text
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .filter_map(|line| line.split_once(':'))
            .map(|(key, value)| (key.trim().to_owned(), value.trim_start().to_owned()))
            .filter(|(key, _)| !key.is_empty())
            .collect();
        Ucr { vars }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .get(key)
            .map(String::as_str)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_key_value_lines_and_ignores_comments() {
        let ucr = Ucr::parse(
            "# univention_ base.conf\n\nldap/base: dc=example,dc=com\nnotifier/cache/size: 200\n\
             empty: \nnotifier/debug/level:3\nweird line\n",
        );
        assert_eq!(ucr.get("ldap/base"), Some("dc=example,dc=com"));
        assert_eq!(ucr.get_parsed::<usize>("notifier/cache/size"), Some(200));
        assert_eq!(ucr.get_parsed::<u8>("notifier/debug/level"), Some(3));
        assert_eq!(ucr.get("empty"), None);
        assert_eq!(ucr.get("weird line"), None);
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
    fn missing_file_is_an_empty_registry() {
        let ucr = Ucr::load(Path::new("/nonexistent/base.conf"));
        assert_eq!(ucr.get("ldap/base"), None);
    }
}
