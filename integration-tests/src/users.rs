//! Throwaway system users for tests of the daemons' effective-uid handling (root only).

use std::process::Command;

/// A system user for one test, removed on drop (also when the test panics).
pub struct TempUser {
    pub name: String,
}

impl TempUser {
    /// Creates `udltest<pid><suffix>`; panics if `useradd` fails (tests only).
    #[allow(clippy::panic)]
    pub fn create(suffix: &str) -> TempUser {
        let name = format!("udltest{}{suffix}", std::process::id());
        let status = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ])
            .status();
        match status {
            Ok(status) if status.success() => TempUser { name },
            other => panic!("useradd {name}: {other:?}"),
        }
    }

    /// uid and gid from the passwd database.
    #[allow(clippy::panic)]
    pub fn ids(&self) -> (u32, u32) {
        let output = Command::new("getent").args(["passwd", &self.name]).output();
        let line = match output {
            Ok(output) => String::from_utf8_lossy(&output.stdout).into_owned(),
            Err(e) => panic!("getent passwd {}: {e}", self.name),
        };
        let fields: Vec<&str> = line.trim().split(':').collect();
        match (
            fields.get(2).and_then(|f| f.parse().ok()),
            fields.get(3).and_then(|f| f.parse().ok()),
        ) {
            (Some(uid), Some(gid)) => (uid, gid),
            _ => panic!("no passwd entry for {}: {line:?}", self.name),
        }
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// True when the tests run as root (needed to create users and switch uids).
pub fn is_root() -> bool {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() == 0 }
}
