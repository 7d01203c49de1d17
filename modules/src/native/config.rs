//! The config file of a native module (`--native-module KIND=@FILE`).
//!
//! Line based: `key = value` with whitespace around key and value trimmed, blank lines and
//! lines starting with `#` ignored (there are no trailing comments: `#` may be part of a
//! command). Common keys are `name`, `description`, `filter` (empty: the module never matches
//! on updates), `attributes` (space-separated), `priority`, `handle_every_delete` and
//! `handle_subtree_moves`; each
//! kind adds its own. Unknown and repeated keys are errors, so a typo cannot silently fall
//! back to a default.

use std::collections::HashSet;
use std::path::Path;

use super::NativeError;
use crate::module::ModuleInfo;

/// Keys whose value may be empty; for all others an empty value is surely a mistake.
const MAY_BE_EMPTY: &[&str] = &["description", "filter", "attributes"];

/// Reads the config file at `path`, applies the common keys to `info` and hands every other
/// key and its value to `kind_key`, which returns `Ok(false)` for a key it does not know and
/// `Err` with a message for a bad value.
pub(super) fn read(
    path: &Path,
    info: &mut ModuleInfo,
    kind_key: impl FnMut(&str, &str) -> Result<bool, String>,
) -> Result<(), NativeError> {
    let text = std::fs::read_to_string(path).map_err(|source| NativeError::ReadConfig {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, info, kind_key).map_err(|(line, message)| NativeError::Config {
        path: path.to_owned(),
        line,
        message,
    })
}

/// [`read`] without the file: errors are (line number, message).
fn parse(
    text: &str,
    info: &mut ModuleInfo,
    mut kind_key: impl FnMut(&str, &str) -> Result<bool, String>,
) -> Result<(), (usize, String)> {
    let mut seen = HashSet::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err((number, format!("expected `key = value`, got {line:?}")));
        };
        let (key, value) = (key.trim(), value.trim());
        if !seen.insert(key) {
            return Err((number, format!("key {key:?} given twice")));
        }
        if value.is_empty() && !MAY_BE_EMPTY.contains(&key) {
            return Err((number, format!("empty value for key {key:?}")));
        }
        let known = match common_key(info, key, value) {
            Ok(false) => kind_key(key, value),
            common => common,
        };
        match known {
            Ok(true) => {}
            Ok(false) => return Err((number, format!("unknown key {key:?}"))),
            Err(message) => return Err((number, format!("{key}: {message}"))),
        }
    }
    Ok(())
}

/// Applies one of the keys every kind has; `Ok(false)` if `key` is not one of them.
fn common_key(info: &mut ModuleInfo, key: &str, value: &str) -> Result<bool, String> {
    match key {
        "name" => {
            crate::module::check_module_name(value)?;
            info.name = value.to_owned();
        }
        "description" => info.description = value.to_owned(),
        "filter" => info.filter = (!value.is_empty()).then(|| value.to_owned()),
        "attributes" => info.attributes = value.split_whitespace().map(str::to_owned).collect(),
        "priority" => {
            info.priority = match value.parse::<f64>() {
                Ok(priority) if priority.is_finite() => priority,
                _ => return Err(format!("{value:?} is not a finite number")),
            }
        }
        "handle_every_delete" => info.handle_every_delete = parse_bool(value)?,
        "handle_subtree_moves" => info.handle_subtree_moves = parse_bool(value)?,
        _ => return Ok(false),
    }
    Ok(true)
}

pub(super) fn parse_bool(value: &str) -> Result<bool, String> {
    match value {
        "yes" | "true" | "1" => Ok(true),
        "no" | "false" | "0" => Ok(false),
        _ => Err(format!(
            "{value:?} is not a boolean (yes/no, true/false, 1/0)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::module::{DEFAULT_PRIORITY, ModuleSource};

    fn info() -> ModuleInfo {
        crate::native::default_info("jsonl", "d", true)
    }

    /// Parses `text` with one kind key `file`.
    fn parse_with_file(text: &str) -> Result<(ModuleInfo, Option<String>), (usize, String)> {
        let mut info = info();
        let mut file = None;
        parse(text, &mut info, |key, value| match key {
            "file" => {
                file = Some(value.to_owned());
                Ok(true)
            }
            _ => Ok(false),
        })?;
        Ok((info, file))
    }

    #[test]
    fn all_common_keys() {
        let text = "\
# a comment
   # an indented comment

name = audit-log_2.x,y
description =   Audit   log
filter = (&(objectClass=person)(uid=*))
attributes = uid  cn\tmail
priority = 12.5
handle_every_delete = no
handle_subtree_moves = no
file = /var/log/x = y.jsonl
";
        let (info, file) = parse_with_file(text).unwrap();
        assert_eq!(
            info,
            ModuleInfo {
                name: "audit-log_2.x,y".into(),
                description: "Audit   log".into(),
                filter: Some("(&(objectClass=person)(uid=*))".into()),
                attributes: vec!["uid".into(), "cn".into(), "mail".into()],
                handle_every_delete: false,
                handle_subtree_moves: false,
                priority: 12.5,
                source: ModuleSource::Native("jsonl".into()),
            }
        );
        assert_eq!(file.as_deref(), Some("/var/log/x = y.jsonl"));
    }

    #[test]
    fn empty_file_keeps_defaults_and_empty_filter_is_none() {
        let (unchanged, file) = parse_with_file("").unwrap();
        assert_eq!(unchanged, info());
        assert_eq!(unchanged.priority, DEFAULT_PRIORITY);
        assert_eq!(file, None);
        let (info, _) = parse_with_file("filter =\nattributes =").unwrap();
        assert_eq!(info.filter, None);
        assert!(info.attributes.is_empty());
    }

    #[test]
    fn booleans() {
        for (text, expected) in [
            ("yes", true),
            ("true", true),
            ("1", true),
            ("no", false),
            ("false", false),
            ("0", false),
        ] {
            assert_eq!(parse_bool(text), Ok(expected));
        }
        let (line, message) = parse_with_file("\nhandle_every_delete = Yes").unwrap_err();
        assert_eq!(line, 2);
        assert!(message.contains("\"Yes\" is not a boolean"), "{message}");
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            ("name = ok\nfiel = x", 2, "unknown key \"fiel\""),
            ("name = .hidden", 1, "not a valid module name"),
            ("name = a/b", 1, "not a valid module name"),
            ("name =", 1, "empty value for key \"name\""),
            ("file = a\n\n# x\nfile = b", 4, "key \"file\" given twice"),
            ("just words", 1, "expected `key = value`"),
            ("priority = high", 1, "\"high\" is not a finite number"),
            ("priority = NaN", 1, "not a finite number"),
        ];
        for (text, line, needle) in cases {
            let (got_line, message) = parse_with_file(text).unwrap_err();
            assert_eq!(got_line, line, "{text:?}: {message}");
            assert!(message.contains(needle), "{text:?}: {message}");
        }
    }

    #[test]
    fn read_reports_path_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.conf");
        std::fs::write(&path, "name = x\nbogus = 1\n").unwrap();
        let error = read(&path, &mut info(), |_, _| Ok(false)).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("{}:2: unknown key \"bogus\"", path.display())
        );
        let missing = dir.path().join("missing.conf");
        let error = read(&missing, &mut info(), |_, _| Ok(false)).unwrap_err();
        assert!(
            error.to_string().contains(&missing.display().to_string()),
            "{error}"
        );
    }
}
