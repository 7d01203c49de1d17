//! POSIX record locks (`fcntl(F_SETLK)`), compatible with the `lockf()` locks of slapd's
//! translog overlay, the UCS notifier and a cascading listener. `flock(2)` locks would not
//! exclude them on Linux, so they must not be used here.
//!
//! Record locks belong to the process: closing any descriptor of the file releases them, and
//! they never conflict with the same process. Cross-process exclusion is what they are for.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An exclusive lock on a whole file, released when dropped.
#[derive(Debug)]
pub struct FileLock {
    file: File,
    path: PathBuf,
}

impl FileLock {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open lock file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is locked by another process (tried {attempts} times)")]
    Busy { path: PathBuf, attempts: u32 },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Tries once to take an exclusive lock on the whole of `file`: `Ok(false)` when another
/// process holds a conflicting lock.
pub fn try_lock_file(file: &File) -> io::Result<bool> {
    set_lock(file, libc::F_WRLCK)
}

fn set_lock(file: &File, kind: libc::c_int) -> io::Result<bool> {
    // SAFETY: a zeroed `flock` is a valid value of this plain C struct.
    let mut request: libc::flock = unsafe { std::mem::zeroed() };
    // Whole file: start 0, length 0 = to EOF and beyond, so it overlaps every lockf() range.
    request.l_type = kind as libc::c_short;
    request.l_whence = libc::SEEK_SET as libc::c_short;
    request.l_start = 0;
    request.l_len = 0;
    // SAFETY: the descriptor is valid for the lifetime of `file`, and `request` is a valid,
    // initialised flock that outlives the call.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &request) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EAGAIN) => Ok(false),
        _ => Err(err),
    }
}

/// The pid of a process holding a lock on `path` that conflicts with an exclusive lock,
/// `None` if there is none or the file does not exist. Asks with `F_GETLK`, which neither
/// creates the file nor takes the lock, so a daemon starting at this moment is not turned
/// away by a tool that only looks.
pub fn holder(path: &Path) -> io::Result<Option<u32>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // SAFETY: a zeroed `flock` is a valid value of this plain C struct.
    let mut query: libc::flock = unsafe { std::mem::zeroed() };
    query.l_type = libc::F_WRLCK as libc::c_short;
    query.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: the descriptor is valid while `file` lives; `query` is a valid flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut query) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if query.l_type == libc::F_UNLCK as libc::c_short {
        return Ok(None);
    }
    Ok(Some(u32::try_from(query.l_pid).unwrap_or(0)))
}

/// Opens (creating with mode 0600 if needed) `path` and locks it, retrying `attempts` times
/// `delay` apart like UCS's `-L`/`-T` options.
pub fn lock_path(path: &Path, attempts: u32, delay: Duration) -> Result<FileLock, LockError> {
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| LockError::Open {
            path: path.to_owned(),
            source,
        })?;
    let attempts = attempts.max(1);
    for attempt in 1..=attempts {
        match try_lock_file(&file) {
            Ok(true) => {
                return Ok(FileLock {
                    file,
                    path: path.to_owned(),
                });
            }
            Ok(false) if attempt < attempts => std::thread::sleep(delay),
            Ok(false) => break,
            Err(source) => {
                return Err(LockError::Lock {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    Err(LockError::Busy {
        path: path.to_owned(),
        attempts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_names_the_other_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.lock");
        assert_eq!(holder(&path).unwrap(), None);
        std::fs::write(&path, "").unwrap();
        assert_eq!(holder(&path).unwrap(), None);
        let mut child = integration_tests::lockf::hold_lockf(&path).unwrap();
        assert_eq!(holder(&path).unwrap(), Some(child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(holder(&path).unwrap(), None);
    }

    #[test]
    fn conflicts_with_lockf_of_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("transaction.lock");
        let mut child = integration_tests::lockf::hold_lockf(&path).unwrap();
        let err = lock_path(&path, 3, Duration::from_millis(1)).unwrap_err();
        assert!(matches!(err, LockError::Busy { attempts: 3, .. }), "{err}");
        assert!(err.to_string().contains("locked by another process"));
        child.kill().unwrap();
        child.wait().unwrap();
        let lock = lock_path(&path, 1, Duration::ZERO).unwrap();
        assert_eq!(lock.path(), path);
    }
}
