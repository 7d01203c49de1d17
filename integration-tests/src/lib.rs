//! Test harness for end-to-end tests: private `slapd` instances (Debian's binary, a temp
//! dir, a free loopback port and an ldapi socket), LDAP helpers for the writes the daemons
//! must observe, and deadline-based waiting. No mock LDAP: everything talks to real slapd.
//!
//! A test that panics keeps its slapd directory (config, databases and `slapd.log`) and
//! prints where it is, so a failure can be diagnosed after the fact.

pub mod compare;
pub mod directory;
pub mod hosts;
pub mod listener;
pub mod lockf;
pub mod nats;
pub mod net;
pub mod notifier;
pub mod pki;
pub mod process;
pub mod replica_service;
pub mod slapd;
pub mod users;
pub mod wait;

pub use directory::{Directory, Entry};
pub use listener::{BindAs, Change, JsonlTail, Listener, ListenerOptions};
pub use nats::{NatsCluster, NatsServer};
pub use notifier::{Client, Intake, Notifier};
pub use process::Process;
pub use slapd::{Slapd, SlapdConfig};
pub use wait::wait_until;

/// Harness failures; tests usually just `?` or `unwrap` them.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("LDAP error while {context}: {source}")]
    Ldap {
        context: String,
        #[source]
        source: Box<ldap3::LdapError>,
    },
    #[error("slapd did not start: {0}")]
    SlapdStart(String),
    /// The listener exited, or its files (jsonl output, cache) are not what they must be.
    #[error("listener: {0}")]
    Listener(String),
    /// Two directories differ ([`compare::Comparison`]); the report lists how.
    #[error("directories differ: {0}")]
    Mismatch(String),
    #[error("timed out after {seconds:.1}s waiting for {what}")]
    Timeout { what: String, seconds: f64 },
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

pub(crate) fn io_context(
    context: impl Into<String>,
) -> impl FnOnce(std::io::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Io { context, source }
}

pub(crate) fn ldap_context(
    context: impl Into<String>,
) -> impl FnOnce(ldap3::LdapError) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Ldap {
        context,
        source: Box::new(source),
    }
}
