//! The UCS file layout below the LDAP state directory (`/var/lib/univention-ldap`) that
//! both daemons and the tools share: the notifier's queue files, which slapd's translog
//! overlay or a cascading listener (`-o`) append to, and the schema id.

use std::path::{Path, PathBuf};

/// The LDAP state directory of a UCS host.
pub const DEFAULT_LDAP_DIR: &str = "/var/lib/univention-ldap";
/// The schema id file below the LDAP state directory.
pub const SCHEMA_ID_FILE: &str = "schema/id/id";
/// The notifier's own state directory below the LDAP state directory.
pub const NOTIFY_DIR: &str = "notify";

/// The queue files in `<ldap_dir>/listener/`: `listener` (appended to under the lock),
/// `listener.priv` (the notifier's private copy while it processes) and `listener.lock`
/// (the `lockf()` lock every writer and the notifier take).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFiles {
    dir: PathBuf,
}

impl QueueFiles {
    pub fn in_ldap_dir(ldap_dir: &Path) -> QueueFiles {
        QueueFiles::in_dir(&ldap_dir.join("listener"))
    }

    /// The queue files in `dir` itself.
    pub fn in_dir(dir: &Path) -> QueueFiles {
        QueueFiles {
            dir: dir.to_owned(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn queue(&self) -> PathBuf {
        self.dir.join("listener")
    }

    pub fn private(&self) -> PathBuf {
        self.dir.join("listener.priv")
    }

    pub fn lock(&self) -> PathBuf {
        self.dir.join("listener.lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ucs_names() {
        let files = QueueFiles::in_ldap_dir(Path::new(DEFAULT_LDAP_DIR));
        assert_eq!(
            files.queue(),
            Path::new("/var/lib/univention-ldap/listener/listener")
        );
        assert_eq!(
            files.private(),
            Path::new("/var/lib/univention-ldap/listener/listener.priv")
        );
        assert_eq!(
            files.lock(),
            Path::new("/var/lib/univention-ldap/listener/listener.lock")
        );
    }
}
