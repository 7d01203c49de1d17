//! The PID file: refuses to take over one that names a live process, and is removed on exit
//! only while it still names this process, so a second daemon started by mistake neither
//! starts nor deletes the running one's file.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    #[error("{path} names the running process {pid}: is another instance running?")]
    Running { path: PathBuf, pid: u32 },
    #[error("cannot write the PID file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: crate::fs::FileError,
    },
}

/// The PID file of this process; removed when dropped if it still names us.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    pub fn create(path: &Path) -> Result<PidFile, PidFileError> {
        if let Some(pid) = read_pid(path)
            && pid != std::process::id()
            && is_alive(pid)
        {
            return Err(PidFileError::Running {
                path: path.to_owned(),
                pid,
            });
        }
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        crate::fs::write_atomic(path, format!("{}\n", std::process::id()).as_bytes(), 0o644)
            .map_err(|source| PidFileError::Write {
                path: path.to_owned(),
                source,
            })?;
        Ok(PidFile {
            path: path.to_owned(),
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if read_pid(&self.path) == Some(std::process::id()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` exists (signal 0 checks without sending anything; EPERM means it exists
/// under another user).
fn is_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_live_owner_and_never_removes_a_foreign_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/udsnotifier.pid");
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, format!("{}\n", other.id())).unwrap();
        let err = PidFile::create(&path).unwrap_err();
        assert!(
            matches!(err, PidFileError::Running { pid, .. } if pid == other.id()),
            "{err}"
        );
        assert_eq!(read_pid(&path), Some(other.id()));
        other.kill().unwrap();
        other.wait().unwrap();
        // A stale file of a dead process is taken over.
        let ours = PidFile::create(&path).unwrap();
        assert_eq!(read_pid(&path), Some(std::process::id()));
        // Someone else took the file over meanwhile: ours must not delete theirs.
        std::fs::write(&path, "1\n").unwrap();
        drop(ours);
        assert_eq!(read_pid(&path), Some(1));
        std::fs::remove_file(&path).unwrap();
        let ours = PidFile::create(&path).unwrap();
        drop(ours);
        assert!(!path.exists());
    }
}
