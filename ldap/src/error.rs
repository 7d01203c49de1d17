//! What can go wrong talking to LDAP, classified by what the caller does about it: retry
//! after a reconnect ([`LdapFailure::is_transient`]), or report.

use std::time::Duration;

use ldap3::LdapError;

/// LDAP result codes the daemons and tools react to.
pub mod rc {
    pub const SUCCESS: u32 = 0;
    pub(crate) const ADMIN_LIMIT_EXCEEDED: u32 = 11;
    pub const INVALID_ATTRIBUTE_SYNTAX: u32 = 21;
    pub const NO_SUCH_OBJECT: u32 = 32;
    pub const INVALID_DN_SYNTAX: u32 = 34;
    pub(crate) const INVALID_CREDENTIALS: u32 = 49;
    pub(crate) const INSUFFICIENT_ACCESS: u32 = 50;
    pub const BUSY: u32 = 51;
    pub const UNAVAILABLE: u32 = 52;
    pub const NAMING_VIOLATION: u32 = 64;
    pub const OBJECT_CLASS_VIOLATION: u32 = 65;
    pub const NOT_ALLOWED_ON_NONLEAF: u32 = 66;
    pub const ALREADY_EXISTS: u32 = 68;
    /// RFC 4528: the object does not match the request's assertion control.
    pub const ASSERTION_FAILED: u32 = 122;
    pub(crate) const SERVER_DOWN: u32 = 81;
}

#[derive(Debug, thiserror::Error)]
pub enum LdapFailure {
    /// The connection is gone or never came up: reconnect and retry.
    #[error("LDAP {what} failed, server unreachable: {reason}")]
    Down { what: String, reason: String },
    /// The server answered with an error result.
    #[error("LDAP {what} failed: {message} (result code {rc})")]
    Result {
        what: String,
        rc: u32,
        message: String,
    },
    #[error("LDAP {what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    /// An answer this client cannot decode.
    #[error("LDAP {what}: undecodable answer: {reason}")]
    Decode { what: String, reason: String },
}

impl LdapFailure {
    /// Worth reconnecting and trying again (UCS retries on `LDAP_SERVER_DOWN`; busy and
    /// unavailable servers and timeouts are the same situation seen differently).
    pub fn is_transient(&self) -> bool {
        match self {
            LdapFailure::Down { .. } | LdapFailure::Timeout { .. } => true,
            LdapFailure::Result { rc, .. } => {
                matches!(*rc, rc::BUSY | rc::UNAVAILABLE | rc::SERVER_DOWN)
            }
            LdapFailure::Decode { .. } => false,
        }
    }
}

/// Classifies an ldap3 error of the operation `what`.
pub fn failure(what: &str, err: LdapError) -> LdapFailure {
    match err {
        LdapError::LdapResult { result } => LdapFailure::Result {
            what: what.to_owned(),
            rc: result.rc,
            message: if result.text.is_empty() {
                rc_name(result.rc).to_owned()
            } else {
                result.text
            },
        },
        LdapError::Timeout { .. } => LdapFailure::Timeout {
            what: what.to_owned(),
            after: Duration::ZERO,
        },
        LdapError::FilterParsing | LdapError::DecodingUTF8 | LdapError::AdapterInit(_) => {
            LdapFailure::Decode {
                what: what.to_owned(),
                reason: err.to_string(),
            }
        }
        // The connection task ended (slapd closed an idle connection, or it went away):
        // ldap3 says "op send error: channel closed", which tells an operator nothing.
        LdapError::OpSend { .. } | LdapError::ResultRecv { .. } | LdapError::IdScrubSend { .. } => {
            LdapFailure::Down {
                what: what.to_owned(),
                reason: "the connection was closed".to_owned(),
            }
        }
        other => LdapFailure::Down {
            what: what.to_owned(),
            reason: other.to_string(),
        },
    }
}

/// A short name for result codes whose server text is often empty.
pub(crate) fn rc_name(rc: u32) -> &'static str {
    match rc {
        rc::NO_SUCH_OBJECT => "no such object",
        rc::INVALID_CREDENTIALS => "invalid credentials",
        rc::BUSY => "busy",
        rc::UNAVAILABLE => "unavailable",
        rc::INSUFFICIENT_ACCESS => "insufficient access",
        _ => "error",
    }
}

/// `fut` with a deadline; running out is a [`LdapFailure::Timeout`] of `what`.
pub async fn timed<T>(
    what: &str,
    after: Duration,
    fut: impl Future<Output = Result<T, LdapFailure>>,
) -> Result<T, LdapFailure> {
    tokio::time::timeout(after, fut).await.unwrap_or_else(|_| {
        Err(LdapFailure::Timeout {
            what: what.to_owned(),
            after,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_connection_says_so() {
        let (sender, receiver) = tokio::sync::oneshot::channel::<()>();
        drop(sender);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let source = runtime.block_on(receiver).unwrap_err();
        let failure = failure("search cn=x", LdapError::ResultRecv { source });
        assert!(failure.is_transient());
        assert_eq!(
            failure.to_string(),
            "LDAP search cn=x failed, server unreachable: the connection was closed"
        );
    }

    #[test]
    fn only_connection_problems_are_transient() {
        let down = LdapFailure::Down {
            what: "w".into(),
            reason: "r".into(),
        };
        assert!(down.is_transient());
        let busy = LdapFailure::Result {
            what: "w".into(),
            rc: rc::BUSY,
            message: String::new(),
        };
        assert!(busy.is_transient());
        let denied = LdapFailure::Result {
            what: "w".into(),
            rc: rc::INSUFFICIENT_ACCESS,
            message: String::new(),
        };
        assert!(!denied.is_transient());
    }
}
