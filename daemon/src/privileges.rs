//! Privileges like UCS (DESIGN.md decision 7): started as root, the daemon keeps real uid 0
//! and switches its *effective* uid/gid to the `listener` user, so modules can become root
//! for a moment (`listener.setuid(0)`) and the daemon can take the identity back after every
//! module call.
//!
//! glibc's `seteuid`/`setegid` apply to all threads of the process, so one call covers the
//! tokio workers and the module threads alike.

use std::ffi::CString;
use std::io;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// The effective identity to hold between module calls; `None` when running as started.
#[derive(Debug, Clone, Copy, Default)]
pub struct Privileges {
    target: Option<Identity>,
}

/// uid and gid of `name` from the passwd database.
pub(crate) fn lookup_user(name: &str) -> io::Result<Option<Identity>> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: zeroed passwd is a valid value of this plain C struct.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; buf outlives it and its length is passed.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if result.is_null() {
        return Ok(None);
    }
    Ok(Some(Identity {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    }))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn effective() -> Identity {
    // SAFETY: these calls cannot fail and have no preconditions.
    unsafe {
        Identity {
            uid: libc::geteuid(),
            gid: libc::getegid(),
        }
    }
}

fn is_root() -> bool {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() == 0 }
}

fn become_identity(target: Identity) -> io::Result<()> {
    let current = effective();
    if current == target {
        return Ok(());
    }
    // Changing the egid needs root; real uid 0 allows taking euid 0 back first.
    // SAFETY: plain syscalls without memory arguments.
    unsafe {
        if current.uid != 0 {
            check(libc::seteuid(0))?;
        }
        check(libc::setegid(target.gid))?;
        check(libc::seteuid(target.uid))
    }
}

impl Privileges {
    /// Run as started (not root, or no such user).
    pub fn unchanged() -> Privileges {
        Privileges { target: None }
    }

    /// Started as root: switch the effective uid/gid to `user`, first giving it the paths in
    /// `owned` (like UCS's `fix_cache_permissions.sh`). Without such a user, or when not
    /// root, stays as started and says so.
    pub fn drop_to(user: &str, owned: &[&Path]) -> io::Result<Privileges> {
        if !is_root() {
            return Ok(Privileges::unchanged());
        }
        let Some(identity) = lookup_user(user)? else {
            tracing::warn!("no user {user:?}: running with root privileges");
            return Ok(Privileges::unchanged());
        };
        for path in owned {
            chown_tree(path, identity)?;
        }
        become_identity(identity)?;
        tracing::info!(
            "running with effective uid {} / gid {} ({user})",
            identity.uid,
            identity.gid
        );
        Ok(Privileges {
            target: Some(identity),
        })
    }

    /// Takes the daemon's identity back after a module call that may have changed it.
    pub fn restore(&self) {
        if let Some(target) = self.target
            && let Err(e) = become_identity(target)
        {
            tracing::error!("cannot restore effective uid {}: {e}", target.uid);
        }
    }
}

/// Runs `f` with effective uid/gid 0 when the real uid is root and the effective one is
/// not, then restores the effective ids; otherwise just runs `f`. For reading root-only
/// files (the bind password) after the switch to the `listener` user.
pub fn with_root<T>(f: impl FnOnce() -> T) -> T {
    let before = effective();
    if !is_root() || before.uid == 0 {
        return f();
    }
    if let Err(e) = become_identity(Identity { uid: 0, gid: 0 }) {
        tracing::error!("cannot regain root: {e}");
        return f();
    }
    let result = f();
    if let Err(e) = become_identity(before) {
        tracing::error!("cannot restore effective uid {}: {e}", before.uid);
    }
    result
}

/// `chown -R` of `path` to `identity` where the owner differs; a missing path is fine.
fn chown_tree(path: &Path, identity: Identity) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    if meta.uid() != identity.uid || meta.gid() != identity.gid {
        std::os::unix::fs::lchown(path, Some(identity.uid), Some(identity.gid))?;
    }
    if meta.is_dir() {
        for child in std::fs::read_dir(path)? {
            chown_tree(&child?.path(), identity)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_in_the_passwd_database_and_nonsense_is_not() {
        let root = lookup_user("root").unwrap().unwrap();
        assert_eq!(root, Identity { uid: 0, gid: 0 });
        assert_eq!(lookup_user("no-such-user-for-udl-tests").unwrap(), None);
    }

    #[test]
    fn without_a_user_nothing_changes() {
        let before = effective();
        let p = Privileges::drop_to("no-such-user-for-udl-tests", &[]).unwrap();
        p.restore();
        assert_eq!(with_root(effective), before);
        assert_eq!(effective(), before);
    }
}
