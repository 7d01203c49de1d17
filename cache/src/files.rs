//! The small plain files next to the cache that other tools read: the `bad_cache` marker and
//! the legacy `notifier_id` (spec listener.md §6.1).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use daemon::fs::{FileError, read_decimal, write_decimal};

/// Name of the corruption marker inside the cache directory. While it exists the listener
/// refuses to start (exit 3 in UCS), so a damaged cache is never silently built upon.
pub const BAD_CACHE_FILE: &str = "bad_cache";
/// Name of the legacy last-id file inside the cache directory.
pub const NOTIFIER_ID_FILE: &str = "notifier_id";

pub(crate) fn bad_cache_path(dir: &Path) -> PathBuf {
    dir.join(BAD_CACHE_FILE)
}

/// Writes `<dir>/bad_cache` with `reason` (one line), so the next start refuses the cache.
pub fn mark_bad(dir: &Path, reason: &str) -> io::Result<()> {
    let mut text = reason.trim_end().to_owned();
    text.push('\n');
    fs::write(bad_cache_path(dir), text)
}

pub fn is_marked_bad(dir: &Path) -> bool {
    // symlink_metadata: a dangling symlink named bad_cache still marks the cache bad.
    fs::symlink_metadata(bad_cache_path(dir)).is_ok()
}

/// The reason stored by [`mark_bad`], for the error message.
pub(crate) fn bad_cache_reason(dir: &Path) -> String {
    match fs::read(bad_cache_path(dir)) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes).trim().to_owned();
            if text.is_empty() {
                "no reason given".to_owned()
            } else {
                text
            }
        }
        Err(e) => format!("reason unreadable: {e}"),
    }
}

/// Rewrites `<dir>/notifier_id` (decimal, no newline) atomically and durably
/// ([`daemon::fs::write_decimal`]), so a reader (Nagios, `univention-directory-listener-ctrl
/// status`) never sees a partial number. Informational: the authoritative id is the master
/// record committed with the cache.
pub fn write_legacy_notifier_id(dir: &Path, id: u64) -> Result<(), FileError> {
    write_decimal(&dir.join(NOTIFIER_ID_FILE), id)
}

/// The id in `<dir>/notifier_id`; `None` if it is missing or not a decimal number.
pub fn read_legacy_notifier_id(dir: &Path) -> Option<u64> {
    read_decimal(&dir.join(NOTIFIER_ID_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_cache_marker() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_marked_bad(dir.path()));
        mark_bad(dir.path(), "Check log file").unwrap();
        assert!(is_marked_bad(dir.path()));
        assert_eq!(
            fs::read_to_string(dir.path().join("bad_cache")).unwrap(),
            "Check log file\n"
        );
        assert_eq!(bad_cache_reason(dir.path()), "Check log file");
        fs::write(dir.path().join("bad_cache"), "").unwrap();
        assert_eq!(bad_cache_reason(dir.path()), "no reason given");
    }

    #[test]
    fn legacy_notifier_id_is_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_legacy_notifier_id(dir.path()), None);
        write_legacy_notifier_id(dir.path(), 42).unwrap();
        let path = dir.path().join("notifier_id");
        assert_eq!(fs::read(&path).unwrap(), b"42");
        write_legacy_notifier_id(dir.path(), 1234567).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"1234567");
        assert_eq!(read_legacy_notifier_id(dir.path()), Some(1234567));
        write_legacy_notifier_id(dir.path(), u64::MAX).unwrap();
        assert_eq!(read_legacy_notifier_id(dir.path()), Some(u64::MAX));
    }

    #[test]
    fn legacy_notifier_id_write_fails_cleanly_without_directory() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        assert!(write_legacy_notifier_id(&missing, 1).is_err());
    }
}
