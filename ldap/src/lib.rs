//! LDAP for every binary of the workspace: decoding entries and syncrepl messages without
//! panicking on malformed server data ([`decode`]), DN helpers ([`dn`]), connecting and
//! binding ([`endpoint`], [`connection`]), the reads the daemons and tools make
//! ([`search`]), writes and their LDIF ([`write`]), `cn=translog` entries ([`translog`]) and errors classified by what the
//! caller does about them ([`error`]).
//!
//! ldap3 does the protocol, except for bulk searches: [`searcher`] owns a socket and decodes
//! their responses without copying values ([`frame`]). ldap3's `SearchEntry::construct` and
//! control parsers panic on malformed data and are never used.

pub mod connection;
pub mod decode;
pub mod dn;
pub mod endpoint;
pub mod error;
pub mod frame;
pub mod search;
pub mod searcher;
pub mod translog;
pub mod write;

pub use connection::{Connection, connect};
pub use decode::RawEntry;
pub use endpoint::{Auth, Endpoint, Password, StartTls};
pub use error::{LdapFailure, rc};
pub use search::{ALL_ATTRS, Lookup, PagedSearch};
pub use searcher::{FramedSearch, SearchConnection};
pub use translog::TranslogEntry;

/// ldap3's handle, for callers that issue their own requests (writes, syncrepl).
pub use ldap3::{Ldap, Scope};
