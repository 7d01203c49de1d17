//! Where and how to connect: the URI (with `ldapi:///` meaning Debian's slapd socket, as in
//! libldap), the authentication (anonymous, simple with a literal password or a password
//! file, SASL EXTERNAL), StartTLS and the time limit. Secrets never show in `Debug`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Debian's slapd socket, which `ldapi:///` means (as in libldap).
const DEFAULT_LDAPI_SOCKET: &str = "/var/run/slapd/ldapi";

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub uri: String,
    pub auth: Auth,
    pub starttls: StartTls,
    pub timeout: Duration,
}

/// How to authenticate after connecting.
#[derive(Clone)]
pub enum Auth {
    Anonymous,
    Simple {
        dn: String,
        password: Password,
    },
    /// SASL EXTERNAL: over ldapi, the peer credentials of this process.
    SaslExternal,
}

impl Auth {
    /// What a tool means by its options, as `ldapsearch` does: a bind DN means a simple
    /// bind, none means SASL EXTERNAL over ldapi and anonymous elsewhere.
    pub fn for_tool(uri: &str, bind_dn: Option<String>, password: Option<Password>) -> Auth {
        match bind_dn {
            Some(dn) => Auth::Simple {
                dn,
                password: password.unwrap_or_else(|| Password::Literal(String::new())),
            },
            None if uri.starts_with("ldapi:") => Auth::SaslExternal,
            None => Auth::Anonymous,
        }
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Anonymous => f.write_str("Anonymous"),
            Auth::Simple { dn, password } => write!(f, "Simple({dn}, {password:?})"),
            Auth::SaslExternal => f.write_str("SaslExternal"),
        }
    }
}

/// Where the simple-bind password comes from.
#[derive(Clone)]
pub enum Password {
    Literal(String),
    /// First line of the file, read when configured (before a daemon gives up root) and
    /// again after an invalid-credentials error: machine passwords rotate.
    File {
        path: PathBuf,
        current: Arc<Mutex<String>>,
    },
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Password::Literal(_) => f.write_str("<password>"),
            Password::File { path, .. } => write!(f, "file {}", path.display()),
        }
    }
}

impl Password {
    /// Reads the first line of `path` now.
    pub fn from_file(path: &Path) -> std::io::Result<Password> {
        Ok(Password::File {
            path: path.to_owned(),
            current: Arc::new(Mutex::new(read_password_file(path)?)),
        })
    }

    /// The password as last read.
    pub fn current(&self) -> String {
        match self {
            Password::Literal(pw) => pw.clone(),
            Password::File { current, .. } => current
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    /// Reads the file again (as root if the process runs with real uid 0: the file is
    /// usually readable by root only); `false` for a literal password.
    pub(crate) fn reread(&self) -> std::io::Result<bool> {
        let Password::File { path, current } = self else {
            return Ok(false);
        };
        let fresh = daemon::privileges::with_root(|| read_password_file(path))?;
        *current.lock().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(true)
    }
}

/// The first line of `path` without its line end, as `ldapsearch -y` and UCS read it.
pub(crate) fn read_password_file(path: &Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartTls {
    Off,
    /// -Z: try, continue without TLS if the server refuses.
    Try,
    /// -ZZ: fail unless TLS is established.
    Require,
}

impl StartTls {
    /// The meaning of `-Z` given `count` times, as in the OpenLDAP tools.
    pub fn from_z_count(count: u8) -> StartTls {
        match count {
            0 => StartTls::Off,
            1 => StartTls::Try,
            _ => StartTls::Require,
        }
    }
}

/// Turns `ldapi:///` (no socket path, as UCS writes it) into ldap3's form with the
/// percent-encoded default socket path; other URLs pass through.
pub(crate) fn normalize_url(url: &str) -> String {
    match url.strip_prefix("ldapi://") {
        Some(rest) if rest.is_empty() || rest == "/" => {
            format!("ldapi://{}/", DEFAULT_LDAPI_SOCKET.replace('/', "%2F"))
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_ldapi_means_the_debian_socket() {
        assert_eq!(
            normalize_url("ldapi:///"),
            "ldapi://%2Fvar%2Frun%2Fslapd%2Fldapi/"
        );
        assert_eq!(
            normalize_url("ldapi://"),
            "ldapi://%2Fvar%2Frun%2Fslapd%2Fldapi/"
        );
        assert_eq!(normalize_url("ldapi://%2Ftmp%2Fs/"), "ldapi://%2Ftmp%2Fs/");
        assert_eq!(normalize_url("ldap://h:389/"), "ldap://h:389/");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "s3cret-in-file\nsecond line\n").unwrap();
        let from_file = Password::from_file(&file).unwrap();
        assert_eq!(from_file.current(), "s3cret-in-file");
        for auth in [
            Auth::for_tool(
                "ldap://h",
                Some("cn=a".into()),
                Some(Password::Literal("s3cret-literal".into())),
            ),
            Auth::for_tool("ldap://h", Some("cn=a".into()), Some(from_file)),
        ] {
            let shown = format!("{auth:?}");
            assert!(!shown.contains("s3cret"), "{shown}");
        }
        assert!(matches!(
            Auth::for_tool("ldapi:///", None, None),
            Auth::SaslExternal
        ));
        assert!(matches!(
            Auth::for_tool("ldap://h", None, None),
            Auth::Anonymous
        ));
    }

    #[test]
    fn z_count_like_openldap() {
        assert_eq!(StartTls::from_z_count(0), StartTls::Off);
        assert_eq!(StartTls::from_z_count(1), StartTls::Try);
        assert_eq!(StartTls::from_z_count(2), StartTls::Require);
    }
}
