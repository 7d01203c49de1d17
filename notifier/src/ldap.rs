//! LDAP connections for the notifier (translog writer, accesslog follower) and its tools.

use std::time::Duration;

use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError};

/// Debian's slapd socket, which `ldapi:///` means (as in libldap).
pub const DEFAULT_LDAPI_SOCKET: &str = "/var/run/slapd/ldapi";

/// How to authenticate after connecting.
#[derive(Clone)]
pub enum Bind {
    /// SASL EXTERNAL: over ldapi, the peer credentials of this process (root).
    SaslExternal,
    Simple {
        dn: String,
        password: String,
    },
    Anonymous,
}

impl std::fmt::Debug for Bind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bind::SaslExternal => f.write_str("SaslExternal"),
            Bind::Simple { dn, .. } => write!(f, "Simple({dn})"),
            Bind::Anonymous => f.write_str("Anonymous"),
        }
    }
}

/// Turns `ldapi:///` (no socket path, as UCS writes it) into ldap3's form with the
/// percent-encoded default socket path; other URLs pass through.
pub fn normalize_url(url: &str) -> String {
    match url.strip_prefix("ldapi://") {
        Some(rest) if rest.is_empty() || rest == "/" => {
            format!("ldapi://{}/", DEFAULT_LDAPI_SOCKET.replace('/', "%2F"))
        }
        _ => url.to_owned(),
    }
}

/// Connects and binds; the connection driver runs as a tokio task until the handle drops.
pub async fn connect(url: &str, bind: &Bind, timeout: Duration) -> Result<Ldap, LdapError> {
    let url = normalize_url(url);
    let settings = LdapConnSettings::new().set_conn_timeout(timeout);
    let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &url).await?;
    ldap3::drive!(conn);
    ldap.with_timeout(timeout);
    match bind {
        Bind::SaslExternal => {
            ldap.sasl_external_bind().await?.success()?;
        }
        Bind::Simple { dn, password } => {
            ldap.simple_bind(dn, password).await?.success()?;
        }
        Bind::Anonymous => {}
    }
    Ok(ldap)
}

/// LDAP result codes this crate reacts to.
pub mod rc {
    pub const SUCCESS: u32 = 0;
    pub const NO_SUCH_OBJECT: u32 = 32;
    pub const INVALID_ATTRIBUTE_SYNTAX: u32 = 21;
    pub const INVALID_DN_SYNTAX: u32 = 34;
    pub const NAMING_VIOLATION: u32 = 64;
    pub const OBJECT_CLASS_VIOLATION: u32 = 65;
    pub const ALREADY_EXISTS: u32 = 68;
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
        let bind = Bind::Simple {
            dn: "cn=a".into(),
            password: "pw".into(),
        };
        assert!(!format!("{bind:?}").contains("pw"));
    }
}
